"""Vocabulary-tiled log-probs, entropy and divergences from hidden states equal the dense ones.

The dense references are the logits-based functions (``ops.token_logprobs``, ``ops.entropy``,
``kljax.divergences.*``) applied to ``hidden @ unembedding``; the tiled versions must agree in value
and in gradient for every tile size, including ones that do not divide V.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kljax import divergences as dv
from kljax import ops

V = 13  # tile sizes 1, 5, 13, 64 cover: one column, a non-divisor, exactly V, larger than V
DIVERGENCES = {
    "forward_kl": {},
    "reverse_kl": {},
    "generalized_jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
    "total_variation": {},
}


def _inputs(dtype=jnp.float32, shape=(2, 3), d=6, v=V, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    h = jax.random.normal(k[0], (*shape, d)).astype(dtype)
    w = jax.random.normal(k[1], (d, v)).astype(dtype)
    ht = jax.random.normal(k[2], (*shape, d)).astype(dtype)
    wt = jax.random.normal(k[3], (d, v)).astype(dtype)
    tokens = jax.random.randint(k[4], shape, 0, v)
    return h, w, ht, wt, tokens


# One jitted program per path: (loss, (logp, entropy)) and the gradients w.r.t. (h, w); the loss
# mixes both outputs with non-trivial cotangents.
def _mix(logp, ent):
    return jnp.sum(jnp.sin(logp)) + jnp.sum(jnp.cos(ent)), (logp, ent)


def _tiled_logprob_loss(h, w, tokens, temperature, chunk):
    return _mix(*ops.token_logprobs_and_entropy_from_hidden(h, w, tokens, temperature, chunk))


def _dense_logprob_loss(h, w, tokens, temperature, chunk=None):
    logits = jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32))
    return _mix(ops.token_logprobs(logits / temperature, tokens), ops.entropy(logits, temperature))


@functools.partial(jax.jit, static_argnames=("tiled", "temperature", "chunk"))
def _grads(h, w, tokens, tiled, temperature, chunk=None):
    loss = _tiled_logprob_loss if tiled else _dense_logprob_loss
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w, tokens, temperature, chunk)


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (5, 0.7), (13, 1.0), (64, 0.7)])
def test_logprobs_and_entropy_equal_dense_float32(chunk, temperature):
    h, w, _, _, tokens = _inputs()
    (vt, (logp, ent)), gt = _grads(h, w, tokens, tiled=True, temperature=temperature, chunk=chunk)
    (vd, _), gd = _grads(h, w, tokens, tiled=False, temperature=temperature)
    logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature  # independent reference
    ref_logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(logp, np.take_along_axis(ref_logp, np.asarray(tokens)[..., None], -1)[..., 0], atol=2e-5)
    np.testing.assert_allclose(ent, -(np.exp(ref_logp) * ref_logp).sum(-1), atol=2e-5)
    np.testing.assert_allclose(vt, vd, rtol=1e-5, atol=1e-5)
    for a, b in zip(gt, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_logprobs_and_entropy_from_hidden_bfloat16():
    h, w, _, _, tokens = _inputs(jnp.bfloat16)
    (vt, _), gt = _grads(h, w, tokens, tiled=True, temperature=1.0, chunk=5)
    (vd, _), gd = _grads(h, w, tokens, tiled=False, temperature=1.0)
    assert gt[0].dtype == jnp.bfloat16 and gt[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(float(vt), float(vd), rtol=1e-2, atol=1e-2)
    for a, b in zip(gt, gd):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max())


def test_logprobs_from_hidden_is_the_logprob_half():
    h, w, _, _, tokens = _inputs()
    (_, (logp, _)), _ = _grads(h, w, tokens, tiled=True, temperature=0.7, chunk=5)
    half = jax.jit(lambda h, w: ops.token_logprobs_from_hidden(h, w, tokens, 5, temperature=0.7))
    np.testing.assert_allclose(half(h, w), logp, rtol=1e-6)


def test_entropy_from_hidden_stays_accurate_for_huge_logits():
    # Logits ~1e4: H = lse − E[z] would cancel catastrophically; the shifted sums must not.
    h, w, _, _, tokens = _inputs(d=6)
    h = h * 3e3
    (_, (_, ent)), _ = _grads(h, w, tokens, tiled=True, temperature=1.0, chunk=5)
    np.testing.assert_allclose(ent, ops.entropy(h @ w), atol=1e-4)
    assert np.all(np.asarray(ent) >= 0)


def test_check_grads_logprobs_and_entropy_custom_vjp(x64):
    h, w, _, _, tokens = _inputs(jnp.float64, shape=(2, 2), d=4, v=7)
    f = jax.jit(lambda h, w: _tiled_logprob_loss(h, w, tokens, 0.7, 3)[0])
    check_grads(f, (h, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def _dense_divergence(name, ht, wt, h, w, mask, temperature):
    logits_t = jnp.einsum("...d,dv->...v", ht.astype(jnp.float32), wt.astype(jnp.float32))
    logits_s = jnp.einsum("...d,dv->...v", h.astype(jnp.float32), w.astype(jnp.float32))
    # Teachers are constants in the chunked path; the dense reference detaches them too.
    d = getattr(dv, name)(jax.lax.stop_gradient(logits_t), logits_s, temperature=temperature, **DIVERGENCES[name])
    return jnp.where(mask > 0, d, 0.0)


def _tiled_divergence(name, ht, wt, h, w, mask, temperature, chunk):
    fn = getattr(dv, name + "_from_hidden")
    return fn(ht, wt, h, w, mask, temperature=temperature, chunk_size=chunk, **DIVERGENCES[name])


@functools.partial(jax.jit, static_argnames=("name", "temperature", "chunk"))
def _divergence_loss(ht, wt, h, w, mask, name, temperature, chunk):
    """Value and gradients (student hidden, student unembedding, teacher hidden, teacher unembedding)."""
    def loss(h, w, ht, wt):
        if chunk is None:
            d = _dense_divergence(name, ht, wt, h, w, mask, temperature)
        else:
            d = _tiled_divergence(name, ht, wt, h, w, mask, temperature, chunk)
        return jnp.sum(jnp.sin(3.0 * d)), d

    (_, d), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(h, w, ht, wt)
    return d, g


MASK = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("name,chunk", [(n, 5) for n in DIVERGENCES] + [("generalized_jsd", 64)])
def test_divergences_from_hidden_equal_dense_float32(name, chunk):
    h, w, ht, wt, _ = _inputs()
    d_tiled, g_tiled = _divergence_loss(ht, wt, h, w, MASK, name=name, temperature=0.7, chunk=chunk)
    d_dense, g_dense = _divergence_loss(ht, wt, h, w, MASK, name=name, temperature=0.7, chunk=None)
    np.testing.assert_allclose(d_tiled, d_dense, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(d_dense)[np.asarray(MASK) == 0] == 0) and np.all(np.asarray(d_dense)[:, 0] > 0)
    for a, b in zip(g_tiled[:2], g_dense[:2]):  # float32 rounding of sums over V differs by order
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    # The teacher gets no gradient.
    for g in g_tiled[2:]:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd"])
def test_divergences_from_hidden_bfloat16(name):
    h, w, ht, wt, _ = _inputs(jnp.bfloat16)
    d_tiled, g_tiled = _divergence_loss(ht, wt, h, w, MASK, name=name, temperature=1.0, chunk=5)
    d_dense, g_dense = _divergence_loss(ht, wt, h, w, MASK, name=name, temperature=1.0, chunk=None)
    np.testing.assert_allclose(np.asarray(d_tiled, np.float32), np.asarray(d_dense, np.float32), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_tiled[:2], g_dense[:2]):
        assert a.dtype == jnp.bfloat16
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=3e-2 * np.abs(b).max())


def test_masked_rows_change_neither_value_nor_gradient():
    h, w, ht, wt, _ = _inputs()
    m = np.asarray(MASK)[..., None] > 0
    # Masked positions hold very different (large) hidden states: nothing of them may leak.
    h2, ht2 = jnp.where(m, h, 40.0 * h[::-1]), jnp.where(m, ht, -40.0 * ht)
    for name in ("generalized_jsd", "reverse_kl"):
        d1, g1 = _divergence_loss(ht, wt, h, w, MASK, name=name, temperature=1.0, chunk=5)
        d2, g2 = _divergence_loss(ht2, wt, h2, w, MASK, name=name, temperature=1.0, chunk=5)
        np.testing.assert_allclose(d1, d2, rtol=1e-6)
        np.testing.assert_allclose(g1[1], g2[1], rtol=1e-5, atol=1e-6)  # unembedding
        np.testing.assert_array_equal(np.asarray(g2[0])[~m[..., 0]], 0.0)  # masked hidden rows


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_check_grads_divergences_from_hidden_custom_vjp(name, x64):
    h, w, ht, wt, _ = _inputs(jnp.float64, shape=(2, 2), d=4, v=7)
    mask = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    f = jax.jit(lambda h, w: jnp.sum(jnp.sin(_tiled_divergence(name, ht, wt, h, w, mask, 0.7, 3))))
    check_grads(f, (h, w), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_bad_shapes_name_the_arguments():
    h, w, ht, wt, tokens = _inputs()
    with pytest.raises(ValueError, match="unembedding"):
        ops.token_logprobs_and_entropy_from_hidden(h, w.T, tokens)
    with pytest.raises(ValueError, match="model_unembedding"):
        dv.forward_kl_from_hidden(ht, wt, h, w[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        dv.generalized_jsd_from_hidden(ht, wt, h, w, temperature=0.0)
