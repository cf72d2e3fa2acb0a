"""Two local processes × 4 CPU devices (gloo) form one 8-device cluster: data-parallel training with
per-process batches through `shard_batch` gives the parameters of a one-process 8-device run, and a
checkpoint written by the cluster restores with its shardings.

Run as a script (`python tests/test_multiprocess.py OUTDIR`), this file is the worker that
`launch/local_multiprocess.py` starts in each process.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 8


class MLP(nnx.Module):
    def __init__(self, rngs):
        part = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        self.up = nnx.Linear(8, 16, kernel_init=part(("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(16, 4, kernel_init=part(("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def mse(model, batch, rng):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}


def global_batch(step):
    r = np.random.default_rng(100 + step)
    return {"x": r.normal(size=(GLOBAL_BATCH, 8)).astype(np.float32),
            "y": r.normal(size=(GLOBAL_BATCH, 4)).astype(np.float32)}


def train(mesh_cfg):
    """STEPS data-parallel AdamW steps; each process feeds only its own rows of every global batch."""
    from kljax.train import sharding as shd, state as st

    mesh = shd.make_mesh(mesh_cfg)
    ts = st.create_train_state(MLP, optax.adamw(1e-2, weight_decay=0.1), mesh, rng=0)
    step = st.make_train_step(mse, mesh, st.state_sharding(ts))
    n, i = jax.process_count(), jax.process_index()
    rows = GLOBAL_BATCH // n
    for s in range(STEPS):
        full = global_batch(s)
        local = {k: v[i * rows:(i + 1) * rows] for k, v in full.items()}
        batch = shd.shard_batch(local, mesh)
        if s == 0:
            from jax.experimental import multihost_utils
            gathered = multihost_utils.process_allgather(batch["x"], tiled=True)
            np.testing.assert_array_equal(gathered, full["x"])  # rows land in process order
        ts, _ = step(ts, batch)
    return mesh, ts


def worker(outdir):
    from jax.experimental import multihost_utils

    from kljax.train import checkpoint as ck, sharding as shd, state as st

    pid, nproc = shd.initialize_distributed_from_env()
    assert (nproc, jax.device_count(), jax.local_device_count()) == (2, 8, 4), (nproc, jax.devices())
    mesh_cfg = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh, ts = train(mesh_cfg)
    with ck.Manager(os.path.join(outdir, "run"), None, every=1) as mgr:
        mgr.save(int(ts.step), ts, data_state={"process_count": nproc})
    with ck.Manager(os.path.join(outdir, "run"), None, every=1) as mgr:
        fresh = st.create_train_state(MLP, optax.adamw(1e-2, weight_decay=0.1), mesh, rng=1)
        restored, data_state = mgr.restore_latest(fresh)
    assert data_state == {"process_count": 2}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ts)):
        assert a.sharding == b.sharding
    params = multihost_utils.process_allgather(ts.params, tiled=True)
    back = multihost_utils.process_allgather(restored.params, tiled=True)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    if pid == 0:
        flat = {"/".join(str(k.key) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(outdir, "params.npz"), **flat)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "--num_processes", "2",
           "--devices_per_process", "4", "--timeout", "300", "--log_dir", str(tmp_path / "logs"), "--",
           os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    logs = "".join(open(tmp_path / "logs" / f"process_{i}.log").read()[-3000:] for i in range(2))
    assert proc.returncode == 0, logs + proc.stderr
    got = dict(np.load(tmp_path / "params.npz"))

    _, ts = train({"data": 2, "fsdp": 2, "tensor": 2})  # this process: 8 devices, one process
    flat = {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(ts.params)[0]}
    assert sorted(got) == sorted(flat) == ["down/bias", "down/kernel", "up/bias", "up/kernel"]
    for k in flat:
        np.testing.assert_allclose(got[k], flat[k], rtol=1e-5, atol=1e-6, err_msg=k)
    from kljax.train import sharding as shd, state as st
    init = st.create_train_state(MLP, optax.sgd(0.1), shd.make_mesh({"data": -1}), rng=0)
    assert not np.allclose(got["up/kernel"], np.asarray(init.params["up"]["kernel"]))  # training moved it



@pytest.mark.multiprocess
def test_launcher_sets_env_and_stops_the_others_when_one_fails(tmp_path):
    script = ("import os, sys, time, json; e = os.environ; "
              "json.dump({k: e[k] for k in ('KLJAX_COORDINATOR', 'KLJAX_NUM_PROCESSES', 'KLJAX_PROCESS_ID', "
              "'JAX_CPU_COLLECTIVES_IMPLEMENTATION', 'XLA_FLAGS')}, open(sys.argv[1] + e['KLJAX_PROCESS_ID'], 'w')); "
              "sys.exit(3) if e['KLJAX_PROCESS_ID'] == '1' else time.sleep(120)")
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local_multiprocess as lm
    finally:
        sys.path.pop(0)
    rc = lm.launch(["-c", script, str(tmp_path / "env")], num_processes=2, devices_per_process=3, timeout=60,
                   grace=1)
    assert rc == 3  # process 1's status; process 0 (sleeping 120 s) was stopped
    import json
    envs = [json.load(open(tmp_path / f"env{i}")) for i in range(2)]
    assert [e["KLJAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    assert envs[0]["KLJAX_COORDINATOR"] == envs[1]["KLJAX_COORDINATOR"] and envs[0]["KLJAX_NUM_PROCESSES"] == "2"
    assert envs[0]["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert envs[0]["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=3") == 1
    assert "device_count=8" not in envs[0]["XLA_FLAGS"]


def _main(args, env, launcher=False):
    """`kljax.main ARGS` as one process with 8 CPU devices, or as 2 processes x 4 devices (launcher)."""
    if launcher:
        cmd = [sys.executable, "launch/local_multiprocess.py", "--num_processes", "2", "--devices_per_process", "4",
               "--", "-m", "kljax.main", *args]
    else:
        cmd = [sys.executable, "-m", "kljax.main", "--host_devices=8", *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]


def _metric(workdir, key):
    from kljax.train.metrics import read_metrics
    return {r["step"]: r[key] for r in read_metrics(str(workdir)) if key in r}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_main_sft_and_grpo_on_two_processes_match_one_process(tmp_path):
    """The real entry point, not a toy: `kljax.main` started by the launcher on 2 processes × 4 devices
    trains and evaluates exactly like one process with 8 devices: SFT, then GRPO from it (each process
    samples and scores its own prompts; advantages, minibatches and metrics are global)."""
    env = dict(os.environ, XLA_FLAGS="", KLJAX_DATA_DIR=str(tmp_path / "data"))
    sft = "--config=experiments/arithmetic.py:pretrain,smoke"
    _main([sft, f"--workdir={tmp_path / 'sft1'}"], env)
    _main([sft, f"--workdir={tmp_path / 'sft2'}"], env, launcher=True)
    a, b = _metric(tmp_path / "sft1", "loss"), _metric(tmp_path / "sft2", "loss")
    assert a.keys() == b.keys() and len(a) >= 2
    np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=1e-5)
    assert (tmp_path / "sft2" / "eval.json").exists()

    grpo = ["--config=experiments/arithmetic.py:grpo,smoke", f"--config.init_from={tmp_path / 'sft1'}"]
    _main([*grpo, f"--workdir={tmp_path / 'rl1'}"], env)
    _main([*grpo, f"--workdir={tmp_path / 'rl2'}"], env, launcher=True)
    for key in ("loss", "reward", "reward_std", "entropy", "completions/mean_length"):
        a, b = _metric(tmp_path / "rl1", key), _metric(tmp_path / "rl2", key)
        assert a.keys() == b.keys() and len(a) == 3, key
        np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    assert max(_metric(tmp_path / "rl1", "reward_std").values()) > 0  # the format reward varies: a real update
    e1, e2 = (json.load(open(tmp_path / d / "eval.json")) for d in ("rl1", "rl2"))
    for k in ("eval/accuracy", "eval/kl", "eval/reward"):
        np.testing.assert_allclose(e2[k], e1[k], rtol=1e-4, atol=1e-6, err_msg=k)



@pytest.mark.slow
@pytest.mark.multiprocess
def test_main_on_policy_distillation_on_two_processes_matches_one_process(tmp_path):
    """GKD with λ = 1: every batch is the student's own samples, scored by the teacher. Each process
    samples its own prompts under the mesh; losses, KLs and the final evaluation equal one process's."""
    env = dict(os.environ, XLA_FLAGS="", KLJAX_DATA_DIR=str(tmp_path / "data"))
    args = ["--config=experiments/distill.py:fkl,onpolicy,smoke"]
    _main([*args, f"--workdir={tmp_path / 'one'}"], env)
    _main([*args, f"--workdir={tmp_path / 'two'}"], env, launcher=True)
    for key in ("loss", "kl", "data/student_frac"):
        a, b = _metric(tmp_path / "one", key), _metric(tmp_path / "two", key)
        assert a.keys() == b.keys() and len(a) >= 2, key
        np.testing.assert_allclose([b[k] for k in sorted(b)], [a[k] for k in sorted(a)], rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    assert set(_metric(tmp_path / "one", "data/student_frac").values()) == {1.0}
    e1, e2 = (json.load(open(tmp_path / d / "eval.json")) for d in ("one", "two"))
    for k in ("eval/fkl", "eval/rkl", "eval/source_fkl"):
        np.testing.assert_allclose(e2[k], e1[k], rtol=1e-4, atol=1e-6, err_msg=k)

_LOSE_A_PROCESS = """
import os, signal, time
from jax.experimental import multihost_utils
from kljax.train import sharding as shd
pid, _ = shd.initialize_distributed_from_env()
multihost_utils.sync_global_devices("all up")
if pid == 1:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(300)  # process 0 idles: only the cluster's heartbeat check can stop it in time
"""


@pytest.mark.multiprocess
def test_a_killed_process_stops_the_others_and_the_launcher_names_it(tmp_path):
    env = dict(os.environ, KLJAX_HEARTBEAT_TIMEOUT="5")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "--num_processes",
                           "2", "--devices_per_process", "1", "--grace", "60", "--log_dir", str(tmp_path), "--",
                           "-c", _LOSE_A_PROCESS], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 128 + 9, proc.stderr  # the lost process's status, as a shell reports SIGKILL
    assert "process 1 of 2 was killed by SIGKILL" in proc.stderr
    # Process 0 was not stopped by the launcher (SIGTERM, 143) but aborted by JAX, naming the lost task.
    assert "process 0: 134" in proc.stderr, proc.stderr
    log0 = open(tmp_path / "process_0.log").read()
    assert "stopped sending heartbeats" in log0 and "\n1\n" in log0, log0[-2000:]


