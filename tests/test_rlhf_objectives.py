"""RLHF pieces: GAE(γ, λ), PPO's clipped value loss, Ziegler et al.'s adaptive KL controller, and the
critic-based policy gradient checked against the exact gradient by enumeration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from enumerate_utils import all_sequences, seq_logprob_table, seq_token_logp
from kljax import objectives
from kljax.objectives import advantages as A
from kljax.objectives.value import clipped_value_loss


def _padded(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    r, v = rng.normal(size=(b, t)), rng.normal(size=(b, t))
    lengths = [t, 3, 1, 5][:b]
    m = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float64)
    return r, v, m, lengths


def _gae_reference(r, v, lengths, gamma, lam):
    """GAE by the textbook recursion, one row at a time, on the real tokens only."""
    out = np.zeros_like(r)
    for i, n in enumerate(lengths):
        a = 0.0
        for t in reversed(range(n)):
            nv = v[i, t + 1] if t + 1 < n else 0.0
            delta = r[i, t] + gamma * nv - v[i, t]
            a = delta + gamma * lam * a
            out[i, t] = a
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (0.8, 0.0)])
def test_gae_equals_direct_recursion(x64, gamma, lam):
    r, v, m, lengths = _padded()
    adv, ret = A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
    want = _gae_reference(r, v, lengths, gamma, lam)
    np.testing.assert_allclose(adv, want, atol=1e-12)
    np.testing.assert_allclose(ret, (want + v) * m, atol=1e-12)
    assert np.all(np.asarray(adv)[m == 0] == 0)


def test_gae_lambda_limits(x64):
    r, v, m, lengths = _padded(1)
    gamma = 0.9
    adv1, ret1 = A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, 1.0)
    adv0, _ = A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, 0.0)
    for i, n in enumerate(lengths):
        for t in range(n):
            g = sum(gamma ** (s - t) * r[i, s] for s in range(t, n))  # discounted return
            np.testing.assert_allclose(adv1[i, t], g - v[i, t], atol=1e-12)   # λ = 1: Monte Carlo
            np.testing.assert_allclose(ret1[i, t], g, atol=1e-12)
            nv = v[i, t + 1] if t + 1 < n else 0.0
            np.testing.assert_allclose(adv0[i, t], r[i, t] + gamma * nv - v[i, t], atol=1e-12)  # TD(0)


def test_gae_padding_values_do_not_leak(x64):
    r, v, m, _ = _padded(2)
    junk = np.where(m > 0, 0.0, 1e3)
    a1, _ = A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 0.9, 0.7)
    a2, _ = A.gae(jnp.asarray(r + junk), jnp.asarray(v - junk), jnp.asarray(m), 0.9, 0.7)
    np.testing.assert_allclose(a1, a2, atol=1e-12)
    with pytest.raises(ValueError, match="lam"):
        A.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 1.0, 1.5)


def test_adaptive_kl_controller_update_rule():
    """β ← β(1 + clip(KL/target − 1, ±0.2)·n/H) (Ziegler et al. 2019; lm-human-preferences)."""
    beta, target, horizon, n = 0.1, 6.0, 10000, 512
    np.testing.assert_allclose(A.adaptive_kl_beta(beta, 6.0, target, horizon, n), beta)          # on target
    np.testing.assert_allclose(A.adaptive_kl_beta(beta, 6.6, target, horizon, n),
                               beta * (1 + 0.1 * n / horizon), rtol=1e-6)                      # 10 % over
    np.testing.assert_allclose(A.adaptive_kl_beta(beta, 60.0, target, horizon, n),
                               beta * (1 + 0.2 * n / horizon), rtol=1e-6)                      # clipped up
    np.testing.assert_allclose(A.adaptive_kl_beta(beta, 0.0, target, horizon, n),
                               beta * (1 - 0.2 * n / horizon), rtol=1e-6)                      # clipped down
    # iterated at a persistent KL excess, β grows geometrically by the clipped rate
    b = beta
    for _ in range(5):
        b = A.adaptive_kl_beta(b, 100.0, target, horizon, n)
    np.testing.assert_allclose(b, beta * (1 + 0.2 * n / horizon) ** 5, rtol=1e-5)
    with pytest.raises(ValueError, match="target"):
        A.adaptive_kl_beta(beta, 1.0, 0.0, horizon, n)


# ------------------------------------------------------------------ clipped value loss -----

def test_clipped_value_loss_gradients(x64):
    old = jnp.zeros((1, 3))
    ret = jnp.ones((1, 3))
    m = jnp.ones((1, 3))
    # inside the trust region / far below it (unclipped branch larger) / above it (clipped larger)
    v = jnp.array([[0.1, -0.5, 0.5]])
    g = jax.grad(lambda x: clipped_value_loss(x, old, ret, m, clip_eps=0.2)[0])(v)
    # ½·mean(...): d/dV = (V − R)/3 where the unclipped branch wins, 0 where the constant clip wins
    np.testing.assert_allclose(g, [[(0.1 - 1) / 3, (-0.5 - 1) / 3, 0.0]], atol=1e-12)
    loss, met = clipped_value_loss(v, old, ret, m, clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.5 * np.mean([0.81, 2.25, 0.64]), atol=1e-12)
    np.testing.assert_allclose(met["value_clipfrac"], 1 / 3, atol=1e-12)
    # no clip: plain ½ MSE; masked tokens change neither value nor gradient
    m2 = jnp.array([[1.0, 1.0, 0.0]])
    gv = jax.grad(lambda x: clipped_value_loss(x, old, ret, m2, clip_eps=None)[0])(v)
    np.testing.assert_allclose(gv, [[(0.1 - 1) / 2, (-0.5 - 1) / 2, 0.0]], atol=1e-12)
    rng = np.random.default_rng(0)
    vv = jnp.asarray(rng.normal(size=(2, 4)))
    oo, rr = jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(rng.normal(size=(2, 4)))
    check_grads(lambda x: clipped_value_loss(x, oo, rr, jnp.ones((2, 4)), clip_eps=5.0)[0], (vv,),
                order=1, modes=["rev"])
    # old values and returns get no gradient
    go = jax.grad(lambda o: clipped_value_loss(vv, o, rr, jnp.ones((2, 4)))[0])(oo)
    assert np.all(np.asarray(go) == 0)


# ------------------------------------------- critic-based estimator vs exact gradient -----

V = 3
A_LOGITS = np.array([0.2, -0.3, 0.4])
B_LOGITS = np.array([[0.1, 0.5, -0.2], [-0.4, 0.0, 0.3], [0.6, -0.1, 0.2]])
REF_A = np.array([-0.1, 0.3, 0.0])
REF_B = np.array([[0.2, -0.2, 0.1], [0.0, 0.4, -0.3], [-0.5, 0.1, 0.0]])
R = np.array([1.0, 0.0, 0.3, -0.2, 0.8, 0.1, 0.5, 0.4, -0.6])  # outcome of each of the 9 sequences


def _token_rewards(params, ref, seq, r, beta):
    """r_0 = −β·k1_0, r_1 = R − β·k1_1 (InstructGPT's per-token KL penalty), stop-gradient."""
    k1 = jax.lax.stop_gradient(seq_token_logp(params, seq) - seq_token_logp(ref, seq))
    return jnp.stack([-beta * k1[0], r - beta * k1[1]])


def _exact_values(params, ref, seqs, rewards, beta):
    """V^π(h_0) and V^π(h_1 = y_1) of the regularized token rewards, by enumeration."""
    p = jax.lax.stop_gradient(jnp.exp(seq_logprob_table(params, seqs)))
    tr = jax.vmap(lambda s, r: _token_rewards(params, ref, s, r, beta))(seqs, rewards)  # [9, 2]
    p1 = jax.nn.softmax(params[0])
    p_cond = (p / p1[seqs[:, 0]]).reshape(V, V)
    v1 = jnp.sum(p_cond * tr[:, 1].reshape(V, V), axis=1)               # [V]
    v0 = jnp.sum(p1 * (tr[:, 0].reshape(V, V)[:, 0] + v1))
    return v0, v1


def _critic_expected_grad(params, ref, seqs, rewards, beta, lam, critic=None, objective="reinforce"):
    def expected_loss(prm):
        probs = jax.lax.stop_gradient(jnp.exp(seq_logprob_table(prm, seqs)))
        v0, v1 = _exact_values(prm, ref, seqs, rewards, beta) if critic is None else critic
        obj = objectives.get(objective)

        def one(i):
            s = seqs[i]
            lp = seq_token_logp(prm, s)[None]
            tr = _token_rewards(prm, ref, s, rewards[i], beta)[None]
            values = jnp.stack([v0, v1[s[0]]])[None]
            adv, _ = A.gae(tr, jax.lax.stop_gradient(values), jnp.ones((1, 2)), 1.0, lam)
            batch = {"logp": lp, "old_logp": jax.lax.stop_gradient(lp), "ref_logp": lp,
                     "mask": jnp.ones((1, 2), lp.dtype), "advantages": adv}
            return obj(batch, beta=0.0, loss_agg="seq-mean-token-sum")[0]

        return jnp.sum(probs * jax.vmap(one)(jnp.arange(seqs.shape[0])))

    return jax.grad(expected_loss)(params)


def _exact_objective_grad(params, ref, seqs, rewards, beta):
    def j(prm):
        lp, lr = seq_logprob_table(prm, seqs), seq_logprob_table(ref, seqs)
        p = jnp.exp(lp)
        return jnp.sum(p * rewards) - beta * jnp.sum(p * (lp - lr))
    return jax.grad(j)(params)


@pytest.fixture
def toy(x64):
    params = (jnp.asarray(A_LOGITS), jnp.asarray(B_LOGITS))
    ref = (jnp.asarray(REF_A), jnp.asarray(REF_B))
    return params, ref, all_sequences(V), jnp.asarray(R)


@pytest.mark.parametrize("objective", ["reinforce", "ppo"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_critic_estimator_with_exact_critic_is_exact_gradient(toy, beta, lam, objective):
    """E_π[−Σ_t A^GAE_t ∇log π(y_t|h_t)] = −∇(E[R] − β·KL(π‖π_ref)) when V = V^π, for every λ (PPO on-policy:
    ratio 1, the clip inactive — the rl loop's `rl.advantage = "gae"` update)."""
    params, ref, seqs, rewards = toy
    g = _critic_expected_grad(params, ref, seqs, rewards, beta, lam, objective=objective)
    want = _exact_objective_grad(params, ref, seqs, rewards, beta)
    for gi, wi in zip(g, want):
        np.testing.assert_allclose(gi, -wi, atol=1e-12)


def test_wrong_critic_biases_td_but_not_monte_carlo(toy):
    """The test can fail: a wrong V biases λ = 0 (bootstrapping), while λ = 1 only uses V as a baseline."""
    params, ref, seqs, rewards = toy
    v0, v1 = _exact_values(params, ref, seqs, rewards, 0.3)
    wrong = (v0 + 0.5, v1 + jnp.array([0.4, -0.3, 0.2]))
    want = _exact_objective_grad(params, ref, seqs, rewards, 0.3)
    g0 = _critic_expected_grad(params, ref, seqs, rewards, 0.3, 0.0, critic=wrong)
    g1 = _critic_expected_grad(params, ref, seqs, rewards, 0.3, 1.0, critic=wrong)
    assert not np.allclose(np.asarray(g0[0]), -np.asarray(want[0]), atol=1e-6)
    for gi, wi in zip(g1, want):
        np.testing.assert_allclose(gi, -wi, atol=1e-12)
