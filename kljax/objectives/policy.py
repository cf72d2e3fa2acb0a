"""Policy-gradient objectives for KL-regularized RL on language models.

Every objective is ``loss, metrics = objective(batch, **hparams)``. ``batch`` maps
``logp`` (log π_θ(y_t|h_t), differentiable), ``old_logp`` (sampling policy π_old), ``ref_logp``
(reference π_ref), ``mask`` (all ``[B, T]``), ``advantages`` (``[B]`` or ``[B, T]``) or ``rewards``
(``[B]``, then the objective's own advantage estimator runs with ``group_size``), and optionally
``logits``/``ref_logits`` ``[B, T, V]`` (exact KL, entropy) and ``teacher_logp`` (KDRL).
``old_logp``, ``ref_logp``, ``teacher_logp`` and the advantages are wrapped in ``stop_gradient``
here. A missing ``old_logp`` means on-policy (π_old = SG(π_θ)).

Notation: ℓ = log π_θ(y), w = π_θ/π_old (token ratio), L = log(π_θ/π_ref), ρ = π_ref/π_θ.

KL placement and what its *expected* gradient follows (proved by enumeration in
``tests/test_kl_gradient_table.py``; reference/policy_gradient.md §1.2):

* ``kl_in="loss"``: per-token loss β·c·k(ℓ, ℓ_ref), c = 1 (``importance_weight="none"``),
  w (``"differentiable"``) or SG(w) (``"stop_gradient"``), samples y ~ π_old:

  ====  ==============  ======================  =====================  ========================
  est.  on-policy       off-policy, c = 1       off-policy, c = w      off-policy, c = SG(w)
  ====  ==============  ======================  =====================  ========================
  k1    zero            neither                 reverse KL(π‖π_ref)    zero
  k2    reverse         neither                 neither                reverse
  k3    forward         neither                 reverse                forward KL(π_ref‖π)
  ====  ==============  ======================  =====================  ========================

  ``exact`` (needs ``logits``/``ref_logits``) differentiates KL(π(·|h)‖π_ref(·|h)) at each
  visited state: reverse, per state.
* ``kl_in="reward"``: the per-token estimate, stop-gradient and evaluated at the current π_θ, is a
  reward: the advantage of token t becomes A_t − β Σ_{s≥t} k_s (reward-to-go,
  ``advantages.kl_penalized_returns``) and goes through the objective's policy-gradient term (whose
  ratio w corrects off-policy sampling). k1: reverse (for the whole *sequence* KL, Tang & Munos
  2025); k2, k3: neither. ``importance_weight`` must stay ``"none"`` there (the PG ratio weighs it).

Log-ratios are clamped to ±20 before any ``exp`` (as verl and tunix do): e^20 ≈ 5e8 already
means the sample is far outside any trust region, and the clamp keeps values and gradients finite
for log-prob differences of 1e4 (the gradient is zero beyond the clamp).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from kljax import divergences, ops
from kljax.objectives import advantages as adv_lib
from kljax.objectives import register

SG = jax.lax.stop_gradient
LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3", "exact")
KL_PLACEMENTS = ("reward", "loss")
IMPORTANCE_WEIGHTS = ("none", "differentiable", "stop_gradient")
RPG_KINDS = ("fkl", "rkl", "ufkl", "urkl")


# --------------------------------------------------------------------------------------------
# Inputs and checks
# --------------------------------------------------------------------------------------------

def _masked(x, mask):
    """Zero masked positions so whatever they hold (even NaN) reaches neither value nor gradient."""
    return jnp.where(mask > 0, x, 0.0)


def _inputs(batch, *, need_ref: bool = False, need_teacher: bool = False):
    """Validated, masked ``(logp, old_logp, ref_logp, teacher_logp, mask)``; the last three are SG."""
    if "logp" not in batch or "mask" not in batch:
        raise ValueError("batch must contain 'logp' and 'mask' ([B, T] arrays)")
    logp = jnp.asarray(batch["logp"])
    mask = jnp.asarray(batch["mask"]).astype(logp.dtype)
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [B, T], got {list(logp.shape)}")
    old = batch.get("old_logp")
    ref = batch.get("ref_logp")
    teacher = batch.get("teacher_logp")
    if need_ref and ref is None:
        raise ValueError("batch['ref_logp'] is required when beta > 0 (KL to the reference)")
    if need_teacher and teacher is None:
        raise ValueError("batch['teacher_logp'] ([B, T]) is required by this objective")
    ops.check_same_shape(logp=logp, mask=mask, old_logp=old, ref_logp=ref, teacher_logp=teacher)
    logp = _masked(logp, mask)
    old = SG(logp) if old is None else SG(_masked(jnp.asarray(old, logp.dtype), mask))
    ref = None if ref is None else SG(_masked(jnp.asarray(ref, logp.dtype), mask))
    teacher = None if teacher is None else SG(_masked(jnp.asarray(teacher, logp.dtype), mask))
    return logp, old, ref, teacher, mask


def _token_advantages(batch, mask, default_fn: Optional[Callable], group_size):
    """Advantages broadcast to ``[B, T]`` (SG, masked); from ``rewards`` via ``default_fn`` if absent."""
    a = batch.get("advantages")
    if a is None:
        if batch.get("rewards") is None or default_fn is None:
            raise ValueError("batch needs 'advantages' ([B] or [B, T]) or 'rewards' ([B])")
        if group_size is None:
            raise ValueError("group_size is required to compute advantages from batch['rewards']")
        a = default_fn(jnp.asarray(batch["rewards"]), group_size)
    a = jnp.asarray(a, mask.dtype)
    if a.ndim == 1:
        if a.shape[0] != mask.shape[0]:
            raise ValueError(f"advantages[{a.shape[0]}] must have B={mask.shape[0]} entries")
        a = jnp.broadcast_to(a[:, None], mask.shape)
    ops.check_same_shape(advantages=a, mask=mask)
    return SG(_masked(a, mask))


def _active(coef) -> bool:
    """False only for a Python/NumPy zero; a traced coefficient (a schedule) counts as active."""
    if isinstance(coef, jax.core.Tracer) or isinstance(coef, jax.Array):
        return True
    return float(coef) != 0.0


def _log_ratio(logp, old_logp):
    """log(π_θ/π_old), clamped to ±20 (see module docstring)."""
    return jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _check_kl_args(beta, kl_estimator, kl_in, importance_weight):
    ops.check_range("beta", beta, 0.0)
    ops.check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    ops.check_choice("kl_in", kl_in, KL_PLACEMENTS)
    ops.check_choice("importance_weight", importance_weight, IMPORTANCE_WEIGHTS)


def _check_clip_args(clip_eps_low, clip_eps_high, clip_c):
    if clip_eps_low is not None:
        ops.check_range("clip_eps_low", clip_eps_low, 0.0, low_open=True)
    if clip_eps_high is not None:
        ops.check_range("clip_eps_high", clip_eps_high, 0.0, low_open=True)
    if clip_c is not None:
        ops.check_range("clip_c", clip_c, 1.0, low_open=True)


# --------------------------------------------------------------------------------------------
# KL terms
# --------------------------------------------------------------------------------------------

def kl_estimate(logp, target_logp, estimator: str, logits=None, target_logits=None):
    """Per-token estimate of KL(π‖π_target) at the sampled token: k1, k2, k3 or exact.

    ``exact`` sums over the vocabulary from ``logits``/``target_logits`` ``[B, T, V]``.
    k3's log-ratio is clamped to ±20 before ``exp`` (verl does the same).
    """
    ops.check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    if estimator == "k1":
        return divergences.k1(logp, target_logp)
    if estimator == "k2":
        return divergences.k2(logp, target_logp)
    if estimator == "k3":
        d = jnp.clip(target_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return jnp.expm1(d) - d
    if logits is None or target_logits is None:
        raise ValueError("kl_estimator='exact' needs batch['logits'] and batch['ref_logits'] [B, T, V]")
    ops.check_leading_shape(logp.shape, logits=logits, ref_logits=target_logits)
    return divergences.kl(logits, SG(target_logits))


def _weighted(value, log_ratio, importance_weight):
    """c·value with c = 1, w (differentiable) or SG(w), w = exp(log_ratio)."""
    if importance_weight == "none":
        return value
    w = jnp.exp(log_ratio)
    return (w if importance_weight == "differentiable" else SG(w)) * value


def _kl_pieces(batch, logp, ref, log_ratio, mask, *, beta, kl_estimator, kl_in, importance_weight):
    """``(per_token_kl_loss, reward_penalty_to_go, kl_value)`` for the reference-KL term."""
    zeros = jnp.zeros_like(logp)
    if ref is None:
        return zeros, zeros, None
    value = kl_estimate(logp, ref, kl_estimator, batch.get("logits"), batch.get("ref_logits"))
    value = _masked(value, mask)
    if not _active(beta):
        return zeros, zeros, value
    if kl_in == "loss":
        return beta * _weighted(value, log_ratio, importance_weight), zeros, value
    return zeros, beta * adv_lib.reward_to_go(SG(value), mask), value


# --------------------------------------------------------------------------------------------
# Policy-gradient terms
# --------------------------------------------------------------------------------------------

def _dual_clip_pg(adv, log_ratio, eps_low, eps_high, clip_c):
    """Per-token −min(wA, clip(w)A), with dual clip max(·, cA) for A < 0 (Ye et al. 2020)."""
    w = jnp.exp(log_ratio)
    if eps_low is None:
        return -adv * w, {}
    eps_high = eps_low if eps_high is None else eps_high
    pg1 = -adv * w
    pg2 = -adv * jnp.clip(w, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(pg1, pg2)
    if clip_c is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * clip_c), loss)
    low = (w < 1.0 - eps_low) & (adv < 0)
    high = (w > 1.0 + eps_high) & (adv > 0)
    return loss, {"low": low, "high": high}


def _common_metrics(batch, logp, mask, kl_value, clips, group_size=None):
    m = {"completions/mean_length": jnp.mean(jnp.sum(mask, axis=-1))}
    if kl_value is not None:
        m["kl"] = ops.masked_mean(SG(kl_value), mask)
    if batch.get("logits") is not None:
        m["entropy"] = ops.masked_mean(SG(ops.entropy(batch["logits"])), mask)
    if clips:
        lo = ops.masked_mean(clips["low"].astype(mask.dtype), mask)
        hi = ops.masked_mean(clips["high"].astype(mask.dtype), mask)
        m.update({"clip_ratio/low_mean": lo, "clip_ratio/high_mean": hi,
                  "clip_ratio/region_mean": lo + hi})
    if batch.get("rewards") is not None:
        r = jnp.asarray(batch["rewards"])
        m.update(adv_lib.reward_metrics(r, int(group_size or r.shape[0])))
    return m


def _ppo_family(batch, *, beta, kl_estimator, kl_in, importance_weight, clip_eps_low,
                clip_eps_high, clip_c, loss_agg, loss_agg_norm, adv_fn, group_size,
                normalize=False, extra_loss=None):
    """Shared body of ppo/grpo/dr_grpo/dapo/reinforce_pp/kdrl/rapo."""
    _check_kl_args(beta, kl_estimator, kl_in, importance_weight)
    _check_clip_args(clip_eps_low, clip_eps_high, clip_c)
    ops.check_choice("loss_agg", loss_agg, ops.LOSS_AGG_MODES)
    if kl_in == "reward" and importance_weight != "none":
        raise ValueError("importance_weight applies to kl_in='loss'; with kl_in='reward' the KL "
                         "reward is weighted by the policy-gradient ratio; use importance_weight='none'")
    logp, old, ref, teacher, mask = _inputs(batch, need_ref=_active(beta),
                                            need_teacher=extra_loss is not None and extra_loss[0])
    adv = _token_advantages(batch, mask, adv_fn, group_size)
    lr = _log_ratio(logp, old)
    kl_loss, kl_penalty, kl_value = _kl_pieces(batch, logp, ref, lr, mask, beta=beta,
                                               kl_estimator=kl_estimator, kl_in=kl_in,
                                               importance_weight=importance_weight)
    adv = adv - kl_penalty
    if normalize:
        adv = adv_lib.batch_normalized(adv, mask)
    pg, clips = _dual_clip_pg(adv, lr, clip_eps_low, clip_eps_high, clip_c)
    per_token = pg + kl_loss
    metrics = _common_metrics(batch, logp, mask, kl_value, clips, group_size)
    if extra_loss is not None:
        extra, extra_metrics = extra_loss[1](logp, ref, teacher, lr, mask)
        per_token = per_token + extra
        metrics.update(extra_metrics)
    loss = ops.aggregate(per_token, mask, loss_agg, loss_agg_norm)
    metrics["policy/loss"] = SG(ops.aggregate(pg, mask, loss_agg, loss_agg_norm))
    return loss, metrics


# --------------------------------------------------------------------------------------------
# REINFORCE / RLOO
# --------------------------------------------------------------------------------------------

def _reinforce_body(batch, *, beta, kl_estimator, kl_in, importance_weight, loss_agg,
                    loss_agg_norm, adv_fn, group_size):
    _check_kl_args(beta, kl_estimator, kl_in, importance_weight)
    logp, old, ref, _, mask = _inputs(batch, need_ref=_active(beta))
    adv = _token_advantages(batch, mask, adv_fn, group_size)
    lr = _log_ratio(logp, old)
    kl_loss, kl_penalty, kl_value = _kl_pieces(batch, logp, ref, lr, mask, beta=beta,
                                               kl_estimator=kl_estimator, kl_in=kl_in,
                                               importance_weight=importance_weight)
    adv = adv - kl_penalty
    if importance_weight == "differentiable":
        pg = -jnp.exp(lr) * adv
    elif importance_weight == "stop_gradient":
        pg = -SG(jnp.exp(lr)) * adv * logp
    else:
        pg = -adv * logp
    loss = ops.aggregate(pg + kl_loss, mask, loss_agg, loss_agg_norm)
    metrics = _common_metrics(batch, logp, mask, kl_value, {}, group_size)
    metrics["policy/loss"] = SG(ops.aggregate(pg, mask, loss_agg, loss_agg_norm))
    return loss, metrics


@register("reinforce", "policy")
def reinforce(batch, *, beta=0.0, kl_estimator="k1", kl_in="reward", importance_weight="none",
              loss_agg="seq-mean-token-sum", loss_agg_norm=None, group_size=None):
    """REINFORCE (Williams 1992): L = −Σ_t c_t·A_t·log π_θ(y_t|h_t), plus the KL term.

    ∇L = −E[A ∇log π] on-policy (c = 1). Off-policy: ``importance_weight="stop_gradient"`` uses
    c = SG(w), ``"differentiable"`` the ratio form −w·A (same gradient); the weight also applies
    to a ``kl_in="loss"`` term. Default KL: k1 in reward (reward-to-go) ⇒ ∇ of
    −(E[R] − β·KL(π‖π_ref)) for the sequence KL (module docstring for every combination).
    Advantages default to group mean (needs ``group_size``) when only rewards are given.
    """
    return _reinforce_body(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                           importance_weight=importance_weight, loss_agg=loss_agg,
                           loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_mean,
                           group_size=group_size)


@register("rloo", "policy")
def rloo(batch, *, beta=0.0, kl_estimator="k1", kl_in="reward", importance_weight="none",
         loss_agg="seq-mean-token-sum", loss_agg_norm=None, group_size=None):
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): REINFORCE with A_i = r_i − mean_{j≠i} r_j.

    Same loss and KL options as ``reinforce``; from ``batch['rewards']`` the leave-one-out
    advantage is computed with ``group_size``. The baseline has zero expected gradient, so the
    expected gradient is −∇(E[R] − β·KL) as for REINFORCE.
    """
    return _reinforce_body(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                           importance_weight=importance_weight, loss_agg=loss_agg,
                           loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.leave_one_out,
                           group_size=group_size)


