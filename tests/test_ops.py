import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import ops


def _logits(shape, seed=0, scale=3.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_token_logprobs_matches_log_softmax_gather():
    logits = _logits((2, 5, 11))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
    full = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(ops.token_logprobs(logits, tokens), full, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 5, 11])
def test_chunked_logprobs_equal_unchunked_value_and_gradient(chunk, x64):
    logits = _logits((2, 3, 11)).astype(jnp.float64)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 3), 0, 11)
    f = lambda lg, c: jnp.sum(jnp.sin(ops.token_logprobs(lg, tokens, c)))
    np.testing.assert_allclose(f(logits, chunk), f(logits, None), atol=1e-12)
    np.testing.assert_allclose(jax.grad(f)(logits, chunk), jax.grad(f)(logits, None), atol=1e-12)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_logprobs_from_hidden_equal_full_logits(chunk, x64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k1, (2, 4, 6), jnp.float64)
    w = jax.random.normal(k2, (6, 13), jnp.float64)
    tokens = jax.random.randint(k3, (2, 4), 0, 13)
    full = lambda h, w: jnp.sum(jnp.cos(ops.token_logprobs(h @ w, tokens)))
    tiled = lambda h, w: jnp.sum(jnp.cos(ops.token_logprobs_from_hidden(h, w, tokens, chunk)))
    np.testing.assert_allclose(tiled(h, w), full(h, w), atol=1e-10)
    for a, b in zip(jax.grad(tiled, (0, 1))(h, w), jax.grad(full, (0, 1))(h, w)):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_shift_aligns_position_t_with_token_t_plus_1():
    logits = jnp.eye(4)[None] * 50.0  # position t puts all mass on token t
    tokens = jnp.array([[9, 0, 1, 2]])
    lg, tk, m = ops.shift_for_next_token(logits, tokens)
    assert lg.shape == (1, 3, 4) and tk.shape == (1, 3) and m.shape == (1, 3)
    np.testing.assert_allclose(ops.token_logprobs(lg, tk), 0.0, atol=1e-6)


def test_entropy_uniform_and_neg_inf_entries():
    np.testing.assert_allclose(ops.entropy(jnp.zeros((3, 8))), np.log(8), rtol=1e-6)
    lg = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    np.testing.assert_allclose(ops.entropy(lg), np.log(2), rtol=1e-6)
    g = jax.grad(ops.entropy)(jnp.array([1.0, 0.5, -jnp.inf]))
    assert np.all(np.isfinite(g))


def test_aggregation_modes_on_known_values():
    # The same numbers tunix's aggregation test uses (reference/policy_gradient.md, E4).
    x = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    m = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(ops.aggregate(x, m, "token-mean"), 1.8 / 5, rtol=1e-6)
    np.testing.assert_allclose(ops.aggregate(x, m, "seq-mean-token-sum"), 0.9, rtol=1e-6)
    np.testing.assert_allclose(ops.aggregate(x, m, "seq-mean-token-mean"), (0.15 + 0.5) / 2, rtol=1e-6)
    np.testing.assert_allclose(ops.aggregate(x, m, "seq-mean-token-sum-norm", norm=4), 1.8 / 8, rtol=1e-6)
    np.testing.assert_allclose(ops.aggregate(x, m, "seq-mean-token-sum-norm"), 1.8 / 6, rtol=1e-6)


@pytest.mark.parametrize("mode", ops.LOSS_AGG_MODES)
def test_masked_positions_affect_neither_value_nor_gradient(mode):
    x = _logits((3, 4), seed=2)
    m = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
    f = lambda x: ops.aggregate(x**2, m, mode)
    np.testing.assert_allclose(f(jnp.where(m > 0, x, jnp.nan)), f(x), rtol=1e-6)
    poisoned = jnp.where(m > 0, x, 1e30)  # overflows to inf under x**2
    np.testing.assert_allclose(f(poisoned), f(x), rtol=1e-6)
    g = jax.grad(f)(poisoned)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[np.asarray(m) == 0] == 0)


def test_aggregate_rejects_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError, match="loss_agg"):
        ops.aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "mean")
    with pytest.raises(ValueError, match=r"per_token\[2, 3\].*mask\[2, 4\]"):
        ops.aggregate(jnp.zeros((2, 3)), jnp.ones((2, 4)))


def test_masked_whiten_unit_variance_and_zeros_outside_mask():
    x = _logits((4, 5), seed=3)
    m = (jax.random.uniform(jax.random.PRNGKey(4), (4, 5)) > 0.3).astype(jnp.float32)
    w = ops.masked_whiten(x, m)
    np.testing.assert_allclose(ops.masked_mean(w, m), 0.0, atol=1e-5)
    np.testing.assert_allclose(ops.masked_var(w, m), 1.0, atol=1e-4)
    assert np.all(np.asarray(w)[np.asarray(m) == 0] == 0)


def test_check_range_names_argument_and_interval():
    with pytest.raises(ValueError, match=r"beta=-1.0 .*\[0.0, inf\)"):
        ops.check_range("beta", -1.0, 0.0)
    with pytest.raises(ValueError, match=r"alpha=1\.0.*\(0\.0, 1\.0\)"):
        ops.check_range("alpha", 1.0, 0.0, 1.0, low_open=True, high_open=True)
    assert ops.check_range("beta", 0.0, 0.0) == 0.0
