"""Reproduction tables: one module per table, each run by `python -m kljax.reproduce NAME`.

A table module defines ``DESCRIPTION`` (one line), ``config(quick: bool, seeds: int | None) -> dict``
(every setting of the run, JSON-serializable) and ``run(cfg: dict, out: str) -> dict`` which writes
``results.md``, ``results.json``, ``config.json`` and its PNG plots into ``out`` and returns the
results (the same dict that ``results.json`` holds). Tables are pure JAX/numpy on toy problems whose
outcomes can be enumerated; they import kljax's objectives and divergences, never reimplement them.
"""
from __future__ import annotations

import importlib

TABLES = {
    "kl_estimators": "kljax.repro.kl_estimators",
    "mdvi": "kljax.repro.mdvi",
    "distill": "kljax.repro.distill",
    "star_graph": "kljax.repro.star_graph",
}


def names() -> list[str]:
    return sorted(TABLES)


def get(name: str):
    """The table module registered as ``name``."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; tables: {', '.join(names())}")
    return importlib.import_module(TABLES[name])
