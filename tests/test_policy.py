"""Policy objectives: finite differences, invariances, robustness, clipping, bad input, metrics.

The expected-gradient (enumeration) tests live in test_kl_gradient_table.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from kljax import objectives
from kljax.objectives import policy

NAMES = objectives.names("policy")
B, T, V = 4, 3, 5
# hyper-parameters that switch on every term of an objective (its KL, dual clip, ...)
HP = {
    "reinforce": dict(beta=0.1),
    "rloo": dict(beta=0.1, kl_in="loss", kl_estimator="k2", importance_weight="stop_gradient"),
    "ppo": dict(beta=0.1, clip_c=3.0),
    "grpo": dict(beta=0.1),
    "dr_grpo": dict(beta=0.1),
    "dapo": dict(beta=0.1, importance_weight="differentiable"),
    "reinforce_pp": dict(beta=0.1),
    "kdrl": dict(kd_coef=0.1, beta=0.1),
    "rapo": dict(alpha=0.1, entropy_coef=0.01),
    "pmd_mean": dict(tau=0.5),
    "apo": dict(beta=0.1),
}
for _k in ("fkl", "rkl", "ufkl", "urkl"):
    HP[f"rpg_{_k}"] = dict(beta=0.1, clip_eps_low=0.2, clip_eps_high=0.28, clip_c=3.0)
    HP[f"rpg_rf_{_k}"] = dict(beta=0.1)


def test_every_policy_name_registered():
    assert set(NAMES) == set(HP)


def make_batch(seed=0, dtype=jnp.float32, spread=0.05, scale=1.0):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (B, T))
    mask = np.ones((B, T))
    mask[1, 2] = 0.0
    mask[3, 1:] = 0.0
    b = {
        "logp": logp,
        "old_logp": logp + spread * rng.uniform(-1, 1, (B, T)),
        "ref_logp": logp + scale * rng.normal(size=(B, T)) * 0.5,
        "teacher_logp": logp + scale * rng.normal(size=(B, T)) * 0.5,
        "mask": mask,
        "advantages": rng.normal(size=(B,)),
        "logits": scale * rng.normal(size=(B, T, V)),
        "ref_logits": scale * rng.normal(size=(B, T, V)),
    }
    return {k: jnp.asarray(v, dtype) for k, v in b.items()}


def _loss_of(name, batch, key="logp"):
    f = objectives.get(name)
    return lambda x: f(dict(batch, **{key: x}), **HP[name])[0]


# A KL *reward* is stop_gradient(f(logp)), so finite differences of the value see a dependence the
# surrogate's gradient deliberately drops; check_grads runs those objectives with the KL in the loss
# (the reward placement is proved by enumeration in test_kl_gradient_table.py); likewise RAPO's
# SG(w)·k3 term.
FD_HP = dict(HP, reinforce=dict(beta=0.1, kl_in="loss", kl_estimator="k2"),
             ppo=dict(beta=0.1, clip_c=3.0, kl_in="loss", kl_estimator="k3",
                      importance_weight="differentiable"),
             reinforce_pp=dict(beta=0.1, kl_in="loss", kl_estimator="k2"),
             rloo=dict(beta=0.1, kl_in="loss", kl_estimator="k1", importance_weight="differentiable"),
             rapo=dict(alpha=0.0, entropy_coef=0.01))  # its SG(w)·k3 term: enumeration tests


@pytest.mark.parametrize("name", NAMES)
def test_check_grads(x64, name):
    batch = make_batch(dtype=jnp.float64)
    f = objectives.get(name)
    if name.startswith("rpg_rf_"):
        # REINFORCE form: w = SG(π/π_old); moving old_logp with logp keeps w fixed, so the value is
        # exactly −weight·logp and finite differences can check the gradient.
        shift = batch["old_logp"] - batch["logp"]
        fn = lambda x: f(dict(batch, logp=x, old_logp=x + shift), **FD_HP[name])[0]
    else:
        fn = lambda x: f(dict(batch, logp=x), **FD_HP[name])[0]
    check_grads(fn, (batch["logp"],), order=1, modes=("rev",))


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_change_nothing(name):
    batch = make_batch()
    garbage = dict(batch)
    m = batch["mask"] > 0
    for k in ("logp", "old_logp", "ref_logp", "teacher_logp"):
        garbage[k] = jnp.where(m, batch[k], jnp.nan if k != "logp" else 1e3)
    f = objectives.get(name)
    v1, g1 = jax.value_and_grad(lambda x: f(dict(batch, logp=x), **HP[name])[0])(batch["logp"])
    v2, g2 = jax.value_and_grad(lambda x: f(dict(garbage, logp=x), **HP[name])[0])(garbage["logp"])
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(g2)[~np.asarray(m)] == 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_old_ref_teacher_get_zero_gradient(name):
    batch = make_batch()
    f = objectives.get(name)
    keys = ("old_logp", "ref_logp", "teacher_logp", "advantages", "ref_logits")
    grads = jax.grad(lambda sub: f(dict(batch, **sub), **HP[name])[0])({k: batch[k] for k in keys})
    for k in keys:
        assert np.all(np.asarray(grads[k]) == 0.0), k


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grad(name):
    f = objectives.get(name)
    return jax.jit(jax.value_and_grad(lambda lp, lg, b: f(dict(b, logp=lp, logits=lg), **HP[name])[0],
                                      argnums=(0, 1)))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 1e2, 1e4]),
       all_masked=st.booleans(), zero_var=st.booleans())
def test_extreme_inputs_stay_finite(seed, scale, all_masked, zero_var):
    batch = make_batch(seed, spread=scale, scale=scale)
    batch["logp"] = batch["logp"] * scale
    if all_masked:
        batch["mask"] = batch["mask"].at[0].set(0.0)
    if zero_var:
        batch["advantages"] = jnp.zeros((B,))
    batch["logits"] = batch["logits"].at[0, 0, 0].set(-1e4).at[0, 0, 1].set(1e4)
    for name in NAMES:
        (v, (g_lp, g_lg)) = _jitted_value_and_grad(name)(batch["logp"], batch["logits"], batch)
        assert np.isfinite(float(v)), name
        assert np.all(np.isfinite(np.asarray(g_lp))) and np.all(np.isfinite(np.asarray(g_lg))), name


def test_grpo_with_exact_kl_extreme_logits_finite():
    batch = make_batch(scale=1e4)
    f = objectives.get("grpo")
    v, g = jax.value_and_grad(lambda lg: f(dict(batch, logits=lg), kl_estimator="exact")[0])(
        batch["logits"])
    assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


def test_zero_variance_group_rewards_give_zero_advantage_loss():
    batch = make_batch()
    batch = {k: v for k, v in batch.items() if k != "advantages"}
    batch["rewards"] = jnp.array([1.0, 1.0, 0.0, 0.0])
    loss, metrics = objectives.get("grpo")(dict(batch, old_logp=batch["logp"]), beta=0.0,
                                           group_size=2)
    assert float(loss) == 0.0
    assert float(metrics["frac_reward_zero_std"]) == 1.0


# ---------------------------------------------------------------- clipping ----

def _one_token(log_w, adv):
    return {"logp": jnp.full((1, 1), -1.0), "old_logp": jnp.full((1, 1), -1.0 - log_w),
            "mask": jnp.ones((1, 1)), "advantages": jnp.full((1,), adv)}


def test_dual_clip_caps_negative_advantage_loss():
    b = _one_token(np.log(10.0), -1.0)
    ppo = objectives.get("ppo")
    np.testing.assert_allclose(ppo(b, clip_c=3.0)[0], 3.0, rtol=1e-6)
    np.testing.assert_allclose(ppo(b)[0], 10.0, rtol=1e-5)
    g = jax.grad(lambda lp: ppo(dict(b, logp=lp), clip_c=3.0)[0])(b["logp"])
    assert float(g[0, 0]) == 0.0


def test_dapo_clip_higher_keeps_gradient_ppo_clips():
    b = _one_token(np.log(1.25), 1.0)
    grad = lambda name: jax.grad(lambda lp: objectives.get(name)(dict(b, logp=lp))[0])(b["logp"])
    assert float(grad("ppo")[0, 0]) == 0.0
    np.testing.assert_allclose(grad("dapo")[0, 0], -1.25, rtol=1e-5)
    _, m = objectives.get("ppo")(b)
    assert float(m["clip_ratio/high_mean"]) == 1.0 and float(m["clip_ratio/low_mean"]) == 0.0
    assert float(m["clip_ratio/region_mean"]) == 1.0


def test_grpo_seq_mean_token_mean_tunix_golden():
    """tunix: ratio 1, A = 1.5 on 3 tokens and 3.0 on 1 token → −2.25 (−1.875 if per-row wrong)."""
    b = {"logp": jnp.zeros((2, 3)) - 1.0, "mask": jnp.array([[1.0, 1, 1], [1, 0, 0]]),
         "advantages": jnp.array([1.5, 3.0])}
    np.testing.assert_allclose(objectives.get("grpo")(b, beta=0.0)[0], -2.25, rtol=1e-6)


def test_dr_grpo_divides_by_batch_times_max_length():
    b = {"logp": jnp.zeros((2, 4)) - 1.0, "mask": jnp.array([[1.0, 1, 1, 0], [1, 0, 0, 0]]),
         "advantages": jnp.array([1.0, 2.0])}
    np.testing.assert_allclose(objectives.get("dr_grpo")(b)[0], -(3 * 1 + 2) / (2 * 4), rtol=1e-6)


def test_dapo_overlong_penalty():
    out = policy.dapo_overlong_penalty(jnp.array([10, 12, 14, 16, 30]), max_length=16,
                                       cache_length=4)
    np.testing.assert_allclose(out, [0.0, 0.0, -0.5, -1.0, -1.0])


def test_metrics_use_trl_names():
    batch = make_batch()
    batch = {k: v for k, v in batch.items() if k != "advantages"}
    batch["rewards"] = jnp.array([1.0, 0.0, 1.0, 1.0])
    _, m = objectives.get("grpo")(batch, group_size=2)
    for k in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
              "clip_ratio/region_mean", "reward", "reward_std", "frac_reward_zero_std",
              "completions/mean_length", "policy/loss"):
        assert k in m, k
    np.testing.assert_allclose(m["frac_reward_zero_std"], 0.5)
    np.testing.assert_allclose(m["completions/mean_length"], (3 + 2 + 3 + 1) / 4)


# --------------------------------------------------------------- bad input ----

BAD = [
    ("grpo", dict(kl_estimator="k4"), "kl_estimator"),
    ("grpo", dict(kl_in="advantage"), "kl_in"),
    ("grpo", dict(loss_agg="sum"), "loss_agg"),
    ("grpo", dict(importance_weight="yes"), "importance_weight"),
    ("grpo", dict(beta=-0.1), "beta"),
    ("ppo", dict(clip_eps_low=0.0), "clip_eps_low"),
    ("dapo", dict(clip_eps_high=-0.1), "clip_eps_high"),
    ("ppo", dict(clip_c=1.0), "clip_c"),
    ("rpg_urkl", dict(clip_eps_low=0.2, clip_c=0.5), "clip_c"),
    ("rpg_rf_fkl", dict(beta=-1.0), "beta"),
    ("pmd_mean", dict(tau=0.0), "tau"),
    ("kdrl", dict(kd_coef=-1.0), "kd_coef"),
    ("kdrl", dict(kd_estimator="exact"), "kd_estimator"),
    ("rapo", dict(alpha=-1.0), "alpha"),
    ("apo", dict(beta=0.0), "beta"),
    ("ppo", dict(kl_in="reward", importance_weight="differentiable"), "importance_weight"),
]


@pytest.mark.parametrize("name,hp,word", BAD, ids=lambda x: str(x))
def test_bad_hyperparameters_name_the_argument(name, hp, word):
    with pytest.raises(ValueError, match=word):
        objectives.get(name)(make_batch(), **hp)


def test_bad_batches_name_the_field():
    batch = make_batch()
    with pytest.raises(ValueError, match="old_logp"):
        objectives.get("ppo")(dict(batch, old_logp=jnp.zeros((B, T + 1))))
    with pytest.raises(ValueError, match="advantages"):
        objectives.get("ppo")(dict(batch, advantages=jnp.zeros((B + 1,))))
    no_ref = {k: v for k, v in batch.items() if k != "ref_logp"}
    with pytest.raises(ValueError, match="ref_logp"):
        objectives.get("grpo")(no_ref, beta=0.1)
    no_teacher = {k: v for k, v in batch.items() if k != "teacher_logp"}
    with pytest.raises(ValueError, match="teacher_logp"):
        objectives.get("kdrl")(no_teacher)
    no_logits = {k: v for k, v in batch.items() if k != "ref_logits"}
    with pytest.raises(ValueError, match="logits"):
        objectives.get("grpo")(no_logits, kl_estimator="exact")
    no_adv = {k: v for k, v in batch.items() if k != "advantages"}
    with pytest.raises(ValueError, match="advantages"):
        objectives.get("grpo")(no_adv)
    with pytest.raises(ValueError, match="group_size"):
        objectives.get("grpo")(dict(no_adv, rewards=jnp.ones((B,))))


@pytest.mark.parametrize("name", ["grpo", "rpg_urkl", "pmd_mean"])
def test_micro_batch_accumulation_equals_full_batch(name):
    """Per-sequence means over two equal micro-batches average to the full-batch loss/gradient."""
    batch = make_batch()
    f = objectives.get(name)
    hp = dict(HP[name], loss_agg="seq-mean-token-sum")
    batch["mask"] = jnp.ones((B, T))  # every row counts, so each half holds B/2 rows
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    full = jax.value_and_grad(lambda x: f(dict(batch, logp=x), **hp)[0])(batch["logp"])
    parts = [jax.value_and_grad(lambda x, h=h: f(dict(h, logp=x), **hp)[0])(h["logp"]) for h in halves]
    np.testing.assert_allclose(full[0], (parts[0][0] + parts[1][0]) / 2, rtol=1e-5)
    np.testing.assert_allclose(full[1], jnp.concatenate([parts[0][1], parts[1][1]]) / 2,
                               rtol=1e-5, atol=1e-7)
