"""Bradley–Terry reward model (`loop = "reward_model"`): the loss and its gradient, the scalar read at the
last real token, and end to end through `kljax.main` on preference pairs from a JSONL with a tiny Qwen2."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures as hfx
from kljax.config import ConfigError
from kljax.models import TransformerLM, lm_config, positions_from_valid
from kljax.train import common, evaluation as eval_lib, runs as runs_lib, setup as setup_lib
from kljax.train import reward_model as rm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(REPO, "experiments", "hf.py")


def test_bradley_terry_loss_value_and_gradient(x64):
    rc, rr = jnp.array([1.0, -0.5, 2.0]), jnp.array([0.0, 0.5, 2.5])
    loss, m = rm.bradley_terry_loss(rc, rr)
    d = np.array([1.0, -1.0, -0.5])
    np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-d))), atol=1e-12)   # −mean log σ(r_w − r_l)
    np.testing.assert_allclose(m["accuracy"], 1 / 3)
    np.testing.assert_allclose(m["margin"], d.mean(), atol=1e-12)
    g_c, g_r = jax.grad(lambda a, b: rm.bradley_terry_loss(a, b)[0], argnums=(0, 1))(rc, rr)
    sig = 1 / (1 + np.exp(d))                                                       # σ(−d)
    np.testing.assert_allclose(g_c, -sig / 3, atol=1e-12)
    np.testing.assert_allclose(g_r, sig / 3, atol=1e-12)
    # the centering term adds 2c(r_w + r_l)/B to both gradients
    g_c2, _ = jax.grad(lambda a, b: rm.bradley_terry_loss(a, b, center_coef=0.1)[0], argnums=(0, 1))(rc, rr)
    np.testing.assert_allclose(g_c2, -sig / 3 + 0.2 * np.asarray(rc + rr) / 3, atol=1e-12)
    # far-apart rewards stay finite
    big, _ = rm.bradley_terry_loss(jnp.array([-1e4]), jnp.array([1e4]))
    np.testing.assert_allclose(big, 2e4)


def test_sequence_reward_reads_last_real_token():
    model = TransformerLM(lm_config(vocab_size=11, width=16, depth=1, num_heads=2, max_len=10,
                                    value_head="scalar"), rngs=nnx.Rngs(0))
    prompt = jnp.array([[0, 3, 4, 5], [6, 7, 8, 9]])
    prompt_valid = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    comp = jnp.array([[1, 2, 0, 0], [3, 4, 5, 2]])
    comp_valid = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    score = nnx.jit(rm.sequence_rewards)  # one compiled call (eager op-by-op dispatch is slow here)
    all_values = nnx.jit(lambda mdl, s, vd: mdl.values(mdl.hidden(s, positions_from_valid(vd), vd)))
    r = score(model, prompt, prompt_valid, comp, comp_valid)
    seq, valid = jnp.concatenate([prompt, comp], 1), jnp.concatenate([prompt_valid, comp_valid], 1)
    v = np.asarray(all_values(model, seq, valid))
    np.testing.assert_allclose(r, [v[0, 5], v[1, 7]], rtol=1e-6)
    # tokens after the last real one (padding) change nothing
    comp2 = comp.at[0, 2:].set(jnp.array([9, 9]))
    np.testing.assert_allclose(score(model, prompt, prompt_valid, comp2, comp_valid), r, rtol=1e-6)
    # an empty completion is scored at the prompt's last token
    r0 = score(model, prompt, prompt_valid, comp, jnp.zeros_like(comp_valid))
    v0 = np.asarray(all_values(model, prompt, prompt_valid))
    np.testing.assert_allclose(r0, v0[:, 3], rtol=1e-5)


# --------------------------------------------------------------------------- end to end -----

def pref_rows(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        right, wrong = a + b, a + b + int(rng.integers(1, 9))
        out.append({"prompt": f"what is {a} plus {b}?", "chosen": f"{a} + {b} = {right}. #### {right}",
                    "rejected": f"The number {wrong} is odd"})
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_user")
    model = hfx.user_folder(root / "tiny-qwen2", "qwen2", vocab_size=320)
    for split, n, seed in (("train", 32, 0), ("test", 8, 1)):
        with open(root / f"{split}.jsonl", "w") as f:
            for r in pref_rows(n, seed):
                f.write(json.dumps(r) + "\n")
    return dict(root=root, model=model, train=str(root / "train.jsonl"), test=str(root / "test.jsonl"),
                data=str(root / "data"))


def run_main(arg, workdir, user, *overrides):
    """`python -m kljax.main --config=experiments/hf.py:<arg> ...` in this process (as tests/test_hf_e2e.py)."""
    from absl import flags
    from kljax import cli
    from kljax import main as kmain
    argv = ["kljax.main", f"--config={HF}:{arg}", f"--workdir={workdir}",
            f"--config.model.hf_path={user['model']}", f"--config.task.train_files={user['train']}",
            f"--config.task.test_files={user['test']}", f"--config.task.data_dir={user['data']}", *overrides]
    rest, kmain._PLAN = cli.preflight(argv, kmain.DEFAULT_CONFIG)
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(rest)
        kmain.main(rest[:1])
    finally:
        kmain._PLAN = None
        flags.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def rm_run(user):
    wd = str(user["root"] / "rm")
    run_main("reward_model,smoke", wd, user, "--config.total_steps=6", "--config.checkpoint.every=3")
    return wd


@pytest.mark.slow
def test_reward_model_smoke_through_main_learns_pairs(rm_run, user):
    wd = rm_run
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f]
    train = [r for r in m if "accuracy" in r]
    assert len(train) == 6
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["margin"]) for r in train)
    # the chosen answers and rejected sentences differ in kind: the model separates them
    assert np.mean([r["loss"] for r in train[-2:]]) < np.mean([r["loss"] for r in train[:2]])
    ev = json.load(open(os.path.join(wd, "eval.json")))
    assert ev["step"] == 6 and ev["eval/accuracy"] >= 0.75 and ev["eval/margin"] > 0
    # the trained workdir loads as a reward function and scores the held-out pairs as the run's eval did
    from kljax.train import sharding as shd
    mesh = shd.make_mesh({"data": -1})
    cfg = runs_lib.read_config(wd)
    rec = eval_lib.test_records(cfg, setup_lib.build_task(cfg), "test")
    score = rm.load_reward_fn(wd, mesh)
    rc = np.asarray(score(rec["prompt"], rec["prompt_valid"], rec["chosen"], rec["chosen_valid"]))
    rr = np.asarray(score(rec["prompt"], rec["prompt_valid"], rec["rejected"], rec["rejected_valid"]))
    np.testing.assert_allclose(np.mean(rc - rr), ev["eval/margin"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.mean(rc > rr), ev["eval/accuracy"])


@pytest.mark.slow
def test_grpo_with_model_reward(rm_run, user):
    """`task.reward = "model:<workdir>"`: the rl loop scores roll-outs with the trained reward model."""
    wd = str(user["root"] / "grpo_rm")
    run_main("grpo,smoke", wd, user, f"--config.task.reward=model:{rm_run}", "--config.task.prompt_key=prompt",
             "--config.task.answer_key=")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f if '"reward"' in line]
    assert len(m) == 2
    for r in m:
        assert np.isfinite(r["reward"]) and np.isfinite(r["loss"]) and r["time/reward_s"] >= 0
        # the reward model's real-valued scores, not the task's 0/1 exact match (a mean of 8 rows in k/8)
        assert r["reward_std"] > 0 and abs(r["reward"] * 8 - round(r["reward"] * 8)) > 1e-4


def test_model_reward_config_errors(rm_run, user, tmp_path):
    cfg = common.load_config_file(f"{HF}:grpo,smoke")
    with cfg.unlocked():
        cfg.model.hf_path = user["model"]
        cfg.task.train_files, cfg.task.test_files = user["train"], user["test"]
        cfg.task.data_dir, cfg.task.prompt_key, cfg.task.answer_key = user["data"], "prompt", ""
        cfg.task.reward = f"model:{rm_run}"
    common.validate(cfg)
    with cfg.unlocked():
        cfg.task.reward = f"model:{tmp_path / 'nope'}"
    with pytest.raises(ConfigError, match="task.reward"):
        common.validate(cfg)


def test_reward_model_config_errors(user, tmp_path):
    cfg = common.load_config_file(f"{HF}:reward_model,smoke")
    with cfg.unlocked():
        cfg.model.hf_path = user["model"]
        cfg.task.train_files, cfg.task.test_files = user["train"], user["test"]
        cfg.task.data_dir = user["data"]
    common.validate(cfg)
    bad = cfg.copy_and_resolve_references()
    with bad.unlocked():
        bad.model.value_head = "none"
    with pytest.raises(ConfigError, match="model.value_head"):
        common.validate(bad)
    bad = cfg.copy_and_resolve_references()
    with bad.unlocked():
        bad.task.chosen_key, bad.task.rejected_key = "", ""
    with pytest.raises(ConfigError, match="task.name"):
        common.validate(bad)


# ------------------------------------------------------------------ PPO with a critic -----

def test_ppo_token_rewards_match_kl_penalized_returns():
    """rl.advantage='gae' at γ = λ = 1, V = 0: A_t = R − β Σ_{s≥t} k1_s, InstructGPT's KL-penalized return
    (`advantages.kl_penalized_returns`, computed independently)."""
    from kljax.objectives import advantages as A
    from kljax.train import rl
    rng = np.random.default_rng(0)
    old, ref = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rw = jnp.array([1.0, -0.5, 2.0])
    adv, ret, kl = rl._gae_batch(rw, old, ref, jnp.zeros((3, 4)), mask, 0.3, 1.0, 1.0, False)
    want = A.kl_penalized_returns(rw, old - ref, mask.astype(jnp.float32), 0.3)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, np.mean(np.sum(np.asarray(old - ref) * np.asarray(mask), -1)), rtol=1e-5)


@pytest.mark.slow
def test_ppo_with_critic_against_reward_model(rm_run, user):
    """experiments/hf.py:ppo,smoke through kljax.main: critic losses logged, β follows Ziegler's rule."""
    wd = str(user["root"] / "ppo_rm")
    run_main("ppo,smoke", wd, user, f"--config.task.reward=model:{rm_run}", "--config.task.prompt_key=prompt",
             "--config.task.answer_key=")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f if '"value_loss"' in line]
    assert len(m) == 2
    for r in m:
        for k in ("loss", "value_loss", "value_clipfrac", "objective/kl", "reward"):
            assert np.isfinite(r[k]), k
    # β_2 = β_1·(1 + clip(KL_1/target − 1, ±0.2)·rows/horizon), rows = 8, target 6, horizon 100
    b1, kl1 = m[0]["kl_coef"], m[0]["objective/kl"]
    np.testing.assert_allclose(m[0]["kl_coef"], 0.05, rtol=1e-6)
    np.testing.assert_allclose(m[1]["kl_coef"], b1 * (1 + np.clip(kl1 / 6.0 - 1, -0.2, 0.2) * 8 / 100), rtol=1e-5)
    assert json.load(open(os.path.join(wd, "eval.json")))["step"] == 2
    # β is checkpointed: a resumed run (total_steps raised) continues the controller from step 2's β
    run_main("ppo,smoke", wd, user, f"--config.task.reward=model:{rm_run}", "--config.task.prompt_key=prompt",
             "--config.task.answer_key=", "--config.total_steps=3")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f if '"value_loss"' in line]
    assert [r["step"] for r in m] == [1, 2, 3]
    b2, kl2 = m[1]["kl_coef"], m[1]["objective/kl"]
    np.testing.assert_allclose(m[2]["kl_coef"], b2 * (1 + np.clip(kl2 / 6.0 - 1, -0.2, 0.2) * 8 / 100), rtol=1e-5)


