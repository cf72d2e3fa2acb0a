"""Array primitives shared by every objective: token log-probs, entropy, masked reductions.

Nothing here knows about models, configs or I/O. Shapes follow DESIGN.md: logits ``[..., V]``,
per-token arrays ``[B, T]``, ``mask`` ``[B, T]`` with 1 where a token counts.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


# --------------------------------------------------------------------------------------------
# Argument checks. Hyper-parameters are Python numbers at trace time, so these run before jit
# traces anything and the message can name the argument and the range it must lie in.
# --------------------------------------------------------------------------------------------

def check_range(name: str, value, low=None, high=None, *, low_open=False, high_open=False):
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high`` (open ends optional)."""
    if isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return value  # traced hyper-parameters (schedules) are checked by the caller's config
    v = float(value)
    bad = math.isnan(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{name}={value!r} is outside its valid range {interval}")
    return value


def check_choice(name: str, value, choices):
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {sorted(choices)}")
    return value


def check_same_shape(**arrays):
    """Raise ``ValueError`` listing every argument's shape unless all shapes agree."""
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}{list(s)}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; these arguments must have the same shape")


def check_leading_shape(expected, **arrays):
    """Raise unless each array's shape starts with ``expected`` (e.g. ``[B, T]`` for ``[B, T, V]``)."""
    expected = tuple(expected)
    for k, v in arrays.items():
        if v is None:
            continue
        s = tuple(jnp.shape(v))
        if s[: len(expected)] != expected:
            raise ValueError(
                f"{k} has shape {list(s)} but its leading dimensions must be {list(expected)} "
                "(the shape of the mask / per-token arrays)"
            )


# --------------------------------------------------------------------------------------------
# Next-token alignment and token log-probs
# --------------------------------------------------------------------------------------------

