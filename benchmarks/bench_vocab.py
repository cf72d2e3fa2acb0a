"""Large-vocabulary losses, forward + backward: kljax vocabulary-tiled vs dense (issue 9, items 4 and 5).

    python benchmarks/bench_vocab.py                 # tokens {2048, 8192}, hidden 512, V {32k, 128k, 152k}
    python benchmarks/bench_vocab.py --quick         # tiny shapes: checks that every path runs
    python benchmarks/bench_vocab.py --memory-only   # compile and report memory, run nothing

Two losses, each differentiated with respect to the (student's) hidden states ``[N, H]`` and
unembedding ``[H, V]``:

* ``logp+entropy``: Σ log p(y) + Σ H(p) over N tokens. kljax tiled is
  ``ops.token_logprobs_and_entropy_from_hidden`` (custom VJP over vocabulary tiles); kljax dense
  forms ``h @ W`` and calls ``ops.token_logprobs`` and ``ops.entropy``.
* ``jsd(0.5)``: Σ JSD(β = ½) between a teacher's and the student's full distributions. kljax tiled
  is ``divergences.generalized_jsd_from_hidden``; dense is ``divergences.generalized_jsd`` on the two
  ``[N, V]`` logits.

Peak memory is the compiled program's temporary buffer size (``compiled.memory_analysis()
.temp_size_in_bytes``: what XLA allocates beyond the inputs and outputs); wall time is the median of
``--repeats`` runs after one warm-up (compilation excluded). Each row also reports the CPU time other
processes used during its measurement (from /proc/stat), so a run on a shared machine is marked
rather than reported as clean. Peers, when importable (they are in the ``bench`` extra; this script
never installs them): TRL's PyTorch path (``h @ W`` in torch, then ``trl.trainer.utils.
selective_log_softmax`` + ``entropy_from_logits``; ``GKDTrainer.generalized_jsd_loss``, from
``trl.experimental.gkd`` in trl ≥ 1.0) and Tunix's
``tunix.rl.common.selective_log_softmax`` on dense JAX logits (Tunix's own log-prob path; its
entropy is computed with ``ops.entropy``). Torch memory is ``torch.cuda.max_memory_allocated`` on a
GPU and not measured on CPU. The TRL rows run in a child process that never starts XLA (in the
same process as the JAX rows, torch's CPU threads competed with XLA's thread pool and ran 2-3× slower).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from kljax import divergences as dv
from kljax import ops


# --------------------------------------------------------------------------------------------
# The contenders: functions (h, w, ...) -> scalar loss, differentiated w.r.t. (h, w)
# --------------------------------------------------------------------------------------------

def _logprob_entropy_tiled(chunk, h, w, tokens, ht, wt):
    logp, ent = ops.token_logprobs_and_entropy_from_hidden(h, w, tokens, 1.0, chunk)
    return jnp.sum(logp) + jnp.sum(ent)


def _logprob_entropy_dense(chunk, h, w, tokens, ht, wt):
    logits = h @ w
    return jnp.sum(ops.token_logprobs(logits, tokens)) + jnp.sum(ops.entropy(logits))


def _jsd_tiled(chunk, h, w, tokens, ht, wt):
    return jnp.sum(dv.generalized_jsd_from_hidden(ht, wt, h, w, beta=0.5, chunk_size=chunk))


def _jsd_dense(chunk, h, w, tokens, ht, wt):
    return jnp.sum(dv.generalized_jsd(ht @ wt, h @ w, beta=0.5))


def _tunix_logprob_entropy():
    try:
        from tunix.rl import common as tunix_common
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"tunix not importable ({type(e).__name__}); skipped"
    fn = getattr(tunix_common, "selective_log_softmax", None)
    if fn is None:
        return None, "tunix.rl.common.selective_log_softmax not found in this tunix; skipped"

    def loss(chunk, h, w, tokens, ht, wt):
        logits = h @ w
        return jnp.sum(fn(logits, tokens)) + jnp.sum(ops.entropy(logits))

    return loss, None


KLJAX = {
    "logp+entropy": {"kljax tiled": _logprob_entropy_tiled, "kljax dense": _logprob_entropy_dense},
    "jsd(0.5)": {"kljax tiled": _jsd_tiled, "kljax dense": _jsd_dense},
}


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

_busy_jiffies = C.busy_jiffies
_foreign_cpu_s = C.foreign_cpu_s


def _measure_jax(loss, chunk, args, repeats, memory_only):
    step = jax.jit(jax.value_and_grad(lambda h, w, *rest: loss(chunk, h, w, *rest), argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    if memory_only:
        return temp, float("nan"), float("nan")
    try:
        jax.block_until_ready(compiled(*args))  # warm-up
    except Exception as e:  # noqa: BLE001 - out of memory on the host/device: report, go on
        print(f"  run failed ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return temp, float("nan"), float("nan")
    before = _busy_jiffies()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return temp, statistics.median(times), _foreign_cpu_s(before, _busy_jiffies())


def _measure_trl(kind, n, d, v, repeats, memory_only, seed=0):
    """TRL's PyTorch path on the same shapes; None if torch/trl are not importable."""
    try:
        import torch
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except Exception as e:  # noqa: BLE001
        return None, f"trl/torch not importable ({type(e).__name__}: {e}); TRL rows skipped"
    try:
        from trl import GKDTrainer  # trl < 1.0
    except ImportError:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.gkd import GKDTrainer  # trl >= 1.0 moved GKD to experimental
        except Exception as e:  # noqa: BLE001
            return None, f"trl's GKDTrainer not importable ({type(e).__name__}: {e}); TRL rows skipped"
    if memory_only:
        return None, "--memory-only: TRL rows skipped (torch has no compile-time memory analysis)"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dev).requires_grad_(True)
    w = torch.randn(d, v, generator=g).mul_(d**-0.5).to(dev).requires_grad_(True)
    ht = torch.randn(n, d, generator=g).to(dev)
    wt = torch.randn(d, v, generator=g).mul_(d**-0.5).to(dev)
    tokens = torch.randint(0, v, (n,), generator=g).to(dev)

    def run():
        h.grad = w.grad = None
        logits = h @ w
        if kind == "logp+entropy":
            loss = selective_log_softmax(logits, tokens).sum() + entropy_from_logits(logits).sum()
        else:
            loss = GKDTrainer.generalized_jsd_loss(logits[None], (ht @ wt)[None], beta=0.5, reduction="sum")
        loss.backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    run()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _busy_jiffies()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    foreign = _foreign_cpu_s(before, _busy_jiffies())
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return (peak, statistics.median(times), foreign), None


