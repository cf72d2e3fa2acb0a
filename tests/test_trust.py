"""Runs a researcher can trust (issue 10): every config mistake is caught before anything is written,
with one line and exit status 2; faults (full disk, failed save, corrupted checkpoint, SIGTERM/SIGINT)
stop the run cleanly and the rerun resumes; a finished run is never changed by a rerun.

The fault tests drive `driver.run_loop` in-process with a two-number state (no model, no compile);
`kljax.main` is called in-process with argv; one subprocess test sends a real SIGTERM.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kljax.train import checkpoint, common, driver, interrupt, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SG = os.path.join(REPO, "experiments", "star_graph.py")


# ----------------------------------------------------------------------------------------------
# kljax.main in-process


def run_main(capsys, *args):
    """`python -m kljax.main *args` in this process: (exit status, stdout, stderr)."""
    from absl import flags
    from kljax import main as km
    flags.FLAGS.unparse_flags()
    code = 0
    try:
        km.run(["kljax.main", *args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pretrained(tmp_path):
    """A directory that looks like a finished run (config.json + a checkpoint step dir)."""
    d = tmp_path / "pre"
    (d / "checkpoints" / "4").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return str(d)


def _grpo(tmp_path, pretrained, *extra):
    return (f"--config={SG}:grpo,smoke", f"--workdir={tmp_path / 'w'}", f"--config.init_from={pretrained}",
            f"--config.task.data_dir={tmp_path / 'data'}", *extra)


@pytest.mark.parametrize("override,needles", [
    ("--config.objective.beta=-0.1", ["objective.beta", "-0.1", "[0.0, inf)"]),
    ("--config.objective.kl_estimator=k5", ["objective.kl_estimator", "'k5'", "k3"]),
    ("--config.objective.loss_agg=mean", ["objective.loss_agg", "token-mean"]),
    ("--config.checkpoint.every=0", ["checkpoint.every", "0"]),
    ("--config.total_steps=ten", ["total_steps", "ten"]),
])
def test_objective_hparams_checked_before_anything_is_written(capsys, tmp_path, pretrained, override, needles):
    code, _, err = run_main(capsys, *_grpo(tmp_path, pretrained, override))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and "Traceback" not in err
    for n in needles:
        assert n in line
    assert not (tmp_path / "w").exists()


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, f"--config={REPO}/experiments/star_grph.py:grpo", f"--workdir={tmp_path / 'w'}")
    assert code == 2 and "does not exist" in err and "star_graph.py" in err and "Traceback" not in err


def test_unknown_field_and_arg_suggest_the_right_name(capsys, tmp_path, pretrained):
    code, _, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.rl.betaa=0.1"))
    assert code == 2 and "rl.betaa" in err and "objective.beta" in err and "Traceback" not in err
    code, _, err = run_main(capsys, f"--config={SG}:grpoo,smoke", f"--workdir={tmp_path / 'w'}")
    assert code == 2 and "'grpo' for 'grpoo'" in err and "Traceback" not in err
    code, _, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.objective.betaa=0.1"))
    assert code == 2 and "Did you mean 'beta'" in err
    assert not (tmp_path / "w").exists()


def test_switching_objective_drops_leftover_hparams(capsys, tmp_path, pretrained):
    code, out, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.objective.name=rloo", "--dry_run"))
    assert code == 0, err
    assert "dropped objective.clip_eps_low=0.2" in out
    assert "* objective.name = 'rloo'" in out and "objective.clip_eps_low removed" in out
    # A hyper-parameter the experiment does not set but the new objective takes can be given.
    code, out, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.objective.name=ppo",
                                             "--config.objective.clip_c=3", "--dry_run"))
    assert code == 0, err
    assert " * objective.clip_c = 3\n" in out
    # ...and is checked by the objective itself.
    code, _, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.objective.name=ppo",
                                           "--config.objective.clip_c=0.5"))
    assert code == 2 and "objective.clip_c" in err
    assert not (tmp_path / "w").exists()


def test_dry_run_prints_config_mesh_params_and_writes_nothing(capsys, tmp_path, pretrained):
    code, out, err = run_main(capsys, *_grpo(tmp_path, pretrained, "--config.objective.beta=0.1", "--dry_run"))
    assert code == 0, err
    assert "* objective.beta = 0.1   (default 0.04)" in out
    assert "  rl.group_size = " in out  # unchanged fields are listed unmarked
    assert "mesh {'data': 8" in out and "parameters" in out
    n = int(out.split(" parameters")[0].rsplit(";", 1)[1].replace(",", ""))
    assert n > 1000
    assert not (tmp_path / "w").exists()


def test_help_exits_0_and_lists_experiments(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for name in ("star_graph.py", "arithmetic.py", "distill.py", "--dry_run", "--print_fields", "143"):
        assert name in out
    # each experiment's args, one line each
    assert any(line.split()[:1] == ["grpo"] and "GRPO" in line for line in out.splitlines())
    assert any(line.split()[:1] == ["pretrain"] for line in out.splitlines())


def test_print_fields_lists_every_field_with_its_comment(capsys, tmp_path):
    code, out, _ = run_main(capsys, f"--config={SG}:grpo,smoke", "--print_fields")
    assert code == 0
    lines = out.splitlines()
    cfg = common.load_config_file(f"{SG}:grpo,smoke")
    from kljax.cli import _fields
    for f in _fields(cfg):
        assert any(line.strip().startswith(f + " ") or line.strip() == f for line in lines), f
    assert any("rl.group_size" in line and "# completions sampled per prompt" in line for line in lines)
    assert any("objective.beta" in line and "hyper-parameter of 'grpo'" in line for line in lines)


@pytest.mark.parametrize("exc,code,needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/metrics.jsonl"), 74,
     "cannot write /x/metrics.jsonl: No space left on device"),
    (checkpoint.SaveFailedError("saving checkpoint step 4 in /x/checkpoints failed"), 74, "step 4"),
    (interrupt.Interrupted(signal.SIGTERM, 3, 6, "/x/checkpoints"), 143, "stopped by SIGTERM at step 3 of 6"),
    (interrupt.Interrupted(signal.SIGINT, 3, 6, "/x/checkpoints"), 130, "stopped by SIGINT at step 3 of 6"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C) outside the training steps"),
])
def test_main_reports_faults_with_distinct_statuses(capsys, tmp_path, monkeypatch, exc, code, needle):
    class Loop:
        @staticmethod
        def run(cfg, workdir):
            raise exc

    monkeypatch.setattr(common, "loop_module", lambda cfg: Loop)
    got, _, err = run_main(capsys, f"--config={SG}:pretrain,smoke", f"--workdir={tmp_path / 'w'}",
                           f"--config.task.data_dir={tmp_path / 'data'}")
    assert got == code and needle in err and "Traceback" not in err


def test_guard_accepts_corrected_config_when_no_checkpoint(tmp_path, capsys):
    wd = str(tmp_path / "w")
    a = ml_collections.ConfigDict(dict(objective=dict(name="grpo", beta=-0.1), total_steps=3))
    b = ml_collections.ConfigDict(dict(objective=dict(name="grpo", beta=0.1), total_steps=3))
    checkpoint.check_or_write_config(wd, a)
    assert checkpoint.check_or_write_config(wd, b) == {}  # no checkpoint: a fresh start is allowed
    assert json.load(open(os.path.join(wd, "config.json")))["objective"]["beta"] == 0.1
    assert json.load(open(os.path.join(wd, checkpoint.REPLACED_CONFIG_FILE)))["objective"]["beta"] == -0.1
    os.makedirs(os.path.join(wd, "checkpoints", "2"))
    with pytest.raises(checkpoint.ConfigMismatchError, match="objective.beta"):
        checkpoint.check_or_write_config(wd, a)


# ----------------------------------------------------------------------------------------------
# Faults, on run_loop with a tiny state


@flax.struct.dataclass
class Tiny:
    step: jax.Array
    w: jax.Array


def tiny_state():
    return Tiny(step=jnp.zeros((), jnp.int32), w=jnp.ones((3,), jnp.float32))


def tiny_step(state, batch):
    del batch
    w = state.w * 0.9 + state.step.astype(jnp.float32)
    return Tiny(step=state.step + 1, w=w), {"loss": jnp.sum(w)}


def tiny_cfg(total=6, every=2, keep=3):
    return ml_collections.ConfigDict(dict(
        total_steps=total, log_every=1, eval_every=0,
        checkpoint=dict(every=every, keep=keep, best_metric="", best_mode="max", async_save=True)))


def tiny_eval(state):
    return {"eval/w": jnp.sum(state.w)}


def run_tiny(wd, cfg=None, step_fn=tiny_step):
    return driver.run_loop(cfg or tiny_cfg(), wd, state=tiny_state(), step_fn=step_fn, batches=None,
                           eval_fn=tiny_eval)


def restored(wd, cfg=None):
    mgr = driver.checkpoint_manager(cfg or tiny_cfg(), wd)
    try:
        return mgr.all_steps(), mgr.restore_latest(tiny_state())
    finally:
        mgr.close()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 6-step run: its final state."""
    wd = str(tmp_path_factory.mktemp("ref"))
    run_tiny(wd)
    return restored(wd)[1][0]


