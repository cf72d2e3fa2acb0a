"""Multi-digit arithmetic with a verifiable answer, as character tokens.

Prompt ``a+b=`` (or ``a*b=``, or longer chains ``a+b*c=`` with ``num_operands`` > 2, evaluated
with the usual precedence: ``*`` before ``+``); target: the decimal digits of the value, then EOS.
Each operand first draws its digit count uniformly from ``min_digits..num_digits``, then a uniform
number with that many digits (one digit: 0..9). ``reverse_answer=True`` writes the answer's digits
least-significant first (known to make addition easier to learn).

Vocabulary: ``0``..``9`` = ids 0..9, ``+``=10, ``*``=11, ``=``=12, ``<eos>``=13, ``<pad>``=14.
Reward: 1 for the exact answer then EOS; otherwise ``format_reward`` (default 0) if the answer is
well-formed (one or more digits, then EOS); otherwise 0.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Tuple

import numpy as np
import tensorflow_datasets as tfds

from kljax.tasks import base

_OPS = ("+", "*")


class ArithmeticBuilder(base.TaskBuilder, skip_registration=True):
    name = "arithmetic"
    VERSION = tfds.core.Version("1.0.0")


def evaluate(operands: List[int], ops: List[str]) -> int:
    """Value of ``operands[0] ops[0] operands[1] ...`` with ``*`` binding tighter than ``+``."""
    total, term = 0, operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            term *= x
        else:
            total, term = total + term, x
    return total + term


@dataclasses.dataclass(frozen=True)
class Arithmetic(base.SequenceTask):
    num_digits: int = 3
    min_digits: int = 1
    num_operands: int = 2
    ops: str = "+"
    reverse_answer: bool = False
    train_size: int = 20_000
    test_size: int = 1_000
    seed: int = 0
    format_reward: float = base.reward_only(0.0)

    name = "arithmetic"
    builder_class = ArithmeticBuilder

    def __post_init__(self):
        base.check_int("num_digits", self.num_digits, 1, 18)
        base.check_int("min_digits", self.min_digits, 1, self.num_digits)
        base.check_int("num_operands", self.num_operands, 2)
        base.check_int("train_size", self.train_size, 1)
        base.check_int("test_size", self.test_size, 1)
        base.check_int("seed", self.seed, 0)
        base.check_float("format_reward", self.format_reward, 0.0, 1.0)
        if not self.ops or any(o not in _OPS for o in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r} must be a non-empty string of distinct operators from {_OPS}, e.g. '+' or '+*'")
        symbols = [str(d) for d in range(10)] + ["+", "*", "=", base.EOS, base.PAD]
        object.__setattr__(self, "tokenizer", base.SymbolTokenizer(symbols))
        biggest = 10 ** self.num_digits - 1
        # the value is monotone in every operand, so the longest answer uses the largest operands
        max_value = max(
            evaluate([biggest] * self.num_operands, list(combo))
            for combo in itertools.product(self.ops, repeat=self.num_operands - 1)
        )
        object.__setattr__(self, "prompt_len", self.num_operands * (self.num_digits + 1))
        object.__setattr__(self, "completion_len", len(str(max_value)) + 1)

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "test": self.test_size}[split]

    def _problem(self, rng: np.random.Generator) -> Tuple[Tuple[int, ...], Tuple[str, ...]]:
        operands = []
        for _ in range(self.num_operands):
            k = int(rng.integers(self.min_digits, self.num_digits + 1))
            low = 0 if k == 1 else 10 ** (k - 1)
            operands.append(int(rng.integers(low, 10 ** k)))
        ops = tuple(self.ops[int(i)] for i in rng.integers(0, len(self.ops), self.num_operands - 1))
        return tuple(operands), ops

    def problem_text(self, operands, ops) -> str:
        text = str(operands[0])
        for op, x in zip(ops, operands[1:]):
            text += op + str(x)
        return text + "="

    def answer_text(self, operands, ops) -> str:
        digits = str(evaluate(list(operands), list(ops)))
        return digits[::-1] if self.reverse_answer else digits

    def _problems(self, split: str):
        rng = np.random.default_rng(self.split_seed(split, self.seed))
        make = lambda: self._problem(rng)  # noqa: E731
        if split == "test":
            for _ in range(self.test_size):
                yield make()
            return
        test = set(self._problems("test"))
        yield from base.unique_records(make, self.train_size, test, lambda p: p, "arithmetic problems")

    def generate(self, split: str):
        enc = self.tokenizer.encode
        for operands, ops in self._problems(split):
            yield self.make_record(enc(self.problem_text(operands, ops)), enc(self.answer_text(operands, ops)))

    def reward(self, completions, completion_mask, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """float32[B]: 1 exact answer + EOS; ``format_reward`` if only digits then EOS; else 0."""
        ok = base.exact_match(completions, completion_mask, batch["target"], batch["target_valid"], self.eos_id)
        found = base.answers_until_eos(completions, completion_mask, self.eos_id)
        well_formed = np.array([ended and len(a) > 0 and all(t < 10 for t in a) for a, ended in found], bool)
        return np.where(ok, 1.0, np.where(well_formed, self.format_reward, 0.0)).astype(np.float32)
