"""`python -m kljax.plot WORKDIR [--out FILE] [--metrics reward,kl,...]`: training curves to PNG.

Reads `WORKDIR/metrics.jsonl` and draws one subplot per metric against the step (reward, kl,
entropy, accuracy first, then every other numeric metric unless `--metrics` picks some).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

PREFERRED = ("reward", "kl", "entropy", "accuracy", "loss")
_SKIP = {"step", "time"}


def _numeric_keys(records: list[dict]) -> list[str]:
    keys: list[str] = []
    for rec in records:
        for k, v in rec.items():
            if k not in _SKIP and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    first = [k for k in PREFERRED if k in keys]
    return first + sorted(k for k in keys if k not in first)


def plot_workdir(workdir: str, out: str | None = None, metrics: Sequence[str] | None = None) -> str:
    """Write the curves of `workdir/metrics.jsonl` to `out` (default `workdir/curves.png`); return the path.

    Raises `FileNotFoundError` if there is no metrics file, `ValueError` if it holds no metrics or a
    requested metric is absent.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kljax.train.metrics import METRICS_FILE, read_metrics

    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no metrics in {workdir}: {path} does not exist (is WORKDIR a kljax run's workdir?).")
    records = [r for r in read_metrics(workdir) if "step" in r]
    available = _numeric_keys(records)
    if not available:
        raise ValueError(f"{path} holds no numeric metrics to plot.")
    names = list(metrics) if metrics else available
    missing = [m for m in names if m not in available]
    if missing:
        raise ValueError(f"metric(s) {missing} not in {path}; available: {available}.")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # leave room for the suptitle above the subplot titles
    out = out or os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kljax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--out", default=None, help="PNG path (default WORKDIR/curves.png)")
    parser.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    args = parser.parse_args(argv)
    names = [m for m in args.metrics.split(",") if m] if args.metrics else None
    from kljax.train.metrics import METRICS_FILE
    stages = stage_dirs(args.workdir) if not os.path.exists(os.path.join(args.workdir, METRICS_FILE)) else []
    try:
        if stages:  # a pipeline workdir: one figure per stage, in each stage's directory
            for d in stages:
                print(plot_workdir(d, None, names))
            return 0
        out = plot_workdir(args.workdir, args.out, names)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def stage_dirs(workdir: str) -> list[str]:
    """Subdirectories of a pipeline workdir that hold a run's metrics (its stages), sorted by name."""
    from kljax.train.metrics import METRICS_FILE
    if not os.path.isdir(workdir):
        return []
    return sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                  if os.path.exists(os.path.join(workdir, d, METRICS_FILE)))


if __name__ == "__main__":
    sys.exit(main())