def test_a_single_process_loop_is_refused_on_several_processes(monkeypatch):
    from kljax.config import ConfigError
    from kljax.train import common

    from kljax.config import base_config

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"`loop` = 'reward_model' runs in one process only.*2 processes.*"
                                          r"--host_devices"):
        common.validate(base_config("reward_model"), check_paths=False)
    replay = common.load_config_file(os.path.join(REPO, "experiments", "distill.py") + ":fkl,adaptive,smoke")
    with pytest.raises(ConfigError, match=r"`distill.data` = 'adaptive'.*one process only"):
        common.validate(replay, check_paths=False)
    dapo = common.load_config_file(os.path.join(REPO, "experiments", "arithmetic.py") + ":dapo,smoke")
    dapo.init_from = str(REPO)  # any path: paths are not checked here
    with pytest.raises(ConfigError, match=r"`rl.dynamic_sampling` = True runs in one process only"):
        common.validate(dapo, check_paths=False)
    for spec in ("arithmetic.py:pretrain,smoke", "arithmetic.py:grpo,smoke", "distill.py:fkl,onpolicy,smoke",
                 "star_graph_qsharp.py:qsharp,smoke", "star_graph_qsharp.py:dpo,smoke"):
        ok = common.load_config_file(os.path.join(REPO, "experiments", spec))  # SFT, RL, GKD, Q♯, DPO: several
        ok.init_from = str(REPO) if ok.loop in ("rl", "qsharp", "preference") else ok.init_from
        common.validate(ok, check_paths=False)


if __name__ == "__main__":
    worker(sys.argv[1])
