"""`kljax.aot`: every jitted function of a loop compiles for a TPU topology on this CPU machine (libtpu's
compiler, from the `aot` extra), with per-device memory checked against the chip's HBM."""
import os
import subprocess
import sys

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # pytest-xdist workers may each load libtpu

from kljax import aot  # noqa: E402
from kljax.train import common, setup as setup_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(REPO, "experiments", "pod_grpo.py")


def _smoke(**mesh):
    cfg = common.load_config_file(POD + ":smoke")
    with cfg.unlocked():
        cfg.mesh.update(mesh)
    return cfg


@pytest.fixture(scope="module")
def fsdp_rows():
    """The smoke pod config on v5e:2x2 with parameters sharded over fsdp=2 (data=2)."""
    rows, text, status = aot.check(_smoke(data=2, fsdp=2), "v5e:2x2")
    return rows, text, status


@pytest.mark.slow
def test_every_rl_function_compiles_for_a_tpu_topology(fsdp_rows):
    rows, text, status = fsdp_rows
    assert status == 0, text
    assert [r.name.split(" ")[0] for r in rows] == ["train_step", "rollout_sampler", "old_policy/reference"]
    assert "4 × TPU v5 lite, 16 GiB HBM each" in text and "| train_step (one minibatch) |" in text
    step = rows[0]
    assert step.flops > 0 and step.argument_bytes > 0 and step.temp_bytes > 0
    assert all(0 < r.total_bytes < 16 * aot.GIB for r in rows)


@pytest.mark.slow
def test_parameter_bytes_per_device_shrink_with_fsdp(fsdp_rows):
    rows, _, _ = fsdp_rows
    replicated_rows, _, _ = aot.check(_smoke(data=4, fsdp=1), "v5e:2x2")
    # The train step's arguments are dominated by params + AdamW moments: halved by fsdp=2.
    ratio = rows[0].argument_bytes / replicated_rows[0].argument_bytes
    assert 0.45 < ratio < 0.6, ratio


@pytest.mark.slow
def test_an_oversized_config_is_refused_naming_the_function():
    # A 1M-token vocabulary at width 4096 replicated on every chip: 16 GiB of embedding alone, x4 with AdamW.
    cmd = [sys.executable, "-m", "kljax.aot", f"--config={POD}:smoke", "--topology=v5e:2x2",
           "--config.model.vocab_size=1048576", "--config.model.width=4096", "--config.model.head_dim=1024",
           "--config.model.depth=1", "--config.mesh.data=4", "--config.mesh.fsdp=1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "DOES NOT FIT: train_step (one minibatch) needs" in out.stdout
    assert "--config.mesh.fsdp=2" in out.stdout


def test_a_bad_topology_or_loop_is_a_config_error():
    from kljax.config import ConfigError
    cfg = _smoke()
    with cfg.unlocked():
        cfg.loop = "qsharp"
    with pytest.raises(ConfigError, match="kljax.aot covers"):
        aot.check(cfg, "v5e:2x2")
    with pytest.raises(ConfigError, match="--topology='v5e:3x7'"):
        aot.check(_smoke(), "v5e:3x7")


@pytest.mark.slow
def test_the_rollout_forward_pass_holds_one_minibatch_of_logits_at_a_time():
    # 64 roll-out rows over 4 chips, vocabulary 32k: in chunks of 16 rows the pass needs about a quarter
    # of the temporaries (the [rows, T, V] logits dominate), and the chunks keep the batch sharding.
    cfg = _smoke(data=1, fsdp=4)
    with cfg.unlocked():
        cfg.model.vocab_size = 32768
    devices = aot.topology_devices("v5e:2x2")
    from kljax.train import sharding as shd
    mesh = shd.make_mesh(cfg.mesh, devices)
    task = setup_lib.build_task(cfg)
    ts = aot._abstract_state(cfg, mesh, task)
    whole, chunked = (aot.compile_row(f"chunk {c}", aot._lower_logp(ts, mesh, 64, task.prompt_len + 32,
                                                                     task.prompt_len, c)) for c in (0, 16))
    assert chunked.temp_bytes < 0.35 * whole.temp_bytes, (chunked.temp_bytes, whole.temp_bytes)


def test_aot_and_main_share_one_process():
    # kljax.aot defines no absl flags, so a process (or a test session) may import both entry points.
    import importlib
    assert importlib.import_module("kljax.main").run
    assert aot.main(["kljax.aot", "--config=/nonexistent.py", "--topology=v5e:2x2"]) == 2
