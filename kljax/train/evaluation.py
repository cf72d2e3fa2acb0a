"""Generation evaluation on a task's test split (accuracy, reward, KL to a reference, pass@k)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import data as data_lib
from kljax import ops
from kljax.sampling import generate
from kljax.tasks import base as task_base
from kljax.train import sharding as shd
from kljax.train.sequences import model_logits
from kljax.train.setup import data_dir


@functools.lru_cache(maxsize=8)
def _test_records(task: task_base.Task, ddir: str | None, split: str, n: int) -> dict:
    src = task.data_source(split, ddir)
    n = min(n, len(src)) if n else len(src)
    return data_lib.read_all(_Prefix(src, n))


class _Prefix:
    def __init__(self, src, n):
        self.src, self.n = src, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.src[i]

    def __getitems__(self, idx):
        return self.src.__getitems__(idx)


def test_records(cfg: Any, task: task_base.Task, split: str = "test") -> dict:
    """The first `cfg.eval.num_examples` records of `split` as stacked numpy arrays (cached)."""
    return _test_records(task, data_dir(cfg), split, int(cfg.eval.get("num_examples", 0) or 0))


def _chunks(records: Mapping[str, np.ndarray], size: int, multiple: int):
    """Batches of `size` rows; the last one is padded by repeating its rows (to `multiple`)."""
    n = len(next(iter(records.values())))
    for lo in range(0, n, size):
        hi = min(lo + size, n)
        rows = np.arange(lo, hi)
        want = -(-len(rows) // multiple) * multiple
        rows = np.concatenate([rows, np.full(want - len(rows), hi - 1)])
        yield {k: v[rows] for k, v in records.items()}, hi - lo


def _place(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh | None):
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return shd.shard_batch(dict(batch), mesh)


def _to_host(x, rows: int) -> np.ndarray:
    """A device array as numpy, first `rows` rows. Across processes every process placed the same
    evaluation batch as its local share, so the gathered global array holds `process_count` copies
    and the first `rows` rows are this batch."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)[:rows]


