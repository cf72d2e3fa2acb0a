"""kljax.main: config errors reported before compiling (naming the field and the fix), --help."""
import os
import subprocess
import sys

import pytest

from kljax.config import ConfigError
from kljax.train import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SG = os.path.join(REPO, "experiments", "star_graph.py")


def _cfg(arg, tmp_path, **fields):
    cfg = common.load_config_file(f"{SG}:{arg}")
    with cfg.unlocked():
        cfg.task.data_dir = str(tmp_path / "data")
        for k, v in fields.items():
            node = cfg
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return cfg


@pytest.fixture
def pretrained(tmp_path):
    """A directory that looks like a finished run (config.json + a checkpoint step dir)."""
    d = tmp_path / "pre"
    (d / "checkpoints" / "4").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return str(d)


def assert_valid(cfg, **kwargs):
    """Fail with the validator's own message if a config that should be accepted is refused."""
    try:
        common.validate(cfg, **kwargs)
    except ConfigError as e:
        pytest.fail(f"valid config refused: {e}")


def test_valid_smoke_configs_pass(tmp_path, pretrained):
    assert_valid(_cfg("pretrain,smoke", tmp_path))
    assert_valid(_cfg("grpo,smoke", tmp_path, init_from=pretrained))


@pytest.mark.parametrize("field,value,needle", [
    ("objective.name", "grpoo", "objective.name"),
    ("objective.name", "fkl", "objective.name"),          # a distillation loss in the rl loop
    ("task.name", "star_grap", "task.name"),
    ("rl.group_size", 1, "rl.group_size"),
    ("batch_size", 12, "batch_size"),                     # 8 devices in tests: not divisible
    ("rl.minibatch_size", 6, "rl.minibatch_size"),        # not whole groups / not dividing the roll-out
    ("init_from", "", "init_from"),
    ("init_from", "/nonexistent/run", "init_from"),
    ("mesh.data", 3, "mesh"),
    ("loop", "nope", "loop"),
    ("rl.reference", "sometimes", "rl.reference"),
])
def test_config_errors_name_the_field(tmp_path, pretrained, field, value, needle):
    fields = {"init_from": pretrained}
    fields[field] = value
    cfg = _cfg("grpo,smoke", tmp_path, **fields)
    with pytest.raises(ConfigError) as e:
        common.validate(cfg)
    assert needle in str(e.value)


def test_group_size_one_allowed_without_group_baseline(tmp_path, pretrained):
    assert_valid(_cfg("grpo,smoke", tmp_path, init_from=pretrained, **{"rl.group_size": 1,
                                                                          "rl.minibatch_size": 8,
                                                                          "rl.prompts_per_step": 8,
                                                                          "rl.advantage": "batch"}))


def test_unknown_objective_hparam(tmp_path, pretrained):
    cfg = _cfg("grpo,smoke", tmp_path, init_from=pretrained)
    with cfg.unlocked():
        cfg.objective.betaa = 0.1
    with pytest.raises(ConfigError, match="objective.betaa"):
        common.validate(cfg)


def test_experiment_args_are_checked():
    with pytest.raises(ValueError, match="pretrain"):
        common.load_config_file(f"{SG}:nonsense")


def _main(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "kljax.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_help_lists_flags():
    out = _main("--help")  # absl prints the help on stdout and exits with 1
    assert "--config" in out.stdout and "--workdir" in out.stdout and "experiments" in out.stdout


def test_cli_config_error_before_compiling(tmp_path):
    out = _main(f"--config={SG}:grpo,smoke", f"--workdir={tmp_path / 'w'}")
    assert out.returncode == 2
    assert "init_from" in out.stderr
    assert not (tmp_path / "w").exists()  # nothing was written


def test_cli_misspelt_field_is_an_error(tmp_path):
    out = _main(f"--config={SG}:pretrain,smoke", f"--workdir={tmp_path / 'w'}", "--config.total_stepz=3")
    assert out.returncode != 0
    assert "total_stepz" in out.stderr
