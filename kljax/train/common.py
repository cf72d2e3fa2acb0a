"""The loop registry and the config checks every loop shares.

What loops share lives in modules named for it: `setup` (task, model, mesh, state and step from a
config, `setup(cfg)`), `runs` (another run's config and checkpoint: reference, teacher,
initialization), `sequences` (forward passes over prompt + completion), `evaluation` (generation
eval) and `driver` (`run_loop`).

Config schema (top-level fields; loops read what they need):

    loop        "sft" | "rl" | "distill" | "qsharp" | "pipeline" | ...  (see `LOOP_MODULES`)
    seed        int
    task        ConfigDict(name=..., <task parameters>, data_dir=None)
    model       kljax.models.lm_config(...); vocab_size=0 -> task.vocab_size; max_len=0 ->
                task.prompt_len + task.completion_len
    mesh        ConfigDict(data=-1, fsdp=1, tensor=1)
    optim       ConfigDict(name, learning_rate, warmup_steps, schedule, weight_decay, grad_clip, b1, b2)
                (`optim.total_steps` defaults to the top-level `total_steps`)
    total_steps, batch_size (GLOBAL), log_every, eval_every
    checkpoint  ConfigDict(every, keep, best_metric="eval/accuracy", best_mode="max", async_save=True)
    eval        ConfigDict(num_examples, batch_size, temperature (0 = greedy), pass_k (0 = off),
                           pass_k_temperature, max_new_tokens (0 = task.completion_len))
    init_from   "" | a workdir whose latest checkpoint initializes the model (and is the reference)
    + loop-specific sub-configs (objective, rl, distill, qsharp, stages).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from kljax.config import ConfigError, require
from kljax.train import sharding as shd, state as state_lib
from kljax.train import setup as setup_lib

# loop name -> module implementing `run(cfg, workdir) -> dict` and optionally `validate(cfg)`.
LOOP_MODULES = {
    "sft": "kljax.train.sft",
    "rl": "kljax.train.rl",
    "distill": "kljax.train.distill",
    "qsharp": "kljax.train.qsharp",
    "preference": "kljax.train.preference",
    "pipeline": "kljax.train.pipeline",
    "reward_model": "kljax.train.reward_model",
}


# ----------------------------------------------------------------------------------------------
# Task, model, mesh, state


# ----------------------------------------------------------------------------------------------
# Other runs' params (reference / teacher / initialization)


# ----------------------------------------------------------------------------------------------
# Forward passes on prompt + completion


# ----------------------------------------------------------------------------------------------
# Evaluation


# ----------------------------------------------------------------------------------------------
# The step-loop driver


# ----------------------------------------------------------------------------------------------
# Config checks shared by loops (run before anything is compiled)


def validate_common(cfg: Any) -> None:
    """Checks every loop needs: task, model, mesh vs devices, batch divisibility, steps, optimizer.

    Raises `ConfigError` naming the field and the fix.
    """
    task = setup_lib.build_task(cfg)
    try:
        setup_lib.model_config(cfg, task)
        from kljax.models.transformer import _resolved
        _resolved(setup_lib.model_config(cfg, task))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config field `model`: {e}") from None
    mc = setup_lib.model_config(cfg, task)
    if mc.max_len < task.prompt_len + task.completion_len:
        raise ConfigError(f"config field `model.max_len` = {mc.max_len} is too short: the task needs "
                          f"{task.prompt_len + task.completion_len} (prompt + completion); use 0 (= that) or more.")
    if mc.vocab_size < task.vocab_size:
        raise ConfigError(f"config field `model.vocab_size` = {mc.vocab_size} < task vocabulary {task.vocab_size}; "
                          "use 0 (= the task's).")
    try:
        mesh = setup_lib.build_mesh(cfg)
    except shd.MeshError as e:
        raise ConfigError(str(e)) from None
    dp = shd.data_parallel_size(mesh)
    require(cfg, "total_steps", lambda v: int(v) >= 1, "use a positive number of steps.")
    if "batch_size" in cfg:
        require(cfg, "batch_size", lambda v: int(v) >= 1 and int(v) % dp == 0,
                f"the global batch must be a positive multiple of the data-parallel size {dp} "
                f"(mesh.data × mesh.fsdp on {jax.device_count()} devices); e.g. {max(dp, 8 * dp)}.")
    if "eval" in cfg:
        require(cfg, "eval.batch_size", lambda v: int(v) >= 1 and int(v) % dp == 0,
                f"use a positive multiple of the data-parallel size {dp}.", default=128)
    if "checkpoint" in cfg:
        require(cfg, "checkpoint.every", lambda v: int(v) >= 1, "save every N >= 1 steps.", default=100)
        require(cfg, "checkpoint.keep", lambda v: int(v) >= 1, "keep at least the latest checkpoint (>= 1).",
                default=3)
        require(cfg, "checkpoint.best_mode", lambda v: v in ("max", "min"), "use 'max' or 'min'.", default="max")
    try:
        state_lib.optimizer_from_config(setup_lib.optim_config(cfg))
    except ConfigError as e:
        raise ConfigError(str(e).replace("`optim.total_steps`", "`total_steps`")) from None


# ----------------------------------------------------------------------------------------------
# Config files


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of an experiment file given as "path/to/file.py[:arg]" (as --config takes)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist (from {spec!r}).")
    name = "kljax_cfg_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def loop_module(cfg: Any):
    """The module implementing `cfg.loop` (`run(cfg, workdir)`, optional `validate(cfg, check_paths)`)."""
    import importlib
    name = require(cfg, "loop", lambda v: v in LOOP_MODULES, f"use one of {sorted(LOOP_MODULES)}.")
    try:
        return importlib.import_module(LOOP_MODULES[name])
    except ImportError as e:
        raise ConfigError(f"config field `loop` = {name!r}: its module {LOOP_MODULES[name]} is not available ({e}).") \
            from None


# Loops that run as the same program on every process (a pipeline's stages are checked one by one).
MULTI_PROCESS_LOOPS = frozenset({"sft", "rl", "distill", "qsharp", "preference", "pipeline"})


def check_process_count(cfg: Any) -> None:
    """Refuse, before anything runs, a loop that gathers its roll-outs on one host in a multi-process run."""
    n = jax.process_count()
    if n > 1 and cfg.loop not in MULTI_PROCESS_LOOPS:
        raise ConfigError(
            f"config field `loop` = {cfg.loop!r} runs in one process only, and this run has {n} processes "
            f"(its roll-outs are still gathered on one host). Run it as one process that sees all devices "
            f"(on CPU: --host_devices=N), or use a loop that runs on several: {sorted(MULTI_PROCESS_LOOPS - {'pipeline'})}.")


def validate(cfg: Any, check_paths: bool = True) -> None:
    """All config checks of `cfg.loop` (run by `kljax.main` before anything is compiled)."""
    mod = loop_module(cfg)
    check_process_count(cfg)
    import inspect
    if hasattr(mod, "validate"):
        if "check_paths" in inspect.signature(mod.validate).parameters:
            mod.validate(cfg, check_paths=check_paths)
        else:
            mod.validate(cfg)
    else:
        validate_common(cfg)
    if cfg.get("loop", "") != "pipeline":
        from kljax.train import preflight
        preflight.check_objective_hparams(cfg)
