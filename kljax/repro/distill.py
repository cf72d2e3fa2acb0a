"""`distill`: which teacher modes a too-small student keeps, per distillation divergence.

Command: ``python -m kljax.reproduce distill [--quick] [--seeds N] [--out DIR]``.

Teacher: a synthetic second-order Markov language over V = 24 tokens whose next-token distribution
is genuinely multi-modal: for every context (previous two tokens, 576 contexts) exactly 3 tokens are
valid, with Dirichlet(3, 3, 3) weights, and the other 21 tokens share a probability of 1e-4.
Sequences: two uniform start tokens, then 10 teacher tokens. The teacher's logits are exact.

Student: embeddings (8) of the previous two tokens → tanh MLP (64) → a rank-8 bottleneck → logits
over 24 tokens (≈ 2.0k parameters). A rank-8 softmax cannot represent 576 different 3-sparse
distributions, so the student must choose what to give up, and the divergence decides: forward KL
spreads mass to cover every mode (leaking mass onto invalid tokens), reverse KL drops modes to keep
its mass on valid tokens.

Training: full batch over every context once (the expected loss under a uniform context
distribution, so the only randomness is the student's initialization, one per seed), minimizing the
kljax distillation objective (``kljax.objectives``: ``fkl``, ``rkl``, ``jsd`` at β = 0.1/0.5/0.9 (GKD
convention: β → 0 is forward-like, β → 1 reverse-like), ``skl`` and ``srkl`` at α = 0.1, ``tvd``,
``akl`` at μ = 0.5) with Adam for 3,000 steps (``--quick``: forward and reverse KL, 400 steps).

Evaluation, exact over all contexts and the vocabulary: KL(p‖q) and KL(q‖p) to the teacher; valid
mass (student probability on the 3 valid tokens); modes covered (fraction of the teacher's valid
tokens on which the student puts at least half the teacher's probability) and its histogram per
context; student mass on the teacher's 1st/2nd/3rd mode. Task accuracy: the fraction of 4,000
sequences *sampled from the student* (temperature 1) whose 10 generated tokens are all valid, the
fraction of valid sampled tokens, and the greedy (arg-max) validity per context.

Differences from the papers (GKD, DistiLLM, AKL): a synthetic language and a ~2.0k-parameter MLP
student instead of GPT-2/T5/OpenLLaMA students on instruction data; token-level full-distribution
losses on a fixed context set (no on-policy GKD or MiniLLM here); an exact teacher.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kljax import divergences, objectives
from kljax.repro import common

DESCRIPTION = "forward vs reverse KL (and JSD, skew KL, TVD, AKL): mode covering vs mode seeking"

OBJECTIVES = [
    {"label": "forward KL", "name": "fkl", "hparams": {}},
    {"label": "JSD(β=0.1)", "name": "jsd", "hparams": {"beta": 0.1}},
    {"label": "skew KL(α=0.1)", "name": "skl", "hparams": {"alpha": 0.1}},
    {"label": "AKL(μ=0.5)", "name": "akl", "hparams": {"mu": 0.5}},
    {"label": "JSD(β=0.5)", "name": "jsd", "hparams": {"beta": 0.5}},
    {"label": "TVD", "name": "tvd", "hparams": {}},
    {"label": "JSD(β=0.9)", "name": "jsd", "hparams": {"beta": 0.9}},
    {"label": "skew RKL(α=0.1)", "name": "srkl", "hparams": {"alpha": 0.1}},
    {"label": "reverse KL", "name": "rkl", "hparams": {}},
]
QUICK = ("forward KL", "reverse KL")


def config(quick: bool = False, seeds: int | None = None) -> dict:
    return {
        "table": "distill",
        "quick": quick,
        "seeds": int(seeds or (2 if quick else 3)),
        "vocab": 24, "modes": 3, "dirichlet": 3.0, "invalid_mass": 1e-4, "length": 10,
        "teacher_seed": 0,
        "student": {"embed": 8, "hidden": 64, "rank": 8},
        "steps": 400 if quick else 3000,
        "lr": 0.01,
        "lr_final": 0.001,
        "eval_sequences": 500 if quick else 4000,
        "cover_ratio": 0.5,
        "objectives": [o for o in OBJECTIVES if o["label"] in QUICK] if quick else OBJECTIVES,
    }


# ------------------------------------------------------------------------------------ teacher --

def make_teacher(cfg):
    """(logits [V, V, V]: context (a, b) → next token, valid mask [V, V, V]) as numpy."""
    v, m = cfg["vocab"], cfg["modes"]
    rng = np.random.default_rng(cfg["teacher_seed"])
    probs = np.full((v, v, v), cfg["invalid_mass"] / (v - m))
    valid = np.zeros((v, v, v), bool)
    for a in range(v):
        for b in range(v):
            idx = rng.choice(v, size=m, replace=False)
            probs[a, b, idx] = (1 - cfg["invalid_mass"]) * rng.dirichlet(np.full(m, cfg["dirichlet"]))
            valid[a, b, idx] = True
    return np.log(probs).astype(np.float32), valid


def all_contexts(vocab):
    """(a, b) ``[V²]``: every context (previous two tokens) once."""
    a, b = np.meshgrid(np.arange(vocab), np.arange(vocab), indexing="ij")
    return a.ravel(), b.ravel()


def sample_sequences(logits_fn, u, start):
    """Ancestral sampling by inverse CDF from host uniforms ``u [n, length]`` (no random-bit
    generation to compile); ``start [n, 2]``. Returns the generated tokens ``[n, length]`` and the
    contexts they were drawn in."""
    def step(ctx, u_t):
        cdf = jnp.cumsum(jax.nn.softmax(logits_fn(ctx[:, 0], ctx[:, 1]), axis=-1), axis=-1)
        tok = jnp.minimum(jnp.sum(cdf < u_t[:, None], axis=-1), cdf.shape[-1] - 1)
        return jnp.stack([ctx[:, 1], tok], axis=1), (ctx, tok)

    _, (ctxs, toks) = jax.lax.scan(step, start, u.T)
    return toks.T, ctxs


# ------------------------------------------------------------------------------------ student --

def init_student(key, cfg):
    v, s = cfg["vocab"], cfg["student"]
    k = jax.random.split(key, 4)
    n = lambda kk, shape, fan: jax.random.normal(kk, shape) / np.sqrt(fan)
    return {"emb": n(k[0], (v, s["embed"]), 1.0),
            "w1": n(k[1], (2 * s["embed"], s["hidden"]), 2 * s["embed"]), "b1": jnp.zeros(s["hidden"]),
            "w2": n(k[2], (s["hidden"], s["rank"]), s["hidden"]),
            "out": n(k[3], (s["rank"], v), s["rank"]), "bias": jnp.zeros(v)}


def student_logits(params, a, b):
    x = jnp.concatenate([params["emb"][a], params["emb"][b]], axis=-1)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (h @ params["w2"]) @ params["out"] + params["bias"]


# -------------------------------------------------------------------------------------- train --

def _make_train(obj, cfg):
    """Full-batch training on every context once (the loss is exact, no data noise); seeds vary the
    student's initialization."""
    fn = objectives.get(obj["name"])
    hp = dict(obj["hparams"])
    sched = optax.exponential_decay(cfg["lr"], cfg["steps"], cfg["lr_final"] / cfg["lr"])
    opt = optax.adam(sched)

    def loss_fn(params, a, b, t_logits):
        s = student_logits(params, a, b)[None]
        return fn(s, t_logits[None], jnp.ones(s.shape[:2], jnp.float32), **hp)[0]

    def train(key, a, b, t_logits):
        params = init_student(key, cfg)

        def step(carry, _):
            params, ost = carry
            loss, g = jax.value_and_grad(loss_fn)(params, a, b, t_logits)
            upd, ost = opt.update(g, ost, params)
            return (optax.apply_updates(params, upd), ost), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=cfg["steps"])
        return params, losses

    return jax.jit(jax.vmap(train, in_axes=(0, None, None, None)))


