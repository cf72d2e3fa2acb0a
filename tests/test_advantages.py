"""Advantage estimators: golden numbers (tunix, A*-PO sheet) and edge cases."""
import jax.numpy as jnp
import numpy as np
import pytest

from kljax.objectives import advantages as A


def test_rloo_tunix_golden():
    """tunix algo_core_test: RLOO of [1..6] with G = 3."""
    np.testing.assert_allclose(A.leave_one_out(jnp.arange(1.0, 7.0), 3),
                               [-1.5, 0, 1.5, -1.5, 0, 1.5], atol=1e-6)


def test_leave_one_out_equals_explicit_other_mean():
    r = np.array([0.3, 1.2, -0.5, 2.0, 0.0, 0.7, 1.1, -1.0])
    want = [r[i] - np.mean(np.delete(r[4 * (i // 4):4 * (i // 4) + 4], i % 4)) for i in range(8)]
    np.testing.assert_allclose(A.leave_one_out(jnp.asarray(r), 4), want, rtol=1e-5, atol=1e-6)


def test_group_mean_and_normalized():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(A.group_mean(r, 3), [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)
    g = A.group_normalized(r, 3)
    # first group: mean 1/3, sample std sqrt(1/3); the all-equal group gives exactly 0, not NaN
    s = np.sqrt(1 / 3)
    np.testing.assert_allclose(g, [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0, 0, 0], rtol=1e-4)
    assert np.all(np.asarray(g[3:]) == 0.0)
    assert np.all(np.isfinite(np.asarray(A.group_normalized(jnp.array([2.0, 5.0]), 1))))


def test_group_size_errors_name_argument():
    with pytest.raises(ValueError, match="group_size"):
        A.group_mean(jnp.ones(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        A.leave_one_out(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="rewards"):
        A.group_mean(jnp.ones((2, 2)), 2)


def test_batch_normalized_masked():
    v = jnp.array([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    m = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = A.batch_normalized(v, m)
    kept = np.asarray(out)[:, :2].ravel()
    np.testing.assert_allclose(kept.mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(kept.std(), 1.0, atol=1e-5)
    assert np.all(np.asarray(out)[:, 2] == 0.0)
    assert np.all(np.asarray(A.batch_normalized(jnp.ones(4))) == 0.0)


def test_reward_to_go_and_kl_penalized_returns():
    m = jnp.array([[1.0, 1.0, 0.0]])
    np.testing.assert_allclose(A.reward_to_go(jnp.array([[1.0, 2.0, 3.0]]), m), [[3, 2, 0]])
    kl = jnp.array([[0.1, 0.2, 5.0]])
    out = A.kl_penalized_returns(jnp.array([1.0]), kl, m, beta=0.5)
    np.testing.assert_allclose(out, [[1 - 0.5 * 0.3, 1 - 0.5 * 0.2, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        A.kl_penalized_returns(jnp.array([1.0]), kl, m, beta=-1.0)


def test_pmd_partition_baseline():
    r = np.array([0.0, 1.0, 1.0, 0.0])
    tau = 0.5
    want = [r[i] - tau * np.log(np.mean(np.exp(np.delete(r, i) / tau))) for i in range(4)]
    np.testing.assert_allclose(A.pmd_partition_baseline(jnp.asarray(r), 4, tau), want, rtol=1e-5)
    # τ → ∞: log-mean-exp → mean, i.e. leave-one-out
    np.testing.assert_allclose(A.pmd_partition_baseline(jnp.asarray(r), 4, 1e4),
                               A.leave_one_out(jnp.asarray(r), 4), atol=1e-3)


def test_apo_value_star_sheet_numbers():
    """§6: N = 8 binary rewards, β1 = 0.5, k correct."""
    ks = [0, 1, 2, 4, 6, 8]
    rows = jnp.array([[1.0] * k + [0.0] * (8 - k) for k in ks])
    np.testing.assert_allclose(A.apo_value_star(rows, 0.5),
                               [0, .293513, .477229, .716890, .878221, 1.0], atol=2e-6)
    np.testing.assert_allclose(A.apo_value_star(rows, 0.0), [k / 8 for k in ks], atol=1e-7)
    assert np.all(np.asarray(A.apo_value_star(rows, -1.0)) == 0.0)


def test_reward_metrics():
    m = A.reward_metrics(jnp.array([1.0, 1.0, 0.0, 1.0]), 2)
    np.testing.assert_allclose(m["reward"], 0.75)
    np.testing.assert_allclose(m["frac_reward_zero_std"], 0.5)
