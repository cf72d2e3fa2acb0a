"""Tasks: generators, serialization, tokenizers, rewards, tfds array_record builders and caching."""
import collections
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kljax import tasks
from kljax.tasks import arithmetic as arith_mod
from kljax.tasks import base
from kljax.tasks import star_graph as sg_mod


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_unknown_name_hint():
    assert tasks.names() == ["arithmetic", "digits", "files", "star_graph", "synthetic_lm"]
    with pytest.raises(KeyError, match=r"star_graph.*Registered tasks"):
        tasks.get("star_grpah")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(TypeError, match="num_nodes"):
        tasks.get("star_graph", nodes=10)


# ---------------------------------------------------------------------------------------------
# star graph


def _star(**kw):
    kw = {"degree": 3, "path_len": 4, "num_nodes": 20, "train_size": 30, "test_size": 10, **kw}
    return tasks.get("star_graph", **kw)


def _assert_star_graph(edges, source, goal, path, degree, path_len, num_nodes):
    edges = [tuple(e) for e in np.asarray(edges).tolist()]
    assert len(edges) == degree * (path_len - 1)
    nodes = {n for e in edges for n in e}
    assert len(nodes) == degree * (path_len - 1) + 1  # all labels distinct
    assert all(0 <= n < num_nodes for n in nodes)
    out_deg = collections.Counter(u for u, _ in edges)
    in_deg = collections.Counter(v for _, v in edges)
    assert out_deg[source] == degree and in_deg[source] == 0
    for n in nodes - {source}:
        assert in_deg[n] == 1 and out_deg[n] <= 1  # arms are simple chains
    # the path walks edges from s to g
    assert path[0] == source and path[-1] == goal and len(path) == path_len
    assert all((a, b) in edges for a, b in zip(path[:-1], path[1:]))
    # exactly one arm reaches g: follow each arm from s
    succ = dict(edges[i] for i in range(len(edges)) if edges[i][0] != source)
    reach = 0
    for first in [v for u, v in edges if u == source]:
        node, arm = first, [source, first]
        while node in succ:
            node = succ[node]
            arm.append(node)
        assert len(arm) == path_len
        reach += node == goal
    assert reach == 1


@pytest.mark.parametrize("degree,path_len,num_nodes", [(2, 5, 50), (3, 4, 10), (1, 2, 2), (5, 3, 11)])
def test_star_graph_generator_structure(degree, path_len, num_nodes):
    rng = np.random.default_rng(1)
    for _ in range(50):
        edges, s, g, path = sg_mod.sample_star_graph(rng, degree, path_len, num_nodes)
        _assert_star_graph(edges, s, g, path, degree, path_len, num_nodes)


def test_star_graph_serialization_matches_bachmann_nagarajan_format():
    task = tasks.get("star_graph", degree=2, path_len=5, num_nodes=50)
    assert (task.prompt_len, task.completion_len, task.vocab_size) == (27, 6, 55)
    edges = np.array([[32, 3], [16, 12], [3, 19], [32, 34], [34, 6], [6, 16], [19, 47], [47, 28]])
    ids = task.prompt_ids(edges, 32, 12)
    # the example line of B&N's deg_2_path_5_nodes_50 test file
    assert task.tokenizer.decode(ids) == "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12="
    rec = task.make_record(ids, [32, 34, 6, 16, 12])
    assert task.tokenizer.decode(rec["target"]) == "32,34,6,16,12<eos>"
    assert rec["prompt_valid"].all() and rec["target_valid"].all()


def test_star_graph_records_hold_a_true_path():
    task = _star()
    for split in ("train", "test"):
        for rec in task.generate(split):
            assert rec["prompt"].shape == (task.prompt_len,) and rec["target"].shape == (task.completion_len,)
            edges, s, g = task.parse_prompt(rec["prompt"], rec["prompt_valid"])
            path = rec["target"][rec["target_valid"] > 0].tolist()
            assert path[-1] == task.eos_id
            _assert_star_graph(edges, s, g, path[:-1], 3, 4, 20)


