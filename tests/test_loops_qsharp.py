"""Q♯ loop pieces: round collection, oracle-critic guidance, guided KL, DPO pairs, config errors, end to end."""
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kljax import tasks
from kljax.config import ConfigError
from kljax.models import TransformerLM, lm_config
from kljax.train import preference, qsharp

TASK = tasks.get("star_graph", degree=2, path_len=3, num_nodes=8, train_size=32, test_size=16)


def _records(split="test", n=16):
    rows = list(itertools.islice(TASK.generate(split), n))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture(scope="module")
def models():
    v = TASK.vocab_size
    ref = TransformerLM(lm_config(vocab_size=v, width=16, depth=1, num_heads=2, max_len=32), rngs=nnx.Rngs(0))
    critic = TransformerLM(lm_config(vocab_size=v, width=16, depth=1, num_heads=2, max_len=32, value_head="token"),
                           rngs=nnx.Rngs(1))
    return ref, critic


def _oracle(target, tokens, positions, valid):
    """Critic logits: +20 for the target's next token while the prefix is on the path, else −20."""
    del positions, valid
    b, n = target.shape
    s = tokens.shape[1]
    p = s - n
    eq = (tokens[:, p:] == target).astype(jnp.int32)
    ok_before = jnp.concatenate([jnp.ones((b, 1), jnp.int32), jnp.cumprod(eq, axis=1)[:, :-1]], axis=1)
    hit = jax.nn.one_hot(target, TASK.vocab_size) * ok_before[..., None]  # [B, N, V]
    comp = jnp.where(hit > 0, 20.0, -20.0)
    return jnp.pad(comp, ((0, 0), (p - 1, 1), (0, 0)), constant_values=-20.0)


def test_collect_round_shapes_and_labels(models):
    ref, critic = models
    rec = _records("train", 8)
    out = qsharp.collect_round(ref, critic, TASK, rec, jax.random.PRNGKey(0), eta=0.1, kind="bernoulli",
                               top_k=0, guided=True)
    b, p, n = 8, TASK.prompt_len, TASK.completion_len
    for k in ("tokens", "valid", "positions", "mask"):
        assert out[k].shape == (b, p + n), k
    assert out["returns"].shape == (b,) and set(np.unique(out["returns"])) <= {0.0, 1.0}
    assert np.all((out["switch"] >= 0) & (out["switch"] < n))
    # mask: only positions predicting completion tokens at index >= switch (and real ones)
    j = np.arange(p + n) + 1 - p
    assert np.all(out["mask"][:, j < 0] == 0)
    for row in range(b):
        assert np.all(out["mask"][row, (j >= 0) & (j < out["switch"][row])] == 0)
        first = p - 1 + out["switch"][row]
        assert out["mask"][row, first] == 1  # the switch token itself is always real (EOS ends later or there)
    # the returns are the task's reward of the completion
    comp = out["tokens"][:, p:]
    cmask = out["valid"][:, p:]
    assert np.array_equal(out["returns"], TASK.reward(comp, cmask, rec))


def test_oracle_critic_guidance_is_near_perfect(models):
    ref, _ = models
    rec = _records("test", 16)
    oracle = jax.tree_util.Partial(_oracle, jnp.asarray(rec["target"]))
    res = qsharp.evaluate_guided(ref, oracle, TASK, rec, jax.random.PRNGKey(1), etas=(0.01,), kind="bernoulli",
                                 top_k=0, guidances=("qsharp", "cd"), batch_size=16)
    assert res["eval/qsharp/eta=0.01/accuracy"] >= 0.95
    assert res["eval/cd/eta=0.01/accuracy"] >= 0.95
    assert res["eval/ref/accuracy"] <= 0.5  # an untrained reference almost never finds the path
    assert res["eval/ref/kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["eval/qsharp/eta=0.01/kl"] > 1.0  # guidance moved far from π_ref


def test_guidance_switches_to_reference_after_switch_time(models):
    ref, _ = models
    rec = _records("test", 8)
    oracle = jax.tree_util.Partial(_oracle, jnp.asarray(rec["target"]))
    from kljax.sampling import generate
    key = jax.random.PRNGKey(3)
    never = qsharp.make_processor(oracle, 0.01, np.zeros(8, np.int32), guidance="qsharp")
    a = generate(ref, rec["prompt"], rec["prompt_valid"], key, TASK.completion_len, TASK.eos_id,
                 logits_processor=never, pad_id=TASK.pad_id)
    b = generate(ref, rec["prompt"], rec["prompt_valid"], key, TASK.completion_len, TASK.eos_id, pad_id=TASK.pad_id)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))  # switch at 0 = pure π_ref roll-out


