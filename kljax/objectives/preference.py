"""Preference objectives: DPO, IPO, H-DPO and DPKD.

``loss, metrics = objective(batch, **hparams)``. For ``dpo``, ``ipo`` and ``h_dpo`` the batch holds
the policy's and the reference's log-probabilities of the chosen (y_w) and rejected (y_l) response:

* sequence log-probs ``chosen_logp``, ``rejected_logp``, ``ref_chosen_logp``, ``ref_rejected_logp``
  of shape ``[B]``; or
* per-token log-probs ``[B, T]`` with ``chosen_mask`` and ``rejected_mask`` ``[B, T]``: each is then
  summed over its mask (``average_log_prob=True`` divides by the token count, as IPO/SimPO do).

The reference terms are wrapped in ``stop_gradient`` here. With h = [log π(y_w) − log π_ref(y_w)]
− [log π(y_l) − log π_ref(y_l)], the metrics follow TRL: ``rewards/chosen`` = β·mean(log π/π_ref of
y_w), ``rewards/rejected``, ``rewards/accuracies`` = mean(1[reward_w > reward_l]) and
``rewards/margins`` = mean(reward_w − reward_l), plus ``loss``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kljax import ops
from kljax.objectives import register

_KEYS = ("chosen_logp", "rejected_logp", "ref_chosen_logp", "ref_rejected_logp")


def _sequence_logps(batch, average_log_prob: bool):
    """The four sequence log-probs ``[B]`` (reference ones detached), from ``[B]`` or masked ``[B, T]``."""
    missing = [k for k in _KEYS if k not in batch]
    if missing:
        raise KeyError(f"preference batch is missing {missing}; it needs {list(_KEYS)}")
    arrays = {k: jnp.asarray(batch[k]) for k in _KEYS}
    ops.check_same_shape(**arrays)
    shape = arrays["chosen_logp"].shape
    if len(shape) == 2:
        for side in ("chosen", "rejected"):
            key = f"{side}_mask"
            if key not in batch:
                raise KeyError(f"per-token [B, T] log-probs need {key!r} [B, T] in the batch")
            m = jnp.asarray(batch[key], jnp.float32)
            if m.shape != shape:
                raise ValueError(f"{key} has shape {list(m.shape)} but the log-probs are {list(shape)}")
            n = jnp.maximum(jnp.sum(m, axis=-1), 1.0) if average_log_prob else 1.0
            for k in (f"{side}_logp", f"ref_{side}_logp"):
                arrays[k] = ops.masked_sum(arrays[k], m, axis=-1) / n
    elif len(shape) != 1:
        raise ValueError(f"chosen_logp must be [B] or [B, T], got {list(shape)}")
    arrays = {k: ops._upcast(v) for k, v in arrays.items()}
    arrays["ref_chosen_logp"] = jax.lax.stop_gradient(arrays["ref_chosen_logp"])
    arrays["ref_rejected_logp"] = jax.lax.stop_gradient(arrays["ref_rejected_logp"])
    return arrays


def _metrics(loss, beta, chosen_ratio, rejected_ratio):
    rc = jax.lax.stop_gradient(beta * chosen_ratio)
    rr = jax.lax.stop_gradient(beta * rejected_ratio)
    return {
        "loss": loss,
        "rewards/chosen": jnp.mean(rc),
        "rewards/rejected": jnp.mean(rr),
        "rewards/accuracies": jnp.mean((rc > rr).astype(rc.dtype)),
        "rewards/margins": jnp.mean(rc - rr),
    }


def _sigmoid_loss(logits, label_smoothing):
    """−(1−ε)·log σ(x) − ε·log σ(−x) (conservative DPO with label-flip rate ε)."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


@register("dpo", "preference")
def dpo(batch, *, beta: float = 0.1, label_smoothing: float = 0.0, average_log_prob: bool = False):
    """DPO (Rafailov et al., NeurIPS 2023): L = −log σ(β·h),
    h = log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l).

    It is the Bradley–Terry likelihood of the reward implied by the optimum of
    max E_π[r] − β·KL(π‖π_ref), r = β log π/π_ref + β log Z. ``label_smoothing`` ε gives
    cDPO's −(1−ε) log σ(βh) − ε log σ(−βh). β > 0, ε ∈ [0, ½].
    """
    ops.check_range("beta", beta, 0.0, None, low_open=True)
    ops.check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    lp = _sequence_logps(batch, average_log_prob)
    chosen = lp["chosen_logp"] - lp["ref_chosen_logp"]
    rejected = lp["rejected_logp"] - lp["ref_rejected_logp"]
    loss = jnp.mean(_sigmoid_loss(beta * (chosen - rejected), label_smoothing))
    return loss, _metrics(loss, beta, chosen, rejected)


