"""Multi-digit addition (3-digit + 3-digit, answer digits reversed so the carry flows left to right):
a small model is pretrained by SFT to partial accuracy, then post-trained by RL with a verifiable
exact-match reward (format reward 0.1 for a well-formed number).

Args (comma-separated; add `smoke` for a few steps with a tiny model on 1-digit sums):

  pretrain      SFT, width 64, 2 layers, 300 steps, batch 128.
                python -m kljax.main --config=experiments/arithmetic.py:pretrain --workdir=runs/ar/pretrain
  grpo          GRPO (β = 0.04, k3 in the loss, clip 0.2), group 8 × 16 prompts, 60 roll-outs.
  dapo          DAPO: clip-higher 0.2/0.28, token-mean, dynamic sampling (drop zero-variance groups).
  reinforce_pp  REINFORCE++ (k1 KL in the reward, β = 1e-3, batch-normalized advantages).
  rpg_ufkl      RPG with the unnormalized forward KL (β = 0.04).
  rpg_ufkl_reset  the same, reference reset to the policy every 20 roll-outs.
                python -m kljax.main --config=experiments/arithmetic.py:grpo --workdir=runs/ar/grpo \\
                    --config.init_from=runs/ar/pretrain
  main          pipeline: pretrain, then grpo, dapo, reinforce_pp and rpg_ufkl from it; results table.

Measured (`python -m kljax.main --config=experiments/arithmetic.py:main --workdir=runs/ar`, this 2-core
CPU while the test suite ran on the other core: 3 min 54 s wall in all; greedy exact-match accuracy on
500 test sums; KL = exact KL(π‖π_ref) per generated token):

| stage        | accuracy | reward | KL to ref | wall (s) |
|--------------|----------|--------|-----------|----------|
| pretrain     | 0.034    | 0.131  | —         | 50       |
| grpo         | 0.020    | 0.118  | 0.145     | 28       |
| dapo         | 0.014    | 0.113  | 0.353     | 35       |
| reinforce_pp | 0.028    | 0.125  | 0.092     | 23       |
| rpg_ufkl     | 0.004    | 0.103  | 0.485     | 23       |

Honest reading: 300 SFT steps leave the model at 3% exact answers, too rare a success for 60 roll-outs
of 16 prompts × 8 samples to build on; every RL variant moves away from the reference (KL 0.09-0.49)
without improving accuracy. A longer pretraining (or easier sums, `task.num_digits=2`) is the next
thing to try; not tuned here.
"""
from __future__ import annotations

import ml_collections

from kljax.config import base_config, rl_base_config

RL_VARIANTS = {
    "grpo": dict(name="grpo", beta=0.04, kl_estimator="k3", kl_in="loss", clip_eps_low=0.2),
    "dapo": dict(name="dapo", clip_eps_low=0.2, clip_eps_high=0.28),
    "reinforce_pp": dict(name="reinforce_pp", beta=1e-3, kl_estimator="k1", kl_in="reward"),
    "rpg_ufkl": dict(name="rpg_ufkl", beta=0.04),
    "rpg_ufkl_reset": dict(name="rpg_ufkl", beta=0.04),
}


def _task(smoke: bool) -> ml_collections.ConfigDict:
    if smoke:
        return ml_collections.ConfigDict(dict(name="arithmetic", num_digits=1, num_operands=2, ops="+",
                                              reverse_answer=True, train_size=64, test_size=16,
                                              format_reward=0.1, data_dir=""))
    return ml_collections.ConfigDict(dict(name="arithmetic", num_digits=3, num_operands=2, ops="+",
                                          reverse_answer=True, train_size=20_000, test_size=500,
                                          format_reward=0.1, data_dir=""))


def _common(c: ml_collections.ConfigDict, smoke: bool) -> None:
    c.task = _task(smoke)
    c.model.depth = 2
    c.eval.num_examples = 500
    if smoke:
        c.model.width, c.model.depth, c.model.num_heads = 16, 1, 2
        c.total_steps, c.batch_size, c.log_every = 4, 8, 1
        c.eval.num_examples, c.eval.batch_size = 16, 8
        c.checkpoint.every = 2
        c.optim.warmup_steps = 1


def pretrain_config(smoke: bool = False) -> ml_collections.ConfigDict:
    c = base_config("sft")
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 30
    c.total_steps = 300
    c.eval_every = 150
    c.checkpoint.every = 150
    c.checkpoint.best_metric = "eval/accuracy"
    _common(c, smoke)
    if smoke:
        c.eval_every = 2
    return c


def rl_config(variant: str, smoke: bool = False) -> ml_collections.ConfigDict:
    reset = variant == "rpg_ufkl_reset"
    c = rl_base_config(RL_VARIANTS[variant], reference="reset" if reset else "fixed",
                       reset_every=20 if reset else 0, dynamic_sampling=variant == "dapo")
    c.total_steps = 60
    c.eval_every = 30
    c.checkpoint.every = 30
    c.eval.pass_k = 4
    _common(c, smoke)
    if smoke:
        c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size = 2, 4, 8
        c.total_steps, c.eval_every = 3, 2
        c.checkpoint.every = 2
        c.eval.pass_k = 2
    return c


def pipeline_config(smoke: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.loop = "pipeline"
    c.experiment = __file__
    c.stages = ("pretrain=pretrain", "grpo=grpo", "dapo=dapo", "reinforce_pp=reinforce_pp", "rpg_ufkl=rpg_ufkl")
    if smoke:  # CI: one RL stage, with dynamic sampling
        c.stages = ("pretrain=pretrain", "dapo=dapo")
    c.smoke = smoke
    c.title = "3-digit addition: greedy exact-match accuracy" if not smoke else "Arithmetic smoke"
    return c


def get_config(arg: str = "main") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "main").split(",") if p]
    smoke = "smoke" in parts
    names = [p for p in parts if p != "smoke"] or ["main"]
    valid = ["pretrain", "main", *RL_VARIANTS]
    if len(names) != 1 or names[0] not in valid:
        raise ValueError(f"experiments/arithmetic.py: give one of {valid} (optionally with ',smoke'); got {arg!r}")
    name = names[0]
    if name == "pretrain":
        c = pretrain_config(smoke)
    elif name == "main":
        c = pipeline_config(smoke)
    else:
        c = rl_config(name, smoke)
    c.lock()
    return c