def test_critic_loss_decreases(models):
    from kljax import objectives
    _, critic = models
    rec = _records("train", 8)
    ref, _ = models
    data = qsharp.collect_round(ref, None, TASK, rec, jax.random.PRNGKey(0), eta=0.1, kind="bernoulli", guided=False)
    data["returns"] = np.arange(8, dtype=np.float32) % 2  # both labels present
    batch = {k: jnp.asarray(data[k]) for k in ("tokens", "valid", "positions", "mask", "returns")}
    import optax
    model = nnx.clone(critic)
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    obj = objectives.get("qsharp_bce")

    def loss_of(m):
        return qsharp.critic_loss(m, batch, None, objective=obj, hparams={})[0]

    @nnx.jit
    def train(model, opt):
        opt.update(model, nnx.grad(loss_of)(model))
        return loss_of(model)

    first = float(loss_of(model))
    for _ in range(20):
        last = train(model, opt)
    assert float(last) < 0.5 * first


def test_collect_pairs_rejected_fail_and_chosen_is_target(models):
    ref, _ = models
    rec = _records("train", 8)
    pairs = preference.collect_pairs(ref, TASK, rec, jax.random.PRNGKey(0), max_tries=3)
    k = len(pairs["prompt"])
    assert k >= 1
    r = TASK.reward(pairs["rejected"], pairs["rejected_valid"], {"target": pairs["chosen"],
                                                                   "target_valid": pairs["chosen_valid"]})
    assert np.all(r < 1)
    assert np.all(TASK.reward(pairs["chosen"], pairs["chosen_valid"], {"target": pairs["chosen"],
                                                                       "target_valid": pairs["chosen_valid"]}) == 1)


# ---------------------------------------------------------------------------------------------
# Config errors and end to end


def _cfg(tmp_path, loop="qsharp", **over):
    from kljax.config import base_config
    c = base_config(loop)
    c.task = ml_collections.ConfigDict(dict(name="star_graph", degree=2, path_len=3, num_nodes=8, train_size=64,
                                            test_size=8, data_dir=str(tmp_path / "data")))
    c.model.width, c.model.depth, c.model.num_heads = 16, 1, 2
    c.batch_size, c.log_every = 8, 1
    c.eval.num_examples, c.eval.batch_size = 8, 8
    c.optim.warmup_steps = 1
    c.checkpoint.every = 2
    if loop == "qsharp":
        c.model.value_head = "token"
        c.objective = ml_collections.ConfigDict(dict(name="qsharp_bce"))
        c.qsharp = ml_collections.ConfigDict(dict(rounds=2, critic_steps=2, rollouts_per_round=8, rollin_eta=0.1,
                                                  etas=(0.1,), guidances=("qsharp", "cd"), top_k=4, temperature=1.0,
                                                  critic_init="reference", v_min=0.0, v_max=1.0))
        c.total_steps = 4
    else:
        c.total_steps = 2
    for k, v in over.items():
        node = c
        *head, last = k.split(".")
        for h in head:
            node = node[h]
        node[last] = v
    return c


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.value_head"):
        qsharp.validate(_cfg(tmp_path, **{"model.value_head": "none"}), check_paths=False)
    with pytest.raises(ConfigError, match="model.num_atoms"):
        qsharp.validate(_cfg(tmp_path, **{"objective.name": "qsharp_histogram"}), check_paths=False)
    with pytest.raises(ConfigError, match="objective.name"):
        qsharp.validate(_cfg(tmp_path, **{"objective.name": "grpo"}), check_paths=False)
    with pytest.raises(ConfigError, match="objective.name"):
        qsharp.validate(_cfg(tmp_path, **{"objective.name": "q_sharp"}), check_paths=False)
    with pytest.raises(ConfigError, match="init_from"):
        qsharp.validate(_cfg(tmp_path))
    with pytest.raises(ConfigError, match="total_steps"):
        qsharp.validate(_cfg(tmp_path, total_steps=5), check_paths=False)


