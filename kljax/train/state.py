"""Train state created directly sharded, optimizer from config, and a generic jitted train step.

Functional NNX style: `graphdef, params, rest = nnx.split(model, nnx.Param, ...)`; the step rebuilds
the model with `nnx.merge(graphdef, params, rest)` inside `jax.jit`. Params are stored as plain
nested dicts of arrays (`nnx.to_pure_dict`), which optax, orbax and the loops all handle directly.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from kljax.config import require
from kljax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree (what the checkpoint saves).

    step: int32 scalar, number of updates applied.
    params: nested dict of the trainable `nnx.Param` arrays.
    opt_state: optax state of `tx`.
    rng: raw uint32 PRNG key data [2]; step t uses `fold_in(rng, t)`, so a resumed run draws the
      same randomness as an uninterrupted one.
    model_state: non-Param variables of the model (nested dict; usually empty), not trained.
    graphdef, tx: static (not arrays, not checkpointed).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any
    graphdef: Any = flax.struct.field(pytree_node=False)
    tx: Any = flax.struct.field(pytree_node=False)

    def __repr__(self) -> str:  # the graphdef's repr runs to pages
        shapes = jax.tree.map(lambda x: tuple(getattr(x, "shape", ())), self.params)
        return f"TrainState(step={self.step}, params={shapes})"

    def model(self) -> nnx.Module:
        """The NNX model holding this state's params (call inside or outside jit)."""
        return nnx.merge(self.graphdef, self.params, self.model_state)


def _raw_key(rng: Any) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def _split_model(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def state_sharding(ts: TrainState) -> Any:
    """Tree of the shardings of a (sharded) train state, for `jit_step` and checkpoint restore."""
    return jax.tree.map(lambda x: x.sharding, ts)


def abstract_state(ts: TrainState) -> Any:
    """`ShapeDtypeStruct`s with shardings (what `checkpoint.Manager.restore_latest` restores into)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), ts)


def _model_shardings(abstract_model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    graphdef, abstract_params, abstract_rest = _split_model(abstract_model)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)
    param_sharding = shd.logical_to_mesh_sharding(specs, mesh, rules, shapes)
    repl = shd.replicated(mesh)
    rest_sharding = jax.tree.map(lambda _: repl, nnx.to_pure_dict(abstract_rest))
    return graphdef, shapes, param_sharding, rest_sharding


def model_shardings(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]] = shd.DEFAULT_RULES):
    """(param shardings, model_state shardings): pure-dict trees of `NamedSharding` for `model`
    (a real or `nnx.eval_shape` model) from its parameters' logical axis names and `rules`."""
    _, _, param_sharding, rest_sharding = _model_shardings(model, mesh, rules)
    return param_sharding, rest_sharding


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]] = shd.DEFAULT_RULES):
    """`(graphdef, params, model_state)` of an existing model (e.g. `from_hf`, a teacher or reference)
    with its arrays placed on `mesh` by `rules`; `nnx.merge(graphdef, params, model_state)` rebuilds it.
    Pass `params` to a step through `make_train_step(..., extra_shardings=...)`."""
    graphdef, _, param_sharding, rest_sharding = _model_shardings(model, mesh, rules)
    _, params, rest = _split_model(model)
    return (graphdef, jax.device_put(nnx.to_pure_dict(params), param_sharding),
            jax.device_put(nnx.to_pure_dict(rest), rest_sharding))


