"""Exact expectations by enumeration, for the expected-gradient tests (not a test module).

Two toys whose outcomes can all be listed:

* a bandit: one categorical draw y over K actions, π_θ = softmax(θ), θ the logits;
* an autoregressive toy: two tokens over V symbols, π_θ(y1, y2) = softmax(a)[y1]·softmax(b[y1])[y2].

A surrogate's expected gradient is Σ_y P(y)·∇_θ loss(batch(y)), with the sampling law P held
constant (π_θ on-policy, π_old off-policy), each y fed to the objective as a batch of one row.
"""
import itertools

import jax
import jax.numpy as jnp


def log_softmax(x):
    return jax.nn.log_softmax(x, axis=-1)


def kl(logp, logq):
    """KL(p‖q) = Σ p (log p − log q) for full log-probability vectors."""
    return jnp.sum(jnp.exp(logp) * (logp - logq))


# ---------------------------------------------------------------- bandit ----

def bandit_batch(theta, y, *, old_logp, ref_logp, adv, teacher_logp=None, ref_logits=None):
    """The one-row, one-token batch for action ``y`` (old/ref log-probs are full ``[K]`` vectors)."""
    lp = log_softmax(theta)
    row = lambda v: jnp.reshape(v, (1, 1))
    b = {
        "logp": row(lp[y]),
        "old_logp": row(old_logp[y]),
        "ref_logp": row(ref_logp[y]),
        "mask": jnp.ones((1, 1), lp.dtype),
        "advantages": jnp.reshape(adv[y], (1,)),
        "logits": jnp.reshape(theta, (1, 1, -1)),
    }
    if ref_logits is not None:
        b["ref_logits"] = jnp.reshape(ref_logits, (1, 1, -1))
    if teacher_logp is not None:
        b["teacher_logp"] = row(teacher_logp[y])
    return b


def bandit_expected_grad(objective, theta, *, sample_logp=None, old_logp=None, ref_logits,
                         adv, teacher_logp=None, **hparams):
    """Σ_y P(y)∇loss(y): P = π_old if ``old_logp`` is given (off-policy), else π_θ (on-policy)."""
    ref_lp = log_softmax(ref_logits)
    k = theta.shape[0]

    def expected_loss(th):
        on_policy = old_logp is None
        old = jax.lax.stop_gradient(log_softmax(th)) if on_policy else old_logp
        p = jnp.exp(old if sample_logp is None else sample_logp)

        def one(y):
            return objective(bandit_batch(th, y, old_logp=old, ref_logp=ref_lp, adv=adv,
                                          teacher_logp=teacher_logp, ref_logits=ref_logits),
                             **hparams)[0]

        losses = jax.vmap(one)(jnp.arange(k))
        return jnp.sum(jax.lax.stop_gradient(p) * losses)

    return jax.grad(expected_loss)(theta)


# ----------------------------------------------------------- two tokens ----

def all_sequences(v):
    return jnp.array(list(itertools.product(range(v), repeat=2)))


def seq_token_logp(params, seq):
    """[2] per-token log-probs of ``seq`` under the tabular autoregressive policy."""
    a, b = params
    return jnp.stack([log_softmax(a)[seq[0]], log_softmax(b[seq[0]])[seq[1]]])


def seq_logprob_table(params, seqs):
    return jax.vmap(lambda s: jnp.sum(seq_token_logp(params, s)))(seqs)


def seq_expected_grad(objective, params, ref_params, seqs, rewards, **hparams):
    """On-policy Σ_y π_θ(y)∇loss(y) for the two-token toy (one row of two tokens per y)."""

    def expected_loss(p):
        probs = jax.lax.stop_gradient(jnp.exp(seq_logprob_table(p, seqs)))

        def one(i):
            s = seqs[i]
            lp = seq_token_logp(p, s)[None]
            batch = {
                "logp": lp,
                "old_logp": jax.lax.stop_gradient(lp),
                "ref_logp": seq_token_logp(ref_params, s)[None],
                "mask": jnp.ones((1, 2), lp.dtype),
                "advantages": jnp.reshape(rewards[i], (1,)),
            }
            return objective(batch, **hparams)[0]

        return jnp.sum(probs * jax.vmap(one)(jnp.arange(seqs.shape[0])))

    return jax.grad(expected_loss)(params)
