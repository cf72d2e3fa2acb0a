"""Divergences: values against independent numpy formulas, limits, gradients, robustness."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from kljax import divergences as dv


# ---------------------------------------------------------------- independent numpy references

def _np_probs(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), -1)


def np_jsd(p, q, b):
    m = b * p + (1 - b) * q
    return b * np_kl(p, m) + (1 - b) * np_kl(q, m)


def np_akl(p, q, mu):
    out = []
    for pi, qi in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])):
        order = np.argsort(-pi)
        cum = np.cumsum(pi[order])
        head = [order[0]] + [order[k] for k in range(1, len(order)) if cum[k] <= mu]
        gap = np.abs(pi - qi)
        g = gap[head].sum() / gap.sum()
        out.append(g * np_kl(pi, qi) + (1 - g) * np_kl(qi, pi))
    return np.array(out).reshape(p.shape[:-1])


def np_bdkd(p, q):
    ht, hs = -np.sum(p * np.log(p), -1), -np.sum(q * np.log(q), -1)
    wt, ws = np.where(ht > hs, 3.0, 1.0), np.where(hs > ht, 3.0, 1.0)
    return wt * np_kl(p, q) + ws * np_kl(q, p)


def np_ab(p, q, a, b):
    return -np.sum(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b), -1) / (a * b)


REFERENCES = {
    "forward_kl": (dv.forward_kl, {}, lambda p, q: np_kl(p, q)),
    "reverse_kl": (dv.reverse_kl, {}, lambda p, q: np_kl(q, p)),
    "jsd": (dv.generalized_jsd, {"beta": 0.3}, lambda p, q: np_jsd(p, q, 0.3)),
    "skew_kl": (dv.skew_kl, {"alpha": 0.2}, lambda p, q: np_kl(p, 0.2 * p + 0.8 * q)),
    "skew_reverse_kl": (dv.skew_reverse_kl, {"alpha": 0.2}, lambda p, q: np_kl(q, 0.2 * q + 0.8 * p)),
    "tv": (dv.total_variation, {}, lambda p, q: 0.5 * np.abs(p - q).sum(-1)),
    "akl": (dv.adaptive_kl, {"mu": 0.5}, lambda p, q: np_akl(p, q, 0.5)),
    "bdkd": (dv.bdkd, {}, np_bdkd),
    "alpha": (dv.alpha_divergence, {"alpha": -0.5},
              lambda p, q: (np.sum(p**-0.5 * q**1.5, -1) - 1) / (-0.5 * -1.5)),
    "ab": (dv.ab_divergence, {"alpha": 0.2, "beta": 0.7}, lambda p, q: np_ab(p, q, 0.2, 0.7)),
    "tsallis": (dv.tsallis_kl, {"order": 2.0}, lambda p, q: np.sum(p**2 / q, -1) - 1),
}


def _pair(shape=(3, 6), seed=0, scale=2.0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return scale * jax.random.normal(k1, shape, jnp.float64), scale * jax.random.normal(k2, shape, jnp.float64)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_value_matches_numpy_formula(name, x64):
    fn, kw, ref = REFERENCES[name]
    t, s = _pair()
    np.testing.assert_allclose(fn(t, s, **kw), ref(_np_probs(t), _np_probs(s)), rtol=1e-9, atol=1e-12)
    # temperature divides both logits
    np.testing.assert_allclose(fn(t, s, temperature=2.5, **kw), ref(_np_probs(t, 2.5), _np_probs(s, 2.5)),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_check_grads(name, x64):
    fn, kw, _ = REFERENCES[name]
    t, s = _pair((2, 5), seed=3)
    if name != "akl":
        check_grads(jax.jit(lambda a, b: fn(a, b, temperature=1.3, **kw)), (t, s), order=1, modes=("rev",))
        return
    # AKL detaches its head/tail weights (official code): its gradient is that of
    # g·KL(p‖q) + (1−g)·KL(q‖p) with g frozen at the current point.
    p, q = _np_probs(t), _np_probs(s)
    both = np_akl(p, q, 0.5)
    g = (both - np_kl(q, p)) / (np_kl(p, q) - np_kl(q, p))
    frozen = lambda a, b: g * dv.forward_kl(a, b) + (1 - g) * dv.reverse_kl(a, b)
    check_grads(jax.jit(frozen), (t, s), order=1, modes=("rev",))
    np.testing.assert_allclose(jax.grad(lambda b: jnp.sum(fn(t, b, **kw)))(s),
                               jax.grad(lambda b: jnp.sum(frozen(t, b)))(s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_divergence_of_a_distribution_from_itself_is_zero_with_zero_gradient(name, x64):
    fn, kw, _ = REFERENCES[name]
    t, _ = _pair()
    np.testing.assert_allclose(fn(t, t, **kw), 0.0, atol=1e-12)
    g = jax.grad(lambda s: jnp.sum(fn(t, s, **kw)))(t)
    np.testing.assert_allclose(g, 0.0, atol=1e-8)


def test_kl_is_kl_p_q():
    p = jnp.log(jnp.array([0.5, 0.5]))
    q = jnp.log(jnp.array([0.9, 0.1]))
    np.testing.assert_allclose(dv.kl(p, q), 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1), rtol=1e-6)
    np.testing.assert_allclose(dv.forward_kl(p, q), dv.kl(p, q))
    np.testing.assert_allclose(dv.reverse_kl(p, q), dv.kl(q, p))


def test_jsd_symmetric_at_half_and_bounded_by_log2(x64):
    t, s = _pair(scale=4.0)
    np.testing.assert_allclose(dv.generalized_jsd(t, s, 0.5), dv.generalized_jsd(s, t, 0.5), rtol=1e-12)
    assert np.all(dv.generalized_jsd(t, s, 0.5) <= np.log(2) + 1e-12)
    disjoint_p = jnp.array([0.0, -jnp.inf]); disjoint_q = jnp.array([-jnp.inf, 0.0])
    np.testing.assert_allclose(dv.generalized_jsd(disjoint_p, disjoint_q, 0.5), np.log(2), rtol=1e-12)


def test_jsd_endpoints_are_zero_continuous_and_scaled_limits_are_the_kls(x64):
    t, s = _pair()
    for b in (0.0, 1.0):
        np.testing.assert_array_equal(dv.generalized_jsd(t, s, b), 0.0)
        # traced β too (schedules): no 0·inf
        np.testing.assert_allclose(jax.jit(dv.generalized_jsd)(t, s, jnp.float64(b)), 0.0, atol=1e-15)
    eps = 1e-6
    np.testing.assert_allclose(dv.generalized_jsd(t, s, eps) / eps, dv.forward_kl(t, s), rtol=1e-4)
    np.testing.assert_allclose(dv.generalized_jsd(t, s, 1 - eps) / eps, dv.reverse_kl(t, s), rtol=1e-4)
    # with a zero-probability entry in the model, β = 0 must still be 0 (and not 0·inf = NaN)
    z = jnp.array([0.0, 1.0, -jnp.inf]); zt = jnp.array([0.0, 1.0, 2.0])
    assert dv.generalized_jsd(zt, z, jnp.float64(0.0)) == 0.0
    assert np.isfinite(dv.generalized_jsd(zt, z, 1e-3))


def test_total_variation_of_disjoint_supports_is_one():
    p = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    q = jnp.array([-jnp.inf, -jnp.inf, 3.0, 1.0])
    np.testing.assert_allclose(dv.total_variation(p, q), 1.0, rtol=1e-6)


def test_skew_endpoints(x64):
    t, s = _pair()
    np.testing.assert_allclose(dv.skew_kl(t, s, 0.0), dv.forward_kl(t, s), rtol=1e-12)
    np.testing.assert_allclose(dv.skew_kl(t, s, 1.0), 0.0, atol=1e-14)
    np.testing.assert_allclose(dv.skew_reverse_kl(t, s, 0.0), dv.reverse_kl(t, s), rtol=1e-12)
    assert np.all(dv.skew_kl(t * 10, s * 10, 0.1) <= -np.log(0.1) + 1e-9)


def test_temperature_flattens_distributions(x64):
    t, s = _pair()
    kls = [float(jnp.sum(dv.forward_kl(t, s, temperature=tau))) for tau in (0.5, 1.0, 2.0, 8.0, 100.0)]
    assert kls[-1] < 0.01 * kls[1] and kls[-2] < kls[1]
    np.testing.assert_allclose(dv.kl(t, s, temperature=2.0), dv.kl(t / 2.0, s / 2.0), rtol=1e-12)


def test_power_divergence_limits_and_identities(x64):
    t, s = _pair()
    fkl, rkl = dv.forward_kl(t, s), dv.reverse_kl(t, s)
    np.testing.assert_allclose(dv.alpha_divergence(t, s, 1.0), fkl, rtol=1e-12)
    np.testing.assert_allclose(dv.alpha_divergence(t, s, 1.0 - 1e-6), fkl, rtol=1e-4)
    np.testing.assert_allclose(dv.alpha_divergence(t, s, 1e-6), rkl, rtol=1e-4)
    np.testing.assert_allclose(dv.alpha_divergence(t, s, 0.0), rkl, rtol=1e-12)
    for a in (0.3, 0.5, 1.7):  # D_AB(α, 1−α) = D_α
        np.testing.assert_allclose(dv.ab_divergence(t, s, a, 1 - a), dv.alpha_divergence(t, s, a), rtol=1e-9)
    for q in (0.5, 2.0):  # Tsallis = q · D_α
        np.testing.assert_allclose(dv.tsallis_kl(t, s, q), q * dv.alpha_divergence(t, s, q), rtol=1e-9)
    np.testing.assert_allclose(dv.tsallis_kl(t, s, 1.0), fkl, rtol=1e-12)
    np.testing.assert_allclose(dv.tsallis_kl(t, s, 1.0 + 1e-6), fkl, rtol=1e-4)


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.0, 1.0), (0.4, 0.0), (0.0, 0.6), (0.5, -0.5), (-0.3, 0.3), (0.0, 0.0)])
def test_ab_special_cases_are_the_limits_of_the_generic_formula(a, b, x64):
    t, s = _pair()
    e = 1e-5
    near = dv.ab_divergence(t, s, a + e, b + 2 * e)  # generic branch, a nearby point
    np.testing.assert_allclose(dv.ab_divergence(t, s, a, b), near, rtol=1e-3, atol=1e-6)
    if (a, b) == (1.0, 0.0):
        np.testing.assert_allclose(dv.ab_divergence(t, s, a, b), dv.forward_kl(t, s), rtol=1e-12)
    if (a, b) == (0.0, 1.0):
        np.testing.assert_allclose(dv.ab_divergence(t, s, a, b), dv.reverse_kl(t, s), rtol=1e-12)


def test_akl_head_weight_follows_the_teacher_top_mass():
    # teacher mass 0.7 on token 0; the student agrees on the tail, so the whole gap is in the head
    p = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    q = jnp.log(jnp.array([0.4, 0.2, 0.4]))
    # head (μ=0.5) = {0} only; gaps: |0.3|, 0, |0.3| -> g_head = 0.5
    expect = 0.5 * np_kl(np.exp(p), np.exp(q)) + 0.5 * np_kl(np.exp(q), np.exp(p))
    np.testing.assert_allclose(dv.adaptive_kl(p, q, mu=0.5), expect, rtol=1e-5)
    # μ=1 puts everything in the head: pure forward KL
    np.testing.assert_allclose(dv.adaptive_kl(p, q, mu=1.0), np_kl(np.exp(p), np.exp(q)), rtol=1e-5)


# ---------------------------------------------------------------- importance-weighted k3

def test_importance_weighted_k3_has_the_reverse_kl_gradient_off_policy(x64):
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    theta, ref, old = (jax.random.normal(kk, (5,), jnp.float64) for kk in k)
    pi_old = jax.nn.softmax(old)
    true = jax.grad(lambda th: dv.kl(th, ref))(theta)

    def expected_surrogate(th, estimator):  # Σ_y π_old(y) · loss(y): the expected loss over y ~ π_old
        logp, ref_logp, old_logp = jax.nn.log_softmax(th), jax.nn.log_softmax(ref), jax.nn.log_softmax(old)
        return jnp.sum(pi_old * estimator(logp, old_logp, ref_logp))

    got = jax.grad(expected_surrogate)(theta, dv.importance_weighted_k3)
    np.testing.assert_allclose(got, true, rtol=1e-10, atol=1e-12)
    # without the weight, k3 as a loss follows neither KL; on-policy it follows the forward KL
    unweighted = jax.grad(expected_surrogate)(theta, lambda lp, olp, rlp: dv.k3(lp, rlp))
    assert not np.allclose(unweighted, true, atol=1e-3)
    check_grads(lambda lp: dv.importance_weighted_k3(lp, old, ref), (theta,), order=1, modes=("rev",))
    # old and ref log-probs are constants of the loss
    np.testing.assert_array_equal(jax.grad(lambda o: jnp.sum(dv.importance_weighted_k3(theta, o, ref)))(old), 0.0)


# ---------------------------------------------------------------- robustness

_ALL = [
    lambda t, s: dv.forward_kl(t, s), lambda t, s: dv.reverse_kl(t, s),
    lambda t, s: dv.generalized_jsd(t, s, 0.5), lambda t, s: dv.generalized_jsd(t, s, 0.0),
    lambda t, s: dv.skew_kl(t, s, 0.1), lambda t, s: dv.skew_reverse_kl(t, s, 0.1),
    dv.total_variation, dv.adaptive_kl, dv.bdkd, lambda t, s: dv.alpha_divergence(t, s, 0.5),
    lambda t, s: dv.ab_divergence(t, s, 0.2, 0.7), lambda t, s: dv.tsallis_kl(t, s, 0.5),
]


@functools.lru_cache(maxsize=None)
def _value_and_grads(i):
    f = _ALL[i]
    return jax.jit(lambda t, s: (f(t, s), jax.grad(lambda a, b: jnp.sum(f(a, b)), (0, 1))(t, s)))


_entry = st.sampled_from([0.0, 1.0, -3.0, 1e4, -1e4, 5.5])


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(t=st.lists(_entry, min_size=4, max_size=4), s=st.lists(_entry, min_size=4, max_size=4),
       pad=st.integers(0, 2))
def test_extreme_and_padded_logits_give_finite_values_and_gradients(t, s, pad):
    # the last `pad` entries are vocabulary padding (-inf in both models, as after slicing a padded vocab)
    t = jnp.array(t, jnp.float32).at[4 - pad:].set(-jnp.inf)
    s = jnp.array(s, jnp.float32).at[4 - pad:].set(-jnp.inf)
    for i in range(len(_ALL)):
        v, (gt, gs) = _value_and_grads(i)(t, s)
        assert np.isfinite(v) and v >= -1e-4, i
        assert np.all(np.isfinite(gt)) and np.all(np.isfinite(gs)), i
        np.testing.assert_array_equal(gs[4 - pad:], 0.0)


def test_bounded_divergences_stay_finite_when_supports_differ():
    t = jnp.array([0.0, -jnp.inf, 2.0]); s = jnp.array([-jnp.inf, 1.0, 2.0])
    for f in (lambda a, b: dv.generalized_jsd(a, b, 0.3), dv.total_variation,
              lambda a, b: dv.skew_kl(a, b, 0.1), lambda a, b: dv.skew_reverse_kl(a, b, 0.1)):
        v, g = jax.value_and_grad(lambda b: f(t, b))(s)
        assert np.isfinite(v) and np.all(np.isfinite(g))
    assert dv.forward_kl(t, s) == np.inf  # the true value


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call,arg", [
    (lambda t, s: dv.generalized_jsd(t, s, -0.1), "beta"),
    (lambda t, s: dv.generalized_jsd(t, s, 1.5), "beta"),
    (lambda t, s: dv.skew_kl(t, s, 1.2), "alpha"),
    (lambda t, s: dv.skew_reverse_kl(t, s, -0.2), "alpha"),
    (lambda t, s: dv.adaptive_kl(t, s, 0.0), "mu"),
    (lambda t, s: dv.kl(t, s, temperature=0.0), "temperature"),
    (lambda t, s: dv.tsallis_kl(t, s, -1.0), "order"),
    (lambda t, s: dv.alpha_divergence(t, s, float("nan")), "alpha"),
    (lambda t, s: dv.forward_kl(t, s[..., :3]), "shape"),
])
def test_bad_hyperparameters_raise_naming_the_argument(call, arg):
    t, s = jnp.zeros((2, 4)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=arg):
        call(t, s)
