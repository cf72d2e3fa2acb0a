"""Your own model, data and reward: post-train a local Hugging Face checkpoint (Qwen2 / Llama) on JSONL,
Parquet or CSV files, with SFT or GRPO and a reward function from a file (TRL's contract).

Args (comma-separated; add `smoke` for a few steps on a tiny local model, as the tests build one):

  sft    supervised fine-tuning on (question, answer) rows: the answer text, then EOS, is the target.
         python -m kljax.main --config=experiments/hf.py:sft --workdir=runs/hf/sft \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
             --config.task.train_files=data/gsm8k_train.jsonl --config.task.test_files=data/gsm8k_test.jsonl
  grpo   GRPO (β = 0.04, k3 in the loss, clip 0.2) from model.hf_path, which is also the reference;
         reward `task.reward` (default: the built-in math answer match + 0.1 × format), group 8 × 32 prompts.
         python -m kljax.main --config=experiments/hf.py:grpo --workdir=runs/hf/grpo \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
             --config.task.train_files=data/gsm8k_train.jsonl --config.task.test_files=data/gsm8k_test.jsonl \\
             --config.task.reward="my_rewards.py:correct,0.1*format"
         (start GRPO from the SFT run instead with --config.init_from=runs/hf/sft)

  reward_model  Bradley–Terry reward model (loop "reward_model") on rows {"prompt", "chosen", "rejected"}:
         model.hf_path's trunk plus a new scalar head at the last token; metrics accuracy and margin.
         python -m kljax.main --config=experiments/hf.py:reward_model --workdir=runs/hf/rm \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
             --config.task.train_files=data/prefs_train.jsonl --config.task.test_files=data/prefs_test.jsonl

  dpo    DPO (β = 0.1) on the same (prompt, chosen, rejected) rows, TRL's DPOTrainer: model.hf_path is the
         start and the fixed reference; eval = implicit-reward accuracy and margin on the test pairs.
         python -m kljax.main --config=experiments/hf.py:dpo --workdir=runs/hf/dpo \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
             --config.task.train_files=data/prefs_train.jsonl --config.task.test_files=data/prefs_test.jsonl

  qsharp Q♯ (Zhou et al. 2025): a Bernoulli critic of π_ref's reward-to-go (`task.reward`, values in [0, 1])
         for every next token, trained on π_ref roll-outs (model.hf_path is π_ref and the critic's trunk), then
         decoding π_ref·exp(Q/η) restricted to π_ref's top 20 tokens; eval = guided reward and exact KL to π_ref.
         python -m kljax.main --config=experiments/hf.py:qsharp --workdir=runs/hf/qsharp \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct --config.task.reward="my_rewards.py:correct" \\
             --config.task.train_files=data/gsm8k_train.jsonl --config.task.test_files=data/gsm8k_test.jsonl

  ppo    PPO with a critic (value head on the policy's trunk, GAE(1, 0.95), clipped value loss, per-token KL
         reward with Ziegler et al.'s adaptive β toward rl.kl_target) against the reward model above:
         python -m kljax.main --config=experiments/hf.py:ppo --workdir=runs/hf/ppo \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct --config.task.reward=model:runs/hf/rm \\
             --config.task.train_files=data/prompts.jsonl --config.task.test_files=data/prompts_test.jsonl
  ,separate  (with ppo) the critic is a second model (model.hf_path's trunk + a scalar head) with its own
         optimizer (rl.critic_lr; 0 = optim.learning_rate), TRL's separate `value_model`

  distill  on-policy distillation (GKD, JSD β = 0.5, λ = 0.5) into model.hf_path from a larger teacher
         that shares its tokenizer:
         python -m kljax.main --config=experiments/hf.py:distill --workdir=runs/hf/distill \\
             --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct \\
             --config.distill.teacher_hf_path=/models/Qwen2.5-1.5B-Instruct \\
             --config.task.train_files=data/gsm8k_train.jsonl --config.task.test_files=data/gsm8k_test.jsonl

Data: rows with `question` and `answer` (GSM8K's layout: the answer is a worked solution ending in
`#### 42`); other layouts via --config.task.prompt_key / answer_key / completion_key; a prepared tfds
dataset instead of files via --config.task.tfds_name=gsm8k/main (train_split, test_split). Prompts go through
the tokenizer's chat template with a system prompt asking for the `#### <answer>` ending
(--config.task.chat_template=False for base models). Export the trained policy with
`python -m kljax.export runs/hf/grpo runs/hf/grpo_hf` (loads in transformers with its tokenizer).

Expected result and time: not measured yet (this config was written and smoke-tested on a 2-core CPU
with a tiny random Qwen2; a Qwen2.5-0.5B run needs one accelerator with ≥ 24 GB: bfloat16 compute,
float32 parameters and Adam moments ≈ 8 GB). The smoke args run in well under a minute on CPU
(`tests/test_hf_e2e.py`).
"""
from __future__ import annotations

