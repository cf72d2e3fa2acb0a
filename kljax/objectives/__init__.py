"""The objective registry: a config names its loss with a string.

``get(name)`` returns the objective function, ``names()`` lists every registered name,
``family(name)`` says whether it is a ``policy``, ``distill``, ``preference`` or ``value`` loss.
Objective modules register themselves with ``@register(name, family)`` when imported below.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Optional, Tuple

FAMILIES = ("policy", "distill", "preference", "value")
_REGISTRY: Dict[str, Tuple[str, Callable]] = {}


def register(name: str, family: str):
    """Decorator: make ``fn`` available as ``get(name)``; names are unique across families."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name][1] is not fn:
            raise ValueError(f"objective name {name!r} is already registered")
        _REGISTRY[name] = (family, fn)
        return fn

    return deco


def _unknown(name: str) -> KeyError:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(
        f"unknown objective {name!r}.{hint} Registered objectives: {', '.join(sorted(_REGISTRY))}"
    )


def get(name: str) -> Callable:
    """The objective registered as ``name``; a ``KeyError`` lists the valid names otherwise."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][1]


def family(name: str) -> str:
    """``policy``, ``distill``, ``preference`` or ``value`` for a registered objective."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][0]


def names(family: Optional[str] = None):
    """Sorted registered names, optionally only those of one family."""
    return sorted(n for n, (f, _) in _REGISTRY.items() if family is None or f == family)


# Importing the modules fills the registry.
from kljax.objectives import advantages, distill, policy, preference, value  # noqa: E402,F401
