"""A synthetic language with a known distribution, for distillation experiments.

The source is a first-order Markov chain (a random bigram model) over ``vocab`` content tokens,
fixed by ``source_seed``: each content row is ``(1 − eos_prob)·Dirichlet(alpha)`` over the content
tokens plus ``eos_prob`` on EOS; the BOS row is ``Dirichlet(alpha)`` over content tokens. After EOS
comes PAD with probability 1, and PAD repeats, so every row is a proper distribution.

A sequence is BOS, tokens sampled from the chain, EOS (or the window end at ``seq_len``), then PAD.
Records: ``tokens`` int32[seq_len] and ``valid`` int32[seq_len] (1 from BOS through EOS), plus the
prompt/target view used by the sequence trainers (prompt = BOS, target = the rest).

``true_logprobs(tokens)`` gives the exact next-token log-probabilities log p(· | tokens[:, t]) at
every position, [B, T, V] (position t predicts token t+1, as model logits do); impossible tokens
get −inf. Ids: content 0..vocab−1, ``<bos>``=vocab, ``<eos>``=vocab+1, ``<pad>``=vocab+2.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import tensorflow_datasets as tfds

from kljax.tasks import base


class SyntheticLMBuilder(base.TaskBuilder, skip_registration=True):
    name = "synthetic_lm"
    VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(frozen=True)
class SyntheticLM(base.SequenceTask):
    vocab: int = 8
    seq_len: int = 16
    alpha: float = 0.5
    eos_prob: float = 0.05
    source_seed: int = 0
    train_size: int = 10_000
    test_size: int = 1_000
    seed: int = 0

    name = "synthetic_lm"
    builder_class = SyntheticLMBuilder

    def __post_init__(self):
        base.check_int("vocab", self.vocab, 2)
        base.check_int("seq_len", self.seq_len, 2)
        base.check_int("source_seed", self.source_seed, 0)
        base.check_int("train_size", self.train_size, 1)
        base.check_int("test_size", self.test_size, 1)
        base.check_int("seed", self.seed, 0)
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be > 0 (Dirichlet concentration)")
        base.check_float("eos_prob", self.eos_prob, 0.0, 1.0)
        symbols = [f"t{i}" for i in range(self.vocab)] + [base.BOS, base.EOS, base.PAD]
        object.__setattr__(self, "tokenizer", _TokenTokenizer(symbols))
        object.__setattr__(self, "prompt_len", 1)
        object.__setattr__(self, "completion_len", self.seq_len - 1)
        object.__setattr__(self, "transition", self._transition_matrix())

    @property
    def bos_id(self) -> int:
        return self.vocab

    def _transition_matrix(self) -> np.ndarray:
        """float64[V, V]: row a is p(next | current = a)."""
        v, size = self.vocab, self.vocab + 3
        rng = np.random.default_rng(np.random.SeedSequence([self.source_seed, 0x5EED]))
        p = np.zeros((size, size))
        p[:v, :v] = (1.0 - self.eos_prob) * rng.dirichlet(np.full(v, self.alpha), size=v)
        p[:v, v + 1] = self.eos_prob
        p[v, :v] = rng.dirichlet(np.full(v, self.alpha))
        p[v + 1, v + 2] = 1.0
        p[v + 2, v + 2] = 1.0
        return p

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "test": self.test_size}[split]

    def features(self):
        feats = dict(super().features())
        t = self.seq_len
        feats["tokens"] = tfds.features.Tensor(shape=(t,), dtype=np.int32)
        feats["valid"] = tfds.features.Tensor(shape=(t,), dtype=np.int32)
        return tfds.features.FeaturesDict(feats)

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """int32[num, seq_len] sequences from the source (BOS first)."""
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0  # guard the inverse-CDF draw against rounding
        tokens = np.empty((num, self.seq_len), np.int32)
        tokens[:, 0] = self.bos_id
        for t in range(1, self.seq_len):
            u = rng.random(num)[:, None]
            tokens[:, t] = (u >= cdf[tokens[:, t - 1]]).sum(axis=1)
        return tokens

    def validity(self, tokens: np.ndarray) -> np.ndarray:
        """int32[B, T]: 1 for real tokens (BOS through EOS, or to the window end)."""
        return (np.asarray(tokens) != self.pad_id).astype(np.int32)

    def generate(self, split: str):
        rng = np.random.default_rng(self.split_seed(split, self.seed))
        tokens = self.sample(self.split_size(split), rng)
        valid = self.validity(tokens)
        for row, v in zip(tokens, valid):
            target, target_valid = row[1:].copy(), v[1:].copy()
            target[target_valid == 0] = self.pad_id
            yield {"tokens": row, "valid": v, "prompt": row[:1].copy(), "prompt_valid": v[:1].copy(),
                   "target": target, "target_valid": target_valid}

    def true_logprobs(self, tokens, smoothing: float = 0.0) -> np.ndarray:
        """float32[B, T, V]: log p_source(next token | tokens[:, t]) at every position t.

        Tokens the source never emits (BOS, PAD, and everything but PAD after EOS) get −inf, so
        KL(student‖source) is infinite for a student that puts mass on them. ``smoothing`` = s > 0
        returns log((1−s)·p + s/V) instead (computed with logaddexp), a finite teacher that is no
        longer the exact source.
        """
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in 0..{self.vocab_size - 1}")
        smoothing = base.check_float("smoothing", smoothing, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            logp = np.log(self.transition)
            if smoothing > 0:
                logp = np.logaddexp(np.log1p(-smoothing) + logp, np.log(smoothing / self.vocab_size))
        return logp.astype(np.float32)[tokens]

    def true_token_logprobs(self, tokens) -> np.ndarray:
        """float32[B, T−1]: log p_source(tokens[:, t+1] | tokens[:, t])."""
        lp = self.true_logprobs(np.asarray(tokens)[:, :-1])
        return np.take_along_axis(lp, np.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]

    def reward(self, completions, completion_mask, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """float32[B]: mean true log-likelihood per generated token (a likelihood score, not 0/1).

        Tokens the source cannot emit count as log-prob −100 so that the reward stays finite.
        """
        completions = np.asarray(completions)
        mask = np.asarray(completion_mask) > 0
        prev = np.concatenate([np.asarray(batch["prompt"])[:, -1:], completions[:, :-1]], axis=1)
        with np.errstate(divide="ignore"):
            logp = np.maximum(np.log(self.transition), -100.0)[prev, completions]
        total = np.where(mask, logp, 0.0).sum(axis=1)
        return (total / np.maximum(mask.sum(axis=1), 1)).astype(np.float32)


class _TokenTokenizer(base.SymbolTokenizer):
    """Space-separated symbols (``<bos> t3 t0 <eos>``); content tokens are named ``t0``..``t{V-1}``."""

    def encode(self, text: str):
        return [self.id_of(s) for s in text.split()]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range 0..{self.vocab_size - 1}")
        return " ".join(self.symbols[i] for i in ids)
