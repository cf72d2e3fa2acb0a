"""Checkpoints in `workdir/checkpoints` (orbax `CheckpointManager`) and the run's `workdir/config.json`.

A checkpoint holds the whole `TrainState` pytree (params, optimizer state, step, rng, model_state)
and the data-iterator state (JSON). Saves are asynchronous: `save()` returns after the arrays are
copied off the devices and writing continues in the background. A step counts as checkpointed only
after `wait()` (or `close()`, or leaving the `with` block) returns; loops call `close()` on exit,
so a killed-and-resumed run restarts from the last *finished* checkpoint (orbax writes into a
temporary directory and renames it on completion, so a partial write is never restored).

Retention: the last `keep` checkpoints, plus the best one by `best_metric` (from the `metrics`
passed to `save`), are kept; orbax deletes the others. Nothing else is ever deleted or overwritten:
saving a step that already exists raises.

Faults: a failed background save is raised by `check()` (called every step by `run_loop`) as
`SaveFailedError`, so a run never trains on without checkpoints; `restore_latest` skips a latest
checkpoint that cannot be read (emptied `_METADATA`, truncated data file), warns naming the step and
file, restores the previous complete one and moves the unreadable ones to `checkpoints.corrupt/`.

Config guard: the first `Manager` in a workdir writes `config.json`; later ones compare the new
config with it and raise `ConfigMismatchError` naming every differing field unless all differences
match `ALLOWED_CHANGES` (fnmatch patterns on dotted field names). `config.json` keeps the config of
the first start; it is rewritten only when the workdir holds no finished checkpoint (a start that
failed before its first checkpoint cannot be resumed, so a corrected config may start afresh; the old
file is kept as `config.replaced.json`).
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from kljax.config import config_diff, matches_any, to_jsonable

# Fields that may change when a run is resumed: horizon extensions and logging/checkpoint cadence.
# Changing `*.total_steps` also stretches a cosine learning-rate schedule from the resumed step on.
ALLOWED_CHANGES: tuple[str, ...] = (
    "total_steps", "*.total_steps", "num_steps", "*.num_steps",
    "log_every", "*.log_every", "eval_every", "*.eval_every",
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
    "workdir", "*.workdir",
)

CONFIG_FILE = "config.json"
REPLACED_CONFIG_FILE = "config.replaced.json"
CHECKPOINT_DIR = "checkpoints"


class ConfigMismatchError(RuntimeError):
    """The workdir holds a run of a different config; nothing in it was changed."""


class SaveFailedError(RuntimeError):
    """A checkpoint save failed (e.g. disk full); the run stops rather than continue unprotected."""


CORRUPT_DIR = "checkpoints.corrupt"  # unreadable checkpoints are moved here (never deleted)
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding", "data/metadata")


def _unreadable_file(step_dir: str) -> tuple[str, str] | None:
    """(path, reason) of the first metadata file of a checkpoint that is missing, empty or not JSON."""
    for rel in _JSON_FILES:
        path = os.path.join(step_dir, rel)
        if not os.path.exists(path):
            if rel == "state/_METADATA":
                return path, "missing"
            continue
        try:
            with open(path) as f:
                text = f.read()
            if not text.strip():
                return path, "empty"
            json.loads(text)
        except (OSError, ValueError) as e:
            return path, f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    return None


def check_or_write_config(workdir: str, config: Any, allowed: Iterable[str] = ALLOWED_CHANGES) -> dict:
    """Write `workdir/config.json` on first start, else verify the workdir's run has the same config.

    Returns `{field: (old, new)}` of the allowed differences (empty for a fresh or identical run).
    Raises `ConfigMismatchError` listing all disallowed differences; the workdir is left untouched.
    Only process 0 writes.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    new = to_jsonable(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = config_diff(old, new)
        allowed = tuple(allowed)
        bad = {k: v for k, v in diff.items() if not matches_any(k, allowed)}
        if bad and not has_checkpoint(workdir):
            # The earlier start stopped before its first checkpoint (e.g. it failed at step 1): nothing
            # can resume from it, so the corrected command starts afresh. The old config is kept aside.
            if jax.process_index() == 0:
                os.replace(path, os.path.join(workdir, REPLACED_CONFIG_FILE))
                _write_json(path, new)
            print(f"note: {workdir} held a run with another config but no checkpoint; starting afresh with this "
                  f"config (the old one is kept as {REPLACED_CONFIG_FILE}).", flush=True)
            return {}
        if bad:
            lines = "\n".join(f"  {k}: {o!r} (in workdir) != {n!r} (now)" for k, (o, n) in bad.items())
            raise ConfigMismatchError(
                f"workdir {workdir} holds a run with a different config ({path}); differing fields:\n{lines}\n"
                f"Use a new --workdir for a new run, or restore those values to resume this one. Fields that may "
                f"change on resume: {', '.join(allowed)}. Nothing in the workdir was modified.")
        return diff
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _write_json(path, new)
    return {}


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` (or a pipeline stage directly under it) holds a finished checkpoint step."""
    dirs = [os.path.join(workdir, CHECKPOINT_DIR)]
    if os.path.isdir(workdir):
        dirs += [os.path.join(workdir, d, CHECKPOINT_DIR) for d in os.listdir(workdir)]
    return any(os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d)) for d in dirs)


def _encode_data_state(data_state: Any) -> Any:
    # grain's DataLoader iterators return bytes; MapDataset iterators return dicts. JSON needs text.
    if isinstance(data_state, bytes):
        return {"__bytes_b64__": base64.b64encode(data_state).decode("ascii")}
    return data_state


def _decode_data_state(data_state: Any) -> Any:
    if isinstance(data_state, dict) and set(data_state) == {"__bytes_b64__"}:
        return base64.b64decode(data_state["__bytes_b64__"])
    return data_state


def _scalar(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


class Manager:
    """Checkpoints of one run in `workdir/checkpoints`, plus the `workdir/config.json` guard.

    Settings come from keyword arguments, else from `config.checkpoint` (`every`, `keep`,
    `best_metric`, `best_mode`, `async_save`), else defaults: save every 100 steps, keep the last 3,
    no best tracking, asynchronous. `best_mode` is "max" (default) or "min".
    """

    def __init__(self, workdir: str, config: Any = None, *, every: int | None = None, keep: int | None = None,
                 best_metric: str | None = None, best_mode: str | None = None, async_save: bool | None = None,
                 allowed_changes: Iterable[str] = ALLOWED_CHANGES):
        ck = {}
        if config is not None and "checkpoint" in config:
            ck = dict(config.checkpoint)
        pick = lambda value, name, default: value if value is not None else ck.get(name, default)
        self.every = int(pick(every, "every", 100))
        self.keep = int(pick(keep, "keep", 3))
        self.best_metric = pick(best_metric, "best_metric", None)
        self.best_mode = pick(best_mode, "best_mode", "max")
        if self.every < 1:
            raise ValueError(f"checkpoint.every={self.every} must be >= 1.")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1 (the latest checkpoint is always kept).")
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode={self.best_mode!r} must be 'max' or 'min'.")
        self.workdir = os.path.abspath(workdir)
        self.config_changes = check_or_write_config(self.workdir, config, allowed_changes) if config is not None else {}
        policies: list[Any] = [ocm.LatestN(n=self.keep)]
        if self.best_metric:
            metric = self.best_metric
            # BestN sorts ascending and keeps the last n: reverse for "min" so the smallest sorts last.
            policies.append(ocm.BestN(get_metric_fn=lambda m: float(m[metric]), reverse=self.best_mode == "min",
                                      n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # The cadence is decided in `save` (orbax would also save the first step it sees).
            save_interval_steps=1,
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each save's metrics (BestN ranks by them) and answer best_step().
            best_fn=(lambda m: float(m[self.best_metric])) if self.best_metric else None,
            best_mode=self.best_mode,
            enable_async_checkpointing=bool(pick(async_save, "async_save", True)),
            create=True)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    # -- saving ---------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: Any = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Start saving `state` (a pytree of jax arrays) and `data_state` (JSON-able or bytes) at `step`.

        Saves only when `step` is a multiple of `every`, unless `force` (use it for the final step).
        `metrics` (scalars; must include `best_metric` when tracking the best) rank checkpoints.
        Returns whether a save started. Asynchronous: call `wait()` before treating it as durable.
        """
        step = int(step)
        if not force and step % self.every:
            return False
        self.check()
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            raise KeyError(f"checkpoint metrics lack best_metric {self.best_metric!r} (config checkpoint.best_metric); "
                           f"got {sorted(metrics)}.")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave({"data_state": _encode_data_state(data_state)}))
        m = None if metrics is None else {k: _scalar(jax.device_get(v)) for k, v in metrics.items()}
        try:
            return self._mgr.save(step, args=args, metrics=m, force=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise self._failed(e, step) from e

    def _failed(self, e: BaseException, step: int | None = None) -> SaveFailedError:
        last = [s for s in self.all_steps() if s != step]
        where = f"step {step} " if step is not None else ""
        return SaveFailedError(
            f"saving checkpoint {where}in {self.directory} failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the run stopped rather than continue without "
            f"checkpoints. Last complete checkpoint: {('step ' + str(last[-1])) if last else 'none'}. "
            "Fix the cause (e.g. free disk space) and rerun the same command to resume.")

    def check(self) -> None:
        """Raise `SaveFailedError` if an earlier asynchronous save failed (cheap; call every step)."""
        try:
            self._mgr.check_for_errors()
            t = self._mgr._finalize_thread.get()  # orbax keeps the last finalize thread's exception
            if t is not None and not t.is_alive() and t.exception is not None:
                t.join()  # raises the exception once
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 (whatever killed the background save)
            raise self._failed(e) from e

    def wait(self) -> None:
        """Block until every started save is written and committed (`SaveFailedError` if one failed)."""
        try:
            self._mgr.wait_until_finished()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001
            raise self._failed(e) from e

    def close(self) -> None:
        """Wait for pending saves and release the manager (call on every exit path)."""
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restoring ------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending."""
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """Best checkpoint by `best_metric` (None without best tracking or without metrics)."""
        return self._mgr.best_step() if self.best_metric else None

    def restore(self, step: int, target: Any) -> tuple[Any, Any]:
        """(state, data_state) of checkpoint `step`, arrays placed with `target`'s shardings.

        `target` is a train state (or any pytree) of `jax.Array`s or `ShapeDtypeStruct`s with
        `.sharding` (e.g. a freshly created train state, or `state.abstract_state(ts)`); the
        restored tree has its structure, dtypes and shardings.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, "sharding") else x,
            target)
        out = self._mgr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   data=ocp.args.JsonRestore()))
        return out["state"], _decode_data_state(out["data"]["data_state"])

    def restore_subtree(self, step: int | None, target: Any, key: str = "params") -> Any:
        """Only the part `key` (dotted, e.g. "params" or "train.params") of the saved state of `step`
        (None = latest), placed like `target` (a pytree of arrays / `ShapeDtypeStruct`s with shardings).

        For initializing a model, teacher or reference from another run's checkpoint without building
        (or reading) its optimizer state. Raises `FileNotFoundError` when there is no checkpoint.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}.")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if hasattr(x, "sharding") else x,
            target)
        item: Any = abstract
        for part in reversed(key.split(".")):
            item = {part: item}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)))
        node = out["state"]
        for part in key.split("."):
            node = node[part]
        return node

    def restore_latest(self, target: Any) -> tuple[Any, Any] | None:
        """`restore(latest_step(), target)`, or None when the workdir has no finished checkpoint.

        A latest checkpoint that cannot be read (a truncated or emptied file, e.g. after a disk-full
        crash) is skipped with a warning naming its step and file, and the previous complete one is
        restored; the unreadable ones are then moved to `workdir/checkpoints.corrupt/` (kept, not
        deleted) so later saves of those steps are possible. If no checkpoint can be restored, the
        latest one's error is raised and nothing is moved.
        """
        steps = self.all_steps()
        failed: list[tuple[int, str]] = []
        for step in reversed(steps):
            step_dir = os.path.join(self.directory, str(step))
            bad = _unreadable_file(step_dir)
            if bad is not None:
                problem = f"{bad[0]} is {bad[1]}"
            else:
                try:
                    out = self.restore(step, target)
                except Exception as e:  # noqa: BLE001 (tensorstore/orbax raise many kinds)
                    if not failed and step == steps[0]:
                        raise
                    problem = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} (in {step_dir})"
                    if step == steps[0]:
                        raise RuntimeError(f"no checkpoint in {self.directory} can be restored: "
                                           + "; ".join(f"step {s}: {p}" for s, p in failed + [(step, problem)])) from e
                else:
                    self._quarantine([s for s, _ in failed])
                    return out
            print(f"warning: checkpoint step {step} cannot be restored: {problem}; trying the previous one.",
                  flush=True)
            failed.append((step, problem))
        if failed:
            raise RuntimeError(f"no checkpoint in {self.directory} can be restored: "
                               + "; ".join(f"step {s}: {p}" for s, p in failed))
        return None

    def _quarantine(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            dest = os.path.join(self.workdir, CORRUPT_DIR)
            os.makedirs(dest, exist_ok=True)
            for s in steps:
                target = os.path.join(dest, str(s))
                n = 1
                while os.path.exists(target):
                    target = os.path.join(dest, f"{s}.{n}")
                    n += 1
                os.replace(os.path.join(self.directory, str(s)), target)
                print(f"warning: moved unreadable checkpoint step {s} to {target}; resuming from the previous one.",
                      flush=True)
        from jax.experimental import multihost_utils
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("kljax_checkpoint_quarantine")
        self._mgr.reload()
