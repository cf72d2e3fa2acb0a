"""Sampling alone on issue 9's model: kljax `generate` vs Tunix's `Sampler` vs Hugging Face `generate`.

    python benchmarks/bench_sampler_peers.py             # 3 rounds × 5 timed calls per sampler
    python benchmarks/bench_sampler_peers.py --quick     # 1 round × 1 call: checks every sampler runs

128 rows (16 prompts × 8, as in the RL step) of 32 random prompt tokens → 32 new tokens each, temperature 1,
no top-k/top-p, EOS never sampled (the workload tokenizer's EOS id lies outside the model's vocabulary), on the
random Qwen2 of `benchmarks/_common.py` (4,723,968 parameters, float32), the same weights for all three:

* kljax: `kljax.sampling.generate` on `kljax.models.from_hf(folder)` (prefill + `lax.while_loop` over a KV
  cache, one compiled program), token ids in, token ids out.
* Tunix: `tunix.generate.sampler.Sampler` on Tunix's `models.qwen2` loaded from the folder, called as its
  vanilla RL rollout calls it (prompt strings in, text and token ids out; `top_p=1.0`, which Tunix needs to
  sample rather than decode greedily; cache 64 slots).
* Hugging Face: `Qwen2ForCausalLM.generate(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=32)` under
  `torch.no_grad()` (what TRL's GRPOTrainer runs without vLLM), token ids in, token ids out.

Each sampler runs in its own process, alternating over rounds; one warm-up call (compilation) is dropped,
then `--repeats` calls are timed. Reported: median and min–max seconds per call, generated tokens/s
(4,096 / median), peak RSS (and peak device memory on a GPU: `JAX_PLATFORMS=cuda python ...`), and the
CPU seconds other processes used during the timed calls (contended when above 10% of a core).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ("kljax", "tunix", "hf")
W = C.WORKLOAD
ROWS = W["prompts"] * W["group"]
NEW = W["new_tokens"]


def _prompt_ids():
    import numpy as np
    return np.random.default_rng(1).integers(0, W["vocab"], (ROWS, W["prompt_len"])).astype(np.int32)


def _timed(call, repeats):
    call()  # compile / warm up
    j0, times = C.busy_jiffies(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times, C.foreign_cpu_s(j0, C.busy_jiffies())


def child_kljax(folder, repeats):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kljax import sampling
    from kljax.models.hf import from_hf

    model = from_hf(folder, max_len=W["prompt_len"] + NEW)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == C.WORKLOAD_PARAMS, n
    prompts = jnp.asarray(_prompt_ids())
    valid = jnp.ones_like(prompts)
    keys = iter(jax.random.split(jax.random.key(0), repeats + 1))
    shapes = []

    def call():
        out = sampling.generate(model, prompts, valid, next(keys), NEW, None)
        shapes.append(int(jax.block_until_ready(out.mask).sum()))
    times, foreign = _timed(call, repeats)
    return dict(times=times, foreign_cpu_s=foreign, tokens_per_call=shapes[-1], params=n,
                device_peak=C.jax_device_peak_bytes())


def child_tunix(folder, repeats):
    import jax
    from flax import nnx
    from tunix.generate import sampler as tsampler

    import bench_rl_step
    mesh = bench_rl_step.tunix_mesh()
    with mesh:
        model = bench_rl_step.tunix_model(folder, mesh)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == C.WORKLOAD_PARAMS, n
    tok = C.workload_tokenizer(folder)
    s = tsampler.Sampler(model, tok, tsampler.CacheConfig(cache_size=W["prompt_len"] + NEW, num_layers=W["layers"],
                                                          num_kv_heads=W["heads"], head_dim=W["head_dim"]))
    texts = [" ".join(f"t{i}" for i in row) for row in _prompt_ids()]
    seeds = iter(range(repeats + 1))
    counts = []

    def call():
        with mesh:
            out = s(texts, max_generation_steps=NEW, max_prompt_length=W["prompt_len"], temperature=1.0, top_p=1.0,
                    top_k=None, eos_tokens=[C.EOS_ID], seed=next(seeds), echo=False, pad_output=False)
        counts.append(sum(len(t) for t in out.tokens))
    times, foreign = _timed(call, repeats)
    return dict(times=times, foreign_cpu_s=foreign, tokens_per_call=counts[-1], params=n,
                device_peak=C.jax_device_peak_bytes())


def child_hf(folder, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(dev)
    n = sum(p.numel() for p in model.parameters())
    assert n == C.WORKLOAD_PARAMS, n
    ids = torch.from_numpy(_prompt_ids()).long().to(dev)
    mask = torch.ones_like(ids)
    counts = []

    def call():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=NEW, min_new_tokens=0, eos_token_id=C.EOS_ID,
                                 pad_token_id=C.PAD_ID)
        counts.append(int((out[:, W["prompt_len"]:] < W["vocab"]).sum()))  # int() also syncs a GPU
    times, foreign = _timed(call, repeats)
    return dict(times=times, foreign_cpu_s=foreign, tokens_per_call=counts[-1], params=n,
                torch_threads=torch.get_num_threads(), device_peak=C.torch_device_peak_bytes())


CHILDREN = {"kljax": child_kljax, "tunix": child_tunix, "hf": child_hf}
LABELS = {"kljax": "kljax `generate`", "tunix": "Tunix `Sampler` (top_p=1)", "hf": "Hugging Face `generate`"}


def _device_peak(ok) -> str:
    peaks = [x["device_peak"] for x in ok if x.get("device_peak")]
    return f" (device {C.fmt_bytes(max(peaks))})" if peaks else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="1 round, 1 timed call: checks every sampler runs")
    p.add_argument("--workdir", default="/tmp/kljax_bench_rl_step", help="holds the shared model folder")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--child", choices=SAMPLERS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        try:
            res = CHILDREN[a.child](a.folder, a.repeats)
        except ImportError as e:
            res = dict(skipped=f"{a.child} not importable ({e}); install the bench extra")
        res["peak_rss"] = C.peak_rss_bytes()
        return C.emit_result(res)
    if a.quick:
        a.rounds, a.repeats = 1, 1
    folder = C.make_workload_folder(os.path.join(a.workdir, "model"))
    runs = {s: [] for s in a.samplers}
    for r in range(a.rounds):
        for i in range(len(a.samplers)):
            s = a.samplers[(r + i) % len(a.samplers)]
            print(f"round {r + 1}/{a.rounds}: {s} ...", file=sys.stderr, flush=True)
            res = C.run_child(__file__, ["--child", s, "--folder", folder, "--repeats", a.repeats], a.timeout, REPO)
            runs[s].append(res)
            if "times" not in res:
                print(f"  {s}: {res.get('error') or res.get('skipped')}", file=sys.stderr, flush=True)

    print(f"\n    {C.command_line(argv and [sys.argv[0]] + list(argv))}\n")
    print(C.machine_line() + "  ")
    print(f"{ROWS} rows × {W['prompt_len']} prompt tokens → {NEW} new tokens, temperature 1, issue 9's model; "
          f"{a.rounds} round(s) × {a.repeats} timed call(s) per sampler after one warm-up.\n")
    rows, notes = [], []
    base = None
    for s in a.samplers:
        ok = [x for x in runs[s] if "times" in x]
        notes += [f"{s}: {x.get('error') or x.get('skipped')}" for x in runs[s] if "times" not in x]
        if not ok:
            rows.append([LABELS[s], "skipped" if all("skipped" in x for x in runs[s]) else "failed",
                         "", "", "", "", ""])
            continue
        med, lo, hi = C.summary([t for x in ok for t in x["times"]])
        base = base or med
        foreign = sum(x["foreign_cpu_s"] for x in ok if x["foreign_cpu_s"] == x["foreign_cpu_s"])
        wall = sum(sum(x["times"]) for x in ok)
        flag = " (contended)" if C.contended(foreign, wall) else ""
        toks = {x["tokens_per_call"] for x in ok}
        if toks != {ROWS * NEW}:
            notes.append(f"{s}: generated {sorted(toks)} tokens per call, expected {ROWS * NEW}")
        rows.append([LABELS[s], C.fmt_s(med), f"{C.fmt_s(lo)}–{C.fmt_s(hi)}", f"{ROWS * NEW / med:,.0f}",
                     f"{med / base:.2f}", C.fmt_bytes(max(x["peak_rss"] for x in ok)) + _device_peak(ok),
                     f"{foreign:.1f} / {wall:.0f}{flag}"])
    print(C.table(["sampler", "s / call (median)", "min–max", "generated tokens/s", f"÷ {a.samplers[0]}",
                   "peak RSS (device)", "other processes' CPU-s / timed wall-s"], rows))
    for n in notes:
        print(f"\nNote: {n}")


if __name__ == "__main__":
    main()
