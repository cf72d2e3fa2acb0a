"""Array primitives shared by every objective: token log-probs, entropy, masked reductions.

Nothing here knows about models, configs or I/O. Shapes follow DESIGN.md: logits ``[..., V]``,
per-token arrays ``[B, T]``, ``mask`` ``[B, T]`` with 1 where a token counts.
"""
from __future__ import annotations

import functools
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


# --------------------------------------------------------------------------------------------
# Large vocabularies: log-probs, entropy and divergences from hidden states, streamed over
# vocabulary tiles so that the ``[tokens, V]`` logits never exist whole (forward or backward).
# --------------------------------------------------------------------------------------------

def _compute_dtypes(hidden, unembedding):
    """(matmul input dtype, accumulation dtype): bfloat16 matmuls accumulate in float32."""
    ct = jnp.promote_types(hidden.dtype, unembedding.dtype)
    return ct, jnp.promote_types(ct, jnp.float32)


def _vocab_tile(h, w, i, chunk_size: int, temperature: float, acc):
    """Logits of vocabulary tile ``i``: ``(z [N, C], fresh [C], start, w_tile [D, C])``.

    Tile i covers columns ``[i·C, i·C + C)``; the last tile of a vocabulary that ``C`` does not
    divide starts at ``V − C`` instead (no padded copy of the unembedding), and its columns that an
    earlier tile already covered are not ``fresh``: their logits are −inf here, so every column is
    counted exactly once.
    """
    v = w.shape[1]
    first = i * chunk_size
    start = jnp.minimum(first, v - chunk_size)
    w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk_size, axis=1)
    z = jnp.einsum("nd,dc->nc", h, w_c.astype(h.dtype), preferred_element_type=acc)
    if temperature != 1.0:
        z = z / temperature
    fresh = start + jnp.arange(chunk_size) >= first
    return jnp.where(fresh, z, -jnp.inf), fresh, start, w_c


def _tile_count(v: int, chunk_size: int) -> int:
    return -(-v // chunk_size)


def _tiled_logsumexp(h, w, chunk_size, temperature, acc):
    """logsumexp over the vocabulary of ``h @ w / τ`` (rows of h), one tile at a time."""

    def step(lse, i):
        z, _, _, _ = _vocab_tile(h, w, i, chunk_size, temperature, acc)
        return jnp.logaddexp(lse, jax.nn.logsumexp(z, axis=-1)), None

    init = jnp.full(h.shape[:1], -jnp.inf, acc)
    lse, _ = jax.lax.scan(step, init, jnp.arange(_tile_count(w.shape[1], chunk_size)))
    return lse


def _add_tile_gradient(dw, start, dw_c):
    """dw[:, start:start+C] += dw_c (columns that are not fresh receive exact zeros)."""
    old = jax.lax.dynamic_slice_in_dim(dw, start, dw_c.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(dw, old + dw_c, start, axis=1)


def _logprobs_entropy_primal(h, w, tokens, temperature, chunk_size):
    ct, acc = _compute_dtypes(h, w)
    h = h.astype(ct)

    def step(carry, i):
        m, s0, s1, pick = carry
        z, fresh, start, _ = _vocab_tile(h, w, i, chunk_size, temperature, acc)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))  # finite: every tile has a fresh column
        shift = jnp.where(jnp.isfinite(m), m - m_new, 0.0)
        scale = jnp.exp(shift)
        e = jnp.exp(z - m_new[:, None])  # 0 where z = −inf
        zc = jnp.where(fresh, z - m_new[:, None], 0.0)
        s1 = scale * (s1 + s0 * shift) + jnp.sum(e * zc, axis=-1)
        s0 = scale * s0 + jnp.sum(e, axis=-1)
        local = tokens - start
        inside = (tokens >= i * chunk_size) & (local < chunk_size)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, chunk_size - 1)[:, None], -1)[:, 0]
        return (m_new, s0, s1, pick + jnp.where(inside, picked, 0.0)), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf, acc), jnp.zeros((n,), acc), jnp.zeros((n,), acc), jnp.zeros((n,), acc))
    (m, s0, s1, pick), _ = jax.lax.scan(step, init, jnp.arange(_tile_count(w.shape[1], chunk_size)))
    lse = m + jnp.log(s0)
    # H = lse − E_p[z] = log s0 − E_p[z − m]: no cancellation between two large numbers.
    return pick - lse, jnp.log(s0) - s1 / s0, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _logprobs_entropy(h, w, tokens, temperature, chunk_size):
    logp, ent, _ = _logprobs_entropy_primal(h, w, tokens, temperature, chunk_size)
    return logp, ent