@jax.jit
def _evaluate(params, a, b, t_logits, t_valid, order, teacher_table, valid_table, u, start, cover_ratio):
    s_logits = student_logits(params, a, b)
    q = jax.nn.softmax(s_logits, axis=-1)
    t_p = jnp.exp(t_logits)
    mode_mass = jnp.take_along_axis(q, order, axis=-1)                        # [C, modes]
    mode_p = jnp.take_along_axis(t_p, order, axis=-1)
    greedy = jnp.take_along_axis(t_valid, jnp.argmax(s_logits, -1)[:, None], -1)[:, 0]
    toks, ctxs = sample_sequences(lambda x, y: student_logits(params, x, y), u, start)
    ok = valid_table[ctxs[..., 0], ctxs[..., 1], toks.T].T                    # [n, length]
    return {"forward_kl": jnp.mean(divergences.forward_kl(t_logits, s_logits)),
            "reverse_kl": jnp.mean(divergences.reverse_kl(t_logits, s_logits)),
            "valid_mass": jnp.mean(jnp.sum(jnp.where(t_valid, q, 0.0), -1)),
            "modes_covered": jnp.mean(mode_mass >= cover_ratio * mode_p),
            "covered_hist": jnp.mean(jax.nn.one_hot(jnp.sum(mode_mass >= cover_ratio * mode_p, -1),
                                                    order.shape[-1] + 1), axis=0),
            "mode_mass": jnp.mean(mode_mass, axis=0),
            "greedy_valid": jnp.mean(greedy),
            "sequence_valid": jnp.mean(jnp.all(ok, axis=-1)),
            "token_valid": jnp.mean(ok)}


