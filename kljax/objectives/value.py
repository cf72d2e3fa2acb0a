"""Value-based KL-regularized RL: Q♯ guidance, its critic losses, CD, Munchausen/MDVI targets, DeRa.

Everything here serves one fact (reference/value_based.md §1.1). In a deterministic MDP (an LLM:
the next state is the prefix plus the token) the optimum of the reverse-KL-regularized objective

    max_π E_π[Σ_h r_h] − η·KL(π‖π_ref)

is π⋆(y|x) ∝ π_ref(y|x)·exp(Q⋆(x,y)/η) with Q⋆(x,y) = η·log E_{π_ref}[exp(Z/η) | x, y], where Z is
the reward-to-go of π_ref after (x, y) (Q♯, Zhou et al. 2025, arXiv 2502.20548, Thm 2.2). So a critic
that predicts the *distribution* of Z under π_ref gives π⋆ for any η at decode time.

Contents:
* the Q⋆ functional for a Bernoulli critic (``qstar_bernoulli``) and a histogram critic
  (``qstar_histogram``), accurate for η from 1e-6 to 1e6;
* ``qsharp_logits``: the guided next-token logits (Q♯, or the CD baseline), optional top-k;
* ``optimal_policy_logits``: the closed form π⋆ ∝ π_ref·exp(q/η);
* critic losses ``qsharp_bce`` and ``qsharp_histogram`` (registered, family ``value``);
* Munchausen / MDVI targets for tabular or discrete-action RL (KL to the *previous* policy);
* ``dera_logits``: decoding-time realignment (DeRa, Liu et al. 2024).

Imports only jax, jax.numpy and kljax.ops.
"""
from __future__ import annotations

import operator
from typing import Optional

import jax
import jax.numpy as jnp
from kljax import ops
from kljax.objectives import register

KINDS = ("bernoulli", "histogram", "cd")
PROJECTIONS = ("two_hot", "nearest")


# --------------------------------------------------------------------------------------------
# Argument checks (run at trace time on Python / NumPy values; traced values pass through)
# --------------------------------------------------------------------------------------------

def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_positive(name: str, value):
    """``value`` must be finite and > 0 (scalar or array); traced values are not checked."""
    if _is_traced(value):
        return
    with jax.ensure_compile_time_eval():  # concrete values inside a jit trace stay checkable
        v = jnp.asarray(value, jnp.float32)
        ok = v.size > 0 and bool(jnp.all(jnp.isfinite(v) & (v > 0)))
    if not ok:
        raise ValueError(
            f"{name}={value!r} is outside its valid range (0, inf): it must be finite and > 0"
        )


def _check_atoms(atoms, critic_logits, kind_hint: str):
    if atoms is None:
        raise ValueError(
            f"atoms is required for a histogram critic ({kind_hint}): pass the return value of each "
            "atom, a 1-D array of length A = critic_logits.shape[-1]"
        )
    shape = tuple(jnp.shape(atoms))
    if len(shape) != 1 or shape[0] != jnp.shape(critic_logits)[-1]:
        raise ValueError(
            f"atoms has shape {list(shape)} but must be 1-D of length A = critic_logits.shape[-1] = "
            f"{jnp.shape(critic_logits)[-1]} (critic_logits shape {list(jnp.shape(critic_logits))})"
        )
    if not _is_traced(atoms):
        with jax.ensure_compile_time_eval():
            a = jnp.asarray(atoms)
            finite = bool(jnp.all(jnp.isfinite(a)))
            increasing = shape[0] < 2 or bool(jnp.all(jnp.diff(a) > 0))
        if not finite:
            raise ValueError(f"atoms={a!r} must all be finite")
        if not increasing:
            raise ValueError(f"atoms={a!r} must be strictly increasing")


def _inv_eta(eta, dtype):
    """1/η as an array that broadcasts against the leading (non-vocabulary) dimensions."""
    _check_positive("eta", eta)
    return 1.0 / jnp.asarray(eta, dtype)