def test_finished_run_rerun_changes_nothing(tmp_path, capsys, reference_run):
    wd = str(tmp_path)
    res = run_tiny(wd)
    files = {f: open(os.path.join(wd, f), "rb").read() for f in ("metrics.jsonl", "eval.json", "config.json")}
    mtimes = {f: os.path.getmtime(os.path.join(wd, f)) for f in files}
    tb = sorted(os.listdir(os.path.join(wd, "tensorboard")))
    capsys.readouterr()
    again = run_tiny(wd)
    assert "already finished" in capsys.readouterr().out
    assert again["eval/w"] == res["eval/w"] and again["wall_s"] == res["wall_s"]
    assert files == {f: open(os.path.join(wd, f), "rb").read() for f in files}
    assert mtimes == {f: os.path.getmtime(os.path.join(wd, f)) for f in files}
    assert tb == sorted(os.listdir(os.path.join(wd, "tensorboard")))


def test_nan_between_log_steps_is_caught_at_its_step_before_any_checkpoint(tmp_path):
    """Metrics are fetched every log_every steps; a NaN at a step in between is still named exactly,
    and the checkpoint due at that fetch is not written."""
    def nan_at_5(state, batch):
        state, m = tiny_step(state, batch)
        return state, {"loss": jnp.where(state.step == 5, jnp.nan, m["loss"])}

    cfg = tiny_cfg(total=12, every=6)
    cfg.log_every = 4
    wd = str(tmp_path)
    with pytest.raises(metrics.NonFiniteMetricError, match=r"at step 5: loss=nan.*no checkpoint yet"):
        run_tiny(wd, cfg, step_fn=nan_at_5)
    assert restored(wd, cfg)[0] == []  # the step-6 checkpoint was never written
    rows = metrics.read_metrics(wd)
    assert [r["step"] for r in rows] == [4]  # logged at the cadence only, with the window's mean step time
    assert rows[0]["time/step_s"] > 0


