"""Exact expected gradients by enumeration: the table of reference/policy_gradient.md §1.2, RPG,
the PPO family at w = 1, Tang & Munos' sequence-level point, and the optima.

A surrogate passes when Σ_y P(y)·∇loss(y) equals −∇J of the objective its docstring names,
with J computed exactly (sums over all outcomes) and differentiated by jax.grad.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enumerate_utils import (all_sequences, bandit_expected_grad, kl, log_softmax,
                             seq_expected_grad, seq_logprob_table, seq_token_logp)
from kljax import objectives

THETA = np.array([0.3, -0.2, 0.5, 0.1])
REF = np.array([-0.4, 0.2, 0.1, 0.6])
OLD = np.array([0.1, 0.4, -0.3, 0.2])     # w = π_θ/π_old in [0.62, 1.63]: clearly off-policy
NEAR_OLD = THETA + np.array([0.05, -0.04, 0.03, -0.06])  # w within (0.9, 1.1)
TEACHER = np.array([0.7, -0.5, 0.0, 0.2])
R = np.array([1.0, 0.0, 0.5, 0.2])


def _arr(x):
    return jnp.asarray(x, jnp.float64)


def _kl_rev(th):
    return kl(log_softmax(th), log_softmax(_arr(REF)))


def _kl_fwd(th):
    return kl(log_softmax(_arr(REF)), log_softmax(th))


def _verdict(g, th):
    rev, fwd = jax.grad(_kl_rev)(th), jax.grad(_kl_fwd)(th)
    close = lambda a, b: bool(jnp.allclose(a, b, atol=1e-10, rtol=1e-8))
    if close(g, 0 * g):
        return "zero"
    if close(g, rev):
        return "reverse"
    if close(g, fwd):
        return "forward"
    return "neither"


# (estimator, placement, sampling, importance_weight) -> the KL its expected gradient follows.
# Sampling "off" draws from π_old ≠ π_θ. With kl_in="reward" the weight is REINFORCE's
# policy-gradient weight (none: −A log π; differentiable: −w A; stop_gradient: −SG(w) A log π).
TABLE = {
    ("k1", "loss", "on", "none"): "zero",
    ("k2", "loss", "on", "none"): "reverse",
    ("k3", "loss", "on", "none"): "forward",
    ("exact", "loss", "on", "none"): "reverse",
    ("k1", "reward", "on", "none"): "reverse",
    ("k2", "reward", "on", "none"): "neither",
    ("k3", "reward", "on", "none"): "neither",
    ("exact", "reward", "on", "none"): "zero",
    ("k1", "loss", "off", "none"): "neither",
    ("k1", "loss", "off", "differentiable"): "reverse",
    ("k1", "loss", "off", "stop_gradient"): "zero",
    ("k2", "loss", "off", "none"): "neither",
    ("k2", "loss", "off", "differentiable"): "neither",
    ("k2", "loss", "off", "stop_gradient"): "reverse",
    ("k3", "loss", "off", "none"): "neither",
    ("k3", "loss", "off", "differentiable"): "reverse",
    ("k3", "loss", "off", "stop_gradient"): "forward",
    ("exact", "loss", "off", "none"): "reverse",
    ("k1", "reward", "off", "none"): "neither",
    ("k1", "reward", "off", "differentiable"): "reverse",
    ("k1", "reward", "off", "stop_gradient"): "reverse",
    ("k2", "reward", "off", "differentiable"): "neither",
    ("k3", "reward", "off", "differentiable"): "neither",
}


def _kl_only_grad(est, place, sampling, weight):
    th = _arr(THETA)
    return bandit_expected_grad(
        objectives.get("reinforce"), th, old_logp=None if sampling == "on" else log_softmax(_arr(OLD)),
        ref_logits=_arr(REF), adv=jnp.zeros(4, jnp.float64), beta=1.0, kl_estimator=est,
        kl_in=place, importance_weight=weight), th


@pytest.mark.parametrize("combo", sorted(TABLE), ids=lambda c: "-".join(c))
def test_kl_gradient_table(x64, combo):
    g, th = _kl_only_grad(*combo)
    assert _verdict(g, th) == TABLE[combo]


def test_in_reward_k2_k3_biases_match_sheet(x64):
    """k3 in reward: ∇KL_rev − ∇KL_fwd; k2 in reward: E[½L²∇ℓ] = ∇E[k2] − ∇KL_rev (§1.2)."""
    g3, th = _kl_only_grad("k3", "reward", "on", "none")
    np.testing.assert_allclose(g3, jax.grad(_kl_rev)(th) - jax.grad(_kl_fwd)(th), atol=1e-12)
    g2, _ = _kl_only_grad("k2", "reward", "on", "none")

    def mean_k2(t):
        lp, lr = log_softmax(t), log_softmax(_arr(REF))
        return jnp.sum(jnp.exp(lp) * 0.5 * (lp - lr) ** 2)

    np.testing.assert_allclose(g2, jax.grad(mean_k2)(th) - jax.grad(_kl_rev)(th), atol=1e-12)


def test_ppo_ratio_corrects_kl_reward_off_policy(x64):
    """PPO's differentiable ratio carries the k1 reward: reverse KL also off-policy (unclipped)."""
    th = _arr(THETA)
    g = bandit_expected_grad(objectives.get("ppo"), th, old_logp=log_softmax(_arr(OLD)),
                             ref_logits=_arr(REF), adv=jnp.zeros(4, jnp.float64), beta=1.0,
                             clip_eps_low=None)
    assert _verdict(g, th) == "reverse"


