"""What every training loop shares: task/model/mesh/state from a config, loading another run's
params (reference, teacher, initialization), the step-loop driver, and generation evaluation.

Config schema (top-level fields; loops read what they need):

    loop        "sft" | "rl" | "distill" | "qsharp" | "pipeline" | ...  (see `LOOP_MODULES`)
    seed        int
    task        ConfigDict(name=..., <task parameters>, data_dir=None)
    model       kljax.models.lm_config(...); vocab_size=0 -> task.vocab_size; max_len=0 ->
                task.prompt_len + task.completion_len
    mesh        ConfigDict(data=-1, fsdp=1, tensor=1)
    optim       ConfigDict(name, learning_rate, warmup_steps, schedule, weight_decay, grad_clip, b1, b2)
                (`optim.total_steps` defaults to the top-level `total_steps`)
    total_steps, batch_size (GLOBAL), log_every, eval_every
    checkpoint  ConfigDict(every, keep, best_metric="eval/accuracy", best_mode="max", async_save=True)
    eval        ConfigDict(num_examples, batch_size, temperature (0 = greedy), pass_k (0 = off),
                           pass_k_temperature, max_new_tokens (0 = task.completion_len))
    init_from   "" | a workdir whose latest checkpoint initializes the model (and is the reference)
    + loop-specific sub-configs (objective, rl, distill, qsharp, stages).

Loop driver contract (`run_loop`): the loop builds a *loop state* pytree with a `.step` attribute
(a `TrainState`, or `LoopState(train=..., extra=...)` when more arrays must be checkpointed, e.g. a
reset reference), a `step_fn(state, batch) -> (state, metrics)` (one jit, or Python around several
jits, as RL's roll-out + updates), an iterator of batches with `get_state`/`set_state` and an
`eval_fn(state) -> dict`. `run_loop` restores, steps, logs, evaluates, checkpoints and writes
`workdir/eval.json`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kljax import data as data_lib
from kljax import ops, tasks
from kljax.config import ConfigError, require
from kljax.models import TransformerLM, lm_config, positions_from_valid
from kljax.sampling import generate
from kljax.tasks import base as task_base
from kljax.train import checkpoint, interrupt, metrics as metrics_lib, sharding as shd, state as state_lib

EVAL_FILE = "eval.json"

# loop name -> module implementing `run(cfg, workdir) -> dict` and optionally `validate(cfg)`.
LOOP_MODULES = {
    "sft": "kljax.train.sft",
    "rl": "kljax.train.rl",
    "distill": "kljax.train.distill",
    "qsharp": "kljax.train.qsharp",
    "preference": "kljax.train.preference",
    "pipeline": "kljax.train.pipeline",
    "reward_model": "kljax.train.reward_model",
}


# ----------------------------------------------------------------------------------------------
# Task, model, mesh, state


def task_kwargs(cfg: Any) -> dict:
    """Task parameters of `cfg.task` (everything but `name` and `data_dir`)."""
    kw = {k: v for k, v in cfg.task.items() if k not in ("name", "data_dir", "module")}
    if str(kw.get("reward", "") or "").strip().startswith("model:"):  # a reward-model run, scored by the rl loop
        kw.pop("reward")
    if cfg.task.get("name") == "files" and not kw.get("tokenizer_path"):  # the policy's own tokenizer
        kw["tokenizer_path"] = hf_path(cfg)
    return kw


def hf_path(cfg: Any) -> str:
    """`cfg.model.hf_path` (a Hugging Face checkpoint folder the policy starts from) or ""."""
    return str(cfg.model.get("hf_path", "") or "") if "model" in cfg else ""


def build_task(cfg: Any) -> task_base.Task:
    """The task named by `cfg.task.name`, built with the other `cfg.task` fields.

    Raises `ConfigError` naming `task.name` / the bad parameter and the valid choices.
    """
    if cfg.task.get("module", ""):
        try:
            tasks.import_module(cfg.task.module)
        except Exception as e:  # noqa: BLE001 — any import failure is a config error here
            raise ConfigError(f"config field `task.module` = {cfg.task.module!r}: import failed: {e!r}") from None
    name = require(cfg, "task.name", lambda v: isinstance(v, str) and bool(v),
                   f"name a task, one of {tasks.names()}.")
    try:
        return tasks.get(name, **task_kwargs(cfg))
    except KeyError as e:
        raise ConfigError(f"config field `task.name` = {name!r}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field `task` ({name}): {e}") from None


def data_dir(cfg: Any) -> str | None:
    """`cfg.task.data_dir` or None (the tasks' default, `$KLJAX_DATA_DIR` or ~/.cache/kljax/data)."""
    return cfg.task.get("data_dir", None) or None


def model_config(cfg: Any, task: task_base.Task | None = None) -> ml_collections.ConfigDict:
    """`cfg.model` with `vocab_size`/`max_len` filled from the task where they are 0 or None."""
    if hf_path(cfg):
        return hf_model_config(cfg)
    mc = lm_config(**{k: v for k, v in cfg.model.items() if k != "hf_path"})
    if not mc.vocab_size or not mc.max_len:
        task = task or build_task(cfg)
        if not mc.vocab_size:
            mc.vocab_size = task.vocab_size
        if not mc.max_len:
            mc.max_len = task.prompt_len + task.completion_len
    return mc


def hf_model_config(cfg: Any) -> ml_collections.ConfigDict:
    """The `lm_config` of `cfg.model.hf_path`'s config.json; from `cfg.model` only dtype, param_dtype,
    value_head, num_atoms and a non-zero max_len apply (the architecture is the checkpoint's)."""
    from kljax.models.hf import config_from_hf
    path = hf_path(cfg)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ConfigError(f"config field `model.hf_path` = {path!r}: no config.json there; point it at a local "
                          "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).")
    with open(cfg_file) as f:
        hf = json.load(f)
    m = cfg.model
    over = {k: m[k] for k in ("dtype", "param_dtype", "value_head", "num_atoms") if k in m}
    if m.get("max_len", 0):
        over["max_len"] = int(m.max_len)
    try:
        mc, _ = config_from_hf(hf, path, **over)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config field `model.hf_path` = {path!r}: {e}") from None
    return mc


def build_model(cfg: Any, rngs: nnx.Rngs, task: task_base.Task | None = None) -> TransformerLM:
    """A `TransformerLM` for `cfg` (vocabulary and length from the task when not set)."""
    return TransformerLM(model_config(cfg, task), rngs=rngs)


def build_mesh(cfg: Any) -> jax.sharding.Mesh:
    """The device mesh of `cfg.mesh` (default: all devices on "data")."""
    return shd.make_mesh(cfg.get("mesh", None) or {"data": -1})


def optim_config(cfg: Any) -> dict:
    """`cfg.optim` as a dict with `total_steps` defaulting to the run's `total_steps`."""
    o = dict(cfg.optim)
    o.setdefault("total_steps", int(cfg.total_steps))
    return o


def create_state(cfg: Any, mesh: jax.sharding.Mesh, task: task_base.Task | None = None, *,
                 model_fn: Callable[[nnx.Rngs], nnx.Module] | None = None,
                 pretrained: bool = True) -> state_lib.TrainState:
    """Fresh sharded `TrainState` (model from `cfg.model`, optimizer from `cfg.optim`, rng from `cfg.seed`).

    With `cfg.model.hf_path` the params are that checkpoint's (`pretrained=False`: random params of the
    same shapes, e.g. a target to restore a checkpoint into)."""
    mc = model_config(cfg, task)
    tx = state_lib.optimizer_from_config(optim_config(cfg))
    if hf_path(cfg) and model_fn is None and pretrained:
        from kljax.models.hf import from_hf
        model = from_hf(hf_path(cfg), dtype=mc.dtype, param_dtype=mc.param_dtype, max_len=mc.max_len,
                        value_head=mc.value_head, num_atoms=mc.num_atoms, seed=int(cfg.seed))
        return state_lib.train_state_from_model(model, tx, mesh, shd.DEFAULT_RULES, int(cfg.seed))
    model_fn = model_fn or (lambda rngs: TransformerLM(mc, rngs=rngs))
    return state_lib.create_train_state(model_fn, tx, mesh, shd.DEFAULT_RULES, int(cfg.seed))


def schedule(cfg: Any):
    """The learning-rate schedule of `cfg.optim` (for the `learning_rate` metric)."""
    return state_lib.schedule_from_config(optim_config(cfg))


@flax.struct.dataclass
class LoopState:
    """A train state plus other checkpointed arrays (`extra`: e.g. a reset reference's params)."""
    train: state_lib.TrainState
    extra: Any

    @property
    def step(self):
        return self.train.step


# ----------------------------------------------------------------------------------------------
# Other runs' params (reference / teacher / initialization)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in `workdir` (its `config.json`) as a ConfigDict."""
    path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no run ({path} is missing); train that run first "
                                "(e.g. its pretrain config) or fix the path.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_run_exists(workdir: str, field: str) -> None:
    """Raise `ConfigError` naming `field` unless `workdir` holds a finished run with a checkpoint."""
    if not workdir:
        raise ConfigError(f"config field `{field}` is empty; set it to the workdir of a trained run "
                          f"(e.g. --config.{field}=runs/pretrain).")
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        raise ConfigError(f"config field `{field}` = {workdir!r}: no run there (config.json missing); "
                          "train it first or fix the path.")
    ck = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    if not os.path.isdir(ck) or not any(d.isdigit() for d in os.listdir(ck)):
        raise ConfigError(f"config field `{field}` = {workdir!r}: the run has no checkpoint yet; "
                          "let it finish first.")


def load_state_from(workdir: str, mesh: jax.sharding.Mesh, step: int | None = None) -> tuple[Any, ml_collections.ConfigDict]:
    """(`TrainState`, config) of the run in `workdir`, restored from its latest (or `step`) checkpoint.

    The state is placed on `mesh` with the usual parameter shardings. For LoopState checkpoints
    (RL with a reset reference) the train part is returned.
    """
    cfg = read_config(workdir)
    target = create_state(cfg, mesh, pretrained=False)
    mgr = checkpoint.Manager(workdir, None)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir} has no finished checkpoint; let that run finish first.")
        try:
            restored, _ = mgr.restore(step, target)
        except Exception:  # the run saved a LoopState (train + extra)
            restored = _restore_train_part(mgr, step, target)
    finally:
        mgr.close()
    return restored, cfg


