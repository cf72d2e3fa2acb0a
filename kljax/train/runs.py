"""Other runs' checkpoints: a run's config, its restored state or model (reference, teacher,
initialization; `load_model` also for classifier runs and value-head overrides) and parameter merging."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kljax.config import ConfigError
from kljax.train import checkpoint, sharding as shd, state as state_lib
from kljax.train.setup import create_state


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


def load_state_from(workdir: str, mesh: jax.sharding.Mesh, step: int | None = None,
                    rules=shd.DEFAULT_RULES) -> tuple[Any, ml_collections.ConfigDict]:
    """(`TrainState`, config) of the run in `workdir`, restored from its latest (or `step`) checkpoint.

    The state is placed on `mesh` with the parameter layout `rules` (default: the policy's). For loop-state checkpoints
    (RL's `RLState`) the `train` part is returned.
    """
    cfg = read_config(workdir)
    target = create_state(cfg, mesh, pretrained=False, rules=rules)
    mgr = checkpoint.Manager(workdir, None)
    try:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir} has no finished checkpoint; let that run finish first.")
        try:
            restored, _ = mgr.restore(step, target)
        except Exception:  # the run saved a loop state (train + other arrays)
            restored = _restore_train_part(mgr, step, target)
    finally:
        mgr.close()
    return restored, cfg


def _restore_train_part(mgr: checkpoint.Manager, step: int, target: Any) -> Any:
    """The `train` field of a checkpointed loop state (RL's `RLState`, ...)."""
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


def load_model_from(workdir: str, mesh: jax.sharding.Mesh, rules=shd.DEFAULT_RULES) -> nnx.Module:
    """The NNX model of the latest checkpoint in `workdir`, its parameters laid out by `rules`."""
    ts, _ = load_state_from(workdir, mesh, rules=rules)
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


def model_from_config(model_cfg, rngs):
    """A `Classifier` (digits) or `TransformerLM` for a model config."""
    from kljax.models import Classifier, TransformerLM
    if "num_classes" in model_cfg:
        return Classifier(model_cfg, rngs=rngs)
    return TransformerLM(model_cfg, rngs=rngs)


def _model_config_of(wcfg, model_key: str) -> ml_collections.ConfigDict:
    from kljax.models import classifier_config
    from kljax.train import setup as setup_lib
    d = wcfg[model_key].to_dict()
    d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
    if "num_classes" in d:
        return classifier_config(**d)
    if model_key == "model":
        return setup_lib.model_config(wcfg)
    sub = ml_collections.ConfigDict(wcfg.to_dict())
    sub.model = d
    return setup_lib.model_config(sub)


def load_model(workdir: str, field: str, model_key: str = "model", **overrides) -> nnx.Module:
    """The model trained in `workdir` (its config.json `model_key` and latest checkpoint's params).

    `overrides` change the model config (e.g. `value_head="token"` to start a critic from a
    reference body): parameters missing from the checkpoint, or of another shape, keep their fresh
    initialization. `field` names the config field in errors.
    """
    import orbax.checkpoint as ocp
    wcfg = read_config(workdir)
    if model_key not in wcfg:
        raise ConfigError(f"config field `{field}` = {workdir!r}: its config.json has no `{model_key}`.")
    mcfg = _model_config_of(wcfg, model_key)
    for k, v in overrides.items():
        mcfg[k] = v
    model = model_from_config(mcfg, nnx.Rngs(0))
    ckdir = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
    mgr = ocp.CheckpointManager(ckdir, item_names=("state", "data"))
    step = mgr.latest_step()
    if step is None:
        raise ConfigError(f"config field `{field}` = {workdir!r} has no finished checkpoint in {ckdir}; "
                          "run that stage first.")
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    params = restored["params"]
    graphdef, cur, rest = nnx.split(model, nnx.Param, ...)
    cur_pure = nnx.to_pure_dict(cur)

    def merge(fresh, loaded):
        if isinstance(fresh, dict):
            sub = loaded if isinstance(loaded, dict) else {}
            return {k: merge(v, sub.get(k, sub.get(str(k)))) for k, v in fresh.items()}
        if loaded is None or tuple(np.shape(loaded)) != tuple(np.shape(fresh)):
            return fresh
        return jnp.asarray(loaded, fresh.dtype)

    nnx.replace_by_pure_dict(cur, merge(cur_pure, params))
    return nnx.merge(graphdef, cur, rest)
