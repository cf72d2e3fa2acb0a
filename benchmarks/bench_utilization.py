"""Utilization on issue 9's workload: achieved FLOP/s of kljax's update step, reference log-prob pass and
sampler, each divided by a large float32 matmul's FLOP/s measured in the same process (issue 9, item 3).

    python benchmarks/bench_utilization.py              # matmul 4096³, 5 timed repeats of each
    python benchmarks/bench_utilization.py --quick      # matmul 512³, 1 repeat: checks it runs

The phases are the ones kljax's RL loop runs each step on the workload (128 rows = 16 prompts × 8, 32 prompt
+ 32 completion tokens, the random Qwen2 of `benchmarks/_common.py`):

* update: the loop's own jitted train step (`rl.make_rl_loss` of the `grpo` objective, β = 0.04 k3 in the
  loss, through `state.make_train_step` with the config of `bench_rl_step.py`) on one 128-row minibatch;
* reference pass: the loop's `rl._model_logp` (completion log-probs of all 128 rows);
* sampling: `kljax.sampling.generate`, 32 new tokens for 128 rows at temperature 1, no EOS.

FLOPs are **counted analytically** (the numerator of every utilization figure) as the work the phase needs:
per layer 2·(4·D·D_h + 3·D·F) per token for the projections and SwiGLU, 4·c·D_h per token for attention
over its c causal keys, 2·D·V per position whose logits are used (the 32 completion-predicting positions);
sampling processes 63 positions (the 32-token prefill, then 31 decode steps; the 32nd token needs no
further pass), the reference pass 64, and the update 3× the forward (backward ≈ 2× forward). Embedding
gathers, norms, softmax and the optimizer are not counted. XLA's own count (`compiled.cost_analysis()
["flops"]`) is printed beside it for the update and reference pass; it is not used for sampling, whose
`while_loop` body XLA counts once whatever the trip count (and likewise for a layer loop under `scan`).

The matmul peak is `jnp.dot` of two [n, n] float32 matrices, 2n³ FLOPs. Every figure is the median of
`--repeats` timed calls after one warm-up; the CPU seconds other processes used meanwhile are printed (a
row is contended when they exceed 10% of a core).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

W = C.WORKLOAD
ROWS = W["prompts"] * W["group"]
P, N = W["prompt_len"], W["new_tokens"]


def lm_flops(rows: int, positions: int, head_positions: int, w: dict = W) -> float:
    """Analytic forward FLOPs of the workload model over `positions` causal positions of `rows` rows, with
    the LM head at `head_positions` positions per row (see the module docstring)."""
    d, f, v, dh, layers = w["width"], w["mlp"], w["vocab"], w["heads"] * w["head_dim"], w["layers"]
    body = 2 * layers * (4 * d * dh + 3 * d * f)
    causal_keys = positions * (positions + 1) / 2
    attn = 4 * dh * layers * causal_keys
    return rows * (positions * body + attn + head_positions * 2 * d * v)


def sampling_flops() -> float:
    return lm_flops(ROWS, P + N - 1, N)


def reference_flops() -> float:
    return lm_flops(ROWS, P + N, N)


def update_flops() -> float:
    return 3 * reference_flops()


def _time(fn, repeats):
    import jax
    jax.block_until_ready(fn())
    j0, ts = C.busy_jiffies(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), C.foreign_cpu_s(j0, C.busy_jiffies()), sum(ts)


def _xla_flops(jitted, *args):
    try:
        ca = jitted.lower(*args).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - a wrapper without .lower, or no cost model on this backend
        return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matmul", type=int, default=4096, help="n of the [n, n] @ [n, n] float32 peak matmul")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="matmul 512, 1 repeat: checks it runs")
    p.add_argument("--workdir", default="/tmp/kljax_bench_rl_step", help="holds the shared model folder")
    a = p.parse_args(argv)
    if a.quick:
        a.matmul, a.repeats = 512, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    folder = C.make_workload_folder(os.path.join(a.workdir, "model"))

    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_rl_step
    from kljax import sampling
    from kljax.train import common, rl, setup as setup_lib
    from kljax.train import state as state_lib

    rows = []
    # Peak: one large float32 matmul.
    n = a.matmul
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    t, foreign, wall = _time(lambda: mm(x, y), a.repeats)
    peak = 2 * n**3 / t
    rows.append(("matmul peak", f"{n}×{n} @ {n}×{n}", 2 * n**3, float("nan"), t, peak, foreign, wall))

    # kljax's own update step and reference pass, built as the RL loop builds them.
    cfg = bench_rl_step._kljax_config(folder, 1)
    common.validate(cfg)
    task = setup_lib.build_task(cfg)
    mesh = setup_lib.build_mesh(cfg)
    ts = setup_lib.create_state(cfg, mesh, task)
    rng = np.random.default_rng(0)
    seq = jnp.asarray(rng.integers(0, W["vocab"], (ROWS, P + N)), jnp.int32)
    valid = jnp.ones((ROWS, P + N), jnp.int32)
    batch = {"sequences": seq, "valid": valid, "mask": jnp.ones((ROWS, N), jnp.float32),
             "old_logp": jnp.full((ROWS, N), -np.log(W["vocab"]), jnp.float32),
             "ref_logp": jnp.full((ROWS, N), -np.log(W["vocab"]), jnp.float32),
             "rewards": jnp.asarray(rng.random(ROWS), jnp.float32)}
    step = state_lib.make_train_step(rl.make_rl_loss(cfg, P, W["group"]), mesh, state_lib.state_sharding(ts),
                                     schedule=setup_lib.schedule(cfg))
    xla_update = _xla_flops(step, ts, batch)
    holder = {"ts": ts}

    def update():
        holder["ts"], m = step(holder["ts"], batch)  # the state is donated: carry the new one
        return m

    t, foreign, wall = _time(update, a.repeats)
    rows.append(("update (fwd+bwd+AdamW)", f"{ROWS}×{P + N}", update_flops(), xla_update, t, update_flops() / t,
                 foreign, wall))

    tr = holder["ts"]
    ref_args = (tr.graphdef, tr.params, tr.model_state, seq, valid, P, False, ROWS)
    xla_ref = _xla_flops(rl._logp_and_logits, *ref_args)
    t, foreign, wall = _time(lambda: rl._model_logp(*ref_args)[0], a.repeats)
    rows.append(("reference log-prob pass", f"{ROWS}×{P + N}", reference_flops(), xla_ref, t, reference_flops() / t,
                 foreign, wall))

    model = tr.model()
    keys = iter(jax.random.split(jax.random.key(2), a.repeats + 1))
    t, foreign, wall = _time(lambda: sampling.generate(model, seq[:, :P], valid[:, :P], next(keys), N, None).tokens,
                             a.repeats)
    rows.append(("sampling (`generate`)", f"{ROWS}×{P} → +{N}", sampling_flops(), float("nan"), t,
                 sampling_flops() / t, foreign, wall))

    print(f"\n    {C.command_line(argv and [sys.argv[0]] + list(argv))}\n")
    print(C.machine_line() + "  ")
    print(f"Issue 9's model and step shapes; FLOPs counted analytically (XLA's count beside it); median of "
          f"{a.repeats} after one warm-up.\n")
    out = []
    for name, shape, fl, xla, t, rate, foreign, wall in rows:
        flag = " (contended)" if C.contended(foreign, wall) else ""
        out.append([name, shape, f"{fl / 1e9:,.1f}", "" if xla != xla else f"{xla / 1e9:,.1f}", C.fmt_s(t),
                    f"{rate / 1e9:,.1f}", f"{rate / peak:.0%}", f"{foreign:.1f} / {wall:.0f}{flag}"])
    print(C.table(["computation", "shape", "GFLOP (analytic)", "GFLOP (XLA)", "s (median)", "GFLOP/s",
                   "÷ matmul peak", "other processes' CPU-s / timed wall-s"], out))


if __name__ == "__main__":
    main()
