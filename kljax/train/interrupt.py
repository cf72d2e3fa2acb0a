"""Stop a run cleanly on SIGTERM (preemption of a TPU VM / spot node) or SIGINT (Ctrl-C).

`StopRequest` installs handlers that only set a flag; `run_loop` asks `should_stop(step)` at each
step boundary, saves a checkpoint, and raises `Interrupted`; `kljax.main` exits with 143 (SIGTERM)
or 130 (SIGINT). A second Ctrl-C interrupts at once (the default handler is back after the first).

With several processes every process must stop at the same step (the checkpoint is a collective):
JAX's preemption service (`jax.distributed.initialize`) catches SIGTERM itself and
`multihost_utils.reached_preemption_sync_point(step)` is true on every process at the same step;
a signal caught by our handler on one process is shared through a one-integer all-gather.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class Interrupted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, total: int, directory: str):
        self.signum, self.step = int(signum), int(step)
        super().__init__(
            f"stopped by {SIGNAL_NAMES.get(signum, f'signal {signum}')} at step {step} of {total}; checkpoint "
            f"saved in {directory}/{step}. Rerun the same command to resume from it.")


class StopRequest:
    """Context manager: SIGTERM/SIGINT set `signum` instead of killing the process (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        del frame
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C kills at once
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError, TypeError):
                pass
        self._old = {}

    def should_stop(self, step: int) -> bool:
        """Whether every process should checkpoint and stop after `step` (a collective with >1 process)."""
        if jax.process_count() == 1:
            return self.signum is not None
        from jax.experimental import multihost_utils
        try:
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.signum = self.signum or signal.SIGTERM
        except Exception:  # noqa: BLE001 (no preemption service: rely on our own handlers)
            pass
        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        agreed = int(np.max(flags))
        if agreed:
            self.signum = self.signum or agreed
        return bool(agreed)
