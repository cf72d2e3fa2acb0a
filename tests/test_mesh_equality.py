"""Same numbers on any mesh: GRPO, RPG-UFKL, on-policy JSD distillation, one Q♯ round with its guided
evaluation, and DPO give the same loss at every step, the same final parameters and the same final
evaluation on 1 device, on one process with 8 devices over the meshes (data, fsdp, tensor) = (8,1,1),
(2,4,1), (2,2,2), and on 2 processes × 4 devices (`launch/local_multiprocess.py`); the parameter bytes
held per device shrink with the fsdp axis.

All meshes of every loop run in ONE subprocess (8 CPU devices; the 1-device run is a mesh over
`jax.devices()[:1]`), the two-process runs in one launch: compiling dominates, so runs share processes.
Run as a script (`python tests/test_mesh_equality.py OUTDIR single|multi`), this file is that worker.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPS = ("grpo", "rpg_ufkl", "jsd", "qsharp", "dpo")
MESHES = {"1": dict(data=1, fsdp=1, tensor=1), "8x1x1": dict(data=8, fsdp=1, tensor=1),
          "2x4x1": dict(data=2, fsdp=4, tensor=1), "2x2x2": dict(data=2, fsdp=2, tensor=2)}
MULTI_MESH = "2x2x2"  # the mesh of the 2-process run
# Every loop runs on 1 device, on (2,2,2) (all three axes at once) and on 2 processes; the pure data and
# the fsdp-heavy meshes run for GRPO and JSD only, as each run costs tens of seconds of compilation on
# CPU. KLJAX_MESH_EQUALITY=all runs every loop on every mesh (the full matrix).
FULL = os.environ.get("KLJAX_MESH_EQUALITY", "") == "all"


def meshes_of(loop):
    return list(MESHES) if FULL or loop in ("grpo", "jsd") else ["1", MULTI_MESH]


def _exp(spec):
    from kljax.train import common
    return common.load_config_file(os.path.join(REPO, "experiments", spec))


def _tiny(c, steps=2):
    c.total_steps, c.log_every, c.eval_every = steps, 1, 0
    c.checkpoint.every, c.checkpoint.async_save = 100, False
    c.eval.num_examples, c.eval.batch_size = 8, 8
    c.optim.warmup_steps = 0  # the first update already moves the parameters
    if "pass_k" in c.eval:
        c.eval.pass_k = 0
    return c


def configs(outdir):
    """The reference runs and the five loops' configs (tiny models, 2 steps; global batches of 8)."""
    data = os.path.join(outdir, "data")
    refs = {"arith": _tiny(_exp("arithmetic.py:pretrain,smoke")), "star": _tiny(_exp("star_graph.py:pretrain,smoke"))}
    loops = {}
    for name in ("grpo", "rpg_ufkl"):  # the format reward varies from the start: a real update
        loops[name] = _tiny(_exp(f"arithmetic.py:{name},smoke"))
        loops[name].init_from = os.path.join(outdir, "ref_arith")
        loops[name].rl.prompts_per_step, loops[name].rl.group_size, loops[name].rl.minibatch_size = 4, 2, 8
    loops["jsd"] = _tiny(_exp("distill.py:jsd,onpolicy,smoke"))
    star_task = refs["star"].task
    q = _tiny(_exp("star_graph_qsharp.py:qsharp,smoke"))
    q.qsharp.rounds, q.qsharp.critic_steps, q.qsharp.rollouts_per_round = 1, 2, 8
    q.qsharp.guidances = ("qsharp",)  # CD guidance is the same code path with another formula
    loops["qsharp"] = q
    d = _tiny(_exp("star_graph_qsharp.py:dpo,smoke"))
    d.preference.num_pairs, d.preference.max_tries = 16, 2
    loops["dpo"] = d
    for c in (q, d):
        c.task = star_task
        c.init_from = os.path.join(outdir, "ref_star")
    for c in list(refs.values()) + list(loops.values()):
        c.task.data_dir = data
    return refs, loops