# --------------------------------------------------------------------------------------------
# The Q⋆ functional  Q = η·log E[exp(Z/η)],  computed as  η·(log-mgf of Z at s = 1/η)
# --------------------------------------------------------------------------------------------
# Two regimes, chosen with a NaN-safe double `where` so both branches stay finite:
#   |s·z| ≤ 1  : log E e^{sZ} = log1p(E[expm1(sZ)])  — keeps the O(s) signal that a plain
#                logsumexp would lose to rounding when η is large (Q → E[Z], the CD target);
#   otherwise : logsumexp(log p + s·z)               — no overflow when η is small (Q → max Z).

def _bernoulli_log_mgf(critic_logits, inv_eta):
    """log E[exp(s·Z)] for Z ~ Bernoulli(σ(l)) = log(1 − p + p·e^s), stable for all s > 0."""
    l = ops._upcast(jnp.asarray(critic_logits))
    s = jnp.asarray(inv_eta, l.dtype)
    small = s <= 1.0
    s_small = jnp.minimum(s, 1.0)
    s_large = jnp.maximum(s, 1.0)
    # p = σ(l) is exact at l = ±inf (p ∈ {0, 1}); log σ(l) = −softplus(−l).
    near = jnp.log1p(jax.nn.sigmoid(l) * jnp.expm1(s_small))
    far = s_large + jnp.logaddexp(jax.nn.log_sigmoid(l), jax.nn.log_sigmoid(-l) - s_large)
    return jnp.where(small, near, far)


def _histogram_log_mgf(critic_logits, atoms, inv_eta):
    """log E[exp(s·Z)] for Z on ``atoms`` with probabilities softmax(critic_logits) (last axis)."""
    h = ops._upcast(jnp.asarray(critic_logits))
    z = jnp.asarray(atoms, h.dtype)
    s = jnp.asarray(inv_eta, h.dtype)[..., None]
    logp = jax.nn.log_softmax(h, axis=-1)
    sz = s * z
    small = jnp.max(jnp.abs(sz), axis=-1) <= 1.0
    near = jnp.log1p(jnp.sum(jnp.exp(logp) * jnp.expm1(jnp.clip(sz, -1.0, 1.0)), axis=-1))
    far = jax.nn.logsumexp(logp + jnp.where(small[..., None], 0.0, sz), axis=-1)
    return jnp.where(small, near, far)


def qstar_bernoulli(critic_logits, eta):
    """Q⋆ = η·log(1 − p + p·e^{1/η}), p = σ(critic_logits): the Q⋆ functional of a 0/1 return.

    Q⋆ is the certainty equivalent η·log E[e^{Z/η}] of Z ~ Bernoulli(p) (Q♯, Zhou et al. 2025,
    §2, "Bernoulli reward"). It grows monotonically from E[Z] = p (η → ∞: the CD target) to
    max Z = 1[p > 0] (η → 0). ``critic_logits`` may be ±inf (p exactly 1 or 0). Computed in log
    space, accurate for η in [1e-6, 1e6]; η must be finite and > 0.
    """
    l = ops._upcast(jnp.asarray(critic_logits))
    inv = _inv_eta(eta, l.dtype)
    return _bernoulli_log_mgf(l, inv) / inv


def qstar_histogram(critic_logits, atoms, eta):
    """Q⋆ = η·logsumexp(log_softmax(h) + z/η) over the atoms: η·log E[e^{Z/η}] for a histogram Z.

    ``critic_logits [..., A]`` are logits over the return values ``atoms [A]``. Q⋆ lies between
    E[Z] (η → ∞) and the largest atom with positive probability (η → 0), and is non-increasing
    in η (Q♯, Zhou et al. 2025, Thm 2.2 / Eq. 5 with a C51-style support).
    """
    _check_atoms(atoms, critic_logits, "qstar_histogram")
    h = ops._upcast(jnp.asarray(critic_logits))
    inv = _inv_eta(eta, h.dtype)
    return _histogram_log_mgf(h, atoms, inv) / inv


