"""User and built-in reward functions with TRL's contract.

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``prompts`` are the prompt column's values as in the file, ``completions`` the decoded generated text
(up to EOS, special tokens removed; for conversational data, whose prompts are message lists, each
completion is ``[{"role": "assistant", "content": text}]`` as in TRL); every other column of the data file arrives as a keyword list of
the same length (``answer=[...]``), so a function takes ``**kwargs`` for the ones it ignores. ``None``
marks a sample the function does not score. TRL reward functions run unchanged.

A reward spec (``task.reward``) is a comma-separated list of terms ``[weight*]ref``:

    "rewards.py:correct"                 a function in a file (path relative to the working directory)
    "my_pkg.rewards:correct"             a function in an importable module
    "math_answer"                        a built-in: math_answer, format, length_penalty
    "math_answer, 0.1*format, 0.01*length_penalty"

The total is Σ_i w_i·r_i with unscored (``None``) terms left out of the sum, as TRL does (``nansum``);
a sample no function scores gets 0. A function that raises, returns the wrong number of values or a
non-finite value raises :class:`RewardError` naming the function and the offending prompt.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


class RewardError(RuntimeError):
    """A reward function failed; the message names the function, the prompt and (when known) the step."""

    def __init__(self, message: str, fn_name: str = "", prompt: Any = None, step: Optional[int] = None):
        super().__init__(message)
        self.fn_name, self.prompt, self.step = fn_name, prompt, step

    def at_step(self, step: int) -> "RewardError":
        if self.step is not None:
            return self
        return RewardError(f"at step {step}: {self}", self.fn_name, self.prompt, step)


# ---------------------------------------------------------------------------------------------- built-ins
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth, out = start + len("\\boxed{"), 1, []
    while i < len(text):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return "".join(out).strip()
        out.append(c)
        i += 1
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution: the last ``\\boxed{}``, else what follows the last ``####``, else the
    last number; None if there is none."""
    if text is None:
        return None
    text = str(text)
    b = _boxed(text)
    if b is not None:
        return b
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    nums = re.findall(_NUMBER, text)
    return nums[-1] if nums else None


def reference_answer(text) -> Optional[str]:
    """The answer of a reference: its last ``\\boxed{}``, else what follows ``####``, else the whole text."""
    if text is None:
        return None
    text = str(text)
    b = _boxed(text)
    if b is not None:
        return b
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip() or None


def _normalize(ans: Optional[str]):
    if ans is None:
        return None
    s = ans.strip().rstrip(".").replace("$", "").replace(" ", "")
    nums = re.findall(_NUMBER, s)
    if len(nums) == 1 and re.fullmatch(r"[^\d]*" + re.escape(nums[0]) + r"[^\d]*", s) and not re.search("[a-zA-Z]", s):
        try:
            return float(nums[0].replace(",", ""))
        except ValueError:
            pass
    return s


def math_answer(prompts, completions, answer=None, **kwargs) -> List[Optional[float]]:
    """1.0 when the completion's final answer (:func:`extract_answer`: last ``\\boxed{}``, else after ``####``,
    else the last number) equals the reference (:func:`reference_answer`: the ``answer`` column's last
    ``\\boxed{}``, else after ``####``, else the whole text), numbers compared as numbers, else 0.0; None
    for rows without an answer. Needs an ``answer`` column (set ``task.answer_key``)."""
    if answer is None:
        raise ValueError("math_answer needs the reference answers: set task.answer_key to the answer column")
    out: List[Optional[float]] = []
    for c, a in zip(completions, answer):
        want = _normalize(reference_answer(a))
        if want is None:
            out.append(None)
            continue
        got = _normalize(extract_answer(c))
        if isinstance(want, float) and isinstance(got, float):
            out.append(float(math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-9)))
        else:
            out.append(float(got == want))
    return out


def format_reward(prompts, completions, **kwargs) -> List[float]:
    """1.0 when the completion states a final answer in an extractable form (``\\boxed{...}`` or
    ``#### ...``), else 0.0."""
    return [float(_boxed(c) is not None or bool(re.search(r"####\s*\S", c))) for c in completions]


def length_penalty(prompts, completions, **kwargs) -> List[float]:
    """−len(completion) / (longest completion of the batch), in [−1, 0] (characters)."""
    longest = max([len(c) for c in completions] + [1])
    return [-len(c) / longest for c in completions]


