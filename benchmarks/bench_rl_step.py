"""One GRPO step on issue 9's workload: kljax's own RL loop vs TRL's GRPOTrainer vs Tunix's GRPOLearner.

    python benchmarks/bench_rl_step.py                   # 3 rounds × (2 warm-up + 5 timed steps) per contender
    python benchmarks/bench_rl_step.py --quick           # 1 round × (1 + 1) steps: checks every contender runs
    python benchmarks/bench_rl_step.py --contenders kljax trl --rounds 5
    JAX_PLATFORMS=cuda python benchmarks/bench_rl_step.py  # on a GPU (TRL then runs on CUDA too)

Workload (issue 9, identical for every contender): Qwen2-style decoder, vocabulary 1024, 4 layers, width 256,
4 heads × 64 (no GQA), q/k/v bias, SwiGLU 1024, RMSNorm 1e-6, RoPE θ 1e6, untied head, float32, random init
(4,723,968 parameters, asserted in each contender's own model). One step: 16 prompts of 32 random tokens,
8 completions each → 128 × 32 new tokens at temperature 1 (no top-k/top-p; EOS and PAD are tokenizer ids
outside the model's 1024 rows, so EOS is never sampled and every completion has 32 tokens), reward = fraction
of even completion token ids (`benchmarks/rl_workload_reward.py`, a user reward function), β = 0.04 with a
reference model (k3 in the loss), clip 0.2, one AdamW update (lr 1e-5, grad-norm clip 1) per roll-out.
All three start from the same weights: a random `transformers` Qwen2 saved once to `--workdir`.

Contenders, each in its own fresh process (so compile caches, threads and memory never mix), alternating
over `--rounds` (round r starts with contender r mod n):

* kljax: `kljax.train.rl.run` driven by a config (objective `grpo`, `model.hf_path` = the shared folder,
  the user task `benchmarks/rl_workload_task.py` with `task.reward = benchmarks/rl_workload_reward.py:
  even_fraction`). Step time = the loop's own `time/step_s` metric. Phases are timed by wrapping the loop's
  sampler, log-prob pass and jitted update with a `block_until_ready` each (one device sync per phase, which
  the loop already has between these phases).
* TRL: `GRPOTrainer` (use_vllm=False, gradient_checkpointing=False, num_iterations=1, loss_type="grpo",
  per_device_train_batch_size=128, num_generations=8, max_completion_length=32, use_cpu=True) on
  `transformers`' Qwen2 from the folder. Step time = the interval between `on_step_end` callbacks; phases
  from TRL's own profiling hooks (`profiling_context`: `transformers.generate`, `_prepare_inputs`; the
  update is the step minus `_prepare_inputs`).
* Tunix: `GRPOLearner` (kl_loss_mode="low_var_kl", i.e. k3; its default "kl" is k1) with the vanilla
  rollout (top_p=1.0, which Tunix needs to sample rather than decode greedily) on one device (mesh
  fsdp=1, tp=1), Tunix's `models.qwen2` at these dimensions loaded from the folder's safetensors. Step
  time = the interval between the ends of `_run_global_step`; phases by wrapping `RLCluster.generate`,
  `get_ref_per_token_logps` and `update_actor`.

Reported per contender: median and min–max of the step time over every timed step of every round (the
first `--warmup` steps of each process compile and are dropped; the first one is shown separately),
completion tokens/s = 4,096 / median, phase medians, peak RSS of the process (and peak device memory on a
GPU), and the CPU seconds other processes used during the timed steps (a round with foreign load above
10% of a core is marked contended). Compare within a round when the
machine's speed drifts (the per-round table). Never installs anything: the peers come from the `bench`
extra (`pip install -e .[bench]`); a contender whose package is missing is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("kljax", "trl", "tunix")
W = C.WORKLOAD
ROWS = W["prompts"] * W["group"]
TOKENS = ROWS * W["new_tokens"]


# ----------------------------------------------------------------------------------------------------------
# kljax


def _kljax_config(folder: str, total_steps: int):
    from kljax.config import rl_base_config
    c = rl_base_config(dict(name="grpo", beta=W["beta"], kl_estimator="k3", kl_in="loss", clip_eps_low=0.2))
    with c.unlocked():
        c.model.hf_path = folder
        c.model.max_len = W["prompt_len"] + W["new_tokens"]
        c.task = dict(name="random_tokens", module=os.path.join(REPO, "benchmarks", "rl_workload_task.py"),
                      reward=os.path.join(REPO, "benchmarks", "rl_workload_reward.py") + ":even_fraction",
                      vocab=W["vocab"], prompt_len=W["prompt_len"], completion_len=W["new_tokens"],
                      data_dir=os.path.join(os.path.dirname(folder), "kljax_data"))
    c.rl.group_size, c.rl.prompts_per_step, c.rl.minibatch_size = W["group"], W["prompts"], ROWS
    c.rl.updates_per_rollout, c.rl.temperature, c.rl.top_k, c.rl.top_p = 1, 1.0, 0, 1.0
    c.optim.learning_rate, c.optim.warmup_steps, c.optim.schedule = W["lr"], 0, "constant"
    c.optim.weight_decay, c.optim.grad_clip = 0.0, 1.0
    c.total_steps, c.log_every, c.eval_every = total_steps, 1, 0
    c.eval.num_examples, c.eval.batch_size = 16, 16
    c.checkpoint.every, c.checkpoint.best_metric = 10**9, ""
    return c


def child_kljax(folder: str, warmup: int, steps: int, workdir: str) -> dict:
    import jax

    from kljax.models.hf import from_hf
    from kljax.train import common
    from kljax.train import rl
    from flax import nnx

    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(from_hf(folder), nnx.Param)))
    assert n_params == C.WORKLOAD_PARAMS, f"kljax model has {n_params} parameters"
    phases = {"sample": [], "logp passes": [], "update": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            phases[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    # Wrapped where the loop looks them up; a name the loop no longer has is left alone (its phase reads n/a).
    for attr, phase in (("generate", "sample"), ("_model_logp", "logp passes")):
        if hasattr(rl, attr):
            setattr(rl, attr, timed(phase, getattr(rl, attr)))
    make = rl.state_lib.make_train_step
    rl.state_lib.make_train_step = lambda *a, **k: timed("update", make(*a, **k))

    cfg = _kljax_config(folder, warmup + steps)
    common.validate(cfg)
    marks = {}

    # The window of the timed steps for the foreign-CPU reading: from the end of the last warm-up step's
    # update to the end of the last step (the final evaluation and save come after).
    orig_update = rl.state_lib.make_train_step

    def marking(*a, **k):
        step = orig_update(*a, **k)

        def run(*x, **y):
            out = step(*x, **y)
            n = len(phases["update"])
            if n == warmup:
                marks["t0"], marks["j0"] = time.perf_counter(), C.busy_jiffies()
            if n == warmup + steps:
                marks["t1"], marks["j1"] = time.perf_counter(), C.busy_jiffies()
            return out
        return run

    rl.state_lib.make_train_step = marking
    rl.run(cfg, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step_s = [r["time/step_s"] for r in rows if "time/step_s" in r]
    extra = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/step_s"})
    ph = {k: v[warmup:warmup + steps] for k, v in phases.items()}
    for k in extra:  # the loop's own phase metrics, when it logs any
        ph[k] = [r[k] for r in rows if k in r][warmup:warmup + steps]
    return dict(step_s=step_s[warmup:warmup + steps], phases=ph, params=n_params, warmup_s=step_s[:warmup],
                completion_len=[r["completions/mean_length"] for r in rows if "completions/mean_length" in r
                                ][warmup:warmup + steps], device_peak=C.jax_device_peak_bytes(),
                window_s=marks.get("t1", 0) - marks.get("t0", 0),
                foreign_cpu_s=C.foreign_cpu_s(marks.get("j0"), marks.get("j1")))


# ----------------------------------------------------------------------------------------------------------
# TRL


def child_trl(folder: str, warmup: int, steps: int, workdir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from rl_workload_reward import even_fraction

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    on_gpu = torch.cuda.is_available()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == C.WORKLOAD_PARAMS, f"TRL (transformers) model has {n_params} parameters"
    tok = C.workload_tokenizer(folder)
    total = warmup + steps
    ds = Dataset.from_dict({"prompt": C.prompt_texts(W["prompts"] * total, seed=1)})
    args = GRPOConfig(
        output_dir=workdir, use_vllm=False, gradient_checkpointing=False, num_iterations=1, loss_type="grpo",
        beta=W["beta"], epsilon=0.2, learning_rate=W["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=ROWS, gradient_accumulation_steps=1,
        num_generations=W["group"], max_completion_length=W["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        max_steps=total, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not on_gpu, bf16=False,
        fp16=False, seed=0, dataloader_num_workers=0, shuffle_dataset=False, disable_tqdm=True)
    ends, marks = [], {}
    phase_log = []

    orig_log = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration):  # TRL's own phase timers, otherwise only sent to wandb/mlflow/trackio
        phase_log.append((len(ends), self.name, duration))
        return orig_log(self, duration)

    profiling.ProfilingContext._log_metrics = log_metrics

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())  # start of the first step

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            if len(ends) == warmup + 1:
                marks["j0"] = C.busy_jiffies()
            if len(ends) == total + 1:
                marks["j1"] = C.busy_jiffies()

    lengths = []
    trainer = GRPOTrainer(model=model, reward_funcs=_length_recording(even_fraction, lengths), args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    phases = {"sample": [], "roll-out (sample+score+ref)": []}
    for i in range(total):
        gen = sum(d for s, n, d in phase_log if s == i + 1 and n.endswith("transformers.generate"))
        prep = sum(d for s, n, d in phase_log if s == i + 1 and n.endswith("_prepare_inputs"))
        phases["sample"].append(gen)
        phases["roll-out (sample+score+ref)"].append(prep)
    phases["update"] = [s - p for s, p in zip(step_s, phases["roll-out (sample+score+ref)"])]
    return dict(step_s=step_s[warmup:], phases={k: v[warmup:] for k, v in phases.items()}, params=n_params,
                warmup_s=step_s[:warmup],
                window_s=sum(step_s[warmup:]), foreign_cpu_s=C.foreign_cpu_s(marks.get("j0"), marks.get("j1")),
                torch_threads=torch.get_num_threads(), completion_len=lengths[warmup:],
                device_peak=C.torch_device_peak_bytes())


# ----------------------------------------------------------------------------------------------------------
# Tunix


def tunix_model(folder: str, mesh):
    """Tunix's own Qwen2 at the workload's dimensions, weights from the folder's safetensors."""
    from tunix.models.qwen2 import model as q2
    from tunix.models.qwen2 import params as q2p
    cfg = q2.ModelConfig(num_layers=W["layers"], vocab_size=W["vocab"], embed_dim=W["width"], hidden_dim=W["mlp"],
                         num_heads=W["heads"], head_dim=W["head_dim"], num_kv_heads=W["heads"],
                         rope_theta=int(W["rope_theta"]), norm_eps=W["norm_eps"], use_tied_embedding=False)
    return q2p.create_model_from_safe_tensors(folder, cfg, mesh)


