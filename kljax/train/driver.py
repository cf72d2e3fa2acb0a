"""The step-loop driver: restore, step, fetch metrics at the logging cadence, evaluate, checkpoint,
stop on signals, write eval.json.

Loop driver contract (`run_loop`): the loop builds a *loop state* pytree with a `.step` attribute
(a `TrainState`, or a dataclass with a `train` field when more arrays must be checkpointed, as
RL's `RLState` with a reset reference), a `step_fn(state, batch) -> (state, metrics)` (one jit, or Python around several
jits, as RL's roll-out + updates), an iterator of batches with `get_state`/`set_state` and an
`eval_fn(state) -> dict`. `run_loop` restores, steps, logs, evaluates, checkpoints and writes
`workdir/eval.json`."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax

from kljax.train import checkpoint, interrupt, metrics as metrics_lib


EVAL_FILE = "eval.json"


def checkpoint_manager(cfg: Any, workdir: str) -> checkpoint.Manager:
    """`checkpoint.Manager` for `workdir` from `cfg.checkpoint` (guards `workdir/config.json`)."""
    ck = cfg.get("checkpoint", None) or {}
    return checkpoint.Manager(workdir, cfg, every=int(ck.get("every", 100)), keep=int(ck.get("keep", 3)),
                              best_metric=ck.get("best_metric", None) or None,
                              best_mode=ck.get("best_mode", "max"), async_save=ck.get("async_save", True))


def _step_of(state: Any) -> int:
    return int(jax.device_get(state.step))


def write_eval(workdir: str, results: Mapping[str, Any]) -> None:
    """Write `workdir/eval.json` atomically (process 0)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(metrics_lib.to_python(results) | {k: v for k, v in results.items() if isinstance(v, str)},
                  f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def read_eval(workdir: str) -> dict:
    """`workdir/eval.json` (the final evaluation of a finished run)."""
    with open(os.path.join(workdir, EVAL_FILE)) as f:
        return json.load(f)


def run_loop(cfg: Any, workdir: str, *, state: Any, step_fn: Callable[[Any, Any], tuple[Any, dict]],
             batches: Iterator | None, eval_fn: Callable[[Any], dict] | None = None,
             total_steps: int | None = None, bar_keys=metrics_lib.DEFAULT_BAR_KEYS, desc: str | None = None,
             on_restore: Callable[[Any], Any] | None = None) -> dict:
    """Run `step_fn` from the latest checkpoint in `workdir` to `total_steps`; return the final eval.

    state: the loop state (a pytree with `.step`, e.g. `TrainState` or RL's `RLState`), freshly created;
      it is replaced by the latest checkpoint when `workdir` has one (same config enforced).
    step_fn(state, batch) -> (state, metrics): one training step (metrics: scalars, TRL names).
    batches: iterator (with `get_state`/`set_state` for exact resume; its state is checkpointed) or
      None (step_fn draws its own data from the state's rng).
    eval_fn(state) -> metrics (names like "eval/accuracy"): every `cfg.eval_every` steps, at the end.
    on_restore(state) -> state: hook after a restore (e.g. rebuild non-checkpointed caches).

    Metrics are fetched from the device every `cfg.log_every` steps (and before an eval, a checkpoint,
    a stop and the last step), never by a host sync each step: then NaN/inf in any step since the last
    fetch stops the run with that step, the metric and the last good checkpoint (`NonFiniteMetricError`),
    and the last step's metrics go to metrics.jsonl + TensorBoard (`time/step_s`: mean over the window);
    checkpoints every `cfg.checkpoint.every` steps, at the end, with the eval metrics (best kept).
    Writes `workdir/eval.json` with the final evaluation (plus `step` and `wall_s`).
    """
    total = int(total_steps if total_steps is not None else cfg.total_steps)
    log_every = max(1, int(cfg.get("log_every", 10)))
    eval_every = int(cfg.get("eval_every", 0) or 0)
    os.makedirs(workdir, exist_ok=True)
    mgr = checkpoint_manager(cfg, workdir)
    t0 = time.time()
    stop = interrupt.StopRequest()
    try:
        stored = _finished_results(workdir, mgr, total)
        if stored is not None:  # a finished run: report it, write nothing
            print(f"{workdir}: run already finished (step {total} of {total}); stored results from "
                  f"{os.path.join(workdir, EVAL_FILE)}.", flush=True)
            return stored
        restored = mgr.restore_latest(state)
        resume = None
        if restored is not None:
            state, data_state = restored
            resume = _step_of(state)
            print(f"resumed from step {resume} of {total}, checkpoint {os.path.join(mgr.directory, str(resume))}",
                  flush=True)
            if batches is not None and data_state is not None:
                batches.set_state(data_state)
            if on_restore is not None:
                state = on_restore(state)
        start = _step_of(state)
        best_metric = mgr.best_metric
        # A fresh start moves metrics of an earlier start that never reached a checkpoint aside (step > 0).
        writer = metrics_lib.Writer(workdir, resume_step=0 if resume is None else resume)
        bar = metrics_lib.ProgressBar(total, initial=start, keys=tuple(bar_keys) + ("eval/accuracy",),
                                      desc=desc or os.path.basename(os.path.normpath(workdir)))
        last_eval: dict = {}
        try:
            stop.__enter__()
            step = start
            pending: list[tuple[int, Mapping[str, Any]]] = []  # steps whose metrics are still on device
            window = (time.perf_counter(), start)
            while step < total:
                batch = next(batches) if batches is not None else None
                state, m = step_fn(state, batch)
                step += 1
                pending.append((step, m))
                eval_now = bool(eval_fn is not None and eval_every and step % eval_every == 0 and step < total)
                ckpt_now = step < total and step % mgr.every == 0
                stopping = step < total and stop.should_stop(step)
                if not (eval_now or ckpt_now or stopping or step == total or step % log_every == 0):
                    bar.update(step)  # no host sync: metrics are fetched and checked at the logging cadence
                    continue
                # Every pending step is checked before anything is saved, so a checkpoint never holds NaNs.
                m = _fetch_checked(pending, mgr, workdir)
                now = time.perf_counter()
                m["time/step_s"] = (now - window[0]) / max(1, step - window[1])  # mean over the window
                window = (now, step)
                if eval_now:
                    last_eval = eval_fn(state)
                    m.update(last_eval)
                writer.write(step, m)
                bar.update(step, m)
                if ckpt_now:
                    ev_for_ckpt = last_eval if eval_now and best_metric in last_eval else None
                    mgr.save(step, state, batches.get_state() if batches is not None else None,
                             metrics=ev_for_ckpt if best_metric else None)
                mgr.check()  # a failed background save stops the run
                if stopping:
                    if mgr.latest_step() != step:
                        mgr.save(step, state, batches.get_state() if batches is not None else None, force=True)
                    mgr.wait()
                    raise interrupt.Interrupted(stop.signum, step, total, mgr.directory)
            final = eval_fn(state) if eval_fn is not None else dict(last_eval)
            if final:
                writer.write(total, final)
            if mgr.latest_step() != total:
                ok = best_metric and best_metric in final
                mgr.save(total, state, batches.get_state() if batches is not None else None,
                         metrics=final if ok else None, force=True)
        finally:
            stop.__exit__()
            bar.close()
            writer.close()
    finally:
        mgr.close()
    result = dict(metrics_lib.to_python(final or {}))
    result.update(step=total, wall_s=time.time() - t0)
    write_eval(workdir, result)
    return result


def _fetch_checked(pending: list, mgr: checkpoint.Manager, workdir: str) -> dict:
    """The last pending step's metrics as Python scalars, after checking every pending step for NaN/inf.

    One host transfer for the whole window; the first non-finite step is the one reported.
    """
    values = jax.device_get([dict(m) for _, m in pending])
    for (step, _), m in zip(pending, values):
        metrics_lib.check_finite(m, step, mgr.latest_step(), workdir)
    pending.clear()
    return dict(metrics_lib.to_python(values[-1]))


def _finished_results(workdir: str, mgr: checkpoint.Manager, total: int) -> dict | None:
    """The stored `eval.json` when the run in `workdir` already reached `total` (else None)."""
    if mgr.latest_step() != total or not os.path.exists(os.path.join(workdir, EVAL_FILE)):
        return None
    try:
        stored = read_eval(workdir)
    except (OSError, ValueError):
        return None
    return stored if int(stored.get("step", -1)) == total else None


Interrupted = interrupt.Interrupted

