"""Tests for kljax.objectives.value: Q♯ guidance, critic losses, CD, Munchausen/MDVI, DeRa.

Expected values come from independent NumPy (float64) brute force over every sequence or state,
or from the closed forms in reference/value_based.md, never from the code under test.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from kljax import objectives
from kljax.objectives import value as V


def np_logsumexp(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log(p):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, np.float64))


def np_qstar_bernoulli(p, eta):
    """η·log(1 − p + p·e^{1/η}) in float64, straight from the Q♯ formula."""
    return eta * np.logaddexp(np_log(p) + 1.0 / eta, np_log(1.0 - p))


def np_qstar(probs, values, eta):
    """η·log Σ_i p_i·exp(z_i/η) in float64 (p renormalized: a 1e-7 mass error costs η·1e-7)."""
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(-1, keepdims=True)
    return eta * np_logsumexp(np_log(probs) + np.asarray(values) / eta)


# --------------------------------------------------------------------------------------------
# 1. Finite-difference gradients (float64)
# --------------------------------------------------------------------------------------------

def _loss_batch(rng, vocab=4, atoms=None):
    b, t = 2, 3
    shape = (b, t, vocab) if atoms is None else (b, t, vocab, atoms)
    logits = jnp.asarray(rng.normal(size=shape))
    tokens = jnp.asarray(rng.integers(0, vocab, size=(b, t)))
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logits, tokens, mask


def test_check_grads_qsharp_bce(x64):
    rng = np.random.default_rng(0)
    logits, tokens, mask = _loss_batch(rng)
    for returns in (jnp.asarray([1.0, 0.0]), jnp.asarray(rng.uniform(size=(2, 3)))):
        check_grads(lambda c: V.qsharp_bce(c, tokens, returns, mask)[0], (logits,), order=2,
                    modes=["rev"])


def test_check_grads_qsharp_histogram(x64):
    rng = np.random.default_rng(1)
    logits, tokens, mask = _loss_batch(rng, atoms=5)
    atoms = jnp.linspace(0.0, 1.0, 5)
    returns = jnp.asarray([[0.3, 0.75, 1.0], [0.0, 0.1, 0.5]])  # between atoms and on atoms
    for proj in V.PROJECTIONS:
        check_grads(lambda c: V.qsharp_histogram(c, tokens, returns, mask, atoms=atoms,
                                                 projection=proj)[0],
                    (logits,), order=2, modes=["rev"])


@pytest.mark.parametrize("eta", [0.01, 0.4, 3.0, 100.0])
def test_check_grads_qstar(x64, eta):
    rng = np.random.default_rng(2)
    l = jnp.asarray(rng.normal(size=(4,)) * 3)
    order = 2 if eta == 0.4 else 1  # second order once; first order across both branches
    check_grads(lambda x: V.qstar_bernoulli(x, eta), (l,), order=order, modes=["rev"])
    check_grads(lambda e: V.qstar_bernoulli(l, e), (jnp.asarray(eta),), order=1, modes=["rev"])
    h = jnp.asarray(rng.normal(size=(3, 4)))
    atoms = jnp.asarray([-0.5, 0.0, 0.4, 1.0])
    check_grads(lambda x: V.qstar_histogram(x, atoms, eta), (h,), order=order, modes=["rev"])
    ref = jnp.asarray(rng.normal(size=(3, 4)))
    guide_atoms = jnp.asarray([0.0, 0.5, 1.0, 2.0])
    check_grads(lambda x: V.qsharp_logits(ref, x, eta, "histogram", atoms=guide_atoms),
                (jnp.asarray(rng.normal(size=(3, 4, 4))),), order=1, modes=["rev"])


def test_check_grads_munchausen_and_mdvi(x64):
    rng = np.random.default_rng(3)
    q_tm1 = jnp.asarray(rng.normal(size=(5, 3)))
    q_t = jnp.asarray(rng.normal(size=(5, 3)))
    a = jnp.asarray(rng.integers(0, 3, size=(5,)))
    r = jnp.asarray(rng.normal(size=(5,)))
    disc = jnp.full((5,), 0.9)
    # clip_min far below any τ·log π here, so the target is smooth at this point
    f = lambda x, y: V.munchausen_target(x, a, r, disc, y, tau=0.5, alpha=0.9, clip_min=-50.0)
    check_grads(f, (q_tm1, q_t), order=2, modes=["rev"])
    prev = jnp.asarray(rng.normal(size=(5, 3)))
    g = lambda q, p: V.mdvi_target(r, disc, q, p, lam=0.3, tau=0.2)
    check_grads(g, (q_t, prev), order=2, modes=["rev"])


# --------------------------------------------------------------------------------------------
# 2. The tree MDP of Q♯ §4.1 (reference/value_based.md §1.3)
# --------------------------------------------------------------------------------------------
# Token 0 = left / "good leaf", token 1 = right / "bad leaf". Left subtree: reward 0.1 whatever
# is played next. Right subtree: π_ref plays the reward-1 leaf w.p. 0.05, the reward-0 leaf w.p. 0.95.

P_L, P_R = 0.6, 0.4
TREE_ATOMS = jnp.asarray([0.0, 0.1, 1.0])
TREE_REF = np.log(np.array([[P_L, P_R], [0.5, 0.5], [0.05, 0.95]]))  # root, left node, right node
TREE_LEAF_REWARD = {(0, 0): 0.1, (0, 1): 0.1, (1, 0): 1.0, (1, 1): 0.0}


def _tree_histogram_critic():
    """Reward-to-go distribution of π_ref on atoms {0, 0.1, 1} after each (node, token)."""
    p = np.zeros((3, 2, 3))
    p[0, 0] = [0, 1, 0]           # left: 0.1 surely
    p[0, 1] = [0.95, 0, 0.05]     # right: Bernoulli(0.05)
    p[1, :] = [0, 1, 0]
    p[2, 0] = [0, 0, 1]
    p[2, 1] = [1, 0, 0]
    return jnp.asarray(np_log(p), jnp.float32)


TREE_CD_CRITIC = jnp.asarray([[0.1, 0.05], [0.1, 0.1], [1.0, 0.0]])  # Q^{π_ref} = E[Z]


def _tree_policy(logits):
    """Sequence probabilities {(y1, y2): prob} and the expected reward, from per-node logits."""
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    probs = {}
    for y1, y2 in itertools.product(range(2), range(2)):
        probs[(y1, y2)] = np.exp(logp[0, y1] + logp[1 + y1, y2])
    reward = sum(probs[k] * TREE_LEAF_REWARD[k] for k in probs)
    return probs, reward, logp


def _tree_guided(eta):
    ref = jnp.asarray(TREE_REF, jnp.float32)
    qs = V.qsharp_logits(ref, _tree_histogram_critic(), eta, "histogram", atoms=TREE_ATOMS)
    cd = V.qsharp_logits(ref, TREE_CD_CRITIC, eta, "cd")
    return _tree_policy(qs), _tree_policy(cd)


def test_tree_mdp_qstar_values_match_section_1_3():
    h = _tree_histogram_critic()
    for eta in (0.05, 0.1, 1.0, 10.0):
        q = np.asarray(V.qstar_histogram(h[0], TREE_ATOMS, eta))
        want_r = eta * np.log(0.05 * np.exp(1.0 / eta) + 0.95)  # Q⋆,η(R) of Thm 4.1
        np.testing.assert_allclose(q, [0.1, want_r], rtol=1e-5)
        # the right subtree is a Bernoulli(0.05) return: the Bernoulli form must agree
        np.testing.assert_allclose(V.qstar_bernoulli(jnp.log(0.05 / 0.95), eta), want_r, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.03, 0.05, 0.1])
def test_tree_mdp_qsharp_beats_cd_at_small_eta(eta):
    (_, qs_reward, _), (_, cd_reward, _) = _tree_guided(eta)
    assert qs_reward > cd_reward + 0.5


@pytest.mark.parametrize("eta", [0.002, 0.01])
def test_tree_mdp_small_eta_limits_theorems_4_1_and_4_2(eta):
    (_, qs_reward, qs_logp), (_, cd_reward, cd_logp) = _tree_guided(eta)
    # Thm 4.1 limits: Q♯ → reward 1 (right, then the good leaf); CD → 0.1 (always left)
    assert qs_reward > 0.99 and abs(cd_reward - 0.1) < 0.02
    # Thm 4.2 at the decision node: KL(π‖π_ref) → ln(1/p_R) for Q♯, ln(1/p_L) for CD
    ref_root = TREE_REF[0]
    kl_qs = np.sum(np.exp(qs_logp[0]) * (qs_logp[0] - ref_root))
    kl_cd = np.sum(np.exp(cd_logp[0]) * (cd_logp[0] - ref_root))
    np.testing.assert_allclose(kl_qs, np.log(1 / P_R), atol=0.02)
    np.testing.assert_allclose(kl_cd, np.log(1 / P_L), atol=0.05)


@pytest.mark.parametrize("eta", [0.05, 0.3, 2.0])
def test_tree_mdp_policies_equal_their_closed_forms(eta):
    (qs_probs, _, _), (cd_probs, _, cd_logp) = _tree_guided(eta)
    # Q♯: the sequence distribution is π_ref(y)·exp(r(y)/η)/Z, by brute force over the 4 leaves
    keys = sorted(TREE_LEAF_REWARD)
    logw = np.array([TREE_REF[0, a] + TREE_REF[1 + a, b] + TREE_LEAF_REWARD[(a, b)] / eta
                     for a, b in keys])
    want = np.exp(logw - np_logsumexp(logw))
    np.testing.assert_allclose([qs_probs[k] for k in keys], want, rtol=2e-4, atol=1e-6)
    # CD (Q♯ Eq. 6): π ∝ π_ref·exp(Q^{π_ref}/η) with Q^{π_ref}(L) = 0.1, Q^{π_ref}(R) = 0.05
    root = TREE_REF[0] + np.array([0.1, 0.05]) / eta
    np.testing.assert_allclose(cd_logp[0], root - np_logsumexp(root), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. Exact Q⋆ guidance = the optimal KL-regularized policy, on an enumerated deterministic MDP
# --------------------------------------------------------------------------------------------

VOCAB, DEPTH = 3, 3
PREFIXES = [p for h in range(DEPTH) for p in itertools.product(range(VOCAB), repeat=h)]
SEQS = list(itertools.product(range(VOCAB), repeat=DEPTH))


def _random_token_tree(seed, binary):
    rng = np.random.default_rng(seed)
    ref = {p: rng.normal(size=VOCAB) * 1.5 for p in PREFIXES}
    ref = {p: v - np_logsumexp(v) for p, v in ref.items()}
    if binary:
        rewards = {y: float(rng.uniform() < 0.4) for y in SEQS}
        rewards[SEQS[0]], rewards[SEQS[1]] = 1.0, 0.0
    else:
        rewards = {y: float(rng.normal()) for y in SEQS}
    return ref, rewards


def _ref_seq_logprob(ref, y):
    return sum(ref[y[:h]][y[h]] for h in range(DEPTH))


def _leaf_distribution(ref, prefix):
    """{leaf: π_ref(leaf | prefix)} over the full sequences extending ``prefix``."""
    out = {}
    for y in SEQS:
        if y[: len(prefix)] == prefix:
            out[y] = np.exp(sum(ref[y[:h]][y[h]] for h in range(len(prefix), DEPTH)))
    return out


def _guided_seq_logprobs(guided_logits):
    logp = np.asarray(jax.nn.log_softmax(guided_logits, axis=-1), np.float64)
    row = {p: i for i, p in enumerate(PREFIXES)}
    return np.array([sum(logp[row[y[:h]], y[h]] for h in range(DEPTH)) for y in SEQS])


def _brute_force_optimum(ref, rewards, eta):
    logw = np.array([_ref_seq_logprob(ref, y) + rewards[y] / eta for y in SEQS])
    return logw - np_logsumexp(logw)


@pytest.mark.parametrize("eta", [0.05, 0.3, 2.0])
def test_histogram_guidance_gives_the_kl_regularized_optimum(eta):
    ref, rewards = _random_token_tree(10, binary=False)
    atoms = np.array(sorted(set(rewards.values())))
    critic = np.zeros((len(PREFIXES), VOCAB, len(atoms)))
    for i, p in enumerate(PREFIXES):
        for y in range(VOCAB):
            for leaf, prob in _leaf_distribution(ref, p + (y,)).items():
                critic[i, y, np.searchsorted(atoms, rewards[leaf])] += prob
    guided = V.qsharp_logits(jnp.asarray(np.stack([ref[p] for p in PREFIXES]), jnp.float32),
                             jnp.asarray(np_log(critic), jnp.float32), eta, "histogram",
                             atoms=jnp.asarray(atoms, jnp.float32))
    got = _guided_seq_logprobs(guided)
    want = _brute_force_optimum(ref, rewards, eta)
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("eta", [0.05, 0.3, 2.0])
def test_bernoulli_guidance_gives_the_kl_regularized_optimum(eta):
    ref, rewards = _random_token_tree(11, binary=True)
    logit = np.zeros((len(PREFIXES), VOCAB))
    for i, p in enumerate(PREFIXES):
        for y in range(VOCAB):
            dist = _leaf_distribution(ref, p + (y,))
            succ = sum(prob for leaf, prob in dist.items() if rewards[leaf] == 1.0)
            fail = sum(prob for leaf, prob in dist.items() if rewards[leaf] == 0.0)
            logit[i, y] = np_log(succ) - np_log(fail)  # ±inf where p ∈ {0, 1}
    assert np.isinf(logit).any()
    guided = V.qsharp_logits(jnp.asarray(np.stack([ref[p] for p in PREFIXES]), jnp.float32),
                             jnp.asarray(logit, jnp.float32), eta, "bernoulli")
    got = _guided_seq_logprobs(guided)
    want = _brute_force_optimum(ref, rewards, eta)
    np.testing.assert_allclose(np.exp(got), np.exp(want), rtol=1e-3, atol=1e-6)


def test_optimal_policy_logits_is_reached_by_gradient_ascent():
    """argmax_π E_π[q] − η·KL(π‖π_ref) (reverse KL) is π_ref·exp(q/η)/Z, the helper's output."""
    rng = np.random.default_rng(4)
    ref = jnp.asarray(rng.normal(size=5), jnp.float32)
    q = jnp.asarray(rng.normal(size=5), jnp.float32)
    eta = 0.7

    def objective(theta):
        logp = jax.nn.log_softmax(theta)
        logr = jax.nn.log_softmax(ref)
        return jnp.sum(jnp.exp(logp) * (q - eta * (logp - logr)))

    @jax.jit
    def run(theta):
        step = lambda _, th: th + 0.5 * jax.grad(objective)(th)
        return jax.lax.fori_loop(0, 2000, step, theta)

    theta = run(jnp.zeros(5))
    np.testing.assert_allclose(jax.nn.log_softmax(theta), V.optimal_policy_logits(ref, q, eta),
                               atol=1e-4)
    want = np.asarray(ref, np.float64) + np.asarray(q, np.float64) / eta
    np.testing.assert_allclose(V.optimal_policy_logits(ref, q, eta), want - np_logsumexp(want),
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# 4. The Q⋆ functional: Bernoulli = two-atom histogram, limits, monotonicity, precision
# --------------------------------------------------------------------------------------------

ETAS = np.logspace(-3, 3, 13)
LOGITS = np.array([-8.0, -2.0, -0.3, 0.0, 0.7, 3.0, 9.0])


def test_bernoulli_equals_two_atom_histogram_and_float64_formula():
    l = jnp.asarray(LOGITS, jnp.float32)
    p = 1.0 / (1.0 + np.exp(-LOGITS))
    two_atom = jnp.stack([jnp.zeros_like(l), l], axis=-1)  # softmax → [1 − p, p]
    for eta in ETAS:
        qb = np.asarray(V.qstar_bernoulli(l, float(eta)))
        qh = np.asarray(V.qstar_histogram(two_atom, jnp.asarray([0.0, 1.0]), float(eta)))
        want = np_qstar_bernoulli(p, eta)
        np.testing.assert_allclose(qb, want, rtol=2e-5, atol=1e-6, err_msg=f"eta={eta}")
        np.testing.assert_allclose(qh, want, rtol=2e-5, atol=1e-6, err_msg=f"eta={eta}")


def test_qstar_limits():
    l = jnp.asarray([-jnp.inf, -3.0, 0.0, 2.0, jnp.inf])
    p = np.array([0.0, 1 / (1 + np.exp(3.0)), 0.5, 1 / (1 + np.exp(-2.0)), 1.0])
    # η → 0: the max of the support with positive probability; η → ∞: the mean (the CD target)
    np.testing.assert_allclose(V.qstar_bernoulli(l, 1e-6), (p > 0).astype(float), atol=1e-4)
    np.testing.assert_allclose(V.qstar_bernoulli(l, 1e6), p, atol=1e-5)
    atoms = jnp.asarray([-1.0, 0.5, 2.0])
    probs = np.array([0.3, 0.7, 0.0])  # the largest atom is impossible
    h = jnp.asarray(np_log(probs), jnp.float32)
    np.testing.assert_allclose(V.qstar_histogram(h, atoms, 1e-6), 0.5, atol=1e-4)
    np.testing.assert_allclose(V.qstar_histogram(h, atoms, 1e6), probs @ np.asarray(atoms),
                               atol=1e-5)
    np.testing.assert_allclose(V.histogram_mean(h, atoms), probs @ np.asarray(atoms), atol=1e-6)


def test_qstar_is_monotone_in_eta_and_between_mean_and_max():
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    atoms = jnp.asarray(np.sort(rng.uniform(-2, 3, size=6)), jnp.float32)
    mean = np.asarray(V.histogram_mean(h, atoms))
    qb = np.stack([np.asarray(V.qstar_bernoulli(jnp.asarray(LOGITS), float(e))) for e in ETAS])
    qh = np.stack([np.asarray(V.qstar_histogram(h, atoms, float(e))) for e in ETAS])
    assert np.all(np.diff(qb, axis=0) <= 1e-6)
    assert np.all(np.diff(qh, axis=0) <= 1e-5)
    assert np.all(qh >= mean - 1e-5) and np.all(qh <= float(atoms[-1]) + 1e-5)
    # and it matches the float64 formula on a non-trivial support
    probs = np.asarray(jax.nn.softmax(h.astype(jnp.float32)), np.float64)
    for i, e in enumerate(ETAS):
        np.testing.assert_allclose(qh[i], np_qstar(probs, np.asarray(atoms, np.float64), e),
                                   rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. Munchausen VI = MD-VI(λ = ατ, entropy (1−α)τ) (Vieillard et al. 2020, Thm 1)
# --------------------------------------------------------------------------------------------

def _random_mdp(seed, s=4, a=3):
    rng = np.random.default_rng(seed)
    p = rng.uniform(size=(s, a, s)) ** 3
    p /= p.sum(-1, keepdims=True)
    return jnp.asarray(p), jnp.asarray(rng.uniform(size=(s, a))), jnp.asarray(rng.normal(size=(s, a)))


def _munchausen_step(q, p, r, gamma, tau, alpha):
    s, a = q.shape
    q_tm1 = jnp.broadcast_to(q[:, None, None, :], (s, a, s, a))
    acts = jnp.broadcast_to(jnp.arange(a)[None, :, None], (s, a, s))
    q_t = jnp.broadcast_to(q[None, None], (s, a, s, a))
    tgt = V.munchausen_target(q_tm1, acts, r[:, :, None], gamma, q_t, tau=tau, alpha=alpha,
                              clip_min=None)
    return jnp.sum(p * tgt, axis=-1)


def _mdvi_step(qp, logmu, p, r, gamma, lam, tau):
    s, a = qp.shape
    q_t = jnp.broadcast_to(qp[None, None], (s, a, s, a))
    mu_t = jnp.broadcast_to(logmu[None, None], (s, a, s, a))
    tgt = V.mdvi_target(r[:, :, None], gamma, q_t, mu_t, lam=lam, tau=tau)
    return jnp.sum(p * tgt, axis=-1), V.mdvi_policy_logits(logmu, qp, lam, tau)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_munchausen_iteration_equals_mdvi(x64, alpha):
    p, r, q0 = _random_mdp(6)
    gamma, tau = 0.8, 0.3
    lam, ent = alpha * tau, (1 - alpha) * tau
    logmu = jnp.full(q0.shape, -jnp.log(q0.shape[1]))
    q, qp = q0, q0 - alpha * tau * logmu
    m_step = jax.jit(lambda q: _munchausen_step(q, p, r, gamma, tau, alpha))
    d_step = jax.jit(lambda qp, mu: _mdvi_step(qp, mu, p, r, gamma, lam, ent))
    for _ in range(40):
        pi_next = jax.nn.log_softmax(q / tau)  # M-VI's greedy policy π_{k+1}
        q = m_step(q)
        qp, logmu = d_step(qp, logmu)
        np.testing.assert_allclose(logmu, pi_next, atol=1e-10)
        np.testing.assert_allclose(qp, q - alpha * tau * logmu, atol=1e-9)


def test_munchausen_converges_to_entropy_regularized_optimum(x64):
    p, r, q0 = _random_mdp(7)
    gamma, tau, alpha = 0.8, 0.4, 0.5
    ent = (1 - alpha) * tau

    @jax.jit
    def iterate(q):
        return jax.lax.fori_loop(0, 400, lambda _, q: _munchausen_step(q, p, r, gamma, tau, alpha), q)

    pi = np.asarray(jax.nn.softmax(iterate(q0) / tau))
    # independent soft value iteration at temperature (1 − α)τ, NumPy float64
    pn, rn, qs = np.asarray(p), np.asarray(r), np.zeros(np.shape(r))
    for _ in range(600):
        qs = rn + gamma * pn @ (ent * np_logsumexp(qs / ent))
    want = np.exp(qs / ent - np_logsumexp(qs / ent)[:, None])
    np.testing.assert_allclose(pi, want, atol=1e-8)


def test_munchausen_target_special_cases(x64):
    rng = np.random.default_rng(8)
    q_tm1, q_t = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    a, r = rng.integers(0, 3, size=6), rng.normal(size=6)
    tau, gamma = 0.2, 0.9
    soft_next = tau * np_logsumexp(q_t / tau)
    logpi = q_tm1 / tau - np_logsumexp(q_tm1 / tau)[:, None]
    taken = tau * logpi[np.arange(6), a]
    # α = 0: soft Q-learning
    got = V.munchausen_target(q_tm1, a, r, gamma, q_t, tau=tau, alpha=0.0)
    np.testing.assert_allclose(got, r + gamma * soft_next, rtol=1e-10)
    # the bonus α·clip(τ·log π(a|s), l0, 0)
    got = V.munchausen_target(q_tm1, a, r, gamma, q_t, tau=tau, alpha=0.9, clip_min=-0.1)
    np.testing.assert_allclose(got, r + 0.9 * np.clip(taken, -0.1, 0) + gamma * soft_next,
                               rtol=1e-10)
    assert (taken < -0.1).any()  # the clip is exercised
    # soft_value is Σ π (q − τ log π)
    pi = np.exp(q_t / tau - np_logsumexp(q_t / tau)[:, None])
    np.testing.assert_allclose(V.soft_value(q_t, tau), np.sum(pi * (q_t - tau * np.log(pi)), -1),
                               rtol=1e-10)


# --------------------------------------------------------------------------------------------
# DeRa (reference/value_based.md §6)
# --------------------------------------------------------------------------------------------

def test_dera_sequence_level_mixture_is_the_optimum_at_beta_over_lambda():
    rng = np.random.default_rng(9)
    ref = jnp.asarray(rng.normal(size=6), jnp.float32)
    r = jnp.asarray(rng.normal(size=6), jnp.float32)
    beta = 0.5
    aligned = V.optimal_policy_logits(ref, r, beta)
    for lam in (0.25, 0.5, 2.0):
        got = jax.nn.log_softmax(V.dera_logits(ref, aligned, lam))
        want = np.asarray(ref, np.float64) + lam * np.asarray(r, np.float64) / beta
        np.testing.assert_allclose(got, want - np_logsumexp(want), atol=2e-5)
    np.testing.assert_allclose(V.dera_logits(ref, aligned, 0.0), ref)
    np.testing.assert_allclose(V.dera_logits(ref, aligned, 1.0), aligned)


def test_dera_on_qsharp_overshoots_exact_reweighting_jensen():
    """Per token, λ·log E e^{Z/η} ≥ log E e^{λZ/η} for λ ∈ [0, 1]: DeRa leans toward the aligned model."""
    rng = np.random.default_rng(10)
    ref = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    critic = jnp.asarray(rng.normal(size=(2, 5, 4)) * 2, jnp.float32)
    atoms = jnp.asarray([0.0, 0.3, 0.6, 1.0])
    eta, lam = 0.2, 0.5
    aligned = V.qsharp_logits(ref, critic, eta, "histogram", atoms=atoms)
    dera_offset = V.dera_logits(ref, aligned, lam) - ref
    exact_offset = V.qsharp_logits(ref, critic, eta / lam, "histogram", atoms=atoms) - ref
    assert np.all(np.asarray(dera_offset) >= np.asarray(exact_offset) - 1e-5)
    assert np.any(np.asarray(dera_offset) > np.asarray(exact_offset) + 1e-3)


def test_dera_keeps_impossible_tokens_impossible():
    ref = jnp.asarray([0.0, -jnp.inf, 1.0, -jnp.inf])
    ali = jnp.asarray([2.0, 0.5, -jnp.inf, -jnp.inf])
    for lam in (0.3, 1.5):
        out = np.asarray(V.dera_logits(ref, ali, lam))
        assert np.isfinite(out[0]) and np.all(out[1:] == -np.inf)
    g = jax.grad(lambda a: jax.nn.log_softmax(V.dera_logits(ref, a, 0.5))[0])(ali)
    assert np.all(np.isfinite(np.asarray(g)))


# --------------------------------------------------------------------------------------------
# Top-k restriction
# --------------------------------------------------------------------------------------------

def test_top_k_keeps_the_reference_top_k_only():
    ref = jnp.asarray([[0.1, 2.0, -1.0, 1.5, 0.0]])
    critic = jnp.asarray([[5.0, -5.0, 5.0, 0.0, 0.0]])
    out = np.asarray(V.qsharp_logits(ref, critic, 0.5, "bernoulli", top_k=2))
    assert np.all(np.isfinite(out[0, [1, 3]])) and np.all(out[0, [0, 2, 4]] == -np.inf)
    full = V.qsharp_logits(ref, critic, 0.5, "bernoulli")
    np.testing.assert_allclose(out[0, [1, 3]], np.asarray(full)[0, [1, 3]])
    np.testing.assert_allclose(V.qsharp_logits(ref, critic, 0.5, "bernoulli", top_k=5), full)


# --------------------------------------------------------------------------------------------
# 6. Robustness and bad input
# --------------------------------------------------------------------------------------------

EXTREME = st.sampled_from([-jnp.inf, -1e4, -30.0, -1.0, 0.0, 0.5, 30.0, 1e4, jnp.inf])
ETA_GRID = st.sampled_from([1e-6, 1e-3, 0.1, 0.999, 1.0, 1.001, 10.0, 1e3, 1e6])


@jax.jit
def _bernoulli_value_and_grad(l, eta):
    return jax.vmap(jax.value_and_grad(V.qstar_bernoulli), (0, None))(l, eta)


@jax.jit
def _histogram_value_and_grad(h, eta):
    atoms = jnp.asarray([-1.0, 0.0, 0.5, 2.0])
    return jax.value_and_grad(lambda x: jnp.sum(V.qstar_histogram(x, atoms, eta)))(h)


@settings(max_examples=40, deadline=None)
@given(st.lists(EXTREME, min_size=4, max_size=4), ETA_GRID)
def test_qstar_finite_for_extreme_inputs(logits, eta):
    q, g = _bernoulli_value_and_grad(jnp.asarray(logits, jnp.float32), jnp.float32(eta))
    q, g = np.asarray(q), np.asarray(g)
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(g))
    assert np.all(q >= -1e-6) and np.all(q <= 1 + 1e-6)
    h = jnp.asarray(logits, jnp.float32)
    # a histogram needs one possible atom, and +inf logits define no distribution
    if np.any(np.asarray(logits) > -np.inf) and np.all(np.asarray(logits) < np.inf):
        qh, gh = _histogram_value_and_grad(h, jnp.float32(eta))
        assert np.isfinite(np.asarray(qh)) and np.all(np.isfinite(np.asarray(gh)))


@jax.jit
def _guided_logprob_and_grad(ref, critic, eta):
    def f(c):
        return jax.nn.log_softmax(V.qsharp_logits(ref, c, eta, "bernoulli"))[0]
    return jax.value_and_grad(f)(critic)


@settings(max_examples=30, deadline=None)
@given(st.lists(EXTREME, min_size=4, max_size=4), ETA_GRID)
def test_guidance_finite_with_inf_reference_and_certain_critic(critic, eta):
    ref = jnp.asarray([0.0, -jnp.inf, -2.0, -jnp.inf])
    out = np.asarray(V.qsharp_logits(ref, jnp.asarray(critic, jnp.float32), eta, "bernoulli"))
    assert np.all(out[[1, 3]] == -np.inf) and np.all(np.isfinite(out[[0, 2]]))
    v, g = _guided_logprob_and_grad(ref, jnp.asarray(critic, jnp.float32), jnp.float32(eta))
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("name", ["qsharp_bce", "qsharp_histogram"])
def test_masked_positions_change_neither_loss_nor_gradient(name):
    rng = np.random.default_rng(12)
    atoms = None if name == "qsharp_bce" else jnp.linspace(0.0, 1.0, 3)
    logits, tokens, mask = _loss_batch(rng, atoms=None if atoms is None else 3)
    returns = jnp.asarray(rng.uniform(size=(2, 3)), jnp.float32)
    kw = {} if atoms is None else {"atoms": atoms}
    fn = objectives.get(name)
    loss_grad = jax.value_and_grad(lambda c, r: fn(c, tokens, r, mask, **kw)[0])
    l1, g1 = loss_grad(logits.astype(jnp.float32), returns)
    masked = np.asarray(mask) == 0
    garbage = np.array(logits, np.float32)
    garbage[masked] = np.nan
    bad_returns = np.array(returns)
    bad_returns[masked] = 1e6
    l2, g2 = loss_grad(jnp.asarray(garbage), jnp.asarray(bad_returns))
    np.testing.assert_allclose(l1, l2)
    np.testing.assert_allclose(np.asarray(g1)[~masked], np.asarray(g2)[~masked])
    assert np.all(np.asarray(g2)[masked] == 0)


def test_losses_fit_the_reward_to_go_distribution():
    """Minimizers: BCE → σ(l) = mean label; histogram MLE → the empirical (two-hot) distribution."""
    returns = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.25, 0.25, 1.0, 0.0])  # one position each
    mask = jnp.ones((8, 1))
    tokens = jnp.zeros((8, 1), jnp.int32)
    bce = lambda x: V.qsharp_bce(jnp.broadcast_to(x, (8, 1, 1)), tokens, returns[:, None], mask)[0]
    x = jax.jit(lambda x0: jax.lax.fori_loop(0, 500, lambda _, x: x - 2.0 * jax.grad(bce)(x), x0))(
        jnp.zeros(()))
    np.testing.assert_allclose(jax.nn.sigmoid(x), np.mean(np.asarray(returns)), atol=1e-4)
    atoms = jnp.asarray([0.0, 0.5, 1.0])
    mle = lambda h: V.qsharp_histogram(jnp.broadcast_to(h, (8, 1, 1, 3)), tokens, returns, mask,
                                       atoms=atoms)[0]
    h = jax.jit(lambda h0: jax.lax.fori_loop(0, 2000, lambda _, h: h - 2.0 * jax.grad(mle)(h), h0))(
        jnp.zeros(3))
    # two-hot: 0.25 → half on 0, half on 0.5; empirical target = [2 + 1, 1, 4] / 8
    np.testing.assert_allclose(jax.nn.softmax(h), [3 / 8, 1 / 8, 4 / 8], atol=1e-3)
    nearest = V.project_returns(jnp.asarray([0.2, 0.3, 5.0]), atoms, "nearest")
    np.testing.assert_allclose(nearest, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_registry_names_and_family():
    assert objectives.get("qsharp_bce") is V.qsharp_bce
    assert objectives.get("qsharp_histogram") is V.qsharp_histogram
    assert {"qsharp_bce", "qsharp_histogram"} <= set(objectives.names("value"))


def test_bad_input_errors_name_the_argument():
    ref = jnp.zeros((2, 4))
    crit = jnp.zeros((2, 4))
    for eta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eta"):
            V.qsharp_logits(ref, crit, eta, "bernoulli")
        with pytest.raises(ValueError, match="eta"):
            V.qstar_bernoulli(crit, eta)
    with pytest.raises(ValueError, match="kind"):
        V.qsharp_logits(ref, crit, 1.0, "fudge")
    with pytest.raises(ValueError, match="atoms"):
        V.qsharp_logits(ref, jnp.zeros((2, 4, 3)), 1.0, "histogram")
    with pytest.raises(ValueError, match="atoms"):
        V.qsharp_logits(ref, jnp.zeros((2, 4, 3)), 1.0, "histogram", atoms=jnp.arange(4.0))
    with pytest.raises(ValueError, match="atoms"):
        V.qstar_histogram(jnp.zeros(3), jnp.asarray([0.0, 1.0, 0.5]), 1.0)
    with pytest.raises(ValueError, match="critic_logits"):
        V.qsharp_logits(ref, jnp.zeros((2, 5)), 1.0, "bernoulli")
    with pytest.raises(ValueError, match="critic_logits"):
        V.qsharp_logits(ref, jnp.zeros((2, 4)), 1.0, "histogram", atoms=jnp.arange(4.0))
    with pytest.raises(ValueError, match="top_k"):
        V.qsharp_logits(ref, crit, 1.0, "bernoulli", top_k=0)
    with pytest.raises(ValueError, match="q"):
        V.optimal_policy_logits(ref, jnp.zeros((2, 3)), 1.0)
    with pytest.raises(ValueError, match="lam"):
        V.dera_logits(ref, ref, -0.5)
    logits, mask = jnp.zeros((2, 3, 4)), jnp.ones((2, 3))
    tokens = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="returns"):
        V.qsharp_bce(logits, tokens, jnp.zeros(3), mask)
    with pytest.raises(ValueError, match="tokens"):
        V.qsharp_bce(logits, jnp.zeros((2, 2), jnp.int32), jnp.zeros(2), mask)
    with pytest.raises(ValueError, match="critic_logits"):
        V.qsharp_bce(jnp.zeros((2, 3)), tokens, jnp.zeros(2), mask)
    with pytest.raises(ValueError, match="atoms"):
        V.qsharp_histogram(jnp.zeros((2, 3, 4, 5)), tokens, jnp.zeros(2), mask)
    with pytest.raises(ValueError, match="projection"):
        V.qsharp_histogram(jnp.zeros((2, 3, 4, 5)), tokens, jnp.zeros(2), mask,
                           atoms=jnp.arange(5.0), projection="round")
    with pytest.raises(ValueError, match="loss_agg"):
        V.qsharp_bce(logits, tokens, jnp.zeros(2), mask, loss_agg="mean")
    with pytest.raises(ValueError, match="tau"):
        V.munchausen_target(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.zeros(2), 0.9,
                            jnp.zeros((2, 3)), tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        V.munchausen_target(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.zeros(2), 0.9,
                            jnp.zeros((2, 3)), alpha=1.5)
    with pytest.raises(ValueError, match="lam"):
        V.mdvi_policy_logits(jnp.zeros(3), jnp.zeros(3), -1.0, 0.1)