def _logprobs_entropy_fwd(h, w, tokens, temperature, chunk_size):
    logp, ent, lse = _logprobs_entropy_primal(h, w, tokens, temperature, chunk_size)
    return (logp, ent), (h, w, tokens, lse, ent)


def _logprobs_entropy_bwd(temperature, chunk_size, res, cts):
    h_in, w, tokens, lse, ent = res
    g_logp, g_ent = cts
    ct, acc = _compute_dtypes(h_in, w)
    h = h_in.astype(ct)

    def step(carry, i):
        dh, dw = carry
        z, fresh, start, w_c = _vocab_tile(h, w, i, chunk_size, temperature, acc)
        logp = z - lse[:, None]
        p = jnp.exp(logp)
        onehot = (start + jnp.arange(chunk_size) == tokens[:, None]) & fresh
        # d log p_y / dz_v = 1[v = y] − p_v;  dH / dz_v = −p_v (log p_v + H).
        dz = g_logp[:, None] * (onehot - p) - g_ent[:, None] * p * jnp.where(fresh, logp + ent[:, None], 0.0)
        dz = jnp.where(fresh, dz, 0.0)
        if temperature != 1.0:
            dz = dz / temperature
        dz = dz.astype(ct)
        dh = dh + jnp.einsum("nc,dc->nd", dz, w_c.astype(ct), preferred_element_type=acc)
        dw = _add_tile_gradient(dw, start, jnp.einsum("nd,nc->dc", h, dz, preferred_element_type=acc))
        return (dh, dw), None

    init = (jnp.zeros(h.shape, acc), jnp.zeros(w.shape, acc))
    (dh, dw), _ = jax.lax.scan(step, init, jnp.arange(_tile_count(w.shape[1], chunk_size)))
    return dh.astype(h_in.dtype), dw.astype(w.dtype), None


_logprobs_entropy.defvjp(_logprobs_entropy_fwd, _logprobs_entropy_bwd)


def _flatten_hidden(hidden, unembedding, chunk_size, temperature):
    check_range("temperature", temperature, 0.0, None, low_open=True)
    check_range("chunk_size", chunk_size, 1, None)
    if hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            f"hidden{list(hidden.shape)} and unembedding{list(unembedding.shape)}: the last axis of "
            "hidden must equal the first axis of the unembedding [D, V]"
        )
    return hidden.reshape(-1, hidden.shape[-1]), min(int(chunk_size), unembedding.shape[1]), float(temperature)


def token_logprobs_and_entropy_from_hidden(
    hidden, unembedding, tokens, temperature: float = 1.0, chunk_size: int = 8192
):
    """log p(tokens) and the entropy H(p), p = softmax(hidden @ unembedding / τ), by vocabulary tiles.

    ``hidden [..., D]``, ``unembedding [D, V]``, ``tokens [...]`` (aligned: see
    ``shift_for_next_token``); returns ``(logp [...], entropy [...])`` in (at least) float32.
    With z = h·W/τ, one pass over tiles of ``chunk_size`` columns keeps, per row, a running
    maximum m, s0 = Σ e^{z−m}, s1 = Σ e^{z−m}(z − m) (rescaled whenever m grows) and z_y, so
    ``logsumexp = m + log s0``, ``log p_y = z_y − logsumexp`` and ``H = log s0 − s1/s0``.
    The gradient is a ``jax.custom_vjp`` whose backward pass recomputes each tile's logits:
    ∂log p_y/∂z_v = 1[v=y] − p_v and ∂H/∂z_v = −p_v(log p_v + H), then ∂/∂h = ∂z·Wᵀ/τ and
    ∂/∂W = hᵀ·∂z/τ. Only ``[tokens, chunk_size]`` logits are alive at once. ``chunk_size`` need not
    divide V (the last tile is shifted back so that it ends at V). bfloat16 inputs are multiplied
    in bfloat16 with float32 accumulation; the gradients come back in the inputs' dtypes.
    ``temperature`` and ``chunk_size`` are Python numbers (static).
    """
    h, c, t = _flatten_hidden(hidden, unembedding, chunk_size, temperature)
    lead = jnp.shape(tokens)
    logp, ent = _logprobs_entropy(h, unembedding, jnp.asarray(tokens).reshape(-1).astype(jnp.int32), t, c)
    return logp.reshape(lead), ent.reshape(lead)


