"""Divergences between categorical distributions given as logits, and sampled KL estimators.

Every full-distribution divergence here takes logits ``[..., V]``, reduces the last axis only and
returns ``[...]`` in (at least) float32. An optional ``temperature`` τ divides *both* sets of logits
before the softmax. Conventions (DESIGN.md): the *target* (teacher, P, ``p``) comes first and the
*model* (student, Q, ``q``) second; the direction of each KL is named in its docstring.

Zero-probability entries (``-inf`` logits: vocabulary padding, top-k masks) are handled exactly:
``0·log 0 := 0`` through ``ops.xlogy_exp``, mixtures are built in log space with ``logaddexp`` and
never evaluate ``logaddexp(-inf, -inf)``'s gradient. An entry where the first argument of a KL
has mass and the second none gives ``+inf`` (the true value).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kljax import ops


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _log_probs(target, model, temperature):
    ops.check_range("temperature", temperature, 0.0, None, low_open=True)
    ops.check_same_shape(target=target, model=model)
    return ops.safe_log_softmax(target, temperature), ops.safe_log_softmax(model, temperature)


def _kl_logp(loga, logb):
    """KL(a‖b) from log-probabilities, 0·log 0 := 0."""
    return jnp.sum(ops.xlogy_exp(loga, loga - logb), axis=-1)


def _log_mix(loga, logb, w):
    """log(w·a + (1−w)·b) elementwise in log space; w is a weight in [0, 1].

    Where both a and b are zero the result is −inf and no NaN reaches the gradient: the
    ``logaddexp`` only ever sees finite arguments there (double ``where``).
    """
    w = jnp.asarray(w, loga.dtype)
    la = loga + jnp.log(w)
    lb = logb + jnp.log1p(-w)
    both_zero = jnp.isneginf(la) & jnp.isneginf(lb)
    out = jnp.logaddexp(jnp.where(both_zero, 0.0, la), jnp.where(both_zero, 0.0, lb))
    return jnp.where(both_zero, -jnp.inf, out)


def _is_python_number(x):
    return isinstance(x, (int, float))


def _entropy_logp(logp):
    return -jnp.sum(ops.xlogy_exp(logp, logp), axis=-1)


# --------------------------------------------------------------------------------------------
# KL and its two directions
# --------------------------------------------------------------------------------------------

def kl(p_logits, q_logits, temperature: float = 1.0):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis, p = softmax(p_logits/τ)."""
    logp, logq = _log_probs(p_logits, q_logits, temperature)
    return _kl_logp(logp, logq)


def forward_kl(target, model, temperature: float = 1.0):
    """Forward KL(P‖Q) = Σ p (log p − log q), P = target (teacher), Q = model: mode-covering.

    Hinton KD / GKD β→0 / DistiLLM ``fkl`` (DistiLLM returns −Σ p log q, larger by H(p)).
    """
    return kl(target, model, temperature)


def reverse_kl(target, model, temperature: float = 1.0):
    """Reverse KL(Q‖P) = Σ q (log q − log p), Q = model (student), P = target: mode-seeking.

    MiniLLM's single-step term, GKD β→1, TRL's ``beta=1``.
    """
    return kl(model, target, temperature)


# --------------------------------------------------------------------------------------------
# Mixture-based divergences
# --------------------------------------------------------------------------------------------