@pytest.mark.slow
def test_qsharp_end_to_end_and_resume(tmp_path):
    from kljax.train import metrics, sft
    ref_cfg = _cfg(tmp_path, loop="sft")
    sft.run(ref_cfg, str(tmp_path / "ref"))
    cfg = _cfg(tmp_path, init_from=str(tmp_path / "ref"))
    qsharp.validate(cfg)
    work = str(tmp_path / "q")
    ev = qsharp.run(cfg, work)
    for name in ("eval/ref/accuracy", "eval/qsharp/eta=0.1/accuracy", "eval/cd/eta=0.1/kl", "eval/accuracy"):
        assert name in ev and np.isfinite(ev[name])
    assert sorted(os.listdir(os.path.join(work, "qsharp_data"))) == ["round_0.npz", "round_1.npz"]
    with np.load(os.path.join(work, "qsharp_data", "round_1.npz")) as z:
        assert z["tokens"].shape == (8, TASK.prompt_len + TASK.completion_len)
    # rerunning finds the finished run: nothing is retrained, the same evaluation comes back
    ev2 = qsharp.run(cfg, work)
    assert ev2["eval/qsharp/eta=0.1/accuracy"] == ev["eval/qsharp/eta=0.1/accuracy"]
    recs = [r for r in metrics.read_metrics(work) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]


def test_top_k_rest_mask_drops_the_tail_reference_keeps_it_unguided():
    """`qsharp.top_k_rest`: inside π_ref's top-k both settings guide alike; outside it "mask" never samples
    a token while "reference" keeps its unguided reference probability (even where the critic favours it)."""
    ref = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    critic = jnp.array([0.0, 3.0, -3.0, 5.0])  # Bernoulli logits: token 3 (outside the top-2) looks best
    p = {rest: np.asarray(jax.nn.softmax(qsharp.guided_logits(ref, critic, 0.5, "qsharp", "bernoulli", top_k=2,
                                                               top_k_rest=rest))) for rest in ("mask", "reference")}
    assert p["mask"][2] == 0 and p["mask"][3] == 0
    assert p["reference"][2] > 0 and p["reference"][3] > 0
    np.testing.assert_allclose(p["reference"][2] / p["reference"][3], 3.0, rtol=1e-5)  # π_ref's ratio, unguided
    np.testing.assert_allclose(p["mask"][0] / p["mask"][1], p["reference"][0] / p["reference"][1], rtol=1e-5)
    assert p["reference"][1] / p["reference"][0] > 0.3 / 0.5  # guided inside the top-k
    full = [qsharp.guided_logits(ref, critic, 0.5, "qsharp", "bernoulli", top_k=0, top_k_rest=r) for r in p]
    np.testing.assert_allclose(*full)  # no top-k: the setting does nothing


def test_top_k_rest_reaches_guided_decoding_and_its_kl(models):
    """Through the loop's evaluation (the processor inside `generate` and the exact KL): with top_k = 1 and
    a critic that guides nothing (constant outputs, η large), "mask" decodes π_ref greedily (KL > 0) while
    "reference" leaves π_ref as it is (KL = 0)."""
    ref, _ = models
    rec = _records("test", 8)
    flat = jax.tree_util.Partial(lambda tokens, positions, valid: jnp.zeros(tokens.shape + (TASK.vocab_size,)))
    kl = {}
    for rest in ("mask", "reference"):
        res = qsharp.evaluate_guided(ref, flat, TASK, rec, jax.random.PRNGKey(2), etas=(1e4,), kind="bernoulli",
                                     top_k=1, top_k_rest=rest, guidances=("qsharp",), batch_size=8)
        kl[rest] = (res["eval/qsharp/eta=10000/kl"], res["eval/ref/kl"])
    assert kl["mask"][0] > 0.1 and kl["mask"][1] > 0.1
    assert kl["reference"][0] == pytest.approx(0.0, abs=1e-3) and kl["reference"][1] == pytest.approx(0.0, abs=1e-5)


def test_top_k_rest_config_error(tmp_path):
    with pytest.raises(ConfigError, match="qsharp.top_k_rest"):
        qsharp.validate(_cfg(tmp_path, **{"qsharp.top_k_rest": "zero"}), check_paths=False)
    qsharp.validate(_cfg(tmp_path, **{"qsharp.top_k_rest": "reference"}), check_paths=False)