@pytest.mark.slow
def test_ppo_with_a_separate_critic_against_reward_model(rm_run, user):
    """experiments/hf.py:ppo,separate,smoke: the critic is a second model (the policy's trunk + a scalar
    head, own optimizer); the policy has no value head, and the run's policy still loads as a TrainState."""
    wd = str(user["root"] / "ppo_sep")
    run_main("ppo,separate,smoke", wd, user, f"--config.task.reward=model:{rm_run}", "--config.task.prompt_key=prompt",
             "--config.task.answer_key=", "--config.rl.critic_lr=1e-3")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        m = [json.loads(line) for line in f if '"value_loss"' in line]
    assert [r["step"] for r in m] == [1, 2]
    for r in m:
        for k in ("loss", "value_loss", "critic/grad_norm", "objective/kl", "reward"):
            assert np.isfinite(r[k]), k
    assert m[1]["critic/learning_rate"] == pytest.approx(1e-3)
    ts, cfg = runs_lib.load_state_from(wd, setup_lib.build_mesh(runs_lib.read_config(wd)))
    assert cfg.rl.critic == "separate" and not any("value_" in jax.tree_util.keystr(p)
                                                   for p, _ in jax.tree_util.tree_flatten_with_path(ts.params)[0])


@pytest.mark.parametrize("field,value,needle", [
    ("model.value_head", "none", "model.value_head"),
    ("objective.beta", 0.1, "objective.beta"),
    ("rl.lam", 1.5, "rl.lam"),
    ("rl.kl_horizon", 0.0, "rl.kl_horizon"),
])
def test_gae_config_errors_name_the_field(user, field, value, needle):
    cfg = common.load_config_file(f"{HF}:ppo,smoke")
    with cfg.unlocked():
        cfg.model.hf_path = user["model"]
        cfg.task.train_files, cfg.task.test_files = user["train"], user["test"]
        cfg.task.data_dir, cfg.task.prompt_key, cfg.task.answer_key = user["data"], "prompt", ""
    common.validate(cfg)
    node, *path = field.split(".")
    with cfg.unlocked():
        cfg[node][path[0]] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        common.validate(cfg)