def _restore_train_part(mgr: checkpoint.Manager, step: int, target: Any) -> Any:
    """The `train` field of a checkpointed loop state (`LoopState`, RL's `RLState`, ...)."""
    import orbax.checkpoint as ocp
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    repl = shd.replicated(jax.tree.leaves(target)[0].sharding.mesh)
    meta = mgr._mgr.item_metadata(step)["state"]
    if "train" not in meta:
        raise ValueError(f"checkpoint {step} in {mgr.workdir} holds neither a TrainState nor a loop state "
                         "with a `train` field")
    tree = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=repl), v)
            for k, v in meta.items() if k != "train"}
    tree["train"] = abstract
    out = mgr._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))
    return out["state"]["train"]


def load_params_from(workdir: str, mesh: jax.sharding.Mesh) -> tuple[Any, Any, ml_collections.ConfigDict]:
    """(graphdef, params, config) of the latest checkpoint in `workdir` (the reference/teacher)."""
    ts, cfg = load_state_from(workdir, mesh)
    return ts.graphdef, ts.params, cfg


def load_model_from(workdir: str, mesh: jax.sharding.Mesh) -> nnx.Module:
    """The NNX model of the latest checkpoint in `workdir`."""
    ts, _ = load_state_from(workdir, mesh)
    return ts.model()


