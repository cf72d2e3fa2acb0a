"""What a loop builds from its config: task, model config, mesh, train state, optimizer schedule,
the jitted step and sharded batches (`setup(cfg)` does the common preamble at once)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
from flax import nnx

from kljax import tasks
from kljax.config import ConfigError, require
from kljax.models import TransformerLM, lm_config
from kljax.tasks import base as task_base
from kljax.train import sharding as shd, state as state_lib


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
                 pretrained: bool = True, rules=shd.DEFAULT_RULES) -> state_lib.TrainState:
    """Fresh sharded `TrainState` (model from `cfg.model`, optimizer from `cfg.optim`, rng from `cfg.seed`).

    With `cfg.model.hf_path` the params are that checkpoint's (`pretrained=False`: random params of the
    same shapes, e.g. a target to restore a checkpoint into). `rules`: the parameters' layout on `mesh`
    (`sharding.PARAM_LAYOUTS`)."""
    mc = model_config(cfg, task)
    tx = state_lib.optimizer_from_config(optim_config(cfg))
    if hf_path(cfg) and model_fn is None and pretrained:
        from kljax.models.hf import from_hf
        model = from_hf(hf_path(cfg), dtype=mc.dtype, param_dtype=mc.param_dtype, max_len=mc.max_len,
                        value_head=mc.value_head, num_atoms=mc.num_atoms, seed=int(cfg.seed))
        return state_lib.train_state_from_model(model, tx, mesh, rules, int(cfg.seed))
    model_fn = model_fn or (lambda rngs: TransformerLM(mc, rngs=rngs))
    return state_lib.create_train_state(model_fn, tx, mesh, rules, int(cfg.seed))


class Setup(NamedTuple):
    """What every loop starts from."""
    task: task_base.Task
    mesh: jax.sharding.Mesh
    state: state_lib.TrainState


def setup(cfg: Any) -> Setup:
    """The task, the mesh and the policy's sharded train state of a loop.

    The params come from `cfg.init_from` (a finished run) when set, else from `cfg.model.hf_path` or a
    fresh initialization. (RL passes a config whose schedule counts its several updates per roll-out.)
    """
    from kljax.train import runs  # runs builds restore targets with create_state
    task, mesh = build_task(cfg), build_mesh(cfg)
    state = create_state(cfg, mesh, task)
    if cfg.get("init_from", ""):
        runs.check_run_exists(cfg.init_from, "init_from")
        state = runs.init_params_from(state, cfg.init_from, mesh)
    return Setup(task, mesh, state)


def schedule(cfg: Any):
    """The learning-rate schedule of `cfg.optim` (for the `learning_rate` metric)."""
    return state_lib.schedule_from_config(optim_config(cfg))


def make_step(loss_fn: Callable, cfg: Any, mesh: jax.sharding.Mesh, ts: Any, accum_steps: int = 1) -> Callable:
    """Jitted `step(train_state, batch)` for `loss_fn(model, batch, rng) -> (loss, metrics)` with the
    mesh's explicit shardings, donated state, skip of non-finite updates and the lr metric."""
    return state_lib.make_train_step(loss_fn, mesh, state_lib.state_sharding(ts), accum_steps=accum_steps,
                                     schedule=schedule(cfg))


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

