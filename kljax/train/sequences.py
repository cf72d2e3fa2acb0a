"""Sequences of [prompt (left-padded) | completion (right-padded)]: their layout (`sequence_batch`) and
forward passes over them (completion logits, log-probs and entropies)."""
from __future__ import annotations

import functools

import jax
import numpy as np
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


def sequence_batch(prompt, prompt_valid, completion, completion_valid) -> dict:
    """`{tokens, valid, positions, loss_mask}` [B, P+N] for prompt+completion.

    `loss_mask[:, t]` is 1 where position t predicts a real completion token (t+1 ≥ P), so the
    loss uses `logits[:, t]` against token t+1; the last position never trains.
    """
    prompt, completion = np.asarray(prompt), np.asarray(completion)
    pv, cv = np.asarray(prompt_valid, np.int32), np.asarray(completion_valid, np.int32)
    tokens = np.concatenate([prompt, completion], axis=1).astype(np.int32)
    valid = np.concatenate([pv, cv], axis=1)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    loss_mask = np.zeros_like(valid)
    loss_mask[:, prompt.shape[1] - 1:-1] = cv
    return {"tokens": tokens, "valid": valid, "positions": positions, "loss_mask": loss_mask.astype(np.float32)}
