"""Distillation from a Hugging Face teacher (`distill.teacher_hf_path`) into a student that shares its
tokenizer: vocabularies padded differently are aligned on the common ids; a real mismatch, or another
tokenizer, is a config error naming both sizes."""
import json

import ml_collections
import numpy as np
import pytest

import hf_fixtures as hfx
from kljax.config import ConfigError, base_config
from kljax.train import common, distill, setup as setup_lib


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    student = hfx.user_folder(root / "student", "qwen2", vocab_size=320)
    teacher = root / "teacher"
    hfx.train_tokenizer(teacher, "qwen2")  # the same tokenizer (same corpus, same trainer)
    hfx.make_model(teacher, "qwen2", vocab_size=384, width=48, seed=1)  # larger, padded to a multiple of 128
    with open(root / "train.jsonl", "w") as f:
        for a in range(16):
            f.write(json.dumps({"prompt": f"what is {a} plus 1?", "completion": f"{a} + 1 = {a + 1}."}) + "\n")
    return dict(root=root, student=student, teacher=str(teacher), data=str(root / "train.jsonl"))


def kd_config(f, teacher, steps=2):
    c = base_config("distill")
    with c.model.unlocked():
        c.model.hf_path = f["student"]
    c.task = ml_collections.ConfigDict(dict(name="files", data_dir=str(f["root"] / "data"), train_files=f["data"],
                                            prompt_key="prompt", completion_key="completion", prompt_len=16,
                                            completion_len=16))
    c.objective = ml_collections.ConfigDict(dict(name="fkl"))
    c.distill = ml_collections.ConfigDict(dict(teacher_from="", teacher_hf_path=teacher, data="dataset",
                                               temperature=1.0))
    c.total_steps, c.batch_size, c.log_every = steps, 8, 1
    c.eval.num_examples, c.eval.batch_size = 8, 8
    c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 1
    return c