import ml_collections

from kljax.config import base_config, rl_base_config

SYSTEM_PROMPT = "Solve the problem step by step. End your reply with '#### ' followed by the final answer."


def _task(smoke: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="files", data_dir="", module="", train_files="", test_files="", prompt_key="question",
        answer_key="answer", completion_key="", chosen_key="", rejected_key="", chat_template=not smoke,
        system_prompt="" if smoke else SYSTEM_PROMPT, prompt_len=32 if smoke else 256,
        completion_len=16 if smoke else 512, too_long="drop", max_examples=0, tokenizer_path="",
        tfds_name="", tfds_data_dir="", train_split="train", test_split="test",
        reward="math_answer, 0.1*format"))


def _model(c: ml_collections.ConfigDict, smoke: bool) -> None:
    with c.model.unlocked():
        c.model.hf_path = ""  # the architecture, weights and tokenizer come from this folder
    if not smoke:
        c.model.dtype = "bfloat16"  # compute; parameters stay float32


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.total_steps, c.batch_size, c.log_every = 4, 8, 1
    c.eval.num_examples, c.eval.batch_size = 8, 8
    c.checkpoint.every = 2
    c.optim.warmup_steps = 1


def sft_config(smoke: bool) -> ml_collections.ConfigDict:
    c = base_config("sft")
    _model(c, smoke)
    c.task = _task(smoke)
    c.task.completion_key = "answer"
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 20
    c.total_steps, c.batch_size = 500, 64
    c.eval_every, c.checkpoint.every = 250, 250
    c.eval.num_examples, c.eval.batch_size = 256, 64
    c.checkpoint.best_metric = "eval/reward"
    if smoke:
        _smoke(c)
        c.optim.learning_rate = 3e-3
    return c


def grpo_config(smoke: bool) -> ml_collections.ConfigDict:
    c = rl_base_config(dict(name="grpo", beta=0.04, kl_estimator="k3", kl_in="loss", clip_eps_low=0.2))
    _model(c, smoke)
    c.task = _task(smoke)
    c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size = 8, 32, 64
    c.optim.learning_rate = 1e-6
    c.total_steps = 200
    c.eval_every, c.checkpoint.every = 50, 50
    c.eval.num_examples, c.eval.batch_size = 256, 64
    c.checkpoint.best_metric = "eval/reward"
    if smoke:
        _smoke(c)
        c.total_steps = 2
        c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size = 2, 4, 8
        c.optim.learning_rate = 1e-3
    return c


def reward_model_config(smoke: bool) -> ml_collections.ConfigDict:
    """Bradley–Terry reward model on (prompt, chosen, rejected) rows: model.hf_path's trunk + a scalar head."""
    c = base_config("reward_model")
    _model(c, smoke)
    c.model.value_head = "scalar"
    c.task = _task(smoke)
    c.task.prompt_key, c.task.answer_key = "prompt", ""
    c.task.chosen_key, c.task.rejected_key = "chosen", "rejected"
    c.task.reward = ""
    c.task.chat_template, c.task.system_prompt = False, ""
    c.reward_model = ml_collections.ConfigDict(dict(center_coef=0.0))
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 20
    c.total_steps, c.batch_size = 1000, 64
    c.eval_every, c.checkpoint.every = 250, 250
    c.eval.num_examples, c.eval.batch_size = 512, 64
    c.checkpoint.best_metric = "eval/accuracy"
    if smoke:
        _smoke(c)
        c.optim.learning_rate = 3e-3
    return c


def ppo_config(smoke: bool, separate: bool = False) -> ml_collections.ConfigDict:
    """PPO with a critic sharing the policy's trunk (`separate`: a second value model; rl.advantage = "gae"),
    per-token KL reward β = rl.kl_coef
    (adaptive toward rl.kl_target when > 0), reward `task.reward` (e.g. "model:runs/hf/rm")."""
    c = rl_base_config(dict(name="ppo", beta=0.0, clip_eps_low=0.2))
    _model(c, smoke)
    c.model.value_head = "scalar"
    c.task = _task(smoke)
    c.rl.advantage = "gae"
    c.rl.critic = "separate" if separate else "shared"  # a second value model, or a head on the policy's trunk
    c.rl.critic_lr = 0.0  # the separate critic's learning rate (0: optim.learning_rate)
    if separate:
        c.model.value_head = "none"
    c.rl.update(dict(gamma=1.0, lam=0.95, vf_coef=0.1, value_clip=0.2, kl_coef=0.05, kl_target=6.0,
                     kl_horizon=10000.0, whiten_advantages=True))
    c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size, c.rl.updates_per_rollout = 1, 64, 16, 4
    c.optim.learning_rate = 1e-6
    c.total_steps = 200
    c.eval_every, c.checkpoint.every = 50, 50
    c.eval.num_examples, c.eval.batch_size = 256, 64
    c.checkpoint.best_metric = "eval/reward"
    if smoke:
        _smoke(c)
        c.total_steps = 2
        c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size, c.rl.updates_per_rollout = 1, 8, 8, 2
        c.rl.kl_horizon = 100.0
        c.optim.learning_rate = 1e-3
    return c