def histogram_mean(critic_logits, atoms):
    """E[Z] = Σ_i softmax(h)_i·z_i: the expected return of a histogram critic (a CD input)."""
    _check_atoms(atoms, critic_logits, "histogram_mean")
    h = ops._upcast(jnp.asarray(critic_logits))
    return jnp.sum(jax.nn.softmax(h, axis=-1) * jnp.asarray(atoms, h.dtype), axis=-1)


# --------------------------------------------------------------------------------------------
# Guided decoding
# --------------------------------------------------------------------------------------------

def _guidance_offset(critic_logits, eta, kind, atoms):
    """Q/η per candidate token: log E[e^{Z/η}] for Q♯, E[Z]/η for CD."""
    c = ops._upcast(jnp.asarray(critic_logits))
    inv = _inv_eta(eta, c.dtype)
    if kind == "bernoulli":
        return _bernoulli_log_mgf(c, inv)
    if kind == "histogram":
        _check_atoms(atoms, c, "kind='histogram'")
        return _histogram_log_mgf(c, atoms, inv)
    return c * inv  # CD: critic_logits hold E[Z] = Q^{π_ref}


TOP_K_REST = ("mask", "reference")


def restrict_top_k(ref_logits, logits, top_k: int, rest: str = "mask"):
    """Keep ``logits`` on the ``top_k`` largest ``ref_logits`` (ties at the k-th kept); the rest:

    * ``rest="mask"``: −inf (those tokens are never sampled; the Q♯ star-graph code);
    * ``rest="reference"``: the reference logits, unguided (the Q♯ math-reasoning code).
    """
    ops.check_choice("top_k_rest", rest, TOP_K_REST)
    v = jnp.shape(ref_logits)[-1]
    try:
        top_k = operator.index(top_k)
    except TypeError:
        top_k = 0
    if top_k < 1:
        raise ValueError("top_k must be a positive int (or None for no restriction)")
    if top_k >= v:
        return logits
    kth = jax.lax.top_k(jax.lax.stop_gradient(ref_logits), top_k)[0][..., -1:]
    other = -jnp.inf if rest == "mask" else jnp.asarray(ref_logits, jnp.result_type(logits))
    return jnp.where(ref_logits >= kth, logits, other)


def qsharp_logits(ref_logits, critic_logits, eta, kind, atoms=None, top_k: Optional[int] = None,
                  top_k_rest: str = "mask"):
    """Guided next-token logits ``ref_logits + Q/η``, the per-token form of π ∝ π_ref·exp(Q/η).

    * ``kind='bernoulli'`` (Q♯): ``critic_logits [..., V]`` are logits of each next token's
      success probability p; offset log(1 − p + p·e^{1/η}) = Q⋆/η.
    * ``kind='histogram'`` (Q♯): ``critic_logits [..., V, A]`` are logits over ``atoms [A]``;
      offset logsumexp(log_softmax(h) + z/η) = Q⋆/η.
    * ``kind='cd'`` (CD / VAS baseline, Mudgal et al. 2024, Q♯ Eq. 6): ``critic_logits [..., V]``
      hold the expected return E[Z] = Q^{π_ref}; offset E[Z]/η.

    With the exact Q⋆ the sampled sequences follow π⋆(y) ∝ π_ref(y)·exp(r(y)/η), the optimum of
    E_π[r] − η·KL(π‖π_ref) (reverse KL; Q♯, Zhou et al. 2025, Eq. 2 and Eq. 5). CD's offset
    uses the mean instead, which is exact only when the reward-to-go is deterministic.

    **Temperature:** that holds when these logits are sampled at temperature 1. A sampler that
    divides them by τ afterwards (kljax's logits processors run *before* temperature) samples
    ∝ (π_ref·exp(Q/η))^{1/τ}, which is not π⋆ for τ ≠ 1 (not even π⋆ at another η: the
    reference is sharpened too) (``test_guided_policy_is_optimal_only_at_temperature_one``).

    ``eta`` is the paper's η (the KL weight; the Q♯ *math* code passes 1/η). ``top_k`` restricts
    guidance to the reference's k most likely tokens; ``top_k_rest`` sets the other tokens to
    −inf (``"mask"``, the default, as the Q♯ star-graph code) or leaves them at their reference
    logits (``"reference"``, as the Q♯ math code); either way π⋆ is only exact with no top-k.
    −inf reference logits stay −inf. The returned logits are not normalized.
    """
    check = ops.check_choice
    check("kind", kind, KINDS)
    check("top_k_rest", top_k_rest, TOP_K_REST)
    ref = ops._upcast(jnp.asarray(ref_logits))
    c_shape = tuple(jnp.shape(critic_logits))
    expected = ref.shape + ((c_shape[-1],) if kind == "histogram" and len(c_shape) else ())
    if c_shape != expected:
        want = "[..., V, A]" if kind == "histogram" else "[..., V]"
        raise ValueError(
            f"critic_logits has shape {list(c_shape)} but kind={kind!r} needs {want} matching "
            f"ref_logits {list(ref.shape)}"
        )
    offset = _guidance_offset(critic_logits, eta, kind, atoms)
    out = ref + offset.astype(ref.dtype)
    if top_k is not None:
        out = restrict_top_k(ref, out, top_k, top_k_rest)
    return out