def init_params_from(ts: state_lib.TrainState, workdir: str, mesh: jax.sharding.Mesh) -> state_lib.TrainState:
    """`ts` with its params replaced by those of `workdir`'s latest checkpoint (same model shapes).

    Optimizer state stays fresh. Raises `ConfigError` if the shapes differ.
    """
    src, _ = load_state_from(workdir, mesh)
    params = merge_params(ts.params, src.params)
    if params is None:
        raise ConfigError(f"config field `init_from` = {workdir!r}: that run's model differs from `model` "
                          "(parameter shapes/dtypes); use the same model config.")
    return ts.replace(params=params)


def merge_params(dst: Any, src: Any) -> Any:
    """`dst`'s tree with `src`'s arrays (placed like `dst`'s); a value head (`value_kernel`, `value_bias`) that
    `dst` has and `src` lacks stays `dst`'s fresh one (a reward model or critic from an SFT run). None when
    anything else differs (a missing or extra parameter, a shape or dtype)."""
    dst_leaves, treedef = jax.tree_util.tree_flatten_with_path(dst)
    src_map = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(src)[0]}
    out, used = [], 0
    for path, d in dst_leaves:
        k = jax.tree_util.keystr(path)
        if k in src_map:
            v = src_map[k]
            if (v.shape, v.dtype) != (d.shape, d.dtype):
                return None
            out.append(jax.device_put(v, d.sharding))
            used += 1
        elif "value_kernel" in k or "value_bias" in k:
            out.append(d)
        else:
            return None
    return jax.tree_util.tree_unflatten(treedef, out) if used == len(src_map) else None


