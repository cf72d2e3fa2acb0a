"""Run one experiment config: `python -m kljax.main --config=experiments/<file>.py[:arg] --workdir=DIR`.

With no flags it runs the main job: the star-graph pipeline of `experiments/star_graph.py:main`
(pretrain a small transformer on the star graph G(2,3,20), post-train it with GRPO and RPG-UFKL,
print a results table, also written to runs/main/results.md) in `./runs/main`.

Override any config field with `--config.<field>=<value>` (e.g. `--config.total_steps=100
--config.init_from=runs/pretrain`); misspelt fields are errors. Rerunning the same command
resumes from the workdir's latest checkpoint; a workdir holding a different config is refused.
Config errors (including every objective hyper-parameter) are reported before anything is written:
exit status 2 and one line naming the field, the value and what is valid. `--dry_run` validates and
prints the resolved config, mesh and parameter count; `--print_fields` lists every field with its
description; `--help` lists the experiments and their args. Exit statuses: 0 done, 2 config error,
74 I/O error (disk full), 130/143 stopped by SIGINT/SIGTERM after a checkpoint (rerun to resume).

Examples:
  python -m kljax.main                                            # the main job (~3 min on 2 CPU cores)
  python -m kljax.main --config=experiments/star_graph.py:pretrain --workdir=runs/sg/pretrain
  python -m kljax.main --config=experiments/star_graph.py:grpo --workdir=runs/sg/grpo \\
      --config.init_from=runs/sg/pretrain
  python -m kljax.main --config=experiments/star_graph.py:grpo,smoke --workdir=/tmp/smoke
  python -m kljax.plot runs/sg/grpo                                # training curves to PNG
"""
from __future__ import annotations

import errno
import os
import sys

from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "experiments", "star_graph.py") + ":main"
DEFAULT_WORKDIR = os.path.join("runs", "main")

_CONFIG = flags.DEFINE_string(
    "config", DEFAULT_CONFIG,
    "Experiment config: path/to/file.py[:arg] whose get_config(arg) returns an ml_collections.ConfigDict "
    "(see experiments/*.py; each docstring lists its args, command, expected result and time). "
    "Default: the main job (star-graph pipeline). Override fields with --config.<field>=<value>.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    f"Run directory: config.json, checkpoints/, metrics.jsonl, tensorboard/, eval.json (default {DEFAULT_WORKDIR} "
    "for the main job; required otherwise). Rerun the same command to resume.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, print it (fields differing from the experiment's defaults marked *), "
    "the mesh and the parameter count, and exit without writing anything.")
_PRINT_FIELDS = flags.DEFINE_bool(
    "print_fields", False, "Print every config field of the experiment with its value and description, and exit.")
_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "CPU only: split the host into this many virtual devices (to try a mesh on a laptop); "
    "0 = leave as is.")


_PLAN = None  # what kljax.cli.preflight learned from argv (set by `run`)


def _fail(msg: str, status: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(status)


def main(argv):
    from kljax import cli
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; use --config=... --workdir=... --config.<field>=<value>.")
    if _DEVICES.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_DEVICES.value}")
    from kljax.train import sharding
    sharding.initialize_distributed_from_env()
    from kljax.config import ConfigError
    from kljax.tasks.rewards import RewardError
    from kljax.train import checkpoint, common, driver, metrics

    plan = _PLAN
    if plan is None:  # main called without `run` (e.g. app.run(main) by another entry point)
        try:
            _, plan = cli.preflight([sys.argv[0], f"--config={_CONFIG.value}"], DEFAULT_CONFIG)
        except cli.UsageError as e:
            _fail(str(e))
    cfg = plan.cfg
    cfg.lock()
    for note in plan.notes:
        print(note, flush=True)
    if _PRINT_FIELDS.value:
        cli.print_fields(cfg, plan.spec)
        return
    workdir = _WORKDIR.value
    if workdir is None and not _DRY_RUN.value:
        if flags.FLAGS["config"].present:
            _fail("--workdir is required with --config (a directory for checkpoints and metrics).")
        workdir = DEFAULT_WORKDIR
    logging.set_verbosity(logging.ERROR)  # tfds's per-builder warnings drown the progress bar
    try:
        common.validate(cfg)
    except ConfigError as e:
        _fail(str(e))
    if _DRY_RUN.value:
        cli.dry_run(cfg, plan, workdir)
        return
    try:
        result = common.loop_module(cfg).run(cfg, workdir)
    except (checkpoint.ConfigMismatchError, ConfigError) as e:
        _fail(str(e))
    except driver.Interrupted as e:
        _fail(str(e), cli.EXIT_SIGTERM if e.signum == 15 else cli.EXIT_SIGINT)
    except metrics.NonFiniteMetricError as e:
        _fail(str(e), 1)
    except checkpoint.SaveFailedError as e:
        _fail(str(e), cli.EXIT_IO)
    except KeyboardInterrupt:  # Ctrl-C before the first step (the loop itself checkpoints and exits 130)
        _fail("interrupted (Ctrl-C) outside the training steps; nothing new to save. Rerun the same command to "
              "resume from the last checkpoint (if any).", cli.EXIT_SIGINT)
    except OSError as e:
        where = e.filename or "the workdir"
        verb = "cannot write" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) else "I/O error on"
        _fail(f"{verb} {where}: {e.strerror or e}. The run stopped; its last complete checkpoint in "
              f"{workdir}/checkpoints is intact. Fix the cause (e.g. free disk space) and rerun the same command "
              "to resume.", cli.EXIT_IO)
    except RewardError as e:  # a user's reward function failed: name it, the step and the prompt
        _fail(f"{e}\nNothing written is lost: rerun the same command after fixing the reward to resume from the "
              "latest checkpoint.")
    if cfg.loop != "pipeline" and result:
        keys = [k for k in result if k.startswith("eval/")]
        print("final evaluation: " + ", ".join(f"{k}={result[k]:.4g}" for k in keys), flush=True)
        print(f"workdir: {workdir} (python -m kljax.plot {workdir} draws the curves)", flush=True)


def run(argv=None):
    """Entry point: argv checks (`kljax.cli.preflight`), then absl parses the flags and calls `main`."""
    global _PLAN
    from kljax import cli
    from kljax.train import sharding
    sharding.skip_absent_tpu()
    argv = list(sys.argv if argv is None else argv)
    try:
        argv, _PLAN = cli.preflight(argv, DEFAULT_CONFIG)
    except cli.UsageError as e:
        _fail(str(e))
    if _PLAN is None:  # --help
        cli.print_help(__doc__)
        sys.exit(0)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