def optimal_policy_logits(ref_logits, q, eta):
    """log π⋆ with π⋆(y) = π_ref(y)·exp(q(y)/η) / Σ_y' π_ref(y')·exp(q(y')/η) (last axis).

    The closed-form maximizer of E_π[q] − η·KL(π‖π_ref) (reverse KL; e.g. Q♯ Eq. 2, DPO's
    π_r). Returns normalized log-probabilities; −inf reference entries stay −inf.
    """
    ref = ops._upcast(jnp.asarray(ref_logits))
    ops.check_same_shape(ref_logits=ref, q=q)
    inv = _inv_eta(eta, ref.dtype)
    return jax.nn.log_softmax(ref + jnp.asarray(q, ref.dtype) * inv, axis=-1)


def dera_logits(ref_logits, aligned_logits, lam):
    """DeRa: ``ref + λ·(aligned − ref)`` = (1−λ)·h_ref + λ·h_aligned in logit space.

    If π_aligned ∝ π_ref·exp(r/β), the sequence-level geometric mixture π_ref^{1−λ}·π_aligned^λ is
    exactly the optimum at KL weight β/λ; per token this is DeRa's approximation (Liu et al.,
    ICML 2024, arXiv 2402.02992; reference/value_based.md §6). λ = 0 is the reference, λ = 1 the
    aligned model, λ > 1 extrapolates (weaker regularization). A token that is −inf under either
    model with nonzero weight stays −inf (its mixture probability is 0).
    """
    if not _is_traced(lam):
        with jax.ensure_compile_time_eval():
            lv = jnp.asarray(lam, jnp.float32)
            ok = bool(jnp.all(jnp.isfinite(lv) & (lv >= 0)))
        if not ok:
            raise ValueError(f"lam={lam!r} is outside its valid range [0, inf)")
    ref = ops._upcast(jnp.asarray(ref_logits))
    ali = ops._upcast(jnp.asarray(aligned_logits))
    ops.check_same_shape(ref_logits=ref, aligned_logits=ali)
    lam = jnp.asarray(lam, ref.dtype)
    both = jnp.isfinite(ref) & jnp.isfinite(ali)
    safe_ref = jnp.where(both, ref, 0.0)
    safe_ali = jnp.where(both, ali, 0.0)
    mixed = safe_ref + lam * (safe_ali - safe_ref)
    edge = jnp.where(lam == 0, ref, jnp.where(lam == 1, ali, -jnp.inf))
    return jnp.where(both, mixed, edge)