# ----------------------------------------------------------------------------------------------
# Forward passes on prompt + completion


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


# ----------------------------------------------------------------------------------------------
# Evaluation


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
        return s.train.model() if isinstance(s, LoopState) else s.model()

    get_model = model_of or default_model_of

    def eval_fn(s):
        return evaluate_generation(get_model(s), task, records, key, ref_model=ref_model, mesh=mesh, **settings)

    return eval_fn


# ----------------------------------------------------------------------------------------------
# The step-loop driver


def checkpoint_manager(cfg: Any, workdir: str) -> checkpoint.Manager:
    """`checkpoint.Manager` for `workdir` from `cfg.checkpoint` (guards `workdir/config.json`)."""
    ck = cfg.get("checkpoint", None) or {}
    return checkpoint.Manager(workdir, cfg, every=int(ck.get("every", 100)), keep=int(ck.get("keep", 3)),
                              best_metric=ck.get("best_metric", None) or None,
                              best_mode=ck.get("best_mode", "max"), async_save=ck.get("async_save", True))


def _step_of(state: Any) -> int:
    return int(jax.device_get(state.step))


def write_eval(workdir: str, results: Mapping[str, Any]) -> None:
    """Write `workdir/eval.json` atomically (process 0)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(metrics_lib.to_python(results) | {k: v for k, v in results.items() if isinstance(v, str)},
                  f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_eval(workdir: str) -> dict:
    """`workdir/eval.json` (the final evaluation of a finished run)."""
    with open(os.path.join(workdir, EVAL_FILE)) as f:
        return json.load(f)


def run_loop(cfg: Any, workdir: str, *, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]],
             batches: Iterator | None, eval_fn: Callable[[Any], dict] | None = None,
             total_steps: int | None = None, bar_keys=metrics_lib.DEFAULT_BAR_KEYS, desc: str | None = None,
             on_restore: Callable[[Any], Any] | None = None) -> dict:
    """Run `step_fn` from the latest checkpoint in `workdir` to `total_steps`; return the final eval.

    state: the loop state (a pytree with `.step`, e.g. `TrainState` or `LoopState`), freshly created;
      it is replaced by the latest checkpoint when `workdir` has one (same config enforced).
    step_fn(state, batch) -> (state, metrics): one training step (metrics: scalars, TRL names).
    batches: iterator (with `get_state`/`set_state` for exact resume; its state is checkpointed) or
      None (step_fn draws its own data from the state's rng).
    eval_fn(state) -> metrics (names like "eval/accuracy"): every `cfg.eval_every` steps, at the end.
    on_restore(state) -> state: hook after a restore (e.g. rebuild non-checkpointed caches).

    Every step: NaN/inf metrics stop the run with the step, the metric and the last good checkpoint
    (`NonFiniteMetricError`); metrics every `cfg.log_every` steps to metrics.jsonl + TensorBoard;
    checkpoints every `cfg.checkpoint.every` steps, at the end, with the eval metrics (best kept).
    Writes `workdir/eval.json` with the final evaluation (plus `step` and `wall_s`).
    """
    total = int(total_steps if total_steps is not None else cfg.total_steps)
    log_every = max(1, int(cfg.get("log_every", 10)))
    eval_every = int(cfg.get("eval_every", 0) or 0)
    os.makedirs(workdir, exist_ok=True)
    mgr = checkpoint_manager(cfg, workdir)
    t0 = time.time()
    stop = interrupt.StopRequest()
    try:
        stored = _finished_results(workdir, mgr, total)
        if stored is not None:  # a finished run: report it, write nothing
            print(f"{workdir}: run already finished (step {total} of {total}); stored results from "
                  f"{os.path.join(workdir, EVAL_FILE)}.", flush=True)
            return stored
        restored = mgr.restore_latest(state)
        resume = None
        if restored is not None:
            state, data_state = restored
            resume = _step_of(state)
            print(f"resumed from step {resume} of {total}, checkpoint {os.path.join(mgr.directory, str(resume))}",
                  flush=True)
            if batches is not None and data_state is not None:
                batches.set_state(data_state)
            if on_restore is not None:
                state = on_restore(state)
        start = _step_of(state)
        best_metric = mgr.best_metric
        # A fresh start moves metrics of an earlier start that never reached a checkpoint aside (step > 0).
        writer = metrics_lib.Writer(workdir, resume_step=0 if resume is None else resume)
        bar = metrics_lib.ProgressBar(total, initial=start, keys=tuple(bar_keys) + ("eval/accuracy",),
                                      desc=desc or os.path.basename(os.path.normpath(workdir)))
        last_eval: dict = {}
        try:
            stop.__enter__()
            step = start
            while step < total:
                t_step = time.perf_counter()
                batch = next(batches) if batches is not None else None
                state, m = step_fn(state, batch)
                step += 1
                m = dict(m)
                metrics_lib.check_finite(m, step, mgr.latest_step(), workdir)  # waits for the step's values
                m["time/step_s"] = time.perf_counter() - t_step
                ev = None
                if eval_fn is not None and eval_every and step % eval_every == 0 and step < total:
                    ev = eval_fn(state)
                    m.update(ev)
                    last_eval = ev
                if step % log_every == 0 or ev is not None or step == total:
                    writer.write(step, m)
                bar.update(step, m)
                if step < total and step % mgr.every == 0:
                    has = ev is not None and best_metric in (ev or {})
                    if best_metric and not has:
                        ev_for_ckpt = None
                    else:
                        ev_for_ckpt = ev
                    mgr.save(step, state, batches.get_state() if batches is not None else None,
                             metrics=ev_for_ckpt if best_metric else None)
                mgr.check()  # a failed background save stops the run
                if step < total and stop.should_stop(step):
                    if mgr.latest_step() != step:
                        mgr.save(step, state, batches.get_state() if batches is not None else None, force=True)
                    mgr.wait()
                    raise interrupt.Interrupted(stop.signum, step, total, mgr.directory)
            final = eval_fn(state) if eval_fn is not None else dict(last_eval)
            if final:
                writer.write(total, final)
            if mgr.latest_step() != total:
                ok = best_metric and best_metric in final
                mgr.save(total, state, batches.get_state() if batches is not None else None,
                         metrics=final if ok else None, force=True)
        finally:
            stop.__exit__()
            bar.close()
            writer.close()
    finally:
        mgr.close()
    result = dict(metrics_lib.to_python(final or {}))
    result.update(step=total, wall_s=time.time() - t0)
    write_eval(workdir, result)
    return result


def _finished_results(workdir: str, mgr: checkpoint.Manager, total: int) -> dict | None:
    """The stored `eval.json` when the run in `workdir` already reached `total` (else None)."""
    if mgr.latest_step() != total or not os.path.exists(os.path.join(workdir, EVAL_FILE)):
        return None
    try:
        stored = read_eval(workdir)
    except (OSError, ValueError):
        return None
    return stored if int(stored.get("step", -1)) == total else None


Interrupted = interrupt.Interrupted


def make_step(loss_fn: Callable, cfg: Any, mesh: jax.sharding.Mesh, ts: Any, accum_steps: int = 1) -> Callable:
    """Jitted `step(train_state, batch)` for `loss_fn(model, batch, rng) -> (loss, metrics)` with the
    mesh's explicit shardings, donated state, skip of non-finite updates and the lr metric."""
    return state_lib.make_train_step(loss_fn, mesh, state_lib.state_sharding(ts), accum_steps=accum_steps,
                                     schedule=schedule(cfg))


def sharded_batches(it: Iterator, mesh: jax.sharding.Mesh) -> "ShardedIterator":
    """Wrap a numpy-batch iterator so `next` yields `shard_batch`-placed global arrays."""
    return ShardedIterator(it, mesh)


class ShardedIterator:
    """Iterator of sharded batches that forwards `get_state`/`set_state` to the wrapped iterator."""

    def __init__(self, it, mesh, transform: Callable | None = None):
        self.it, self.mesh, self.transform = it, mesh, transform

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.it)
        if self.transform is not None:
            b = self.transform(b)
        return shd.shard_batch(b, self.mesh)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


