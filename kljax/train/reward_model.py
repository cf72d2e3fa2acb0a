"""Reward-model training (`loop = "reward_model"`): a Bradley–Terry reward model on preference pairs.

The reward model is the LM trunk with a scalar head (`model.value_head = "scalar"`) read at the last
real token of prompt + completion (the completion's EOS when it has one): r_φ(x, y) = w·h_φ(x, y)_last + b.
Bradley–Terry (Bradley & Terry 1952; as in Ouyang et al. 2022, InstructGPT, and TRL's RewardTrainer):

    P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l)),
    L(φ) = −mean_batch log σ(r_φ(x, y_w) − r_φ(x, y_l))  +  c·mean_batch (r_φ(x, y_w) + r_φ(x, y_l))²

(the second term is TRL's optional `center_rewards_coefficient` c, Eisenstein et al. 2023, which pins
the free offset of r; c = 0 by default). Metrics: `accuracy` = mean 1[r_w > r_l], `margin` =
mean (r_w − r_l), `rewards/chosen`, `rewards/rejected`; evaluation the same on the test split
(`eval/accuracy`, `eval/margin`, `eval.num_examples` pairs).

Data: any task whose records carry `chosen`/`chosen_valid`/`rejected`/`rejected_valid` (right-padded)
next to the left-padded `prompt`: the `files` task with `task.chosen_key` and `task.rejected_key`.
Model: `model.hf_path` (a Hugging Face checkpoint; its head is new), `init_from` a run with the same
model (an SFT run without a value head gives its trunk; the head is new), or a fresh `model` config.

Config (besides the common schema): `reward_model.center_coef` (float, default 0).
`sequence_rewards` is the scoring function a trained reward model is used through.

A trained run is a reward for the `rl` loop: `task.reward = "model:<workdir>"` (with any task; the
task's own reward is then unused). The reward model must read the policy's token ids (the same tokenizer
and vocabulary size, checked); its latest checkpoint is loaded on the run's mesh and each roll-out's
(prompt, completion) rows are scored on the device, batch-sharded, in one jitted forward pass
(`load_reward_fn`), no host round trip.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import data as data_lib
from kljax.config import ConfigError, require
from kljax.models import positions_from_valid
from kljax.train import common, driver, evaluation as eval_lib, runs as runs_lib, setup as setup_lib
from kljax.train import sharding as shd

PAIR_FIELDS = ("chosen", "chosen_valid", "rejected", "rejected_valid")


def sequence_rewards(model, prompt, prompt_valid, completion, completion_valid):
    """float32[B]: the scalar head at the last real token of each (left-padded prompt, right-padded
    completion) row; an empty completion is scored at the prompt's last token."""
    seq = jnp.concatenate([prompt, completion], axis=1)
    valid = jnp.concatenate([prompt_valid, completion_valid], axis=1)
    h = model.hidden(seq, positions=positions_from_valid(valid), valid=valid)
    v = model.values(h)  # [B, P+N]
    last = prompt.shape[1] + jnp.sum(completion_valid > 0, axis=1).astype(jnp.int32) - 1
    return jnp.take_along_axis(v, last[:, None], axis=1)[:, 0].astype(jnp.float32)


def pair_rewards(model, batch):
    """(r_chosen [B], r_rejected [B]) in one forward pass over the 2B rows."""
    b = batch["prompt"].shape[0]
    prompt = jnp.concatenate([batch["prompt"]] * 2, axis=0)
    prompt_valid = jnp.concatenate([batch["prompt_valid"]] * 2, axis=0)
    comp = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    comp_valid = jnp.concatenate([batch["chosen_valid"], batch["rejected_valid"]], axis=0)
    r = sequence_rewards(model, prompt, prompt_valid, comp, comp_valid)
    return r[:b], r[b:]


def bradley_terry_loss(r_chosen, r_rejected, center_coef: float = 0.0):
    """(loss, metrics) of −mean log σ(r_w − r_l) + c·mean (r_w + r_l)² (module docstring)."""
    margin = r_chosen - r_rejected
    loss = jnp.mean(jax.nn.softplus(-margin))  # −log σ(m) = softplus(−m), stable for any m
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(r_chosen + r_rejected))
    return loss, {"accuracy": jnp.mean((margin > 0).astype(jnp.float32)), "margin": jnp.mean(margin),
                  "rewards/chosen": jnp.mean(r_chosen), "rewards/rejected": jnp.mean(r_rejected)}


def rm_loss_fn(center_coef: float):
    def loss_fn(model, batch, rng):
        del rng
        return bradley_terry_loss(*pair_rewards(model, batch), center_coef=center_coef)
    return loss_fn


@functools.partial(jax.jit, static_argnums=(0,))
def _pair_rewards_jit(graphdef, params, rest, batch):
    return pair_rewards(nnx.merge(graphdef, params, rest), batch)


