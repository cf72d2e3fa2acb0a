"""Tasks with verifiable rewards and their data, as tensorflow-datasets builders (array_record).

    task = tasks.get("star_graph", degree=2, path_len=5, num_nodes=50)
    source = task.data_source("train", data_dir)     # built on first use, then cached
    r = task.reward(completions, completion_mask, batch)

``names()`` lists the registered tasks; ``register(name, factory)`` adds one from user code (a config
names the module that calls it in ``task.module``, imported before the task is built). The default data directory is ``$KLJAX_DATA_DIR`` or
``~/.cache/kljax/data``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Dict, List

from kljax.tasks.arithmetic import Arithmetic
from kljax.tasks.base import GENERATION_COUNT, SymbolTokenizer, Task, default_data_dir
from kljax.tasks.digits import Digits
from kljax.tasks.files import Files, files_task
from kljax.tasks.star_graph import StarGraph
from kljax.tasks.synthetic_lm import SyntheticLM

_REGISTRY: Dict[str, Callable[..., Task]] = {
    "star_graph": StarGraph,
    "arithmetic": Arithmetic,
    "synthetic_lm": SyntheticLM,
    "digits": Digits,
    "files": files_task,
}


def register(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Register a task: ``factory(**task_fields)`` returns a :class:`Task` (usually a frozen dataclass
    subclassing ``SequenceTask``, whose fields are then checked by name). Re-registering the same factory
    is a no-op; another factory under a taken name needs ``overwrite=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"task factory for {name!r} must be callable, got {factory!r}")
    if name in _REGISTRY and _REGISTRY[name] is not factory and not overwrite:
        raise ValueError(f"task {name!r} is already registered (to {_REGISTRY[name]!r}); pass overwrite=True")
    _REGISTRY[name] = factory


def import_module(spec: str) -> None:
    """Import user modules (comma-separated ``pkg.module`` names or ``path/to/file.py``) so that they can
    ``register`` tasks. A file is imported once per process."""
    import importlib
    import importlib.util
    import os
    import sys
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        if part.endswith(".py"):
            path = os.path.abspath(part)
            import hashlib
            stem = os.path.splitext(os.path.basename(path))[0]
            name = f"kljax_user_tasks_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"  # one per file
            if name in sys.modules:
                continue
            if not os.path.exists(path):
                raise FileNotFoundError(f"task.module: {part} does not exist")
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            mspec.loader.exec_module(module)
        else:
            importlib.import_module(part)


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
    if dataclasses.is_dataclass(cls):
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"task {name!r} has no parameter(s) {unknown}; valid parameters: {valid}")
    return cls(**kwargs)


__all__ = ["get", "names", "register", "import_module", "Files", "Task", "SymbolTokenizer", "StarGraph", "Arithmetic", "SyntheticLM",
           "Digits", "default_data_dir", "GENERATION_COUNT"]
