"""Generated tokens per second: kljax's cached ``generate`` vs a naive jitted recompute-everything loop.

    python benchmarks/bench_sampling.py            # width 128, depth 4, vocab 512, batch 16, 64 new tokens

Both sides are one compiled program per shape and sample with temperature 1 for exactly
``new_tokens`` steps (no EOS). The naive loop runs the full model on the whole ``[B, P+N]`` buffer at
every step (the growing prefix is marked with ``valid``, so the shape stays fixed and nothing is
recompiled) and reads the logits at the last real slot: O(N·(P+N)) token-passes instead of the
cache's O(P+N). Compilation is excluded (one warm-up call); the median of ``--repeats`` runs is
reported. The script prints a markdown table with the command and the machine.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kljax import sampling
from kljax.models import TransformerLM, lm_config


@functools.partial(jax.jit, static_argnames=("graphdef", "new_tokens"))
def naive_generate(state, prompts, key, *, graphdef, new_tokens):
    """Sample by re-running the full forward pass on the fixed-size buffer at every step."""
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    s = p + new_tokens
    tokens = jnp.concatenate([prompts, jnp.zeros((b, new_tokens), jnp.int32)], axis=1)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

    def step(i, tokens):
        valid = (jnp.arange(s) < p + i).astype(jnp.int32)[None].repeat(b, 0)
        logits = model(tokens, positions=positions, valid=valid)
        last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        tok = jax.random.categorical(jax.random.fold_in(key, i), last.astype(jnp.float32), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(tokens, tok.astype(jnp.int32)[:, None], p + i, 1)

    return jax.lax.fori_loop(0, new_tokens, step, tokens)


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    s = args.prompt_len + args.new_tokens
    cfg = lm_config(vocab_size=args.vocab, width=args.width, depth=args.depth, num_heads=args.heads,
                    max_len=s)
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 1, args.vocab,
                                 dtype=jnp.int32)
    valid = jnp.ones_like(prompts)
    key = jax.random.key(2)
    graphdef, state = nnx.split(model)

    cached = _time(lambda: sampling.generate(model, prompts, valid, key, args.new_tokens, None).tokens,
                   args.repeats)
    naive = _time(lambda: naive_generate(state, prompts, key, graphdef=graphdef,
                                         new_tokens=args.new_tokens), args.repeats)
    n_tok = args.batch * args.new_tokens

    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"Command: `{cmd}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"backend {jax.default_backend()} ({jax.device_count()} devices), jax {jax.__version__}  ")
    print(f"Model: width {args.width}, depth {args.depth}, heads {args.heads}, vocab {args.vocab}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} runs after one warm-up\n")
    print("| sampler | seconds / batch | generated tokens/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| naive loop (full forward per step, jitted) | {naive:.3f} | {n_tok / naive:,.0f} | 1.0x |")
    print(f"| kljax `generate` (KV cache, jitted) | {cached:.3f} | {n_tok / cached:,.0f} | "
          f"{naive / cached:.1f}x |")


if __name__ == "__main__":
    main()
