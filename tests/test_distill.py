"""Distillation objectives: gradients, masking, reductions, optima and MiniLLM's exact expected gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from kljax import divergences as dv
from kljax import objectives
from kljax.objectives import distill

NAMES = objectives.names("distill")
B, T, V = 2, 3, 5


def _batch(seed=0, scale=2.0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = scale * jax.random.normal(k[0], (B, T, V), dtype)
    t = scale * jax.random.normal(k[1], (B, T, V), dtype)
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype)
    return s, t, mask


def _call(name, s, t, mask, **kw):
    if name == "minillm":
        kw.setdefault("tokens", jnp.argmax(jax.lax.stop_gradient(s), -1))
    if name == "kd":
        kw.setdefault("labels", jnp.zeros(s.shape[:2], jnp.int32).at[:, 1].set(2))
    return objectives.get(name)(s, t, mask, **kw)


def test_every_distill_name_is_registered():
    assert set(NAMES) == {"kd", "fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl", "bdkd", "nkd", "alpha", "ab",
                          "tsallis", "minillm"}
    assert all(objectives.family(n) == "distill" for n in NAMES)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("akl", "minillm")])
def test_check_grads(name, x64):
    s, t, mask = _batch(dtype=jnp.float64)
    check_grads(jax.jit(lambda x: _call(name, x, t, mask, temperature=1.5)[0]), (s,), order=1, modes=("rev",))


def test_check_grads_akl_with_frozen_weights(x64):
    # AKL's head/tail weights are detached (as in the official code): its gradient is that of the
    # frozen-weight mixture, which finite differences check here.
    s, t, mask = _batch(dtype=jnp.float64)
    loss = lambda x: _call("akl", x, t, mask)[0]
    fkl = dv.forward_kl(t, s)
    g = (dv.adaptive_kl(t, s) - dv.reverse_kl(t, s)) / (fkl - dv.reverse_kl(t, s))
    frozen = lambda x: distill.reduce(g * dv.forward_kl(t, x) + (1 - g) * dv.reverse_kl(t, x), mask)
    np.testing.assert_allclose(loss(s), frozen(s), rtol=1e-10)
    check_grads(jax.jit(frozen), (s,), order=1, modes=("rev",))
    np.testing.assert_allclose(jax.grad(loss)(s), jax.grad(frozen)(s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_gets_no_gradient_and_masked_positions_change_nothing(name):
    s, t, mask = _batch()
    loss, metrics = _call(name, s, t, mask)
    assert np.isfinite(loss) and "distill/loss" in metrics and "distill/kl" in metrics
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: _call(name, s, x, mask)[0]))(t), 0.0)
    off = (mask == 0)[..., None]
    s2, t2 = jnp.where(off, jnp.nan, s), jnp.where(off, 1e4, t)
    kw = {"tokens": jnp.argmax(s, -1)} if name == "minillm" else {}
    vg = jax.jit(jax.value_and_grad(lambda x, y: _call(name, x, y, mask, **kw)[0]))
    loss2, g = vg(s2, t2)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(jnp.where(off, g, 0.0), 0.0)
    _, g_clean = vg(s, t)
    np.testing.assert_allclose(g, g_clean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "kd"])
def test_identical_student_and_teacher_give_zero_gradient(name):
    s, _, mask = _batch()
    g = jax.grad(lambda x: _call(name, x, s, mask)[0])(s)
    if name == "nkd":  # NKD's target term is a cross-entropy weighted by p(y): not a divergence
        return
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_reductions_match_explicit_formulas(x64):
    s, t, mask = _batch(dtype=jnp.float64)
    per = np.asarray(dv.forward_kl(t, s)) * np.asarray(mask)
    m = np.asarray(mask)
    expect = {
        "token_mean": per.sum() / m.sum(),
        "sum": per.sum(),
        "batchmean": per.sum() / B,
        "seq_mean": np.mean(per.sum(1) / m.sum(1)),
    }
    for red, val in expect.items():
        np.testing.assert_allclose(objectives.get("fkl")(s, t, mask, reduction=red)[0], val, rtol=1e-12)
    # an all-masked batch is 0 (not NaN) with a finite gradient
    zero = jnp.zeros_like(mask)
    for red in expect:
        v, g = jax.value_and_grad(lambda x: objectives.get("fkl")(x, t, zero, reduction=red)[0])(s)
        assert v == 0.0 and np.all(g == 0.0)


def test_kd_temperature_tau_squared_and_label_mixing(x64):
    s, t, mask = _batch(dtype=jnp.float64)
    tau = 3.0
    kl_tau = distill.reduce(dv.forward_kl(t, s, tau), mask)
    np.testing.assert_allclose(objectives.get("kd")(s, t, mask, temperature=tau)[0], tau**2 * kl_tau, rtol=1e-12)
    np.testing.assert_allclose(objectives.get("kd")(s, t, mask, temperature=tau, tau_squared=False)[0], kl_tau,
                               rtol=1e-12)
    labels = jnp.array([[1, 4, 0], [2, 0, 0]])
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(s)), np.asarray(labels)[..., None], -1)[..., 0]
    ce = (ce * np.asarray(mask)).sum() / np.asarray(mask).sum()
    got = objectives.get("kd")(s, t, mask, temperature=tau, labels=labels, alpha=0.3)[0]
    np.testing.assert_allclose(got, 0.3 * tau**2 * kl_tau + 0.7 * ce, rtol=1e-12)


def test_kd_tau_squared_keeps_the_soft_gradient_scale_at_high_temperature(x64):
    # ∂KL_τ/∂z_s ≈ (z_s − z_t)/(Vτ²) for zero-mean logits at large τ: τ² cancels it
    k = jax.random.split(jax.random.PRNGKey(5))
    s = jax.random.normal(k[0], (1, 1, 8), jnp.float64); s = s - s.mean()
    t = jax.random.normal(k[1], (1, 1, 8), jnp.float64); t = t - t.mean()
    mask = jnp.ones((1, 1))
    g = jax.jit(jax.grad(lambda x: objectives.get("kd")(x, t, mask, temperature=200.0)[0]))(s)
    np.testing.assert_allclose(g, (s - t) / 8, rtol=2e-2, atol=1e-5)


def test_nkd_matches_its_formula(x64):
    s, t, mask = _batch(dtype=jnp.float64)
    labels = jnp.array([[1, 4, 0], [2, 0, 3]])
    gamma, tau = 1.5, 2.0
    got = objectives.get("nkd")(s, t, mask, labels=labels, gamma=gamma, temperature=tau)[0]
    sn, tn, y = np.asarray(s), np.asarray(t), np.asarray(labels)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i] == 0:
                continue
            p, q = _softmax(tn[b, i]), _softmax(sn[b, i])
            keep = np.arange(V) != y[b, i]
            ph, qh = _softmax(tn[b, i][keep] / tau), _softmax(sn[b, i][keep] / tau)
            total += -p[y[b, i]] * np.log(q[y[b, i]]) + gamma * tau**2 * -(ph * np.log(qh)).sum()
            count += 1
    np.testing.assert_allclose(got, total / count, rtol=1e-10)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------- optimum

@pytest.mark.parametrize("name,kw", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("skl", {"alpha": 0.1}),
                                     ("tvd", {})])
def test_gradient_descent_on_the_student_reaches_the_teacher(name, kw):
    t = jnp.array([[[2.0, 0.5, -1.0, 0.0, 1.0]]])
    mask = jnp.ones((1, 1))
    obj = objectives.get(name)
    grad = jax.grad(lambda x: obj(x, t, mask, **kw)[0])
    lr = 0.05 if name == "tvd" else 2.0

    @jax.jit
    def run(x):
        return jax.lax.fori_loop(0, 3000, lambda i, x: x - lr * grad(x), x)

    s = run(jnp.zeros_like(t))
    np.testing.assert_allclose(jax.nn.softmax(s), jax.nn.softmax(t), atol=2e-2 if name == "tvd" else 1e-3)


# ---------------------------------------------------------------- MiniLLM

def _toy(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    theta = (jax.random.normal(k[0], (3,), jnp.float64), jax.random.normal(k[1], (3, 3), jnp.float64))
    teacher = (jax.random.normal(k[2], (3,), jnp.float64), jax.random.normal(k[3], (3, 3), jnp.float64))
    seqs = jnp.array([(a, b) for a in range(3) for b in range(3)])
    return theta, teacher, seqs


def _seq_logits(params, seqs):
    """[9, 3, 3] logits for every 2-token sequence, plus a masked garbage third position."""
    first = jnp.broadcast_to(params[0], (seqs.shape[0], 3))
    second = params[1][seqs[:, 0]]
    return jnp.stack([first, second, 50.0 * jnp.ones_like(first)], axis=1)


def _seq_logprob(params, seqs):
    lg = jax.nn.log_softmax(_seq_logits(params, seqs)[:, :2])
    return jnp.take_along_axis(lg, seqs[..., None], -1)[..., 0].sum(-1)


def _exact_and_expected(single_step, gamma=1.0, length_norm=False):
    theta, teacher, seqs = _toy()
    tokens = jnp.concatenate([seqs, jnp.zeros((9, 1), jnp.int32)], 1)
    mask = jnp.array([[1.0, 1.0, 0.0]])

    def true_kl(th):  # sequence-level KL(q_θ ‖ p) by enumeration
        lq, lp = _seq_logprob(th, seqs), _seq_logprob(teacher, seqs)
        return jnp.sum(jnp.exp(lq) * (lq - lp))

    def expected_surrogate(th):  # Σ_y sg(q(y)) · ℓ(y)
        q = jax.lax.stop_gradient(jnp.exp(_seq_logprob(th, seqs)))
        s_lg, t_lg = _seq_logits(th, seqs), _seq_logits(teacher, seqs)

        def one(s1, t1, y1):
            return objectives.get("minillm")(s1[None], t1[None], mask, tokens=y1[None], gamma=gamma,
                                             length_norm=length_norm, single_step=single_step)[0]

        return jnp.sum(q * jax.vmap(one)(s_lg, t_lg, tokens))

    exact = jax.jit(jax.value_and_grad(true_kl))
    expected = jax.jit(jax.value_and_grad(expected_surrogate))
    (kl_value, g_exact), (mean_value, g_expected) = exact(theta), expected(theta)
    return g_exact, g_expected, kl_value, mean_value


@pytest.mark.parametrize("single_step", [False, True])
def test_minillm_expected_gradient_is_the_sequence_reverse_kl_gradient(single_step, x64):
    exact, expected, kl_value, mean_value = _exact_and_expected(single_step)
    for a, b in zip(exact, expected):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean_value, kl_value, rtol=1e-9)  # the value is an unbiased KL estimate


def test_minillm_discounting_biases_the_gradient(x64):
    exact, expected, _, _ = _exact_and_expected(False, gamma=0.5)
    assert not np.allclose(exact[0], expected[0], atol=1e-4)


def test_minillm_pg_surrogate_plain_function(x64):
    theta, teacher, seqs = _toy(1)
    lq_tok = lambda th: jnp.take_along_axis(jax.nn.log_softmax(_seq_logits(th, seqs)[:, :2]), seqs[..., None], -1)[..., 0]
    lp_tok = lq_tok(teacher)
    mask = jnp.ones((9, 2))

    def expected(th):
        q = jax.lax.stop_gradient(jnp.exp(lq_tok(th).sum(-1)))
        return jnp.sum(q * distill.minillm_pg_surrogate(lq_tok(th), lp_tok, mask))

    def true_kl(th):
        lq = lq_tok(th).sum(-1)
        return jnp.sum(jnp.exp(lq) * (lq - lp_tok.sum(-1)))

    for a, b in zip(jax.grad(true_kl)(theta), jax.grad(expected)(theta)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    # length normalization divides the cost-to-go by the remaining token count
    c = jnp.array([[1.0, 2.0, 3.0]])
    sur = lambda x: distill.minillm_pg_surrogate(x, jnp.zeros_like(x), jnp.ones_like(x), length_norm=True)[0]
    np.testing.assert_allclose(jax.grad(sur)(c)[0], [6.0 / 3, 5.0 / 2, 3.0 / 1], rtol=1e-12)


# ---------------------------------------------------------------- helpers

def test_gkd_on_policy_switch_has_probability_lambda():
    draws = distill.gkd_use_student_data(jax.random.PRNGKey(0), 0.3, (20000,))
    assert draws.dtype == jnp.bool_ and abs(float(draws.mean()) - 0.3) < 0.02
    assert not distill.gkd_use_student_data(jax.random.PRNGKey(1), 0.0, (100,)).any()
    with pytest.raises(ValueError, match="lam"):
        distill.gkd_use_student_data(jax.random.PRNGKey(0), 1.5)


def test_distillm_schedule():
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    src = jax.vmap(lambda k: distill.distillm_data_source(k, 0.8, 0, 100, True))(keys)
    # at step 0 with a full buffer: fresh student with prob φ·1 = 0.8, never replay, dataset 0.2
    np.testing.assert_allclose(np.mean(src == distill.STUDENT), 0.8, atol=0.03)
    assert np.all(src != distill.REPLAY)
    src = jax.vmap(lambda k: distill.distillm_data_source(k, 0.8, 50, 100, True))(keys)
    np.testing.assert_allclose([np.mean(src == distill.STUDENT), np.mean(src == distill.REPLAY)], [0.4, 0.4],
                               atol=0.03)
    src = jax.vmap(lambda k: distill.distillm_data_source(k, 0.8, 50, 100, False))(keys)
    np.testing.assert_allclose(np.mean(src == distill.STUDENT), 0.8, atol=0.03)
    phi, prev = distill.distillm_update_threshold(0.0, 2.0, 2.05)
    assert phi == 0.0 and prev == 2.0
    phi, prev = distill.distillm_update_threshold(0.95, 2.0, 2.2)
    assert phi == 1.0 and prev == pytest.approx(2.2)


def test_pskd_targets_and_rdrop(x64):
    np.testing.assert_allclose(distill.pskd_alpha(0, 300), 0.8 / 300)
    prev = jnp.array([[0.2, 0.5, 0.3]])
    np.testing.assert_allclose(distill.pskd_targets(jnp.array([0]), prev, 0.25), [[0.8, 0.125, 0.075]])
    a, b = _batch(dtype=jnp.float64)[:2]
    mask = jnp.ones((B, T))
    r = distill.rdrop_kl(a, b, mask)
    np.testing.assert_allclose(r, distill.rdrop_kl(b, a, mask), rtol=1e-12)
    np.testing.assert_allclose(r, 0.5 * (dv.kl(a, b) + dv.kl(b, a)).mean(), rtol=1e-12)
    ga, gb = jax.grad(lambda x, y: distill.rdrop_kl(x, y, mask), (0, 1))(a, b)
    assert np.abs(ga).sum() > 0 and np.abs(gb).sum() > 0  # both passes are trained
    check_grads(jax.jit(lambda x, y: distill.rdrop_kl(x, y, mask)), (a, b), order=1, modes=("rev",))


# ---------------------------------------------------------------- robustness and errors

@functools.lru_cache(maxsize=None)
def _jitted(name):
    def f(s, t, mask):
        fn = lambda x: _call(name, x, t, mask)[0]
        return jax.value_and_grad(fn)(s)
    return jax.jit(f)


_entry = st.sampled_from([0.0, 2.0, -3.0, 1e4, -1e4])


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(s=st.lists(_entry, min_size=2 * 2 * 4, max_size=2 * 2 * 4),
       t=st.lists(_entry, min_size=2 * 2 * 4, max_size=2 * 2 * 4),
       mask=st.lists(st.sampled_from([0.0, 1.0]), min_size=4, max_size=4))
def test_extreme_logits_padding_and_all_masked_rows_are_finite(s, t, mask):
    pad = jnp.arange(4) == 3  # last vocabulary entry is padding in both models
    s = jnp.where(pad, -jnp.inf, jnp.array(s, jnp.float32).reshape(2, 2, 4))
    t = jnp.where(pad, -jnp.inf, jnp.array(t, jnp.float32).reshape(2, 2, 4))
    mask = jnp.array(mask).reshape(2, 2).at[1].set(0.0)  # row 1 is all masked
    for name in NAMES:
        v, g = _jitted(name)(s, t, mask)
        assert np.isfinite(v), name
        assert np.all(np.isfinite(g)), name
        np.testing.assert_array_equal(g[1], 0.0)


@pytest.mark.parametrize("call,arg", [
    (lambda s, t, m: objectives.get("fkl")(s, t[..., :4], m), "teacher_logits"),
    (lambda s, t, m: objectives.get("fkl")(s, t, m[:, :2]), "mask"),
    (lambda s, t, m: objectives.get("fkl")(s[0], t[0], m), "student_logits"),
    (lambda s, t, m: objectives.get("fkl")(s, t, m, reduction="mean"), "reduction"),
    (lambda s, t, m: objectives.get("jsd")(s, t, m, beta=-0.1), "beta"),
    (lambda s, t, m: objectives.get("skl")(s, t, m, alpha=1.1), "alpha"),
    (lambda s, t, m: objectives.get("akl")(s, t, m, mu=0.0), "mu"),
    (lambda s, t, m: objectives.get("kd")(s, t, m, temperature=0.0), "temperature"),
    (lambda s, t, m: objectives.get("kd")(s, t, m, labels=jnp.zeros((2,), jnp.int32)), "labels"),
    (lambda s, t, m: objectives.get("minillm")(s, t, m), "tokens"),
    (lambda s, t, m: objectives.get("minillm")(s, t, m, tokens=jnp.zeros((B, T), jnp.int32), gamma=2.0), "gamma"),
])
def test_bad_input_raises_naming_the_argument(call, arg):
    s, t, m = _batch()
    with pytest.raises(ValueError, match=arg):
        call(s, t, m)