# --------------------------------------------------------------------------------------------
# Critic losses (Q♯ Algorithm 1): the critic fits the reward-to-go distribution of π_ref
# --------------------------------------------------------------------------------------------

def _per_token_returns(returns, mask):
    r = jnp.asarray(returns)
    m_shape = tuple(jnp.shape(mask))
    if r.shape == m_shape:
        return r
    if r.ndim == 1 and r.shape[0] == m_shape[0]:
        return jnp.broadcast_to(r[:, None], m_shape)
    raise ValueError(
        f"returns has shape {list(r.shape)} but must be [B] = [{m_shape[0]}] (one return per "
        f"sequence) or [B, T] = {list(m_shape)} (reward-to-go per position), like mask"
    )


def _select_taken(critic_logits, tokens, mask, trailing: int, name: str):
    """The critic output at the taken tokens: [B,T,V(,A)] → [B,T(,A)]; tokens=None: already taken."""
    c = ops._upcast(jnp.asarray(critic_logits))
    m_shape = tuple(jnp.shape(mask))
    if len(m_shape) != 2:
        raise ValueError(f"mask has shape {list(m_shape)} but must be [B, T]")
    if tokens is None:
        if c.ndim != 2 + trailing:
            raise ValueError(
                f"critic_logits has shape {list(c.shape)}; with tokens=None ({name}: a V-type critic "
                f"already evaluated at the taken tokens) it must be [B, T{', A' if trailing else ''}]"
            )
    else:
        if c.ndim != 3 + trailing:
            raise ValueError(
                f"critic_logits has shape {list(c.shape)} but {name} needs "
                f"[B, T, V{', A' if trailing else ''}] (or pass tokens=None with [B, T"
                f"{', A' if trailing else ''}])"
            )
        if tuple(jnp.shape(tokens)) != m_shape:
            raise ValueError(
                f"tokens has shape {list(jnp.shape(tokens))} but must match mask {list(m_shape)}"
            )
        idx = jnp.asarray(tokens).astype(jnp.int32)[(...,) + (None,) * (1 + trailing)]
        c = jnp.take_along_axis(c, idx, axis=2)[:, :, 0]
    if tuple(c.shape[:2]) != m_shape:
        raise ValueError(
            f"critic_logits has leading shape {list(c.shape[:2])} but must match mask {list(m_shape)}"
        )
    return c


