"""Metrics writer (JSONL + TensorBoard, resumable), progress bar, NaN guard, and `python -m kljax.plot`."""
import io
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kljax import plot
from kljax.train import metrics as km


def lines(workdir, name=km.METRICS_FILE):
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_writer_appends_one_json_line_per_step(tmp_path):
    with km.Writer(str(tmp_path)) as w:
        values = w.write(1, {"loss": jnp.float32(0.5), "reward": np.float64(1.25), "n": 3, "vec": jnp.ones(3)})
        w.write(2, {"loss": 0.25})
    assert values == {"loss": 0.5, "reward": 1.25, "n": 3}
    recs = lines(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["loss"] == 0.5 and recs[0]["reward"] == 1.25 and "vec" not in recs[0]
    assert recs[1]["loss"] == 0.25 and "time" in recs[1]
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_writer_resume_keeps_earlier_lines_and_moves_later_ones(tmp_path):
    with km.Writer(str(tmp_path)) as w:
        for s in range(1, 6):
            w.write(s, {"loss": float(s)})
    # Crash mid-line after step 5, then resume from the checkpoint of step 3.
    with open(tmp_path / km.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "lo')
    with km.Writer(str(tmp_path), resume_step=3) as w:
        for s in range(4, 7):
            w.write(s, {"loss": 10.0 * s})
    recs = lines(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
    with open(tmp_path / km.DISCARDED_FILE) as f:
        discarded = f.read().splitlines()
    assert [json.loads(d)["step"] for d in discarded[:2]] == [4, 5] and discarded[2] == '{"step": 6, "lo'
    assert [r["step"] for r in km.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]


def test_check_finite_names_step_metric_and_checkpoint():
    km.check_finite({"loss": 1.0, "kl": jnp.float32(0.1)}, step=7, last_checkpoint=5)
    with pytest.raises(km.NonFiniteMetricError) as err:
        km.check_finite({"loss": jnp.float32(jnp.nan), "kl": 0.1, "grad_norm": math.inf}, step=12,
                        last_checkpoint=10, workdir="/runs/a")
    msg = str(err.value)
    assert "step 12" in msg and "loss=nan" in msg and "grad_norm=inf" in msg and "kl" not in msg.split(";")[0]
    assert "last good checkpoint is step 10 in /runs/a" in msg
    with pytest.raises(km.NonFiniteMetricError, match="no checkpoint yet"):
        km.check_finite({"loss": float("nan")}, step=1)


def test_progress_bar_tracks_steps():
    out = io.StringIO()
    bar = km.ProgressBar(total=10, initial=2, file=out, mininterval=0)
    bar.update(5, {"loss": jnp.float32(0.5), "other": 1.0})
    bar.close()
    text = out.getvalue()
    assert "5/10" in text and "loss=0.5" in text and "other" not in text


def test_plot_writes_png_with_chosen_metrics(tmp_path):
    with km.Writer(str(tmp_path), tensorboard=False) as w:
        for s in range(1, 6):
            w.write(s, {"reward": 0.1 * s, "kl": 0.01 * s, "entropy": 1.0 - 0.1 * s, "loss": 1.0 / s})
    out = plot.plot_workdir(str(tmp_path))
    assert out == os.path.join(str(tmp_path), "curves.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot._numeric_keys(km.read_metrics(str(tmp_path)))[:3] == ["reward", "kl", "entropy"]
    custom = str(tmp_path / "rk.png")
    assert plot.main([str(tmp_path), "--out", custom, "--metrics", "reward,kl"]) == 0
    assert os.path.getsize(custom) > 0
    with pytest.raises(ValueError, match=r"\['accuracy'\] not in"):
        plot.plot_workdir(str(tmp_path), metrics=["accuracy"])


def test_plot_cli_errors_without_metrics(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kljax.plot", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no metrics in" in proc.stderr and "metrics.jsonl does not exist" in proc.stderr