def test_init_from_run_without_value_head_keeps_a_fresh_head():
    """A reward model / critic started from an SFT run: the trunk is copied, the new head kept; any other
    difference is refused (None)."""
    mk = lambda head, width=16, seed=0: nnx.state(TransformerLM(
        lm_config(vocab_size=11, width=width, depth=1, num_heads=2, max_len=8, value_head=head), rngs=nnx.Rngs(seed)),
        nnx.Param)
    sft, rmodel = mk("none", seed=1), mk("scalar", seed=2)
    merged = runs_lib.merge_params(rmodel, sft)
    flat = lambda t: {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    m, s_, r_ = flat(merged), flat(sft), flat(rmodel)
    assert set(m) == set(r_) and set(m) - set(s_) and all("value_" in k for k in set(m) - set(s_))
    for k in m:
        np.testing.assert_array_equal(m[k], s_[k] if k in s_ else r_[k])
    assert runs_lib.merge_params(sft, rmodel) is None          # a head the target lacks
    assert runs_lib.merge_params(mk("scalar", width=8), sft) is None  # a shape differs


@pytest.mark.slow
def test_aot_compiles_the_critic_and_reward_model_steps():
    """`kljax.aot` lowers PPO-with-critic's train step (per-token advantages, critic targets) and the
    reward-model step for a TPU topology (the pod smoke config's model)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from kljax import aot
    cfg = common.load_config_file(os.path.join(REPO, "experiments", "pod_grpo.py") + ":smoke")
    with cfg.unlocked():
        cfg.objective.name, cfg.objective.beta = "ppo", 0.0
        cfg.rl.advantage = "gae"
        cfg.model.value_head = "scalar"
    rows, text, status = aot.check(cfg, "v5e:2x2")
    assert status == 0 and "train_step" in text, text
    with cfg.unlocked():  # a separate critic: its own step is compiled too
        cfg.rl.critic, cfg.model.value_head = "separate", "none"
    rows, text, status = aot.check(cfg, "v5e:2x2")
    assert status == 0 and "critic_step" in text, text
    with cfg.unlocked():
        cfg.loop = "reward_model"
        cfg.model.value_head = "scalar"
    rows, text, status = aot.check(cfg, "v5e:2x2")
    assert status == 0 and "chosen + rejected" in text, text


@pytest.mark.slow
def test_dpo_on_the_users_preference_pairs(user):
    """`experiments/hf.py:dpo,smoke`: DPO on the JSONL's own (prompt, chosen, rejected) rows, from
    model.hf_path (also the fixed reference); eval = implicit-reward accuracy on the test pairs."""
    wd = str(user["root"] / "dpo")
    run_main("dpo,smoke", wd, user, "--config.total_steps=8", "--config.checkpoint.every=4")
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        train = [json.loads(line) for line in f if '"loss"' in line]
    assert len(train) == 8 and all(np.isfinite(r["loss"]) for r in train)
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # π = π_ref at the start: −log σ(0)
    assert np.mean([r["loss"] for r in train[-2:]]) < train[0]["loss"]
    ev = json.load(open(os.path.join(wd, "eval.json")))
    assert ev["eval/num_examples"] == 8  # the 8 test pairs, all kept
    assert ev["eval/rewards/accuracies"] >= 0.75 and ev["eval/rewards/margins"] > 0
    cfg = common.load_config_file(f"{HF}:dpo,smoke")
    cfg.task.train_files, cfg.task.chosen_key, cfg.task.rejected_key = user["train"], "", ""
    cfg.model.hf_path, cfg.task.data_dir = user["model"], user["data"]
    with pytest.raises(ConfigError, match=r"preference.pairs='dataset'.*chosen/rejected"):
        common.validate(cfg)
