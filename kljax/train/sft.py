"""Supervised fine-tuning: next-token cross-entropy on the target tokens of a prompt/target task.

    L(θ) = − (1/|T|) Σ_{(x, y)} Σ_{t: target_valid} log π_θ(y_t | x, y_<t)

(token-mean over the batch's real target tokens, EOS included). Used to pretrain the reference
models that RL, distillation and Q♯ start from. Config: the common schema of
`kljax.train.common` with `loop="sft"`; `init_from` (optional) starts from another run's params.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kljax import data as data_lib
from kljax import ops
from kljax.train import common, driver, evaluation as eval_lib, runs as runs_lib
from kljax.train import sequences as seq_lib, setup as setup_lib


def sft_loss_fn(prompt_len: int):
    """`loss_fn(model, batch, rng)` of the next-token CE on `batch["target"]` where `target_valid`."""
    def loss_fn(model, batch, rng):
        del rng
        seq = jnp.concatenate([batch["prompt"], batch["target"]], axis=1)
        valid = jnp.concatenate([batch["prompt_valid"], batch["target_valid"]], axis=1)
        logp, logits = seq_lib.completion_logp(model, seq, valid, prompt_len)
        mask = batch["target_valid"].astype(jnp.float32)
        loss = -ops.masked_mean(logp, mask)
        correct = (jnp.argmax(logits, -1) == batch["target"]).astype(jnp.float32)
        return loss, {"token_accuracy": ops.masked_mean(correct, mask),
                      "entropy": ops.masked_mean(ops.entropy(logits), mask)}
    return loss_fn


def validate(cfg: Any, check_paths: bool = True) -> None:
    """SFT needs only the common fields (and an existing `init_from` run when set)."""
    common.validate_common(cfg)
    if check_paths and cfg.get("init_from", ""):
        runs_lib.check_run_exists(cfg.init_from, "init_from")


def run(cfg: Any, workdir: str) -> dict:
    """Train `cfg.total_steps` SFT steps in `workdir` (resuming), return the final evaluation."""
    task, mesh, ts = setup_lib.setup(cfg)
    source = task.data_source("train", setup_lib.data_dir(cfg))
    loader = data_lib.make_loader(source, int(cfg.batch_size), seed=int(cfg.seed))
    batches = setup_lib.ShardedIterator(loader, mesh)
    step = setup_lib.make_step(sft_loss_fn(task.prompt_len), cfg, mesh, ts)
    eval_fn = eval_lib.make_generation_eval(cfg, task, mesh)
    return driver.run_loop(cfg, workdir, state=ts, step_fn=step, batches=batches, eval_fn=eval_fn,
                           bar_keys=("loss", "token_accuracy"), desc=f"sft {task.name}")
