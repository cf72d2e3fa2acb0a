"""Advantage estimators and reward shaping for the policy objectives.

Rewards are ``[B]`` with the ``G`` responses of one prompt stored consecutively (``B = n·G``).
Everything here is a constant for the policy gradient: callers (and the objectives) treat the
outputs as stop-gradient data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kljax import ops


def _groups(rewards, group_size: int):
    """Reshape ``[B]`` rewards to ``[B // G, G]``; errors name ``group_size`` when B is not a multiple."""
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape [B], got {list(rewards.shape)}")
    ops.check_range("group_size", group_size, 1)
    if rewards.shape[0] % int(group_size):
        raise ValueError(
            f"group_size={group_size} must divide the number of rewards B={rewards.shape[0]}"
        )
    return rewards.reshape(-1, int(group_size))


def group_mean(rewards, group_size: int):
    """A_i = r_i − mean_{j in group(i)} r_j (Dr. GRPO; RPG's outcome advantage)."""
    g = _groups(rewards, group_size)
    return (g - g.mean(axis=-1, keepdims=True)).reshape(-1)


def group_normalized(rewards, group_size: int, eps: float = 1e-6, ddof: int = 1):
    """GRPO: A_i = (r_i − mean_group r) / (std_group r + eps) (DeepSeekMath, arXiv 2402.03300).

    ``ddof=1`` and ``eps=1e-6`` follow tunix. A group whose rewards are all equal gets A = 0
    exactly (its numerator is 0), not NaN, also when G = 1.
    """
    g = _groups(rewards, group_size)
    centered = g - g.mean(axis=-1, keepdims=True)
    n = g.shape[-1]
    var = jnp.sum(centered**2, axis=-1, keepdims=True) / max(n - ddof, 1)
    return (centered / (jnp.sqrt(var) + eps)).reshape(-1)


def leave_one_out(rewards, group_size: int):
    """RLOO: A_i = r_i − (1/(G−1)) Σ_{j≠i} r_j = G/(G−1)·(r_i − mean_group r) (Kool et al. 2019).

    Needs ``group_size ≥ 2`` (with one sample there is no other sample to form a baseline).
    """
    ops.check_range("group_size", group_size, 2)
    g = _groups(rewards, group_size)
    n = g.shape[-1]
    return ((g - g.mean(axis=-1, keepdims=True)) * (n / (n - 1))).reshape(-1)


def batch_normalized(values, mask=None, eps: float = 1e-8):
    """REINFORCE++ global normalization: (A − mean_batch A)/std_batch A over unmasked entries.

    ``values`` is ``[B]`` or ``[B, T]`` (then ``mask`` selects the counted tokens); masked
    entries come back as 0. An all-equal batch returns 0, not NaN.
    """
    values = jnp.asarray(values)
    if mask is None:
        mask = jnp.ones(values.shape, values.dtype)
    ops.check_same_shape(values=values, mask=mask)
    return ops.masked_whiten(values, mask, eps=eps)


def reward_to_go(token_rewards, mask):
    """G_t = Σ_{s≥t} m_s·r_s over the masked tokens of each row (γ = 1), ``[B, T]`` → ``[B, T]``."""
    ops.check_same_shape(token_rewards=token_rewards, mask=mask)
    r = jnp.where(mask > 0, token_rewards, 0.0)
    return jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1)


def kl_penalized_returns(rewards, kl_per_token, mask, beta: float):
    """Outcome reward with a per-token KL reward, as a reward-to-go (InstructGPT, REINFORCE++).

    Token rewards r_t = 1[t = last]·R − β·kl_t, returns G_t = R − β Σ_{s≥t} kl_s (γ = 1).
    With kl_t = k1 = log π(y_t|h_t) − log π_ref(y_t|h_t), stop-gradient, and samples from π,
    E[Σ_t G_t ∇log π(y_t|h_t)] = ∇(E[R] − β·KL(π‖π_ref)) for the *sequence* KL: each token's
    score is multiplied by the KL of the tokens after it, the term a per-token KL loss drops
    (Tang & Munos 2025, arXiv 2506.09477). ``rewards`` is ``[B]`` (or ``[B, T]``, already
    per token-constant); the output is ``[B, T]`` and stop-gradient.
    """
    ops.check_range("beta", beta, 0.0)
    mask = jnp.asarray(mask)
    rewards = jnp.asarray(rewards)
    if rewards.ndim == 1:
        rewards = jnp.broadcast_to(rewards[:, None], mask.shape)
    ops.check_same_shape(rewards=rewards, kl_per_token=kl_per_token, mask=mask)
    penalty = reward_to_go(jax.lax.stop_gradient(kl_per_token), mask)
    return jax.lax.stop_gradient(jnp.where(mask > 0, rewards - beta * penalty, 0.0))


