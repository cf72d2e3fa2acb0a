"""Knowledge-distillation objectives over masked ``[B, T, V]`` logits, plus their helpers.

Every registered objective has the signature
``loss, metrics = objective(student_logits, teacher_logits, mask, **hparams)``:

* ``student_logits``, ``teacher_logits``: ``[B, T, V]`` (already shifted: position t predicts t+1);
  the teacher is wrapped in ``stop_gradient`` here, callers need not detach it.
* ``mask``: ``[B, T]``, 1 where a position counts (``None`` = all). Masked positions are replaced by
  zeros *before* any arithmetic, so NaN/inf there reaches neither the value nor the gradient.
* ``temperature`` τ divides both logits; ``tau_squared`` multiplies the divergence by τ² (Hinton).
  The LLM references (GKD/TRL, MiniLLM, DistiLLM, TAID, ABKD, AKL) use τ = 1 without τ².
* ``reduction`` of the per-position divergence ℓ[b, t]:
  ``token_mean`` (default) Σ m·ℓ / max(Σ m, 1) (TRL, DistiLLM, MiniLLM);
  ``seq_mean`` mean over non-empty rows of Σ_t m·ℓ / Σ_t m (the GKD paper);
  ``sum`` Σ m·ℓ; ``batchmean`` Σ m·ℓ / B (PyTorch ``kl_div(reduction='batchmean')`` on [B,T,V]).

Metrics: ``distill/loss``, ``distill/kl`` (KL(teacher‖student) at τ, token mean over the positions
where it is finite), ``distill/reverse_kl`` (KL(student‖teacher), likewise), ``distill/kl_inf_frac`` and
``distill/reverse_kl_inf_frac`` (the fraction of counted positions where that KL is +inf: one side has
mass where the other's logits are −inf), ``distill/tokens``.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from kljax import divergences as dv
from kljax import ops
from kljax.objectives import register

REDUCTIONS = ("token_mean", "seq_mean", "sum", "batchmean")


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------

def _prepare(student_logits, teacher_logits, mask):
    """Check shapes, detach the teacher, neutralize masked positions. Returns (s, t, mask)."""
    s = jnp.asarray(student_logits)
    t = jnp.asarray(teacher_logits)
    if s.ndim != 3:
        raise ValueError(f"student_logits must have shape [B, T, V], got {list(s.shape)}")
    if t.shape != s.shape:
        raise ValueError(
            f"teacher_logits has shape {list(t.shape)} but student_logits has {list(s.shape)}; "
            "they must match (same vocabulary: slice or pad the teacher's vocabulary first)"
        )
    if mask is None:
        mask = jnp.ones(s.shape[:2], jnp.float32)
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(s.shape[:2]):
        raise ValueError(f"mask has shape {list(mask.shape)} but must be [B, T] = {list(s.shape[:2])}")
    mask = mask.astype(jnp.promote_types(s.dtype, jnp.float32))
    keep = (mask > 0)[..., None]
    s = jnp.where(keep, s, 0.0)
    t = jax.lax.stop_gradient(jnp.where(keep, t, 0.0))
    return s, t, mask


def reduce(per_token, mask, reduction: str = "token_mean"):
    """Reduce a ``[B, T]`` per-position loss with one of ``REDUCTIONS`` (see the module docstring)."""
    ops.check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "token_mean":
        return ops.masked_mean(per_token, mask)
    if reduction == "sum":
        return ops.masked_sum(per_token, mask)
    if reduction == "batchmean":
        return ops.masked_sum(per_token, mask) / per_token.shape[0]
    row_sum = ops.masked_sum(per_token, mask, axis=-1)
    row_n = jnp.sum(mask, axis=-1)
    rows = jnp.maximum(jnp.sum(row_n > 0), 1.0)
    return jnp.sum(row_sum / jnp.maximum(row_n, 1.0)) / rows


def _finite_mean(per_token, mask):
    """(mean over the counted positions where ``per_token`` is not +inf, fraction where it is).

    A KL is +inf where its first argument has mass and its second none (a teacher with −inf logits:
    vocabulary padding, top-k truncation). The metrics keep the finite part and report that
    fraction, so a diagnostic direction the loss does not use cannot stop a run (the training
    loops stop on any non-finite metric); an infinite *loss* still does.
    """
    inf = jnp.isposinf(per_token)  # NaN is kept: it would be a bug, and must show
    counted = mask * (1.0 - inf.astype(mask.dtype))
    value = ops.masked_mean(jnp.where(inf, 0.0, per_token), counted)
    return value, ops.masked_sum(inf.astype(mask.dtype), mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _finish(per_token, s, t, mask, temperature, tau_squared, reduction, extra=None):
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    scale = temperature**2 if tau_squared else 1.0
    loss = scale * reduce(per_token, mask, reduction)
    sg_s = jax.lax.stop_gradient(s)
    fkl, fkl_inf = _finite_mean(dv.forward_kl(t, sg_s, temperature), mask)
    rkl, rkl_inf = _finite_mean(dv.reverse_kl(t, sg_s, temperature), mask)
    metrics = {
        "distill/loss": loss,
        "distill/kl": fkl,
        "distill/kl_inf_frac": fkl_inf,
        "distill/reverse_kl": rkl,
        "distill/reverse_kl_inf_frac": rkl_inf,
        "distill/tokens": jnp.sum(mask),
    }
    metrics.update(extra or {})
    return loss, metrics


def _divergence_loss(fn, student_logits, teacher_logits, mask, temperature, tau_squared, reduction, **kw):
    ops.check_choice("reduction", reduction, REDUCTIONS)
    s, t, mask = _prepare(student_logits, teacher_logits, mask)
    per_token = fn(t, s, temperature=temperature, **kw)
    return _finish(per_token, s, t, mask, temperature, tau_squared, reduction)


def _student_ce(student_logits, labels, mask):
    labels = jnp.where(mask > 0, jnp.asarray(labels), 0).astype(jnp.int32)
    return -ops.token_logprobs(student_logits, labels)


# --------------------------------------------------------------------------------------------
# Registered objectives
# --------------------------------------------------------------------------------------------

@register("kd", "distill")
def kd(student_logits, teacher_logits, mask=None, *, temperature: float = 1.0, tau_squared: bool = True,
       labels=None, alpha: float = 0.5, reduction: str = "token_mean"):
    """Hinton KD (Hinton, Vinyals & Dean 2015): L = α·τ²·KL(p_τ‖q_τ) + (1−α)·CE(q_1, y).

    Forward KL at temperature τ (p teacher, q student); τ² (``tau_squared``) keeps the soft-target
    gradient scale independent of τ. With ``labels`` ([B, T] ints) the hard-label cross-entropy at
    τ = 1 is mixed in and **α weights the KD term** (Tunix convention; torchdistill's α weights the
    CE term: use 1 − α). Without labels the loss is τ²·KL and α is unused.
    """
    ops.check_range("alpha", alpha, 0.0, 1.0)
    ops.check_choice("reduction", reduction, REDUCTIONS)
    s, t, mask = _prepare(student_logits, teacher_logits, mask)
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    per_token_kl = dv.forward_kl(t, s, temperature)
    if labels is None:
        return _finish(per_token_kl, s, t, mask, temperature, tau_squared, reduction)
    soft = (temperature**2 if tau_squared else 1.0) * reduce(per_token_kl, mask, reduction)
    if tuple(jnp.shape(labels)) != tuple(s.shape[:2]):
        raise ValueError(f"labels has shape {list(jnp.shape(labels))} but must be [B, T] = {list(s.shape[:2])}")
    hard = reduce(_student_ce(s, labels, mask), mask, reduction)
    loss = alpha * soft + (1.0 - alpha) * hard
    _, metrics = _finish(jnp.zeros(s.shape[:2]), s, t, mask, temperature, False, reduction)
    metrics.update({"distill/loss": loss, "distill/soft_loss": soft, "distill/hard_loss": hard})
    return loss, metrics


@register("fkl", "distill")
def fkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, tau_squared=False, reduction="token_mean"):
    """Forward KL, ℓ = KL(p‖q) = Σ p(log p − log q), teacher first (GKD β→0 limit; DistiLLM/MiniLLM fkl)."""
    return _divergence_loss(dv.forward_kl, student_logits, teacher_logits, mask, temperature, tau_squared, reduction)


@register("rkl", "distill")
def rkl(student_logits, teacher_logits, mask=None, *, temperature=1.0, tau_squared=False, reduction="token_mean"):
    """Reverse KL, ℓ = KL(q‖p) = Σ q(log q − log p), student first (Gu et al. 2024 single-step; TRL β=1)."""
    return _divergence_loss(dv.reverse_kl, student_logits, teacher_logits, mask, temperature, tau_squared, reduction)


@register("jsd", "distill")
def jsd(student_logits, teacher_logits, mask=None, *, beta: float = 0.5, temperature=1.0, tau_squared=False,
        reduction="token_mean"):
    """Generalized JSD of GKD (Agarwal et al., ICLR 2024): ℓ = β·KL(p‖m) + (1−β)·KL(q‖m), m = βp+(1−β)q.

    β ∈ [0, 1]; the value is 0 at β ∈ {0, 1} (see ``divergences.generalized_jsd`` for TRL's
    discontinuous endpoints and DistiLLM's λ = 1 − β).
    """
    return _divergence_loss(dv.generalized_jsd, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, beta=beta)


@register("skl", "distill")
def skl(student_logits, teacher_logits, mask=None, *, alpha: float = 0.1, temperature=1.0, tau_squared=False,
        reduction="token_mean"):
    """Skew forward KL of DistiLLM (Ko et al., ICML 2024): ℓ = KL(p ‖ αp + (1−α)q), α ∈ [0, 1]."""
    return _divergence_loss(dv.skew_kl, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, alpha=alpha)


@register("srkl", "distill")
def srkl(student_logits, teacher_logits, mask=None, *, alpha: float = 0.1, temperature=1.0, tau_squared=False,
         reduction="token_mean"):
    """Skew reverse KL of DistiLLM: ℓ = KL(q ‖ αq + (1−α)p), α ∈ [0, 1]."""
    return _divergence_loss(dv.skew_reverse_kl, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, alpha=alpha)


@register("tvd", "distill")
def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, tau_squared=False, reduction="token_mean"):
    """Total variation distance ℓ = ½ Σ |p − q| (DistiLLM ``tv_distance``)."""
    return _divergence_loss(dv.total_variation, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction)


@register("akl", "distill")
def akl(student_logits, teacher_logits, mask=None, *, mu: float = 0.5, temperature=1.0, tau_squared=False,
        reduction="token_mean"):
    """Adaptive KL (Wu et al., COLING 2025): ℓ = g_head·KL(p‖q) + g_tail·KL(q‖p), head = teacher top-μ mass."""
    return _divergence_loss(dv.adaptive_kl, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, mu=mu)


@register("bdkd", "distill")
def bdkd(student_logits, teacher_logits, mask=None, *, heavy_weight: float = 3.0, temperature=1.0,
         tau_squared=False, reduction="token_mean"):
    """BD-KD (Amara et al. 2022): ℓ = w_t·KL(p‖q) + w_s·KL(q‖p), the higher-entropy side weighted ×3."""
    return _divergence_loss(dv.bdkd, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, heavy_weight=heavy_weight)


@register("alpha", "distill")
def alpha_kd(student_logits, teacher_logits, mask=None, *, alpha: float = 0.5, temperature=1.0, tau_squared=False,
             reduction="token_mean"):
    """α-divergence KD (AlphaNet, Wang et al. 2021): ℓ = (Σ p^α q^{1−α} − 1)/(α(α−1)); α=1 FKL, α=0 RKL."""
    return _divergence_loss(dv.alpha_divergence, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, alpha=alpha)


@register("ab", "distill")
def ab_kd(student_logits, teacher_logits, mask=None, *, alpha: float = 0.2, beta: float = 0.7, temperature=1.0,
          tau_squared=False, reduction="token_mean"):
    """ABKD (Wang et al., ICML 2025): ℓ = −1/(αβ) Σ [p^α q^β − α/(α+β) p^{α+β} − β/(α+β) q^{α+β}]."""
    return _divergence_loss(dv.ab_divergence, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, alpha=alpha, beta=beta)


@register("tsallis", "distill")
def tsallis(student_logits, teacher_logits, mask=None, *, order: float = 0.5, temperature=1.0, tau_squared=False,
            reduction="token_mean"):
    """Tsallis relative entropy: ℓ = (Σ p^q_idx q^{1−q_idx} − 1)/(q_idx − 1), q_idx = ``order`` → 1 is FKL."""
    return _divergence_loss(dv.tsallis_kl, student_logits, teacher_logits, mask, temperature, tau_squared,
                            reduction, order=order)


@register("nkd", "distill")
def nkd(student_logits, teacher_logits, mask=None, *, labels=None, gamma: float = 1.5, temperature: float = 1.0,
        reduction: str = "token_mean"):
    """Normalized KD (Yang et al., ICCV 2023, official ``cls_KD/.../nkd.py``), per position:

    ℓ = −sg(p(y))·log q(y) + γ·τ²·( −Σ_{c≠y} p̂_c log q̂_c ),

    y the label (default: the teacher's argmax, as LM ports do), p, q at τ = 1; p̂, q̂ the softmaxes
    at τ of the *non-target* logits only (target removed, renormalized over V − 1 entries). The
    cross-entropy forms follow the official code (values differ from KL forms by constants).
    The usual hard-label CE is added by the caller, as in the paper.
    """
    ops.check_range("gamma", gamma, 0.0, None)
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    ops.check_choice("reduction", reduction, REDUCTIONS)
    s, t, mask = _prepare(student_logits, teacher_logits, mask)
    if labels is None:
        labels = jnp.argmax(t, axis=-1)
    elif tuple(jnp.shape(labels)) != tuple(s.shape[:2]):
        raise ValueError(f"labels has shape {list(jnp.shape(labels))} but must be [B, T] = {list(s.shape[:2])}")
    labels = jnp.where(mask > 0, jnp.asarray(labels), 0).astype(jnp.int32)
    target = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)
    logq = ops.safe_log_softmax(s)
    p_y = jnp.exp(ops.token_logprobs(t, labels))
    target_term = -p_y * jnp.sum(jnp.where(target, logq, 0.0), axis=-1)
    logp_hat = ops.safe_log_softmax(jnp.where(target, -jnp.inf, t), temperature)
    logq_hat = ops.safe_log_softmax(jnp.where(target, -jnp.inf, s), temperature)
    non_target = -jnp.sum(ops.xlogy_exp(logp_hat, logq_hat), axis=-1)
    per_token = target_term + gamma * temperature**2 * non_target
    return _finish(per_token, s, t, mask, temperature, False, reduction, {
        "distill/nkd_target": ops.masked_mean(target_term, mask),
        "distill/nkd_non_target": ops.masked_mean(non_target, mask),
    })


# --------------------------------------------------------------------------------------------
# MiniLLM: sequence-level reverse KL by policy gradient
# --------------------------------------------------------------------------------------------

def _reward_to_go(x, gamma):
    """G_t = Σ_{s≥t} γ^{s−t} x_s along the last axis (a reverse scan)."""
    def step(carry, xt):
        carry = xt + gamma * carry
        return carry, carry

    _, out = jax.lax.scan(step, jnp.zeros(x.shape[:-1], x.dtype), jnp.moveaxis(x, -1, 0), reverse=True)
    return jnp.moveaxis(out, 0, -1)


def minillm_pg_surrogate(student_logp, teacher_logp, mask, *, gamma: float = 1.0, length_norm: bool = False,
                         skip_current: bool = False):
    """Per-sequence policy-gradient surrogate of MiniLLM (Gu et al., ICLR 2024), ``[B]``.

    For a batch y ~ q_θ sampled from the student, with per-token log-probs ``student_logp``
    (log q_θ(y_t|y<t), differentiable) and ``teacher_logp`` (log p(y_t|y<t), constant), the
    per-token reward is r_t = log p − log q (detached) and the cost-to-go
    C_t = Σ_{s≥t} γ^{s−t} m_s·(−r_s) (divided by the n_t remaining valid tokens if
    ``length_norm``; from s > t if ``skip_current``). The surrogate of sequence b is

        S_b = Σ_t m_t · C_t · (log q_t − sg(log q_t))  +  sg(Σ_t m_t (log q_t − log p_t)),

    whose value is the one-sample estimate of the sequence KL and whose gradient is
    Σ_t C_t ∇log q_t. With γ = 1, no length normalization and ``skip_current=False``,
    E_{y~q}[∇S] = ∇ KL(q_θ(·|x) ‖ p(·|x)) exactly (the score-function identity plus
    E[∇log q] = 0; proven by enumeration in the tests). γ < 1 and length normalization are
    MiniLLM's variance reductions and bias that gradient. ``skip_current=True`` gives the
    long-term part that pairs with the exact single-step term (``minillm`` objective).
    """
    score_term, cost_sum = _minillm_surrogate_parts(student_logp, teacher_logp, mask, gamma, length_norm,
                                                    skip_current)
    return score_term + cost_sum


def _minillm_surrogate_parts(student_logp, teacher_logp, mask, gamma, length_norm, skip_current):
    """``minillm_pg_surrogate`` as (gradient part with value 0, value part), see ``_minillm_terms``."""
    ops.check_range("gamma", gamma, 0.0, 1.0)
    ops.check_same_shape(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)
    mask = jnp.asarray(mask, jnp.promote_types(jnp.asarray(student_logp).dtype, jnp.float32))
    valid = mask > 0
    logq = jnp.where(valid, student_logp, 0.0)
    logp = jax.lax.stop_gradient(jnp.where(valid, teacher_logp, 0.0))
    cost = jax.lax.stop_gradient(mask * (logq - logp))
    to_go = _reward_to_go(cost, gamma)
    if skip_current:
        to_go = to_go - cost
    if length_norm:
        remaining = _reward_to_go(mask, 1.0) - (mask if skip_current else 0.0)
        to_go = to_go / jnp.maximum(remaining, 1.0)
    return _minillm_terms(logq, to_go, cost, mask)


def _minillm_terms(logq, to_go, cost, mask):
    """(Σ_t m_t·C_t·(log q_t − sg(log q_t)) [value 0, the gradient], Σ_t cost_t [the value]).

    A token the teacher cannot produce (log p = −inf) makes the cost, and the sequence KL, +inf:
    its coefficient in the gradient part is then dropped so the value is +inf rather than
    0·inf = NaN (the loss is infinite either way; the run stops on it).
    """
    to_go = jax.lax.stop_gradient(jnp.where(jnp.isfinite(to_go), to_go, 0.0))
    score = logq - jax.lax.stop_gradient(logq)
    return jnp.sum(mask * to_go * score, axis=-1), jnp.sum(cost, axis=-1)


@register("minillm", "distill")
def minillm(student_logits, teacher_logits, mask=None, *, tokens=None, gamma: float = 1.0, length_norm: bool = False,
            single_step: bool = True, temperature: float = 1.0, reduction: str = "batchmean"):
    """MiniLLM (Gu et al., ICLR 2024): minimize the sequence-level reverse KL(q_θ(y|x) ‖ p(y|x)).

    ``tokens [B, T]`` are the student-sampled tokens (y_t is scored by the logits at position t);
    ``mask`` marks the completion. Per sequence, with ``single_step`` (MiniLLM's decomposition)

        ℓ_b = Σ_t m_t KL(q_t ‖ p_t)   [exact over the vocabulary at every sampled prefix]
              + Σ_t m_t C_{t+1}·∇-only log q_t(y_t),    C_{t+1} = Σ_{s>t} γ^{s−t−1} m_s (log q_s − log p_s),

    otherwise the plain score-function surrogate (``minillm_pg_surrogate``). Both have expected
    gradient ∇KL(q_θ‖p) exactly when γ = 1 and ``length_norm=False`` (MiniLLM's defaults
    γ = 0.95 and length normalization trade that for variance). The default ``reduction``
    ``batchmean`` (Σ over tokens / B) keeps the expected gradient equal to that of the mean
    sequence KL; ``token_mean`` reproduces MiniLLM's scale. PPO clipping, reward clipping and
    teacher-mixed sampling are left to the training loop.
    """
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    ops.check_choice("reduction", reduction, REDUCTIONS)
    s, t, mask = _prepare(student_logits, teacher_logits, mask)
    if tokens is None:
        raise ValueError("minillm needs tokens=[B, T]: the student-sampled tokens scored by the logits")
    if tuple(jnp.shape(tokens)) != tuple(s.shape[:2]):
        raise ValueError(f"tokens has shape {list(jnp.shape(tokens))} but must be [B, T] = {list(s.shape[:2])}")
    tokens = jnp.where(mask > 0, jnp.asarray(tokens), 0).astype(jnp.int32)
    logq = ops.token_logprobs(s / temperature, tokens)
    logp = ops.token_logprobs(t / temperature, tokens)
    if single_step:
        step_kl = dv.reverse_kl(t, s, temperature)
        # Value: the exact per-step KLs stand in for the sampled current-token cost.
        score_term, _ = _minillm_surrogate_parts(logq, logp, mask, gamma, length_norm, True)
        seq = score_term + ops.masked_sum(step_kl, mask, axis=-1)
    else:
        seq = minillm_pg_surrogate(logq, logp, mask, gamma=gamma, length_norm=length_norm)
    # Per-sequence totals: token and sequence means divide by the counts of the real mask.
    if reduction == "batchmean":
        loss = jnp.sum(seq) / s.shape[0]
    elif reduction == "sum":
        loss = jnp.sum(seq)
    elif reduction == "token_mean":
        loss = jnp.sum(seq) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
        n = jnp.sum(mask, axis=-1)
        loss = jnp.sum(seq / jnp.maximum(n, 1.0)) / jnp.maximum(jnp.sum(n > 0), 1.0)
    _, metrics = _finish(jnp.zeros(s.shape[:2], s.dtype), s, t, mask, temperature, False, reduction, {
        "distill/loss": loss,
        "distill/seq_reverse_kl": jnp.mean(ops.masked_sum(jax.lax.stop_gradient(logq - logp), mask, axis=-1)),
    })
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Plain helpers: on-policy data schedules, self-distillation targets, R-Drop
# --------------------------------------------------------------------------------------------

def gkd_use_student_data(key, lam: float, shape=()):
    """GKD's on-policy switch (Agarwal et al. 2024; TRL ``lmbda``): True with probability λ.

    True means "train this step on completions the *student* generates"; otherwise use the
    dataset (or teacher, with ``seq_kd``) completions. λ ∈ [0, 1]; TRL's default is 0.5.
    """
    ops.check_range("lam", lam, 0.0, 1.0)
    return jax.random.bernoulli(key, lam, shape)


DISTILLM_REPLAY_RATIOS = ("decreasing", "constant", "increasing")
DATASET, STUDENT, REPLAY = 0, 1, 2


def distillm_student_probability(phi, step, total_steps, replay_ratio: str = "decreasing"):
    """DistiLLM's probability of generating *fresh* student outputs: φ·(1 − step/total), φ/2 or φ·step/total."""
    ops.check_choice("replay_ratio", replay_ratio, DISTILLM_REPLAY_RATIOS)
    frac = jnp.asarray(step, jnp.float32) / max(float(total_steps), 1.0)
    if replay_ratio == "decreasing":
        return phi * (1.0 - frac)
    if replay_ratio == "constant":
        return phi * 0.5
    return phi * frac


def distillm_data_source(key, phi, step, total_steps, buffer_full, replay_ratio: str = "decreasing"):
    """DistiLLM's adaptive off-policy schedule (Ko et al., ICML 2024, ``finetune.py``): which data to train on.

    Draw r ~ U(0, 1). Returns ``STUDENT`` (1: generate fresh student outputs and push them to the
    replay buffer) if r < the ``distillm_student_probability``, or r < φ while the buffer is not
    full; ``REPLAY`` (2: a batch from the buffer) if r < φ otherwise; else ``DATASET`` (0).
    """
    r = jax.random.uniform(key, (), jnp.float32)
    samp = distillm_student_probability(phi, step, total_steps, replay_ratio)
    fresh = (r < samp) | ((r < phi) & jnp.logical_not(buffer_full))
    return jnp.where(fresh, STUDENT, jnp.where(r < phi, REPLAY, DATASET))


def distillm_update_threshold(phi, prev_loss, curr_loss, loss_eps: float = 0.1, step_size: float = 0.1):
    """DistiLLM's φ update at each evaluation: if the dev loss rose by ≥ ``loss_eps`` since the
    last increase, φ ← min(φ + 0.1, 1) and the reference loss moves to the current one.
    Returns ``(phi, prev_loss)``; φ starts at 0 (``--init-threshold``)."""
    rose = curr_loss >= prev_loss + loss_eps
    return jnp.where(rose, jnp.minimum(phi + step_size, 1.0), phi), jnp.where(rose, curr_loss, prev_loss)


def pskd_alpha(epoch, num_epochs, alpha_final: float = 0.8):
    """PS-KD schedule (Kim et al., ICCV 2021): α_t = α_T·(epoch + 1)/E."""
    ops.check_range("alpha_final", alpha_final, 0.0, 1.0)
    return alpha_final * (epoch + 1) / num_epochs


def pskd_targets(labels, prev_probs, alpha):
    """PS-KD soft targets ỹ = (1 − α)·onehot(y) + α·P_{t−1}(x), with P_{t−1} last epoch's own softmax."""
    ops.check_range("alpha", alpha, 0.0, 1.0)
    prev_probs = jax.lax.stop_gradient(jnp.asarray(prev_probs))
    return (1.0 - alpha) * jax.nn.one_hot(labels, prev_probs.shape[-1], dtype=prev_probs.dtype) + alpha * prev_probs


def soft_cross_entropy(logits, targets, mask=None, reduction: str = "token_mean"):
    """−Σ_v ỹ_v log softmax(z)_v per position, reduced like the objectives (PS-KD's loss)."""
    logq = ops.safe_log_softmax(logits)
    per = -jnp.sum(jnp.where(targets > 0, targets * logq, 0.0), axis=-1)
    if per.ndim == 1:
        per, mask = per[None], (None if mask is None else jnp.asarray(mask)[None])
    mask = jnp.ones(per.shape) if mask is None else jnp.asarray(mask, per.dtype)
    return reduce(per, mask, reduction)


def rdrop_kl(logits_a, logits_b, mask=None, reduction: str = "token_mean"):
    """R-Drop regularizer (Liang et al., NeurIPS 2021): ½[KL(P_a‖P_b) + KL(P_b‖P_a)] between two
    dropout passes of the same model; gradients flow through *both* (no stop-gradient)."""
    ops.check_same_shape(logits_a=logits_a, logits_b=logits_b)
    a, b = jnp.asarray(logits_a), jnp.asarray(logits_b)
    if mask is None:
        mask = jnp.ones(a.shape[:-1], jnp.float32)
    keep = (jnp.asarray(mask) > 0)[..., None]
    a, b = jnp.where(keep, a, 0.0), jnp.where(keep, b, 0.0)
    per = 0.5 * (dv.kl(a, b) + dv.kl(b, a))
    return reduce(per, jnp.asarray(mask, per.dtype), reduction)
