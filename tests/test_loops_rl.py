"""RL loop: sampler/trainer log-prob agreement, DAPO group filling, end-to-end tiny runs
(fixed reference, reset reference, dynamic sampling, KDRL teacher), eval metrics."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kljax.models import TransformerLM, lm_config
from kljax.sampling import generate
from kljax.tasks.star_graph import StarGraph
from kljax.train import common, metrics, rl, runs as runs_lib, sequences as seq_lib, setup as setup_lib, sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SG = os.path.join(REPO, "experiments", "star_graph.py")


def test_completion_logp_matches_sampler_logp():
    # old_logp recomputed by the trainer must equal the sampler's log-prob at temperature 1.
    model = TransformerLM(lm_config(vocab_size=11, width=16, depth=1, num_heads=2, max_len=12), rngs=nnx.Rngs(0))
    prompts = jnp.array([[0, 0, 3, 4, 5], [0, 6, 7, 8, 9]], jnp.int32)
    valid = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], jnp.int32)
    out = generate(model, prompts, valid, jax.random.PRNGKey(1), 5, eos_id=10, temperature=1.0)
    full_valid = jnp.concatenate([valid, out.mask], axis=1)
    logp, logits = seq_lib.completion_logp(model, out.sequences, full_valid, prompts.shape[1])
    m = np.asarray(out.mask) > 0
    np.testing.assert_allclose(np.asarray(logp)[m], np.asarray(out.logp)[m], atol=1e-4)
    assert logits.shape == (2, 5, 11)


def test_rollout_forward_in_row_chunks_equals_one_pass():
    # The old-policy/reference pass runs `minibatch_size` rows at a time so a roll-out's logits never
    # exist whole; chunking must not change any value.
    model = TransformerLM(lm_config(vocab_size=11, width=16, depth=1, num_heads=2, max_len=12), rngs=nnx.Rngs(0))
    g, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    seq = jnp.asarray(rng.integers(0, 11, (6, 9)), jnp.int32)
    valid = jnp.asarray(np.concatenate([np.tile([0, 1, 1, 1], (6, 1)), rng.integers(0, 2, (6, 5))], 1), jnp.int32)
    whole, whole_logits = rl._model_logp(g, params, rest, seq, valid, 4, True)
    for chunk in (2, 3):
        lp, logits = rl._model_logp(g, params, rest, seq, valid, 4, True, chunk)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(whole), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(whole_logits), rtol=1e-5, atol=1e-5)
    assert whole.shape == (6, 5)


def _ro(rewards):
    r = np.asarray(rewards, np.float32)
    return {"rewards": r, "row": np.arange(len(r))}


def test_fill_groups_keeps_only_varying_groups_then_fills():
    G = 2
    first = _ro([1, 1, 0, 1, 0, 0])            # groups: const, varying, const
    more = iter([_ro([0, 1, 1, 1, 1, 0])])     # varying, const, varying
    batch, stats = rl.fill_groups(first, more, 3, G)
    groups = batch["rewards"].reshape(-1, G)
    assert groups.shape == (3, 2)
    assert np.all(groups.std(-1) > 0)
    assert stats["dynamic_sampling/rounds"] == 2 and stats["dynamic_sampling/frac_kept"] == 1.0
    # Exhausted: the missing group is a dropped (constant) one, and the stats say so.
    batch, stats = rl.fill_groups(_ro([1, 1, 0, 1]), iter([]), 2, G)
    assert batch["rewards"].shape == (4,)
    assert stats["dynamic_sampling/frac_kept"] == 0.5


def _even_token_reward(self, completions, completion_mask, batch):
    m = np.asarray(completion_mask, np.float32)
    even = (np.asarray(completions) % 2 == 0).astype(np.float32)
    return ((even * m).sum(-1) / np.maximum(m.sum(-1), 1.0)).astype(np.float32)


def _cfg(arg, data_dir, **fields):
    cfg = common.load_config_file(f"{SG}:{arg}")
    with cfg.unlocked():
        cfg.task.data_dir = data_dir
        for k, v in fields.items():
            node = cfg
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return cfg


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    data_dir = str(root / "data")
    cfg = _cfg("pretrain,smoke", data_dir, eval_every=0)
    common.validate(cfg)
    sft.run(cfg, str(root / "pre"))
    return root, data_dir


@pytest.mark.slow
@pytest.mark.parametrize("variant,extra", [
    ("grpo", {}),
    ("rpg_ufkl_reset", {"rl.reset_every": 1}),
    ("dapo", {}),
    ("grpo", {"objective.name": "kdrl", "objective.beta": 0.0, "objective.clip_eps_low": 0.2}),
])
def test_rl_runs_end_to_end(pretrained, variant, extra, monkeypatch):
    root, data_dir = pretrained
    if variant == "grpo" and not extra:
        # The smoke reference solves no graph, so every group would have reward 0 and a zero
        # advantage: score the fraction of even tokens instead, which varies within every group.
        monkeypatch.setattr(StarGraph, "reward", _even_token_reward)
    wd = str(root / f"{variant}_{len(extra)}")
    fields = {"init_from": str(root / "pre"), "eval.pass_k": 2, **extra}
    if extra.get("objective.name") == "kdrl":
        fields["rl.teacher_from"] = str(root / "pre")
    cfg = _cfg(f"{variant},smoke", data_dir, **fields)
    common.validate(cfg)
    result = rl.run(cfg, wd)
    for k in ("eval/accuracy", "eval/kl", "eval/entropy", "eval/pass@2", "eval/completions/mean_length"):
        assert k in result and np.isfinite(result[k])
    assert result["eval/kl"] >= -1e-6  # exact KL, non-negative up to float32 rounding
    recs = metrics.read_metrics(wd)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    for name in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy",
                 "grad_norm", "learning_rate"):
        assert name in recs[0], name
    with open(os.path.join(wd, "eval.json")) as f:
        assert json.load(f)["step"] == 3
    if variant == "rpg_ufkl_reset":
        assert all(r.get("reference_reset") == 1.0 for r in recs if "loss" in r)
    if variant == "dapo":
        assert "dynamic_sampling/frac_kept" in recs[0]
    if extra.get("objective.name") == "kdrl":
        assert any("kd" in k for k in recs[0]), sorted(recs[0])
    if variant == "grpo" and not extra:
        # The policy moved away from the reference; the reference (init) params are untouched.
        ts, _ = runs_lib.load_state_from(wd, setup_lib.build_mesh(cfg))
        ref, _ = runs_lib.load_state_from(str(root / "pre"), setup_lib.build_mesh(cfg))
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ts.params, ref.params))
        assert max(diffs) > 0


def _ppo_fields(root, critic, **extra):
    return {"init_from": str(root / "pre"), "objective.name": "ppo", "objective.beta": 0.0,
            "objective.kl_estimator": "k1", "rl.advantage": "gae", "rl.critic": critic,
            "model.value_head": "none" if critic == "separate" else "scalar", **extra}


def test_ppo_critic_config_errors(tmp_path):
    from kljax.config import ConfigError
    root, d = tmp_path, str(tmp_path / "data")
    bad = [({"rl.critic": "own"}, "rl.critic"),
           ({"rl.critic": "separate", "model.value_head": "scalar"}, "model.value_head"),
           ({"rl.critic": "shared", "model.value_head": "none"}, "model.value_head"),
           ({"rl.critic": "shared", "model.value_head": "scalar", "rl.critic_lr": 1e-3}, "rl.critic_lr"),
           ({"rl.critic": "separate", "rl.critic_lr": -1.0}, "rl.critic_lr")]
    for over, field in bad:
        cfg = _cfg("grpo,smoke", d, **{**_ppo_fields(root, "separate"), **over})
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            rl.validate(cfg, check_paths=False)
    # Critic fields without a critic (rl.advantage != "gae") are mistakes, not silently ignored.
    cfg = _cfg("grpo,smoke", d, **{"init_from": str(root / "pre"), "rl.critic": "separate"})
    with pytest.raises(ConfigError, match=r"rl\.critic"):
        rl.validate(cfg, check_paths=False)
    rl.validate(_cfg("grpo,smoke", d, **_ppo_fields(root, "separate", **{"rl.critic_lr": 1e-3})), check_paths=False)


@pytest.mark.slow
def test_ppo_separate_critic_learns_and_resumes(pretrained, monkeypatch, tmp_path):
    """A constant reward 1 with no KL penalty makes every GAE return (γ = 1) exactly 1: the separate critic
    can fit it, so its value loss must fall. A run resumed from its step-3 checkpoint must continue exactly
    (the critic's params and optimizer state are in the checkpoint)."""
    import shutil
    root, data_dir = pretrained
    monkeypatch.setattr(StarGraph, "reward", lambda self, c, m, b: np.ones(len(c), np.float32))
    fields = _ppo_fields(root, "separate", **{"rl.kl_coef": 0.0, "rl.value_clip": 10.0, "rl.vf_coef": 1.0,
                                              "rl.critic_lr": 1e-2, "total_steps": 5, "log_every": 1,
                                              "eval_every": 0, "checkpoint.every": 3})
    cfg = _cfg("grpo,smoke", data_dir, **fields)
    common.validate(cfg)
    wd = tmp_path / "ppo"
    rl.run(cfg, str(wd))
    recs = {r["step"]: r for r in metrics.read_metrics(str(wd)) if "loss" in r}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["value_loss"]) and "critic/grad_norm" in r for r in recs.values())
    assert recs[5]["value_loss"] < 0.5 * recs[1]["value_loss"]
    assert recs[5]["value_mean"] > recs[1]["value_mean"] + 0.2  # towards the return 1
    # Resume: the same run with its last checkpoint removed restarts from step 3.
    wd2 = tmp_path / "ppo_resumed"
    shutil.copytree(wd, wd2)
    shutil.rmtree(wd2 / "checkpoints" / "5")
    rl.run(cfg, str(wd2))
    again = {r["step"]: r for r in metrics.read_metrics(str(wd2)) if "loss" in r}
    for s in (4, 5):
        for k in ("value_loss", "value_mean", "critic/grad_norm", "loss"):
            np.testing.assert_allclose(again[s][k], recs[s][k], rtol=1e-5, atol=1e-7, err_msg=f"step {s} {k}")
