"""Jit-compiled autoregressive sampling with a KV cache, and composable logits processors.

``generate`` prefills the model's KV cache with a batch of LEFT-padded prompts in one call of
``model.decode``, then runs a ``jax.lax.while_loop`` that picks one token per step, feeds it back
through ``model.decode`` and stops when every row has emitted EOS or ``max_new_tokens`` tokens exist.
The whole loop is one compiled program (no Python per step), compiled once per
(model structure, shapes, hyper-parameters, processor structure); input shardings carry through.

Per step the next-token logits go through, in this order (the order of Hugging Face and of the Q♯
code, where guidance is applied before the warpers)::

    logits -> logits_processor(logits, state) -> / temperature -> top-k -> top-p -> sample

and ``logp`` is ``log_softmax`` of the final processed logits at the chosen token, i.e. the
log-probability under the distribution the token was actually drawn from (``old_logp`` for RL).

Logits processors are pure functions ``(logits [B, V], state: StepState) -> logits [B, V]``.
Guidance with a second model (Q♯ critic, DeRa's reference model) binds that model with
``functools.partial`` / ``jax.tree_util.Partial``: its parameters become traced arguments of the
compiled program (not baked-in constants), so new parameters do not recompile.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import ops
from kljax.models.transformer import positions_from_valid

__all__ = [
    "SampleOutput",
    "StepState",
    "generate",
    "greedy",
    "temperature_processor",
    "top_k_processor",
    "top_p_processor",
    "compose",
]


class SampleOutput(NamedTuple):
    """Result of ``generate`` (B rows, P prompt slots, N = max_new_tokens).

    tokens     int32   [B, N]   generated tokens; ``pad_id`` after EOS (and after an early stop).
    mask       int32   [B, N]   1 for generated tokens up to and including EOS, else 0.
    logp       float32 [B, N]   log-prob of each token under the sampling distribution (0 where mask=0).
    sequences  int32   [B, P+N] prompt followed by ``tokens``.
    """

    tokens: jax.Array
    mask: jax.Array
    logp: jax.Array
    sequences: jax.Array


class StepState(NamedTuple):
    """What a logits processor sees at each step (all arrays; shapes with S = P + N slots).

    step       int32 []       index of the token being chosen, 0 .. N-1.
    index      int32 []       slot of the last token of the current prefix, ``P + step - 1``: a full
                              forward pass over ``tokens`` predicts the next token from this slot.
    tokens     int32 [B, S]   prompt and the tokens chosen so far; later slots hold ``pad_id``.
    valid      int32 [B, S]   1 at real tokens of the prefix (prompt_valid, then generated tokens up
                              to and including EOS), 0 at padding and at slots not yet generated.
    positions  int32 [B, S]   position ids of every slot (what the policy model was given).
    done       bool  [B]      rows that already emitted EOS; whatever is chosen for them is discarded.
    carry      pytree         a stateful processor's own state (see ``generate``), else None.

    A processor that needs a second model's view of the prefix can run it on the whole buffer,
    ``guide(state.tokens, positions=state.positions, valid=state.valid)[:, state.index]`` (the
    slots after ``index`` are invalid keys, and causal attention never reads them for ``index``).
    """

    step: jax.Array
    index: jax.Array
    tokens: jax.Array
    valid: jax.Array
    positions: jax.Array
    done: jax.Array
    carry: Any = None


# --------------------------------------------------------------------------------------------
# Logits processors: pure, composable, shape [..., V] -> [..., V]. ``state`` is accepted (and
# ignored) so that ``functools.partial(top_k_processor, k=5)`` is itself a valid processor hook.
# --------------------------------------------------------------------------------------------

def temperature_processor(logits, state=None, *, temperature: float):
    """logits / T: sampling from softmax(logits / T). T must be > 0 (T = 0 is ``greedy``)."""
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_processor(logits, state=None, *, k: int):
    """Keep the ``k`` largest logits (all of those tied with the k-th), set the rest to −inf.

    ``k = 0`` or ``k >= V`` keeps everything.
    """
    ops.check_range("top_k", k, 0, None)
    v = logits.shape[-1]
    if k == 0 or k >= v:
        return logits
    kth = jax.lax.top_k(logits, int(k))[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_processor(logits, state=None, *, p: float):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass is ≥ p.

    A token is kept when the mass of the tokens strictly more likely than it (in sorted order) is
    below ``p``, so the most likely token is always kept. ``p = 1`` keeps everything.
    """
    ops.check_range("top_p", p, 0.0, 1.0, low_open=True)
    if not isinstance(p, jax.Array) and float(p) >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def compose(*processors: Callable) -> Callable:
    """One processor applying ``processors`` left to right: ``compose(f, g)(x, s) = g(f(x, s), s)``."""
    procs = tuple(p for p in processors if p is not None)
    return jax.tree_util.Partial(_apply_in_order, procs)


def _apply_in_order(procs, logits, state=None):
    for p in procs:
        logits = p(logits, state)
    return logits