def _measure_trl_in_child(kind, n, d, v, repeats, memory_only):
    """`_measure_trl` in a fresh process: torch's threads measured in this process, after XLA's CPU thread
    pool has started, ran 2-3× slower on this 2-core machine."""
    if memory_only:
        return _measure_trl(kind, n, d, v, repeats, memory_only)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = C.run_child(__file__, ["--trl-child", kind, n, d, v, repeats], 1800, repo)
    if "error" in res:
        return None, f"TRL child failed: {res['error'][-300:]}"
    if res.get("note"):
        return None, res["note"]
    return tuple(res["result"]), None


def _inputs(n, d, v, dtype, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(k[0], (n, d), dtype)
    w = (jax.random.normal(k[1], (d, v)) * d**-0.5).astype(dtype)
    tokens = jax.random.randint(k[2], (n,), 0, v)
    ht = jax.random.normal(k[3], (n, d), dtype)
    wt = (jax.random.normal(k[4], (d, v)) * d**-0.5).astype(dtype)
    return h, w, tokens, ht, wt


def _fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def _fmt_s(s):
    return "n/a" if s != s else f"{s:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072, 152064])
    ap.add_argument("--chunk", type=int, default=8192, help="vocabulary tile of the tiled paths")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--losses", nargs="+", default=list(KLJAX), choices=list(KLJAX))
    ap.add_argument("--memory-only", action="store_true", help="compile and report memory; run nothing")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (64 tokens, hidden 32, V 1000/3001)")
    ap.add_argument("--trl-child", nargs=5, help=argparse.SUPPRESS)  # kind n d v repeats
    args = ap.parse_args(argv)
    if args.trl_child:
        kind, n, d, v, r = args.trl_child
        res, note = _measure_trl(kind, int(n), int(d), int(v), int(r), False)
        return C.emit_result(dict(result=res, note=note))
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.chunk, args.repeats = [64], 32, [1000, 3001], 512, 1
    dtype = jnp.dtype(args.dtype)

    notes = []
    tunix_loss, note = _tunix_logprob_entropy()
    if note:
        notes.append(note)
    rows = []
    for kind in args.losses:
        contenders = dict(KLJAX[kind])
        if kind == "logp+entropy" and tunix_loss is not None:
            contenders["tunix selective_log_softmax"] = tunix_loss
        for n in args.tokens:
            for v in args.vocab:
                inputs = _inputs(n, args.hidden, v, dtype)
                results = {}
                for name, loss in contenders.items():
                    print(f"{kind} tokens={n} V={v}: {name} ...", file=sys.stderr, flush=True)
                    results[name] = _measure_jax(loss, args.chunk, inputs, args.repeats, args.memory_only)
                trl, note = _measure_trl_in_child(kind, n, args.hidden, v, args.repeats, args.memory_only)
                if note and note not in notes:
                    notes.append(note)
                if trl is not None:
                    results["TRL (torch)"] = trl
                dense_mem, dense_t, _ = results["kljax dense"]
                for name, (mem, t, foreign) in results.items():
                    mem_ratio = "" if mem is None or not dense_mem else f"{mem / dense_mem:.2f}"
                    t_ratio = "" if t != t or dense_t != dense_t else f"{t / dense_t:.2f}"
                    rows.append(
                        f"| {kind} | {n:,} | {v:,} | {name} | {_fmt_bytes(mem)} | {mem_ratio} | "
                        f"{_fmt_s(t)} | {t_ratio} | {'' if foreign != foreign else f'{foreign:.1f}'} |"
                    )

    print(f"\n    python benchmarks/bench_vocab.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
        f"hidden {args.hidden}, {args.dtype}, tile {args.chunk}, median of {args.repeats}.\n"
    )
    print("| loss | tokens | V | path | temp memory | ÷ dense | seconds (fwd+bwd) | ÷ dense | foreign CPU-s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(r)
    for n in notes:
        print(f"\nNote: {n}")


if __name__ == "__main__":
    main()