def _run(cfg, workdir, mesh_cfg, one_device=False, final_eval=False):
    """Validate and run `cfg` on `mesh_cfg`; write the final params (process 0) and the parameter bytes
    held by one device. Only Q♯ keeps its final evaluation (`final_eval`): the others' evaluations are
    covered elsewhere and each costs a compilation per mesh."""
    import jax
    from jax.experimental import multihost_utils
    from kljax.train import common, driver, setup, sharding as shd

    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.update(mesh_cfg)
    # Loops call `setup.build_mesh` and `driver.run_loop` through their modules: swap them for this run.
    setup.build_mesh = (lambda c: shd.make_mesh(c.mesh, jax.devices()[:1])) if one_device else _ORIGINAL["mesh"]
    final = {}

    def run_loop(cfg, workdir, *, state, step_fn, eval_fn=None, **kw):
        def step(s, batch):
            s, m = step_fn(s, batch)
            final["state"] = s
            return s, m
        return _ORIGINAL["run_loop"](cfg, workdir, state=state, step_fn=step, eval_fn=eval_fn if final_eval else None,
                                     **kw)

    driver.run_loop = run_loop
    common.validate(cfg)
    common.loop_module(cfg).run(cfg, workdir)
    st = final["state"]
    params = (st.train if hasattr(st, "train") else st).params
    first = setup.build_mesh(cfg).devices.flat[0]
    held = sum(s.data.nbytes for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards
               if s.device == first)
    params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(workdir, "final_params.npz"), **flat)
        with open(os.path.join(workdir, "bytes_per_device.json"), "w") as f:
            json.dump({"bytes": int(held)}, f)


_ORIGINAL = {}


def worker(outdir, mode):
    import time
    from kljax.train import driver, setup, sharding as shd
    shd.initialize_distributed_from_env()
    _ORIGINAL.update(mesh=setup.build_mesh, run_loop=driver.run_loop)
    refs, loops = configs(outdir)
    runs = []
    if mode == "single":
        runs += [(c, f"ref_{name}", "1") for name, c in refs.items()]
        runs += [(c, f"{loop}.{m}", m) for loop, c in loops.items() for m in meshes_of(loop)]
    else:
        runs += [(c, f"{loop}.2proc", MULTI_MESH) for loop, c in loops.items()]
    for c, name, m in runs:
        t0 = time.time()
        _run(c, os.path.join(outdir, name), MESHES[m], one_device=m == "1", final_eval=c.loop == "qsharp")
        print(f"mesh-equality run {name}: {time.time() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_equality")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO)
    one = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), "single"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    two = subprocess.run([sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "--num_processes",
                          "2", "--devices_per_process", "4", "--timeout", "600", "--log_dir", str(out / "logs"), "--",
                          os.path.abspath(__file__), str(out), "multi"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=700)
    logs = "".join(open(out / "logs" / f"process_{i}.log").read()[-3000:] for i in range(2))
    assert two.returncode == 0, logs + two.stderr
    return out


def _metrics(workdir):
    """{(step, name): value} of every training metric but wall-clock times."""
    from kljax.train.metrics import read_metrics
    return {(r["step"], k): v for r in read_metrics(str(workdir)) if "loss" in r for k, v in r.items()
            if k not in ("step", "time") and not k.startswith("time/")}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("loop", LOOPS)
def test_same_losses_params_and_evaluation_on_every_mesh(runs, loop):
    base = runs / f"{loop}.1"
    want = _metrics(base)
    assert sorted({s for s, _ in want}) == [1, 2] and (1, "loss") in want
    want_params = dict(np.load(base / "final_params.npz"))
    want_eval = {k: v for k, v in json.load(open(base / "eval.json")).items() if k.startswith("eval/")}
    init = {"grpo": "ref_arith", "rpg_ufkl": "ref_arith", "dpo": "ref_star"}.get(loop)
    if init:  # training moved the parameters: the comparison is not between untouched copies
        start = dict(np.load(runs / init / "final_params.npz"))
        assert max(np.abs(start[k] - want_params[k]).max() for k in want_params) > 1e-4
    if loop == "qsharp":
        assert "eval/qsharp/eta=0.1/kl" in want_eval and "eval/ref/accuracy" in want_eval
    for name in meshes_of(loop)[1:] + ["2proc"]:
        run = runs / f"{loop}.{name}"
        got = _metrics(run)
        assert got.keys() == want.keys(), name
        for k in sorted(want):
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=f"{loop} {k} on {name}")
        params = dict(np.load(run / "final_params.npz"))
        assert params.keys() == want_params.keys()
        for k in params:
            np.testing.assert_allclose(params[k], want_params[k], rtol=1e-4, atol=2e-6, err_msg=f"{loop} {k} {name}")
        ev = json.load(open(run / "eval.json"))
        for k, v in want_eval.items():
            np.testing.assert_allclose(ev[k], v, rtol=1e-4, atol=1e-6, err_msg=f"{loop} {k} on {name}")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_parameter_bytes_per_device_shrink_with_fsdp(runs):
    held = {m: json.load(open(runs / f"grpo.{m}" / "bytes_per_device.json"))["bytes"] for m in MESHES}
    assert held["1"] == held["8x1x1"]  # data parallelism alone replicates the parameters
    assert held["2x4x1"] < 0.5 * held["8x1x1"]  # fsdp = 4: a quarter of the sharded matrices
    assert held["2x2x2"] < held["8x1x1"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