def test_disk_full_stops_at_once_and_checkpoint_restores(tmp_path, monkeypatch, reference_run):
    wd = str(tmp_path)
    real = metrics.Writer.write

    def write(self, step, m):
        if step == 5:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(wd, metrics.METRICS_FILE))
        return real(self, step, m)

    monkeypatch.setattr(metrics.Writer, "write", write)
    with pytest.raises(OSError) as e:
        run_tiny(wd)
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("metrics.jsonl")
    monkeypatch.setattr(metrics.Writer, "write", real)
    steps, (state, _) = restored(wd)
    assert steps[-1] == 4 and int(state.step) == 4
    # the rerun resumes and ends where the uninterrupted run ends
    run_tiny(wd)
    np.testing.assert_array_equal(restored(wd)[1][0].w, reference_run.w)
    assert [r["step"] for r in metrics.read_metrics(wd) if "loss" in r] == list(range(1, 7))


def test_tensorboard_write_error_raises_instead_of_hanging(tmp_path, monkeypatch):
    from tensorboardX import record_writer
    w = metrics.Writer(str(tmp_path))
    w.write(1, {"loss": 1.0})

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    box = {}

    def target():
        try:
            for s in range(2, 40):  # more events than tensorboardX's queue holds
                w.write(s, {"loss": 1.0})
        except OSError as e:
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "metrics writer hung on a full disk"
    assert box["err"].errno == errno.ENOSPC
    monkeypatch.undo()
    w.close()


