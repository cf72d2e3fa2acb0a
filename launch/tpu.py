"""Run `python -m kljax.main` on every worker of a Cloud TPU VM slice.

    python launch/tpu.py --name=kljax-grpo --zone=us-west4-a --accelerator=v5litepod-64 [--create] [--delete] \
        [--dry-run] -- --config=experiments/pod_grpo.py --workdir=gs://BUCKET/runs/grpo [--config.field=value ...]

Steps (each a `gcloud compute tpus tpu-vm` command, printed before it runs; `--dry-run` prints them
all and runs nothing):

1. `--create`: create the slice (`--spot` for a spot slice); otherwise the slice NAME must exist.
2. Copy this checkout (`git archive HEAD`, so only committed files) to every worker and install it
   with the `tpu` extra.
3. Run `python3 -m kljax.main ARGS` on all workers at once (`--worker=all`) with
   `KLJAX_DISTRIBUTED=auto`, so each process calls `jax.distributed.initialize()` and JAX finds the
   slice's other hosts itself. Worker 0's output streams here; every worker also keeps `~/kljax.log`.
4. `--delete`: delete the slice at the end (also when the run failed).

Workdirs and data directories may be `gs://` paths (orbax and tfds read and write them). Rerun the
same command after a preemption: the run resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "kljax-src.tar.gz"
# Worker 0 streams its output; the others only write their log (TPU VM metadata names each worker).
WORKER_ID = ("$(curl -s -H 'Metadata-Flavor: Google' "
             "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)")


def gcloud_tpu(verb: str, args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd + list(extra)


def commands(args: argparse.Namespace, main_args: list[str]) -> dict[str, list[list[str]]]:
    """The commands of each step, in order: {"create": [...], "install": [...], "run": [...], "delete": [...]}."""
    steps: dict[str, list[list[str]]] = {"create": [], "install": [], "run": [], "delete": []}
    if args.create:
        create = gcloud_tpu("create", args, f"--accelerator-type={args.accelerator}", f"--version={args.version}")
        if args.spot:
            create.append("--spot")
        steps["create"].append(create)
    archive = os.path.join(args.staging, ARCHIVE)
    steps["install"] += [
        ["git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=kljax/", "-o", archive, "HEAD"],
        gcloud_tpu("scp", args, archive, f"{args.name}:~/{ARCHIVE}", "--worker=all"),
        gcloud_tpu("ssh", args, "--worker=all", f"--command=rm -rf ~/kljax && tar xzf ~/{ARCHIVE} -C ~ && "
                   "python3 -m pip install -q -e '~/kljax[tpu]'"),
    ]
    run = f"cd ~/kljax && KLJAX_DISTRIBUTED=auto python3 -m kljax.main {shlex.join(main_args)}"
    steps["run"].append(gcloud_tpu(
        "ssh", args, "--worker=all",
        f"--command=if [ \"{WORKER_ID}\" = 0 ]; then {run} 2>&1 | tee ~/kljax.log; else {run} > ~/kljax.log 2>&1; fi"))
    if args.delete:
        steps["delete"].append(gcloud_tpu("delete", args, "--quiet"))
    return steps


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: launch/tpu.py --name=NAME --zone=ZONE [options] -- <kljax.main arguments>")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM (slice) name")
    p.add_argument("--zone", required=True, help="e.g. us-west4-a")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
    p.add_argument("--accelerator", default="v5litepod-64", help="accelerator type for --create")
    p.add_argument("--version", default="v2-alpha-tpuv5-lite", help="TPU VM runtime version for --create")
    p.add_argument("--create", action="store_true", help="create the slice first")
    p.add_argument("--spot", action="store_true", help="with --create: a spot (preemptible) slice")
    p.add_argument("--delete", action="store_true", help="delete the slice at the end")
    p.add_argument("--staging", default="/tmp", help="local folder for the source archive")
    p.add_argument("--dry-run", action="store_true", help="print every command and run none")
    args = p.parse_args(argv[:split])
    main_args = argv[split + 1:]
    if not any(a.startswith("--config") for a in main_args):
        p.error("give kljax.main a --config=... after `--`")
    return args, main_args


def main(argv: list[str] | None = None) -> int:
    args, main_args = parse(sys.argv[1:] if argv is None else argv)
    steps = commands(args, main_args)
    if args.dry_run:
        for cmd in (c for cmds in steps.values() for c in cmds):
            print(shlex.join(cmd))
        return 0
    rc = 0
    try:
        for name in ("create", "install", "run"):
            for cmd in steps[name]:
                print(f"[{name}] {shlex.join(cmd)}", flush=True)
                rc = subprocess.call(cmd)
                if rc:
                    print(f"launch/tpu.py: step {name!r} failed with status {rc}", file=sys.stderr)
                    return rc
    finally:
        for cmd in steps["delete"]:
            print(f"[delete] {shlex.join(cmd)}", flush=True)
            subprocess.call(cmd)
    return rc


if __name__ == "__main__":
    sys.exit(main())
