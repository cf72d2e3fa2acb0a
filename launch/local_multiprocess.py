"""Start N local processes that form one JAX cluster on CPU, standing in for the hosts of a pod.

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \
        -m kljax.main --config=experiments/<file>.py:smoke --workdir=/tmp/run

Everything after `--` is the argument list of the Python interpreter (`-m module args` or
`script.py args`). Each process gets `KLJAX_COORDINATOR=localhost:PORT`, `KLJAX_NUM_PROCESSES`,
`KLJAX_PROCESS_ID` (read by `kljax.train.sharding.initialize_distributed_from_env()`, which calls
`jax.distributed.initialize`), `JAX_PLATFORMS=cpu`, `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo` and
`XLA_FLAGS=--xla_force_host_platform_device_count=K`. Output of process i goes to the terminal
(or to `--log_dir/process_i.log`). If one process fails, the launcher names it and how it ended; the
others stop by themselves once JAX's heartbeat check declares the peer lost (`KLJAX_HEARTBEAT_TIMEOUT`,
default 20 s) and are stopped after `--grace` seconds otherwise. The exit status is the failed
process's (128 + N for a process killed by signal N).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(
        KLJAX_COORDINATOR=f"localhost:{port}",
        KLJAX_NUM_PROCESSES=str(num_processes),
        KLJAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
    )
    return env


def exit_status(returncode: int) -> int:
    """A child's return code as a shell exit status (killed by signal N -> 128 + N, as bash reports it)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (status {exit_status(returncode)})"
    return f"exited with status {returncode}"


def _stop(procs: list, grace: float) -> None:
    """Give the survivors `grace` seconds to stop on their own (JAX's heartbeat check stops them when a
    peer is lost), then SIGTERM, then SIGKILL 10 s later."""
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(python_args: list[str], num_processes: int = 2, devices_per_process: int = 4, port: int | None = None,
           log_dir: str | None = None, timeout: float | None = None, grace: float = 40.0) -> int:
    """Run `python *python_args` in `num_processes` processes; return 0, or the exit status of the first
    process that failed (a signal N counts as 128 + N), or 124 after `timeout` seconds.

    When a process fails, the launcher says which one and how, waits up to `grace` seconds for the
    others to stop (they do by themselves once JAX notices the lost peer), then stops them.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1.")
    port = port or free_port()
    procs, logs = [], []
    for i in range(num_processes):
        out = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            logs.append(out)
        procs.append(subprocess.Popen([sys.executable, *python_args], stdout=out, stderr=subprocess.STDOUT if out else None,
                                      env=process_env(i, num_processes, devices_per_process, port)))
    deadline = None if timeout is None else time.monotonic() + timeout
    rc, wait = 0, 0.0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process (any() would stop at the first running one)
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                i, code = failed[0]
                where = f" (log: {logs[i].name})" if logs else ""
                print(f"launcher: process {i} of {num_processes} {describe(code)}{where}; stopping the others.",
                      file=sys.stderr, flush=True)
                rc, wait = exit_status(code), grace
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"launcher: timeout after {timeout:g} s; stopping all processes.", file=sys.stderr, flush=True)
                rc = 124
                break
            time.sleep(0.2)
        else:
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
            if failed:
                i, code = failed[0]
                print(f"launcher: process {i} of {num_processes} {describe(code)}.", file=sys.stderr, flush=True)
                rc = exit_status(code)
    finally:
        _stop(procs, wait)
        for f in logs:
            f.close()
    if rc not in (0, 124):
        print("launcher: exit statuses " + ", ".join(f"process {i}: {exit_status(p.returncode)}"
                                                     for i, p in enumerate(procs)), file=sys.stderr, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: local_multiprocess.py [--num_processes N] [--devices_per_process K] [--port P] "
              "[--log_dir DIR] -- <python args>", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description="Start N local JAX processes forming one CPU cluster.")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
    parser.add_argument("--grace", type=float, default=40.0,
                        help="after one process fails, seconds the others get to stop on their own")
    args = parser.parse_args(argv[:split])
    return launch(argv[split + 1:], args.num_processes, args.devices_per_process, args.port, args.log_dir,
                  args.timeout, args.grace)


if __name__ == "__main__":
    sys.exit(main())