def _opt_sharding(optimizer, shapes, param_sharding, mesh):
    repl = shd.replicated(mesh)
    abstract_opt = jax.eval_shape(optimizer.init, shapes)
    # Moments mirror the params (same sharding); counts and other non-param leaves are replicated.
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_sharding,
                                 transform_non_params=lambda _: repl,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def create_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation,
                       mesh: Mesh, rules: Sequence[tuple[str, Any]] = shd.DEFAULT_RULES, rng: Any = 0) -> TrainState:
    """Build model params and optimizer state directly sharded on `mesh` (full params never on one device).

    `model_fn(rngs)` constructs the model; its `nnx.Param`s carry logical axis names via
    `nnx.with_partitioning`, mapped to mesh axes by `rules`. `rng` is an int seed or a PRNG key: it is
    split into the model-init key and the train-state key. Optimizer moments get their parameter's
    sharding; scalars (step, counts, rng) are replicated. Construction runs under
    `nnx.use_eager_sharding(False)`: the sharding is applied by `jit(out_shardings=...)`.
    """
    init_key, train_key = jax.random.split(_raw_key(rng))

    def build(key):
        with nnx.use_eager_sharding(False):
            return model_fn(nnx.Rngs(params=key, default=key))

    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: build(init_key))
    graphdef, shapes, param_sharding, rest_sharding = _model_shardings(abstract_model, mesh, rules)
    repl = shd.replicated(mesh)

    def init(init_key, train_key):
        _, params, rest = _split_model(build(init_key))
        params = nnx.to_pure_dict(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=train_key, model_state=nnx.to_pure_dict(rest), graphdef=graphdef, tx=optimizer)

    out_sharding = TrainState(step=repl, params=param_sharding,
                              opt_state=_opt_sharding(optimizer, shapes, param_sharding, mesh), rng=repl,
                              model_state=rest_sharding, graphdef=graphdef, tx=optimizer)
    return jax.jit(init, out_shardings=out_sharding)(init_key, train_key)


def abstract_train_state(model_fn: Callable[[nnx.Rngs], nnx.Module], optimizer: optax.GradientTransformation,
                         mesh: Mesh, rules: Sequence[tuple[str, Any]] = shd.DEFAULT_RULES, rng: Any = 0) -> TrainState:
    """The state `create_train_state` would build, as `ShapeDtypeStruct`s carrying their shardings.

    Nothing is allocated, so `mesh` may span devices this host does not have (a TPU topology for
    ahead-of-time compilation, `kljax.aot`).
    """
    with nnx.use_eager_sharding(False):
        abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(params=0, default=0)))
    graphdef, shapes, param_sharding, rest_sharding = _model_shardings(abstract_model, mesh, rules)
    rest = nnx.to_pure_dict(_split_model(abstract_model)[2])
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    repl = shd.replicated(mesh)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    key = jax.eval_shape(lambda: _raw_key(rng))
    return TrainState(step=sds(jax.ShapeDtypeStruct((), jnp.int32), repl),
                      params=jax.tree.map(sds, shapes, param_sharding),
                      opt_state=jax.tree.map(sds, opt_shapes, _opt_sharding(optimizer, shapes, param_sharding, mesh)),
                      rng=sds(key, repl), model_state=jax.tree.map(sds, rest, rest_sharding),
                      graphdef=graphdef, tx=optimizer)


def train_state_from_model(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                           rules: Sequence[tuple[str, Any]] = shd.DEFAULT_RULES, rng: Any = 0) -> TrainState:
    """Train state starting from an existing (e.g. pretrained, `from_hf`) model's parameters.

    The params are placed with `device_put` (each device receives only its shard), the optimizer
    state is initialized directly sharded. `rng` seeds the train-state key only.
    """
    graphdef, params, rest = shard_model(model, mesh, rules)
    param_sharding = jax.tree.map(lambda x: x.sharding, params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt_state = jax.jit(optimizer.init, out_shardings=_opt_sharding(optimizer, shapes, param_sharding, mesh))(params)
    repl = shd.replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl), params=params, opt_state=opt_state,
                      rng=jax.device_put(_raw_key(rng), repl), model_state=rest, graphdef=graphdef, tx=optimizer)


# ----------------------------------------------------------------------------------------------
# Optimizer from config


