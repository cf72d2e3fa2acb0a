"""Shared helpers of the benchmark scripts: CPU time of other processes, peak RSS, summaries, tables, and
issue 9's common workload (a random Qwen2-style model saved as a Hugging Face folder).

Scripts import it as ``import _common`` (the script's own folder is on ``sys.path`` when it is run as
``python benchmarks/<script>.py``). Nothing here imports kljax, torch or tunix at module level, so a child
process of one contender pays only for its own framework.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys

# ----------------------------------------------------------------------------------------------------------
# Issue 9's workload: Qwen2-style decoder, random init, float32.

WORKLOAD = dict(vocab=1024, layers=4, width=256, heads=4, head_dim=64, mlp=1024, norm_eps=1e-6, rope_theta=1e6,
                prompts=16, group=8, prompt_len=32, new_tokens=32, beta=0.04, lr=1e-5)
WORKLOAD_PARAMS = 4_723_968
# Tokenizer ids beyond the model's 1024 rows: EOS and PAD can never be sampled, so every completion has
# exactly `new_tokens` tokens (the workload's "EOS never sampled") without any logits processor.
EOS_ID, PAD_ID = WORKLOAD["vocab"], WORKLOAD["vocab"] + 1


def expected_params(w: dict = WORKLOAD) -> int:
    """Parameter count of the workload's architecture (q/k/v biases, untied head)."""
    d, f, v, h = w["width"], w["mlp"], w["vocab"], w["heads"] * w["head_dim"]
    layer = 3 * (d * h + h) + h * d + 3 * d * f + 2 * d
    return 2 * v * d + w["layers"] * layer + d


assert expected_params() == WORKLOAD_PARAMS


def prompt_texts(n: int, seed: int, w: dict = WORKLOAD) -> list:
    """`n` prompts of `prompt_len` random token ids, written as the workload tokenizer's words ("t17 t3 ...")."""
    import numpy as np
    ids = np.random.default_rng(seed).integers(0, w["vocab"], (n, w["prompt_len"]))
    return [" ".join(f"t{i}" for i in row) for row in ids]


def make_workload_folder(path: str, seed: int = 0, w: dict = WORKLOAD) -> str:
    """Write (once) a random-init Qwen2 of the workload's shape with transformers, plus a word-level tokenizer
    whose ids 0..V-1 are "t0".."t{V-1}" and whose EOS/PAD (ids V, V+1) lie outside the model's vocabulary."""
    done = os.path.join(path, "config.json")
    if os.path.exists(done) and os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    vocab = {f"t{i}": i for i in range(w["vocab"])}
    vocab.update({"<eos>": EOS_ID, "<pad>": PAD_ID})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(path)
    cfg = Qwen2Config(vocab_size=w["vocab"], hidden_size=w["width"], intermediate_size=w["mlp"],
                      num_hidden_layers=w["layers"], num_attention_heads=w["heads"], num_key_value_heads=w["heads"],
                      head_dim=w["head_dim"], rms_norm_eps=w["norm_eps"], rope_theta=w["rope_theta"],
                      max_position_embeddings=w["prompt_len"] + w["new_tokens"], tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(w), f"transformers Qwen2 has {n} parameters, expected {expected_params(w)}"
    model.save_pretrained(path, safe_serialization=True)
    return path


def workload_tokenizer(path: str):
    """The folder's word-level tokenizer. (`AutoTokenizer` would pick Qwen2's tokenizer class from
    config.json and rebuild a different vocabulary.)"""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# Measurement


def busy_jiffies():
    """(busy jiffies of the whole machine, this process's jiffies incl. its threads and reaped children);
    None off Linux."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        with open(f"/proc/{os.getpid()}/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        busy = sum(cpu) - cpu[3] - cpu[4]  # minus idle and iowait
        return busy, int(own[11]) + int(own[12]) + int(own[13]) + int(own[14])
    except OSError:
        return None


def foreign_cpu_s(before, after) -> float:
    """CPU seconds that other processes used between two `busy_jiffies()` readings (nan if unknown)."""
    if before is None or after is None:
        return float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / hz


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def contended(foreign_s: float, wall_s: float, frac: float = 0.1) -> bool:
    """A measurement is contended when other processes used more than `frac` of a core over its wall time."""
    return foreign_s == foreign_s and wall_s > 0 and foreign_s > frac * wall_s


def summary(xs) -> tuple:
    """(median, min, max) of a non-empty sequence; nans if empty."""
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(xs), min(xs), max(xs)


# ----------------------------------------------------------------------------------------------------------
# Output


def command_line(argv=None) -> str:
    argv = sys.argv if argv is None else argv
    return "python " + " ".join([os.path.relpath(argv[0])] + list(argv[1:]))


def machine_line() -> str:
    import jax
    d = jax.devices()[0]
    return (f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible, "
            f"jax {jax.__version__} on {d.platform} ({d.device_kind})")


def table(header, rows) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_s(x, digits=3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def fmt_bytes(b) -> str:
    return "n/a" if b is None or b != b else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.0f} MiB"


def emit_result(obj: dict) -> None:
    """A child process's result: one JSON line with a marker the parent looks for."""
    print("BENCH_RESULT " + json.dumps(obj), flush=True)


def parse_result(stdout: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return None


def run_child(script: str, args, timeout: float, repo: str) -> dict:
    """Run `python script *args` in a fresh process (cwd `repo`, CPU backend unless JAX_PLATFORMS says
    otherwise) and return the dict it emitted with `emit_result`, or {"error": last lines of its output}."""
    import subprocess
    import time
    cmd = [sys.executable, os.path.abspath(script), *[str(a) for a in args]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    res = parse_result(p.stdout)
    if res is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        return dict(error=f"exit {p.returncode}: " + " / ".join(tail))
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def jax_device_peak_bytes():
    """Peak bytes in use on the first JAX device (GPU/TPU), None on CPU or when the backend has no stats."""
    import jax
    d = jax.devices()[0]
    if d.platform == "cpu":
        return None
    try:
        return int((d.memory_stats() or {}).get("peak_bytes_in_use"))
    except Exception:  # noqa: BLE001 - backend without memory statistics
        return None


def torch_device_peak_bytes():
    """`torch.cuda.max_memory_allocated()` when torch runs on a GPU, else None."""
    import torch
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