def token_logprobs_from_hidden(hidden, unembedding, tokens, chunk_size: int = 8192, temperature: float = 1.0):
    """log p(tokens) from final hidden states, never forming the ``[..., V]`` logits at once.

    ``hidden [..., D]``, ``unembedding [D, V]``, ``tokens [...]``: the log-prob half of
    ``token_logprobs_and_entropy_from_hidden`` (same tiles, same custom gradient).
    """
    return token_logprobs_and_entropy_from_hidden(hidden, unembedding, tokens, temperature, chunk_size)[0]


def divergence_from_hidden(
    term,
    target_hidden,
    target_unembedding,
    model_hidden,
    model_unembedding,
    mask=None,
    temperature: float = 1.0,
    chunk_size: int = 8192,
):
    """D = Σ_v term(log p, log q) between full distributions given by hidden states, by vocabulary tiles.

    P = softmax(target_hidden @ target_unembedding / τ) (the teacher, no gradient),
    Q = softmax(model_hidden @ model_unembedding / τ) (the student). ``term(logp [N, C], logq [N, C])
    -> [N]`` sums its argument tiles over the last axis and must be *additive over the vocabulary*
    (D of the whole vocabulary = Σ over tiles) and give 0 on entries where both log-probs are −inf;
    ``kljax.divergences`` supplies the terms (``forward_kl_from_hidden`` etc.).

    Forward: pass 1 streams both logsumexps (lse_p, lse_q); pass 2 streams log p = z_p − lse_p,
    log q = z_q − lse_q into D and into S = Σ_v ∂term/∂log q_v. Backward (``jax.custom_vjp``): one
    pass recomputing each tile, with ∂D/∂z_q,v = ∂term/∂log q_v − q_v·S (log q = z_q − lse(z_q)),
    then ∂/∂h_q = ∂z_q·W_qᵀ/τ, ∂/∂W_q = h_qᵀ·∂z_q/τ. The teacher's inputs get zero cotangents
    (stop-gradient). Only ``[tokens, chunk_size]`` logits of each model are alive at once.
    Returns ``[...]`` (the leading shape of the hidden states), 0 where ``mask`` is 0.
    """
    if (target_hidden.shape[:-1] != model_hidden.shape[:-1]
            or target_unembedding.shape[1] != model_unembedding.shape[1]
            or target_hidden.shape[-1] != target_unembedding.shape[0]
            or model_hidden.shape[-1] != model_unembedding.shape[0]):
        raise ValueError(
            f"target_hidden{list(target_hidden.shape)}, model_hidden{list(model_hidden.shape)}, "
            f"target_unembedding{list(target_unembedding.shape)}, "
            f"model_unembedding{list(model_unembedding.shape)}: the hidden states must have the same "
            "leading shape, each its unembedding's width (a wider teacher is fine), and both "
            "unembeddings the same vocabulary size"
        )
    ht, c, t = _flatten_hidden(target_hidden, target_unembedding, chunk_size, temperature)
    hq, _, _ = _flatten_hidden(model_hidden, model_unembedding, chunk_size, temperature)
    fn = _divergence_vjp(term, t, c)
    d = fn(jax.lax.stop_gradient(ht), jax.lax.stop_gradient(target_unembedding), hq, model_unembedding)
    d = d.reshape(model_hidden.shape[:-1])
    if mask is not None:
        check_same_shape(mask=mask, per_token=d)
        d = jnp.where(jnp.asarray(mask) > 0, d, 0.0)
    return d


