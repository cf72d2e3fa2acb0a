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
