"""Tasks with verifiable rewards and their data, as tensorflow-datasets builders (array_record).

    task = tasks.get("star_graph", degree=2, path_len=5, num_nodes=50)
    source = task.data_source("train", data_dir)     # built on first use, then cached
    r = task.reward(completions, completion_mask, batch)

``names()`` lists the registered tasks. The default data directory is ``$KLJAX_DATA_DIR`` or
``~/.cache/kljax/data``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Dict, List

from kljax.tasks.arithmetic import Arithmetic
from kljax.tasks.base import GENERATION_COUNT, SymbolTokenizer, Task, default_data_dir
from kljax.tasks.digits import Digits
from kljax.tasks.star_graph import StarGraph
from kljax.tasks.synthetic_lm import SyntheticLM

_REGISTRY: Dict[str, Callable[..., Task]] = {
    "star_graph": StarGraph,
    "arithmetic": Arithmetic,
    "synthetic_lm": SyntheticLM,
    "digits": Digits,
}


def names() -> List[str]:
    """Sorted registered task names."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Task:
    """The task ``name`` built with ``kwargs``; ``KeyError`` lists the names, ``TypeError`` the parameters."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown task {name!r}.{hint} Registered tasks: {', '.join(names())}")
    cls = _REGISTRY[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"task {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    return cls(**kwargs)


__all__ = ["get", "names", "Task", "SymbolTokenizer", "StarGraph", "Arithmetic", "SyntheticLM",
           "Digits", "default_data_dir", "GENERATION_COUNT"]