def evaluate_pairs(model, records, batch_size: int, mesh=None) -> dict:
    """`eval/accuracy`, `eval/margin` (and mean chosen/rejected rewards) over the pairs in `records`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    multiple = shd.data_parallel_size(mesh) if mesh is not None else 1
    rc, rr = [], []
    for chunk, n in eval_lib._chunks({k: records[k] for k in ("prompt", "prompt_valid") + PAIR_FIELDS},
                                   batch_size, multiple):
        c, r = _pair_rewards_jit(graphdef, params, rest, eval_lib._place(chunk, mesh))
        rc.append(eval_lib._to_host(c, n))
        rr.append(eval_lib._to_host(r, n))
    rc, rr = np.concatenate(rc), np.concatenate(rr)
    return {"eval/accuracy": float(np.mean(rc > rr)), "eval/margin": float(np.mean(rc - rr)),
            "eval/rewards/chosen": float(np.mean(rc)), "eval/rewards/rejected": float(np.mean(rr))}


MODEL_PREFIX = "model:"


def model_reward_workdir(cfg: Any) -> str:
    """The workdir of `task.reward = "model:<workdir>"`, or "" when the reward is not a model."""
    spec = str(cfg.task.get("reward", "") or "").strip() if "task" in cfg else ""
    return spec[len(MODEL_PREFIX):].strip() if spec.startswith(MODEL_PREFIX) else ""


def check_model_reward(cfg: Any, check_paths: bool = True) -> None:
    """Config checks of `task.reward = "model:<workdir>"`: a finished reward-model run whose vocabulary
    is the policy's (raises `ConfigError` naming `task.reward`)."""
    wd = model_reward_workdir(cfg)
    if not wd or not check_paths:
        return
    runs_lib.check_run_exists(wd, "task.reward")
    rcfg = runs_lib.read_config(wd)
    if rcfg.get("loop", "") != "reward_model":
        raise ConfigError(f"config field `task.reward` = {cfg.task.reward!r}: that run has loop={rcfg.get('loop')!r}; "
                          "point it at a run of loop 'reward_model'.")
    mine, theirs = setup_lib.model_config(cfg).vocab_size, setup_lib.model_config(rcfg).vocab_size
    if mine != theirs:
        raise ConfigError(f"config field `task.reward` = {cfg.task.reward!r}: the reward model's vocabulary has "
                          f"{theirs} entries and the policy's {mine}; a reward model must read the policy's token "
                          "ids (train it with the policy's tokenizer).")


@functools.partial(jax.jit, static_argnums=(0,))
def _score_jit(graphdef, params, rest, prompt, prompt_valid, completion, completion_valid):
    return sequence_rewards(nnx.merge(graphdef, params, rest), prompt, prompt_valid, completion, completion_valid)


def load_reward_fn(workdir: str, mesh):
    """`fn(prompt, prompt_valid, completion, completion_valid) -> float32[B]` of the reward-model run in
    `workdir` (latest checkpoint, placed on `mesh`); inputs and output stay on the device."""
    ts, _ = runs_lib.load_state_from(workdir, mesh)
    graphdef, params, rest = nnx.split(ts.model(), nnx.Param, ...)
    return functools.partial(_score_jit, graphdef, params, rest)


def check_task_has_pairs(cfg: Any, task, needed_by: str = "the reward-model loop") -> None:
    """`ConfigError` unless `task`'s records carry chosen/rejected completions."""
    try:
        fields = set(task.features().keys())
    except (AttributeError, TypeError, NotImplementedError):
        fields = set()
    if not set(PAIR_FIELDS) <= fields:
        raise ConfigError(f"config field `task.name` = {cfg.task.name!r}: {needed_by} trains on preference "
                          "pairs, and this task's records have no chosen/rejected completions; use the `files` task "
                          "with `task.chosen_key` and `task.rejected_key` set.")


def validate(cfg: Any, check_paths: bool = True) -> None:
    common.validate_common(cfg)
    require(cfg, "model.value_head", lambda v: v == "scalar",
            "a reward model reads one scalar per sequence: set model.value_head='scalar'.")
    require(cfg, "model.num_atoms", lambda v: int(v) == 1, "use 1 (a scalar reward).", default=1)
    if "reward_model" in cfg:
        require(cfg, "reward_model.center_coef", lambda v: float(v) >= 0, "use a coefficient >= 0.", default=0.0)
    check_task_has_pairs(cfg, setup_lib.build_task(cfg))
    if check_paths and cfg.get("init_from", ""):
        runs_lib.check_run_exists(cfg.init_from, "init_from")


def run(cfg: Any, workdir: str) -> dict:
    """Train `cfg.total_steps` Bradley–Terry steps in `workdir` (resuming); return the final evaluation."""
    validate(cfg, check_paths=True)
    task, mesh, ts = setup_lib.setup(cfg)
    source = task.data_source("train", setup_lib.data_dir(cfg))
    loader = data_lib.make_loader(source, int(cfg.batch_size), seed=int(cfg.seed))
    keep = ("prompt", "prompt_valid") + PAIR_FIELDS
    batches = setup_lib.ShardedIterator(loader, mesh, transform=lambda b: {k: b[k] for k in keep})
    center = float(cfg.get("reward_model", {}).get("center_coef", 0.0))
    step = setup_lib.make_step(rm_loss_fn(center), cfg, mesh, ts)
    eval_bs = int(cfg.eval.get("batch_size", 128))

    def eval_fn(s):
        return evaluate_pairs(s.model(), eval_lib.test_records(cfg, task, "test"), eval_bs, mesh)

    return driver.run_loop(cfg, workdir, state=ts, step_fn=step, batches=batches, eval_fn=eval_fn,
                           bar_keys=("loss", "accuracy", "margin"), desc=f"reward_model {task.name}")
