"""RL step time and per-device parameter bytes for one fixed global batch on 1 device, 8 devices in one
process, and 2 processes × 4 devices (CPU devices standing in for chips; gloo between processes).

    python benchmarks/bench_scaling.py [--steps 6] [--workdir /tmp/kljax_bench_scaling]

Runs `kljax.main` with the arithmetic GRPO config (pretrained first by a short SFT run, once) and
reads each run's `time/step_s` metric (median over the steps after the first two, which compile).
Parameter bytes per device are those of the policy under the run's mesh (`fsdp` over all devices),
from the shardings `kljax.train.state.abstract_train_state` computes. On one CPU the simulated devices
share the same cores, so step time measures overhead (collectives, host work), not speed-up. The CPU
time other processes used during each run is reported (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=experiments/arithmetic.py:grpo"
SETTINGS = [("1 device", 1, 1), ("8 devices, 1 process", 1, 8), ("2 processes × 4 devices", 2, 4)]


def _cpu_seconds_all() -> float:
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:8]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def run(args: list[str], processes: int, devices: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds used by other processes meanwhile) of one kljax.main run."""
    env = dict(os.environ, XLA_FLAGS="")
    if processes == 1:
        cmd = [sys.executable, "-m", "kljax.main", f"--host_devices={devices}", *args]
    else:
        cmd = [sys.executable, "launch/local_multiprocess.py", "--num_processes", str(processes),
               "--devices_per_process", str(devices), "--", "-m", "kljax.main", *args]
    cpu0, own0, t0 = _cpu_seconds_all(), _children_cpu(), time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    return wall, max(0.0, (_cpu_seconds_all() - cpu0) - (_children_cpu() - own0))


def step_times(workdir: str) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["time/step_s"] for r in rows if "time/step_s" in r]


def param_bytes_per_device(devices: int) -> int:
    """Largest per-device share of the policy's parameters with fsdp over `devices` devices."""
    import jax
    import numpy as np

    from kljax.models.transformer import TransformerLM
    from kljax.train import common, setup as setup_lib, state
    from kljax.train import sharding as shd
    cfg = common.load_config_file(os.path.join(REPO, "experiments", "arithmetic.py") + ":grpo")
    mesh = shd.make_mesh({"data": 1, "fsdp": devices, "tensor": 1}, jax.devices()[:devices])
    mc = setup_lib.model_config(cfg)
    ts = state.abstract_train_state(lambda rngs: TransformerLM(mc, rngs=rngs),
                                    state.optimizer_from_config(setup_lib.optim_config(cfg)), mesh)
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(ts.params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workdir", default="/tmp/kljax_bench_scaling")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # simulated CPU devices, also in the runs it starts
    pre = os.path.join(a.workdir, "sft")
    if not os.path.exists(os.path.join(pre, "eval.json")):
        run(["--config=experiments/arithmetic.py:pretrain", f"--workdir={pre}", "--config.total_steps=50",
             "--config.eval_every=0", "--config.eval.num_examples=64"], 1, 8)
    rows = []
    for name, procs, devs in SETTINGS:
        wd = os.path.join(a.workdir, f"rl_{procs}x{devs}")
        subprocess.run(["rm", "-rf", wd], check=True)
        wall, foreign = run([CONFIG, f"--workdir={wd}", f"--config.init_from={pre}", f"--config.total_steps={a.steps}",
                             "--config.log_every=1", "--config.eval_every=0", "--config.eval.num_examples=64",
                             "--config.mesh.data=1", "--config.mesh.fsdp=-1"], procs, devs)
        times = step_times(wd)[2:]
        rows.append((name, statistics.median(times), min(times), max(times), param_bytes_per_device(procs * devs),
                     wall, foreign))
    print(f"`python benchmarks/bench_scaling.py --steps {a.steps}` (arithmetic GRPO, 16 prompts × 8, global batch "
          "fixed; mesh fsdp = all devices)\n")
    print("| setting | step (s, median) | min–max | policy params / device | run wall (s) | other processes' CPU (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, med, lo, hi, pb, wall, foreign in rows:
        flag = " (contended)" if foreign > 0.1 * wall else ""
        print(f"| {name} | {med:.3f} | {lo:.3f}–{hi:.3f} | {pb / 1024:.1f} KiB | {wall:.0f} | {foreign:.0f}{flag} |")


if __name__ == "__main__":
    main()