@pytest.mark.slow
def test_distill_from_larger_hf_teacher_with_padded_vocabulary(folders):
    cfg = kd_config(folders, folders["teacher"])
    common.validate(cfg)
    task = setup_lib.build_task(cfg)
    teacher = distill._Teacher(cfg, task, setup_lib.build_mesh(cfg))
    assert teacher.vocab == 320  # min(384, 320), both >= the tokenizer's 300 ids
    wd = str(folders["root"] / "run")
    result = distill.run(cfg, wd)
    assert np.isfinite(result["eval/fkl"]) and result["eval/fkl"] >= 0
    losses = [json.loads(line)["loss"] for line in open(f"{wd}/metrics.jsonl") if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_tensor_parallel_teacher_gives_the_same_logits_with_its_own_layout(folders):
    """`distill.teacher_sharding = "tensor"`: the teacher's matmuls are split by output features over
    fsdp × tensor devices while the student stays FSDP; the teacher's logits do not change."""
    cfg = kd_config(folders, folders["teacher"])
    cfg.mesh.fsdp, cfg.mesh.data = 4, 2
    task = setup_lib.build_task(cfg)
    mesh = setup_lib.build_mesh(cfg)
    tp_cfg = kd_config(folders, folders["teacher"])
    tp_cfg.mesh.fsdp, tp_cfg.mesh.data = 4, 2
    tp_cfg.distill.teacher_sharding = "tensor"
    common.validate(tp_cfg)
    fsdp_t, tp_t = distill._Teacher(cfg, task, mesh), distill._Teacher(tp_cfg, task, mesh)
    import jax
    from kljax.train import sharding as shd

    def gate_spec(t):
        return next(x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(t.params)
                    if "w_gate" in jax.tree_util.keystr(p))
    assert tuple(gate_spec(tp_t)) == (None, ("fsdp", "tensor"))  # [embed, mlp]: output features split
    assert gate_spec(fsdp_t)[0] == "fsdp"  # the student's layout: the embed dimension sharded
    rows = np.random.default_rng(0).integers(0, 300, size=(8, 12)).astype(np.int32)
    b = shd.shard_batch({"tokens": rows, "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)),
                         "valid": np.ones((8, 12), bool)}, mesh)
    np.testing.assert_allclose(np.asarray(tp_t.device_logits(b)), np.asarray(fsdp_t.device_logits(b)),
                               atol=2e-5, rtol=2e-5)
    bad = kd_config(folders, folders["teacher"])
    bad.distill.teacher_sharding = "tp"
    with pytest.raises(ConfigError, match=r"distill.teacher_sharding.*fsdp.*tensor"):
        common.validate(bad)


@pytest.mark.slow
def test_vocabulary_tiled_loss_matches_dense_from_a_wider_teacher(folders, monkeypatch):
    """`distill.vocab_tile`: the loss streamed from the student's and the (wider, padded-vocabulary)
    teacher's hidden states by tiles of 64 gives the dense loss every step, and JSD too."""
    losses, traced = {}, []
    tiled_loss = distill.lm_distill_loss_tiled
    monkeypatch.setattr(distill, "lm_distill_loss_tiled", lambda *a, **k: traced.append(k["name"]) or tiled_loss(*a, **k))
    for name, tile in (("fkl", 0), ("fkl", 64), ("jsd", 0), ("jsd", 64)):
        cfg = kd_config(folders, folders["teacher"], steps=3)
        cfg.objective.name = name
        cfg.distill.vocab_tile = tile
        cfg.eval.num_examples = 0
        wd = str(folders["root"] / f"tile_{name}_{tile}")
        distill.run(cfg, wd)
        losses[name, tile] = [json.loads(line)["loss"] for line in open(f"{wd}/metrics.jsonl") if '"loss"' in line]
    assert sorted(set(traced)) == ["fkl", "jsd"]  # the tiled runs took the tiled loss (traced once each)
    for name in ("fkl", "jsd"):
        assert len(losses[name, 0]) == 3
        np.testing.assert_allclose(losses[name, 64], losses[name, 0], rtol=2e-4, atol=1e-6)
    bad = kd_config(folders, folders["teacher"])
    bad.objective.name, bad.distill.vocab_tile = "akl", 64
    with pytest.raises(ConfigError, match=r"distill.vocab_tile.*dense"):
        common.validate(bad)


def test_vocabulary_below_the_tokenizer_is_an_error_naming_both(folders, tmp_path):
    small = tmp_path / "small"
    hfx.make_model(small, "qwen2", vocab_size=256)  # fewer rows than the tokenizer's 300 ids
    cfg = kd_config(folders, str(small))
    task = setup_lib.build_task(cfg)
    with pytest.raises(ConfigError, match=r"teacher vocabulary 256 and student vocabulary 320"):
        distill._Teacher(cfg, task)


def test_other_tokenizer_is_an_error(folders, tmp_path):
    other = tmp_path / "other"
    hfx.train_tokenizer(other, "llama")
    hfx.make_model(other, "llama", vocab_size=320)
    cfg = kd_config(folders, str(other))
    with pytest.raises(ConfigError, match="tokenizer"):
        distill._Teacher(cfg, setup_lib.build_task(cfg))
    both = kd_config(folders, str(other))
    both.distill.teacher_from = "runs/x"
    with pytest.raises(ConfigError, match="not both"):
        common.validate(both)


@pytest.mark.slow
def test_experiment_distill_arg_runs_on_policy_from_the_hf_teacher(folders):
    """`experiments/hf.py:distill,smoke` with the user's folders: GKD on the student's own samples."""
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = common.load_config_file(os.path.join(repo, "experiments", "hf.py") + ":distill,smoke")
    with cfg.unlocked():
        cfg.model.hf_path = folders["student"]
        cfg.distill.teacher_hf_path = folders["teacher"]
        cfg.distill.lam = 1.0  # every batch from the student
        cfg.task.update(train_files=folders["data"], prompt_key="prompt", completion_key="completion",
                        answer_key="", data_dir=str(folders["root"] / "data_exp"))
    common.validate(cfg)
    wd = str(folders["root"] / "run_exp")
    result = distill.run(cfg, wd)
    rows = [json.loads(line) for line in open(f"{wd}/metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["data/student_frac"] == 1.0 for r in rows)
    assert np.isfinite(result["eval/fkl"]) and result["eval/fkl"] >= 0
