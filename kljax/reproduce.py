"""`python -m kljax.reproduce NAME [--workdir DIR] [--smoke]`: run a table's pipeline, write markdown + PNG.

NAME is an experiment file in `experiments/` whose `main` arg is a pipeline (e.g. `star_graph`,
`arithmetic`). The stages run in `DIR/<stage>` (default `runs/reproduce/NAME`), finished stages are
skipped and interrupted ones resume; the table goes to `DIR/results.md` and each stage's training
curves to `DIR/<stage>/curves.png`.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(_REPO, "experiments")


def available() -> list[str]:
    """Experiment names whose `main` config is a pipeline."""
    out = []
    for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py"))):
        with open(path) as f:
            if "pipeline_config" in f.read():
                out.append(os.path.splitext(os.path.basename(path))[0])
    return out


def main(argv: list[str] | None = None) -> int:
    names = available()
    p = argparse.ArgumentParser(prog="python -m kljax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"one of {names}")
    p.add_argument("--workdir", default=None, help="default runs/reproduce/NAME")
    p.add_argument("--smoke", action="store_true", help="tiny models and a few steps (checks the plumbing)")
    args = p.parse_args(argv)
    if args.name not in names:
        p.error(f"unknown name {args.name!r}; choose one of {names}")
    from kljax.config import ConfigError
    from kljax.plot import plot_workdir
    from kljax.train import common, pipeline

    cfg = common.load_config_file(os.path.join(EXPERIMENTS, args.name + ".py") + (":main,smoke" if args.smoke else ":main"))
    workdir = args.workdir or os.path.join("runs", "reproduce", args.name + ("_smoke" if args.smoke else ""))
    try:
        common.validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = pipeline.run(cfg, workdir)
    for stage in results:
        try:
            print("curves:", plot_workdir(os.path.join(workdir, stage)))
        except (FileNotFoundError, ValueError) as e:
            print(f"no curves for {stage}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