# ----------------------------------------------------------------------------- RPG -----

def _ukl(logp, logq):
    """UKL(p‖q) = Σ p log(p/q) + Σ (q − p) (RPG App. D)."""
    return kl(logp, logq) + jnp.sum(jnp.exp(logq) - jnp.exp(logp))


def _rpg_objective(kind, beta, old_lp):
    def j(th):
        lp = log_softmax(th)
        reward = jnp.sum(jnp.exp(lp) * _arr(R))
        reg = {"fkl": kl(old_lp, lp), "rkl": kl(lp, old_lp),
               "ufkl": _ukl(old_lp, lp), "urkl": _ukl(lp, old_lp)}[kind]
        return reward - beta * reg
    return j


@pytest.mark.parametrize("style", ["", "rf_"])
@pytest.mark.parametrize("kind", ["fkl", "rkl", "ufkl", "urkl"])
def test_rpg_expected_gradient(x64, kind, style):
    """RPG Tables 1/2: E_old[∇L] = −∇J with w ≠ 1 (off-policy) and a baseline inside A."""
    th, old_lp, beta = _arr(THETA), log_softmax(_arr(OLD)), 0.7
    g = bandit_expected_grad(objectives.get(f"rpg_{style}{kind}"), th, old_logp=old_lp,
                             ref_logits=_arr(REF), adv=_arr(R) - 0.3, beta=beta)
    np.testing.assert_allclose(g, -jax.grad(_rpg_objective(kind, beta, old_lp))(th), atol=1e-10)


@pytest.mark.parametrize("name", ["rpg_urkl", "rpg_rf_urkl", "rpg_rf_fkl"])
def test_rpg_clipped_inside_trust_region_keeps_gradient(x64, name):
    th, old_lp, beta = _arr(THETA), log_softmax(_arr(NEAR_OLD)), 0.7
    kind = name.split("_")[-1]
    g = bandit_expected_grad(objectives.get(name), th, old_logp=old_lp, ref_logits=_arr(REF),
                             adv=_arr(R) - 0.3, beta=beta, clip_eps_low=0.2,
                             clip_eps_high=0.28, clip_c=3.0)
    np.testing.assert_allclose(g, -jax.grad(_rpg_objective(kind, beta, old_lp))(th), atol=1e-10)


def test_rpg_rf_clip_freezes_outside_trust_region(x64):
    """Algorithm 2: weight ≥ 0 and w ≥ 1+ε_high → value kept, gradient zero."""
    f = objectives.get("rpg_rf_urkl")
    batch = lambda lp: {"logp": lp, "old_logp": jnp.full((1, 1), -2.0), "mask": jnp.ones((1, 1)),
                        "advantages": jnp.ones((1,))}
    g = jax.grad(lambda lp: f(batch(lp), beta=1e-3, clip_eps_low=0.2, clip_eps_high=0.28)[0])(
        jnp.full((1, 1), -1.0))  # w = e ≈ 2.7
    assert float(g[0, 0]) == 0.0
    g_in = jax.grad(lambda lp: f(batch(lp), beta=1e-3, clip_eps_low=0.2, clip_eps_high=0.28)[0])(
        jnp.full((1, 1), -1.9))  # w ≈ 1.1
    assert float(g_in[0, 0]) < 0.0


# ------------------------------------------------------- the other objectives at w = 1 -----

def _j_reward_minus(beta, reg):
    def j(th):
        return jnp.sum(jax.nn.softmax(th) * _arr(R)) - beta * reg(th)
    return j


_TEACH_REV = lambda th: kl(log_softmax(th), log_softmax(_arr(TEACHER)))
_TEACH_FWD = lambda th: kl(log_softmax(_arr(TEACHER)), log_softmax(th))
_NONE = lambda th: 0.0