def gae(token_rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation GAE(γ, λ) (Schulman et al. 2016, arXiv 1506.02438).

    On the right-padded completions of ``[B, T]`` arrays, with V(h_T) = 0 after the last real token:

        δ_t = r_t + γ·m_{t+1}·V(h_{t+1}) − V(h_t),    A_t = δ_t + γλ·m_{t+1}·A_{t+1},

    ``values[:, t]`` = V(h_t), the critic's value of the prefix *before* token t is chosen, and
    ``token_rewards[:, t]`` the reward received for token t (e.g. the outcome on the last token minus
    β·kl_t, InstructGPT's per-token KL penalty). Returns ``(advantages, returns)`` with
    returns = A + V (the critic's regression target), both ``[B, T]``, stop-gradient, 0 where masked.
    λ = 1 gives Σ_{s≥t} γ^{s−t} r_s − V(h_t) (Monte Carlo); λ = 0 gives the one-step TD residual δ_t.
    """
    ops.check_range("gamma", gamma, 0.0, 1.0)
    ops.check_range("lam", lam, 0.0, 1.0)
    ops.check_same_shape(token_rewards=token_rewards, values=values, mask=mask)
    m = (jnp.asarray(mask) > 0).astype(jnp.result_type(token_rewards, values, float))
    r = jax.lax.stop_gradient(jnp.where(m > 0, token_rewards, 0.0)).astype(m.dtype)
    v = jax.lax.stop_gradient(jnp.where(m > 0, values, 0.0)).astype(m.dtype)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    delta = (r + gamma * next_m * next_v - v) * m

    def step(carry, xs):
        d, nm = xs
        a = d + gamma * lam * nm * carry
        return a, a

    _, adv = jax.lax.scan(step, jnp.zeros_like(delta[:, 0]), (delta.T, next_m.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m


def adaptive_kl_beta(beta, kl, target: float, horizon: float, n_steps: int):
    """Adaptive KL coefficient of Ziegler et al. 2019 (arXiv 1909.08593, §2.2), a pure function.

        e = clip(KL/target − 1, −0.2, 0.2),    β ← β·(1 + e·n_steps/horizon)

    ``kl`` is the measured KL(π‖π_ref) of the last batch (nats per sequence), ``n_steps`` the number
    of samples (or steps) it covered, ``target`` the wanted KL, ``horizon`` how many samples the
    correction takes. Keeping β fixed is ``horizon = inf``.
    """
    ops.check_range("target", target, 0.0, low_open=True)
    ops.check_range("horizon", horizon, 0.0, low_open=True)
    err = jnp.clip(jnp.asarray(kl) / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + err * n_steps / horizon)


def pmd_partition_baseline(rewards, group_size: int, tau: float):
    """PMD-partition: b_i = τ·log((1/(G−1)) Σ_{j≠i} exp(r_j/τ)), leave-one-out log-mean-exp.

    Returns the advantages r_i − b_i (arXiv 2602.05933, OpenKimi ``ploo``); its population
    target is the tilt π ∝ π_old·exp(r/τ).
    """
    ops.check_range("tau", tau, 0.0, low_open=True)
    ops.check_range("group_size", group_size, 2)
    g = _groups(rewards, group_size) / tau
    n = g.shape[-1]
    others = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, g[:, None, :])  # [n_groups, G, G]
    b = tau * (jax.nn.logsumexp(others, axis=-1) - jnp.log(n - 1.0))
    return (tau * g - b).reshape(-1)


def apo_value_star(ref_rewards, beta1: float):
    """A*-PO stage 1: V̂*(x) = β1·log((1/N) Σ_j exp(r_j/β1)) from N reference samples.

    ``ref_rewards`` is ``[B, N]``. ``beta1 = 0`` gives the plain mean (the β1 → 0⁺ limit is the
    max; A*-PO's code uses the mean there), ``beta1 < 0`` gives 0, as in the A*-PO code
    (arXiv 2505.20686, ``rl_dataset.py``). V* = β log E_{π_ref}[exp(r/β)] is the optimal value
    of max E[r] − β·KL(π‖π_ref).
    """
    r = jnp.asarray(ref_rewards)
    if r.ndim != 2:
        raise ValueError(f"ref_rewards must have shape [B, N], got {list(r.shape)}")
    b = float(beta1)
    if b < 0:
        return jnp.zeros(r.shape[:1], r.dtype)
    if b == 0:
        return r.mean(axis=-1)
    return b * (jax.nn.logsumexp(r / b, axis=-1) - jnp.log(r.shape[-1]))


def reward_metrics(rewards, group_size: int = 1):
    """TRL's reward metrics: ``reward``, ``reward_std``, ``frac_reward_zero_std``."""
    g = _groups(rewards, group_size)
    std = g.std(axis=-1)
    return {
        "reward": jnp.mean(g),
        "reward_std": jnp.std(g),
        "frac_reward_zero_std": jnp.mean((std == 0).astype(jnp.float32)),
    }
