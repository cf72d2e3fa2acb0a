"""Small fidelity fixes (issue 8): what RAPO logs and regularizes on sequences, its reward-reweighted
reference, and Q♯'s top-k modes and temperature caveat. Exact expectations by enumeration."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enumerate_utils import (all_sequences, bandit_batch, kl, log_softmax, seq_expected_grad,
                             seq_logprob_table)
from kljax import objectives
from kljax.objectives import policy
from kljax.objectives import value as V

THETA = np.array([0.3, -0.2, 0.5, 0.1])
REF = np.array([-0.4, 0.2, 0.1, 0.6])
OLD = np.array([0.1, 0.4, -0.3, 0.2])
R = np.array([1.0, 0.0, 0.5, 0.2])


def _arr(x):
    return jnp.asarray(x, jnp.float64)


# ------------------------------------------------------------------------------- RAPO ----

def test_rapo_logs_forward_kl_estimate_named_by_direction(x64):
    """Σ_y π_old(y)·kl_forward(y) = KL(π_ref‖π_θ) exactly (off-policy), and no reverse-KL `kl`."""
    th, old, ref = _arr(THETA), log_softmax(_arr(OLD)), log_softmax(_arr(REF))
    rapo = objectives.get("rapo")
    vals = []
    for y in range(4):
        _, m = rapo(bandit_batch(th, y, old_logp=old, ref_logp=ref, adv=0 * th), alpha=0.3)
        assert "kl" not in m  # TRL's `kl` is KL(π‖π_ref), which RAPO does not regularize
        vals.append(m["kl_forward"])
    est = jnp.sum(jnp.exp(old) * jnp.stack(vals))
    np.testing.assert_allclose(est, kl(ref, log_softmax(th)), rtol=1e-10)
    # ... and it is not the reverse KL, which the old metric estimated
    assert abs(float(est - kl(log_softmax(th), ref))) > 1e-3


def _seq_toy():
    v = 3
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = (jax.random.normal(k[0], (v,), jnp.float64), jax.random.normal(k[1], (v, v), jnp.float64))
    ref = (jax.random.normal(k[2], (v,), jnp.float64), jax.random.normal(k[3], (v, v), jnp.float64))
    return params, ref, all_sequences(v)


def test_rapo_sequences_per_state_forward_kl(x64):
    """On a two-token toy the token-level estimator follows Σ_h d_π(h)·∇KL(π_ref(·|h)‖π(·|h)),
    the per-state forward KLs over the states the policy visits, not the sequence forward KL."""
    params, ref, seqs = _seq_toy()
    zeros = jnp.zeros(seqs.shape[0], jnp.float64)
    g = seq_expected_grad(objectives.get("rapo"), params, ref, seqs, zeros, alpha=1.0,
                          clip_eps_low=None, loss_agg="seq-mean-token-sum")

    def per_state(p):
        a, b = p
        visit = jax.lax.stop_gradient(jax.nn.softmax(a))  # d_π(y1), held constant
        second = jax.vmap(lambda rb, pb: kl(log_softmax(rb), log_softmax(pb)))(ref[1], b)
        return kl(log_softmax(ref[0]), log_softmax(a)) + jnp.sum(visit * second)

    def sequence_forward_kl(p):
        return kl(seq_logprob_table(ref, seqs), seq_logprob_table(p, seqs))

    want = jax.grad(per_state)(params)
    for got, w in zip(g, want):
        np.testing.assert_allclose(got, w, atol=1e-10)
    seq = jax.grad(sequence_forward_kl)(params)
    # the first token's state is visited by both, so its gradient agrees ...
    np.testing.assert_allclose(g[0], seq[0], atol=1e-10)
    # ... but the second token's states are weighted by π(y1) here, by π_ref(y1) in the sequence KL
    assert float(jnp.max(jnp.abs(g[1] - seq[1]))) > 1e-2


def test_rapo_reweighted_reference_is_unnormalized_forward_kl(x64):
    """ref_logp = φ(r)·log π_ref: E_old[∇loss] = −Σ π̃∇log π = Z·∇KL(π̃/Z‖π), π̃ = π_ref^{φ(r)}."""
    th, old = _arr(THETA), log_softmax(_arr(OLD))
    ref_lp = log_softmax(_arr(REF))
    phi = 0.25 + 3.0 * _arr(R)  # any φ(r) ≥ 0; here increasing in the reward
    rapo = objectives.get("rapo")

    def expected_loss(t):
        def one(y):
            b = bandit_batch(t, y, old_logp=old, ref_logp=ref_lp, adv=0 * t)
            b["ref_logp"] = policy.reweighted_reference_logp(b["ref_logp"], phi[y][None])
            return rapo(b, alpha=1.0, clip_eps_low=None)[0]
        return jnp.sum(jnp.exp(old) * jax.vmap(one)(jnp.arange(4)))

    g = jax.grad(expected_loss)(th)
    tilde = jnp.exp(phi * ref_lp)  # unnormalized π_ref^{φ(r)}
    z = jnp.sum(tilde)
    want = jax.grad(lambda t: -jnp.sum(tilde * log_softmax(t)))(th)
    np.testing.assert_allclose(g, want, atol=1e-10)
    fwd = jax.grad(lambda t: kl(jnp.log(tilde / z), log_softmax(t)))(th)
    np.testing.assert_allclose(g, z * fwd, atol=1e-10)
    assert abs(float(z) - 1.0) > 0.1  # the reference really is unnormalized here


def test_reweighted_reference_logp_shapes_and_zero_weight():
    ref = jnp.array([[-1.0, -jnp.inf], [-2.0, -0.5]])
    out = policy.reweighted_reference_logp(ref, jnp.array([0.0, 2.0]))
    np.testing.assert_array_equal(out, [[0.0, 0.0], [-4.0, -1.0]])  # π^0 = 1, no NaN from 0·−inf
    with pytest.raises(ValueError, match="phi_r"):
        policy.reweighted_reference_logp(ref, jnp.ones(3))


# ------------------------------------------------------------------------------- Q♯ ----

def test_top_k_rest_modes():
    ref = jnp.array([2.0, 1.0, 0.5, -1.0, -jnp.inf])
    critic = jnp.array([0.3, -0.2, 1.5, 0.7, 0.1])
    full = np.asarray(V.qsharp_logits(ref, critic, 0.5, "bernoulli"))
    masked = np.asarray(V.qsharp_logits(ref, critic, 0.5, "bernoulli", top_k=2))
    kept = np.asarray(V.qsharp_logits(ref, critic, 0.5, "bernoulli", top_k=2, top_k_rest="reference"))
    np.testing.assert_array_equal(masked[:2], full[:2])
    assert np.all(np.isneginf(masked[2:]))
    np.testing.assert_array_equal(kept[:2], full[:2])
    np.testing.assert_array_equal(kept[2:], np.asarray(ref)[2:])  # unguided, −inf stays −inf
    assert not np.allclose(full[2:4], np.asarray(ref)[2:4])  # guidance would have moved them
    with pytest.raises(ValueError, match="top_k_rest"):
        V.qsharp_logits(ref, critic, 0.5, "bernoulli", top_k=2, top_k_rest="ref")


def test_guided_policy_is_optimal_only_at_temperature_one(x64):
    """One step, deterministic reward (so CD's E[Z] is Q⋆): softmax(guided/τ) is π⋆ only at τ = 1."""
    ref, r, eta = _arr(REF), _arr(R), 0.25
    guided = V.qsharp_logits(ref, r, eta, "cd")
    star = jnp.exp(V.optimal_policy_logits(ref, r, eta))
    np.testing.assert_allclose(jax.nn.softmax(guided), star, atol=1e-12)
    for tau in (0.5, 2.0):
        sampled = jax.nn.softmax(guided / tau)
        assert float(jnp.max(jnp.abs(sampled - star))) > 1e-2
        # not π⋆ at η·τ either: temperature also sharpens/flattens the reference
        other = jnp.exp(V.optimal_policy_logits(ref, r, eta * tau))
        assert float(jnp.max(jnp.abs(sampled - other))) > 1e-2