def generalized_jsd(target, model, beta: float = 0.5, temperature: float = 1.0):
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024, Eq. 1).

    JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M),  M = βP + (1−β)Q,  P = target, Q = model, β ∈ [0, 1].

    β = ½ is the symmetric JSD (≤ log 2). The value is bounded by −β log β − (1−β) log(1−β) and
    is finite even where P and Q have disjoint supports. **Endpoints:** JSD(0) = JSD(1) = 0 exactly
    (the formula's value; computed without 0·∞), and the function is continuous there. The useful
    limits are JSD(β)/β → KL(P‖Q) as β → 0 and JSD(β)/(1−β) → KL(Q‖P) as β → 1.

    Other libraries: TRL's ``generalized_jsd_loss(beta)`` uses the same mixture for 0 < β < 1 but
    special-cases β = 0 to the *full* forward KL and β = 1 to the full reverse KL (a deliberate
    discontinuity): use ``forward_kl``/``reverse_kl`` for those. EasyDeL follows TRL. DistiLLM's
    ``js_distance(lam)`` is ``generalized_jsd(β = 1 − lam)`` (its default lam=0.9 is β = 0.1);
    TAID's ``JS(teacher_weight=w)`` is β = w. TRL before PR #3043 swapped the weights (β ↔ 1−β).
    """
    ops.check_range("beta", beta, 0.0, 1.0)
    logp, logq = _log_probs(target, model, temperature)
    return _jsd_logp(logp, logq, beta)


def _jsd_logp(logp, logq, beta):
    """JSD(β) from log-probabilities (a sum over the last axis: additive over vocabulary tiles)."""
    if _is_python_number(beta) and beta in (0.0, 1.0):
        return jnp.zeros(logp.shape[:-1], logp.dtype)
    logm = _log_mix(logp, logq, beta)
    beta = jnp.asarray(beta, logp.dtype)
    # where-guards make a traced β at an endpoint give 0 rather than 0·KL(·‖Q or P) = 0·∞.
    to_p = jnp.where(beta > 0, beta * _kl_logp(logp, logm), 0.0)
    to_q = jnp.where(beta < 1, (1 - beta) * _kl_logp(logq, logm), 0.0)
    return to_p + to_q


def skew_kl(target, model, alpha: float = 0.1, temperature: float = 1.0):
    """Skew forward KL of DistiLLM (Ko et al., ICML 2024): KL(P ‖ αP + (1−α)Q), α ∈ [0, 1].

    P = target, Q = model. α = 0 is KL(P‖Q); α = 1 is 0. For α > 0 the value is at most −log α.
    DistiLLM's ``skewed_forward_kl`` returns the cross-entropy form (larger by H(P)).
    """
    ops.check_range("alpha", alpha, 0.0, 1.0)
    logp, logq = _log_probs(target, model, temperature)
    return _skew_kl_logp(logp, logq, alpha)


def _skew_kl_logp(logp, logq, alpha):
    return _kl_logp(logp, _log_mix(logp, logq, alpha))


def skew_reverse_kl(target, model, alpha: float = 0.1, temperature: float = 1.0):
    """Skew reverse KL of DistiLLM: KL(Q ‖ αQ + (1−α)P), α ∈ [0, 1]; α = 0 is KL(Q‖P).

    Q = model (student), P = target. Gradients flow through both Q and the mixture (DistiLLM v1;
    DistiLLM-2 detaches Q inside the mixture, which changes the gradient).
    """
    ops.check_range("alpha", alpha, 0.0, 1.0)
    logp, logq = _log_probs(target, model, temperature)
    return _skew_kl_logp(logq, logp, alpha)


def total_variation(target, model, temperature: float = 1.0):
    """Total variation ½ Σ_v |p_v − q_v| ∈ [0, 1] (DistiLLM ``tv_distance``); symmetric."""
    logp, logq = _log_probs(target, model, temperature)
    return _total_variation_logp(logp, logq)


def _total_variation_logp(logp, logq):
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


# --------------------------------------------------------------------------------------------
# The same divergences from hidden states, streamed over vocabulary tiles (large vocabularies)
# --------------------------------------------------------------------------------------------
#
# Each takes the teacher's (target's) final hidden states ``[..., D]`` and unembedding ``[D, V]``,
# then the student's (model's), an optional ``mask [...]``, ``temperature`` τ (dividing both sets of
# logits) and ``chunk_size``; it returns the same value as the dense function applied to
# ``hidden @ unembedding`` (0 where ``mask`` is 0) without ever holding ``[tokens, V]`` logits:
# every divergence here is a sum over the vocabulary of a term in (log p_v, log q_v), so
# ``ops.divergence_from_hidden`` streams the tiles once for both logsumexps and once for the sum,
# and its custom backward pass recomputes each tile. The teacher gets no gradient.
# β, α are Python numbers.

def forward_kl_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                           temperature: float = 1.0, chunk_size: int = 8192):
    """``forward_kl`` = KL(P‖Q) = Σ_v p_v (log p_v − log q_v), from hidden states by vocabulary tiles."""
    return ops.divergence_from_hidden(_kl_logp, target_hidden, target_unembedding, model_hidden,
                                      model_unembedding, mask, temperature, chunk_size)


def reverse_kl_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                           temperature: float = 1.0, chunk_size: int = 8192):
    """``reverse_kl`` = KL(Q‖P) = Σ_v q_v (log q_v − log p_v), from hidden states by vocabulary tiles."""
    return ops.divergence_from_hidden(lambda lp, lq: _kl_logp(lq, lp), target_hidden, target_unembedding,
                                      model_hidden, model_unembedding, mask, temperature, chunk_size)


def generalized_jsd_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                                beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 8192):
    """``generalized_jsd``: JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, by vocabulary tiles.

    log M_v = logaddexp(log β + log p_v, log(1−β) + log q_v) per entry, so each tile's terms need
    only that tile's normalized log-probabilities.
    """
    ops.check_range("beta", beta, 0.0, 1.0)
    return ops.divergence_from_hidden(lambda lp, lq: _jsd_logp(lp, lq, beta), target_hidden,
                                      target_unembedding, model_hidden, model_unembedding, mask,
                                      temperature, chunk_size)


def skew_kl_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                        alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = 8192):
    """``skew_kl`` = KL(P ‖ αP + (1−α)Q), from hidden states by vocabulary tiles."""
    ops.check_range("alpha", alpha, 0.0, 1.0)
    return ops.divergence_from_hidden(lambda lp, lq: _skew_kl_logp(lp, lq, alpha), target_hidden,
                                      target_unembedding, model_hidden, model_unembedding, mask,
                                      temperature, chunk_size)


def skew_reverse_kl_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                                alpha: float = 0.1, temperature: float = 1.0, chunk_size: int = 8192):
    """``skew_reverse_kl`` = KL(Q ‖ αQ + (1−α)P), from hidden states by vocabulary tiles."""
    ops.check_range("alpha", alpha, 0.0, 1.0)
    return ops.divergence_from_hidden(lambda lp, lq: _skew_kl_logp(lq, lp, alpha), target_hidden,
                                      target_unembedding, model_hidden, model_unembedding, mask,
                                      temperature, chunk_size)


def total_variation_from_hidden(target_hidden, target_unembedding, model_hidden, model_unembedding, mask=None,
                                temperature: float = 1.0, chunk_size: int = 8192):
    """``total_variation`` = ½ Σ_v |p_v − q_v|, from hidden states by vocabulary tiles."""
    return ops.divergence_from_hidden(_total_variation_logp, target_hidden, target_unembedding, model_hidden,
                                      model_unembedding, mask, temperature, chunk_size)


# --------------------------------------------------------------------------------------------
# Adaptive combinations of forward and reverse KL
# --------------------------------------------------------------------------------------------

def adaptive_kl(target, model, mu: float = 0.5, temperature: float = 1.0):
    """AKL (Wu et al., COLING 2025, arXiv:2404.02657): g_head·KL(P‖Q) + g_tail·KL(Q‖P).

    As the official ``LLM_KD_AKL/AKL.py``: sort the teacher probabilities in descending order; the
    head H is the leading tokens whose cumulative teacher mass is ≤ μ (the top token always belongs
    to it), the tail the rest. With gaps ε_v = |p_v − sg(q_v)| (student detached),
    g_head = Σ_{v∈H} ε_v / Σ_v ε_v and g_tail = 1 − g_head; both weights are constants for the
    gradient. μ ∈ (0, 1]. (TAID's re-implementation sorts ascending and mixes index orders; it
    does not match this.)
    """
    ops.check_range("mu", mu, 0.0, 1.0, low_open=True)
    logp, logq = _log_probs(target, model, temperature)
    p = jnp.exp(logp)
    gap = jnp.abs(p - jax.lax.stop_gradient(jnp.exp(logq)))
    order = jnp.argsort(-p, axis=-1)
    p_sorted = jnp.take_along_axis(p, order, axis=-1)
    gap_sorted = jnp.take_along_axis(gap, order, axis=-1)
    first = jnp.arange(p.shape[-1]) == 0
    head = (jnp.cumsum(p_sorted, axis=-1) <= mu) | first
    total = jnp.sum(gap, axis=-1)
    # p == q gives 0/0; any weight is right then (both KLs are 0), ½ keeps it symmetric.
    g_head = jnp.where(
        total > 0, jnp.sum(jnp.where(head, gap_sorted, 0.0), axis=-1) / jnp.where(total > 0, total, 1.0), 0.5
    )
    g_head = jax.lax.stop_gradient(g_head)
    g_tail = 1.0 - g_head
    # A zero weight drops its term, also where that KL is +inf (0·inf would be NaN).
    head = jnp.where(g_head > 0, g_head * _kl_logp(logp, logq), 0.0)
    tail = jnp.where(g_tail > 0, g_tail * _kl_logp(logq, logp), 0.0)
    return head + tail


def bdkd(target, model, heavy_weight: float = 3.0, temperature: float = 1.0):
    """Balanced-divergence KD (BD-KD, Amara et al., arXiv:2212.12965): w_t·KL(P‖Q) + w_s·KL(Q‖P).

    Per position, the direction whose first argument has the larger entropy gets ``heavy_weight``:
    w_t = heavy_weight if H(P) > H(Q) else 1, w_s = heavy_weight if H(Q) > H(P) else 1 (both 1 on
    a tie). The weights are piecewise constant (no gradient). heavy_weight = 3 follows the ABKD
    repository's re-implementation (its comments say 2); that code uses the cross-entropy form of
    the forward term (larger by w_t·H(P)). The paper's exact weighting is [paper-only].
    """
    ops.check_range("heavy_weight", heavy_weight, 0.0, None)
    logp, logq = _log_probs(target, model, temperature)
    h_t = jax.lax.stop_gradient(_entropy_logp(logp))
    h_s = jax.lax.stop_gradient(_entropy_logp(logq))
    w_t = jnp.where(h_t > h_s, heavy_weight, 1.0)
    w_s = jnp.where(h_s > h_t, heavy_weight, 1.0)
    return w_t * _kl_logp(logp, logq) + w_s * _kl_logp(logq, logp)


# --------------------------------------------------------------------------------------------
# Power divergences
# --------------------------------------------------------------------------------------------

def _log_power_sum(loga, logb, a, b):
    """log Σ_v p_a^a p_b^b from log-probs; entries where both are zero count as 0 (shared padding)."""
    both_zero = jnp.isneginf(loga) & jnp.isneginf(logb)
    la = jnp.where(both_zero, 0.0, loga)
    lb = jnp.where(both_zero, 0.0, logb)
    # 0^0 = 1 and 0·(−inf) must not appear: a zero exponent drops its factor.
    ta = jnp.where(a == 0, 0.0, a * la) if _is_python_number(a) else a * la
    tb = jnp.where(b == 0, 0.0, b * lb) if _is_python_number(b) else b * lb
    expo = jnp.where(both_zero, -jnp.inf, ta + tb)
    return jax.nn.logsumexp(expo, axis=-1)


def alpha_divergence(target, model, alpha: float = 0.5, temperature: float = 1.0):
    """Amari α-divergence as in AlphaNet (Wang et al., ICML 2021), P = target, Q = model:

    D_α(P‖Q) = (Σ_v p_v^α q_v^{1−α} − 1) / (α(α−1)),  α ∈ ℝ;
    α = 1 is KL(P‖Q) (forward), α = 0 is KL(Q‖P) (reverse), both computed exactly as limits;
    α = ½ is 4·(1 − Σ√(pq)) (a squared Hellinger distance). AlphaNet uses α ∈ [−1, 1]. Unlike
    AlphaNet (which detaches p, q and clips the ratio for its surrogate gradient) this is the exact
    divergence with its exact gradient.
    """
    ops.check_range("alpha", alpha)
    logp, logq = _log_probs(target, model, temperature)
    if _is_python_number(alpha) and alpha == 1:
        return _kl_logp(logp, logq)
    if _is_python_number(alpha) and alpha == 0:
        return _kl_logp(logq, logp)
    # Σ p^α q^{1−α} − 1 = expm1(log Σ ...) keeps precision when the two are close.
    return jnp.expm1(_log_power_sum(logp, logq, alpha, 1 - alpha)) / (alpha * (alpha - 1))


def ab_divergence(target, model, alpha: float = 0.2, beta: float = 0.7, temperature: float = 1.0):
    """α-β divergence of ABKD (Wang et al., ICML 2025), P = target (teacher), Q = model:

    D_AB^{(α,β)}(P‖Q) = −1/(αβ) Σ_v [p^α q^β − α/(α+β) p^{α+β} − β/(α+β) q^{α+β}]   (α, β, α+β ≠ 0)

    with the continuous limits (Cichocki, Cruces & Amari 2011), used when an argument is exactly 0:
      β = 0:      1/α² Σ [p^α log(p^α/q^α) − p^α + q^α]        ((1, 0) is KL(P‖Q))
      α = 0:      1/β² Σ [q^β log(q^β/p^β) − q^β + p^β]        ((0, 1) is KL(Q‖P))
      α = −β:     1/α² Σ [log(q^α/p^α) + (q^α/p^α)^{−1} − 1]   (Itakura–Saito type)
      α = β = 0:  ½ Σ (log p − log q)²
    D_AB^{(α, 1−α)} is the α-divergence D_α. ABKD's LLM default is (α, β) = (0.2, 0.7).
    Vocabulary entries where both P and Q are zero are excluded.
    α and β must be Python numbers (the limit branches are chosen at trace time).
    """
    ops.check_range("alpha", alpha)
    ops.check_range("beta", beta)
    logp, logq = _log_probs(target, model, temperature)
    both_zero = jnp.isneginf(logp) & jnp.isneginf(logq)
    lp = jnp.where(both_zero, 0.0, logp)
    lq = jnp.where(both_zero, 0.0, logq)

    def total(x):
        return jnp.sum(jnp.where(both_zero, 0.0, x), axis=-1)

    a, b = alpha, beta
    if a == 0 and b == 0:
        return 0.5 * total(jnp.square(lp - lq))
    if b == 0:
        pa, qa = jnp.exp(a * lp), jnp.exp(a * lq)
        return total(ops.xlogy_exp(a * lp, a * (lp - lq)) - pa + qa) / a**2
    if a == 0:
        pb, qb = jnp.exp(b * lp), jnp.exp(b * lq)
        return total(ops.xlogy_exp(b * lq, b * (lq - lp)) - qb + pb) / b**2
    if a + b == 0:
        d = a * (lq - lp)
        return total(d + jnp.exp(-d) - 1.0) / a**2
    s = a + b
    terms = jnp.exp(a * lp + b * lq) - (a / s) * jnp.exp(s * lp) - (b / s) * jnp.exp(s * lq)
    return -total(terms) / (a * b)


def tsallis_kl(target, model, order: float = 0.5, temperature: float = 1.0):
    """Tsallis relative entropy of index q = ``order`` > 0, P = target, Q = model:

    D_q(P‖Q) = (Σ_v p_v^q q_v^{1−q} − 1)/(q − 1) = q·D_{α=q}(P‖Q) (the α-divergence);
    q → 1 is KL(P‖Q), computed exactly at ``order == 1``. No KD code ships it (reference §7.3).
    The default 0.5 keeps it bounded (≤ 2); for q > 1 it grows like Σ p^q/q^{q−1} and can overflow
    where the model puts ~0 mass on a target token. No paper fixes a default.
    """
    ops.check_range("order", order, 0.0, None, low_open=True)
    logp, logq = _log_probs(target, model, temperature)
    if _is_python_number(order) and order == 1:
        return _kl_logp(logp, logq)
    return jnp.expm1(_log_power_sum(logp, logq, order, 1 - order)) / (order - 1)


# --------------------------------------------------------------------------------------------
# Sampled estimators of KL(π‖π_ref) from per-token log-probs (Schulman 2020)
# --------------------------------------------------------------------------------------------

def k1(logp, ref_logp):
    """k1 = log π(y) − log π_ref(y): unbiased for KL(π‖π_ref) at y ~ π, high variance (Schulman 2020)."""
    return logp - ref_logp


def k2(logp, ref_logp):
    """k2 = ½(log π(y) − log π_ref(y))²: biased, low variance; as a loss its gradient is ∇KL(π‖π_ref)."""
    return 0.5 * jnp.square(logp - ref_logp)


def k3(logp, ref_logp):
    """k3 = ρ − log ρ − 1 with ρ = π_ref(y)/π(y): unbiased for KL(π‖π_ref) at y ~ π, ≥ 0.

    As a *loss* sampled on-policy its expected gradient is ∇KL(π_ref‖π), the forward KL
    (reference/policy_gradient.md §1.2).
    """
    d = ref_logp - logp
    return jnp.expm1(d) - d


def importance_weighted_k3(logp, old_logp, ref_logp):
    """w·k3(π_ref/π) with w = π(y)/π_old(y) differentiable, at y ~ π_old ("corrected GRPO").

    E_{π_old}[w·k3] = Σ_y π(y)(ρ − 1 − log ρ) = KL(π‖π_ref) as a *function of θ*, so as a loss its
    expected gradient is exactly ∇KL(π‖π_ref) (the reverse KL) even off-policy (RPG's URKL
    regularizer, TRL ``use_bias_correction_kl``; reference/policy_gradient.md §1.2, §2.1).
    ``old_logp`` and ``ref_logp`` are treated as constants.
    """
    old_logp = jax.lax.stop_gradient(old_logp)
    ref_logp = jax.lax.stop_gradient(ref_logp)
    return jnp.exp(logp - old_logp) * k3(logp, ref_logp)