# --------------------------------------------------------------------------------------------
# PPO family
# --------------------------------------------------------------------------------------------

@register("ppo", "policy")
def ppo(batch, *, beta=0.0, kl_estimator="k1", kl_in="reward", importance_weight="none",
        clip_eps_low=0.2, clip_eps_high=None, clip_c=None, loss_agg="token-mean",
        loss_agg_norm=None, group_size=None):
    """PPO-clip (Schulman et al. 2017) with optional dual clip (Ye et al. 2020).

    ℓ_t = max(−w A, −clip(w, 1−ε_low, 1+ε_high) A), and for A < 0 min(ℓ_t, −c A).
    Inside the trust region ∇ℓ = −w A ∇log π, so E_old[∇ℓ] = −∇E_π[A] (w = 1 on-policy).
    KL: default k1 in reward (InstructGPT) ⇒ reverse KL(π‖π_ref); other combinations: module
    docstring. ``clip_eps_high`` defaults to ``clip_eps_low``; ``clip_c`` > 1 or None.
    """
    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_mean,
                       group_size=group_size)


@register("grpo", "policy")
def grpo(batch, *, beta=0.04, kl_estimator="k3", kl_in="loss", importance_weight="none",
         clip_eps_low=0.2, clip_eps_high=None, clip_c=None, loss_agg="seq-mean-token-mean",
         loss_agg_norm=None, group_size=None):
    """GRPO (DeepSeekMath, arXiv 2402.03300): PPO-clip on A = (r − mean_G r)/std_G r, plus β·k3 loss.

    J = E[(1/G)Σ_i (1/|o_i|)Σ_t min(w Â, clip(w)Â) − β·k3(π_ref/π_θ)].
    Caution (tests prove it): the paper's default, k3 *as loss* with no weight, has expected
    gradient ∇KL(π_ref‖π_θ) — the *forward* KL — on-policy, and neither KL off-policy.
    ``importance_weight="differentiable"`` (w·k3; RPG's correction, TRL
    ``use_bias_correction_kl``) follows the reverse KL(π‖π_ref); ``kl_estimator="k2"`` also does
    on-policy. Advantages from rewards: ``advantages.group_normalized``.
    """
    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_normalized,
                       group_size=group_size)