# name, hparams, regularizer of J (β = 0.3), on-policy
ON_POLICY_CASES = [
    ("reinforce", dict(beta=0.3), _kl_rev),
    ("rloo", dict(beta=0.3), _kl_rev),
    ("ppo", dict(beta=0.3), _kl_rev),
    ("ppo", dict(beta=0.3, clip_c=3.0, kl_in="loss", kl_estimator="k2"), _kl_rev),
    ("grpo", dict(beta=0.3), _kl_fwd),
    ("grpo", dict(beta=0.3, importance_weight="differentiable"), _kl_rev),
    ("grpo", dict(beta=0.3, kl_estimator="exact"), _kl_rev),
    ("dr_grpo", dict(), _NONE),
    ("dapo", dict(), _NONE),
    ("reinforce_pp", dict(beta=0.3, normalize=False), _kl_rev),
    ("kdrl", dict(kd_coef=0.3), _TEACH_REV),
    ("kdrl", dict(kd_coef=0.3, kd_estimator="k3"), _TEACH_FWD),
    ("rapo", dict(alpha=0.3), _kl_fwd),
    ("pmd_mean", dict(tau=0.3), _NONE),
]


@pytest.mark.parametrize("case", ON_POLICY_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}")
def test_objective_expected_gradient_on_policy(x64, case):
    name, hp, reg = case
    th = _arr(THETA)
    g = bandit_expected_grad(objectives.get(name), th, ref_logits=_arr(REF), adv=_arr(R),
                             teacher_logp=log_softmax(_arr(TEACHER)), **hp)
    np.testing.assert_allclose(g, -jax.grad(_j_reward_minus(0.3, reg))(th), atol=1e-10)


def test_rapo_forward_kl_off_policy(x64):
    """RAPO's SG(w)·k3 follows ∇KL(π_ref‖π_θ) also when sampling from π_old (w ≠ 1)."""
    th = _arr(THETA)
    g = bandit_expected_grad(objectives.get("rapo"), th, old_logp=log_softmax(_arr(OLD)),
                             ref_logits=_arr(REF), adv=_arr(R), alpha=0.3, clip_eps_low=None)
    np.testing.assert_allclose(g, -jax.grad(_j_reward_minus(0.3, _kl_fwd))(th), atol=1e-10)


def test_rapo_sheet_estimator_is_not_forward_kl(x64):
    """§7.2's ρ log ρ − ρ + 1 as a loss: E_π[∇] = −Σ π_ref log ρ ∇log π ≠ ∇KL_fwd (so not used)."""
    th = _arr(THETA)
    ref_lp = log_softmax(_arr(REF))

    def expected(t):
        lp = log_softmax(t)
        p = jax.lax.stop_gradient(jnp.exp(lp))
        log_rho = ref_lp - lp
        return jnp.sum(p * (jnp.exp(log_rho) * log_rho - jnp.exp(log_rho) + 1))

    g = jax.grad(expected)(th)
    assert _verdict(g, th) == "neither"


# ------------------------------------------- sequence level (Tang & Munos 2025) -----

def _seq_setup():
    v = 3
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = (jax.random.normal(k1, (v,), jnp.float64), jax.random.normal(k2, (v, v), jnp.float64))
    ref = (jax.random.normal(k3, (v,), jnp.float64), jax.random.normal(k4, (v, v), jnp.float64))
    seqs = all_sequences(v)
    rewards = jnp.asarray(np.linspace(0.0, 1.0, seqs.shape[0])[::-1].copy())
    return params, ref, seqs, rewards


def _seq_objective(ref, seqs, rewards, beta):
    def j(p):
        lp = seq_logprob_table(p, seqs)
        lref = seq_logprob_table(ref, seqs)
        return jnp.sum(jnp.exp(lp) * rewards) - beta * kl(lp, lref)
    return j


def test_sequence_kl_reward_to_go_gives_sequence_kl_gradient(x64):
    params, ref, seqs, rewards = _seq_setup()
    g = seq_expected_grad(objectives.get("reinforce"), params, ref, seqs, rewards, beta=0.5,
                          kl_estimator="k1", kl_in="reward")
    want = jax.grad(_seq_objective(ref, seqs, rewards, 0.5))(params)
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, -b, atol=1e-10)


def test_per_token_k2_loss_is_only_partial_sequence_gradient(x64):
    """Per-token k2 loss drops ∇log π(y1)·L(y2|y1): it misses the sequence KL gradient."""
    params, ref, seqs, rewards = _seq_setup()
    g = seq_expected_grad(objectives.get("reinforce"), params, ref, seqs, rewards, beta=0.5,
                          kl_estimator="k2", kl_in="loss")
    want = jax.grad(_seq_objective(ref, seqs, rewards, 0.5))(params)
    # the second-token table still gets its exact conditional gradient ...
    np.testing.assert_allclose(g[1], -want[1], atol=1e-10)
    # ... but the first token's gradient lacks the future KL
    assert float(jnp.max(jnp.abs(g[0] + want[0]))) > 1e-3