# ---------------------------------------------------------------------------------------- run --

METRICS = [("sequence_valid", "sampled sequences all valid ↑"), ("token_valid", "sampled tokens valid ↑"),
           ("greedy_valid", "greedy token valid ↑"), ("valid_mass", "mass on valid tokens ↑"),
           ("modes_covered", "modes covered ↑"), ("forward_kl", "KL(p‖q) ↓"), ("reverse_kl", "KL(q‖p) ↓")]


def run(cfg: dict, out: str) -> dict:
    common.prepare(out, cfg)
    teacher_logits, valid = make_teacher(cfg)
    a_np, b_np = all_contexts(cfg["vocab"])
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    t_logits, t_valid = jnp.asarray(teacher_logits[a_np, b_np]), jnp.asarray(valid[a_np, b_np])
    t_p = np.exp(teacher_logits[a_np, b_np])
    order = np.argsort(-np.where(valid[a_np, b_np], t_p, -1.0), axis=-1)[:, :cfg["modes"]]
    mode_p = np.take_along_axis(t_p, order, -1)
    teacher = {"mode_mass": mode_p.mean(0).tolist(),
               "valid_mass": float(np.mean(np.sum(np.where(valid[a_np, b_np], t_p, 0.0), -1)))}
    ex = int(np.argmax(mode_p.min(-1)))                    # the context with the most balanced modes
    rng = np.random.default_rng(0)
    n = cfg["eval_sequences"]
    u = jnp.asarray(rng.uniform(size=(n, cfg["length"])).astype(np.float32))
    start = jnp.asarray(rng.integers(0, cfg["vocab"], size=(n, 2)))
    ev_args = (a, b, t_logits, t_valid, jnp.asarray(order), jnp.asarray(teacher_logits), jnp.asarray(valid),
               u, start, cfg["cover_ratio"])
    seeds = cfg["seeds"]
    results = {"machine": common.machine(), "teacher": teacher, "objectives": [],
               "example_context": [int(a_np[ex]), int(b_np[ex])], "example_teacher": t_p[ex].tolist()}
    with common.Timer() as timer:
        for obj in cfg["objectives"]:
            params, losses = _make_train(obj, cfg)(jax.random.split(jax.random.PRNGKey(1), seeds), a, b, t_logits)
            per_seed = [_evaluate(jax.tree_util.tree_map(lambda x: x[i], params), *ev_args) for i in range(seeds)]
            ev = {k: np.stack([np.asarray(e[k]) for e in per_seed]) for k in per_seed[0]}
            first = jax.tree_util.tree_map(lambda x: x[0], params)
            example = jax.nn.softmax(student_logits(first, a[ex], b[ex]))
            results["objectives"].append({"label": obj["label"], "name": obj["name"], "hparams": obj["hparams"],
                                          "final_loss": np.asarray(losses[:, -1]).tolist(),
                                          "example": np.asarray(example).tolist(),
                                          **{k: x.tolist() for k, x in ev.items()}})
            print(f"[distill] {obj['label']:16s} " + "  ".join(
                f"{k} {common.mean_spread(ev[k])}" for k, _ in METRICS), flush=True)
    results["wall_s"] = timer.seconds
    _plot(cfg, results, os.path.join(out, "distill_modes.png"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(cfg, results))
    common.write_json(os.path.join(out, "results.json"), results, digits=5)
    return results


def markdown(cfg: dict, results: dict) -> str:
    headers = ["objective"] + [h for _, h in METRICS] + ["mass on modes 1/2/3"]
    rows = []
    t = results["teacher"]
    rows.append(["teacher", "—", "—", "—", f"{t['valid_mass']:.4f}", "1", "0", "0",
                 " / ".join(f"{x:.2f}" for x in t["mode_mass"])])
    for o in results["objectives"]:
        mm = np.asarray(o["mode_mass"]).mean(0)
        rows.append([o["label"]] + [common.mean_spread(o[k]) for k, _ in METRICS]
                    + [" / ".join(f"{x:.2f}" for x in mm)])
    s = cfg["student"]
    return (f"# distill{' (quick)' if cfg['quick'] else ''}\n\n"
            f"Machine: {results['machine']}; wall time {results['wall_s']:.0f} s. Teacher: second-order "
            f"Markov language, V = {cfg['vocab']}, {cfg['modes']} valid next tokens per context. Student: "
            f"MLP with a rank-{s['rank']} output bottleneck, {cfg['steps']} full-batch Adam steps on all "
            f"{cfg['vocab'] ** 2} contexts; mean ± std over {cfg['seeds']} seeds (student initializations). "
            f"KLs, valid mass and modes are exact averages over the contexts; sequence and token validity "
            f"come from {cfg['eval_sequences']} sequences of {cfg['length']} tokens sampled from the student.\n\n"
            + common.markdown_table(headers, rows) + "\n")


def _plot(cfg, results, path):
    plt = common.pyplot()
    objs = results["objectives"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    axes = axes.ravel()
    labels = ["teacher"] + [o["label"] for o in objs]
    mass = np.array([results["teacher"]["mode_mass"]] + [np.asarray(o["mode_mass"]).mean(0) for o in objs])
    invalid = 1.0 - mass.sum(1)
    bottom = np.zeros(len(labels))
    for i in range(mass.shape[1]):
        axes[0].bar(labels, mass[:, i], bottom=bottom, label=f"teacher mode {i + 1}")
        bottom += mass[:, i]
    axes[0].bar(labels, invalid, bottom=bottom, color="black", label="invalid tokens")
    axes[0].set_ylabel("student probability (mean over contexts)")
    axes[0].set_title("where the student puts its mass", fontsize=10)
    axes[0].tick_params(axis="x", rotation=60, labelsize=8)
    axes[0].legend(fontsize=7)
    for o in objs:
        cov, vm = np.asarray(o["modes_covered"]), np.asarray(o["valid_mass"])
        axes[1].scatter(cov, vm, s=18)
        axes[1].annotate(o["label"], (cov.mean(), vm.mean()), fontsize=7)
    axes[1].set_xlabel("modes covered (q ≥ ½p on a valid token)")
    axes[1].set_ylabel("mass on valid tokens")
    axes[1].set_title("mode covering ← → mode seeking", fontsize=10)
    x = np.arange(cfg["vocab"])
    axes[2].bar(x, results["example_teacher"], color="lightgray", label="teacher")
    pick = [o for o in objs if o["label"] in ("forward KL", "reverse KL", "JSD(β=0.5)")]
    for i, o in enumerate(pick):
        axes[2].plot(x, o["example"], marker="o", ms=3, lw=1, label=o["label"])
    axes[2].set_title(f"one context {tuple(results['example_context'])}: next-token distributions", fontsize=10)
    axes[2].set_xlabel("token")
    axes[2].legend(fontsize=7)
    hist = np.array([np.asarray(o["covered_hist"]).mean(0) for o in objs])     # [objectives, modes + 1]
    width = 0.8 / len(objs)
    for i, o in enumerate(objs):
        axes[3].bar(np.arange(hist.shape[1]) + (i - len(objs) / 2 + 0.5) * width, hist[i], width, label=o["label"])
    axes[3].set_xticks(np.arange(hist.shape[1]))
    axes[3].set_xlabel(f"teacher modes covered in a context (of {hist.shape[1] - 1})")
    axes[3].set_ylabel("fraction of contexts")
    axes[3].set_title("mode coverage per context", fontsize=10)
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