@register("dr_grpo", "policy")
def dr_grpo(batch, *, beta=0.0, kl_estimator="k3", kl_in="loss", importance_weight="none",
            clip_eps_low=0.2, clip_eps_high=None, clip_c=None,
            loss_agg="seq-mean-token-sum-norm", loss_agg_norm=None, group_size=None):
    """Dr. GRPO (Liu et al., arXiv 2503.20783): GRPO without the 1/|o| and std normalizations.

    J = E[(1/G)Σ_i (1/MAX_LEN)Σ_t min(w Â, clip(w)Â)], Â = r − mean_G r, no KL by default.
    Expected gradient on-policy: −∇E_π[Â]/MAX_LEN per token (unbiased, no length bias).
    """
    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_mean,
                       group_size=group_size)


@register("dapo", "policy")
def dapo(batch, *, beta=0.0, kl_estimator="k3", kl_in="loss", importance_weight="none",
         clip_eps_low=0.2, clip_eps_high=0.28, clip_c=None, loss_agg="token-mean",
         loss_agg_norm=None, group_size=None):
    """DAPO (arXiv 2503.14476): clip-higher (ε_low 0.2, ε_high 0.28), global token-mean, no KL.

    J = (1/Σ_i|o_i|) Σ_i Σ_t min(w Â, clip(w, 1−ε_low, 1+ε_high)Â), Â group-normalized.
    Expected gradient on-policy: −∇E_π[Â]. Dynamic sampling is a data step (drop groups with
    ``frac_reward_zero_std``); soft overlong punishment: ``dapo_overlong_penalty``.
    """
    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_normalized,
                       group_size=group_size)