def test_failed_async_save_stops_the_run(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity
    wd = str(tmp_path)
    calls = {"n": 0}
    classes = [c for c in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath)]
    reals = {c: c.finalize for c in classes}

    def make(cls):
        async def finalize(self, *a, **k):
            if os.path.basename(str(self._final_path)) == "4":  # checkpoint 4 fails in the background
                calls["n"] += 1
                raise OSError(errno.ENOSPC, "No space left on device", str(self._final_path))
            return await reals[cls](self, *a, **k)
        return finalize

    for c in classes:
        monkeypatch.setattr(c, "finalize", make(c))
    with pytest.raises(checkpoint.SaveFailedError) as e:
        run_tiny(wd, tiny_cfg(total=40))
    assert calls["n"] >= 1
    assert "No space left" in str(e.value) and "Last complete checkpoint: step 2" in str(e.value)
    assert not os.path.exists(os.path.join(wd, "eval.json"))
    recs = metrics.read_metrics(wd)
    assert max(r["step"] for r in recs) < 40  # it stopped, it did not train on unprotected
    monkeypatch.undo()
    assert restored(wd)[0][-1] == 2


@pytest.mark.parametrize("damage", ["empty_metadata", "truncated_data"])
def test_corrupted_latest_checkpoint_falls_back(tmp_path, capsys, damage, reference_run):
    wd = str(tmp_path)
    run_tiny(wd, tiny_cfg(total=4))
    step_dir = os.path.join(wd, "checkpoints", "4")
    if damage == "empty_metadata":
        target = os.path.join(step_dir, "state", "_METADATA")
        open(target, "w").close()
    else:
        files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
                 if os.sep + "d" + os.sep in os.path.join(r, f)]
        for target in files:
            with open(target, "r+b") as f:
                f.truncate(max(1, os.path.getsize(target) // 3))
    capsys.readouterr()
    run_tiny(wd, tiny_cfg(total=6))  # extend the run: it must resume from step 2
    out = capsys.readouterr().out
    assert "checkpoint step 4 cannot be restored" in out
    if damage == "empty_metadata":
        assert target in out
    assert "resumed from step 2 of 6" in out
    assert os.path.isdir(os.path.join(wd, checkpoint.CORRUPT_DIR, "4"))  # kept, not deleted
    np.testing.assert_array_equal(restored(wd)[1][0].w, reference_run.w)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_at_step_boundary_and_rerun_resumes(tmp_path, capsys, sig, reference_run):
    wd = str(tmp_path)

    def step_fn(state, batch):
        if int(state.step) == 2:
            os.kill(os.getpid(), sig)
        return tiny_step(state, batch)

    with pytest.raises(interrupt.Interrupted) as e:
        run_tiny(wd, tiny_cfg(every=100), step_fn)
    assert e.value.signum == sig and e.value.step == 3
    assert restored(wd)[0] == [3]
    capsys.readouterr()
    run_tiny(wd, tiny_cfg(every=100))
    assert f"resumed from step 3 of 6, checkpoint {os.path.join(wd, 'checkpoints', '3')}" in capsys.readouterr().out
    np.testing.assert_array_equal(restored(wd, tiny_cfg(every=100))[1][0].w, reference_run.w)
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored after the run


def test_failed_first_step_does_not_block_the_corrected_rerun(tmp_path):
    wd = str(tmp_path)

    def broken(state, batch):
        raise FloatingPointError("diverged at step 1")

    bad_cfg = tiny_cfg()
    with bad_cfg.unlocked():
        bad_cfg.lr = 10.0
    with pytest.raises(FloatingPointError):
        run_tiny(wd, bad_cfg, broken)
    good = tiny_cfg()
    with good.unlocked():
        good.lr = 0.1
    run_tiny(wd, good)
    assert json.load(open(os.path.join(wd, "config.json")))["lr"] == 0.1


def test_plot_on_a_pipeline_workdir_draws_every_stage(tmp_path, capsys):
    from kljax import plot
    for stage in ("pretrain", "grpo"):
        with metrics.Writer(str(tmp_path / stage), tensorboard=False) as w:
            for step in range(1, 4):
                w.write(step, {"loss": 1.0 / step})
    assert plot.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / s / "curves.png") for s in ("grpo", "pretrain")]
    assert all(os.path.getsize(p) > 0 for p in out)


