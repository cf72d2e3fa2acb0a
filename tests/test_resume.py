"""Kill a training run mid-way, rerun the same command, get the uninterrupted run's params exactly;
a workdir holding a different config is refused and left untouched."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kljax.train import runs as runs_lib, setup as setup_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SG = os.path.join(REPO, "experiments", "star_graph.py")


def _cmd(workdir, data_dir, *extra):
    return [sys.executable, "-m", "kljax.main", f"--config={SG}:pretrain,smoke", f"--workdir={workdir}",
            "--config.total_steps=120", "--config.checkpoint.every=10", "--config.eval_every=0",
            "--config.log_every=1", f"--config.task.data_dir={data_dir}", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu")


def _finished_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _params(workdir):
    cfg = runs_lib.read_config(workdir)
    ts, _ = runs_lib.load_state_from(workdir, setup_lib.build_mesh(cfg))
    return jax.device_get(ts.params), int(ts.step)


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    data_dir = str(tmp_path / "data")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_cmd(full, data_dir), check=True, capture_output=True, env=_env(), cwd=REPO, timeout=600)

    proc = subprocess.Popen(_cmd(killed, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(), cwd=REPO)
    deadline = time.time() + 600
    while not _finished_steps(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = _finished_steps(killed)
    assert steps and steps[-1] < 120, f"the run was not interrupted mid-training (checkpoints {steps})"

    out = subprocess.run(_cmd(killed, data_dir), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (pa, sa), (pb, sb) = _params(full), _params(killed)
    assert sa == sb == 120
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # metrics.jsonl has every step once after the resume
    from kljax.train.metrics import read_metrics
    assert [r["step"] for r in read_metrics(killed) if "loss" in r] == list(range(1, 121))

    # A different config in the same workdir is refused, naming the field; nothing is modified.
    before = {p: os.path.getmtime(os.path.join(killed, p)) for p in ("config.json", "metrics.jsonl", "eval.json")}
    ckpts = _finished_steps(killed)
    bad = subprocess.run(_cmd(killed, data_dir, "--config.optim.learning_rate=0.5"), capture_output=True, text=True,
                         env=_env(), cwd=REPO, timeout=600)
    assert bad.returncode == 2
    assert "optim.learning_rate" in bad.stderr and "different config" in bad.stderr
    assert _finished_steps(killed) == ckpts
    assert before == {p: os.path.getmtime(os.path.join(killed, p)) for p in before}