# ----------------------------------------------------------------------------------------------
# Config checks shared by loops (run before anything is compiled)


def validate_common(cfg: Any) -> None:
    """Checks every loop needs: task, model, mesh vs devices, batch divisibility, steps, optimizer.

    Raises `ConfigError` naming the field and the fix.
    """
    task = build_task(cfg)
    try:
        model_config(cfg, task)
        from kljax.models.transformer import _resolved
        _resolved(model_config(cfg, task))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"config field `model`: {e}") from None
    mc = model_config(cfg, task)
    if mc.max_len < task.prompt_len + task.completion_len:
        raise ConfigError(f"config field `model.max_len` = {mc.max_len} is too short: the task needs "
                          f"{task.prompt_len + task.completion_len} (prompt + completion); use 0 (= that) or more.")
    if mc.vocab_size < task.vocab_size:
        raise ConfigError(f"config field `model.vocab_size` = {mc.vocab_size} < task vocabulary {task.vocab_size}; "
                          "use 0 (= the task's).")
    try:
        mesh = build_mesh(cfg)
    except shd.MeshError as e:
        raise ConfigError(str(e)) from None
    dp = shd.data_parallel_size(mesh)
    require(cfg, "total_steps", lambda v: int(v) >= 1, "use a positive number of steps.")
    if "batch_size" in cfg:
        require(cfg, "batch_size", lambda v: int(v) >= 1 and int(v) % dp == 0,
                f"the global batch must be a positive multiple of the data-parallel size {dp} "
                f"(mesh.data × mesh.fsdp on {jax.device_count()} devices); e.g. {max(dp, 8 * dp)}.")
    if "eval" in cfg:
        require(cfg, "eval.batch_size", lambda v: int(v) >= 1 and int(v) % dp == 0,
                f"use a positive multiple of the data-parallel size {dp}.", default=128)
    if "checkpoint" in cfg:
        require(cfg, "checkpoint.every", lambda v: int(v) >= 1, "save every N >= 1 steps.", default=100)
        require(cfg, "checkpoint.keep", lambda v: int(v) >= 1, "keep at least the latest checkpoint (>= 1).",
                default=3)
        require(cfg, "checkpoint.best_mode", lambda v: v in ("max", "min"), "use 'max' or 'min'.", default="max")
    try:
        state_lib.optimizer_from_config(optim_config(cfg))
    except ConfigError as e:
        raise ConfigError(str(e).replace("`optim.total_steps`", "`total_steps`")) from None


