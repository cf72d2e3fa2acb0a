"""Every experiments/*.py `smoke` config, end to end through the code path of `kljax.main`
(validate, then the loop's `run`), plus config-only checks of every smoke arg of our experiments."""
import glob
import os

import pytest

from kljax.config import ConfigError
from kljax.train import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
FILES = [f for f in FILES if not os.path.basename(f).startswith("_")]
# Experiments whose smoke arg needs what a user brings, run end to end by their own tests instead.
RUN_ELSEWHERE = {
    "hf.py": "tests/test_hf_e2e.py builds a Hugging Face model folder and data files and runs it",
    "pod_grpo.py": "tests/test_aot.py compiles it for a TPU topology (it needs a pod and a pretrained run)",
}
RUNNABLE = [f for f in FILES if os.path.basename(f) not in RUN_ELSEWHERE]


def _with_data_dir(cfg, data_dir):
    with cfg.unlocked():
        if "task" in cfg:
            cfg.task.data_dir = data_dir
    return cfg


def test_there_are_experiments():
    names = {os.path.basename(f) for f in FILES}
    assert {"star_graph.py", "arithmetic.py"} <= names
    assert set(RUN_ELSEWHERE) <= names  # each of them is still loaded below and run by its own test
    for reason in RUN_ELSEWHERE.values():
        assert os.path.exists(os.path.join(REPO, reason.split()[0]))


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[os.path.basename(f) for f in RUNNABLE])
def test_smoke_config_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("KLJAX_DATA_DIR", str(tmp_path / "data"))
    cfg = common.load_config_file(f"{path}:smoke")
    cfg = _with_data_dir(cfg, str(tmp_path / "data"))
    common.validate(cfg)
    workdir = str(tmp_path / "run")
    result = common.loop_module(cfg).run(cfg, workdir)
    assert result
    if cfg.loop == "pipeline":
        with open(os.path.join(workdir, "results.md")) as f:
            table = f.read()
        for spec in cfg.stages:
            name = spec.split("=")[0]
            assert f"| {name} |" in table
            assert os.path.exists(os.path.join(workdir, name, "eval.json"))
        stage_dir = os.path.join(workdir, cfg.stages[-1].split("=")[0])
    else:
        assert os.path.exists(os.path.join(workdir, "eval.json"))
        stage_dir = workdir
    from kljax.plot import plot_workdir
    png = plot_workdir(stage_dir)
    assert os.path.getsize(png) > 0


@pytest.mark.parametrize("spec", [f"star_graph.py:{a},smoke" for a in
                                  ("pretrain", "reinforce", "grpo", "dapo", "rpg_ufkl", "rpg_ufkl_reset", "rpg_rkl",
                                   "main")] +
                         [f"arithmetic.py:{a},smoke" for a in
                          ("pretrain", "grpo", "dapo", "reinforce_pp", "rpg_ufkl", "rpg_ufkl_reset", "main")])
def test_every_smoke_arg_validates(spec, tmp_path):
    cfg = common.load_config_file(os.path.join(REPO, "experiments", spec))
    cfg = _with_data_dir(cfg, str(tmp_path / "data"))
    if cfg.loop == "rl":  # standalone RL args need --config.init_from (not checked on disk here)
        with cfg.unlocked():
            cfg.init_from = str(tmp_path / "pretrain")
    try:
        common.validate(cfg, check_paths=False)
    except ConfigError as e:
        pytest.fail(f"{spec}: valid smoke config refused: {e}")
    assert cfg.loop in common.LOOP_MODULES