def greedy(logits):
    """Greedy decoding: the argmax token of ``logits [..., V]`` (int32); first index on ties."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------

def _as_tree_partial(fn):
    """functools.partial is opaque to jax.tree; its tree twin exposes bound arrays/modules to jit."""
    if isinstance(fn, functools.partial) and not isinstance(fn, jax.tree_util.Partial):
        return jax.tree_util.Partial(_as_tree_partial(fn.func), *fn.args, **fn.keywords)
    return fn


class _Static:
    """A jit-static wrapper compared by equality, hashable even when the wrapped value is not.

    Model graphdefs and processor tree structures can hold unhashable static fields (a model's
    ``ConfigDict``); jit's cache only needs ``==`` to be right, so an unhashable value gets a
    coarse hash and equality decides.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        try:
            return hash(self.value)
        except TypeError:
            return hash(type(self.value).__qualname__)

    def __eq__(self, other):
        return isinstance(other, _Static) and bool(self.value == other.value)


def _check_prompts(prompts, prompt_valid):
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be int [B, P]; got shape {list(prompts.shape)}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must have an integer dtype; got {prompts.dtype}")
    ops.check_same_shape(prompts=prompts, prompt_valid=prompt_valid)
    if prompts.shape[1] == 0:
        raise ValueError("prompts has no slots (P = 0); every row needs at least one real token")
    if isinstance(prompt_valid, jax.core.Tracer):
        return  # inside the caller's jit: the layout cannot be inspected
    if isinstance(prompt_valid, jax.Array) and not prompt_valid.is_fully_addressable:
        return  # spans other processes' devices: each process checked its own rows when loading
    v = np.asarray(prompt_valid).astype(np.int32)
    if not np.all(v[:, -1] == 1):
        bad = np.nonzero(v[:, -1] != 1)[0].tolist()
        raise ValueError(
            f"prompt_valid[:, -1] must be 1 (prompts are LEFT-padded, the last slot holds the last "
            f"prompt token); rows {bad[:8]} are not"
        )
    if np.any(np.diff(v, axis=1) < 0):
        raise ValueError("prompt_valid must look like 0..0 1..1 in every row (prompts are LEFT-padded)")


def generate(
    model,
    prompts,
    prompt_valid,
    key,
    max_new_tokens: int,
    eos_id: Optional[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_processor: Optional[Callable] = None,
    pad_id: int = 0,
) -> SampleOutput:
    """Sample ``max_new_tokens`` continuations of LEFT-padded prompts with a KV cache, jit-compiled.

    Args:
      model: a kljax ``TransformerLM`` (anything with ``init_cache(batch, max_len)`` and
        ``decode(tokens, positions, cache, valid) -> (logits, cache)``).
      prompts: int ``[B, P]``, LEFT-padded so that every row's last prompt token is in slot P-1.
      prompt_valid: ``[B, P]`` 1 at real prompt tokens (each row ``0..0 1..1``).
      key: PRNG key; the same key gives the same samples. Unused when ``temperature == 0``.
      max_new_tokens: N ≥ 1 tokens are generated per row (fewer are *real* when EOS comes first).
      eos_id: end-of-sequence token, or None for none. After a row's EOS its tokens are ``pad_id``
        with mask 0 and logp 0; the loop stops as soon as every row is done.
      temperature: T > 0 samples from softmax(logits / T); T = 0 is greedy (argmax), and then
        ``logp`` is the log-prob of the argmax under the processed logits at T = 1.
      top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass (1 = off).
      logits_processor: ``(logits [B, V], state: StepState) -> logits [B, V]``, applied first (before
        temperature/top-k/top-p), e.g. Q♯ guidance or DeRa. Bind extra pytrees (a critic, a reference
        model, η) with ``functools.partial``/``jax.tree_util.Partial``: they are passed to the compiled
        program as arguments. Pass the same function object each call to reuse the compilation.
      pad_id: token written after EOS.

    Stateful processors. Running a guide model on the whole prefix at every step costs
    O(N·(P+N)) token passes. A processor may instead keep its own state (a guide model's KV cache):
    give it two more methods and make it a pytree (an ``nnx.Module`` is one), and it is used as::

        carry = proc.init(prompts, prompt_valid, positions [B, P], cache_len)     # once, after prefill
        logits = proc(logits, state)                      # every step; state.carry is the carry
        carry = proc.update(carry, tokens [B, 1], positions [B, 1], valid [B, 1])  # after each choice

    e.g. ``init`` prefills a critic's cache with ``decode_hidden`` and keeps the last values,
    ``__call__`` adds the guidance computed from ``state.carry``, ``update`` decodes the chosen token.

    Returns:
      ``SampleOutput(tokens [B, N], mask [B, N], logp [B, N], sequences [B, P+N])``.
    """
    prompts = jnp.asarray(prompts)
    prompt_valid = jnp.asarray(prompt_valid)
    _check_prompts(prompts, prompt_valid)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    ops.check_range("temperature", temperature, 0.0, None)
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0 = off)")
    ops.check_range("top_p", top_p, 0.0, 1.0, low_open=True)

    graphdef, model_state = nnx.split(model)
    proc_leaves, proc_def = jax.tree_util.tree_flatten(_as_tree_partial(logits_processor))
    return _generate_jit(
        model_state,
        proc_leaves,
        prompts.astype(jnp.int32),
        prompt_valid.astype(jnp.int32),
        key,
        graphdef=_Static(graphdef),
        proc_def=_Static(proc_def),
        max_new_tokens=int(max_new_tokens),
        eos_id=None if eos_id is None else int(eos_id),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        pad_id=int(pad_id),
    )


