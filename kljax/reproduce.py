"""`python -m kljax.reproduce NAME [--quick] [--seeds N] [--out DIR]`: run a results table.

Two kinds of NAME:

* a table of `kljax.repro` (`kl_estimators`, `mdvi`, `distill`, `star_graph`): toy problems small enough to
  enumerate, or (`star_graph`) small models trained by kljax's loops in `--workdir` (default
  `runs/reproduce/NAME`).
  The markdown table (`results.md`), the raw numbers (`results.json`), the exact settings
  (`config.json`) and PNG plots go to `DIR` (default `results/NAME`, `results/NAME_quick` with
  `--quick`). `--quick` is the reduced version CI runs (seconds); `--seeds` overrides the seed count.
* an experiment file in `experiments/` whose `main` arg is a pipeline (e.g. `star_graph`,
  `arithmetic`): `python -m kljax.reproduce NAME [--workdir DIR] [--smoke]`. The stages run in
  `DIR/<stage>` (default `runs/reproduce/NAME`), finished stages are skipped and interrupted ones
  resume; the table goes to `DIR/results.md` and each stage's training curves to
  `DIR/<stage>/curves.png`.
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


def run_table(name: str, quick: bool = False, seeds: int | None = None, out: str | None = None,
              workdir: str | None = None) -> dict:
    """Run the `kljax.repro` table `name`; returns its results (also written to `out`).

    `workdir`: where a table that trains models with kljax's loops keeps their runs (its config's
    `workdir`; finished runs are reused)."""
    from kljax import repro
    module = repro.get(name)
    out = out or os.path.join("results", name + ("_quick" if quick else ""))
    cfg = module.config(quick=quick, seeds=seeds)
    if workdir and "workdir" in cfg:
        cfg["workdir"] = workdir
    results = module.run(cfg, out)
    print(f"wrote {out}/results.md, results.json, config.json and plots")
    return results


def main(argv: list[str] | None = None) -> int:
    from kljax import repro
    from kljax.train import sharding
    sharding.skip_absent_tpu()
    tables = repro.names()
    names = available()
    p = argparse.ArgumentParser(prog="python -m kljax.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"a table {tables} or a pipeline experiment {names}")
    p.add_argument("--quick", action="store_true", help="tables: the reduced version (seconds)")
    p.add_argument("--seeds", type=int, default=None, help="tables: number of seeds")
    p.add_argument("--out", default=None, help="tables: output folder (default results/NAME)")
    p.add_argument("--workdir", default=None, help="pipelines: default runs/reproduce/NAME; tables that train "
                   "models (star_graph): where their runs go")
    p.add_argument("--smoke", action="store_true", help="pipelines: tiny models and a few steps (checks the plumbing)")
    args = p.parse_args(argv)
    if args.name in tables:
        if args.seeds is not None and args.seeds < 1:
            p.error("--seeds must be at least 1")
        run_table(args.name, quick=args.quick, seeds=args.seeds, out=args.out, workdir=args.workdir)
        return 0
    if args.name not in names:
        p.error(f"unknown name {args.name!r}; choose a table {tables} or a pipeline {names}")
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
