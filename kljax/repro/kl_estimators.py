"""`kl_estimators`: every KL estimator × placement, trained to its fixed point on two enumerable toys.

Command: ``python -m kljax.reproduce kl_estimators [--quick] [--seeds N] [--out DIR]``.

The problem is KL-regularized reward maximization, max_π E_π[r] − β·KL(π‖π_ref), whose optimum is
π*_rev = π_ref·exp(r/β)/Z. Its forward-KL counterpart max_π E_π[r] − β·KL(π_ref‖π) has the optimum
π*_fwd(y) = β·π_ref(y)/(λ − r(y)) with λ > max r fixing Σπ = 1. Each combination of estimator
(k1, k2, k3, exact), placement (``kl_in`` = ``loss`` or ``reward``), sampling (on-policy, or off-policy
from a fixed uniform behaviour policy μ) and importance weight (``none``, ``differentiable`` w,
``stop_gradient`` SG(w)) is the kljax ``ppo`` objective (unclipped: its policy-gradient term is
−w·A, exact off-policy for one-token outcomes) with those options; nothing is reimplemented here.

Two toys whose outcomes can all be listed (so every expectation below is exact):

* ``bandit``: one draw over K = 8 arms, r(y) = y/(K−1), π_ref ∝ exp(−0.5·y) (the best arm is the
  reference's rarest), β = 0.2; tabular logits.
* ``sequence``: T = 6 binary tokens (64 sequences), a tabular autoregressive policy with one softmax
  per prefix (so every sequence distribution is representable), random π_ref logits ~ N(0, 1),
  r(y) ~ U(0, 1) per sequence, β = 0.1. Per-token estimators, sequence-level optima (as in
  "A Comedy of Estimators", §3.3, at T = 6 instead of their longer horizons). On-policy only: with
  per-token ratios a fixed behaviour policy would bias the reward term as well.

For each combination the table reports (1) the expected gradient of the KL term alone (β = 1, zero
advantages) at a generic policy, computed exactly by enumerating the sampling law: its relative bias
against ∇KL(π‖π_ref) (the gradient users want) and against ∇KL(π_ref‖π), and its per-sample standard
deviation; (2) the fixed point of training with the exact expected gradient (Adam, decaying step):
total-variation distance to π*_rev and π*_fwd, and which one it reaches; (3) the same with Monte-Carlo
batches of B samples over several seeds (leave-one-out baseline), mean ± std of the final distances.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kljax import objectives
from kljax.repro import common

DESCRIPTION = "KL estimator × placement: which optimum each reaches, gradient bias and variance"

ON = [("k1", "loss"), ("k2", "loss"), ("k3", "loss"), ("exact", "loss"),
      ("k1", "reward"), ("k2", "reward"), ("k3", "reward"), ("exact", "reward")]
OFF = [(e, "loss", w) for e in ("k1", "k2", "k3") for w in ("none", "differentiable", "stop_gradient")]
OFF += [("exact", "loss", "none"), ("k1", "reward", "none"), ("k2", "reward", "none"),
        ("k3", "reward", "none")]

QUICK = {
    "bandit": [["k1", "reward", "on", "none"], ["k1", "loss", "on", "none"],
               ["k3", "loss", "on", "none"], ["k3", "loss", "off", "none"],
               ["k3", "loss", "off", "differentiable"]],
    "sequence": [["k1", "reward", "on", "none"], ["k3", "loss", "on", "none"]],
}


def config(quick: bool = False, seeds: int | None = None) -> dict:
    full = {
        "bandit": [[e, p, "on", "none"] for e, p in ON] + [[e, p, "off", w] for e, p, w in OFF],
        "sequence": [[e, p, "on", "none"] for e, p in ON],
    }
    return {
        "table": "kl_estimators",
        "quick": quick,
        "seeds": int(seeds or (2 if quick else 5)),
        "steps": 400 if quick else 3000,
        "log_every": 20 if quick else 50,
        "batch_size": 32,
        "lr": 0.1,
        "lr_final": 0.002,
        "objective": "ppo",
        "objective_hparams": {"clip_eps_low": None, "loss_agg": "seq-mean-token-sum"},
        "reach_tv": 0.02,
        "grad_eval_noise": 0.7,
        "envs": {
            "bandit": {"kind": "bandit", "arms": 8, "ref_slope": 0.5, "beta": 0.2},
            "sequence": {"kind": "sequence", "length": 6, "ref_scale": 1.0, "beta": 0.1, "seed": 0},
        },
        "combos": QUICK if quick else full,
    }


# ------------------------------------------------------------------------------ environments --

class Env:
    """Outcomes y (``tokens [N, T]``), the policy node used at each position (``nodes [N, T]``),
    reference logits ``[n_nodes, V]``, rewards ``[N]`` and β."""

    def __init__(self, spec: dict):
        self.name = spec["kind"]
        self.beta = float(spec["beta"])
        if spec["kind"] == "bandit":
            k = int(spec["arms"])
            self.tokens = np.arange(k)[:, None]
            self.nodes = np.zeros((k, 1), np.int32)
            self.ref_theta = (-float(spec["ref_slope"]) * np.arange(k))[None].astype(np.float32)
            self.r = (np.arange(k) / (k - 1)).astype(np.float32)
        else:
            t = int(spec["length"])
            rng = np.random.default_rng(spec["seed"])
            n = 2 ** t
            self.tokens = np.array([[(i >> (t - 1 - j)) & 1 for j in range(t)] for i in range(n)])
            self.nodes = np.zeros((n, t), np.int32)
            for i in range(n):
                node = 0
                for j in range(t):
                    self.nodes[i, j] = node
                    node = 2 * node + 1 + self.tokens[i, j]
            self.ref_theta = (rng.normal(size=(n - 1, 2)) * spec["ref_scale"]).astype(np.float32)
            self.r = rng.uniform(size=n).astype(np.float32)
        self.tokens = jnp.asarray(self.tokens)
        self.nodes = jnp.asarray(self.nodes)
        self.mu_theta = np.zeros_like(self.ref_theta)  # uniform behaviour policy

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def token_logp(self, theta):
        """[N, T] log π(y_t | y_<t) for every outcome."""
        lp = jax.nn.log_softmax(theta, axis=-1)
        return jnp.take_along_axis(lp[self.nodes], self.tokens[..., None], axis=-1)[..., 0]

    def seq_logp(self, theta):
        return jnp.sum(self.token_logp(theta), axis=-1)

    def row_logits(self, theta):
        return theta[self.nodes]

    def optima(self):
        """(log π*_rev, log π*_fwd) over outcomes, float64 numpy."""
        lref = np.asarray(self.seq_logp(jnp.asarray(self.ref_theta)), np.float64)
        r, beta = np.asarray(self.r, np.float64), self.beta
        rev = lref + r / beta
        rev = rev - np.logaddexp.reduce(rev)
        pref = np.exp(lref)
        lo, hi = r.max() + 1e-15, r.max() + beta + 1.0   # Σ βπ_ref/(λ − r) decreases in λ
        for _ in range(200):
            lam = 0.5 * (lo + hi)
            if np.sum(beta * pref / (lam - r)) > 1.0:
                lo = lam
            else:
                hi = lam
        fwd = beta * pref / (0.5 * (lo + hi) - r)
        return rev, np.log(fwd / fwd.sum())


# ------------------------------------------------------------------------------- one combo ----

def _row_losses(env: Env, theta, adv, est, place, sampling, weight, beta, hparams):
    """[N] loss of the kljax objective on each outcome fed as a one-row batch."""
    obj = objectives.get("ppo")
    lp = env.token_logp(theta)
    ref_lp = env.token_logp(jnp.asarray(env.ref_theta))
    old_lp = env.token_logp(jnp.asarray(env.mu_theta))
    logits, ref_logits = env.row_logits(theta), env.row_logits(jnp.asarray(env.ref_theta))

    def one(lp_y, ref_y, old_y, a_y, lg_y, rlg_y):
        batch = {"logp": lp_y[None], "ref_logp": ref_y[None], "mask": jnp.ones_like(lp_y)[None],
                 "advantages": a_y[None], "logits": lg_y[None], "ref_logits": rlg_y[None]}
        if sampling == "off":
            batch["old_logp"] = old_y[None]
        return obj(batch, beta=beta, kl_estimator=est, kl_in=place, importance_weight=weight,
                   **hparams)[0]

    return jax.vmap(one)(lp, ref_lp, old_lp, adv, logits, ref_logits)


def _sampling_logp(env: Env, theta, sampling):
    if sampling == "on":
        return jax.lax.stop_gradient(env.seq_logp(theta))
    return env.seq_logp(jnp.asarray(env.mu_theta))


def _tv(logp, logq):
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)))


def _make_train(env: Env, combo, cfg):
    est, place, sampling, weight = combo
    hp = dict(cfg["objective_hparams"])
    b, steps, every = cfg["batch_size"], cfg["steps"], cfg["log_every"]
    rev, fwd = (jnp.asarray(x, jnp.float32) for x in env.optima())
    r = jnp.asarray(env.r)
    sched = optax.exponential_decay(cfg["lr"], steps, cfg["lr_final"] / cfg["lr"])
    opt = optax.adam(sched)

    def loss_fn(theta, w, adv):
        return jnp.sum(w * _row_losses(env, theta, adv, est, place, sampling, weight, env.beta, hp))

    def step(carry, key):
        theta, ost, exact = carry
        logp_s = _sampling_logp(env, theta, sampling)
        p = jnp.exp(logp_s)
        counts = jnp.zeros(env.n).at[jax.random.categorical(key, logp_s, shape=(b,))].add(1.0)
        mean_r = jnp.sum(counts * r) / b
        adv_mc = r - (b * mean_r - r) / (b - 1)          # leave-one-out baseline
        w = jnp.where(exact, p, counts / b)
        adv = jnp.where(exact, r - jnp.sum(p * r), adv_mc)
        g = jax.grad(loss_fn)(theta, w, adv)
        upd, ost = opt.update(g, ost, theta)
        theta = optax.apply_updates(theta, upd)
        lp = env.seq_logp(theta)
        return (theta, ost, exact), jnp.stack([_tv(lp, rev), _tv(lp, fwd), jnp.max(jnp.exp(lp))])

    def train(key, exact):
        theta = jnp.asarray(env.ref_theta)
        _, hist = jax.lax.scan(step, (theta, opt.init(theta), exact), jax.random.split(key, steps))
        return hist[every - 1::every]

    return jax.jit(jax.vmap(train))


def _grad_stats(env: Env, combo, cfg):
    """Exact mean and per-sample spread of the KL term's gradient (β = 1, zero advantages)."""
    est, place, sampling, weight = combo
    hp = dict(cfg["objective_hparams"])
    rng = np.random.default_rng(1)
    theta = jnp.asarray(env.ref_theta + cfg["grad_eval_noise"] * rng.normal(size=env.ref_theta.shape),
                        jnp.float32)
    lref = env.seq_logp(jnp.asarray(env.ref_theta))
    zeros = jnp.zeros(env.n)

    def kl_rev(th):
        lp = env.seq_logp(th)
        return jnp.sum(jnp.exp(lp) * (lp - lref))

    def kl_fwd(th):
        return jnp.sum(jnp.exp(lref) * (lref - env.seq_logp(th)))

    @jax.jit
    def stats(th):
        per = jax.jacrev(lambda t: _row_losses(env, t, zeros, est, place, sampling, weight, 1.0, hp))(th)
        per = per.reshape(env.n, -1)
        p = jnp.exp(_sampling_logp(env, th, sampling))
        mean = p @ per
        var = jnp.sum(p * jnp.sum((per - mean) ** 2, axis=-1))
        g_rev, g_fwd = jax.grad(kl_rev)(th).ravel(), jax.grad(kl_fwd)(th).ravel()
        nr = jnp.linalg.norm(g_rev)
        return {"bias_rev": jnp.linalg.norm(mean - g_rev) / nr,
                "bias_fwd": jnp.linalg.norm(mean - g_fwd) / jnp.linalg.norm(g_fwd),
                "mean_norm": jnp.linalg.norm(mean) / nr,
                "std": jnp.sqrt(var) / nr}

    s = {k: float(v) for k, v in stats(theta).items()}
    tol = 1e-3
    if s["mean_norm"] < tol:
        s["follows"] = "zero"
    elif s["bias_rev"] < tol:
        s["follows"] = "reverse"
    elif s["bias_fwd"] < tol:
        s["follows"] = "forward"
    else:
        s["follows"] = "neither"
    return s


