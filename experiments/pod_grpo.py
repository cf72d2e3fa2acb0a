"""GRPO on a Qwen2-1.5B-class policy on a TPU v5e-64 slice (8x8): the pod configuration to check
with `kljax.aot` before renting the slice, then launch with `launch/tpu.py`.

    # 1. check on a laptop (libtpu's compiler, no TPU): per-chip memory of every jitted function
    python -m kljax.aot --config=experiments/pod_grpo.py --topology=v5e:8x8
    # 2. launch on every worker of the slice
    python launch/tpu.py --name=kljax-grpo --zone=us-west4-a --accelerator=v5litepod-64 -- \
        --config=experiments/pod_grpo.py --workdir=gs://BUCKET/runs/grpo --config.init_from=gs://BUCKET/runs/sft
    # 3. resume after preemption: rerun the same command (the workdir's latest checkpoint is restored)

What it needs: 64 v5e chips (16 GiB HBM each); a pretrained policy in `init_from` (a kljax run of the
same model shape); the arithmetic task (built in; swap in your own data through `task`). Shapes:
vocabulary 151,936, width 1536, 28 layers, 12 query / 2 KV heads, SwiGLU 8960, bfloat16 compute,
float32 parameters and AdamW state, fully sharded over 16 (fsdp) × 4 (data) chips; 64 prompts ×
group 8 per roll-out, 256 new tokens, minibatches of 128 sequences.

Args: `smoke` shrinks the model and batch so the check compiles in seconds (v5e:2x2); used by CI.
Measured (check 1 on a 2-core CPU VM, libtpu 0.0.52, 13.6 min, contended): fits; per chip the train
step needs 13.1 GiB of 16 (82%), the roll-out sampler 1.3 GiB, the reference pass 5.7 GiB (table in
the README, "Scaling out"). Not yet run on a real slice.
"""
from __future__ import annotations

import ml_collections

from kljax.config import rl_base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    unknown = sorted(set(parts) - {"smoke"})
    if unknown:
        raise ValueError(f"unknown arg(s) {unknown}; valid: 'smoke' (or nothing)")
    smoke = "smoke" in parts
    c = rl_base_config(dict(name="grpo", beta=0.04, kl_estimator="k3", kl_in="loss", clip_eps_low=0.2))
    c.task.name = "arithmetic"
    c.task.num_digits, c.task.num_operands, c.task.ops = 3, 2, "+"
    c.task.reverse_answer, c.task.train_size, c.task.test_size, c.task.format_reward = True, 20_000, 500, 0.1
    c.model.update(vocab_size=151_936, width=1536, depth=28, num_heads=12, num_kv_heads=2, head_dim=128,
                   mlp_dim=8960, max_len=512, rope_theta=1e6, qkv_bias=True, tie_embeddings=True,
                   dtype="bfloat16", param_dtype="float32")
    c.mesh.update(data=4, fsdp=16, tensor=1)
    c.rl.update(group_size=8, prompts_per_step=64, minibatch_size=128, max_new_tokens=256)
    c.optim.learning_rate = 1e-6
    c.total_steps = 500
    c.eval.batch_size = 128
    if smoke:
        c.model.update(vocab_size=4096, width=128, depth=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256,
                       max_len=96)
        c.mesh.update(data=2, fsdp=2, tensor=1)
        c.rl.update(group_size=4, prompts_per_step=8, minibatch_size=16, max_new_tokens=32)
        c.eval.batch_size = 16
    c.init_from = "runs/pod_sft"
    c.lock()
    return c