# ----------------------------------------------------------------------------------------------
# Config files


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of an experiment file given as "path/to/file.py[:arg]" (as --config takes)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist (from {spec!r}).")
    name = "kljax_cfg_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def loop_module(cfg: Any):
    """The module implementing `cfg.loop` (`run(cfg, workdir)`, optional `validate(cfg, check_paths)`)."""
    import importlib
    name = require(cfg, "loop", lambda v: v in LOOP_MODULES, f"use one of {sorted(LOOP_MODULES)}.")
    try:
        return importlib.import_module(LOOP_MODULES[name])
    except ImportError as e:
        raise ConfigError(f"config field `loop` = {name!r}: its module {LOOP_MODULES[name]} is not available ({e}).") \
            from None


# Loops that run as the same program on every process (a pipeline's stages are checked one by one).
MULTI_PROCESS_LOOPS = frozenset({"sft", "rl", "distill", "qsharp", "preference", "pipeline"})


def check_process_count(cfg: Any) -> None:
    """Refuse, before anything runs, a loop that gathers its roll-outs on one host in a multi-process run."""
    n = jax.process_count()
    if n > 1 and cfg.loop not in MULTI_PROCESS_LOOPS:
        raise ConfigError(
            f"config field `loop` = {cfg.loop!r} runs in one process only, and this run has {n} processes "
            f"(its roll-outs are still gathered on one host). Run it as one process that sees all devices "
            f"(on CPU: --host_devices=N), or use a loop that runs on several: {sorted(MULTI_PROCESS_LOOPS - {'pipeline'})}.")


def validate(cfg: Any, check_paths: bool = True) -> None:
    """All config checks of `cfg.loop` (run by `kljax.main` before anything is compiled)."""
    mod = loop_module(cfg)
    check_process_count(cfg)
    import inspect
    if hasattr(mod, "validate"):
        if "check_paths" in inspect.signature(mod.validate).parameters:
            mod.validate(cfg, check_paths=check_paths)
        else:
            mod.validate(cfg)
    else:
        validate_common(cfg)
    if cfg.get("loop", "") != "pipeline":
        from kljax.train import preflight
        preflight.check_objective_hparams(cfg)
