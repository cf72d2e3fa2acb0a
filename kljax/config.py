"""Config helpers shared by `kljax.main` and the training loops.

Configs are `ml_collections.ConfigDict`s. These helpers validate fields with errors that name the
dotted field and the fix, turn a config into plain JSON (for `workdir/config.json`), and list the
fields in which two configs differ.
"""
from __future__ import annotations

import fnmatch
import json
from typing import Any, Callable, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A config field has an invalid value; the message names the field and the fix."""


_MISSING = object()


def get_field(cfg: Any, field: str, default: Any = _MISSING) -> Any:
    """Value of the dotted `field` (e.g. "optim.learning_rate") in `cfg`, or `default` if absent."""
    node = cfg
    for part in field.split("."):
        if isinstance(node, Mapping) or isinstance(node, ml_collections.ConfigDict):
            if part in node:
                node = node[part]
                continue
        if default is _MISSING:
            raise ConfigError(f"config field `{field}` is missing; set `config.{field}` in the experiment config.")
        return default
    return node


def require(cfg: Any, field: str, condition: bool | Callable[[Any], bool], fix: str, *, default: Any = _MISSING,
            prefix: str = "") -> Any:
    """Check one config field; raise `ConfigError` naming `field`, its value and `fix` if it fails.

    `condition` is either a bool already computed by the caller or a predicate applied to the
    field's value. Returns the field's value so calls can be chained into assignments:
    `lr = require(cfg, "optim.learning_rate", lambda v: v > 0, "use a positive learning rate")`.
    `default` is used when the field is absent (otherwise absence is an error); `prefix` is
    prepended to the field name in messages when `cfg` is a sub-config (e.g. "optim").
    """
    name = f"{prefix}.{field}" if prefix else field
    try:
        value = get_field(cfg, field, default)
    except ConfigError:
        raise ConfigError(f"config field `{name}` is missing: {fix}") from None
    ok = condition(value) if callable(condition) else bool(condition)
    if not ok:
        raise ConfigError(f"config field `{name}` = {value!r} is invalid: {fix}")
    return value


def to_jsonable(value: Any) -> Any:
    """Plain JSON form of a config (ConfigDicts/mappings -> dicts, tuples -> lists, others -> repr)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / jax scalars
        return value.item()
    return repr(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: tree}


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: {"dotted.field": (old, new)}; a missing field shows as `<absent>`."""
    a = _flatten(json.loads(json.dumps(to_jsonable(old))))
    b = _flatten(json.loads(json.dumps(to_jsonable(new))))
    absent = "<absent>"
    return {k: (a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)}


def matches_any(field: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted `field` matches one of the fnmatch `patterns` (e.g. "*.total_steps")."""
    return any(fnmatch.fnmatchcase(field, p) for p in patterns)


# ----------------------------------------------------------------------------------------------
# Base configs that experiment files build on (experiments import these, never kljax.train)


def base_config(loop: str = "sft") -> ml_collections.ConfigDict:
    """A config with every common field at its default (experiments override what they need).

    Loop-specific sub-configs (`objective`, `rl`, `distill`, `qsharp`, `stages`) are added by the
    experiment. Call `.lock()` on the result so a misspelt `--config.field` is an error.
    """
    c = ml_collections.ConfigDict()
    c.loop = loop
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(name="star_graph", data_dir=""))
    from kljax.models.transformer import lm_config  # models import config helpers, not the reverse
    c.model = lm_config(vocab_size=0, max_len=0, width=64, depth=3, num_heads=4)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.optim = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-3, warmup_steps=50, schedule="cosine",
                                             weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.95, end_lr_ratio=0.0))
    c.total_steps = 500
    c.batch_size = 128
    c.log_every = 10
    c.eval_every = 0
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2, best_metric="", best_mode="max",
                                                  async_save=True))
    c.eval = ml_collections.ConfigDict(dict(num_examples=512, batch_size=128, temperature=0.0, pass_k=0,
                                            pass_k_temperature=1.0, max_new_tokens=0))
    c.init_from = ""
    return c


def rl_base_config(objective: Mapping[str, Any], *, reference: str = "fixed", reset_every: int = 0,
                   dynamic_sampling: bool = False) -> ml_collections.ConfigDict:
    """`base_config("rl")` with an `objective` block, the `rl` block at its defaults and the optimizer
    RL experiments share (constant 3e-4 after 5 warm-up steps, best checkpoint by eval accuracy)."""
    c = base_config("rl")
    c.objective = ml_collections.ConfigDict(dict(objective))
    c.rl = ml_collections.ConfigDict(dict(
        group_size=8, prompts_per_step=16, updates_per_rollout=1, minibatch_size=64, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=0, advantage="objective", reference=reference, reset_every=reset_every,
        dynamic_sampling=dynamic_sampling, max_sampling_rounds=4, teacher_from="", vocab_tile=-1,
        reference_sharding="fsdp", teacher_sharding="fsdp"))
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 5
    c.optim.schedule = "constant"
    c.checkpoint.best_metric = "eval/accuracy"
    return c