def shift_for_next_token(logits, tokens, mask=None):
    """Align position t's logits with token t+1: the one place kljax shifts.

    Returns ``(logits[:, :-1], tokens[:, 1:], mask[:, 1:])``; ``mask`` defaults to ones.
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, jnp.float32)
    return logits[:, :-1], tokens[:, 1:], mask[:, 1:]


def _upcast(x):
    """At least float32 (float64 stays float64, so gradient tests keep their precision)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _logsumexp_chunked(logits, chunk_size: int):
    """logsumexp over the last axis, reading ``chunk_size`` vocabulary entries at a time."""
    v = logits.shape[-1]
    n = -(-v // chunk_size)
    pad = n * chunk_size - v
    x = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
    x = jnp.moveaxis(x.reshape(*logits.shape[:-1], n, chunk_size), -2, 0)

    def step(carry, chunk):
        return jnp.logaddexp(carry, jax.nn.logsumexp(_upcast(chunk), axis=-1)), None

    init = jnp.full(logits.shape[:-1], -jnp.inf, _upcast(logits).dtype)
    out, _ = jax.lax.scan(step, init, x)
    return out


def token_logprobs(logits, tokens, chunk_size: Optional[int] = None):
    """log softmax(logits)[tokens] without materializing the full log-softmax.

    ``logits [..., V]`` (already aligned with ``tokens [...]``, see ``shift_for_next_token``).
    Computed in float32 as ``logit[token] − logsumexp(logits)``; with ``chunk_size`` the
    logsumexp streams over vocabulary chunks so only ``[..., chunk_size]`` is live at once.
    """
    chex_tokens = jnp.asarray(tokens)
    picked = jnp.take_along_axis(logits, chex_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if chunk_size is None or chunk_size >= logits.shape[-1]:
        lse = jax.nn.logsumexp(_upcast(logits), axis=-1)
    else:
        lse = _logsumexp_chunked(logits, chunk_size)
    return _upcast(picked) - lse


def token_logprobs_from_hidden(hidden, unembedding, tokens, chunk_size: int = 8192):
    """log p(tokens) from final hidden states, never forming the ``[..., V]`` logits at once.

    ``hidden [..., D]``, ``unembedding [D, V]``, ``tokens [...]``. The vocabulary is processed in
    chunks inside a rematerialized scan, so the forward pass and its gradient keep only
    ``[..., chunk_size]`` logits alive (the large-vocabulary trick of chunked cross-entropy).
    """
    d, v = unembedding.shape
    n = -(-v // chunk_size)
    pad = n * chunk_size - v
    w = jnp.pad(unembedding, ((0, 0), (0, pad)))
    w = jnp.moveaxis(w.reshape(d, n, chunk_size), 1, 0)  # [n, D, C]
    valid = (jnp.arange(n * chunk_size) < v).reshape(n, chunk_size)
    h = _upcast(hidden)
    tokens = tokens.astype(jnp.int32)

    @jax.checkpoint
    def chunk_stats(h, w_c, valid_c, start):
        z = jnp.einsum("...d,dc->...c", h, w_c.astype(h.dtype))
        z = jnp.where(valid_c, z, -jnp.inf)
        local = tokens - start
        inside = (local >= 0) & (local < chunk_size)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, chunk_size - 1)[..., None], -1)[..., 0]
        return jax.nn.logsumexp(z, axis=-1), jnp.where(inside, picked, 0.0)

    def step(carry, xs):
        lse, pick = carry
        w_c, valid_c, start = xs
        c_lse, c_pick = chunk_stats(h, w_c, valid_c, start)
        return (jnp.logaddexp(lse, c_lse), pick + c_pick), None

    init = (jnp.full(tokens.shape, -jnp.inf, h.dtype), jnp.zeros(tokens.shape, h.dtype))
    starts = jnp.arange(n) * chunk_size
    (lse, pick), _ = jax.lax.scan(step, init, (w, valid, starts))
    return pick - lse


def sequence_logprobs(logits, tokens, mask=None, chunk_size: Optional[int] = None):
    """Per-token log-probs of ``tokens[:, 1:]`` under ``logits[:, :-1]`` and the shifted mask."""
    lg, tk, m = shift_for_next_token(logits, tokens, mask)
    return token_logprobs(lg, tk, chunk_size) * m, m


# --------------------------------------------------------------------------------------------
# Distribution summaries
# --------------------------------------------------------------------------------------------

def safe_log_softmax(logits, temperature: float = 1.0):
    """(at least) float32 log-softmax of ``logits / temperature`` over the last axis."""
    return jax.nn.log_softmax(_upcast(logits) / temperature, axis=-1)


def xlogy_exp(logp, value):
    """Σ-ready ``exp(logp) * value`` that is 0 (with zero gradient) where ``logp = −inf``.

    Where ``logp`` is finite and ``value`` is ±inf the result is ``value``: the probability is
    positive even when ``exp(logp)`` underflows to 0 (e.g. logits / 1e-3), so p·(±inf) is ±inf,
    never 0·inf = NaN (a KL whose second argument has no mass there is +inf).
    """
    finite = jnp.isfinite(logp)
    inf_value = finite & jnp.isinf(value)
    safe_logp = jnp.where(finite, logp, 0.0)
    safe_value = jnp.where(finite & ~inf_value, value, 0.0)
    prod = jnp.exp(safe_logp) * safe_value
    return jnp.where(finite, jnp.where(inf_value, value, prod), 0.0)


def entropy(logits, temperature: float = 1.0):
    """Shannon entropy −Σ p log p of softmax(logits / temperature), last axis; 0·log 0 := 0."""
    logp = safe_log_softmax(logits, temperature)
    return -jnp.sum(xlogy_exp(logp, logp), axis=-1)


# --------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------

def masked_sum(x, mask, axis=None):
    """Σ x·mask; masked entries are zeroed with ``where`` first so NaN/inf there cannot leak."""
    mask = jnp.asarray(mask)
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Σ x·mask / max(Σ mask, 1): an all-masked reduction is 0, not NaN."""
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, axis=None, unbiased: bool = False):
    """Variance of the unmasked entries (population by default)."""
    mean = masked_mean(x, mask, axis)
    centered = x - (mean if axis is None else jnp.expand_dims(mean, axis))
    n = jnp.sum(mask, axis=axis)
    denom = jnp.maximum(n - 1.0, 1.0) if unbiased else jnp.maximum(n, 1.0)
    return masked_sum(centered**2, mask, axis) / denom


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean)/std over unmasked entries; masked entries come back as 0."""
    mean = masked_mean(x, mask)
    std = jnp.sqrt(masked_var(x, mask) + eps)
    out = (x - mean) / std
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def aggregate(per_token, mask, mode: str = "token-mean", norm: Optional[float] = None):
    """Reduce a ``[B, T]`` per-token loss with verl's aggregation names.

    * ``token-mean``: Σ_bt m·ℓ / Σ_bt m (every token weighs the same; DAPO).
    * ``seq-mean-token-sum``: mean_b Σ_t m·ℓ.
    * ``seq-mean-token-mean``: mean_b (Σ_t m·ℓ / Σ_t m) (GRPO's original form).
    * ``seq-mean-token-sum-norm``: Σ_bt m·ℓ / (B · norm), ``norm`` defaulting to T: Dr. GRPO's
      (1/G)Σ_i (1/MAX_LEN)Σ_t. verl divides the total by T only and tunix by ``norm`` only; both
      differ from this by the constant factor B.
    Rows with no unmasked token contribute 0 and are not counted in the sequence means.
    """
    check_choice("loss_agg", mode, LOSS_AGG_MODES)
    check_same_shape(per_token=per_token, mask=mask)
    mask = jnp.asarray(mask, jnp.float32)
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    seq_sum = masked_sum(per_token, mask, axis=-1)
    rows = jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=-1)), 1.0)
    if mode == "seq-mean-token-sum":
        return jnp.sum(seq_sum) / rows
    if mode == "seq-mean-token-mean":
        seq_mean = seq_sum / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(seq_mean) / rows
    norm = per_token.shape[-1] if norm is None else norm
    return jnp.sum(seq_sum) / (per_token.shape[0] * norm)