def _reaches(tv_rev, tv_fwd, max_prob, tol):
    if max_prob > 0.99:
        return "neither: collapses onto one outcome"
    if tv_rev < tol:
        return "reverse-KL optimum"
    if tv_fwd < tol:
        return "forward-KL optimum"
    return "neither (closer to " + ("reverse" if tv_rev < tv_fwd else "forward") + ")"


def label(combo) -> str:
    est, place, sampling, weight = combo
    s = f"{est} in {place}"
    if sampling == "off":
        s += ", off-policy" + ("" if weight == "none" else f", {'w' if weight == 'differentiable' else 'SG(w)'}")
    return s


# ----------------------------------------------------------------------------------- run -----

def run(cfg: dict, out: str) -> dict:
    common.prepare(out, cfg)
    seeds = cfg["seeds"]
    results = {"machine": common.machine(), "envs": {}}
    with common.Timer() as timer:
        for env_name, combos in cfg["combos"].items():
            env = Env(cfg["envs"][env_name])
            rev, fwd = env.optima()
            ref = np.asarray(env.seq_logp(jnp.asarray(env.ref_theta)))
            tvf = lambda a, c: float(0.5 * np.abs(np.exp(a) - np.exp(c)).sum())
            er = {"tv_rev_fwd": tvf(rev, fwd), "tv_ref_rev": tvf(ref, rev), "tv_ref_fwd": tvf(ref, fwd),
                  "combos": []}
            for combo in combos:
                combo = list(combo)
                train = _make_train(env, combo, cfg)
                keys = jax.random.split(jax.random.PRNGKey(0), seeds + 1)
                exact = jnp.arange(seeds + 1) == 0
                hist = np.asarray(train(keys, exact))              # [runs, n_log, 2]
                row = {"combo": combo, "label": label(combo), "grad": _grad_stats(env, combo, cfg),
                       "exact_final": hist[0, -1].tolist(), "mc_final": hist[1:, -1, :2].tolist(),
                       "mc_max_prob": hist[1:, -1, 2].tolist(),
                       "mc_curve_mean": hist[1:].mean(0).tolist(),
                       "mc_curve_min": hist[1:].min(0).tolist(), "mc_curve_max": hist[1:].max(0).tolist()}
                row["reaches"] = _reaches(*row["exact_final"], cfg["reach_tv"])
                row["exact_final"] = row["exact_final"][:2]
                er["combos"].append(row)
                print(f"[kl_estimators] {env_name:8s} {row['label']:34s} grad→{row['grad']['follows']:8s}"
                      f" fixed point TV rev {row['exact_final'][0]:.3f} fwd {row['exact_final'][1]:.3f}"
                      f" → {row['reaches']}", flush=True)
            results["envs"][env_name] = er
    results["wall_s"] = timer.seconds
    _plot(cfg, results, os.path.join(out, "kl_estimators.png"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(cfg, results))
    common.write_json(os.path.join(out, "results.json"), results, digits=5)
    return results


def markdown(cfg: dict, results: dict) -> str:
    parts = [f"# kl_estimators{' (quick)' if cfg['quick'] else ''}\n",
             f"Machine: {results['machine']}; wall time {results['wall_s']:.0f} s. "
             f"{cfg['seeds']} seeds of Monte-Carlo training (B = {cfg['batch_size']}, {cfg['steps']} "
             f"Adam steps); `reaches` is the exact-gradient fixed point (TV < {cfg['reach_tv']}).\n"]
    for env_name, er in results["envs"].items():
        spec = cfg["envs"][env_name]
        parts.append(f"\n## {env_name}: {spec}\n\nTV(π*_rev, π*_fwd) = {er['tv_rev_fwd']:.3f}; "
                     f"TV(π_ref, π*_rev) = {er['tv_ref_rev']:.3f}; TV(π_ref, π*_fwd) = {er['tv_ref_fwd']:.3f}.\n")
        rows = []
        for row in er["combos"]:
            g = row["grad"]
            mc = np.asarray(row["mc_final"])
            rows.append([row["label"], g["follows"], f"{g['bias_rev']:.3f}", f"{g['bias_fwd']:.3f}",
                         f"{g['std']:.2f}", f"{row['exact_final'][0]:.3f}", f"{row['exact_final'][1]:.3f}",
                         row["reaches"], common.mean_spread(mc[:, 0]), common.mean_spread(mc[:, 1])])
        parts.append(common.markdown_table(
            ["estimator / placement", "E[∇] follows", "bias vs ∇KL_rev", "bias vs ∇KL_fwd",
             "std / sample", "fixed point TV→π*_rev", "TV→π*_fwd", "reaches",
             "MC final TV→π*_rev", "MC TV→π*_fwd"], rows))
        parts.append("\n")
    parts.append("\nBias and std are relative to ‖∇KL(π‖π_ref)‖ (bias vs ∇KL_fwd relative to "
                 "‖∇KL(π_ref‖π)‖), at a generic policy (reference logits + N(0, 0.7²) noise); "
                 "off-policy samples come from a uniform behaviour policy.\n")
    return "\n".join(parts)


def _plot(cfg, results, path):
    plt = common.pyplot()
    panels = []
    for env_name, er in results["envs"].items():
        for sampling in ("on", "off"):
            rows = [r for r in er["combos"] if r["combo"][2] == sampling]
            if rows:
                panels.append((f"{env_name}, {sampling}-policy", rows))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for j, (title, rows) in enumerate(panels):
        colors = plt.cm.tab20(np.arange(20))
        for n, row in enumerate(rows):
            mean, lo, hi = (np.asarray(row[k]) for k in ("mc_curve_mean", "mc_curve_min", "mc_curve_max"))
            x = (np.arange(mean.shape[0]) + 1) * cfg["log_every"]
            style = "-" if row["combo"][1] == "loss" else "--"
            for i in range(2):
                axes[i, j].plot(x, mean[:, i], style, color=colors[(2 * n) % 20 + (2 * n) // 20],
                                label=row["label"], lw=1.3)
                axes[i, j].fill_between(x, lo[:, i], hi[:, i], color=colors[(2 * n) % 20 + (2 * n) // 20],
                                        alpha=0.15)
        for i, what in enumerate(("π*_rev = π_ref·exp(r/β)/Z", "π*_fwd (forward-KL optimum)")):
            axes[i, j].set_title(f"{title}: TV to {what}", fontsize=9)
            axes[i, j].set_xlabel("step")
            axes[i, j].set_ylim(0, 1)
        axes[0, j].legend(fontsize=6, framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
