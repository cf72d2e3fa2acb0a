"""Mesh from config, logical-axis rules, sharded train-state creation, batch sharding, train step
(sharded = single device, accumulation = full batch, NaN handling), optimizer from config."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kljax import config as kcfg
from kljax.train import sharding as shd
from kljax.train import state as st


def _part(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class MLP(nnx.Module):
    """Two layers whose kernels carry logical names, like the transformer's MLP block."""

    def __init__(self, rngs, din=8, hidden=16, dout=4):
        self.up = nnx.Linear(din, hidden, kernel_init=_part(("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(hidden, dout, kernel_init=_part(("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def mse_loss(model, batch, rng):
    err = model(batch["x"]) - batch["y"]
    loss = jnp.mean(jnp.sum(err**2, axis=-1))
    return loss, {"mse": loss}


def mesh_of(**sizes):
    return shd.make_mesh(ml_collections.ConfigDict(sizes))


def data(n=8, seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.normal(size=(n, 8)).astype(np.float32), "y": r.normal(size=(n, 4)).astype(np.float32)}


# -- mesh ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes,expected", [
    (dict(data=-1), (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (dict(data=1, fsdp=4, tensor=-1), (1, 4, 2)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
])
def test_make_mesh_sizes(sizes, expected):
    mesh = mesh_of(**sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes,needle", [
    (dict(data=3, fsdp=-1), "does not divide the 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), "uses 4 devices but 8 are available"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(data=0), "mesh.data"),
    (dict(data=-1, pipe=2), "mesh.pipe"),
])
def test_make_mesh_errors_name_field_and_device_count(sizes, needle):
    with pytest.raises(shd.MeshError, match="mesh") as err:
        mesh_of(**sizes)
    assert needle in str(err.value)


# -- rules -----------------------------------------------------------------------------------------

def test_logical_to_mesh_axes():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    assert shd.logical_to_mesh_axes(("embed", "mlp"), mesh=mesh) == P("fsdp", "tensor")
    assert shd.logical_to_mesh_axes(("vocab", "embed"), mesh=mesh) == P("tensor", "fsdp")
    assert shd.logical_to_mesh_axes(("embed", "kv"), mesh=mesh) == P("fsdp", None)
    assert shd.logical_to_mesh_axes(("batch", None), mesh=mesh) == P(("data", "fsdp"), None)
    # A mesh axis shards one dimension only: the second "mlp" is replicated.
    assert shd.logical_to_mesh_axes(("mlp", "mlp"), mesh=mesh) == P("tensor", None)
    # Divisibility fallback: vocab 13 cannot be split over tensor=2.
    assert shd.logical_to_mesh_axes(("vocab", "embed"), mesh=mesh, shape=(13, 8)) == P(None, "fsdp")
    custom = (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert shd.logical_to_mesh_axes(("embed", "mlp"), custom, mesh=mesh) == P(None, ("fsdp", "tensor"))


# -- sharded train state ---------------------------------------------------------------------------

def _shard_shape(x):
    return x.addressable_shards[0].data.shape


def test_params_and_optimizer_state_created_sharded_fsdp_and_tensor():
    mesh = mesh_of(data=1, fsdp=4, tensor=2)
    ts = st.create_train_state(MLP, optax.adamw(1e-3), mesh, rng=0)
    up, down = ts.params["up"]["kernel"], ts.params["down"]["kernel"]
    assert up.shape == (8, 16) and up.sharding.spec == P("fsdp", "tensor") and _shard_shape(up) == (2, 8)
    assert down.sharding.spec == P("tensor", "fsdp") and _shard_shape(down) == (8, 1)
    assert ts.params["up"]["bias"].sharding.spec == P()
    mu = ts.opt_state[0].mu
    assert mu["up"]["kernel"].sharding == up.sharding and mu["down"]["kernel"].sharding == down.sharding
    assert ts.opt_state[0].count.sharding.spec == P() and ts.step.sharding.spec == P()
    assert int(ts.step) == 0 and ts.rng.shape == (2,)


def test_params_sharded_fsdp_only_rules():
    mesh = mesh_of(fsdp=-1)
    fsdp_only = (("embed", "fsdp"), ("mlp", None))
    ts = st.create_train_state(MLP, optax.sgd(0.1), mesh, fsdp_only, rng=0)
    up = ts.params["up"]["kernel"]
    assert up.sharding.spec == P("fsdp", None) and _shard_shape(up) == (1, 16)


def test_init_values_do_not_depend_on_mesh():
    a = st.create_train_state(MLP, optax.sgd(0.1), mesh_of(data=2, fsdp=2, tensor=2), rng=3)
    b = st.create_train_state(MLP, optax.sgd(0.1), shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), rng=3)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


# -- batches ---------------------------------------------------------------------------------------

def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    batch = data(8)
    g = shd.shard_batch(batch, mesh)
    assert g["x"].sharding.spec == P(("data", "fsdp"))
    assert {_shard_shape(g["x"])} == {(2, 8)}
    np.testing.assert_array_equal(np.asarray(g["x"]), batch["x"])


def test_shard_batch_rejects_indivisible_batch():
    with pytest.raises(ValueError, match=r"global batch 6 .* not divisible by the data-parallel size 4"):
        shd.shard_batch(data(6), mesh_of(data=2, fsdp=2, tensor=2))


# -- train step ------------------------------------------------------------------------------------

def _run(mesh, steps=3, accum_steps=1, tx=None, batch_fn=data):
    tx = tx or optax.adamw(1e-2, weight_decay=0.1)
    ts = st.create_train_state(MLP, tx, mesh, rng=0)
    step = st.make_train_step(mse_loss, mesh, st.state_sharding(ts), accum_steps=accum_steps)
    history = []
    for i in range(steps):
        ts, m = step(ts, shd.shard_batch(batch_fn(8, seed=i), mesh))
        history.append(float(m["loss"]))
    return ts, history


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    sharded, loss_a = _run(mesh_of(data=2, fsdp=2, tensor=2))
    single, loss_b = _run(shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert int(sharded.step) == 3
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                 sharded.params, single.params)
    # Training moved the parameters (the comparison is not between two untouched inits).
    init = st.create_train_state(MLP, optax.sgd(0.1), mesh_of(data=-1), rng=0)
    assert not np.allclose(np.asarray(init.params["up"]["kernel"]), np.asarray(sharded.params["up"]["kernel"]))


def test_gradient_accumulation_equals_full_batch():
    mesh = mesh_of(data=2, fsdp=1, tensor=-1)
    full, loss_full = _run(mesh, steps=2, accum_steps=1, tx=optax.sgd(0.1))
    accum, loss_accum = _run(mesh, steps=2, accum_steps=4, tx=optax.sgd(0.1))
    np.testing.assert_allclose(loss_full, loss_accum, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                 full.params, accum.params)


def test_accumulation_rejects_indivisible_batch():
    mesh = mesh_of(data=-1)
    ts = st.create_train_state(MLP, optax.sgd(0.1), mesh, rng=0)
    step = st.make_train_step(mse_loss, mesh, st.state_sharding(ts), accum_steps=3)
    with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
        step(ts, shd.shard_batch(data(8), mesh))


def test_nonfinite_step_is_reported_and_skipped():
    mesh = mesh_of(data=-1)
    ts = st.create_train_state(MLP, optax.adam(1e-2), mesh, rng=0)
    before = jax.tree.map(np.asarray, ts.params)
    step = st.make_train_step(mse_loss, mesh, st.state_sharding(ts))
    bad = data(8)
    bad["y"][3, 1] = np.nan
    ts, m = step(ts, shd.shard_batch(bad, mesh))
    assert float(m["nonfinite"]) == 1.0 and not np.isfinite(float(m["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ts.params, before)
    assert np.isfinite(np.asarray(ts.opt_state[0].mu["up"]["kernel"])).all()
    ts, m = step(ts, shd.shard_batch(data(8), mesh))
    assert float(m["nonfinite"]) == 0.0 and int(ts.step) == 2


def test_loss_fn_receives_per_step_rng():
    mesh = mesh_of(data=-1)
    ts = st.create_train_state(MLP, optax.sgd(0.0), mesh, rng=0)

    def noise_loss(model, batch, rng):
        loss, m = mse_loss(model, batch, rng)
        return loss, {**m, "u": jax.random.uniform(rng)}

    step = st.make_train_step(noise_loss, mesh, st.state_sharding(ts))
    us = []
    for _ in range(2):
        ts, m = step(ts, shd.shard_batch(data(8), mesh))
        us.append(float(m["u"]))
    expected = [float(jax.random.uniform(jax.random.fold_in(ts.rng, i))) for i in range(2)]
    np.testing.assert_allclose(us, expected, rtol=1e-6)
    assert us[0] != us[1]


class DropoutMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, kernel_init=_part(("embed", "mlp")), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.up(x))


def test_model_state_updates_are_kept_between_steps():
    # Dropout's nnx.Rngs stream lives in model_state; its count must advance or every step reuses one mask.
    mesh = mesh_of(data=-1)
    ts = st.create_train_state(DropoutMLP, optax.sgd(0.0), mesh, rng=0)
    step = st.make_train_step(lambda m, b, r: (jnp.mean(m(b["x"]) ** 2), {}), mesh, st.state_sharding(ts))
    losses = []
    for _ in range(3):
        ts, m = step(ts, shd.shard_batch(data(8), mesh))
        losses.append(float(m["loss"]))
    assert int(ts.model_state["drop"]["rngs"]["count"]) == 3
    assert len(set(losses)) == 3  # same params (lr 0) and batch: only the dropout masks differ


def test_train_state_from_existing_model_and_frozen_teacher_as_extra():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    with nnx.use_eager_sharding(False):
        student, teacher = MLP(nnx.Rngs(1)), MLP(nnx.Rngs(2))
    ts = st.train_state_from_model(student, optax.adam(1e-2), mesh, rng=0)
    up = ts.params["up"]["kernel"]
    assert up.sharding.spec == P("fsdp", "tensor") and _shard_shape(up) == (4, 8)
    np.testing.assert_array_equal(np.asarray(up), np.asarray(student.up.kernel[...]))
    assert ts.opt_state[0].mu["up"]["kernel"].sharding == up.sharding

    t_graph, t_params, t_rest = st.shard_model(teacher, mesh)
    assert t_params["down"]["kernel"].sharding.spec == P("tensor", "fsdp")

    def distill(model, batch, rng, teacher_params):
        target = nnx.merge(t_graph, teacher_params, t_rest)(batch["x"])
        loss = jnp.mean((model(batch["x"]) - target) ** 2)
        return loss, {}

    t_shardings, _ = st.model_shardings(teacher, mesh)
    step = st.make_train_step(distill, mesh, st.state_sharding(ts), extra_shardings=t_shardings)
    batch = data(8)
    expected = float(jnp.mean((student(batch["x"]) - teacher(batch["x"])) ** 2))
    ts, m = step(ts, shd.shard_batch(batch, mesh), t_params)
    np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
    ts, _ = step(ts, shd.shard_batch(batch, mesh), t_params)  # teacher params not donated: still usable
    np.testing.assert_array_equal(np.asarray(t_params["up"]["kernel"]), np.asarray(teacher.up.kernel[...]))
    assert not np.allclose(np.asarray(ts.params["up"]["kernel"]), np.asarray(student.up.kernel[...]))


# -- optimizer and config helpers -------------------------------------------------------------------

def test_optimizer_schedule_from_config():
    cfg = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=4, total_steps=20, end_lr_ratio=0.1))
    sched = st.schedule_from_config(cfg)
    np.testing.assert_allclose([sched(0), sched(2), sched(4), sched(20)], [0.0, 5e-3, 1e-2, 1e-3], rtol=1e-5)
    assert 1e-3 < sched(12) < 1e-2


def test_optimizer_decays_matrices_only():
    cfg = ml_collections.ConfigDict(dict(learning_rate=1.0, schedule="constant", weight_decay=0.5))
    tx = st.optimizer_from_config(cfg)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # Zero gradient: only decoupled weight decay moves w (-lr * wd * w); b is not decayed.
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["b"], np.zeros(2))


def test_optimizer_clips_global_norm():
    cfg = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0, schedule="constant", grad_clip=1.0))
    tx = st.optimizer_from_config(cfg)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    big = {"w": 30.0 * jnp.ones((2, 2)), "b": 40.0 * jnp.ones((2,))}
    updates, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(optax.global_norm(updates), 1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["b"][0] / updates["w"][0, 0], 40.0 / 30.0, rtol=1e-6)


@pytest.mark.parametrize("fields,needle", [
    (dict(learning_rate=-1.0, total_steps=10), "optim.learning_rate"),
    (dict(learning_rate=1e-3, warmup_steps=10, total_steps=5), "optim.total_steps"),
    (dict(learning_rate=1e-3, total_steps=10, name="lion"), "optim.name"),
    (dict(warmup_steps=1, total_steps=10), "optim.learning_rate` is missing"),
])
def test_optimizer_config_errors_name_the_field(fields, needle):
    with pytest.raises(kcfg.ConfigError) as err:
        st.optimizer_from_config(ml_collections.ConfigDict(fields))
    assert needle in str(err.value)


def test_require_and_config_diff():
    cfg = ml_collections.ConfigDict(dict(rl=dict(group_size=4, beta=0.1)))
    assert kcfg.require(cfg, "rl.group_size", lambda v: v > 1, "use a group of at least 2") == 4
    with pytest.raises(kcfg.ConfigError, match=r"`rl.beta` = 0.1 is invalid: use beta >= 1"):
        kcfg.require(cfg, "rl.beta", lambda v: v >= 1, "use beta >= 1")
    with pytest.raises(kcfg.ConfigError, match=r"`rl.kl` is missing"):
        kcfg.require(cfg, "rl.kl", True, "set it")
    other = ml_collections.ConfigDict(dict(rl=dict(group_size=8, beta=0.1, extra=(1, 2))))
    assert kcfg.config_diff(cfg, other) == {"rl.extra": ("<absent>", [1, 2]), "rl.group_size": (4, 8)}


def test_initialize_distributed_is_noop_for_one_process(monkeypatch):
    monkeypatch.delenv(shd.ENV_NUM_PROCESSES, raising=False)
    assert shd.initialize_distributed_from_env() == (0, 1)


def test_reference_in_its_own_tensor_parallel_layout():
    """`rl.reference_sharding = "tensor"`: the reference's copy of the policy params is laid out
    tensor-parallel (embed replicated, output features over fsdp × tensor), values unchanged; a bad
    layout name is a config error naming the field."""
    from kljax.train import rl, setup as setup_lib
    cfg = kcfg.rl_base_config(dict(name="grpo"))
    cfg.task = ml_collections.ConfigDict(dict(name="arithmetic", data_dir=""))
    cfg.model.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    cfg.mesh.update(data=2, fsdp=4)
    task = setup_lib.build_task(cfg)
    mesh = setup_lib.build_mesh(cfg)
    ts = setup_lib.create_state(cfg, mesh, task)
    copy_fsdp = rl.reference_layout(cfg, ts, mesh)(ts.params)
    cfg.rl.reference_sharding = "tensor"
    copy_tp = rl.reference_layout(cfg, ts, mesh)(ts.params)

    def spec(params, name):
        return next(tuple(x.sharding.spec) for p, x in jax.tree_util.tree_leaves_with_path(params)
                    if name in jax.tree_util.keystr(p))
    assert spec(copy_tp, "w_gate") == (None, ("fsdp", "tensor"))
    assert spec(copy_fsdp, "w_gate") == spec(ts.params, "w_gate") and spec(copy_fsdp, "w_gate")[0] == "fsdp"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), copy_tp, ts.params)
    cfg.rl.reference_sharding = "megatron"
    with pytest.raises(kcfg.ConfigError, match=r"rl.reference_sharding.*fsdp.*tensor"):
        shd.layout_rules(cfg, "rl.reference_sharding")