def test_star_graph_reverse_writes_goal_first():
    fwd, rev = _star(), _star(reverse=True)
    a, b = next(fwd.generate("test")), next(rev.generate("test"))
    np.testing.assert_array_equal(a["prompt"], b["prompt"])
    assert b["target"][:4].tolist() == a["target"][:4][::-1].tolist()


def test_star_graph_too_few_nodes_names_the_numbers():
    with pytest.raises(ValueError, match=r"degree=3, path_len=5, num_nodes=12.*13"):
        tasks.get("star_graph", degree=3, path_len=5, num_nodes=12)
    with pytest.raises(ValueError, match="path_len"):
        tasks.get("star_graph", path_len=1)


def test_star_graph_deterministic_and_splits_disjoint():
    keys = {}
    for split in ("train", "test"):
        a = [r["prompt"].tolist() for r in _star().generate(split)]
        b = [r["prompt"].tolist() for r in _star().generate(split)]
        c = [r["prompt"].tolist() for r in _star(seed=1).generate(split)]
        assert a == b and a != c
        keys[split] = set()
        for r in _star().generate(split):
            e, s, g = _star().parse_prompt(r["prompt"], r["prompt_valid"])
            keys[split].add(sg_mod.graph_key(e, s, g))
    assert not keys["train"] & keys["test"]


def test_disjointness_gives_up_with_clear_error_on_tiny_space():
    # G(1,2,2): only two graphs exist (0->1, 1->0); 2 test graphs leave nothing for train
    task = tasks.get("star_graph", degree=1, path_len=2, num_nodes=2, train_size=3, test_size=8)
    with pytest.raises(ValueError, match="disjoint from the test split"):
        list(task.generate("train"))


def test_star_graph_reward():
    task = _star(wrong_reward=-0.1)
    recs = list(task.generate("test"))[:4]
    batch = {k: np.stack([r[k] for r in recs]) for k in recs[0]}
    eos, pad = task.eos_id, task.pad_id
    t = batch["target"]
    comp = np.full((4, 7), pad, np.int32)
    mask = np.zeros((4, 7), np.int32)
    comp[0, :5] = t[0, :5]; mask[0, :5] = 1                      # exact path + EOS
    comp[1, :4] = t[1, :4]; comp[1, 4] = t[1, 0]; mask[1, :5] = 1  # ends at the wrong node, EOS missing
    comp[2, :4] = t[2, :4]; mask[2, :4] = 1                      # right path, no EOS
    comp[3, :5] = t[3, :5]; comp[3, 1] = t[3, 2]; mask[3, :5] = 1  # a wrong step
    r = task.reward(comp, mask, batch)
    assert r.dtype == np.float32
    np.testing.assert_allclose(r, [1.0, -0.1, -0.1, -0.1])
    # the exact path, then junk after EOS that the mask still covers: EOS ends the answer
    comp2 = comp.copy(); comp2[2, :5] = t[2, :5]; comp2[2, 5:] = 3; mask2 = mask.copy(); mask2[2, :] = 1
    assert task.reward(comp2, mask2, batch)[2] == 1.0
    # a token hidden by the mask does not count
    mask3 = mask.copy(); mask3[0, 2] = 0
    assert task.reward(comp, mask3, batch)[0] == -0.1
    with pytest.raises(ValueError, match="shape"):
        task.reward(comp, mask[:, :3], batch)


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_numeral_tokenizer_round_trip_and_errors():
    tok = _star().tokenizer
    text = "3,4|4,17|0,19/3,17=3,4,17<eos><pad>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[:3] == [3, 4, 20] and ids[-2:] == [tok.id_of("<eos>"), tok.id_of("<pad>")]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tok.vocab_size, 40).tolist()
    assert tok.encode(tok.decode(ids)) == ids
    with pytest.raises(ValueError, match="out of range"):
        tok.encode("3,20")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("3+4")


def test_char_tokenizer_round_trip():
    tok = tasks.get("arithmetic").tokenizer
    assert tok.encode("12+7=") == [1, 2, 10, 7, 12]
    assert tok.decode(tok.encode("905*31=2<eos>")) == "905*31=2<eos>"
    ids = np.random.default_rng(1).integers(0, tok.vocab_size, 30).tolist()
    assert tok.encode(tok.decode(ids)) == ids


