"""Issue 9's workload as a kljax user task (`task.module = "benchmarks/rl_workload_task.py"`,
`task.name = "random_tokens"`): prompts of `prompt_len` uniformly random token ids, `completion_len` new
tokens, no EOS (generation never stops early, as in the workload), and the reward from `task.reward`
(a user function with TRL's contract, called with `completion_ids` as TRL calls it).

Token id i is written as the word "t<i>" (the workload tokenizer of `benchmarks/_common.py`), so reward
functions see the same prompt and completion text in kljax, TRL and Tunix.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from kljax import tasks
from kljax.tasks import base
from kljax.tasks import rewards as rewards_lib


class _Words:
    """Ids 0..V-1 <-> words "t0".."t{V-1}"; no special tokens (the workload has no EOS the model can emit)."""

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def encode(self, text: str):
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(f"t{int(i)}" for i in np.asarray(ids).reshape(-1))


class RandomTokensBuilder(base.TaskBuilder, skip_registration=True):
    name = "random_tokens"
    VERSION = tfds.core.Version("1.0.0")


@dataclasses.dataclass(frozen=True)
class RandomTokens(base.SequenceTask):
    vocab: int = 1024
    prompt_len: int = 32
    completion_len: int = 32
    train_size: int = 4096
    test_size: int = 16
    seed: int = 0
    reward_spec: str = base.reward_only("")

    name = "random_tokens"
    builder_class = RandomTokensBuilder

    def __post_init__(self):
        object.__setattr__(self, "tokenizer", _Words(self.vocab))
        if self.reward_spec:
            rewards_lib.parse(self.reward_spec)  # import errors now, not mid-run

    @property
    def eos_id(self):
        return None  # never stop early: every completion has completion_len tokens

    @property
    def pad_id(self) -> int:
        return 0  # prompts are full length and nothing ends early, so padding is never read

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "test": self.test_size}[split]

    def generate(self, split: str):
        rng = np.random.default_rng(self.split_seed(split, self.seed))
        for _ in range(self.split_size(split)):
            prompt = rng.integers(0, self.vocab, self.prompt_len).astype(np.int32)
            yield {"prompt": prompt, "prompt_valid": np.ones(self.prompt_len, np.int32),
                   "target": np.zeros(self.completion_len, np.int32),
                   "target_valid": np.zeros(self.completion_len, np.int32)}

    def reward(self, completions, completion_mask, batch) -> np.ndarray:
        completions, mask = np.asarray(completions), np.asarray(completion_mask)
        ids = [row[m > 0].tolist() for row, m in zip(completions, mask)]
        prompts = [self.tokenizer.decode(p[v > 0]) for p, v in zip(np.asarray(batch["prompt"]),
                                                                     np.asarray(batch["prompt_valid"]))]
        texts = [self.tokenizer.decode(i) for i in ids]
        total, metrics = rewards_lib.score(rewards_lib.parse(self.reward_spec), prompts, texts,
                                           {"completion_ids": ids})
        object.__setattr__(self, "last_reward_metrics", metrics)
        return total


def random_tokens_task(reward: str = "", **fields) -> RandomTokens:
    """`task.reward` is the reward spec (as for the `files` task)."""
    return RandomTokens(reward_spec=reward, **fields)


tasks.register("random_tokens", random_tokens_task)
