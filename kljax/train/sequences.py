"""Forward passes over [prompt | completion] sequences: completion logits, log-probs and entropies."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from kljax import ops
from kljax.models import positions_from_valid


@functools.partial(jax.jit, static_argnums=(0, 5))
def _completion_logits(graphdef, params, rest, sequences, valid, prompt_len):
    model = nnx.merge(graphdef, params, rest)
    return completion_logits(model, sequences, valid, prompt_len)


def completion_logits(model: nnx.Module, sequences: jax.Array, valid: jax.Array, prompt_len: int) -> jax.Array:
    """Logits [B, N, V] predicting the N completion tokens of `sequences` [B, P+N].

    `valid` [B, P+N] marks real tokens (left-padded prompt, then the completion); positions count
    real tokens exactly as `generate` does, so these logits equal the sampler's (at temperature 1).
    """
    logits = model(sequences, positions=positions_from_valid(valid), valid=valid)
    return logits[:, prompt_len - 1:-1]


def completion_logp(model: nnx.Module, sequences, valid, prompt_len: int):
    """(logp [B, N] of the completion tokens, logits [B, N, V])."""
    logits = completion_logits(model, sequences, valid, prompt_len)
    return ops.token_logprobs(logits, sequences[:, prompt_len:]), logits


def completion_logp_entropy_tiled(model: nnx.Module, sequences, valid, prompt_len: int, chunk_size: int):
    """(logp [B, N], entropy [B, N]) of the completion from the final hidden states, by vocabulary tiles
    (`ops.token_logprobs_and_entropy_from_hidden`): the `[B, N, V]` logits never exist whole."""
    h = model.hidden(sequences, positions=positions_from_valid(valid), valid=valid)[:, prompt_len - 1:-1]
    return ops.token_logprobs_and_entropy_from_hidden(h, model.unembedding(), sequences[:, prompt_len:], 1.0,
                                                      chunk_size)


def model_logits(model: nnx.Module, sequences, valid, prompt_len: int) -> jax.Array:
    """Jitted `completion_logits` for an NNX model (compiled once per model structure and shape)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _completion_logits(graphdef, params, rest, sequences, valid, prompt_len)