def distill_config(smoke: bool) -> ml_collections.ConfigDict:
    """On-policy distillation (GKD): generalized JSD(β = 0.5) from a larger Hugging Face teacher that shares
    the student's tokenizer, on the student's own samples half of the time (λ = 0.5), the dataset's
    completions otherwise."""
    c = base_config("distill")
    _model(c, smoke)
    c.task = _task(smoke)
    c.task.completion_key = "answer"
    c.task.reward = ""
    c.objective = ml_collections.ConfigDict(dict(name="jsd", beta=0.5))
    c.distill = ml_collections.ConfigDict(dict(
        teacher_from="", teacher_hf_path="",  # teacher_hf_path: a Hugging Face folder (same tokenizer)
        data="student", lam=0.5, temperature=1.0, teacher_smoothing=0.0, phi=0.5, replay_size=0,
        replay_ratio="decreasing", teacher_sharding="fsdp", vocab_tile=-1))
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 20
    c.total_steps, c.batch_size = 500, 32
    c.eval_every, c.checkpoint.every = 250, 250
    c.eval.num_examples, c.eval.batch_size = 256, 64
    if smoke:
        _smoke(c)
        c.total_steps = 2
        c.optim.learning_rate = 3e-3
    return c


def dpo_config(smoke: bool) -> ml_collections.ConfigDict:
    """DPO on (prompt, chosen, rejected) rows from model.hf_path, which is also the fixed reference."""
    c = base_config("preference")
    _model(c, smoke)
    c.task = _task(smoke)
    c.task.prompt_key, c.task.answer_key = "prompt", ""
    c.task.chosen_key, c.task.rejected_key = "chosen", "rejected"
    c.task.reward = ""
    c.task.chat_template, c.task.system_prompt = False, ""
    c.objective = ml_collections.ConfigDict(dict(name="dpo", beta=0.1))
    c.preference = ml_collections.ConfigDict(dict(pairs="dataset", num_pairs=100_000, max_tries=1,
                                                  temperature=1.0))
    c.optim.learning_rate = 5e-7
    c.optim.warmup_steps = 20
    c.total_steps, c.batch_size = 1000, 64
    c.eval_every, c.checkpoint.every = 250, 250
    c.eval.num_examples, c.eval.batch_size = 512, 64
    c.checkpoint.best_metric = "eval/rewards/accuracies"
    if smoke:
        _smoke(c)
        c.total_steps = 6
        c.optim.learning_rate = 3e-3
    return c


def qsharp_config(smoke: bool) -> ml_collections.ConfigDict:
    """Q♯ with a Bernoulli critic (value head per next token) on model.hf_path = π_ref, rewards from task.reward."""
    c = base_config("qsharp")
    _model(c, smoke)
    c.model.value_head = "token"
    c.task = _task(smoke)
    c.objective = ml_collections.ConfigDict(dict(name="qsharp_bce", loss_agg="seq-mean-token-mean"))
    c.qsharp = ml_collections.ConfigDict(dict(
        rounds=2, critic_steps=500, rollouts_per_round=4096, rollin_eta=0.1, etas=(1.0, 0.1),
        guidances=("qsharp",), top_k=20, temperature=1.0, top_k_rest="reference", critic_init="reference",
        v_min=0.0, v_max=1.0))
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 20
    c.batch_size = 64
    c.total_steps = c.qsharp.rounds * c.qsharp.critic_steps
    c.checkpoint.every = 250
    c.eval.num_examples, c.eval.batch_size = 256, 64
    if smoke:
        _smoke(c)
        c.qsharp.rounds, c.qsharp.critic_steps, c.qsharp.rollouts_per_round = 2, 2, 16
        c.qsharp.top_k, c.qsharp.etas = 4, (0.1,)
        c.total_steps = 4
        c.optim.learning_rate = 1e-3
    return c


CONFIGS = {"sft": sft_config, "grpo": grpo_config, "reward_model": reward_model_config, "dpo": dpo_config,
           "qsharp": qsharp_config, "ppo": ppo_config, "distill": distill_config}


def get_config(arg: str = "grpo") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "grpo").split(",") if p]
    smoke = "smoke" in parts
    separate = "separate" in parts
    names = [p for p in parts if p not in ("smoke", "separate")] or ["grpo"]
    if len(names) != 1 or names[0] not in CONFIGS or (separate and names[0] != "ppo"):
        raise ValueError(f"experiments/hf.py: give one of {sorted(CONFIGS)} (optionally with ',smoke'; "
                         f"',separate' with ppo only); got {arg!r}")
    c = ppo_config(smoke, separate) if names[0] == "ppo" else CONFIGS[names[0]](smoke)
    c.lock()
    return c