def dapo_overlong_penalty(lengths, max_length: int, cache_length: int, factor: float = 1.0):
    """DAPO soft overlong punishment added to the reward.

    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|)/L_cache·factor up to L_max; −factor
    beyond L_max (the paper's −1 at factor 1).
    """
    ops.check_range("cache_length", cache_length, 0, low_open=True)
    ops.check_range("max_length", max_length, cache_length)
    ops.check_range("factor", factor, 0.0)
    exceed = jnp.asarray(lengths, jnp.float32) - (max_length - cache_length)
    return jnp.clip(-exceed / cache_length * factor, -factor, 0.0)


@register("reinforce_pp", "policy")
def reinforce_pp(batch, *, beta=1e-4, kl_estimator="k1", kl_in="reward",
                 importance_weight="none", clip_eps_low=0.2, clip_eps_high=None, clip_c=None,
                 loss_agg="token-mean", loss_agg_norm=None, group_size=None, normalize=True):
    """REINFORCE++ (Hu 2025, arXiv 2501.03262): PPO-clip, no critic, global batch normalization.

    A_t = R − β Σ_{s≥t} k1_s (k1 in reward as a reward-to-go, π_ref the SFT model), then
    A ← (A − mean_batch A)/std_batch A over all unmasked tokens (``normalize``). With
    ``normalize=False`` the expected gradient is −∇(E[R] − β·KL(π‖π_ref)) (sequence reverse KL).
    REINFORCE++-baseline: pass group-mean advantages (``advantages.group_mean``) and
    ``kl_in="loss", kl_estimator="k2"`` (reverse KL on-policy).
    """
    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=lambda r, g: r,
                       group_size=group_size if group_size is not None else 1,
                       normalize=normalize)