def test_encode_prompts_left_pads_and_refuses_long_prompts():
    task = tasks.get("arithmetic", num_digits=2)
    assert task.prompt_len == 6
    out = task.encode_prompts(["3+45=", "12+34="])
    np.testing.assert_array_equal(out["prompt_valid"], [[0, 1, 1, 1, 1, 1], [1] * 6])
    assert out["prompt"][0, 0] == task.pad_id and out["prompt"][0, 1] == 3
    with pytest.raises(ValueError, match=r"prompt has 7 tokens.*at most 6"):
        task.encode_prompts(["123+45="])


# ---------------------------------------------------------------------------------------------
# arithmetic


def test_arithmetic_records_are_correct_sums_and_products():
    task = tasks.get("arithmetic", num_digits=3, num_operands=3, ops="+*", train_size=40, test_size=10)
    assert task.completion_len == len(str(999 * 999 * 999)) + 1
    seen_ops = set()
    for rec in task.generate("train"):
        prompt = task.tokenizer.decode(rec["prompt"][rec["prompt_valid"] > 0])
        target = task.tokenizer.decode(rec["target"][rec["target_valid"] > 0])
        assert prompt.endswith("=") and target.endswith("<eos>")
        expr = prompt[:-1]
        seen_ops |= set(c for c in expr if c in "+*")
        assert int(target[: -len("<eos>")]) == eval(expr)  # Python's precedence is the spec
        assert all(len(x) <= 3 for x in expr.replace("*", "+").split("+"))
    assert seen_ops == {"+", "*"}


def test_arithmetic_reverse_answer_and_splits_disjoint():
    task = tasks.get("arithmetic", num_digits=2, reverse_answer=True, train_size=50, test_size=20)
    for rec in task.generate("test"):
        p = task.tokenizer.decode(rec["prompt"][rec["prompt_valid"] > 0])[:-1]
        a = task.tokenizer.decode(rec["target"][rec["target_valid"] > 0])[: -len("<eos>")]
        assert a[::-1] == str(eval(p))
    # one-digit sums: only 100 problems, so 60 train draws would surely hit a test problem by chance
    small = tasks.get("arithmetic", num_digits=1, train_size=60, test_size=30)
    prompts = {s: {tuple(r["prompt"]) for r in small.generate(s)} for s in small.splits}
    assert len(prompts["test"]) > 20 and len(prompts["train"]) > 30
    assert not prompts["train"] & prompts["test"]


