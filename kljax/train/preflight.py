"""Objective hyper-parameters checked before anything is written or compiled.

`check_objective_hparams(cfg)` calls the configured objective once under `jax.eval_shape` (tracing
only: no compilation, no computation) on a tiny batch shaped like the one its loop builds, with the
config's hyper-parameters as plain Python values. The objective's own argument checks
(`ops.check_range`, `ops.check_choice`, the inputs each option needs) therefore run at config time,
and their `ValueError`/`TypeError` becomes a `ConfigError` naming the config field, its value and
what is valid. Nothing here knows an objective's valid ranges: the objectives stay the one source.
"""
from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from kljax import objectives
from kljax.config import ConfigError, require

_B, _T, _V = 4, 3, 5  # tiny abstract shapes (rows = 2 groups of 2 when the loop uses groups)


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def unknown_hparams(name: str, hparams: dict, prefix: str = "objective") -> None:
    """Raise `ConfigError` for keys of `hparams` that objective `name` does not take (did-you-mean)."""
    params = _params(objectives.get(name))
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY or v.default is not inspect.Parameter.empty]
    for k in hparams:
        if k not in params:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" Did you mean `{prefix}.{close[0]}`?" if close else ""
            raise ConfigError(f"config field `{prefix}.{k}` is not a hyper-parameter of objective {name!r}.{hint} "
                              f"Valid: {', '.join(valid)}.")


def _policy_call(cfg: Any, fn, hp: dict):
    r = cfg.get("rl", None) or {}
    g = max(1, int(r.get("group_size", 2)))
    B = 2 * g
    batch = {"logp": _sds(B, _T), "old_logp": _sds(B, _T), "ref_logp": _sds(B, _T), "mask": _sds(B, _T),
             "logits": _sds(B, _T, _V), "rewards": _sds(B)}
    if hp.get("kl_estimator", None) == "exact":
        batch["ref_logits"] = _sds(B, _T, _V)
    if r.get("teacher_from", ""):
        batch["teacher_logp"] = _sds(B, _T)
    if r.get("advantage", "objective") != "objective":
        batch["advantages"] = _sds(B)
    kw = dict(hp)
    if "group_size" in _params(fn):
        kw["group_size"] = g
    return lambda b: fn(b, **kw), batch


def _distill_call(cfg: Any, fn, hp: dict):
    kw = dict(hp)
    if "labels" in _params(fn) and "labels" not in kw:
        kw["labels"] = jnp.zeros((_B, _T), jnp.int32)
    if "tokens" in _params(fn) and "tokens" not in kw:
        kw["tokens"] = jnp.zeros((_B, _T), jnp.int32)
    return (lambda b: fn(b["s"], b["t"], b["m"], **kw),
            {"s": _sds(_B, _T, _V), "t": _sds(_B, _T, _V), "m": _sds(_B, _T)})


def _preference_call(cfg: Any, fn, hp: dict):
    if cfg.objective.name == "dpkd":
        batch = {"student_logits": _sds(_B, _T, _V), "teacher_logits": _sds(_B, _T, _V), "mask": _sds(_B, _T)}
    else:
        batch = {k: _sds(_B, _T) for k in ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp",
                                           "chosen_mask", "rejected_mask")}
    return lambda b: fn(b, **hp), batch


def _value_call(cfg: Any, fn, hp: dict):
    """A Q♯ critic loss: per-token critic outputs (a histogram over `model.num_atoms` atoms when > 1),
    the next tokens, one return per sequence and the mask, as `kljax.train.qsharp.critic_loss` calls it."""
    kw = dict(hp)
    atoms = int((cfg.get("model", None) or {}).get("num_atoms", 1))
    shape = (_B, _T, _V) + ((atoms,) if atoms > 1 else ())
    if atoms > 1 and "atoms" in _params(fn):
        q = cfg.get("qsharp", None) or {}
        kw.setdefault("atoms", jnp.linspace(float(q.get("v_min", 0.0)), float(q.get("v_max", 1.0)), atoms))
    batch = {"c": _sds(*shape), "tok": _sds(_B, _T, dtype=jnp.int32), "ret": _sds(_B), "m": _sds(_B, _T)}
    return lambda b: fn(b["c"], b["tok"], b["ret"], b["m"], **kw), batch


_CALLS = {"policy": _policy_call, "distill": _distill_call, "preference": _preference_call, "value": _value_call}


def _field_of(msg: str, hp: dict, prefix: str) -> str | None:
    """The hyper-parameter a check's message is about (`name=value ...` or a quoted name)."""
    for k in sorted(hp, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(k)}\s*=", msg) or re.search(rf"['`]{re.escape(k)}['`]", msg):
            return f"{prefix}.{k}"
    return None


def check_objective_hparams(cfg: Any, prefix: str = "objective") -> None:
    """Run objective `cfg.objective.name`'s own argument checks on the config's hyper-parameters.

    Raises `ConfigError` naming the field (e.g. `objective.beta`), the value and the objective's
    message (valid range / choices), for every family (policy, distillation, preference, Q♯ critics).
    """
    block = cfg.get("objective", None)
    if block is None or "name" not in block:
        return
    name = block.name
    if name not in objectives.names():
        return  # the loop's own check names the field and the valid names
    hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in block.items() if k != "name"}
    fn = objectives.get(name)
    unknown_hparams(name, hp, prefix)
    make = _CALLS.get(objectives.family(name))
    if make is None:
        return
    call, batch = make(cfg, fn, hp)
    try:
        jax.eval_shape(call, batch)
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e.args[0]) if e.args else str(e)
        msg = msg.splitlines()[0] if msg else type(e).__name__
        field = _field_of(msg, hp, prefix)
        if field is not None:
            value = hp[field.split(".")[-1]]
            raise ConfigError(f"config field `{field}` = {value!r} is invalid for objective {name!r}: {msg}. "
                              f"Fix it with --config.{field}=<value>.") from None
        raise ConfigError(f"config field `{prefix}` (objective {name!r} with "
                          f"{', '.join(f'{k}={v!r}' for k, v in hp.items()) or 'its defaults'}) cannot run in loop "
                          f"{cfg.get('loop', '?')!r}: {msg}") from None


def objective_hparams(cfg) -> dict:
    """`cfg.objective` without its `name`, as plain keyword arguments."""
    d = cfg.objective.to_dict() if isinstance(cfg.objective, ml_collections.ConfigDict) else dict(cfg.objective)
    d.pop("name", None)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def check_objective(cfg, family: str | tuple) -> Callable:
    """The registered objective `cfg.objective.name`, checked to belong to `family`."""
    families = (family,) if isinstance(family, str) else tuple(family)
    name = require(cfg, "objective.name", lambda v: isinstance(v, str),
                   f"name a registered objective; {families[0]} objectives: "
                   f"{[n for n in objectives.names() if objectives.family(n) in families]}")
    if name not in objectives.names():
        raise ConfigError(f"config field `objective.name` = {name!r} is not a registered objective; "
                          f"valid {'/'.join(families)} objectives: "
                          f"{[n for n in objectives.names() if objectives.family(n) in families]}")
    if objectives.family(name) not in families:
        raise ConfigError(f"config field `objective.name` = {name!r} is a {objectives.family(name)!r} objective but "
                          f"loop {cfg.loop!r} needs a {'/'.join(families)} objective: one of "
                          f"{[n for n in objectives.names() if objectives.family(n) in families]}")
    return objectives.get(name)