def evaluate_generation(model: nnx.Module, task: task_base.SequenceTask, records: Mapping[str, np.ndarray],
                        key: jax.Array, *, batch_size: int = 128, temperature: float = 0.0, pass_k: int = 0,
                        pass_k_temperature: float = 1.0, max_new_tokens: int = 0, ref_model: nnx.Module | None = None,
                        mesh: jax.sharding.Mesh | None = None, logits_processor: Callable | None = None,
                        prefix: str = "eval/") -> dict[str, float]:
    """Generate on `records` (prompt/target arrays) and score with the task.

    Metrics (prefixed by `prefix`):
      accuracy   pass@1: fraction of prompts whose completion (greedy when `temperature` = 0) is
                 exactly the target answer followed by EOS;
      reward     mean task reward of those completions;
      pass@k     (`pass_k` > 0) fraction of prompts with at least one exact answer among k
                 samples at `pass_k_temperature` (the unbiased estimator with n = k);
      kl         mean over generated tokens of the exact KL(π(·|h)‖π_ref(·|h)) summed over the
                 vocabulary, π = `model` (without the processor), π_ref = `ref_model` (if given);
      entropy    mean over generated tokens of the entropy of π(·|h);
      completions/mean_length  mean number of generated tokens (EOS included).
    `logits_processor` (e.g. Q♯ guidance) is passed to `generate`; kl/entropy are then those of
    the unguided `model` on the guided samples.
    """
    n_new = int(max_new_tokens or task.completion_len)
    P = records["prompt"].shape[1]
    dp = shd.data_parallel_size(mesh) if mesh is not None else 1
    sums = dict(accuracy=0.0, reward=0.0, kl=0.0, entropy=0.0, length=0.0, tokens=0.0, passk=0.0)
    count = 0
    for i, (batch, real) in enumerate(_chunks(records, batch_size, dp)):
        k = jax.random.fold_in(key, i)
        dev = _place({"prompt": batch["prompt"], "prompt_valid": batch["prompt_valid"]}, mesh)
        out = generate(model, dev["prompt"], dev["prompt_valid"], k, n_new, task.eos_id,
                       temperature=float(temperature), logits_processor=logits_processor, pad_id=task.pad_id)
        rows = len(batch["prompt"])
        toks, mask = _to_host(out.tokens, rows), _to_host(out.mask, rows)
        sl = slice(0, real)
        ok = task_base.exact_match(toks, mask, batch["target"], batch["target_valid"], task.eos_id)[sl]
        reward = np.asarray(task.reward(toks, mask, batch))[sl]
        valid = jnp.concatenate([dev["prompt_valid"], out.mask], axis=1)
        logits = model_logits(model, out.sequences, valid, P)
        ent = _to_host(ops.entropy(logits), rows)
        m = mask.astype(np.float64)
        sums["entropy"] += float((ent * m)[sl].sum())
        if ref_model is not None:
            ref_logits = model_logits(ref_model, out.sequences, valid, P)
            from kljax import divergences
            kl = _to_host(divergences.kl(logits, ref_logits), rows)
            sums["kl"] += float((kl * m)[sl].sum())
        sums["tokens"] += float(m[sl].sum())
        sums["length"] += float(m[sl].sum())
        sums["accuracy"] += float(ok.sum())
        sums["reward"] += float(reward.sum())
        if pass_k:
            hit = np.zeros(real, bool)
            for j in range(int(pass_k)):
                o = generate(model, dev["prompt"], dev["prompt_valid"], jax.random.fold_in(k, 1000 + j), n_new,
                             task.eos_id, temperature=float(pass_k_temperature), logits_processor=logits_processor,
                             pad_id=task.pad_id)
                hit |= task_base.exact_match(_to_host(o.tokens, rows), _to_host(o.mask, rows), batch["target"],
                                             batch["target_valid"], task.eos_id)[sl]
            sums["passk"] += float(hit.sum())
        count += real
    tok = max(sums["tokens"], 1.0)
    res = {"accuracy": sums["accuracy"] / count, "reward": sums["reward"] / count,
           "entropy": sums["entropy"] / tok, "completions/mean_length": sums["length"] / count,
           "num_examples": count}
    if ref_model is not None:
        res["kl"] = sums["kl"] / tok
    if pass_k:
        res[f"pass@{int(pass_k)}"] = sums["passk"] / count
    return {prefix + k: v for k, v in res.items()}


def eval_settings(cfg: Any) -> dict:
    """Keyword arguments of `evaluate_generation` from `cfg.eval`."""
    e = cfg.eval
    return dict(batch_size=int(e.get("batch_size", 128)), temperature=float(e.get("temperature", 0.0)),
                pass_k=int(e.get("pass_k", 0)), pass_k_temperature=float(e.get("pass_k_temperature", 1.0)),
                max_new_tokens=int(e.get("max_new_tokens", 0) or 0))


def make_generation_eval(cfg: Any, task: task_base.SequenceTask, mesh: jax.sharding.Mesh, *,
                         ref_model: nnx.Module | None = None, model_of: Callable[[Any], nnx.Module] | None = None,
                         split: str = "test") -> Callable[[Any], dict]:
    """`eval_fn(state) -> metrics` for `run_loop`: `evaluate_generation` of the state's model on
    the first `cfg.eval.num_examples` records of `split` (fixed key: comparable across steps).

    `model_of(state)` extracts the model (default: `state.model()`, or `state.train.model()`).
    """
    records = test_records(cfg, task, split)
    key = jax.random.PRNGKey(int(cfg.seed) + 12345)
    settings = eval_settings(cfg)

    def default_model_of(s):
        return getattr(s, "train", s).model()

    get_model = model_of or default_model_of

    def eval_fn(s):
        return evaluate_generation(get_model(s), task, records, key, ref_model=ref_model, mesh=mesh, **settings)

    return eval_fn