def schedule_from_config(cfg: Any, prefix: str = "optim") -> optax.Schedule:
    """Learning rate: linear warmup 0 -> `learning_rate` over `warmup_steps`, then cosine decay to
    `learning_rate * end_lr_ratio` at `total_steps` (`schedule` = "cosine", default) or constant
    (`schedule` = "constant")."""
    lr = require(cfg, "learning_rate", lambda v: v > 0, "use a positive peak learning rate.", prefix=prefix)
    warmup = require(cfg, "warmup_steps", lambda v: v >= 0, "use a non-negative int.", default=0, prefix=prefix)
    kind = require(cfg, "schedule", lambda v: v in ("cosine", "constant"), "use 'cosine' or 'constant'.",
                   default="cosine", prefix=prefix)
    if kind == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    total = require(cfg, "total_steps", lambda v: v > warmup,
                    f"the cosine schedule needs total_steps > warmup_steps={warmup}.", prefix=prefix)
    end = require(cfg, "end_lr_ratio", lambda v: 0 <= v <= 1, "use a ratio in [0, 1].", default=0.0, prefix=prefix)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, lr * end)


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices only; biases, norms' scales and other vectors are not decayed.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer_from_config(cfg: Any, prefix: str = "optim") -> optax.GradientTransformation:
    """optax chain from `cfg` (usually `config.optim`; `prefix` names it in errors).

    Fields: `name` ("adamw" default, "adam", "sgd"), `learning_rate`, `warmup_steps` (0),
    `total_steps`, `schedule` ("cosine" | "constant"), `end_lr_ratio` (0.0), `weight_decay` (0.0,
    AdamW-style decoupled, matrices only), `b1` (0.9), `b2` (0.999), `eps` (1e-8), `grad_clip`
    (global-norm clip; 0 = off), `momentum` (sgd, 0.0). Gradient accumulation is an argument of
    `make_train_step` (`accum_steps`), not part of the optimizer.
    """
    name = require(cfg, "name", lambda v: v in ("adamw", "adam", "sgd"), "use one of 'adamw', 'adam', 'sgd'.",
                   default="adamw", prefix=prefix)
    schedule = schedule_from_config(cfg, prefix)
    clip = require(cfg, "grad_clip", lambda v: v >= 0, "use 0 (off) or a positive max global norm.", default=0.0,
                   prefix=prefix)
    wd = require(cfg, "weight_decay", lambda v: v >= 0, "use a non-negative float.", default=0.0, prefix=prefix)
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    b1, b2, eps = cfg.get("b1", 0.9), cfg.get("b2", 0.999), cfg.get("eps", 1e-8)
    if name == "sgd":
        parts.append(optax.sgd(schedule, momentum=float(cfg.get("momentum", 0.0)) or None))
    elif name == "adam":
        parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    else:
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=_decay_mask))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Train step