BUILTINS: Dict[str, Callable] = {"math_answer": math_answer, "format": format_reward,
                                 "length_penalty": length_penalty}


# ---------------------------------------------------------------------------------------------- loading
def _load_file(path: str):
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reward file {path} does not exist")
    name = "kljax_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]) + f"_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_function(ref: str) -> Callable:
    """The callable named by ``ref``: a built-in name, ``path/file.py:fn`` or ``pkg.module:fn``."""
    ref = ref.strip()
    if ref in BUILTINS:
        return BUILTINS[ref]
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"reward {ref!r}: use a built-in ({', '.join(sorted(BUILTINS))}), "
                         "'path/to/file.py:function' or 'package.module:function'")
    module = _load_file(target) if target.endswith(".py") or os.sep in target else importlib.import_module(target)
    if not hasattr(module, attr):
        raise AttributeError(f"reward {ref!r}: {target} has no function {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward {ref!r}: {attr} is not callable")
    return fn


@functools.lru_cache(maxsize=32)
def parse(spec: str) -> Tuple[Tuple[float, str, Callable], ...]:
    """``((weight, name, fn), ...)`` of a reward spec (see the module docstring)."""
    terms = []
    for term in [t.strip() for t in str(spec).split(",") if t.strip()]:
        weight = 1.0
        m = re.match(r"^\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*(.+)$", term)
        if m:
            weight, term = float(m.group(1)), m.group(2).strip()
        terms.append((weight, term, load_function(term)))
    if not terms:
        raise ValueError(f"reward spec {spec!r} names no function")
    return tuple(terms)


def metric_names(terms) -> List[str]:
    """Per term, the name its metric ``rewards/<name>/mean`` uses: the built-in's name or the function's
    ``__name__`` (as TRL names them), with ``_2``, ``_3``, ... for repeats."""
    out: List[str] = []
    for _, ref, fn in terms:
        base = ref if ref in BUILTINS else getattr(fn, "__name__", ref.rpartition(":")[2])
        name, k = base, 1
        while name in out:
            k += 1
            name = f"{base}_{k}"
        out.append(name)
    return out


def score(terms, prompts: Sequence[Any], completions: Sequence[str], columns: Dict[str, Sequence[Any]]
          ) -> Tuple[np.ndarray, Dict[str, float]]:
    """(float32[B] weighted total, metrics ``rewards/<name>/mean`` (:func:`metric_names`) and
    ``time/reward_s``) of ``terms``."""
    n = len(completions)
    total = np.zeros(n, np.float64)
    metrics: Dict[str, float] = {}
    t0 = time.perf_counter()
    for (weight, name, fn), short in zip(terms, metric_names(terms)):
        try:
            out = fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        except Exception as e:  # noqa: BLE001 — re-raised with the function and the prompt named
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e} "
                              f"(first prompt of the batch: {_show(prompts[0] if n else None)})",
                              name, prompts[0] if n else None) from e
        try:
            out = list(out)
        except TypeError:
            raise RewardError(f"reward function {name!r} returned {type(out).__name__}, not a list of {n} floats "
                              f"(first prompt of the batch: {_show(prompts[0] if n else None)})", name) from None
        if len(out) != n:
            raise RewardError(f"reward function {name!r} returned {len(out)} values for {n} completions "
                              f"(first prompt of the batch: {_show(prompts[0] if n else None)})",
                              name, prompts[0] if n else None)
        vals = np.full(n, np.nan)
        for i, v in enumerate(out):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward function {name!r} returned {v!r} (not a number) for prompt "
                                  f"{_show(prompts[i])}", name, prompts[i]) from None
            if not math.isfinite(v):
                raise RewardError(f"reward function {name!r} returned {v} for prompt {_show(prompts[i])} "
                                  f"(completion {_show(completions[i])}); return a finite number or None",
                                  name, prompts[i])
            vals[i] = v
        total += np.where(np.isnan(vals), 0.0, weight * vals)
        scored = ~np.isnan(vals)
        metrics[f"rewards/{short}/mean"] = float(vals[scored].mean()) if scored.any() else 0.0
    metrics["time/reward_s"] = time.perf_counter() - t0
    return total.astype(np.float32), metrics


def _show(x, limit=200) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + "...'"
