"""Checkpoint manager: round trip with shardings, exact resume, keep-K + best, config guard."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from kljax.train import checkpoint as ck
from kljax.train import sharding as shd
from kljax.train import state as st


def _part(names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(8, 16, kernel_init=_part(("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(16, 4, kernel_init=_part(("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def noisy_mse(model, batch, rng):
    # Uses the step rng, so an exact resume also needs the rng restored.
    noise = 0.1 * jax.random.normal(rng, batch["y"].shape)
    loss = jnp.mean((model(batch["x"]) - batch["y"] - noise) ** 2)
    return loss, {}


MESH = shd.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
TX = optax.adamw(1e-2, weight_decay=0.1)
CONFIG = ml_collections.ConfigDict(dict(seed=0, total_steps=4, model=dict(width=16), optim=dict(learning_rate=1e-2)))


def new_state(seed=0):
    return st.create_train_state(MLP, TX, MESH, rng=seed)


_STEP = {}


def step_fn(ts):
    if "fn" not in _STEP:  # one compilation shared by the tests
        _STEP["fn"] = st.make_train_step(noisy_mse, MESH, st.state_sharding(ts))
    return _STEP["fn"]


def batch(i):
    r = np.random.default_rng(i)
    return shd.shard_batch({"x": r.normal(size=(8, 8)).astype(np.float32),
                            "y": r.normal(size=(8, 4)).astype(np.float32)}, MESH)


def train(ts, start, stop):
    for i in range(start, stop):
        ts, _ = step_fn(ts)(ts, batch(i))
    return ts


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


@pytest.mark.slow
def test_round_trip_restores_everything_with_shardings(tmp_path):
    ts = train(new_state(), 0, 2)
    expected = jax.tree.map(np.asarray, ts)
    with ck.Manager(str(tmp_path), CONFIG, every=1) as mgr:
        assert mgr.restore_latest(new_state(seed=5)) is None
        assert mgr.save(2, ts, data_state={"next_index": 16, "epoch": 1})
        # The save is asynchronous; the next step donates ts's buffers while it may still be writing.
        ts = train(ts, 2, 3)
    mgr = ck.Manager(str(tmp_path), CONFIG, every=1)
    target = new_state(seed=5)  # different values, same structure and shardings
    restored, data_state = mgr.restore_latest(st.abstract_state(target))
    mgr.close()
    assert data_state == {"next_index": 16, "epoch": 1}
    assert int(restored.step) == 2
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(x), y)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert x.sharding == y.sharding and x.dtype == y.dtype
    assert restored.params["up"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert restored.opt_state[0].mu["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert int(restored.opt_state[0].count) == 2


def test_restore_params_only(tmp_path):
    ts = train(new_state(), 0, 1)
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        mgr.save(1, ts)
    target = new_state(seed=4).params
    with ck.Manager(str(tmp_path), None) as mgr:
        params = mgr.restore_subtree(None, target, "params")
    assert_same(params, ts.params)
    assert params["up"]["kernel"].sharding == target["up"]["kernel"].sharding


def test_resume_continues_exactly(tmp_path):
    straight = train(new_state(), 0, 4)
    first = train(new_state(), 0, 2)
    with ck.Manager(str(tmp_path), CONFIG, every=2) as mgr:
        mgr.save(int(first.step), first, data_state={"next_index": 2})
    with ck.Manager(str(tmp_path), CONFIG, every=2) as mgr:
        resumed, data_state = mgr.restore_latest(new_state(seed=9))
    resumed = train(resumed, data_state["next_index"], 4)
    assert_same(resumed.params, straight.params)
    assert_same(resumed.opt_state, straight.opt_state)


def _tiny_state(v):
    return {"w": jax.device_put(jnp.full((4,), v, jnp.float32), NamedSharding(MESH, P("fsdp")))}


@pytest.mark.parametrize("mode,values,best", [
    ("max", [0.1, 0.9, 0.3, 0.2, 0.4, 0.0], 2),
    ("min", [0.5, 0.9, 0.05, 0.2, 0.4, 0.3], 3),
])
def test_keeps_last_k_and_best(tmp_path, mode, values, best):
    with ck.Manager(str(tmp_path), None, every=1, keep=2, best_metric="acc", best_mode=mode) as mgr:
        for step, v in enumerate(values, start=1):
            mgr.save(step, _tiny_state(step), metrics={"acc": v})
        mgr.wait()
        assert mgr.all_steps() == sorted({best, 5, 6})
        assert mgr.best_step() == best
    restored, _ = ck.Manager(str(tmp_path), None, every=1).restore(best, _tiny_state(0))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, best, np.float32))


def test_save_interval_force_and_existing_step_never_overwritten(tmp_path):
    with ck.Manager(str(tmp_path), None, every=2, keep=10) as mgr:
        started = [mgr.save(s, _tiny_state(s)) for s in range(1, 6)]
        assert started == [False, True, False, True, False]
        assert mgr.save(5, _tiny_state(5), force=True)
        mgr.wait()
        assert mgr.all_steps() == [2, 4, 5]
        with pytest.raises(Exception, match="already exists"):
            mgr.save(4, _tiny_state(99), force=True)
        mgr.wait()
        restored, _ = mgr.restore(4, _tiny_state(0))
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, 4.0, np.float32))


def test_bytes_data_state_round_trip(tmp_path):
    blob = b"\x00grain-state\xff"
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        mgr.save(1, _tiny_state(1), data_state=blob)
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        _, data_state = mgr.restore_latest(_tiny_state(0))
    assert data_state == blob


def test_best_metric_required_in_metrics(tmp_path):
    with ck.Manager(str(tmp_path), None, every=1, best_metric="acc") as mgr:
        with pytest.raises(KeyError, match="best_metric 'acc'"):
            mgr.save(1, _tiny_state(1), metrics={"loss": 1.0})


def test_refuses_workdir_of_a_different_config(tmp_path):
    workdir = str(tmp_path)
    with ck.Manager(workdir, CONFIG, every=1) as mgr:
        mgr.save(1, _tiny_state(1))
    config_bytes = open(os.path.join(workdir, "config.json"), "rb").read()
    assert json.loads(config_bytes)["model"]["width"] == 16
    other = ml_collections.ConfigDict(CONFIG.to_dict())
    other.model.width = 32
    other.optim.learning_rate = 3e-4
    with pytest.raises(ck.ConfigMismatchError) as err:
        ck.Manager(workdir, other)
    msg = str(err.value)
    assert "model.width: 16 (in workdir) != 32 (now)" in msg and "optim.learning_rate" in msg
    assert "total_steps" in msg  # lists what may change
    assert open(os.path.join(workdir, "config.json"), "rb").read() == config_bytes
    with ck.Manager(workdir, CONFIG, every=1) as mgr:
        assert mgr.all_steps() == [1]


def test_allows_extending_total_steps(tmp_path):
    workdir = str(tmp_path)
    ck.Manager(workdir, CONFIG).close()
    longer = ml_collections.ConfigDict(CONFIG.to_dict())
    longer.total_steps = 8
    mgr = ck.Manager(workdir, longer)
    mgr.close()
    assert mgr.config_changes == {"total_steps": (4, 8)}
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 4


def test_checkpoint_settings_from_config(tmp_path):
    cfg = ml_collections.ConfigDict(dict(checkpoint=dict(every=3, keep=1, best_metric="reward", best_mode="max")))
    mgr = ck.Manager(str(tmp_path), cfg)
    mgr.close()
    assert (mgr.every, mgr.keep, mgr.best_metric, mgr.best_mode) == (3, 1, "reward", "max")
    with pytest.raises(ValueError, match="checkpoint.best_mode"):
        ck.Manager(str(tmp_path / "b"), None, best_mode="largest")


def test_interrupted_save_is_ignored_and_earlier_checkpoints_kept(tmp_path):
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        mgr.save(3, _tiny_state(3))
    # What a save killed mid-write leaves: an uncommitted temporary step directory.
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        assert mgr.latest_step() == 3
        restored, _ = mgr.restore_latest(_tiny_state(0))
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, 3.0, np.float32))
        assert mgr.save(4, _tiny_state(4))
    with ck.Manager(str(tmp_path), None, every=1) as mgr:
        assert mgr.all_steps() == [3, 4]
        restored, _ = mgr.restore_latest(_tiny_state(0))
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, 4.0, np.float32))