def _divergence_vjp(term, temperature, chunk_size):
    """The custom-gradient streaming divergence for one ``term`` (built per call; jit caches the trace)."""

    def tiles(hp, wp, hq, wq, i):
        ctp, accp = _compute_dtypes(hp, wp)
        ctq, accq = _compute_dtypes(hq, wq)
        zp, fresh, _, _ = _vocab_tile(hp.astype(ctp), wp, i, chunk_size, temperature, accp)
        zq, _, start, wq_c = _vocab_tile(hq.astype(ctq), wq, i, chunk_size, temperature, accq)
        return zp, zq, fresh, start, wq_c

    def primal(hp, wp, hq, wq):
        lse_p = _tiled_logsumexp(hp.astype(_compute_dtypes(hp, wp)[0]), wp, chunk_size, temperature,
                                 _compute_dtypes(hp, wp)[1])
        lse_q = _tiled_logsumexp(hq.astype(_compute_dtypes(hq, wq)[0]), wq, chunk_size, temperature,
                                 _compute_dtypes(hq, wq)[1])

        def step(carry, i):
            d, s = carry
            zp, zq, fresh, _, _ = tiles(hp, wp, hq, wq, i)
            logp, logq = zp - lse_p[:, None], zq - lse_q[:, None]
            value, pullback = jax.vjp(lambda lq: term(logp, lq), logq)
            (g,) = pullback(jnp.ones_like(value))
            return (d + value, s + jnp.sum(jnp.where(fresh, g, 0.0), axis=-1)), None

        acc = jnp.promote_types(lse_p.dtype, lse_q.dtype)
        init = (jnp.zeros(hq.shape[:1], acc), jnp.zeros(hq.shape[:1], acc))
        (d, s), _ = jax.lax.scan(step, init, jnp.arange(_tile_count(wq.shape[1], chunk_size)))
        return d, (lse_p, lse_q, s)

    @jax.custom_vjp
    def divergence(hp, wp, hq, wq):
        return primal(hp, wp, hq, wq)[0]

    def fwd(hp, wp, hq, wq):
        d, stats = primal(hp, wp, hq, wq)
        return d, (hp, wp, hq, wq, stats)

    def bwd(res, g_d):
        hp, wp, hq_in, wq, (lse_p, lse_q, s) = res
        ct, acc = _compute_dtypes(hq_in, wq)
        hq = hq_in.astype(ct)

        def step(carry, i):
            dh, dw = carry
            zp, zq, fresh, start, wq_c = tiles(hp, wp, hq, wq, i)
            logp, logq = zp - lse_p[:, None], zq - lse_q[:, None]
            _, pullback = jax.vjp(lambda lq: term(logp, lq), logq)
            (g,) = pullback(g_d.astype(logq.dtype))
            dz = jnp.where(fresh, g - jnp.exp(logq) * (g_d * s)[:, None], 0.0)
            if temperature != 1.0:
                dz = dz / temperature
            dz = dz.astype(ct)
            dh = dh + jnp.einsum("nc,dc->nd", dz, wq_c.astype(ct), preferred_element_type=acc)
            dw = _add_tile_gradient(dw, start, jnp.einsum("nd,nc->dc", hq, dz, preferred_element_type=acc))
            return (dh, dw), None

        init = (jnp.zeros(hq.shape, acc), jnp.zeros(wq.shape, acc))
        (dh, dw), _ = jax.lax.scan(step, init, jnp.arange(_tile_count(wq.shape[1], chunk_size)))
        return jnp.zeros_like(hp), jnp.zeros_like(wp), dh.astype(hq_in.dtype), dw.astype(wq.dtype)

    divergence.defvjp(fwd, bwd)
    return divergence


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