@register("kdrl", "policy")
def kdrl(batch, *, kd_coef=1e-3, kd_estimator="k2", beta=0.0, kl_estimator="k3", kl_in="loss",
         importance_weight="none", clip_eps_low=0.2, clip_eps_high=None, clip_c=None,
         loss_agg="seq-mean-token-mean", loss_agg_norm=None, group_size=None):
    """KDRL (arXiv 2506.02208): J = J_GRPO − β_kd·KL(π_θ‖π_T), teacher π_T from ``teacher_logp``.

    The KD term is β_kd·c·k(log π_θ, log π_T) per token on the student's own rollouts, with
    c from ``importance_weight``. ``kd_estimator="k2"`` (the paper's default): expected gradient
    ∇KL(π_θ‖π_T) (reverse, mode-seeking) on-policy; ``"k3"`` follows KL(π_T‖π_θ) instead
    (forward), see the module table. ``kd_coef`` may be annealed by the caller (5e-3 → 1e-3).
    """
    ops.check_range("kd_coef", kd_coef, 0.0)
    ops.check_choice("kd_estimator", kd_estimator, ("k1", "k2", "k3"))

    def kd_term(logp, ref, teacher, lr, mask):
        value = _masked(kl_estimate(logp, teacher, kd_estimator), mask)
        return (kd_coef * _weighted(value, lr, importance_weight),
                {"kd/kl": ops.masked_mean(SG(value), mask)})

    return _ppo_family(batch, beta=beta, kl_estimator=kl_estimator, kl_in=kl_in,
                       importance_weight=importance_weight, clip_eps_low=clip_eps_low,
                       clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                       loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_normalized,
                       group_size=group_size, extra_loss=(True, kd_term))