@register("ipo", "preference")
def ipo(batch, *, beta: float = 0.1, average_log_prob: bool = False):
    """IPO (Azar et al., AISTATS 2024): L = (h − 1/(2β))², h as in DPO; β > 0 (IPO's τ).

    For a pair preferred with probability P the population optimum is h = (P − ½)/β. TRL's
    ``loss_type='ipo'`` uses length-averaged log-probs: pass ``average_log_prob=True``.
    """
    ops.check_range("beta", beta, 0.0, None, low_open=True)
    lp = _sequence_logps(batch, average_log_prob)
    chosen = lp["chosen_logp"] - lp["ref_chosen_logp"]
    rejected = lp["rejected_logp"] - lp["ref_rejected_logp"]
    loss = jnp.mean(jnp.square(chosen - rejected - 1.0 / (2.0 * beta)))
    return loss, _metrics(loss, beta, chosen, rejected)


@register("h_dpo", "preference")
def h_dpo(batch, *, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
          average_log_prob: bool = False):
    """H-DPO (Omura et al., arXiv:2411.07595): L = −log σ(β[(α log π(y_w) − log π_ref(y_w))
    − (α log π(y_l) − log π_ref(y_l))]).

    Derived from max E_π[r] − β(−α·H(π) + CE(π, π_ref)), whose optimum is
    π* ∝ (π_ref·e^{r/β})^{1/α}; α = 1 is DPO, α < 1 sharpens (lower entropy). α > 0.
    (The formula is [derived] in the reference sheet; the tests check the optimum.)
    """
    ops.check_range("beta", beta, 0.0, None, low_open=True)
    ops.check_range("alpha", alpha, 0.0, None, low_open=True)
    ops.check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    lp = _sequence_logps(batch, average_log_prob)
    chosen = alpha * lp["chosen_logp"] - lp["ref_chosen_logp"]
    rejected = alpha * lp["rejected_logp"] - lp["ref_rejected_logp"]
    loss = jnp.mean(_sigmoid_loss(beta * (chosen - rejected), label_smoothing))
    return loss, _metrics(loss, beta, chosen, rejected)


@register("dpkd", "preference")
def dpkd(batch, *, beta: float = 0.1, label_smoothing: float = 0.0, temperature: float = 1.0,
         reference_free: bool = False):
    """DPKD as in the official code (Li et al., arXiv:2406.19774; LMOps ``dpkd/main.py``):
    token-level DPO with the **teacher as the reference**.

    ``batch`` holds ``student_logits`` and ``teacher_logits`` ``[B, T, V]`` and ``mask`` ``[B, T]``
    (a different batch from ``dpo``'s). Per position, y_w = argmax p (teacher) and
    y_l = argmax q (student),
    h = [log q(y_w) − log q(y_l)] − [log p(y_w) − log p(y_l)],
    ℓ = −(1−ε) log σ(βh) − ε log σ(−βh), masked token mean. ``reference_free`` drops the teacher
    term. Where both argmaxes agree h = 0 and ℓ = log 2 with zero gradient.
    """
    ops.check_range("beta", beta, 0.0, None, low_open=True)
    ops.check_range("label_smoothing", label_smoothing, 0.0, 0.5)
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    for k in ("student_logits", "teacher_logits", "mask"):
        if k not in batch:
            raise KeyError(f"dpkd batch is missing {k!r}; it needs student_logits, teacher_logits [B,T,V], mask [B,T]")
    s, t, m = (jnp.asarray(batch[k]) for k in ("student_logits", "teacher_logits", "mask"))
    ops.check_same_shape(student_logits=s, teacher_logits=t)
    ops.check_leading_shape(s.shape[:-1], mask=m)
    keep = (m > 0)[..., None]
    s = jnp.where(keep, s, 0.0)
    t = jax.lax.stop_gradient(jnp.where(keep, t, 0.0))
    logq = ops.safe_log_softmax(s, temperature)
    logp = ops.safe_log_softmax(t, temperature)
    y_w = jnp.argmax(t, axis=-1)[..., None]
    y_l = jax.lax.stop_gradient(jnp.argmax(s, axis=-1))[..., None]

    def pick(x, y):
        return jnp.take_along_axis(x, y, axis=-1)[..., 0]

    chosen = pick(logq, y_w) - (0.0 if reference_free else pick(logp, y_w))
    rejected = pick(logq, y_l) - (0.0 if reference_free else pick(logp, y_l))
    per_token = _sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    m = jnp.asarray(m, per_token.dtype)
    loss = ops.masked_mean(per_token, m)
    metrics = _metrics(loss, beta, chosen, rejected)
    rc, rr = beta * chosen, beta * rejected
    metrics.update({
        "rewards/chosen": ops.masked_mean(rc, m),
        "rewards/rejected": ops.masked_mean(rr, m),
        "rewards/accuracies": ops.masked_mean((rc > rr).astype(rc.dtype), m),
        "rewards/margins": ops.masked_mean(rc - rr, m),
    })
    metrics = {k: jax.lax.stop_gradient(v) if k != "loss" else v for k, v in metrics.items()}
    return loss, metrics