def _micro_batches(batch: Any, accum_steps: int) -> Any:
    """[B, ...] -> [accum_steps, B / accum_steps, ...], micro-batch j = rows j, j+k, j+2k, ...

    The strided split keeps every micro-batch spread over all data-parallel devices (rows of one
    device stay on that device), so no data moves between devices.
    """
    def split(x):
        b = x.shape[0]
        if b % accum_steps:
            raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}; "
                             "choose a batch size that is a multiple of accum_steps.")
        return jnp.swapaxes(x.reshape((b // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _constrain_micro_batches(mbs: Any, mesh: Mesh | None) -> Any:
    # Keep each micro-batch split over ("data", "fsdp") when its rows divide evenly; otherwise (tiny
    # batches) let the compiler choose.
    if mesh is None:
        return mbs
    dp = shd.data_parallel_size(mesh)
    spec = NamedSharding(mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec) if x.shape[1] % dp == 0 else x, mbs)


def train_step_fn(loss_fn: Callable, *, accum_steps: int = 1, schedule: optax.Schedule | None = None,
                  skip_nonfinite: bool = True, mesh: Mesh | None = None, with_extra: bool = False) -> Callable:
    """Un-jitted `step(state, batch[, extra]) -> (state, metrics)`; see `make_train_step`."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be >= 1.")

    def grads_of(params, model_state, graphdef, batch, rng, extra):
        def objective(p):
            model = nnx.merge(graphdef, p, model_state)
            loss, metrics = loss_fn(model, batch, rng, extra) if with_extra else loss_fn(model, batch, rng)
            # Non-Param variables the call updated (e.g. the count of an nnx.Rngs stream used by dropout).
            new_model_state = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
            return loss, (metrics, new_model_state)
        (loss, (metrics, new_model_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return (loss, metrics, grads), new_model_state

    def step(state: TrainState, batch: Any, extra: Any = None):
        # `extra` (frozen teacher/reference params, ...) is an input, never differentiated or updated.
        extra = jax.lax.stop_gradient(extra)
        rng = jax.random.fold_in(state.rng, state.step)
        if accum_steps == 1:
            (loss, metrics, grads), model_state = grads_of(state.params, state.model_state, state.graphdef, batch, rng,
                                                           extra)
        else:
            # Sum of per-micro-batch means / k = full-batch mean when micro-batches are equal-sized and
            # the loss is a plain mean over examples (token-mean over varying masks is not exact).
            def body(carry, xs):
                acc, model_state = carry
                mb, i = xs
                out, model_state = grads_of(state.params, model_state, state.graphdef, mb, jax.random.fold_in(rng, i),
                                            extra)
                return (jax.tree.map(jnp.add, acc, out), model_state), None
            mbs = _constrain_micro_batches(_micro_batches(batch, accum_steps), mesh)
            first = jax.tree.map(lambda x: x[0], mbs)
            shapes, _ = jax.eval_shape(lambda: grads_of(state.params, state.model_state, state.graphdef, first, rng,
                                                        extra))
            zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            (total, model_state), _ = jax.lax.scan(body, (zero, state.model_state), (mbs, jnp.arange(accum_steps)))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum_steps, total)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            # A non-finite step leaves params and optimizer state unchanged (the step counter advances).
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        out = dict(metrics)
        out.update(loss=loss, grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.float32))
        if schedule is not None:
            out["learning_rate"] = schedule(state.step)
        return new_state, out

    return step


def make_train_step(loss_fn: Callable, mesh: Mesh | None = None, state_shardings: Any = None, *,
                    accum_steps: int = 1, schedule: optax.Schedule | None = None, skip_nonfinite: bool = True,
                    donate: bool = True, extra_shardings: Any = None) -> Callable:
    """Jitted `step(state, batch) -> (state, metrics)` for `loss_fn(model, batch, rng) -> (loss, metrics)`.

    `loss_fn` receives the NNX model rebuilt from the state's params, the (micro-)batch and a PRNG key
    (`fold_in(state.rng, step)`, then `fold_in(., micro_index)` when accumulating); it returns a scalar
    loss and a dict of scalar metrics. With `accum_steps` = k > 1 the batch is split into k strided
    micro-batches, gradients are averaged (`lax.scan`), and metrics averaged. Output metrics add
    `loss`, `grad_norm`, `nonfinite` (1.0 when loss or gradient norm is NaN/inf; the update is then
    skipped if `skip_nonfinite`) and `learning_rate` when `schedule` is given.

    With `mesh` and `state_shardings` (`state_sharding(ts)`), the step is jitted with explicit
    shardings (batch over ("data", "fsdp"), metrics replicated); otherwise plain `jax.jit`. The input
    state is donated: use only the returned state.

    Frozen models (teacher, reference): pass `extra_shardings` (e.g. the params' shardings from
    `shard_model`); the step becomes `step(state, batch, extra)` and calls
    `loss_fn(model, batch, rng, extra)`. `extra` is a jit argument (not a baked-in constant), is
    wrapped in `stop_gradient`, and is neither donated nor returned.
    """
    with_extra = extra_shardings is not None
    fn = train_step_fn(loss_fn, accum_steps=accum_steps, schedule=schedule, skip_nonfinite=skip_nonfinite, mesh=mesh,
                       with_extra=with_extra)
    if mesh is not None:
        if state_shardings is None:
            raise ValueError("make_train_step(mesh=...) needs state_shardings=state_sharding(train_state).")
        return shd.jit_step(fn, mesh, state_shardings, donate_state=donate,
                            extra_sharding=extra_shardings if with_extra else None)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
