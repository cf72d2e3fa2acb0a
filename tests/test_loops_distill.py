"""Distillation loop: batch layout, KL to the teacher decreases, data sources (GKD λ, DistiLLM),
config errors, classic digits KD and an end-to-end synthetic-LM run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kljax import objectives, tasks
from kljax.config import ConfigError
from kljax.models import TransformerLM, lm_config
from kljax.train import distill, sequences

TASK = tasks.get("synthetic_lm", vocab=5, seq_len=6, train_size=64, test_size=16)


def _experiment(arg):
    from kljax.train.common import load_config_file
    return load_config_file(os.path.join(os.path.dirname(__file__), "..", "experiments", "distill.py") + ":" + arg)


def test_sequence_batch_layout():
    prompt = np.array([[0, 7, 8], [9, 9, 9]])
    pv = np.array([[0, 1, 1], [1, 1, 1]])
    comp = np.array([[1, 2, 0], [3, 0, 0]])
    cv = np.array([[1, 1, 0], [1, 0, 0]])
    b = sequences.sequence_batch(prompt, pv, comp, cv)
    assert b["tokens"].tolist() == [[0, 7, 8, 1, 2, 0], [9, 9, 9, 3, 0, 0]]
    # position t trains when token t+1 is a real completion token
    assert b["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert b["positions"][0].tolist() == [0, 0, 1, 2, 3, 3]


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_distill_steps_reduce_exact_kl(name):
    v = TASK.vocab_size
    student = TransformerLM(lm_config(vocab_size=v, width=16, depth=1, num_heads=2, max_len=8), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = TASK.sample(8, rng)
    valid = TASK.validity(tokens)
    b = sequences.sequence_batch(tokens[:, :1], valid[:, :1], tokens[:, 1:], valid[:, 1:])
    b["teacher_logits"] = TASK.true_logprobs(b["tokens"], smoothing=1e-2)
    batch = {k: jnp.asarray(x) for k, x in b.items()}
    obj = objectives.get(name)

    def kl_now(m):
        logits = m(batch["tokens"], positions=batch["positions"], valid=batch["valid"])
        return float(distill.exact_kl_metrics(logits, batch["teacher_logits"], batch["loss_mask"])["fkl"])

    before = kl_now(student)
    opt = nnx.Optimizer(student, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train(model, opt):
        opt.update(model, nnx.grad(lambda m: distill.lm_distill_loss(m, batch, None, objective=obj, hparams={})[0])(model))

    for _ in range(30):
        train(student, opt)
    assert kl_now(student) < 0.5 * before


class _Teacher:
    model = None

    def logits(self, b):
        return TASK.true_logprobs(b["tokens"], smoothing=1e-2)


def _data(arg, tmp_path, **over):
    cfg = _experiment(arg)
    with cfg.unlocked():
        for k, val in over.items():
            sec, key = k.split(".")
            cfg[sec][key] = val
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return distill._DistillData(cfg, TASK, _Teacher(), iter(()), mesh), cfg


def _raw(n=8):
    rows = [r for _, r in zip(range(n), TASK.generate("train"))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_gkd_lambda_one_uses_student_samples_lambda_zero_the_dataset(tmp_path):
    student = TransformerLM(lm_config(vocab_size=TASK.vocab_size, width=16, depth=1, num_heads=2, max_len=8),
                            rngs=nnx.Rngs(0))
    raw = _raw()
    d1, _ = _data("fkl,onpolicy,smoke", tmp_path)
    assert all(d1.choose(s, jax.random.PRNGKey(s)) == "student" for s in range(20))
    batch, which = d1.batch(0, student, raw)
    assert which == "student"
    comp = np.asarray(batch["tokens"])[:, 1:]
    # an untrained student does not reproduce the dataset's sequences
    assert not np.array_equal(comp, raw["target"])
    # the completions are the student's own samples (same key derivation as the loop)
    from kljax.sampling import generate
    _, k_gen = jax.random.split(jax.random.fold_in(d1.key, 0))
    out = generate(student, raw["prompt"], raw["prompt_valid"], k_gen, TASK.completion_len, TASK.eos_id,
                   pad_id=TASK.pad_id)
    assert np.array_equal(comp, np.asarray(out.tokens))
    d0, _ = _data("fkl,student,smoke", tmp_path, **{"distill.lam": 0.0})
    assert all(d0.choose(s, jax.random.PRNGKey(s)) == "dataset" for s in range(20))
    batch0, _ = d0.batch(0, student, raw)
    assert np.array_equal(np.asarray(batch0["tokens"])[:, 1:], raw["target"])
    dh, _ = _data("fkl,student,smoke", tmp_path)
    frac = np.mean([dh.choose(s, jax.random.PRNGKey(s)) == "student" for s in range(200)])
    assert 0.35 < frac < 0.65


def test_distillm_adaptive_fills_replay_then_replays(tmp_path):
    student = TransformerLM(lm_config(vocab_size=TASK.vocab_size, width=16, depth=1, num_heads=2, max_len=8),
                            rngs=nnx.Rngs(0))
    d, cfg = _data("fkl,adaptive,smoke", tmp_path, **{"distill.phi": 1.0, "distill.replay_size": 16})
    raw = _raw()
    seen = []
    for s in range(6):
        _, which = d.batch(s, student, raw)
        seen.append(which)
    assert seen[:2] == ["student", "student"]  # φ = 1 and the buffer is not full
    assert len(d.replay) == 16
    assert "dataset" not in seen


class _Loader:
    def __init__(self):
        self.state = {"next_index": 5}

    def get_state(self):
        return dict(self.state)

    def set_state(self, s):
        self.state = dict(s)


def test_distillm_replay_buffer_is_part_of_the_checkpointed_state(tmp_path):
    student = TransformerLM(lm_config(vocab_size=TASK.vocab_size, width=16, depth=1, num_heads=2, max_len=8),
                            rngs=nnx.Rngs(0))
    over = {"distill.phi": 1.0, "distill.replay_size": 16}
    d, _ = _data("fkl,adaptive,smoke", tmp_path, **over)
    d.loader = _Loader()
    raw = _raw()
    for s in range(4):
        d.batch(s, student, raw)
    saved = json.loads(json.dumps(d.get_state()))  # what the checkpoint stores
    resumed, _ = _data("fkl,adaptive,smoke", tmp_path, **over)
    resumed.loader = _Loader()
    resumed.loader.state = {}
    resumed.set_state(saved)
    assert resumed.loader.state == {"next_index": 5} and resumed.counts == d.counts
    assert len(resumed.replay) == len(d.replay) == 16
    for s in range(4, 8):  # the resumed buffer replays exactly what the uninterrupted one does
        (a, wa), (b, wb) = d.batch(s, student, raw), resumed.batch(s, student, raw)
        assert wa == wb
        np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    assert "replay" in {d.batch(s, student, raw)[1] for s in range(8, 30)}


def _cfg_errors():
    return _experiment("fkl,smoke")


def test_config_errors():
    c = _cfg_errors()
    with c.unlocked():
        c.objective.name = "forward_kl_typo"
    with pytest.raises(ConfigError, match="objective.name"):
        distill.validate(c, check_paths=False)
    c = _cfg_errors()
    with c.unlocked():
        c.objective.name = "grpo"
    with pytest.raises(ConfigError, match="objective.name.*'policy'"):
        distill.validate(c, check_paths=False)
    c = _cfg_errors()
    with c.unlocked():
        c.distill.teacher_from = ""
    with pytest.raises(ConfigError, match="distill.teacher_from"):
        distill.validate(c)
    c = _cfg_errors()
    with c.unlocked():
        c.distill.data = "online"
    with pytest.raises(ConfigError, match="distill.data"):
        distill.validate(c)
    c = _cfg_errors()
    with c.unlocked():
        c.distill.teacher_from = "/nonexistent/run"
    with pytest.raises(ConfigError, match="distill.teacher_from"):
        distill.validate(c)


@pytest.mark.slow
def test_digits_kd_runs_and_student_learns(tmp_path):
    from kljax.train.common import load_config_file
    cfg = load_config_file(os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_kd.py") + ":kd,smoke")
    with cfg.unlocked():
        cfg.task.data_dir = str(tmp_path / "data")
        cfg.total_steps = 60
        cfg.distill.teacher_steps = 60
    ev = distill.run(cfg, str(tmp_path / "kd"))
    assert ev["eval/teacher_accuracy"] > 0.6
    assert ev["eval/accuracy"] > 0.3  # from 0.1 (chance)
    assert np.isfinite(ev["eval/fkl"]) and ev["eval/fkl"] >= 0
    assert os.path.isdir(tmp_path / "kd" / "teacher" / "checkpoints")


@pytest.mark.slow
def test_synthetic_lm_distill_end_to_end(tmp_path):
    cfg = _experiment("rkl,onpolicy,smoke")
    with cfg.unlocked():
        cfg.task.data_dir = str(tmp_path / "data")
    ev = distill.run(cfg, str(tmp_path / "d"))
    for k in ("eval/fkl", "eval/rkl", "eval/source_fkl", "eval/reward"):
        assert np.isfinite(ev[k])
    with open(tmp_path / "d" / "eval.json") as f:
        assert json.load(f)["step"] == cfg.total_steps
    recs = [json.loads(l) for l in open(tmp_path / "d" / "metrics.jsonl")]
    assert all(r.get("data/source", 1.0) == 1.0 for r in recs if "loss" in r)  # λ = 1: student data every step


def test_minillm_config_needs_on_policy_student_data():
    c = _experiment("minillm,smoke")  # the arg defaults to on-policy data
    assert (c.distill.data, c.distill.lam) == ("student", 1.0)
    distill.validate(c)
    for over, field in [({"data": "dataset"}, "distill.data"), ({"lam": 0.5}, "distill.lam"),
                        ({"data": "teacher"}, "distill.data"), ({"data": "adaptive"}, "distill.data"),
                        ({"temperature": 0.7}, "distill.temperature")]:
        c = _experiment("minillm,smoke")
        with c.unlocked():
            c.distill.update(over)
        with pytest.raises(ConfigError, match=field):
            distill.validate(c)


@pytest.mark.slow
def test_minillm_runs_on_the_students_own_samples(tmp_path):
    """The plain score-function surrogate (single_step=False) is the sampled sequence KL log q − log p of
    the batch: positive on average only when the tokens are the student's samples (on the teacher's or the
    dataset's it estimates −KL(p‖q) < 0), and its gradient lowers the reverse KL only then."""
    cfg = _experiment("minillm,smoke")
    with cfg.unlocked():
        cfg.task.data_dir = str(tmp_path / "data")
        cfg.total_steps, cfg.log_every, cfg.batch_size = 40, 1, 16
        cfg.objective.single_step = False
    ev = distill.run(cfg, str(tmp_path / "m"))
    assert np.isfinite(ev["eval/rkl"])
    recs = [json.loads(l) for l in open(tmp_path / "m" / "metrics.jsonl")]
    recs = [r for r in recs if "loss" in r]
    assert len(recs) == 40 and all(np.isfinite(r["loss"]) and r["data/source"] == 1.0 for r in recs)
    seq = np.array([r["distill/seq_reverse_kl"] for r in recs])
    assert np.mean(seq) > 1.0  # sequence KL(q‖p) estimates, ~10 nats here
    rkl = np.array([r["distill/reverse_kl"] for r in recs])  # exact per-token KL(q‖p) on the sampled prefixes
    assert np.mean(rkl[-8:]) < 0.85 * np.mean(rkl[:8])


def test_minillm_student_samples_stay_in_the_teacher_aligned_vocabulary(tmp_path):
    """A Hugging Face teacher compared on the first `vocab` ids (padding rows dropped): MiniLLM's student
    samples come from its distribution renormalized there, the one its loss scores."""
    student = TransformerLM(lm_config(vocab_size=TASK.vocab_size, width=16, depth=1, num_heads=2, max_len=8),
                            rngs=nnx.Rngs(0))
    raw = _raw()

    class Narrow(_Teacher):
        vocab = 3

    d, _ = _data("minillm,smoke", tmp_path)
    d.__init__(d.cfg, TASK, Narrow(), iter(()), d.mesh)
    assert d.student_processor is not None
    batch, which = d.batch(0, student, raw)
    assert which == "student"
    toks, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
    comp = toks[:, 1:][valid[:, 1:] > 0]
    assert comp.size and comp.max() < 3
    # other objectives (GKD) sample from the student's whole vocabulary
    g, _ = _data("fkl,onpolicy,smoke", tmp_path)
    g.__init__(g.cfg, TASK, Narrow(), iter(()), g.mesh)
    assert g.student_processor is None
