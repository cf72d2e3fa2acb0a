"""Shared helpers for the reproduction tables: output folder, JSON, markdown, mean ± spread."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Sequence

import numpy as np


def machine() -> str:
    """A one-line description of the machine the table ran on."""
    import jax
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"jax {jax.__version__} on {jax.default_backend()}")


def prepare(out: str, cfg: dict) -> None:
    """Create ``out`` and write the exact config to ``out/config.json``."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "config.json"), cfg)


def write_json(path: str, obj, digits: int | None = None) -> None:
    """JSON with sorted keys; ``digits`` rounds floats to that many significant digits (results)."""
    with open(path, "w") as f:
        json.dump(_jsonable(obj, digits), f, indent=None if digits else 1, sort_keys=True)
        f.write("\n")


def _jsonable(x, digits=None):
    if isinstance(x, dict):
        return {str(k): _jsonable(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, digits) for v in x]
    if isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array__"):
        a = np.asarray(x)
        return _jsonable(a.item() if a.ndim == 0 else a.tolist(), digits)
    if digits and isinstance(x, float) and np.isfinite(x):
        return float(f"{x:.{digits}g}")
    return x


def mean_spread(values, digits: int = 3) -> str:
    """``mean ± std`` over seeds (sample std; just the mean for one value)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


class Timer:
    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t0


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
