"""The `files` task (JSONL/JSON/Parquet/CSV + a Hugging Face tokenizer), user/built-in rewards with TRL's
contract, and tasks registered from user code."""
import csv
import json
import os
import textwrap

import ml_collections
import tensorflow_datasets as tfds
import numpy as np
import pytest

import hf_fixtures as hfx
from kljax import tasks
from kljax.models import load_tokenizer
from kljax.tasks import GENERATION_COUNT, rewards
from kljax.tasks.rewards import RewardError

ROWS = [{"prompt": f"what is {a} plus {b}?", "answer": str(a + b), "solution": f"{a}+{b}={a + b} #### {a + b}",
         "level": a % 3} for a, b in [(1, 2), (30, 4), (7, 70), (12, 12), (5, 55), (9, 0)]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    hfx.train_tokenizer(path, "qwen2")
    return str(path)


def write(path, rows):
    ext = os.path.splitext(str(path))[1]
    if ext == ".jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return str(path)


def make(tok_dir, train, **kw):
    kw.setdefault("prompt_len", 16)
    kw.setdefault("completion_len", 8)
    return tasks.get("files", train_files=train, tokenizer_path=tok_dir, **kw)


def records(task, split, data_dir):
    """The split's records in file-row order (tfds shuffles them on disk)."""
    src = task.data_source(split, str(data_dir))
    return sorted([src[i] for i in range(len(src))], key=lambda r: int(r["row"]))


def test_formats_tokenize_prompt_and_answer(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    got = {}
    for ext in (".jsonl", ".parquet", ".csv"):
        f = write(tmp_path / f"train{ext}", ROWS)
        task = make(tok_dir, f, answer_key="answer")
        got[ext] = records(task, "train", tmp_path / "data")
    for ext in (".parquet", ".csv"):
        for a, b in zip(got[".jsonl"], got[ext], strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert sorted(int(r["row"]) for r in got[".jsonl"]) == list(range(len(ROWS)))
    for rec in got[".jsonl"]:
        row = ROWS[int(rec["row"])]
        ids = tok.encode(row["prompt"])
        assert rec["prompt"][rec["prompt_valid"] > 0].tolist() == ids
        assert rec["prompt_valid"][-len(ids):].all() and not rec["prompt_valid"][:-len(ids)].any()  # left-padded
        want = tok.encode(row["answer"], add_special_tokens=False) + [tok.eos_id]
        assert rec["target"][rec["target_valid"] > 0].tolist() == want
        assert rec["target_valid"][:len(want)].all()  # right-padded
    assert task.vocab_size == tok.vocab_size and task.eos_id == tok.eos_id and task.pad_id == tok.pad_id


def test_chat_template_and_conversational_prompts(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    f = write(tmp_path / "t.jsonl", ROWS[:2])
    task = make(tok_dir, f, chat_template=True, system_prompt="Be brief.", prompt_len=64)
    rec = [r for r in records(task, "train", tmp_path / "d") if r["row"] == 0][0]
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": ROWS[0]["prompt"]}])
    assert "<|im_start|>assistant" in text
    assert rec["prompt"][rec["prompt_valid"] > 0].tolist() == tok.encode(text, add_special_tokens=False)
    conv = [{"messages": [{"role": "user", "content": "hi"}], "answer": "1"}]
    g = write(tmp_path / "c.jsonl", conv)
    rec = records(make(tok_dir, g, prompt_key="messages", prompt_len=64), "train", tmp_path / "d")[0]
    want = tok.encode(tok.apply_chat_template(conv[0]["messages"]), add_special_tokens=False)
    assert rec["prompt"][rec["prompt_valid"] > 0].tolist() == want


def test_cache_is_keyed_by_content_and_tokenizer(tok_dir, tmp_path):
    f = write(tmp_path / "a.jsonl", ROWS)
    task = make(tok_dir, f)
    records(task, "train", tmp_path / "d")
    key = ("files", task.config_name())
    n = GENERATION_COUNT[key]
    again = make(tok_dir, f)
    assert again.config_name() == task.config_name()
    records(again, "test", tmp_path / "d")
    assert GENERATION_COUNT[key] == n  # reused, not rebuilt
    moved = write(tmp_path / "moved.jsonl", ROWS)  # same bytes elsewhere: same cache
    assert make(tok_dir, moved).config_name() == task.config_name()
    write(tmp_path / "a.jsonl", ROWS[:-1])
    assert make(tok_dir, f).config_name() != task.config_name()
    other = tmp_path / "tok2"
    hfx.train_tokenizer(other, "llama")
    assert make(str(other), moved).config_name() != task.config_name()
    assert make(tok_dir, moved, prompt_len=17).config_name() != task.config_name()


def test_over_long_examples_dropped_and_counted_or_an_error(tok_dir, tmp_path, capsys):
    tok = load_tokenizer(tok_dir)
    rows = ROWS + [{"prompt": "what is " + " plus ".join(str(i) for i in range(20)) + "?", "answer": "190"},
                   {"prompt": "what is 1 plus 1?", "answer": " ".join(["2"] * 30)}]
    f = write(tmp_path / "long.jsonl", rows)
    task = make(tok_dir, f, answer_key="answer")
    too_long = sum(len(tok.encode(r["prompt"])) > 16 or len(tok.encode(r["answer"], add_special_tokens=False)) + 1 > 8
                   for r in rows)
    assert too_long == 2
    recs = records(task, "train", tmp_path / "d")
    assert len(recs) == len(rows) - 2
    assert task.dropped("train", str(tmp_path / "d")) == 2
    from kljax.tasks import files as files_mod
    files_mod._REPORTED.clear()  # a later process reading the cached data is told too
    capsys.readouterr()
    make(tok_dir, f, answer_key="answer").data_source("train", str(tmp_path / "d"))
    assert "2 train examples over prompt_len=16" in capsys.readouterr().out
    assert sorted(int(r["row"]) for r in recs) == list(range(len(ROWS)))
    strict = make(tok_dir, f, answer_key="answer", too_long="error")
    with pytest.raises(ValueError, match=r"long.jsonl row 7: prompt has \d+ tokens > prompt_len=16"):
        records(strict, "train", tmp_path / "d2")


def test_preference_pairs_and_missing_column(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    rows = [{"prompt": "what is 1 plus 2?", "chosen": "3", "rejected": "4"}]
    f = write(tmp_path / "p.jsonl", rows)
    rec = records(make(tok_dir, f, chosen_key="chosen", rejected_key="rejected"), "train", tmp_path / "d")[0]
    for k in ("chosen", "rejected"):
        assert rec[k][rec[k + "_valid"] > 0].tolist() == tok.encode(rows[0][k], add_special_tokens=False) + [tok.eos_id]
    with pytest.raises(KeyError, match=r"column 'question' is missing in .*p.jsonl row 1.*prompt_key"):
        records(make(tok_dir, f, prompt_key="question"), "train", tmp_path / "d")


def test_bad_fields_are_errors(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_files"):
        make(tok_dir, str(tmp_path / "nope*.jsonl"))
    f = write(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(ValueError, match="model.hf_path"):
        tasks.get("files", train_files=f)
    with pytest.raises(ValueError, match="too_long"):
        make(tok_dir, f, too_long="truncate")


# ---------------------------------------------------------------------------------------------- rewards
REWARD_FILE = """
def correct(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def level_only(prompts, completions, level, **kwargs):
    return [None if l == 0 else float(l) for l in level]

def boom(prompts, completions, **kwargs):
    raise RuntimeError("my reward broke")

def short(prompts, completions, **kwargs):
    return [1.0]

def nan(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)
"""


@pytest.fixture
def reward_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(textwrap.dedent(REWARD_FILE))
    return str(p)


def completions_of(task, texts, n=8):
    toks = np.full((len(texts), n), task.pad_id, np.int32)
    mask = np.zeros((len(texts), n), np.int32)
    for i, t in enumerate(texts):
        ids = task.tokenizer.encode(t, add_special_tokens=False) + [task.eos_id]
        toks[i, :len(ids)], mask[i, :len(ids)] = ids, 1
        mask[i, len(ids):] = 1  # after EOS the mask may go on: text stops at EOS
    return toks, mask


def test_reward_from_file_weights_and_none(tok_dir, tmp_path, reward_file):
    f = write(tmp_path / "a.jsonl", ROWS)
    task = make(tok_dir, f, answer_key="answer", reward=f"{reward_file}:correct, 0.5*{reward_file}:level_only")
    batch = {k: np.stack([r[k] for r in records(task, "train", tmp_path / "d")]) for k in ("row", "split_id")}
    texts = ["3", "34", " 0", "24", "60", "9"]  # right, right, wrong, right, right, right
    r = task.reward(*completions_of(task, texts), batch)
    correct = np.array([1, 1, 0, 1, 1, 1], float)
    level = np.array([row["level"] for row in ROWS], float)
    np.testing.assert_allclose(r, correct + 0.5 * level)  # level 0 -> None -> left out of the sum
    assert r.dtype == np.float32
    m = task.last_reward_metrics
    assert m["rewards/correct/mean"] == pytest.approx(5 / 6)  # TRL's metric names: the function's __name__
    assert m["rewards/level_only/mean"] == pytest.approx(level[level > 0].mean())
    assert m["time/reward_s"] >= 0


@pytest.mark.parametrize("fn,needle", [("boom", "raised RuntimeError: my reward broke"),
                                       ("short", "returned 1 values for 6 completions"),
                                       ("nan", "returned nan for prompt 'what is 1 plus 2\\?'")])
def test_reward_failures_name_function_and_prompt(tok_dir, tmp_path, reward_file, fn, needle):
    f = write(tmp_path / "a.jsonl", ROWS)
    task = make(tok_dir, f, reward=f"{reward_file}:{fn}")
    batch = {k: np.stack([r[k] for r in records(task, "train", tmp_path / "d")]) for k in ("row", "split_id")}
    with pytest.raises(RewardError, match=needle) as e:
        task.reward(*completions_of(task, ["1"] * 6), batch)
    assert fn in str(e.value) and "what is 1 plus 2?" in str(e.value)
    assert "step 7" in str(e.value.at_step(7))


def test_conversational_rows_get_trl_message_completions(tok_dir, tmp_path):
    p = tmp_path / "conv_rewards.py"
    p.write_text("def says_hi(prompts, completions, **kw):\n"
                 "    return [float(c[0]['role'] == 'assistant' and 'hi' in c[0]['content'] and p[-1]['role'] == 'user')"
                 " for p, c in zip(prompts, completions)]\n")
    f = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "say hi"}]}] * 2)
    task = make(tok_dir, f, prompt_key="messages", prompt_len=64, reward=f"{p}:says_hi")
    batch = {k: np.stack([r[k] for r in records(task, "train", tmp_path / "d")]) for k in ("row", "split_id")}
    np.testing.assert_allclose(task.reward(*completions_of(task, ["hi there", "bye"]), batch), [1.0, 0.0])


def test_reward_spec_errors(tok_dir, tmp_path, reward_file):
    f = write(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(AttributeError, match="no function 'missing'"):
        make(tok_dir, f, reward=f"{reward_file}:missing")
    with pytest.raises(ValueError, match="built-in"):
        make(tok_dir, f, reward="not_a_builtin")
    with pytest.raises(ModuleNotFoundError):
        make(tok_dir, f, reward="no_such_pkg.mod:fn")
    terms = rewards.parse(f"math_answer, 0.1*format, -2e-1*{reward_file}:correct")
    assert [(w, n) for w, n, _ in terms] == [(1.0, "math_answer"), (0.1, "format"), (-0.2, f"{reward_file}:correct")]
    twice = rewards.parse(f"{reward_file}:correct, format, 2*{reward_file}:correct")
    assert rewards.metric_names(twice) == ["correct", "format", "correct_2"]


def test_builtin_math_answer_format_length():
    comps = ["so 2+2 = 4", "the answer is \\boxed{4}", "#### 5", "no number", "\\boxed{\\frac{1}{2}}", "1,000"]
    answers = ["4", "#### 4", "The sum is \\boxed{5}", "3", "\\frac{1}{2}", "1000"]
    assert rewards.math_answer(None, comps, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert rewards.math_answer(None, ["4", "4"], answer=[None, " "]) == [None, None]
    assert rewards.format_reward(None, comps) == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert rewards.length_penalty(None, ["ab", "abcd", ""]) == [-0.5, -1.0, -0.0]
    with pytest.raises(ValueError, match="answer_key"):
        rewards.math_answer(None, ["1"])


# ---------------------------------------------------------------------------------------------- registry
def test_register_task_from_user_module(tmp_path, monkeypatch):
    from kljax.train import setup as setup_lib
    # The registration lasts for this test only (other tests check the built-in registry).
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    mod = tmp_path / "my_tasks.py"
    mod.write_text(textwrap.dedent("""
        import dataclasses
        from kljax import tasks
        from kljax.tasks.arithmetic import Arithmetic

        @dataclasses.dataclass(frozen=True)
        class Tiny(Arithmetic):
            name = "tiny_user_task"

        tasks.register("tiny_user_task", Tiny)
    """))
    cfg = ml_collections.ConfigDict(dict(task=dict(name="tiny_user_task", module=str(mod), num_digits=1,
                                                   train_size=10, test_size=5, data_dir=str(tmp_path))))
    task = setup_lib.build_task(cfg)
    assert task.name == "tiny_user_task" and task.num_digits == 1
    assert "tiny_user_task" in tasks.names()
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("tiny_user_task", lambda **kw: None)
    with pytest.raises(TypeError, match="no parameter"):
        tasks.get("tiny_user_task", nope=1)


def test_llama_tokenizer_bos_once_with_and_without_template(tmp_path):
    llama = tmp_path / "llama_tok"
    hfx.train_tokenizer(llama, "llama")  # BOS from the post-processor, and `{{ bos_token }}` in its template
    tok = load_tokenizer(llama)
    f = write(tmp_path / "a.jsonl", ROWS[:1])
    for chat in (False, True):
        rec = records(make(str(llama), f, chat_template=chat, prompt_len=64), "train", tmp_path / "d")[0]
        ids = rec["prompt"][rec["prompt_valid"] > 0].tolist()
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        assert tok.pad_id == tok.eos_id  # no pad token in the files


# ---------------------------------------------------------------------------------------------- tfds source
class KljaxTinyQa(tfds.core.GeneratorBasedBuilder):
    """A registered tfds dataset prepared locally (array_record), as a user's `tfds build` leaves it."""
    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"prompt": tfds.features.Text(), "answer": tfds.features.Text(), "level": np.int32}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(ROWS), "test": self._generate_examples(ROWS[:2])}

    def _generate_examples(self, rows):
        for i, r in enumerate(rows):
            yield i, {"prompt": r["prompt"], "answer": r["answer"], "level": r["level"]}


def test_registered_tfds_dataset_as_source(tok_dir, tmp_path, reward_file):
    tok = load_tokenizer(tok_dir)
    KljaxTinyQa(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    task = tasks.get("files", tfds_name="kljax_tiny_qa", tfds_data_dir=str(tmp_path / "tfds"), answer_key="answer",
                     tokenizer_path=tok_dir, prompt_len=16, completion_len=8, reward=f"{reward_file}:level_only")
    recs = records(task, "train", tmp_path / "d")
    assert len(recs) == len(ROWS) and len(records(task, "test", tmp_path / "d")) == 2
    rows = task.rows("train")  # the dataset's rows (tfds's stored order), decoded to python values
    assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in ROWS)
    for rec in recs:
        row = rows[int(rec["row"])]
        assert rec["prompt"][rec["prompt_valid"] > 0].tolist() == tok.encode(row["prompt"])
    batch = {k: np.stack([r[k] for r in recs]) for k in ("row", "split_id")}
    r = task.reward(*completions_of(task, ["1"] * len(ROWS)), batch)
    np.testing.assert_allclose(r, [float(rows[int(rec["row"])]["level"]) for rec in recs])
    with pytest.raises(FileNotFoundError, match="not prepared"):
        tasks.get("files", tfds_name="kljax_tiny_qa", tfds_data_dir=str(tmp_path / "empty"), tokenizer_path=tok_dir)
    with pytest.raises(ValueError, match="not both"):
        tasks.get("files", tfds_name="kljax_tiny_qa", train_files="x.jsonl", tokenizer_path=tok_dir)