def _process(logits, state, processor, temperature, top_k, top_p):
    """The sampling distribution's logits: processor, then temperature, top-k, top-p (float32)."""
    x = logits.astype(jnp.float32)
    if processor is not None:
        x = processor(x, state).astype(jnp.float32)
    if temperature > 0:
        x = temperature_processor(x, temperature=temperature)
    x = top_k_processor(x, k=top_k)
    return top_p_processor(x, p=top_p)


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef", "proc_def", "max_new_tokens", "eos_id", "temperature", "top_k", "top_p", "pad_id",
    ),
)
def _generate_jit(model_state, proc_leaves, prompts, prompt_valid, key, *, graphdef, proc_def,
                  max_new_tokens, eos_id, temperature, top_k, top_p, pad_id):
    model = nnx.merge(graphdef.value, model_state)
    processor = jax.tree_util.tree_unflatten(proc_def.value, proc_leaves)
    b, p = prompts.shape
    n = max_new_tokens
    s = p + n

    prompt_pos = positions_from_valid(prompt_valid)
    lengths = jnp.sum(prompt_valid, axis=-1).astype(jnp.int32)
    gen_pos = lengths[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    positions = jnp.concatenate([prompt_pos, gen_pos], axis=1)
    tokens = jnp.concatenate([prompts, jnp.full((b, n), pad_id, jnp.int32)], axis=1)
    valid = jnp.concatenate([prompt_valid, jnp.zeros((b, n), jnp.int32)], axis=1)

    cache = model.init_cache(b, s)
    if hasattr(model, "decode_hidden") and hasattr(model, "logits_from_hidden"):
        # Only the last prompt position's logits are used: skip the LM head (a [B, P, V] product) elsewhere.
        h, cache = model.decode_hidden(prompts, prompt_pos, cache, prompt_valid)
        last_logits = model.logits_from_hidden(h[:, -1:])[:, -1].astype(jnp.float32)
    else:
        logits, cache = model.decode(prompts, prompt_pos, cache, prompt_valid)
        last_logits = logits[:, -1].astype(jnp.float32)
    stateful = processor is not None and hasattr(processor, "init") and hasattr(processor, "update")
    proc_carry = processor.init(prompts, prompt_valid, prompt_pos, s) if stateful else None
    logp_buf = jnp.zeros((b, n), jnp.float32)
    done = jnp.zeros((b,), bool)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, cache, last_logits, done, tokens, valid, logp_buf, proc_carry = carry
        state = StepState(step=i, index=p + i - 1, tokens=tokens, valid=valid,
                          positions=positions, done=done, carry=proc_carry)
        x = _process(last_logits, state, processor, temperature, top_k, top_p)
        if temperature > 0:
            tok = jax.random.categorical(jax.random.fold_in(key, i), x, axis=-1).astype(jnp.int32)
        else:
            tok = greedy(x)
        lp = ops.token_logprobs(x, tok)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        lp = jnp.where(live, lp, 0.0)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], p + i, axis=1)
        valid = jax.lax.dynamic_update_slice_in_dim(valid, live.astype(jnp.int32)[:, None], p + i, axis=1)
        logp_buf = jax.lax.dynamic_update_slice_in_dim(logp_buf, lp[:, None], i, axis=1)
        if eos_id is not None:
            done = done | (tok == eos_id)
        pos = jax.lax.dynamic_slice_in_dim(positions, p + i, 1, axis=1)

        def advance(args):  # feed the chosen token: the next step's logits
            cache, proc_carry = args
            logits, cache = model.decode(tok[:, None], pos, cache, live.astype(jnp.int32)[:, None])
            if stateful:
                proc_carry = processor.update(proc_carry, tok[:, None], pos, live.astype(jnp.int32)[:, None])
            return logits[:, -1].astype(jnp.float32), cache, proc_carry

        # After the last token nothing is sampled any more: skip that decode step.
        last_logits, cache, proc_carry = jax.lax.cond(i + 1 < n, advance, lambda a: (last_logits, *a),
                                                      (cache, proc_carry))
        return (i + 1, cache, last_logits, done, tokens, valid, logp_buf, proc_carry)

    carry = (jnp.int32(0), cache, last_logits, done, tokens, valid, logp_buf, proc_carry)
    _, _, _, _, tokens, valid, logp_buf, _ = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(tokens=tokens[:, p:], mask=valid[:, p:], logp=logp_buf, sequences=tokens)