def test_results_table_labels_what_each_column_and_row_measures():
    from kljax.train import pipeline
    q = common.load_config_file(os.path.join(REPO, "experiments", "star_graph_qsharp.py") + ":main,smoke")
    stages = pipeline.stage_configs(q, "/nonexistent")
    rows = [(n, pipeline._method(s), {"eval/accuracy": 0.25, "step": 4}, 1.0) for n, s, _ in stages]
    table = pipeline.results_table(q, "/nonexistent", rows, [s for _, s, _ in stages])
    header = table.splitlines()[2]
    assert "path accuracy" in header and "greedy" not in header and "| decoding |" in header
    by_stage = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    eta = stages[1][1].qsharp.rollin_eta
    assert f"Q♯-guided η={eta:g}, sampled T=1" in by_stage["qsharp"]
    assert "| greedy |" in by_stage["pretrain"]
    a = common.load_config_file(os.path.join(REPO, "experiments", "arithmetic.py") + ":main,smoke")
    stages = pipeline.stage_configs(a, "/nonexistent")
    rows = [(n, pipeline._method(s), {"eval/accuracy": 0.25}, 1.0) for n, s, _ in stages]
    assert "exact-match accuracy" in pipeline.results_table(a, "/nonexistent", rows,
                                                            [s for _, s, _ in stages]).splitlines()[2]


# ----------------------------------------------------------------------------------------------
# Two processes: a SIGTERM to one of them stops both at the same step, after one checkpoint


def _mp_worker(workdir):
    """Run as `python tests/test_trust.py mp WORKDIR` in each process of launch/local_multiprocess.py."""
    from kljax.train import sharding as shd
    shd.initialize_distributed_from_env()
    mesh = shd.make_mesh({"data": -1})
    rep = shd.replicated(mesh)
    state = Tiny(step=jax.device_put(np.zeros((), np.int32), rep), w=jax.device_put(np.ones(3, np.float32), rep))
    step = jax.jit(tiny_step)

    def step_fn(s, b):
        if int(jax.device_get(s.step)) == 2 and jax.process_index() == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # only process 1 is "preempted"
        time.sleep(0.05)
        return step(s, b)

    try:
        driver.run_loop(tiny_cfg(total=60, every=1000), workdir, state=state, step_fn=step_fn, batches=None)
    except interrupt.Interrupted as e:
        print(f"STOPPED process={jax.process_index()} step={e.step}", flush=True)
        sys.exit(143)
    print(f"FINISHED process={jax.process_index()}", flush=True)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "--num_processes", "2",
           "--devices_per_process", "2", "--timeout", "240", "--log_dir", str(logs), "--",
           os.path.abspath(__file__), "mp", str(tmp_path / "w")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = [open(logs / f"process_{i}.log").read() for i in range(2)]
    stops = [line for text in out for line in text.splitlines() if line.startswith("STOPPED")]
    assert len(stops) == 2, "".join(o[-2000:] for o in out) + proc.stderr[-2000:]
    steps = {line.split("step=")[1] for line in stops}
    assert len(steps) == 1  # both processes agreed on the step
    step = int(steps.pop())
    assert 3 <= step < 60 and proc.returncode == 143
    assert sorted(int(d) for d in os.listdir(tmp_path / "w" / "checkpoints") if d.isdigit()) == [step]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "mp":
    _mp_worker(sys.argv[2])


@pytest.mark.parametrize("arg", ["qsharp,smoke", "qsharp_hist,smoke"])
def test_qsharp_critic_hparams_checked_through_the_objective(arg):
    from kljax.config import ConfigError
    from kljax.train import common, preflight
    cfg = common.load_config_file(os.path.join(REPO, "experiments", "star_graph_qsharp.py") + ":" + arg)
    preflight.check_objective_hparams(cfg)  # the experiment's own values pass
    with cfg.unlocked():
        cfg.objective.loss_agg = "token-meen"
    with pytest.raises(ConfigError, match=r"`objective.loss_agg` = 'token-meen' is invalid.*token-mean"):
        preflight.check_objective_hparams(cfg)
