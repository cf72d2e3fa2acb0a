"""`star_graph`: the Clever-Hans plateau of next-token pretraining, and what value guidance does about it.

Command: ``python -m kljax.reproduce star_graph [--quick] [--out DIR] [--workdir DIR]``.

Q♯ paper (Zhou et al. 2025, arXiv 2502.20548) §3.1 / App. C on the path-star graph G(d, ℓ, N) of
Bachmann & Nagarajan (2024): a model pretrained by next-token prediction learns to copy edges after the
first node but guesses the first node n1, so it solves ≈ 1/d of fresh graphs; REINFORCE/RPO stay there,
DPO collapses, Q♯ and CD guidance are near-perfect.

Every model here is trained by kljax's own loops, driven by the configs of `experiments/star_graph.py`
(pretraining, REINFORCE, GRPO, RPG) and `experiments/star_graph_qsharp.py` (Q♯ critic, DPO) with the
graph and budget fields overridden (the exact configs are in `config.json` and in each stage's
workdir). Stages:

1. **reference** π_ref: SFT (next-token CE) on the training graphs; evaluated by sampling at
   temperature 1 (the distribution every KL below is measured against), greedily, and teacher-forced
   per target position (the Clever-Hans signature: every position but n1 ≈ 1.0).
2. **MC-value guidance** (the upper bound of what decoding can do): at the decision node (after s)
   the success probability p(c) of each of π_ref's top candidates c is estimated by `mc_rollouts`
   π_ref roll-outs from (prefix, c) (exact in expectation; other tokens get p = 0), then n1 is
   sampled from Q♯'s π_ref·(1 − p + p·e^{1/η}) or CD's π_ref·e^{p/η} and π_ref finishes the path.
   Exact KL to π_ref = the KL at that one node (π_ref decides everywhere else).
3. **critic learning curve**: one pool of π_ref roll-outs on training graphs, labelled with their
   reward (`kljax.train.qsharp.collect_round`); a Bernoulli critic trained on the first n roll-outs for
   n in the variant's sizes. Variants `type/init/labels`: type Q = kljax's `qsharp` loop (one round, its
   data seeded from the pool), one output per next token read at the prefix's last slot; type V = the
   Q♯ star-graph code's classifier, a scalar value read at the candidate token's own slot (trained
   with `qsharp_bce(tokens=None)` by kljax's train step and loop); init = critic body from π_ref's
   trunk (`reference`) or fresh (`scratch`); labels at every completion position (`all`) or only after
   Q♯'s random switch time h (`switch`). Reported: the critic's held-out decision accuracy (on test
   graphs, is the arm start with the highest predicted success the true n1?) and Q♯-guided accuracy
   at η = `curve.eval_eta`. V-type guidance scores π_ref's top `mc.candidates` tokens at every step.
4. **guided decoding** with the largest-n critic of each `report` variant, Q♯ and CD at every η.
5. **post-training baselines** from the same π_ref: REINFORCE, GRPO, RPG-UFKL (kljax.train.rl) and
   DPO on (ground truth, failed π_ref sample) pairs (kljax.train.preference).

All accuracies are whole-path exact match on the same held-out test graphs, sampled at temperature 1
without top-k; KL(π‖π_ref) is exact (summed over the vocabulary at each generated token), reported
per sequence. See the module-level `config` for every setting and how it differs from the paper's.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kljax.repro import common

DESCRIPTION = ("star graph: π_ref's Clever-Hans plateau, Q♯/CD guidance with Monte-Carlo values and a learned "
               "critic (learning curve), REINFORCE/GRPO/RPG/DPO")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(quick: bool = False, seeds: int | None = None) -> dict:
    if quick:
        # The full run's graphs and model with fewer steps: this reference reaches the plateau by ≈ 200 steps.
        graphs = [dict(degree=2, path_len=3, num_nodes=20, train_size=50_000, test_size=1_000)]
        return {
            "table": "star_graph", "quick": True, "seeds": int(seeds or 1),
            "workdir": "runs/reproduce/star_graph_quick",
            "graphs": graphs,
            "model": dict(width=64, depth=3, num_heads=4),
            "pretrain": dict(steps=250, batch_size=128, learning_rate=2e-3),
            "test_graphs": 256,
            "mc": dict(candidates=4, rollouts=4),
            "etas": [1.0, 0.1],
            "curve": dict(steps=100, batch_size=128, learning_rate=1e-3, eval_eta=0.1, variants=[
                dict(name="V/reference/all", sizes=[2048], report=True)]),
            "baselines": dict(rl=["grpo"], rl_steps=5, dpo=False, dpo_pairs=512, dpo_steps=50),
        }
    graphs = [dict(degree=2, path_len=3, num_nodes=20, train_size=50_000, test_size=1_000)]
    return {
        "table": "star_graph", "quick": False, "seeds": int(seeds or 1),
        "workdir": "runs/reproduce/star_graph",
        "graphs": graphs,
        "model": dict(width=64, depth=3, num_heads=4),
        "pretrain": dict(steps=500, batch_size=128, learning_rate=2e-3),
        "test_graphs": 1000,
        "mc": dict(candidates=4, rollouts=8),
        "etas": [1.0, 0.1, 0.01],
        # variants: critic type (Q: one output per next token, kljax's qsharp loop; V: the value read at the
        # candidate's own slot, the Q♯ star-graph code's classifier) / body init / which positions get labels
        "curve": dict(steps=300, batch_size=128, learning_rate=1e-3, eval_eta=0.1, variants=[
            dict(name="V/reference/all", sizes=[1024, 4096, 32768], report=True),
            dict(name="Q/reference/all", sizes=[4096, 32768], report=True),
            dict(name="V/scratch/all", sizes=[32768])]),
        "baselines": dict(rl=["reinforce", "grpo", "rpg_ufkl"], rl_steps=60, dpo=True, dpo_pairs=4096,
                          dpo_steps=200),
    }


# ------------------------------------------------------------------------------------ helpers --

def _exp_config(path: str, arg: str):
    from kljax.train import common as tc
    cfg = tc.load_config_file(os.path.join(_REPO, "experiments", path) + ":" + arg)
    cfg.unlock()
    return cfg


def _set_graph(c, g: dict, rc: dict):
    c.task.degree, c.task.path_len, c.task.num_nodes = g["degree"], g["path_len"], g["num_nodes"]
    c.task.train_size, c.task.test_size = g["train_size"], g["test_size"]
    c.model.width, c.model.depth, c.model.num_heads = (rc["model"][k] for k in ("width", "depth", "num_heads"))
    c.eval.num_examples = min(int(rc["test_graphs"]), g["test_size"])
    c.eval.batch_size = 256
    c.log_every = 10


def _digest(cfg) -> str:
    return hashlib.sha1(cfg.to_json(sort_keys=True).encode()).hexdigest()[:8]


def _run_stage(cfg, workdir: str) -> dict:
    """Run one kljax loop (resuming / skipping when `workdir` holds this exact config's run)."""
    from kljax.train import common as tc
    cfg.lock()
    tc.validate(cfg)
    t0 = time.time()
    res = tc.loop_module(cfg).run(cfg, workdir)
    res = dict(res)
    res["stage_wall_s"] = time.time() - t0
    return res


def _stage_dir(base: str, name: str, cfg) -> str:
    # The config digest in the name: a changed setting trains afresh instead of clashing with a stale run.
    return os.path.join(base, f"{name}-{_digest(cfg)}")


def _train_wall(workdir: str) -> float | None:
    """Wall time of the training run in `workdir` when it ran (its eval.json), also after a rerun skipped it."""
    try:
        with open(os.path.join(workdir, "eval.json")) as f:
            return float(json.load(f)["wall_s"])
    except (OSError, KeyError, ValueError):
        return None


def _graph_name(g: dict) -> str:
    return f"G({g['degree']},{g['path_len']},{g['num_nodes']})"


# -------------------------------------------------------------------------------- evaluation --

def _seq_kl_sum(model, ref, task, seqs, valid):
    """Exact Σ_t KL(π(·|h_t)‖π_ref(·|h_t)) over each row's generated tokens."""
    from kljax import divergences as dv
    from kljax.train import sequences as seq_lib
    P = task.prompt_len
    kl = np.asarray(dv.kl(seq_lib.model_logits(model, seqs, valid, P), seq_lib.model_logits(ref, seqs, valid, P)))
    return (kl * np.asarray(valid[:, P:], np.float64)).sum(1)


def policy_eval(model, ref, task, records, key, batch_size: int = 256) -> dict:
    """Sampled (T = 1) and greedy accuracy of `model`, exact KL to `ref` per sequence and per token."""
    from kljax.sampling import generate
    from kljax.tasks import base as tb
    n = task.completion_len
    acc = greedy = kl = tokens = 0.0
    total = len(records["prompt"])
    for lo in range(0, total, batch_size):
        r = {k: v[lo:lo + batch_size] for k, v in records.items()}
        o = generate(model, r["prompt"], r["prompt_valid"], jax.random.fold_in(key, lo), n, task.eos_id,
                     temperature=1.0, pad_id=task.pad_id)
        toks, m = np.asarray(o.tokens), np.asarray(o.mask)
        acc += tb.exact_match(toks, m, r["target"], r["target_valid"], task.eos_id).sum()
        valid = np.concatenate([r["prompt_valid"], m], axis=1).astype(np.int32)
        kl += _seq_kl_sum(model, ref, task, np.asarray(o.sequences), valid).sum()
        tokens += m.sum()
        g = generate(model, r["prompt"], r["prompt_valid"], key, n, task.eos_id, temperature=0.0, pad_id=task.pad_id)
        greedy += tb.exact_match(np.asarray(g.tokens), np.asarray(g.mask), r["target"], r["target_valid"],
                                 task.eos_id).sum()
    return {"accuracy": acc / total, "greedy_accuracy": greedy / total, "kl_seq": kl / total,
            "kl_token": kl / max(tokens, 1.0)}


def teacher_forced(model, task, records) -> list[float]:
    """Per target position (s, n1, ..., g, EOS): fraction of test graphs where argmax π = the truth."""
    from kljax.train import sequences as seq_lib
    seq = np.concatenate([records["prompt"], records["target"]], 1)
    valid = np.concatenate([records["prompt_valid"], records["target_valid"]], 1).astype(np.int32)
    pred = np.asarray(jnp.argmax(seq_lib.model_logits(model, seq, valid, task.prompt_len), -1))
    ok = (pred == records["target"]) & (records["target_valid"] > 0)
    return (ok.sum(0) / np.maximum((records["target_valid"] > 0).sum(0), 1)).tolist()


def _arm_starts(task, records) -> list[list[int]]:
    """Per graph: the first node of each arm (the neighbours of the source), the n1 candidates."""
    out = []
    for p, pv in zip(records["prompt"], records["prompt_valid"]):
        edges, s, _ = task.parse_prompt(p, pv)
        out.append([int(v) for u, v in edges.tolist() if u == s])
    return out


def decision_accuracy(values, task, records) -> float:
    """Fraction of graphs where the arm start with the highest `values` [B, V] is the true n1."""
    starts = _arm_starts(task, records)
    truth = records["target"][:, 1]
    hit = [int(max(c, key=lambda t: values[i, t]) == truth[i]) for i, c in enumerate(starts)]
    return float(np.mean(hit))


def _completion_mask(toks, eos_id):
    """1 up to and including the first EOS."""
    is_eos = toks == eos_id
    before = np.cumsum(is_eos, axis=1) - is_eos
    return (before == 0).astype(np.int32)


def _rollout_reward(ref, task, rows, prefix_tok, key):
    """Reward of π_ref (T = 1) finishing each row's completion after the given first tokens [R, j]."""
    from kljax.sampling import generate
    j = prefix_tok.shape[1]
    n = task.completion_len
    prompt = np.concatenate([rows["prompt"], prefix_tok], 1).astype(np.int32)
    pv = np.concatenate([rows["prompt_valid"], np.ones_like(prefix_tok)], 1).astype(np.int32)
    o = generate(ref, prompt, pv, key, n - j, task.eos_id, temperature=1.0, pad_id=task.pad_id)
    comp = np.concatenate([prefix_tok, np.asarray(o.tokens)], 1)
    m = _completion_mask(comp, task.eos_id)
    comp = np.where(m > 0, comp, task.pad_id)
    return np.asarray(task.reward(comp, m, rows), np.float64), comp, m


def mc_guidance(ref, task, records, key, *, etas, candidates: int, rollouts: int, batch_size: int = 256) -> dict:
    """Q♯ and CD decoding with Monte-Carlo values at the decision node (see the module docstring)."""
    from kljax import divergences as dv
    from kljax.objectives import value as vo
    from kljax.sampling import generate
    from kljax.tasks import base as tb
    total = len(records["prompt"])
    sums: dict = {}
    p_hit = []
    for lo in range(0, total, batch_size):
        r = {k: v[lo:lo + batch_size] for k, v in records.items()}
        b = len(r["prompt"])
        k0 = jax.random.fold_in(key, lo)
        first = np.asarray(generate(ref, r["prompt"], r["prompt_valid"], k0, 1, task.eos_id, temperature=1.0,
                                    pad_id=task.pad_id).tokens)                         # s (copied)
        seq = np.concatenate([r["prompt"], first], 1).astype(np.int32)
        valid = np.concatenate([r["prompt_valid"], np.ones_like(first)], 1).astype(np.int32)
        from kljax.train import sequences as seq_lib
        logits = np.asarray(seq_lib.model_logits(ref, np.concatenate([seq, first], 1),
                                            np.concatenate([valid, np.ones_like(first)], 1), task.prompt_len + 1))
        ref_logits = logits[:, 0]                                                        # π_ref(n1 | x, s)
        cand = np.argsort(-ref_logits, axis=1)[:, :candidates]                          # [b, K]
        rep = {k: np.repeat(v, candidates * rollouts, axis=0) for k, v in r.items()}
        pre = np.stack([np.repeat(first[:, 0], candidates * rollouts),
                        np.repeat(cand.reshape(-1), rollouts)], 1)
        rew, _, _ = _rollout_reward(ref, task, rep, pre, jax.random.fold_in(k0, 1))
        p_c = (rew.reshape(b, candidates, rollouts) >= 1.0).mean(-1)                    # [b, K]
        p = np.zeros_like(ref_logits)
        np.put_along_axis(p, cand, p_c, axis=1)
        p_hit.append((cand[np.arange(b), p_c.argmax(1)] == r["target"][:, 1]))
        # Bernoulli critic logits of p (p = 1 kept finite: the offset then is ≈ 1/η, exactly as p → 1)
        pl = np.clip(p, 0.0, 1.0 - 1e-6)
        crit = np.where(pl > 0, np.log(np.maximum(pl, 1e-30)) - np.log1p(-pl), -np.inf).astype(np.float32)
        for guidance in ("qsharp", "cd"):
            for eta in etas:
                if guidance == "qsharp":
                    g = vo.qsharp_logits(ref_logits, crit, eta, "bernoulli")
                else:
                    g = vo.qsharp_logits(ref_logits, p.astype(np.float32), eta, "cd")
                kl = np.asarray(dv.kl(g, ref_logits), np.float64)
                kk = jax.random.fold_in(k0, 100 + int(round(1000 * eta)) + (0 if guidance == "qsharp" else 7))
                n1 = np.asarray(jax.random.categorical(kk, jnp.asarray(g), axis=-1))[:, None]
                rew, comp, m = _rollout_reward(ref, task, r, np.concatenate([first, n1], 1), jax.random.fold_in(kk, 1))
                ok = tb.exact_match(comp, m, r["target"], r["target_valid"], task.eos_id)
                name = f"{guidance}/eta={eta:g}"
                s = sums.setdefault(name, [0.0, 0.0, 0.0])
                s[0] += ok.sum()
                s[1] += kl.sum()
                s[2] += m.sum()
    out = {"candidate_p_argmax_is_n1": float(np.concatenate(p_hit).mean())}
    for name, (acc, kl, tok) in sums.items():
        out[name] = {"accuracy": acc / total, "kl_seq": kl / total, "kl_token": kl / tok}
    return out


# ---------------------------------------------------------------------------------- critic data --

def rollout_pool(ref, task, rows, key, chunk: int = 2048) -> dict:
    """π_ref roll-outs on `rows` with Q♯'s labels (`kljax.train.qsharp.collect_round`, round 1), plus
    `mask_all`: the label at every completion position instead of only after the switch time."""
    from kljax.train import qsharp
    parts = []
    for lo in range(0, len(rows["prompt"]), chunk):
        r = {k: v[lo:lo + chunk] for k, v in rows.items()}
        parts.append(qsharp.collect_round(ref, None, task, r, jax.random.fold_in(key, lo), eta=1.0,
                                          kind="bernoulli", guided=False))
    pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    P = task.prompt_len
    mask_all = np.zeros_like(pool["mask"])
    mask_all[:, P - 1:-1] = pool["valid"][:, P:]
    pool["mask_all"] = mask_all
    return pool


def critic_values(critic, task, records) -> np.ndarray:
    """The critic's success logits for every candidate n1 [B, V] (prefix = prompt + true s)."""
    from kljax.train import qsharp
    tok = np.concatenate([records["prompt"], records["target"][:, :1]], 1).astype(np.int32)
    valid = np.concatenate([records["prompt_valid"], np.ones((len(tok), 1), np.int32)], 1).astype(np.int32)
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    out = qsharp.critic_outputs(critic, jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(valid))
    return np.asarray(out[:, task.prompt_len], np.float32)


# ------------------------------------------------------------------------------------- the run --

def _table_rows(res: dict) -> list:
    rows = []
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    for r in res["methods"]:
        rows.append([r["method"], r["detail"], fmt(r["accuracy"]), fmt(r.get("kl_seq")), fmt(r.get("kl_token"))])
    return rows


def run(cfg: dict, out: str) -> dict:
    common.prepare(out, cfg)
    t_all = time.time()
    results = {"machine": common.machine(), "graphs": []}

    def partial(res):  # the table so far, so an interrupted run still leaves its finished stages
        results["wall_s"] = time.time() - t_all
        common.write_json(os.path.join(out, "results.json"), {**results, "graphs": results["graphs"] + [res]}, digits=4)
        _write_markdown(cfg, {**results, "graphs": results["graphs"] + [res]}, out)

    for g in cfg["graphs"]:
        results["graphs"].append(_run_graph(cfg, g, out, partial))
    results["wall_s"] = time.time() - t_all
    common.write_json(os.path.join(out, "results.json"), results, digits=4)
    _write_markdown(cfg, results, out)
    _plots(cfg, results, out)
    return json.loads(json.dumps(common._jsonable(results, 4)))


def _run_graph(cfg: dict, g: dict, out: str, partial=lambda res: None) -> dict:
    from kljax.train import evaluation as eval_lib, runs as runs_lib, sequences as seq_lib, setup as setup_lib
    gname = _graph_name(g)
    base = os.path.join(cfg["workdir"], gname.replace("(", "_").replace(")", "").replace(",", "_"))
    res: dict = {"graph": gname, "methods": [], "stage_wall_s": {}}
    timer = time.time()

    def lap(name):
        nonlocal timer
        res["stage_wall_s"][name] = time.time() - timer
        timer = time.time()
        print(f"[star_graph {gname}] {name} done in {res['stage_wall_s'][name]:.0f} s", flush=True)
        res["wall_s"] = float(sum(res["stage_wall_s"].values()))
        partial(res)

    # 1. the reference -------------------------------------------------------------------------
    pc = _exp_config("star_graph.py", "pretrain,small")
    _set_graph(pc, g, cfg)
    pc.total_steps = int(cfg["pretrain"]["steps"])
    pc.batch_size = int(cfg["pretrain"]["batch_size"])
    pc.optim.learning_rate = float(cfg["pretrain"]["learning_rate"])
    pc.eval_every = 0
    pc.checkpoint.every = pc.total_steps
    pc.checkpoint.best_metric = ""
    ref_dir = _stage_dir(base, "pretrain", pc)
    _run_stage(pc, ref_dir)
    task = setup_lib.build_task(pc)
    mesh = setup_lib.build_mesh(pc)
    ref = runs_lib.load_model_from(ref_dir, mesh)
    records = eval_lib.test_records(pc, task)
    key = jax.random.PRNGKey(2024)
    ev = policy_eval(ref, ref, task, records, key)
    ref_values = np.asarray(seq_lib.model_logits(
        ref, np.concatenate([records["prompt"], records["target"][:, :2]], 1),
        np.concatenate([records["prompt_valid"], np.ones((len(records["prompt"]), 2), np.int32)], 1),
        task.prompt_len + 1))[:, 0]
    res["reference"] = {**ev, "teacher_forced": teacher_forced(ref, task, records),
                        "decision_accuracy": decision_accuracy(ref_values, task, records),
                        "chance": 1.0 / g["degree"], "pretrain_steps": pc.total_steps}
    res["methods"].append(dict(method="π_ref", detail=f"SFT {pc.total_steps} steps, sampled T=1 (greedy "
                               f"{ev['greedy_accuracy']:.3f})", accuracy=ev["accuracy"], kl_seq=0.0, kl_token=0.0))
    lap("pretrain")

    # 2. Monte-Carlo-value guidance -------------------------------------------------------------
    mc_path = os.path.join(base, f"mc-{_digest(pc)}-{hashlib.sha1(json.dumps([cfg['mc'], cfg['etas'], cfg['test_graphs']]).encode()).hexdigest()[:8]}.json")
    if os.path.exists(mc_path):  # a rerun (e.g. after an interrupted curve) reuses the finished MC stage
        with open(mc_path) as f:
            mc = json.load(f)
    else:
        mc = mc_guidance(ref, task, records, jax.random.PRNGKey(7), etas=cfg["etas"],
                         candidates=cfg["mc"]["candidates"], rollouts=cfg["mc"]["rollouts"])
        common.write_json(mc_path, mc)
    res["mc"] = mc
    for guidance, label in (("qsharp", "Q♯ (MC values)"), ("cd", "CD (MC values)")):
        for eta in cfg["etas"]:
            m = mc[f"{guidance}/eta={eta:g}"]
            res["methods"].append(dict(method=label, detail=f"η={eta:g}, {cfg['mc']['rollouts']} π_ref roll-outs "
                                       f"per candidate", **m))
    lap("mc_guidance")

    # 3. critic learning curve -----------------------------------------------------------------
    cv = cfg["curve"]
    max_n = max(int(n) for v in cv["variants"] for n in v["sizes"])
    tr = eval_lib._test_records(task, setup_lib.data_dir(pc), "train", max_n)
    pool_path = os.path.join(base, f"pool-{_digest(pc)}-{max_n}.npz")
    if os.path.exists(pool_path):
        with np.load(pool_path) as z:
            pool = {k: z[k] for k in z.files}
    else:
        pool = rollout_pool(ref, task, tr, jax.random.PRNGKey(11))
        os.makedirs(base, exist_ok=True)
        np.savez(pool_path + ".tmp.npz", **pool)
        os.replace(pool_path + ".tmp.npz", pool_path)
    res["pool"] = {"size": int(len(pool["returns"])), "success_rate": float(pool["returns"].mean())}
    lap("rollout_pool")
    curve = res["curve"] = []
    e_curve = float(cv["eval_eta"])
    train_rows = {k: v[:512] for k, v in tr.items()}
    for variant in cv["variants"]:
        kind, init, labels = variant["name"].split("/")
        sizes = sorted(int(n) for n in variant["sizes"])
        for n in sizes:
            full = bool(variant.get("report", False)) and n == sizes[-1]   # reported at every η
            qc = _exp_config("star_graph_qsharp.py", "qsharp,small")
            _set_graph(qc, g, cfg)
            qc.init_from = ref_dir
            qc.qsharp.rounds, qc.qsharp.critic_steps, qc.qsharp.rollouts_per_round = 1, int(cv["steps"]), n
            qc.qsharp.critic_init = init
            qc.qsharp.top_k = 0
            qc.qsharp.etas = tuple(cfg["etas"]) if full else (e_curve,)
            qc.qsharp.guidances = ("qsharp", "cd") if full else ("qsharp",)
            qc.qsharp.rollin_eta = e_curve
            qc.total_steps = int(cv["steps"])
            qc.batch_size = int(cv["batch_size"])
            qc.optim.learning_rate = float(cv["learning_rate"])
            qc.checkpoint.every = qc.total_steps
            qc.optim.warmup_steps = min(30, qc.total_steps // 5)
            qc.task.data_dir = pc.task.data_dir
            if kind == "V":
                qc.model.value_head = "scalar"
            qc.labels = labels  # in the digest only: the seeded data depend on it
            wd = _stage_dir(base, f"critic-{kind}-{init}-{labels}-{n}", qc)
            del qc.labels
            t0 = time.time()
            cache = os.path.join(wd, "repro_point.json")
            if os.path.exists(cache):  # a rerun reuses a finished point (the stage itself is skipped anyway)
                with open(cache) as f:
                    dec, train_dec, guided, t_point = json.load(f)
            elif kind == "Q":
                seed_file = os.path.join(os.path.abspath(wd), "qsharp_data", "round_0.npz")
                if not os.path.exists(seed_file):
                    os.makedirs(os.path.dirname(seed_file), exist_ok=True)
                    d = {k: pool[k][:n] for k in ("tokens", "valid", "positions", "returns", "switch")}
                    d["mask"] = pool["mask_all" if labels == "all" else "mask"][:n]
                    np.savez(seed_file + ".tmp.npz", **d)
                    os.replace(seed_file + ".tmp.npz", seed_file)
                ev = _run_stage(qc, wd)
                critic = runs_lib.load_model_from(wd, mesh)
                dec = decision_accuracy(critic_values(critic, task, records), task, records)
                train_dec = decision_accuracy(critic_values(critic, task, train_rows), task, train_rows)
                guided = {f"{gd}/eta={e:g}": {"accuracy": ev[f"eval/{gd}/eta={e:g}/accuracy"],
                                              "kl_seq": ev[f"eval/{gd}/eta={e:g}/kl_seq"],
                                              "kl_token": ev[f"eval/{gd}/eta={e:g}/kl"]}
                          for gd in qc.qsharp.guidances for e in qc.qsharp.etas}
            else:
                critic, _ = train_v_critic(qc, ref_dir, pool, labels, n, wd)
                dec = decision_accuracy(v_decision_values(critic, task, records), task, records)
                train_dec = decision_accuracy(v_decision_values(critic, task, train_rows), task, train_rows)
                guided = v_guided_eval(ref, critic, task, records, jax.random.PRNGKey(5),
                                       etas=tuple(qc.qsharp.etas), guidances=tuple(qc.qsharp.guidances),
                                       candidates=int(cfg["mc"]["candidates"]))
            if not os.path.exists(cache):
                t_point = time.time() - t0
                common.write_json(cache, [dec, train_dec, guided, t_point])
            point = {"variant": variant["name"], "rollouts": n, "decision_accuracy": dec,
                     "train_decision_accuracy": train_dec,
                     "guided_accuracy": guided[f"qsharp/eta={e_curve:g}"]["accuracy"],
                     "guided_kl_seq": guided[f"qsharp/eta={e_curve:g}"]["kl_seq"], "eval_wall_s": t_point,
                     "train_wall_s": _train_wall(wd)}
            curve.append(point)
            print(f"[star_graph {gname}] critic {variant['name']} n={n}: {point}", flush=True)
            partial(res)
            if full:
                kname = "Q-type" if kind == "Q" else "V-type"
                for guidance, label in (("qsharp", f"Q♯ ({kname} critic)"), ("cd", f"CD ({kname} critic)")):
                    for eta in cfg["etas"]:
                        res["methods"].append(dict(method=label, detail=f"η={eta:g}, critic {variant['name']}, "
                                                   f"{n} roll-outs", **guided[f"{guidance}/eta={eta:g}"]))
    lap("critic_curve")

    # 4. post-training baselines -----------------------------------------------------------------
    bl = cfg["baselines"]
    for variant in bl["rl"]:
        rc = _exp_config("star_graph.py", f"{variant},small")
        _set_graph(rc, g, cfg)
        rc.init_from = ref_dir
        rc.total_steps = int(bl["rl_steps"])
        rc.eval_every = 0
        rc.checkpoint.every = rc.total_steps
        rc.checkpoint.best_metric = ""
        rc.task.data_dir = pc.task.data_dir
        wd = _stage_dir(base, variant, rc)
        _run_stage(rc, wd)
        ev = policy_eval(runs_lib.load_model_from(wd, mesh), ref, task, records, key)
        o = rc.objective
        hp = ", ".join(f"{k}={o[k]}" for k in ("beta", "kl_estimator", "kl_in") if k in o)
        res["methods"].append(dict(method={"reinforce": "REINFORCE", "grpo": "GRPO", "rpg_ufkl": "RPG-UFKL",
                                           "rpg_rkl": "RPG-RKL", "dapo": "DAPO"}.get(variant, variant),
                                   detail=f"{rc.total_steps} steps × {rc.rl.prompts_per_step}×{rc.rl.group_size} "
                                   f"samples; {hp}", **ev))
        lap(variant)
    if bl["dpo"]:
        dc = _exp_config("star_graph_qsharp.py", "dpo,small")
        _set_graph(dc, g, cfg)
        dc.init_from = ref_dir
        dc.preference.num_pairs = int(bl["dpo_pairs"])
        dc.total_steps = int(bl["dpo_steps"])
        dc.eval_every = 0
        dc.checkpoint.every = dc.total_steps
        dc.task.data_dir = pc.task.data_dir
        wd = _stage_dir(base, "dpo", dc)
        _run_stage(dc, wd)
        ev = policy_eval(runs_lib.load_model_from(wd, mesh), ref, task, records, key)
        res["methods"].append(dict(method="DPO", detail=f"β={dc.objective.beta}, {dc.total_steps} steps on ≤ "
                                   f"{dc.preference.num_pairs} (truth, failed π_ref sample) pairs", **ev))
        lap("dpo")
    res["wall_s"] = float(sum(res["stage_wall_s"].values()))
    return res


# ------------------------------------------------------------------------------ markdown, plots --

def _write_markdown(cfg: dict, results: dict, out: str) -> None:
    lines = [f"# star_graph{' (quick)' if cfg['quick'] else ''}", "",
             f"`python -m kljax.reproduce star_graph{' --quick' if cfg['quick'] else ''}` — {results['machine']}; "
             f"wall {results['wall_s'] / 60:.1f} min (machine shared with other jobs).", ""]
    for gr in results["graphs"]:
        ref = gr["reference"]
        tf = ", ".join(f"{x:.2f}" for x in ref["teacher_forced"])
        lines += [f"## {gr['graph']}", "",
                  f"π_ref: sampled accuracy {ref['accuracy']:.3f}, greedy {ref['greedy_accuracy']:.3f} (chance at the "
                  f"decision node 1/d = {ref['chance']:.2f}); teacher-forced accuracy per target position (s, n1, …, "
                  f"g, EOS) = ({tf}); its own arm choice at the decision node (argmax over the arm starts) is right on "
                  f"{ref['decision_accuracy']:.3f} of test graphs.", "",
                  "Whole-path accuracy on held-out test graphs (sampled at T = 1, no top-k) and exact KL(π‖π_ref) "
                  "(per sequence, per token):", "",
                  common.markdown_table(["method", "setting", "accuracy", "KL/seq", "KL/token"], _table_rows(gr)), ""]
        if gr.get("curve"):
            lines += ["Critic learning curve (Bernoulli critics, Q-type = one output per next token, V-type = value "
                      "read at the candidate's slot; one round of π_ref roll-outs on training graphs; "
                      f"pool success rate {gr['pool']['success_rate']:.3f}). *decision acc.* = on test graphs, the arm "
                      "start with the highest predicted success is the true n1 (train: the same on 512 training "
                      f"graphs); *Q♯ acc.* = Q♯-guided accuracy at η = {cfg['curve']['eval_eta']:g}:", "",
                      common.markdown_table(
                          ["critic (init/labels)", "roll-outs", "decision acc. (test)", "decision acc. (train)",
                           "Q♯ acc.", "Q♯ KL/seq", "critic training wall (s)"],
                          [[p["variant"], p["rollouts"], f"{p['decision_accuracy']:.3f}",
                            f"{p['train_decision_accuracy']:.3f}", f"{p['guided_accuracy']:.3f}",
                            f"{p['guided_kl_seq']:.3f}", "—" if p.get("train_wall_s") is None else f"{p['train_wall_s']:.0f}"]
                           for p in gr["curve"]]), ""]
        lines += ["Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in gr["stage_wall_s"].items()), ""]
    lines += [_SETTINGS_NOTE, ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


_SETTINGS_NOTE = """Differences from the paper (Q♯ §3.1, App. C): a 3-layer width-64 transformer (≈ 0.16M
parameters) trained from scratch instead of GPT-2 small/medium; G(2,3,20) instead of G(2,5,50)/G(5,5)/G(3,8)
(on this CPU the reference does not reach the plateau on G(2,5,50) within minutes); pretraining for 500
steps × batch 128 (≈ 1.3 epochs of 50k training graphs) instead of 200k graphs × 30 epochs; critics
trained 300 steps × batch 128 instead of 10 epochs over 200k pairs; a test set of 1,000
instead of 20k graphs; the critic trained on π_ref roll-outs (one round, no DAgger roll-in) instead of
balanced (ground truth, failed sample) pairs; decoding without top-k (the paper: top-k 10), so every KL is
to the untruncated π_ref; one seed. The Q♯ paper's "CD" on the star graph is log p (FUDGE); here CD is
Eq. 6's exp(p/η)."""


def _plots(cfg: dict, results: dict, out: str) -> None:
    plt = common.pyplot()
    for gr in results["graphs"]:
        tag = gr["graph"].replace("(", "").replace(")", "").replace(",", "_")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        variants = [v["name"] for v in cfg["curve"]["variants"]]
        for v in variants:
            pts = [p for p in gr["curve"] if p["variant"] == v]
            if pts:
                ax.plot([p["rollouts"] for p in pts], [p["decision_accuracy"] for p in pts], "o-", label=f"critic {v}")
        ax.axhline(gr["reference"]["decision_accuracy"], color="gray", ls="--", label="π_ref's own choice")
        ax.axhline(gr["mc"]["candidate_p_argmax_is_n1"], color="green", ls=":", label="MC values")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled π_ref roll-outs")
        ax.set_ylabel("held-out decision accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{gr['graph']}: critic at the decision node")
        ax.legend(fontsize=7)
        ax = axes[1]
        for r in gr["methods"]:
            ax.scatter(max(r["kl_seq"], 1e-3), r["accuracy"], s=20)
            ax.annotate(f"{r['method']} {r['detail'].split(',')[0] if 'η' in r['detail'] else ''}",
                        (max(r["kl_seq"], 1e-3), r["accuracy"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("KL(π‖π_ref) per sequence (π_ref plotted at 1e-3)")
        ax.set_ylabel("whole-path accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("accuracy vs KL to π_ref")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"star_graph_{tag}.png"), dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------ V-type (prefix) critic --
# The Q♯ star-graph code's classifier (GPTClassifier) is V-type: the value of candidate token c is read at
# c's own slot, from the hidden state of (prefix, c). kljax's `qsharp` loop trains a Q-type critic (one
# output per next token, read at the prefix's last slot). The two see different problems at the decision
# node: Q-type must output the predecessor of g (a reverse lookup, the very step π_ref fails to learn),
# V-type only has to check that c's arm leads to g, starting from the query c (a forward lookup, the
# step π_ref's trunk already does).

def _v_loss(model, batch, rng):
    """qsharp_bce on a scalar head read at each completion token's own slot (tokens=None: V-type)."""
    from kljax.objectives import value as vo
    del rng
    v = model.values(model.hidden(batch["tokens"], positions=batch["positions"], valid=batch["valid"]))
    loss, m = vo.qsharp_bce(v[:, 1:], None, batch["returns"], batch["mask"][:, :-1])
    return loss, dict(m)


def train_v_critic(qc, ref_dir: str, pool: dict, labels: str, n: int, workdir: str):
    """Train a V-type Bernoulli critic (scalar head) with kljax's step and loop on the first `n` roll-outs."""
    from kljax.train import driver, runs as runs_lib, setup as setup_lib
    from kljax.train import qsharp, sharding
    task = setup_lib.build_task(qc)
    mesh = setup_lib.build_mesh(qc)
    ts = setup_lib.create_state(qc, mesh, task)
    if qc.qsharp.critic_init == "reference":
        ref_ts, _ = runs_lib.load_state_from(ref_dir, mesh)
        ts = qsharp.merge_params(ts, ref_ts.params)
    step = setup_lib.make_step(_v_loss, qc, mesh, ts)
    data = {k: pool[k][:n] for k in ("tokens", "valid", "positions", "returns")}
    data["mask"] = pool["mask_all" if labels == "all" else "mask"][:n]
    key = jax.random.PRNGKey(int(qc.seed) + 3)
    bs = int(qc.batch_size)

    def step_fn(s, _):
        i = int(jax.device_get(s.step))
        idx = np.asarray(jax.random.choice(jax.random.fold_in(key, i), n, (bs,), replace=n < bs))
        return step(s, sharding.shard_batch({k: v[idx] for k, v in data.items()}, mesh))

    t0 = time.time()
    driver.run_loop(qc, workdir, state=ts, step_fn=step_fn, batches=None, bar_keys=("loss", "critic/accuracy"),
                desc=os.path.basename(workdir))
    return runs_lib.load_model_from(workdir, mesh), time.time() - t0


def _v_values_fn():
    from flax import nnx

    @nnx.jit
    def last_value(model, tokens, valid):
        pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
        return model.values(model.hidden(tokens, positions=pos, valid=valid))[:, -1]
    return last_value


_LAST_VALUE = None


def v_critic_p(critic, prefix, cand):
    """σ(critic) of (prefix, c) for every candidate: prefix [b, L] (all valid), cand [b, K] -> [b, K]."""
    global _LAST_VALUE
    if _LAST_VALUE is None:
        _LAST_VALUE = _v_values_fn()
    b, k = cand.shape
    rows = np.concatenate([np.repeat(prefix, k, 0), cand.reshape(-1, 1)], 1).astype(np.int32)
    v = np.asarray(_LAST_VALUE(critic, jnp.asarray(rows), jnp.ones(rows.shape, jnp.int32)))
    return (1.0 / (1.0 + np.exp(-v))).reshape(b, k)


def v_decision_values(critic, task, records) -> np.ndarray:
    """[B, V] success logits of each arm start as n1 (others −inf), for `decision_accuracy`."""
    prefix = np.concatenate([records["prompt"], records["target"][:, :1]], 1)
    starts = _arm_starts(task, records)
    d = max(len(s) for s in starts)
    cand = np.array([s + [s[0]] * (d - len(s)) for s in starts])
    p = v_critic_p(critic, prefix, cand)
    out = np.full((len(prefix), task.vocab_size), -np.inf, np.float32)
    np.put_along_axis(out, cand, p.astype(np.float32), axis=1)
    return out


def v_guided_eval(ref, critic, task, records, key, *, etas, guidances=("qsharp", "cd"), candidates: int = 4,
                  batch_size: int = 256) -> dict:
    """Q♯/CD decoding with a V-type critic at EVERY step: values for π_ref's top `candidates` tokens
    (the others keep their π_ref logits, Q♯ math code's top-k rule), sampled at T = 1; exact KL summed
    over the generated tokens."""
    from kljax import divergences as dv
    from kljax.objectives import value as vo
    from kljax.tasks import base as tb
    from kljax.train import sequences as seq_lib
    n = task.completion_len
    out = {}
    for guidance in guidances:
        for eta in etas:
            acc = kl_sum = ntok = 0.0
            for lo in range(0, len(records["prompt"]), batch_size):
                r = {k: v[lo:lo + batch_size] for k, v in records.items()}
                b = len(r["prompt"])
                seq = np.asarray(r["prompt"], np.int32)
                done = np.zeros(b, bool)
                toks = np.full((b, n), task.pad_id, np.int32)
                m = np.zeros((b, n), np.int32)
                kk = jax.random.fold_in(key, lo)
                for t in range(n):
                    L = seq.shape[1]
                    ref_logits = np.asarray(seq_lib.model_logits(ref, np.concatenate([seq, seq[:, -1:]], 1),
                                                            np.ones((b, L + 1), np.int32), L))[:, 0]
                    cand = np.argsort(-ref_logits, 1)[:, :candidates]
                    pc = v_critic_p(critic, seq, cand)
                    p = np.zeros_like(ref_logits)
                    np.put_along_axis(p, cand, pc, axis=1)
                    if guidance == "qsharp":
                        pl = np.clip(p, 0.0, 1.0 - 1e-6)
                        crit = np.where(pl > 0, np.log(np.maximum(pl, 1e-30)) - np.log1p(-pl), -np.inf)
                        g = vo.qsharp_logits(ref_logits, crit.astype(np.float32), eta, "bernoulli")
                    else:
                        g = vo.qsharp_logits(ref_logits, p.astype(np.float32), eta, "cd")
                    kl = np.asarray(dv.kl(g, ref_logits))
                    y = np.asarray(jax.random.categorical(jax.random.fold_in(kk, t), jnp.asarray(g), axis=-1))
                    live = ~done
                    kl_sum += float(kl[live].sum())
                    toks[live, t] = y[live]
                    m[live, t] = 1
                    done |= y == task.eos_id
                    seq = np.concatenate([seq, np.where(live, y, task.pad_id)[:, None].astype(np.int32)], 1)
                    if done.all():
                        break
                acc += tb.exact_match(toks, m, r["target"], r["target_valid"], task.eos_id).sum()
                ntok += m.sum()
            total = len(records["prompt"])
            out[f"{guidance}/eta={eta:g}"] = {"accuracy": acc / total, "kl_seq": kl_sum / total,
                                              "kl_token": kl_sum / max(ntok, 1)}
    return out
