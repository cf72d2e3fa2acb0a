"""Preference objectives: DPO / IPO / H-DPO optima on an enumerated bandit, gradients, DPKD."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kljax import objectives


def _batch(seed=0, dtype=jnp.float32, n=4):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    names = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")
    return {nm: -jnp.abs(jax.random.normal(kk, (n,), dtype)) * 3 for nm, kk in zip(names, k)}


def test_names_registered():
    assert objectives.names("preference") == ["dpkd", "dpo", "h_dpo", "ipo"]


@pytest.mark.parametrize("name", ["dpo", "ipo", "h_dpo"])
def test_check_grads_and_reference_gets_no_gradient(name, x64):
    batch = _batch(dtype=jnp.float64)
    kw = {"alpha": 0.7} if name == "h_dpo" else {}

    def loss(c, r, rc, rr):
        return objectives.get(name)({"chosen_logp": c, "rejected_logp": r, "ref_chosen_logp": rc,
                                     "ref_rejected_logp": rr}, beta=0.5, **kw)[0]

    args = tuple(batch[k] for k in ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp"))
    check_grads(jax.jit(lambda c, r: loss(c, r, *args[2:])), args[:2], order=1, modes=("rev",))
    g = jax.grad(loss, (2, 3))(*args)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)


def test_dpo_value_gradient_and_metrics_closed_form(x64):
    b = _batch(dtype=jnp.float64)
    beta = 0.3
    c = np.asarray(b["chosen_logp"] - b["ref_chosen_logp"])
    r = np.asarray(b["rejected_logp"] - b["ref_rejected_logp"])
    h = c - r
    loss, m = objectives.get("dpo")(b, beta=beta)
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-beta * h))), rtol=1e-12)
    g = jax.grad(lambda x: objectives.get("dpo")({**b, "chosen_logp": x}, beta=beta)[0])(b["chosen_logp"])
    np.testing.assert_allclose(g, -beta / (1 + np.exp(beta * h)) / len(h), rtol=1e-10)  # −β σ(−βh)/B
    np.testing.assert_allclose(m["rewards/chosen"], beta * c.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/rejected"], beta * r.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/margins"], beta * h.mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rewards/accuracies"], np.mean(h > 0), rtol=1e-12)
    # label smoothing ε: −(1−ε) log σ(βh) − ε log σ(−βh)
    ls = objectives.get("dpo")(b, beta=beta, label_smoothing=0.2)[0]
    np.testing.assert_allclose(ls, np.mean(0.8 * np.log1p(np.exp(-beta * h)) + 0.2 * np.log1p(np.exp(beta * h))),
                               rtol=1e-12)


def test_h_dpo_with_alpha_one_is_dpo():
    b = _batch()
    np.testing.assert_allclose(objectives.get("h_dpo")(b, beta=0.2, alpha=1.0)[0], objectives.get("dpo")(b, beta=0.2)[0])


def test_per_token_inputs_equal_summed_sequence_inputs(x64):
    k = jax.random.split(jax.random.PRNGKey(3), 6)
    tok = {n: -jnp.abs(jax.random.normal(kk, (3, 5), jnp.float64)) for n, kk in
           zip(("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp"), k)}
    cm = (jnp.arange(5) < jnp.array([[5], [2], [3]])).astype(jnp.float64)
    rm = (jnp.arange(5) < jnp.array([[1], [4], [5]])).astype(jnp.float64)
    seq = {n: jnp.sum(v * (cm if "chosen" in n else rm), -1) for n, v in tok.items()}
    for name in ("dpo", "ipo", "h_dpo"):
        np.testing.assert_allclose(objectives.get(name)({**tok, "chosen_mask": cm, "rejected_mask": rm})[0],
                                   objectives.get(name)(seq)[0], rtol=1e-12)
    # average_log_prob divides each side by its token count
    avg = {n: v / jnp.sum(cm if "chosen" in n else rm, -1) for n, v in seq.items()}
    np.testing.assert_allclose(
        objectives.get("ipo")({**tok, "chosen_mask": cm, "rejected_mask": rm}, average_log_prob=True)[0],
        objectives.get("ipo")(avg)[0], rtol=1e-12)


# ---------------------------------------------------------------- enumerated bandit optima

K = 3
R = jnp.array([1.0, 0.0, -0.5])
REF_LOGITS = jnp.array([0.3, -0.2, 0.1])


def _population_loss(name, theta, beta, **kw):
    """Expected loss over all ordered pairs (i, j), i preferred with Bradley–Terry probability σ(r_i − r_j)."""
    logpi, logref = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
    i, j = np.triu_indices(K, 1)
    i, j = jnp.asarray(i), jnp.asarray(j)
    pref = jax.nn.sigmoid(R[i] - R[j])
    fwd = {"chosen_logp": logpi[i], "rejected_logp": logpi[j], "ref_chosen_logp": logref[i], "ref_rejected_logp": logref[j]}
    bwd = {"chosen_logp": logpi[j], "rejected_logp": logpi[i], "ref_chosen_logp": logref[j], "ref_rejected_logp": logref[i]}
    obj = objectives.get(name)
    per_pair = lambda b: jax.vmap(lambda *x: obj(dict(zip(b, x)), beta=beta, **kw)[0])(*[v[:, None] for v in b.values()])
    return jnp.sum(pref * per_pair(fwd) + (1 - pref) * per_pair(bwd))


def _minimize(name, beta, steps=4000, lr=1.0, **kw):
    grad = jax.grad(lambda th: _population_loss(name, th, beta, **kw))
    return jax.jit(lambda th: jax.lax.fori_loop(0, steps, lambda _, th: th - lr * grad(th), th))(jnp.zeros(K))


def test_dpo_optimum_is_the_kl_regularized_policy_and_recovers_reward_differences(x64):
    beta = 0.5
    pi = jax.nn.softmax(_minimize("dpo", beta))
    target = jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + R / beta)  # π* ∝ π_ref e^{r/β}
    np.testing.assert_allclose(pi, target, atol=1e-4)
    implicit = beta * (jnp.log(pi) - jax.nn.log_softmax(REF_LOGITS))
    np.testing.assert_allclose(implicit - implicit[0], R - R[0], atol=1e-3)  # preference log-odds


def test_h_dpo_optimum_is_the_sharpened_policy(x64):
    beta, alpha = 0.5, 0.6
    pi = jax.nn.softmax(_minimize("h_dpo", beta, alpha=alpha))
    target = jax.nn.softmax((jax.nn.log_softmax(REF_LOGITS) + R / beta) / alpha)  # (π_ref e^{r/β})^{1/α}
    np.testing.assert_allclose(pi, target, atol=1e-4)
    dpo_pi = jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + R / beta)
    ent = lambda p: -jnp.sum(p * jnp.log(p))
    assert ent(pi) < ent(dpo_pi)


def test_ipo_population_optimum_on_one_pair(x64):
    beta, p = 0.5, 0.8
    grad = jax.grad(lambda h: p * objectives.get("ipo")(_h(h), beta=beta)[0]
                    + (1 - p) * objectives.get("ipo")(_h(-h), beta=beta)[0])
    h = jax.lax.fori_loop(0, 500, lambda _, h: h - 0.1 * grad(h), jnp.zeros(1))
    np.testing.assert_allclose(h, (p - 0.5) / beta, rtol=1e-6)


def _h(h):
    z = jnp.zeros_like(h)
    return {"chosen_logp": h, "rejected_logp": z, "ref_chosen_logp": z, "ref_rejected_logp": z}


# ---------------------------------------------------------------- DPKD

def _dpkd_batch(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    return {"student_logits": jax.random.normal(k[0], (2, 3, 5), dtype) * 2,
            "teacher_logits": jax.random.normal(k[1], (2, 3, 5), dtype) * 2,
            "mask": jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype)}


def test_dpkd_value_and_gradients(x64):
    b = _dpkd_batch(jnp.float64)
    beta = 0.4
    s, t, m = (np.asarray(b[k]) for k in ("student_logits", "teacher_logits", "mask"))
    ls = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
    lq, lp = ls(s), ls(t)
    yw, yl = t.argmax(-1)[..., None], s.argmax(-1)[..., None]
    pick = lambda x, y: np.take_along_axis(x, y, -1)[..., 0]
    h = (pick(lq, yw) - pick(lq, yl)) - (pick(lp, yw) - pick(lp, yl))
    expect = (np.log1p(np.exp(-beta * h)) * m).sum() / m.sum()
    loss, metrics = objectives.get("dpkd")(b, beta=beta)
    np.testing.assert_allclose(loss, expect, rtol=1e-10)
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    f = lambda x: objectives.get("dpkd")({**b, "student_logits": x}, beta=beta)[0]
    check_grads(jax.jit(f), (b["student_logits"],), order=1, modes=("rev",))
    gt = jax.grad(lambda x: objectives.get("dpkd")({**b, "teacher_logits": x}, beta=beta)[0])(b["teacher_logits"])
    np.testing.assert_array_equal(gt, 0.0)
    # agreeing argmaxes: h = 0, loss log 2, no gradient
    same = {**b, "student_logits": b["teacher_logits"]}
    np.testing.assert_allclose(objectives.get("dpkd")(same)[0], np.log(2), rtol=1e-12)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,exc,arg", [
    (lambda b: objectives.get("dpo")(b, beta=0.0), ValueError, "beta"),
    (lambda b: objectives.get("dpo")(b, label_smoothing=0.7), ValueError, "label_smoothing"),
    (lambda b: objectives.get("h_dpo")(b, alpha=-1.0), ValueError, "alpha"),
    (lambda b: objectives.get("dpo")({k: v for k, v in b.items() if k != "ref_chosen_logp"}), KeyError,
     "ref_chosen_logp"),
    (lambda b: objectives.get("dpo")({**b, "chosen_logp": b["chosen_logp"][:2]}), ValueError, "chosen_logp"),
    (lambda b: objectives.get("dpo")({k: v[:, None] for k, v in b.items()}), KeyError, "chosen_mask"),
    (lambda b: objectives.get("dpkd")(b), KeyError, "student_logits"),
])
def test_bad_input_raises_naming_the_argument(call, exc, arg):
    with pytest.raises(exc, match=arg):
        call(_batch())