# ----------------------------------------------------------------------- optima -----

BETA_OPT = 0.5


def _descend(grad_fn, steps=1500, lr=1.0):
    th0 = jnp.zeros(4, jnp.float64)
    return jax.jit(lambda t: jax.lax.fori_loop(0, steps, lambda i, t: t - lr * grad_fn(t), t))(th0)


def _tilt():
    t = log_softmax(_arr(REF)) + _arr(R) / BETA_OPT
    return jax.nn.softmax(t)


REVERSE_REGULARIZED = [
    ("reinforce", dict(beta=BETA_OPT)),
    ("reinforce", dict(beta=BETA_OPT, kl_in="loss", kl_estimator="k2")),
    ("ppo", dict(beta=BETA_OPT)),
    ("grpo", dict(beta=BETA_OPT, importance_weight="differentiable")),
    ("reinforce_pp", dict(beta=BETA_OPT, normalize=False)),
]


@pytest.mark.parametrize("case", REVERSE_REGULARIZED, ids=lambda c: f"{c[0]}-{len(c[1])}")
def test_reverse_kl_surrogates_reach_tilted_optimum(x64, case):
    name, hp = case
    fn = lambda t: bandit_expected_grad(objectives.get(name), t, ref_logits=_arr(REF),
                                        adv=_arr(R), **hp)
    np.testing.assert_allclose(jax.nn.softmax(_descend(fn)), _tilt(), atol=1e-6)


@pytest.mark.parametrize("case", [("grpo", dict(beta=BETA_OPT)), ("rapo", dict(alpha=BETA_OPT))],
                         ids=lambda c: c[0])
def test_forward_kl_surrogates_reach_forward_optimum(x64, case):
    name, hp = case
    fn = lambda t: bandit_expected_grad(objectives.get(name), t, ref_logits=_arr(REF),
                                        adv=_arr(R), **hp)
    pi = jax.nn.softmax(_descend(fn))
    # own optimum of E[r] − β KL(π_ref‖π), solved by ascent on the exact objective
    j = _j_reward_minus(BETA_OPT, _kl_fwd)
    target = jax.nn.softmax(_descend(lambda t: -jax.grad(j)(t), steps=3000))
    np.testing.assert_allclose(pi, target, atol=1e-6)
    # stationarity: π_y(r_y − E_π r) + β(π_ref,y − π_y) = 0 — and it is not the tilt
    resid = pi * (_arr(R) - jnp.sum(pi * _arr(R))) + BETA_OPT * (jax.nn.softmax(_arr(REF)) - pi)
    np.testing.assert_allclose(resid, 0.0, atol=1e-6)
    assert float(jnp.max(jnp.abs(pi - _tilt()))) > 1e-2


PMD_OLD = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
PMD_R = np.array([0.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("kind,want", [
    ("mean", [0.159841, 0.570179, 0.079921, 0.190060]),
    ("partition", [0.112498, 0.623440, 0.056249, 0.207813]),
])
def test_pmd_mean_population_solution(x64, kind, want):
    """§5.2: PMD-mean's population minimizer is the Lambert-W policy; PMD-partition's the tilt."""
    tau, old = 0.5, _arr(PMD_OLD)
    r = _arr(PMD_R)
    rbar = jnp.sum(jnp.exp(old) * r)
    base = rbar if kind == "mean" else tau * jax.nn.logsumexp(old + r / tau)
    fn = lambda t: bandit_expected_grad(objectives.get("pmd_mean"), t, old_logp=old,
                                        ref_logits=old, adv=r - base, tau=tau)
    th = jax.jit(lambda t: jax.lax.fori_loop(0, 4000, lambda i, t: t - 2.0 * fn(t), t))(old)
    np.testing.assert_allclose(jax.nn.softmax(th), want, atol=2e-6)


def test_apo_least_squares_reaches_tilt(x64):
    """A*-PO: with V* = β log E_ref e^{r/β}, the regression's minimizer is π_ref e^{r/β}/Z."""
    ref_lp = log_softmax(_arr(REF))
    v_star = BETA_OPT * jax.nn.logsumexp(ref_lp + _arr(R) / BETA_OPT)
    uniform = jnp.full(4, -jnp.log(4.0), jnp.float64)  # any full-support sampling law works
    fn = lambda t: bandit_expected_grad(objectives.get("apo"), t, old_logp=uniform,
                                        ref_logits=_arr(REF), adv=_arr(R) - v_star, beta=BETA_OPT)
    np.testing.assert_allclose(jax.nn.softmax(_descend(fn, steps=3000)), _tilt(), atol=1e-6)