@register("qsharp_bce", "value")
def qsharp_bce(critic_logits, tokens, returns, mask, loss_agg: str = "seq-mean-token-mean"):
    """Bernoulli critic loss: BCE(l, r) = −r·log σ(l) − (1−r)·log σ(−l) at the taken tokens.

    ``loss, metrics = qsharp_bce(critic_logits, tokens, returns, mask, loss_agg=...)``

    * ``critic_logits [B, T, V]``: a Q-type head, logits of P(success | prefix, next token) for every
      next token; the entry of the token actually taken, ``tokens [B, T]``, is used. With
      ``tokens=None``, ``critic_logits [B, T]`` is a V-type head already evaluated there.
    * ``returns [B]`` (one label per sequence, broadcast to every position, as in the Q♯ code) or
      ``[B, T]``, labels in [0, 1] (soft labels allowed): the 0/1 reward of the π_ref rollout.
    * ``mask [B, T]``: 1 where a position trains. Masked entries change neither loss nor gradient.
    * ``loss_agg``: ``ops.aggregate`` mode; the default averages over each sequence's positions,
      then over sequences, as the Q♯ code does.

    Minimizing it makes σ(l) the π_ref success probability, so ``qstar_bernoulli`` gives Q⋆ for any
    η (Q♯, Zhou et al. 2025, Alg. 1 and Cor. 4.5: MLE reduces to BCE for 0/1 rewards).
    """
    l = _select_taken(critic_logits, tokens, mask, 0, "qsharp_bce")
    m = jnp.asarray(mask, l.dtype)
    y = _per_token_returns(returns, mask).astype(l.dtype)
    keep = m > 0
    l = jnp.where(keep, l, 0.0)
    y = jnp.where(keep, y, 0.0)
    per_token = -(y * jax.nn.log_sigmoid(l) + (1.0 - y) * jax.nn.log_sigmoid(-l))
    loss = ops.aggregate(per_token, m, loss_agg)
    p = jax.nn.sigmoid(l)
    metrics = {
        "loss": loss,
        "critic/prob_mean": ops.masked_mean(p, m),
        "critic/label_mean": ops.masked_mean(y, m),
        "critic/accuracy": ops.masked_mean(((p > 0.5) == (y > 0.5)).astype(l.dtype), m),
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def project_returns(returns, atoms, projection: str = "two_hot"):
    """Target distribution over ``atoms [A]`` for each return: ``[...] → [..., A]``.

    * ``two_hot``: a return between atoms z_i ≤ r ≤ z_{i+1} puts weight (z_{i+1} − r)/(z_{i+1} − z_i)
      on z_i and the rest on z_{i+1} (the C51 / rlax ``categorical_l2_project`` of a point mass), so
      the target's mean is r; returns outside [z_0, z_{A−1}] are clipped to the end atoms. A return
      on an atom is one-hot on it.
    * ``nearest``: one-hot on the closest atom (the Q♯ code's ``round(r·(A−1))`` for atoms on [0, 1]).
    """
    ops.check_choice("projection", projection, PROJECTIONS)
    z = jnp.asarray(atoms)
    r = jnp.asarray(returns, jnp.promote_types(z.dtype, jnp.float32))
    z = z.astype(r.dtype)
    a = z.shape[0]
    if projection == "nearest" or a == 1:
        idx = jnp.argmin(jnp.abs(r[..., None] - z), axis=-1)
        return jax.nn.one_hot(idx, a, dtype=r.dtype)
    rc = jnp.clip(r, z[0], z[-1])
    hi = jnp.clip(jnp.searchsorted(z, rc, side="right"), 1, a - 1)
    lo = hi - 1
    w_hi = (rc - z[lo]) / (z[hi] - z[lo])
    return (jax.nn.one_hot(lo, a, dtype=r.dtype) * (1.0 - w_hi)[..., None]
            + jax.nn.one_hot(hi, a, dtype=r.dtype) * w_hi[..., None])


@register("qsharp_histogram", "value")
def qsharp_histogram(critic_logits, tokens, returns, mask, atoms=None, projection: str = "two_hot",
                     loss_agg: str = "seq-mean-token-mean"):
    """Histogram critic MLE: −Σ_i target_i(r)·log softmax(h)_i at the taken tokens.

    ``loss, metrics = qsharp_histogram(critic_logits, tokens, returns, mask, atoms=..., ...)``

    * ``critic_logits [B, T, V, A]``: logits over the return ``atoms [A]`` (strictly increasing)
      for every next token; ``tokens [B, T]`` picks the taken one. With ``tokens=None``,
      ``critic_logits [B, T, A]`` (V-type head).
    * ``returns [B]`` or ``[B, T]``: the observed reward-to-go of the π_ref rollout.
    * ``mask [B, T]``; ``loss_agg`` as in ``qsharp_bce``.
    * ``projection``: ``two_hot`` (default; keeps the mean; equal to the one-hot −log ẑ[idx(r)] of
      the Q♯ paper when r is on an atom) or ``nearest`` (the Q♯ code's rounding).

    The minimizer is the π_ref reward-to-go distribution Z⋆ (projected on the atoms), from which
    ``qstar_histogram`` gives Q⋆ for any η (Q♯, Zhou et al. 2025, Alg. 1, L_mle).
    """
    h = _select_taken(critic_logits, tokens, mask, 1, "qsharp_histogram")
    _check_atoms(atoms, h, "qsharp_histogram")
    m = jnp.asarray(mask, h.dtype)
    keep = m > 0
    r = jnp.where(keep, _per_token_returns(returns, mask).astype(h.dtype), jnp.asarray(atoms)[0])
    h = jnp.where(keep[..., None], h, 0.0)
    target = project_returns(r, atoms, projection).astype(h.dtype)
    logp = jax.nn.log_softmax(h, axis=-1)
    per_token = -jnp.sum(jnp.where(target > 0, target * logp, 0.0), axis=-1)
    loss = ops.aggregate(per_token, m, loss_agg)
    metrics = {
        "loss": loss,
        "critic/mean": ops.masked_mean(histogram_mean(h, atoms), m),
        "critic/return_mean": ops.masked_mean(r, m),
    }
    return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


# --------------------------------------------------------------------------------------------
# KL to the previous policy: Munchausen and Mirror-Descent Value Iteration (discrete actions)
# --------------------------------------------------------------------------------------------

def clipped_value_loss(values, old_values, returns, mask, clip_eps: Optional[float] = 0.2,
                       loss_agg: str = "token-mean"):
    """PPO's clipped value loss (Schulman et al. 2017, arXiv 1707.06347; OpenAI baselines ``ppo2``).

        V_clip = V_old + clip(V − V_old, −ε, ε),    L = ½·agg_t max((V_t − R_t)², (V_clip,t − R_t)²)

    ``values`` V (the critic being trained, differentiable), ``old_values`` V_old (the critic that
    produced the advantages) and ``returns`` R (e.g. ``advantages.gae``'s returns), all ``[B, T]``;
    old values and returns are stop-gradient. ``clip_eps=None`` gives the plain ½·(V − R)².
    Where the clipped branch is larger and V has left [V_old − ε, V_old + ε], the gradient is zero:
    the critic moves at most ε from V_old per batch of updates. Returns ``(loss, metrics)`` with
    ``value_loss``, ``value_clipfrac`` and ``value_mean``.
    """
    ops.check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    mask = jnp.asarray(mask).astype(values.dtype)
    err = jnp.square(values - returns)
    if clip_eps is None:
        per_token, clipped = err, jnp.zeros_like(err)
    else:
        ops.check_range("clip_eps", clip_eps, 0.0, low_open=True)
        v_clip = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        err_clip = jnp.square(v_clip - returns)
        per_token = jnp.maximum(err, err_clip)
        clipped = (err_clip > err).astype(values.dtype)
    loss = 0.5 * ops.aggregate(per_token, mask, loss_agg)
    metrics = {"value_loss": loss, "value_clipfrac": ops.masked_mean(clipped, mask),
               "value_mean": ops.masked_mean(jax.lax.stop_gradient(values), mask)}
    return loss, metrics


def scaled_log_softmax(q, tau):
    """τ·log softmax(q/τ) = q − τ·logsumexp(q/τ): τ·log π for the Boltzmann policy of q."""
    _check_positive("tau", tau)
    q = ops._upcast(jnp.asarray(q))
    return tau * jax.nn.log_softmax(q / tau, axis=-1)


def soft_value(q, tau):
    """τ·logsumexp(q/τ) = Σ_a π(a)(q(a) − τ·log π(a)) with π = softmax(q/τ): the soft max of q."""
    _check_positive("tau", tau)
    q = ops._upcast(jnp.asarray(q))
    return tau * jax.nn.logsumexp(q / tau, axis=-1)


def munchausen_target(q_tm1, a_tm1, r_t, discount_t, q_t, tau: float = 0.03, alpha: float = 0.9,
                      clip_min: Optional[float] = -1.0):
    """M-DQN target  r + α·[τ·log π(a|s)]_{l0}^{0} + γ·Σ_a' π(a'|s')·(q(s',a') − τ·log π(a'|s')).

    π = softmax(q/τ) of the *target* network: ``q_tm1 [..., A]`` at s_t, ``a_tm1 [...]`` the action
    taken there, ``r_t [...]``, ``discount_t [...]`` (γ·(1 − done)), ``q_t [..., A]`` at s_{t+1}.
    The next-state term equals τ·logsumexp(q_t/τ). ``clip_min`` is l0 (None: no clipping).
    Defaults are the paper's τ = 0.03, α = 0.9, l0 = −1 (Vieillard, Pietquin, Geist, NeurIPS 2020,
    arXiv 2007.14430). α = 0 is soft Q-learning. Iterating it is MD-VI with KL(π_{k+1}‖π_k) weight
    ατ and entropy weight (1−α)τ (their Thm 1; see ``mdvi_target``). It is differentiable; a
    regression loss on it should wrap it in ``jax.lax.stop_gradient`` (target-network values).
    """
    _check_positive("tau", tau)
    ops.check_range("alpha", alpha, 0.0, 1.0)
    q_tm1 = ops._upcast(jnp.asarray(q_tm1))
    ops.check_same_shape(q_tm1=q_tm1, q_t=q_t)
    log_pi = scaled_log_softmax(q_tm1, tau)
    taken = jnp.take_along_axis(log_pi, jnp.asarray(a_tm1).astype(jnp.int32)[..., None], -1)[..., 0]
    if clip_min is not None:
        taken = jnp.clip(taken, clip_min, 0.0)
    return r_t + alpha * taken + discount_t * soft_value(q_t, tau)


def mdvi_policy_logits(prev_logits, q, lam, tau):
    """MD-VI greedy step G^{λ,τ}_{π_k}(q) = argmax_π ⟨π,q⟩ − λ·KL(π‖π_k) + τ·H(π), as log-probs.

    Closed form π ∝ π_k^{λ/(λ+τ)}·exp(q/(λ+τ)) (Vieillard et al. 2020, "Leverage the Average",
    arXiv 2003.14089). The KL is reverse: the new policy against the previous one.
    λ ≥ 0, τ ≥ 0, λ + τ > 0.
    """
    ops.check_range("lam", lam, 0.0)
    ops.check_range("tau", tau, 0.0)
    _check_positive("lam + tau", lam + tau)
    logmu = ops.safe_log_softmax(prev_logits)
    q = jnp.asarray(q, logmu.dtype)
    ops.check_same_shape(prev_logits=logmu, q=q)
    return jax.nn.log_softmax((lam * logmu + q) / (lam + tau), axis=-1)


def mdvi_target(r_t, discount_t, q_t, prev_logits_t, lam, tau):
    """MD-VI evaluation target  r + γ·max_π [⟨π, q⟩ − λ·KL(π‖π_k) + τ·H(π)] at s_{t+1}.

    ``q_t [..., A]`` and the previous policy's logits ``prev_logits_t [..., A]`` at s_{t+1};
    the max is attained by ``mdvi_policy_logits`` and equals (λ+τ)·logsumexp((λ·log π_k + q)/(λ+τ)).
    With λ = ατ and entropy (1−α)τ it reproduces the Munchausen iteration on q' = q − ατ·log π
    (Vieillard et al. 2020). Differentiable; stop its gradient in a regression loss.
    """
    ops.check_range("lam", lam, 0.0)
    ops.check_range("tau", tau, 0.0)
    _check_positive("lam + tau", lam + tau)
    logmu = ops.safe_log_softmax(prev_logits_t)
    q = jnp.asarray(q_t, logmu.dtype)
    ops.check_same_shape(q_t=q, prev_logits_t=logmu)
    v = (lam + tau) * jax.nn.logsumexp((lam * logmu + q) / (lam + tau), axis=-1)
    return r_t + discount_t * v


__all__ = [
    "qstar_bernoulli", "qstar_histogram", "histogram_mean", "qsharp_logits", "restrict_top_k",
    "optimal_policy_logits", "dera_logits", "qsharp_bce", "qsharp_histogram", "project_returns",
    "scaled_log_softmax", "soft_value", "munchausen_target", "mdvi_policy_logits", "mdvi_target",
    "KINDS", "PROJECTIONS", "TOP_K_REST",
]
