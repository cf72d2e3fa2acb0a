"""End to end on what a user brings: a tiny Qwen2 and a tiny Llama, each with its own trained BPE
tokenizer in a local folder, GSM8K-style JSONL files and a reward function in a Python file. Through
`kljax.main` (in-process): SFT of the Llama through its chat template, GRPO of the Qwen2 with the file's
reward, a failing reward stopping the run; then `kljax.export`, reload in transformers, and greedy
generation there gives kljax's greedy tokens."""
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl import flags
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fixtures as hfx
from kljax.models import load_tokenizer
from kljax.sampling import generate
from kljax.train import runs as runs_lib, sharding as shd

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF = os.path.join(REPO, "experiments", "hf.py")

REWARDS = """
def correct(prompts, completions, answer, level, **kwargs):
    # TRL contract: extra columns arrive as keyword lists of the batch's length
    assert len(prompts) == len(completions) == len(answer) == len(level)
    assert all(isinstance(p, str) and p.startswith("what is") for p in prompts)
    return [1.0 if c.strip().endswith(a.split("####")[-1].strip()) else 0.0 for c, a in zip(completions, answer)]

def digits(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) if c else None for c in completions]

def boom(prompts, completions, **kwargs):
    raise ZeroDivisionError("bad reward")
"""


def rows(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        out.append({"question": f"what is {a} plus {b}?", "answer": f"{a}+{b}={a + b} #### {a + b}", "level": a % 3})
    return out


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    model = hfx.user_folder(root / "tiny-qwen2", "qwen2", vocab_size=320)  # embedding rows padded past 300 ids
    for split, n, seed in (("train", 32, 0), ("test", 8, 1)):
        with open(root / f"{split}.jsonl", "w") as f:
            for r in rows(n, seed):
                f.write(json.dumps(r) + "\n")
    (root / "my_rewards.py").write_text(textwrap.dedent(REWARDS))
    return dict(root=root, model=model, train=str(root / "train.jsonl"), test=str(root / "test.jsonl"),
                rewards=str(root / "my_rewards.py"), data=str(root / "data"))


def run_main(arg, workdir, user, *overrides):
    """`python -m kljax.main --config=experiments/hf.py:<arg> ...` in this process (what `kljax.main.run`
    does, without absl's `app.run`, which exits the process)."""
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


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def llama(user):
    """A tiny Llama (BOS from its tokenizer's post-processor, no pad token, untied head) beside the Qwen2."""
    return dict(user, model=hfx.user_folder(user["root"] / "tiny-llama", "llama", vocab_size=320, tie=False))


@pytest.fixture(scope="module")
def sft_run(llama):
    """SFT of the Llama on the JSONL, prompts through its chat template."""
    wd = str(llama["root"] / "sft")
    run_main("sft,smoke", wd, llama, "--config.task.chat_template=True", "--config.task.prompt_len=48")
    return wd


@pytest.fixture(scope="module")
def grpo_run(user):
    wd = str(user["root"] / "grpo")
    run_main("grpo,smoke", wd, user, f"--config.task.reward={user['rewards']}:correct,0.5*{user['rewards']}:digits")
    return wd


def test_sft_on_jsonl_learns(sft_run):
    m = metrics(sft_run)
    losses = [r["loss"] for r in m if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    ev = json.load(open(os.path.join(sft_run, "eval.json")))
    assert ev["step"] == 4 and "eval/reward" in ev


def test_grpo_with_reward_file_reports_rewards_and_reward_time(grpo_run, user):
    m = [r for r in metrics(grpo_run) if "reward" in r]
    assert len(m) == 2
    for r in m:
        assert r["time/reward_s"] >= 0 and r["time/reward_wait_s"] >= 0  # scored on a thread, waited for
        assert "rewards/correct/mean" in r and "rewards/digits/mean" in r
        assert np.isfinite(r["loss"]) and np.isfinite(r["kl"])
    assert os.path.exists(os.path.join(grpo_run, "eval.json"))


def test_failing_reward_stops_the_run_naming_function_step_and_prompt(user, capsys):
    wd = str(user["root"] / "boom")
    with pytest.raises(SystemExit) as e:
        run_main("grpo,smoke", wd, user, f"--config.task.reward={user['rewards']}:boom")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "boom" in err and "at step 1" in err and "ZeroDivisionError" in err and "what is" in err
    assert json.load(open(os.path.join(wd, "config.json")))  # the run's files are still there


def test_qwen2_grpo_export_loads_in_transformers_and_greedy_matches(grpo_run, user, tmp_path):
    from kljax import export
    workdir = grpo_run
    out = str(tmp_path / "hf")
    assert export.main([workdir, out, "--checkpoint", "latest"]) == 0
    hf_tok = AutoTokenizer.from_pretrained(out)
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(user["model"])
    assert hf_tok("what is 3 plus 4?")["input_ids"] == tok.encode("what is 3 plus 4?")
    assert hf_model.config.vocab_size == 320

    assert_same_greedy(workdir, hf_model, tok, [r["question"] for r in rows(8, 1)])


def test_export_errors(sft_run, tmp_path, capsys):
    from kljax import export
    assert export.main([sft_run, str(tmp_path / "x"), "--checkpoint", "999"]) == 2
    assert "999" in capsys.readouterr().err
    assert export.main([str(tmp_path / "no_run"), str(tmp_path / "y")]) == 2
    assert "no run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def assert_same_greedy(workdir, hf_model, tok, prompts, chat=False):
    """kljax's greedy sampler on the run's trained policy == transformers' greedy `generate` on the export."""
    mesh = shd.make_mesh({"data": -1})
    model = runs_lib.load_model_from(workdir, mesh)  # the trained policy itself, not the exported copy
    if chat:
        ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    P, N = max(map(len, ids)), 12
    toks = np.full((len(ids), P), tok.pad_id, np.int32)
    valid = np.zeros((len(ids), P), np.int32)
    for i, x in enumerate(ids):
        toks[i, P - len(x):], valid[i, P - len(x):] = x, 1
    out_k = generate(model, jnp.asarray(toks), jnp.asarray(valid), jax.random.PRNGKey(0), N, tok.eos_id,
                     temperature=0.0, pad_id=tok.pad_id)
    k_tokens, k_mask = np.asarray(out_k.tokens), np.asarray(out_k.mask)
    for i, x in enumerate(ids):
        with torch.no_grad():
            g = hf_model.generate(torch.tensor([x]), max_new_tokens=N, do_sample=False, eos_token_id=tok.eos_id,
                                  pad_token_id=tok.pad_id)[0, len(x):].tolist()
        ours = k_tokens[i][k_mask[i] > 0].tolist()
        assert ours == g[:len(ours)] and len(ours) == len(g), (i, ours, g)


def test_llama_sft_export_loads_in_transformers_and_greedy_matches(sft_run, llama, tmp_path):
    from kljax import export
    out = str(tmp_path / "hf")
    assert export.main([sft_run, out]) == 0
    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    tok = load_tokenizer(llama["model"])
    msgs = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) \
        == tok.apply_chat_template(msgs)
    assert_same_greedy(sft_run, hf_model, tok, [r["question"] for r in rows(4, 2)], chat=True)


@pytest.mark.slow
def test_qsharp_on_a_hf_reference_with_a_reward_file(user):
    """`experiments/hf.py:qsharp,smoke`: the Q♯ critic learns π_ref's reward-to-go on the user's model and
    reward function; guided decoding is evaluated with its reward and exact KL to π_ref."""
    wd = str(user["root"] / "qsharp")
    run_main("qsharp,smoke", wd, user, f"--config.task.reward={user['rewards']}:digits")
    losses = [r["loss"] for r in metrics(wd) if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    ev = json.load(open(os.path.join(wd, "eval.json")))
    assert 0.0 <= ev["eval/ref/reward"] <= 1.0 and 0.0 <= ev["eval/qsharp/eta=0.1/reward"] <= 1.0
    assert ev["eval/qsharp/eta=0.1/kl"] >= 0.0