def tunix_mesh():
    import jax
    return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def child_tunix(folder: str, warmup: int, steps: int, workdir: str) -> dict:
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner as grpo_lib
    from tunix.rl.rollout import base_rollout

    from rl_workload_reward import even_fraction

    mesh = tunix_mesh()
    with mesh:
        actor, ref = tunix_model(folder, mesh), tunix_model(folder, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(actor, nnx.Param)))
    assert n_params == C.WORKLOAD_PARAMS, f"Tunix model has {n_params} parameters"
    tok = C.workload_tokenizer(folder)
    total = warmup + steps
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(W["lr"], b1=0.9, b2=0.999, weight_decay=0.0))
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={r: mesh for r in (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE,
                                        rl_cluster_lib.Role.ROLLOUT)},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(actor_optimizer=opt, eval_every_n_steps=10**9,
                                                        max_steps=total),
        rollout_config=base_rollout.RolloutConfig(max_tokens_to_generate=W["new_tokens"],
                                                  max_prompt_length=W["prompt_len"],
                                                  kv_cache_size=W["prompt_len"] + W["new_tokens"],
                                                  temperature=1.0, top_p=1.0, top_k=None,
                                                  eos_tokens=[C.EOS_ID]))
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=ref, tokenizer=tok, cluster_config=cluster_config)
    phases = {"sample": [], "ref logp pass": [], "update": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if name != "sample":
                out = jax.block_until_ready(out)
            phases[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    cluster.generate = timed("sample", cluster.generate)  # returns host lists: already synchronous
    cluster.get_ref_per_token_logps = timed("ref logp pass", cluster.get_ref_per_token_logps)
    cluster.update_actor = timed("update", cluster.update_actor)
    # Tunix 0.1.7's default kl_loss_mode "kl" is k1; the workload's k3 is its "low_var_kl".
    algo = grpo_lib.GRPOConfig(num_generations=W["group"], num_iterations=1, beta=W["beta"], epsilon=0.2,
                               kl_loss_mode="low_var_kl")
    ends, marks = [time.perf_counter()], {}

    class Timed(grpo_lib.GRPOLearner):
        def _run_global_step(self, *a, **k):
            out = super()._run_global_step(*a, **k)
            jax.block_until_ready(nnx.state(actor, nnx.Param))
            ends.append(time.perf_counter())
            if len(ends) == warmup + 1:
                marks["j0"] = C.busy_jiffies()
            if len(ends) == total + 1:
                marks["j1"] = C.busy_jiffies()
            return out

    lengths = []
    learner = Timed(rl_cluster=cluster, reward_fns=[_length_recording(even_fraction, lengths)], algo_config=algo)
    prompts = C.prompt_texts(W["prompts"] * total, seed=1)
    # Batches as a grain pipeline would give them: arrays of strings.
    train_ds = [{"prompts": np.array(prompts[i * W["prompts"]:(i + 1) * W["prompts"]])} for i in range(total)]
    with mesh:
        learner.train(train_ds)
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    return dict(step_s=step_s[warmup:], phases={k: v[warmup:total] for k, v in phases.items()}, params=n_params,
                warmup_s=step_s[:warmup],
                window_s=sum(step_s[warmup:]), foreign_cpu_s=C.foreign_cpu_s(marks.get("j0"), marks.get("j1")),
                completion_len=lengths[warmup:total], device_peak=C.jax_device_peak_bytes())


def _length_recording(fn, lengths):
    """The reward function, also recording each call's mean completion length in tokens (a check that no
    completion ended early)."""
    def even_fraction(prompts, completions, completion_ids=None, **kwargs):
        if completion_ids is not None:
            lengths.append(sum(len(c) for c in completion_ids) / len(completion_ids))
        else:
            lengths.append(sum(len(str(c).split()) for c in completions) / len(completions))
        return fn(prompts, completions, completion_ids=completion_ids, **kwargs)
    return even_fraction


CHILDREN = {"kljax": child_kljax, "trl": child_trl, "tunix": child_tunix}


# ----------------------------------------------------------------------------------------------------------
# Parent


def run_child(name: str, folder: str, warmup: int, steps: int, workdir: str, timeout: float) -> dict:
    return C.run_child(__file__, ["--child", name, "--folder", folder, "--warmup", warmup, "--steps", steps,
                                  "--workdir", workdir], timeout, REPO)


def child_main(a) -> None:
    import shutil
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir, exist_ok=True)
    try:
        res = CHILDREN[a.child](a.folder, a.warmup, a.steps, a.workdir)
    except ImportError as e:
        res = dict(skipped=f"{a.child} not importable ({e}); install the bench extra")
    res["peak_rss"] = C.peak_rss_bytes()
    C.emit_result(res)


def _device_peak(ok) -> str:
    peaks = [x["device_peak"] for x in ok if x.get("device_peak")]
    return f" (device {C.fmt_bytes(max(peaks))})" if peaks else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="steps per process dropped (compilation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--quick", action="store_true", help="1 round of 1 warm-up + 1 timed step: checks it runs")
    p.add_argument("--workdir", default="/tmp/kljax_bench_rl_step")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per contender process")
    p.add_argument("--json", default="", help="also write every measurement to this file")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child_main(a)
    if a.quick:
        a.rounds, a.warmup, a.steps = 1, 1, 1
    folder = C.make_workload_folder(os.path.join(a.workdir, "model"))
    runs = {c: [] for c in a.contenders}
    n = len(a.contenders)
    for r in range(a.rounds):
        order = [a.contenders[(r + i) % n] for i in range(n)]
        for c in order:
            print(f"round {r + 1}/{a.rounds}: {c} ...", file=sys.stderr, flush=True)
            res = run_child(c, folder, a.warmup, a.steps, os.path.join(a.workdir, f"run_{c}"), a.timeout)
            res["round"] = r + 1
            runs[c].append(res)
            if "error" in res or "skipped" in res:
                print(f"  {c}: {res.get('error') or res.get('skipped')}", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)

    print(f"\n    {C.command_line(argv and [sys.argv[0]] + list(argv))}\n")
    print(C.machine_line() + "  ")
    print(f"Workload: issue 9 ({C.WORKLOAD_PARAMS:,} parameters, {ROWS} completions × {W['new_tokens']} tokens per "
          f"step); {a.rounds} round(s), {a.warmup} warm-up + {a.steps} timed steps per process.\n")
    rows, notes = [], []
    for c in a.contenders:
        ok = [x for x in runs[c] if "step_s" in x]
        for x in runs[c]:
            if "error" in x or "skipped" in x:
                notes.append(f"{c}, round {x['round']}: {x.get('error') or x.get('skipped')}")
        if not ok:
            what = "skipped" if all("skipped" in x for x in runs[c]) else "failed"
            rows.append([c, what, "", "", "", "", "", "", ""])
            continue
        med, lo, hi = C.summary([s for x in ok for s in x["step_s"]])
        phase_names = list(ok[0]["phases"])
        phases = "; ".join(f"{k} {C.fmt_s(C.summary([v for x in ok for v in x['phases'].get(k, [])])[0], 2)}"
                           for k in phase_names)
        lens = sorted({round(v, 3) for x in ok for v in x.get("completion_len", [])})
        if lens != [float(W["new_tokens"])]:
            notes.append(f"{c}: mean completion lengths {lens}, expected {W['new_tokens']} (EOS sampled?)")
        foreign = sum(x["foreign_cpu_s"] for x in ok if x["foreign_cpu_s"] == x["foreign_cpu_s"])
        window = sum(x["window_s"] for x in ok)
        flag = " (contended)" if C.contended(foreign, window) else ""
        rows.append([c, C.fmt_s(med), f"{C.fmt_s(lo)}–{C.fmt_s(hi)}", f"{TOKENS / med:,.0f}", phases,
                     C.fmt_s(C.summary([x["warmup_s"][0] for x in ok if x.get("warmup_s")])[0], 1),
                     C.fmt_bytes(max(x["peak_rss"] for x in ok)) + _device_peak(ok), f"{foreign:.1f} / {window:.0f}{flag}",
                     f"{ok[0]['params']:,}"])
    print(C.table(["contender", "step (s, median)", "min–max", "completion tokens/s", "phases (s, median)",
                   "first step incl. compile (s)", "peak RSS (device)", "other processes' CPU-s / timed wall-s", "params"], rows))
    print("\nPer round (median step s; compare within a round):\n")
    per = []
    for r in range(a.rounds):
        line = [str(r + 1)]
        for c in a.contenders:
            x = runs[c][r]
            if "step_s" not in x:
                line.append("skipped" if "skipped" in x else "failed")
                continue
            mark = " (contended)" if C.contended(x["foreign_cpu_s"], x["window_s"]) else ""
            line.append(C.fmt_s(C.summary(x["step_s"])[0]) + mark)
        per.append(line)
    print(C.table(["round"] + list(a.contenders), per))
    for note in notes:
        print(f"\nNote: {note}")


if __name__ == "__main__":
    main()
