"""Divergences between categorical distributions given as logits, and sampled KL estimators.

(The full-distribution divergences beyond ``kl`` are being added; see issue 2.)
"""
from __future__ import annotations

import jax.numpy as jnp

from kljax import ops


def kl(p_logits, q_logits, temperature: float = 1.0):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the last axis, p = softmax(p_logits/τ)."""
    logp = ops.safe_log_softmax(p_logits, temperature)
    logq = ops.safe_log_softmax(q_logits, temperature)
    return jnp.sum(ops.xlogy_exp(logp, logp - logq), axis=-1)


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
