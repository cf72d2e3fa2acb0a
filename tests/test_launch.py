"""Pod and cluster launchers: the TPU VM commands (`launch/tpu.py --dry-run`), the SLURM recipe, and the
cluster auto-detection that decides when `jax.distributed.initialize()` runs with no arguments."""
import os
import shlex
import subprocess
import sys

import pytest

from kljax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(*opts):
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu.py"), "--name=pod", "--zone=us-west4-a",
                          *opts, "--dry-run", "--", "--config=experiments/pod_grpo.py", "--workdir=gs://b/runs/g",
                          "--config.rl.group_size=4"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_tpu_launcher_creates_installs_runs_on_every_worker_and_deletes():
    cmds = _dry_run("--create", "--spot", "--delete", "--accelerator=v5litepod-16")
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["create", "git", "scp", "ssh", "ssh", "delete"]
    assert "--accelerator-type=v5litepod-16" in cmds[0] and "--spot" in cmds[0]
    assert all("--zone=us-west4-a" in c and "pod" in c for c in cmds if c[0] == "gcloud")
    assert all("--worker=all" in c for c in cmds[2:5])
    run = next(a for a in cmds[4] if a.startswith("--command="))
    # Every worker runs the same kljax.main command with JAX's cluster auto-detection; worker 0 streams.
    assert run.count("KLJAX_DISTRIBUTED=auto python3 -m kljax.main --config=experiments/pod_grpo.py "
                     "--workdir=gs://b/runs/g --config.rl.group_size=4") == 2
    assert "agent-worker-number" in run and "tee ~/kljax.log" in run
    assert "kljax[tpu]" in next(a for a in cmds[3] if a.startswith("--command="))


def test_tpu_launcher_reuses_an_existing_slice_and_keeps_it_by_default():
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in _dry_run()]
    assert verbs == ["git", "scp", "ssh", "ssh"]


def test_tpu_launcher_needs_a_config_for_kljax_main():
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "tpu.py"), "--name=p", "--zone=z", "--dry-run",
                          "--", "--workdir=x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--config" in out.stderr


def test_slurm_recipe_is_valid_bash_running_kljax_main_on_every_task():
    path = os.path.join(REPO, "launch", "slurm.sbatch")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    assert 'srun --kill-on-bad-exit=1 python -m kljax.main "$@"' in text
    assert "#SBATCH --ntasks-per-node=1" in text


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),
    # libtpu writes this warning into the variable on a machine without a TPU: not a cluster.
    ({"TPU_WORKER_HOSTNAMES": "WARNING: could not determine TPU worker hostnames or IP addresses, please set"}, False),
    ({"KLJAX_DISTRIBUTED": "auto"}, True),
    ({"KLJAX_DISTRIBUTED": "off", "SLURM_NTASKS": "4"}, False),
])
def test_cluster_auto_detection(monkeypatch, env, expected):
    for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "KLJAX_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sharding.cluster_auto_detectable() is expected


def test_heartbeat_timeout_is_checked(monkeypatch):
    monkeypatch.setenv("KLJAX_HEARTBEAT_TIMEOUT", "7")
    assert sharding.heartbeat_timeout_s() == 7
    monkeypatch.setenv("KLJAX_HEARTBEAT_TIMEOUT", "soon")
    with pytest.raises(RuntimeError, match="KLJAX_HEARTBEAT_TIMEOUT='soon'"):
        sharding.heartbeat_timeout_s()


def test_a_host_without_tpu_chips_does_not_start_libtpu():
    # The `aot` extra installs libtpu; on a CPU host JAX would start it (pages of warnings) on every run.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("from kljax.train import sharding; sharding.skip_absent_tpu(); import os, jax; "
            "print(os.environ['JAX_PLATFORMS'], jax.config.jax_platforms, jax.devices()[0].platform)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu", "cpu"]
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "libtpu" not in out.stderr
