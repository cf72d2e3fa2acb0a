"""Run one experiment config: `python -m kljax.main --config=experiments/<file>.py[:arg] --workdir=DIR`.

With no flags it runs the main job: the star-graph pipeline of `experiments/star_graph.py:main`
(pretrain a small transformer on the star graph G(2,3,20), post-train it with GRPO and RPG-UFKL,
print a results table, also written to runs/main/results.md) in `./runs/main`.

Override any config field with `--config.<field>=<value>` (e.g. `--config.total_steps=100
--config.init_from=runs/pretrain`); misspelt fields are errors. Rerunning the same command
resumes from the workdir's latest checkpoint; a workdir holding a different config is refused.
Config errors are reported before anything is compiled.

Examples:
  python -m kljax.main                                            # the main job (~3 min on 2 CPU cores)
  python -m kljax.main --config=experiments/star_graph.py:pretrain --workdir=runs/sg/pretrain
  python -m kljax.main --config=experiments/star_graph.py:grpo --workdir=runs/sg/grpo \\
      --config.init_from=runs/sg/pretrain
  python -m kljax.main --config=experiments/star_graph.py:grpo,smoke --workdir=/tmp/smoke
  python -m kljax.plot runs/sg/grpo                                # training curves to PNG
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "experiments", "star_graph.py") + ":main"
DEFAULT_WORKDIR = os.path.join("runs", "main")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG,
    "Experiment config: path/to/file.py[:arg] whose get_config(arg) returns an ml_collections.ConfigDict "
    "(see experiments/*.py; each docstring lists its args, command, expected result and time). "
    "Default: the main job (star-graph pipeline). Override fields with --config.<field>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    f"Run directory: config.json, checkpoints/, metrics.jsonl, tensorboard/, eval.json (default {DEFAULT_WORKDIR} "
    "for the main job; required otherwise). Rerun the same command to resume.")
_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "CPU only: split the host into this many virtual devices (to try a mesh on a laptop); "
    "0 = leave as is.")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; use --config=... --workdir=... --config.<field>=<value>.")
    if _DEVICES.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_DEVICES.value}")
    from kljax.train import sharding
    sharding.initialize_distributed_from_env()
    from kljax.config import ConfigError
    from kljax.tasks.rewards import RewardError
    from kljax.train import checkpoint, common

    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    if workdir is None:
        if flags.FLAGS["config"].present:
            _fail("--workdir is required with --config (a directory for checkpoints and metrics).")
        workdir = DEFAULT_WORKDIR
    logging.set_verbosity(logging.ERROR)  # tfds's per-builder warnings drown the progress bar
    try:
        common.validate(cfg)
    except ConfigError as e:
        _fail(str(e))
    try:
        result = common.loop_module(cfg).run(cfg, workdir)
    except checkpoint.ConfigMismatchError as e:
        _fail(str(e))
    except ConfigError as e:
        _fail(str(e))
    except RewardError as e:  # a user's reward function failed: name it, the step and the prompt
        _fail(f"{e}\nNothing written is lost: rerun the same command after fixing the reward to resume from the "
              "latest checkpoint.")
    if cfg.loop != "pipeline" and result:
        keys = [k for k in result if k.startswith("eval/")]
        print("final evaluation: " + ", ".join(f"{k}={result[k]:.4g}" for k in keys), flush=True)
        print(f"workdir: {workdir} (python -m kljax.plot {workdir} draws the curves)", flush=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