@register("rapo", "policy")
def rapo(batch, *, alpha=1e-3, entropy_coef=0.0, clip_eps_low=0.2, clip_eps_high=None,
         clip_c=None, loss_agg="seq-mean-token-mean", loss_agg_norm=None, group_size=None):
    """RAPO-style forward-KL regularization (arXiv 2510.03865): J = E[A] − α KL(π_ref‖π_θ) + c_H H(π_θ).

    The forward-KL term is α·SG(w)·k3(log π_θ, log π_ref) per token, samples from π_old. In one
    state (a bandit, or one token given its prefix h) its expected gradient is
    E_π[(1 − ρ)∇log π] = −Σ_y π_ref(y|h) ∇log π(y|h) = ∇KL(π_ref(·|h)‖π_θ(·|h)) exactly, on- and
    off-policy (``test_rapo_forward_kl_off_policy``). **On sequences** this is per state: with
    ``seq-mean-token-sum`` the expected gradient is Σ_h d_π(h)·∇KL(π_ref(·|h)‖π_θ(·|h)), the
    per-state forward KLs summed over the states the *policy* visits (d_π held constant), not
    ∇KL(π_ref(y)‖π_θ(y)) of the sequence distributions, whose per-state terms are weighted by the
    *reference's* visitation d_ref(h) instead (``test_rapo_sequences_per_state_forward_kl``; the
    README says the same of per-token reverse-KL losses). The sheet's estimator ρ log ρ − ρ + 1 is
    *not* used as the loss: its expected gradient is −Σ π_ref log ρ ∇log π, which is not the
    forward-KL gradient (``test_rapo_sheet_estimator_is_not_forward_kl``).

    Metric ``kl_forward``: token mean of SG(w)·(ρ log ρ − ρ + 1), ρ = π_ref/π_θ, an unbiased,
    non-negative estimate of the regularized KL(π_ref‖π_θ) per visited state (reference first).
    No ``kl`` key is logged: in TRL's naming that is the reverse KL(π_θ‖π_ref), which RAPO does
    not regularize.

    Reward-reweighted reference π_ref^{φ(r)}/Z (the paper's): pass
    ``batch['ref_logp'] = reweighted_reference_logp(ref_logp, phi_r)`` = φ(r)·log π_ref, an
    *unnormalized* reference π̃ = π_ref^{φ(r)}. The same estimator's expected gradient is then
    −Σ_y π̃(y)∇log π(y) = Z·∇KL(π̃/Z‖π_θ): the forward KL to the normalized reweighted reference,
    scaled by the constant Z = Σ_y π_ref(y)^{φ(r(y))}, so Z never has to be computed
    (``test_rapo_reweighted_reference_is_unnormalized_forward_kl``; exact for one step, per state
    on sequences as above). ``kl_forward`` then estimates the unnormalized KL
    Σ π̃ log(π̃/π) − Σ π̃ + 1.
    The entropy bonus needs ``batch['logits']``.
    """
    ops.check_range("alpha", alpha, 0.0)
    ops.check_range("entropy_coef", entropy_coef, 0.0)
    if _active(entropy_coef) and batch.get("logits") is None:
        raise ValueError("entropy_coef > 0 needs batch['logits'] [B, T, V]")
    if _active(alpha) and batch.get("ref_logp") is None:
        raise ValueError("batch['ref_logp'] is required when alpha > 0")

    def forward_kl_term(logp, ref, teacher, lr, mask):
        value = _masked(kl_estimate(logp, ref, "k3"), mask)
        w = SG(jnp.exp(lr))
        extra = alpha * w * value
        if _active(entropy_coef):
            extra = extra - entropy_coef * ops.entropy(batch["logits"])
        metrics = {}
        if ref is not None:
            log_rho = SG(jnp.clip(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            rho = jnp.exp(log_rho)
            fwd = _masked(w * (rho * log_rho - rho + 1.0), mask)
            metrics["kl_forward"] = ops.masked_mean(fwd, mask)
        return extra, metrics

    loss, metrics = _ppo_family(batch, beta=0.0, kl_estimator="k3", kl_in="loss",
                                importance_weight="none", clip_eps_low=clip_eps_low,
                                clip_eps_high=clip_eps_high, clip_c=clip_c, loss_agg=loss_agg,
                                loss_agg_norm=loss_agg_norm, adv_fn=adv_lib.group_normalized,
                                group_size=group_size, extra_loss=(False, forward_kl_term))
    metrics.pop("kl", None)  # the shared body's k3 mean estimates the reverse KL: not logged
    return loss, metrics


def reweighted_reference_logp(ref_logp, phi_r):
    """φ(r)·log π_ref: RAPO's reward-reweighted reference π_ref^{φ(r)} as *unnormalized* log-probs.

    ``ref_logp`` ``[B, T]`` (per token) or ``[B]``; ``phi_r`` ``[B]``, the weight φ(r) ≥ 0 of each
    sequence's reward (one scalar per row, broadcast over its tokens). Feed the result to ``rapo``
    as ``batch['ref_logp']``: its forward-KL term then follows Z·∇KL(π_ref^{φ(r)}/Z‖π_θ) without Z
    (see ``rapo``). Stop-gradient, like every reference.
    """
    ref = jnp.asarray(ref_logp)
    phi = jnp.asarray(phi_r, jnp.promote_types(ref.dtype, jnp.float32))
    if phi.ndim != 1 or ref.ndim not in (1, 2) or phi.shape[0] != ref.shape[0]:
        raise ValueError(f"phi_r has shape {list(phi.shape)} but must be [B] with B = ref_logp.shape[0] "
                         f"(ref_logp has shape {list(ref.shape)}, [B] or [B, T])")
    if ref.ndim == 2:
        phi = phi[:, None]
    # φ = 0 turns a −inf log-prob (a token the reference never emits) into 0 = log 1, not NaN.
    out = jnp.where(phi == 0, 0.0, phi * ref)
    return SG(out)


# --------------------------------------------------------------------------------------------
# RPG (Zhang et al., arXiv 2505.17508)
# --------------------------------------------------------------------------------------------

def _rpg_regularizer(kind, w, lr):
    """RPG Table 1/4 regularizers in terms of w = π_θ/π_old (KL to π_old, samples from π_old)."""
    if kind == "fkl":
        return -lr                    # −log π_θ + const: KL(π_old‖π_θ)
    if kind == "rkl":
        return w * lr                 # w log w: KL(π_θ‖π_old)
    if kind == "ufkl":
        return w - lr - 1.0           # forward k3: UKL(π_old‖π_θ)
    return w * (lr - 1.0) + 1.0       # w log w − w + 1: UKL(π_θ‖π_old)


def _rpg_differentiable(kind, batch, beta, clip_eps_low, clip_eps_high, clip_c, loss_agg,
                        loss_agg_norm, group_size):
    ops.check_range("beta", beta, 0.0)
    _check_clip_args(clip_eps_low, clip_eps_high, clip_c)
    logp, old, _, _, mask = _inputs(batch)
    adv = _token_advantages(batch, mask, adv_lib.group_mean, group_size)
    lr = _log_ratio(logp, old)
    w = jnp.exp(lr)
    pg, clips = _dual_clip_pg(adv, lr, clip_eps_low, clip_eps_high, clip_c)
    reg = _masked(_rpg_regularizer(kind, w, lr), mask)
    loss = ops.aggregate(pg + beta * reg, mask, loss_agg, loss_agg_norm)
    metrics = _common_metrics(batch, logp, mask, None, clips)
    metrics["kl"] = ops.masked_mean(SG(reg), mask)
    metrics["policy/loss"] = SG(ops.aggregate(pg, mask, loss_agg, loss_agg_norm))
    return loss, metrics


def _rpg_kl_weight(kind, w, lr, beta):
    """C_KL: the KL part of RPG Table 2's REINFORCE weight (weight = w·A + C_KL)."""
    if kind == "fkl":
        return beta * jnp.ones_like(w)
    if kind == "ufkl":
        return -beta * (w - 1.0)
    if kind == "rkl":
        return -beta * w * (lr + 1.0)
    return -beta * w * lr


def _rpg_reinforce(kind, batch, beta, clip_eps_low, clip_eps_high, clip_c, loss_agg,
                   loss_agg_norm, group_size):
    ops.check_range("beta", beta, 0.0)
    _check_clip_args(clip_eps_low, clip_eps_high, clip_c)
    logp, old, _, _, mask = _inputs(batch)
    adv = _token_advantages(batch, mask, adv_lib.group_mean, group_size)
    lr = SG(_log_ratio(logp, old))
    w = jnp.exp(lr)
    c_kl = _rpg_kl_weight(kind, w, lr, beta)
    weight = w * adv + c_kl
    active_loss = -weight * logp
    clips = {}
    if clip_eps_low is None:
        per_token = active_loss
    else:
        e1 = clip_eps_low
        e2 = clip_eps_low if clip_eps_high is None else clip_eps_high
        c = jnp.inf if clip_c is None else clip_c
        nll = SG(-logp)
        pos = weight >= 0  # sign(A') = sign(weight) because w > 0
        active = jnp.where(pos, w < 1.0 + e2, (w > 1.0 - e1) & (w < c))
        frozen = jnp.where(
            pos, (adv * (1.0 + e2) + c_kl) * nll,
            jnp.where(w <= 1.0 - e1, (adv * (1.0 - e1) + c_kl) * nll,
                      (adv * jnp.where(jnp.isinf(c), 0.0, c) + c_kl) * nll))
        per_token = jnp.where(active, active_loss, SG(frozen))
        clips = {"low": (~pos) & (w <= 1.0 - e1), "high": pos & (w >= 1.0 + e2)}
    loss = ops.aggregate(per_token, mask, loss_agg, loss_agg_norm)
    metrics = _common_metrics(batch, logp, mask, None, clips)
    metrics["policy/loss"] = SG(loss)
    return loss, metrics


def _make_rpg(kind: str, reinforce_style: bool):
    body = _rpg_reinforce if reinforce_style else _rpg_differentiable

    def objective(batch, *, beta=1e-4, clip_eps_low=None, clip_eps_high=None, clip_c=None,
                  loss_agg="token-mean", loss_agg_norm=None, group_size=None):
        return body(kind, batch, beta, clip_eps_low, clip_eps_high, clip_c, loss_agg,
                    loss_agg_norm, group_size)

    return objective


_RPG_DOC = {
    "fkl": ("J = E_π[R] − β KL(π_old‖π_θ)", "−w A − β log π_θ", "w A + β"),
    "rkl": ("J = E_π[R] − β KL(π_θ‖π_old)", "w(−A + β log w)", "w(A − β log w − β)"),
    "ufkl": ("J = E_π[R] − β UKL(π_old‖π_θ)", "−w A + β(w − log w − 1)", "w A − β(w − 1)"),
    "urkl": ("J = E_π[R] − β UKL(π_θ‖π_old)", "−w A + β(w log w − w + 1)", "w(A − β log w)"),
}

for _kind in RPG_KINDS:
    _obj, _loss, _weight = _RPG_DOC[_kind]
    _f = _make_rpg(_kind, False)
    _f.__name__ = f"rpg_{_kind}"
    _f.__doc__ = f"""RPG-{_kind.upper()} fully differentiable surrogate (Zhang et al., arXiv 2505.17508, Table 1/4).

    {_obj}, samples y ~ π_old, w = π_θ/π_old (token level; the KL is to π_old, RPG's iterative
    reference; ``ref_logp`` is not used). Per-token loss {_loss}, so E_old[∇L] = −∇J exactly
    (test ``test_rpg_expected_gradient``). With ``clip_eps_low`` set, the −wA part becomes
    dual-clip PPO (ε_low, ε_high, c) as in RPG's scripts; inside the trust region the gradient is
    unchanged. A = R − b (b: group mean from rewards with ``group_size``).
    """
    register(f"rpg_{_kind}", "policy")(_f)
    globals()[f"rpg_{_kind}"] = _f

    _g = _make_rpg(_kind, True)
    _g.__name__ = f"rpg_rf_{_kind}"
    _g.__doc__ = f"""RPG-REINFORCE-{_kind.upper()} (arXiv 2505.17508, Table 2 and Algorithm 2).

    {_obj}; L = −SG({_weight})·log π_θ with w = SG(π_θ/π_old), samples from π_old, so
    E_old[∇L] = −∇J (test ``test_rpg_expected_gradient``). With ``clip_eps_low`` set, RPG's
    Algorithm-2 clip: the gradient is kept only where w < 1+ε_high (weight ≥ 0) or
    1−ε_low < w < c (weight < 0); elsewhere the value is frozen (no gradient).
    """
    register(f"rpg_rf_{_kind}", "policy")(_g)
    globals()[f"rpg_rf_{_kind}"] = _g


# --------------------------------------------------------------------------------------------
# Least-squares objectives: PMD-mean, A*-PO
# --------------------------------------------------------------------------------------------

def _sequence_advantage(batch, mask, adv_fn, group_size):
    a = _token_advantages(batch, mask, adv_fn, group_size)
    return ops.masked_mean(a, mask, axis=-1)


@register("pmd_mean", "policy")
def pmd_mean(batch, *, tau=0.01, loss_agg="seq-mean-token-mean", loss_agg_norm=None,
             group_size=None):
    """PMD-mean (arXiv 2602.05933; Kimi k1.5's loss with r − r̄): regress τ·s(y) onto A(y).

    s(y) = Σ_t log π_θ(y_t|h_t) − log π_old(y_t|h_t), A = r − r̄ (leave-one-out from rewards),
    per-sequence ℓ = ½τ(A/τ − s)², then divided by |y| (``seq-mean-token-mean``), by L_max
    (``seq-mean-token-sum-norm``), by nothing (``seq-mean-token-sum``) or Σ|y| (``token-mean``).
    At θ = θ_old, E_old[∇ℓ] = −∇E_π[A]; the population minimizer is the Lambert-W policy
    π ∝ π_old·(τ/c)W((c/τ)e^{(r−r̄)/τ}), the argmax of E[r] − τKL(π‖π_old) − (c/2)χ²(π‖π_old)
    (test ``test_pmd_mean_population_solution``).
    """
    ops.check_range("tau", tau, 0.0, low_open=True)
    ops.check_choice("loss_agg", loss_agg, ops.LOSS_AGG_MODES)
    logp, old, _, _, mask = _inputs(batch)
    a = _sequence_advantage(batch, mask, adv_lib.leave_one_out, group_size)
    s = ops.masked_sum(logp - old, mask, axis=-1)
    per_seq = 0.5 * tau * jnp.square(a / tau - s)
    n = jnp.sum(mask, axis=-1)
    rows = jnp.maximum(jnp.sum(n > 0), 1.0)
    if loss_agg == "seq-mean-token-mean":
        loss = jnp.sum(per_seq / jnp.maximum(n, 1.0)) / rows
    elif loss_agg == "seq-mean-token-sum":
        loss = jnp.sum(jnp.where(n > 0, per_seq, 0.0)) / rows
    elif loss_agg == "token-mean":
        loss = jnp.sum(jnp.where(n > 0, per_seq, 0.0)) / jnp.maximum(jnp.sum(n), 1.0)
    else:
        norm = mask.shape[-1] if loss_agg_norm is None else loss_agg_norm
        loss = jnp.sum(jnp.where(n > 0, per_seq, 0.0)) / (mask.shape[0] * norm)
    metrics = _common_metrics(batch, logp, mask, None, {})
    metrics.update({"policy/loss": SG(loss), "pmd/log_ratio": jnp.mean(SG(s))})
    return loss, metrics


@register("apo", "policy")
def apo(batch, *, beta=1e-3):
    """A*-PO stage 2 (Gao et al., arXiv 2505.20686): L = mean_x(β·log(π_θ(y)/π_ref(y)) − A*)².

    A* = r − V̂*(x) is ``batch['advantages']`` (or ``rewards`` minus ``batch['v_star']``, V̂* from
    ``advantages.apo_value_star``), the sequence log-ratio is to the fixed reference. The
    population minimizer is π* = π_ref·exp(r/β)/Z when V̂* = V*, the optimum of
    E[r] − β·KL(π‖π_ref) (test ``test_apo_least_squares_reaches_tilt``). No ½, no clip.
    """
    ops.check_range("beta", beta, 0.0, low_open=True)
    logp, _, ref, _, mask = _inputs(batch, need_ref=True)
    if batch.get("advantages") is None and batch.get("rewards") is not None:
        if batch.get("v_star") is None:
            raise ValueError("apo needs batch['advantages'] = r − V̂*, or 'rewards' and 'v_star'")
        batch = dict(batch, advantages=jnp.asarray(batch["rewards"]) - jnp.asarray(batch["v_star"]))
    a = _sequence_advantage(batch, mask, None, None)
    s = ops.masked_sum(logp - ref, mask, axis=-1)
    per_seq = jnp.square(beta * s - a)
    has = jnp.sum(mask, axis=-1) > 0
    loss = jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1.0)
    metrics = _common_metrics(batch, logp, mask, None, {})
    metrics.update({"policy/loss": SG(loss), "kl": jnp.mean(SG(s))})
    return loss, metrics