def test_arithmetic_reward_exact_and_format():
    task = tasks.get("arithmetic", num_digits=2, format_reward=0.2)
    batch = {k: v for k, v in task.make_record(task.tokenizer.encode("47+85="), task.tokenizer.encode("132")).items()}
    batch = {k: np.stack([v] * 5) for k, v in batch.items()}
    enc = task.tokenizer.encode
    rows = ["132<eos>", "131<eos>", "13", "1+2<eos>", "<eos>"]
    comp = np.full((5, 4), task.pad_id, np.int32)
    mask = np.zeros((5, 4), np.int32)
    for i, r in enumerate(rows):
        ids = enc(r)
        comp[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    np.testing.assert_allclose(task.reward(comp, mask, batch), [1.0, 0.2, 0.0, 0.0, 0.0])
    plain = tasks.get("arithmetic", num_digits=2)
    np.testing.assert_allclose(plain.reward(comp, mask, batch), [1.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="format_reward"):
        tasks.get("arithmetic", format_reward=2.0)
    with pytest.raises(ValueError, match="ops"):
        tasks.get("arithmetic", ops="-")


def test_evaluate_precedence():
    assert arith_mod.evaluate([2, 3, 4], ["+", "*"]) == 14
    assert arith_mod.evaluate([2, 3, 4], ["*", "+"]) == 10


# ---------------------------------------------------------------------------------------------
# synthetic language


def test_synthetic_lm_true_logprobs_match_empirical_frequencies():
    task = tasks.get("synthetic_lm", vocab=4, seq_len=12, eos_prob=0.1, train_size=8, test_size=8)
    p = task.transition
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    toks = task.sample(4000, np.random.default_rng(0))
    assert (toks[:, 0] == task.bos_id).all()
    # empirical transition counts from content token 0 agree with the source row
    prev, nxt = toks[:, :-1].reshape(-1), toks[:, 1:].reshape(-1)
    sel = nxt[prev == 0]
    freq = np.bincount(sel, minlength=task.vocab_size) / len(sel)
    np.testing.assert_allclose(freq, p[0], atol=0.03)
    lp = task.true_logprobs(toks[:3])
    assert lp.shape == (3, 12, task.vocab_size) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
    smooth = task.true_logprobs(toks[:3], smoothing=0.1)
    assert np.isfinite(smooth).all() and np.isneginf(lp).any()
    np.testing.assert_allclose(np.exp(smooth), 0.9 * np.exp(lp) + 0.1 / task.vocab_size, atol=1e-6)
    tlp = task.true_token_logprobs(toks[:3])
    np.testing.assert_allclose(tlp, np.log(p[toks[:3, :-1], toks[:3, 1:]]), rtol=1e-5)


def test_synthetic_lm_records_and_validity():
    task = tasks.get("synthetic_lm", vocab=4, seq_len=10, eos_prob=0.3, train_size=20, test_size=5)
    recs = list(task.generate("train"))
    for r in recs:
        v = r["valid"]
        n = int(v.sum())
        assert v[:n].all() and not v[n:].any()  # a prefix
        toks = r["tokens"][:n].tolist()
        assert toks[0] == task.bos_id and task.pad_id not in toks
        if n < task.seq_len:
            assert toks[-1] == task.eos_id
        np.testing.assert_array_equal(r["target"][r["target_valid"] > 0], r["tokens"][1:n])
    assert any(r["valid"].sum() < task.seq_len for r in recs)
    assert task.tokenizer.decode(task.tokenizer.encode("<bos> t3 t0 <eos>")) == "<bos> t3 t0 <eos>"
    # reward: the mean true log-likelihood of the completion
    batch = {k: np.stack([r[k] for r in recs[:2]]) for k in recs[0]}
    r = task.reward(batch["target"], batch["target_valid"], batch)
    ll = task.true_token_logprobs(batch["tokens"])
    want = (ll * batch["valid"][:, 1:]).sum(1) / batch["valid"][:, 1:].sum(1)
    np.testing.assert_allclose(r, want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# builders: array_record, read-back, caching


def test_builder_writes_array_record_and_reads_back_the_same_records(tmp_path):
    task = _star()
    src = task.data_source("test", str(tmp_path))
    files = list(tmp_path.rglob("*.array_record*"))
    assert {f.name.split(".")[0] for f in files} == {"star_graph-train", "star_graph-test"}
    assert task.config_name() in str(files[0])
    got = sorted(tuple(src[i]["prompt"].tolist()) + tuple(src[i]["target"].tolist()) for i in range(len(src)))
    want = sorted(tuple(r["prompt"].tolist()) + tuple(r["target"].tolist()) for r in task.generate("test"))
    assert len(src) == 10 and got == want
    rec = src[0]
    assert set(rec) == {"prompt", "prompt_valid", "target", "target_valid"}
    assert all(v.dtype == np.int32 for v in rec.values())
    with pytest.raises(ValueError, match="unknown split"):
        task.data_source("validation", str(tmp_path))


def test_cache_reused_and_rebuilt_on_parameter_or_version_change(tmp_path, monkeypatch):
    d = str(tmp_path)
    task = tasks.get("arithmetic", num_digits=2, train_size=12, test_size=4)
    key = ("arithmetic", task.config_name())
    before = base.GENERATION_COUNT[key]
    task.data_source("train", d)
    assert base.GENERATION_COUNT[key] == before + 1
    files = sorted(tmp_path.rglob("*.array_record*"))
    mtimes = [os.path.getmtime(f) for f in files]
    task.data_source("test", d)
    tasks.get("arithmetic", num_digits=2, train_size=12, test_size=4).data_source("train", d)
    assert base.GENERATION_COUNT[key] == before + 1  # reused, not regenerated
    assert [os.path.getmtime(f) for f in files] == mtimes
    # a reward-only parameter shares the data
    tasks.get("arithmetic", num_digits=2, train_size=12, test_size=4, format_reward=0.5).data_source("train", d)
    assert base.GENERATION_COUNT[key] == before + 1
    # another data parameter gets its own directory
    other = tasks.get("arithmetic", num_digits=3, train_size=12, test_size=4)
    other.data_source("train", d)
    assert base.GENERATION_COUNT[("arithmetic", other.config_name())] >= 1
    assert other.config_name() != task.config_name()
    # a new builder VERSION rebuilds
    monkeypatch.setattr(arith_mod.ArithmeticBuilder, "VERSION", tfds.core.Version("1.0.1"))
    src = task.data_source("train", d)
    assert base.GENERATION_COUNT[key] == before + 2
    assert len(src) == 12 and any("1.0.1" in str(p) for p in tmp_path.rglob("*.array_record*"))


def test_synthetic_lm_builder_reads_back(tmp_path):
    task = tasks.get("synthetic_lm", vocab=4, seq_len=8, train_size=6, test_size=3)
    src = task.data_source("train", str(tmp_path))
    got = sorted(tuple(src[i]["tokens"].tolist()) for i in range(len(src)))
    want = sorted(tuple(r["tokens"].tolist()) for r in task.generate("train"))
    assert got == want


def test_digits_split_and_shapes(tmp_path):
    task = tasks.get("digits", test_fraction=0.25)
    xtr, ytr = task.arrays("train")
    xte, yte = task.arrays("test")
    assert xtr.shape[1:] == (8, 8) and xtr.dtype == np.float32 and ytr.dtype == np.int32
    assert len(yte) == round(0.25 * 1797) and len(ytr) + len(yte) == 1797
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0
    assert set(np.unique(ytr)) == set(range(10))
    # deterministic, and the two splits are different images of the same pool
    np.testing.assert_array_equal(tasks.get("digits", test_fraction=0.25).arrays("test")[1], yte)
    from sklearn.datasets import load_digits

    pool = load_digits().images.reshape(1797, -1) / 16.0
    idx = lambda xs: {int(np.argmin(np.abs(pool - x.reshape(1, -1)).sum(1))) for x in xs}  # noqa: E731
    assert not idx(xte) & idx(xtr[:200])
    src = task.data_source("test", str(tmp_path))
    assert len(src) == len(yte)
    rec = src[0]
    assert rec["image"].shape == (8, 8) and rec["image"].dtype == np.float32 and rec["label"].dtype == np.int32
    r = task.reward(np.array([[int(rec["label"])], [(int(rec["label"]) + 1) % 10]]), None,
                    {"label": np.array([rec["label"], rec["label"]])})
    np.testing.assert_allclose(r, [1.0, 0.0])


def test_default_data_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KLJAX_DATA_DIR", str(tmp_path / "here"))
    assert tasks.default_data_dir() == str(tmp_path / "here")
    src = tasks.get("arithmetic", num_digits=1, train_size=5, test_size=3).data_source("test")
    assert len(src) == 3 and list((tmp_path / "here" / "arithmetic").rglob("*.array_record*"))
    monkeypatch.delenv("KLJAX_DATA_DIR")
    assert tasks.default_data_dir().endswith(os.path.join(".cache", "kljax", "data"))


def test_concurrent_build_loser_uses_the_winners_files(tmp_path, monkeypatch):
    task = tasks.get("arithmetic", num_digits=1, train_size=6, test_size=3)
    real = base.TaskBuilder.download_and_prepare

    def lose_the_race(self, *a, **kw):
        real(task.builder(str(tmp_path)))  # another process finishes first ...
        raise OSError("Directory not empty")  # ... so this one's rename fails

    monkeypatch.setattr(base.TaskBuilder, "download_and_prepare", lose_the_race)
    assert len(task.data_source("train", str(tmp_path))) == 6
    # a failure that leaves no complete dataset is raised
    other = tasks.get("arithmetic", num_digits=2, train_size=6, test_size=3)

    def fail(self, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(base.TaskBuilder, "download_and_prepare", fail)
    with pytest.raises(OSError, match="disk full"):
        other.data_source("train", str(tmp_path))
