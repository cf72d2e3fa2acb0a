"""Metrics: one JSON line per logged step in `workdir/metrics.jsonl`, TensorBoard events in
`workdir/tensorboard`, a tqdm progress bar, and a guard that stops a run on NaN/inf metrics.

Resume: `Writer(workdir, resume_step=s)` keeps the lines with step <= s and moves the lines with
step > s (written after the restored checkpoint, about to be recomputed) to
`metrics.discarded.jsonl`, so `metrics.jsonl` has each step once and nothing is lost.
Only process 0 writes; other processes get a no-op writer.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
DISCARDED_FILE = "metrics.discarded.jsonl"


class NonFiniteMetricError(FloatingPointError):
    """A metric became NaN or inf; the message names the step, the metric and the last good checkpoint."""


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars (jax/numpy arrays of size 1, numbers) as Python floats/ints; other values dropped."""
    out = {}
    for k, v in jax.device_get(dict(metrics)).items():
        a = np.asarray(v)
        if a.size != 1 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            continue
        x = a.reshape(()).item()
        out[k] = float(x) if isinstance(x, float) else x
    return out


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of `workdir/metrics.jsonl` (a truncated last line from a crash is skipped)."""
    path = os.path.join(workdir, METRICS_FILE)
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _truncate_after(workdir: str, resume_step: int) -> None:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep, drop = [], []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            drop.append(line if line.endswith("\n") else line + "\n")
            continue
        (keep if int(rec.get("step", -1)) <= resume_step else drop).append(line)
    if not drop:
        return
    with open(os.path.join(workdir, DISCARDED_FILE), "a") as f:
        f.writelines(drop)
        f.flush()
        os.fsync(f.fileno())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)  # atomic: metrics.jsonl is either the old or the new file, never partial


class Writer:
    """Append-only metrics writer for one run (JSONL + TensorBoard).

    `resume_step`: the step of the restored checkpoint (None for a fresh run); records beyond it
    are moved to `metrics.discarded.jsonl` and TensorBoard events beyond it are purged.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True):
        self.workdir = workdir
        self.active = jax.process_index() == 0
        self._tb = None
        self._file = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
            _truncate_after(workdir, int(resume_step))
        self._file = open(os.path.join(workdir, METRICS_FILE), "a")
        if tensorboard:
            purge = None if resume_step is None else int(resume_step) + 1
            self._tb = TensorBoardEvents(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Log scalar `metrics` at `step` (one JSON line, flushed); returns the Python values."""
        values = to_python(metrics)
        if not self.active:
            return values
        record = {"step": int(step), "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalars(int(step), values)
        return values

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; every file is closed even when a flush fails (the first error is raised)."""
        f, tb, self._file, self._tb = self._file, self._tb, None, None
        try:
            if f is not None:
                try:
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    f.close()
        finally:
            if tb is not None:
                tb.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardEvents:
    """TensorBoard scalar events written synchronously by the calling thread.

    tensorboardX's `SummaryWriter` writes from a background thread: when that thread dies (e.g. the
    disk is full) its bounded queue fills and the training loop blocks forever in `add_scalar`.
    Here a write error (`OSError`, e.g. ENOSPC, naming the file) is raised in the loop itself.
    `purge_step` marks a restart as `SummaryWriter(purge_step=...)` does, so TensorBoard hides the
    events of the steps after the restored checkpoint.
    """

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        self._Event = Event
        os.makedirs(logdir, exist_ok=True)
        self._w = EventsWriter(os.path.join(logdir, "events"))
        self.path = self._w._file_name
        if purge_step is not None:
            self._w.write_event(Event(step=int(purge_step), wall_time=time.time(),
                                      session_log=SessionLog(status=SessionLog.START)))
        self._flush()

    def _flush(self, sync: bool = True) -> None:
        try:
            if sync:
                self._w.flush()  # flush + fsync
            else:
                self._w._py_recordio_writer._writer.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, e.filename or self.path) from e

    def add_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        from tensorboardX.summary import scalar
        now = time.time()
        for k, v in values.items():
            self._w.write_event(self._Event(summary=scalar(k, v), step=int(step), wall_time=now))
        self._flush(sync=False)

    def flush(self) -> None:
        self._flush()

    def close(self) -> None:
        try:
            self._flush()
        finally:
            try:
                self._w._py_recordio_writer.close()
            except OSError:
                pass


DEFAULT_BAR_KEYS = ("loss", "reward", "kl", "entropy", "accuracy")


class ProgressBar:
    """tqdm bar over steps showing a few metrics (`keys` present in the metrics); silent off process 0."""

    def __init__(self, total: int, initial: int = 0, keys: Iterable[str] = DEFAULT_BAR_KEYS, **tqdm_kwargs):
        from tqdm.auto import tqdm
        self.keys = tuple(keys)
        self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True,
                         disable=jax.process_index() != 0 or tqdm_kwargs.pop("disable", False), **tqdm_kwargs)
        self._step = initial

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance the bar to `step` and show the chosen metrics."""
        if metrics:
            values = to_python({k: v for k, v in metrics.items() if k in self.keys})
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self._bar.update(int(step) - self._step)
        self._step = int(step)

    def close(self) -> None:
        self._bar.close()


def check_finite(metrics: Mapping[str, Any], step: int, last_checkpoint: int | None = None,
                 workdir: str | None = None) -> None:
    """Raise `NonFiniteMetricError` if any scalar metric is NaN or inf.

    The message names the step, the offending metric(s) and the last good checkpoint (the step to
    resume from; restarting the same command resumes there automatically).
    """
    values = to_python(metrics)
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return
    where = f" in {workdir}" if workdir else ""
    ckpt = (f"the last good checkpoint is step {last_checkpoint}{where}; rerunning resumes there"
            if last_checkpoint is not None else "there is no checkpoint yet; the run must restart from scratch")
    raise NonFiniteMetricError(
        f"non-finite metric(s) at step {int(step)}: {', '.join(f'{k}={v}' for k, v in sorted(bad.items()))}; {ckpt}. "
        "Lower the learning rate, enable optim.grad_clip, or check the inputs of this step.")
