"""`mdvi`: tabular MD-VI and Munchausen VI against approximate value iteration on Garnet MDPs.

Command: ``python -m kljax.reproduce mdvi [--quick] [--seeds N] [--out DIR]``.

Setting of "Leverage the Average" (Vieillard et al., NeurIPS 2020, App. D; reference/value_based.md
§4.1): Garnet MDPs with 30 states, 4 actions, branching 4 (each (s, a) has 4 distinct successors
with probabilities from sorted uniform cut points), rewards U(0, 1) on 10% of the states, γ = 0.9.
Evaluation noise comes from a generative model: every iteration draws one next state per (s, a), so
the evaluation error ε_k = γ·(v_k(s') − P v_k) is a martingale difference. One seed = one Garnet and
its noise. Metric: ‖q* − q^{π_k}‖₁ / ‖q*‖₁ with q^{π_k} the exact (unregularized) value of the
iteration's policy, solved as a linear system.

Methods (all with q_0 = 0, π_0 uniform):

* ``VI (exact)``: q ← r + γ·P max q (no noise; the reference point).
* ``AVI``: q ← r + γ·max_a' q(s', a') with the sampled s'; greedy policy.
* ``MD-VI(λ, τ)``: π_{k+1} = G^{λ,τ}_{π_k}(q_k) (``kljax.objectives.value.mdvi_policy_logits``),
  q_{k+1} = r + γ·max_π[⟨π, q_k⟩ − λ·KL(π‖π_k) + τ·H(π)](s') (``value.mdvi_target``) at the sampled s'.
  τ = 0 is DA-VI: π_{k+1} ∝ exp(Σ_j q_j / λ), the errors are averaged (their Thm 1).
* ``M-VI(α, τ)``: q ← ``value.munchausen_target`` (no clipping, l0 = −∞: the tabular theory),
  π = softmax(q/τ); equal to MD-VI(λ = ατ, entropy (1−α)τ), whose errors enter through an exponential
  moving average with weight β = α (their Thm 2).

Differences from the paper: 100 Garnets × 800 iterations as in the paper at full size (``--quick``:
10 Garnets × 200 iterations); the metric uses the unregularized q* for every method (the paper uses
the τ-regularized optimum for τ > 0, which differs by at most τ·ln|A|/(1−γ)).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from kljax.objectives import value
from kljax.repro import common

DESCRIPTION = "MD-VI / Munchausen VI average evaluation errors that AVI accumulates (Garnet MDPs)"

METHODS = [
    {"name": "VI (exact)", "kind": "vi"},
    {"name": "AVI", "kind": "avi"},
    {"name": "MD-VI(λ=0.01, τ=0)", "kind": "mdvi", "lam": 0.01, "tau": 0.0},
    {"name": "MD-VI(λ=0.1, τ=0)", "kind": "mdvi", "lam": 0.1, "tau": 0.0},
    {"name": "MD-VI(λ=1, τ=0)", "kind": "mdvi", "lam": 1.0, "tau": 0.0},
    {"name": "MD-VI(λ=0.1, τ=0.001)", "kind": "mdvi", "lam": 0.1, "tau": 0.001},
    {"name": "M-VI(α=0.9, τ=0.1)", "kind": "mvi", "alpha": 0.9, "tau": 0.1},
    {"name": "M-VI(α=0.99, τ=0.1)", "kind": "mvi", "alpha": 0.99, "tau": 0.1},
]
QUICK = ("VI (exact)", "AVI", "MD-VI(λ=0.1, τ=0)", "M-VI(α=0.9, τ=0.1)", "M-VI(α=0.99, τ=0.1)")


def config(quick: bool = False, seeds: int | None = None) -> dict:
    return {
        "table": "mdvi",
        "quick": quick,
        "seeds": int(seeds or (10 if quick else 100)),
        "iterations": 200 if quick else 800,
        "log_every": 10,
        "states": 30, "actions": 4, "branching": 4, "reward_fraction": 0.1, "gamma": 0.9,
        "methods": [m for m in METHODS if m["name"] in QUICK] if quick else METHODS,
    }


def garnet(rng: np.random.Generator, s: int, a: int, b: int, reward_fraction: float):
    """(P [S, A, S], r [S, A]) as float32 numpy: b distinct successors per (s, a) with probabilities
    from sorted uniform cut points, rewards U(0, 1) on a fraction of the states (without replacement)."""
    p = np.zeros((s, a, s), np.float32)
    for i in range(s):
        for j in range(a):
            succ = rng.choice(s, size=b, replace=False)
            p[i, j, succ] = np.diff(np.concatenate([[0.0], np.sort(rng.uniform(size=b - 1)), [1.0]]))
    n_r = max(1, int(round(reward_fraction * s)))
    rs = np.zeros(s, np.float32)
    rs[rng.choice(s, size=n_r, replace=False)] = rng.uniform(size=n_r)
    return p, np.repeat(rs[:, None], a, axis=1)


def policy_q(p, r, logpi, gamma):
    """Exact q^π: v = (I − γP_π)⁻¹ r_π, q = r + γ P v."""
    pi = jnp.exp(logpi)
    v = jnp.linalg.solve(jnp.eye(p.shape[0]) - gamma * jnp.einsum("sa,sat->st", pi, p),
                         jnp.sum(pi * r, -1))
    return r + gamma * p @ v


def optimal_q(p, r, gamma, iters: int = 600):
    return jax.lax.fori_loop(0, iters, lambda _, q: r + gamma * p @ q.max(-1), jnp.zeros_like(r))


def _greedy_logits(q):
    return jnp.where(jax.nn.one_hot(q.argmax(-1), q.shape[-1]) > 0, 0.0, -jnp.inf)


def _make_run(method: dict, cfg: dict):
    s, a, g = cfg["states"], cfg["actions"], cfg["gamma"]
    every, n_log = cfg["log_every"], cfg["iterations"] // cfg["log_every"]
    kind = method["kind"]

    def update(q, lp, p, r, sp):
        if kind == "vi":
            q = r + g * p @ q.max(-1)
            return q, _greedy_logits(q)
        if kind == "avi":
            q = r + g * q[sp].max(-1)
            return q, _greedy_logits(q)
        if kind == "mdvi":
            lam, tau = method["lam"], method["tau"]
            new_lp = value.mdvi_policy_logits(lp, q, lam, tau)
            return value.mdvi_target(r, g, q[sp], lp[sp], lam, tau), new_lp
        tau, alpha = method["tau"], method["alpha"]
        q_tm1 = jnp.broadcast_to(q[:, None, :], (s, a, a))
        acts = jnp.broadcast_to(jnp.arange(a), (s, a))
        q = value.munchausen_target(q_tm1, acts, r, g, q[sp], tau=tau, alpha=alpha, clip_min=None)
        return q, jax.nn.log_softmax(q / tau, axis=-1)

    def run(u, p, r):
        qs = optimal_q(p, r, g)
        cdf = jnp.cumsum(p, axis=-1)

        def block(carry, u_block):
            def one(c, u_k):
                q, lp = c
                sp = jnp.minimum(jnp.sum(cdf < u_k[..., None], -1), s - 1)  # one s' per (s, a)
                return update(q, lp, p, r, sp), None
            (q, lp), _ = jax.lax.scan(one, carry, u_block)
            err = jnp.sum(jnp.abs(qs - policy_q(p, r, lp, g))) / jnp.sum(jnp.abs(qs))
            return (q, lp), err

        init = (jnp.zeros((s, a)), jnp.full((s, a), -jnp.log(a)))
        _, errs = jax.lax.scan(block, init, u.reshape(n_log, every, s, a))
        return errs

    return jax.jit(jax.vmap(run))


def run(cfg: dict, out: str) -> dict:
    common.prepare(out, cfg)
    rng = np.random.default_rng(0)
    mdps = [garnet(rng, cfg["states"], cfg["actions"], cfg["branching"], cfg["reward_fraction"])
            for _ in range(cfg["seeds"])]
    p, r = (jnp.asarray(np.stack(x)) for x in zip(*mdps))
    # the generative model's uniforms (inverse-CDF sampling of s'), drawn on the host: identical
    # noise for every method, and no random-bit generation to compile
    u = jnp.asarray(rng.uniform(size=(cfg["seeds"], cfg["iterations"], cfg["states"], cfg["actions"]))
                    .astype(np.float32))
    results = {"machine": common.machine(), "methods": []}
    with common.Timer() as timer:
        for method in cfg["methods"]:
            errs = np.asarray(_make_run(method, cfg)(u, p, r))        # [mdps, n_log]
            results["methods"].append({"name": method["name"], "errors": errs.tolist()})
            print(f"[mdvi] {method['name']:24s} final error {common.mean_spread(errs[:, -1], 4)}",
                  flush=True)
    results["wall_s"] = timer.seconds
    _plot(cfg, results, os.path.join(out, "mdvi.png"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(cfg, results))
    common.write_json(os.path.join(out, "results.json"), results, digits=5)
    return results


def markdown(cfg: dict, results: dict) -> str:
    every, n = cfg["log_every"], cfg["iterations"]
    cols = sorted({10, 50, n // 4, n})
    headers = ["method"] + [f"k = {k}" for k in cols] + [f"mean over k > {n // 2}"]
    rows = []
    for m in results["methods"]:
        e = np.asarray(m["errors"])
        rows.append([m["name"]] + [common.mean_spread(e[:, k // every - 1], 4) for k in cols]
                    + [common.mean_spread(e[:, n // (2 * every):].mean(1), 4)])
    return (f"# mdvi{' (quick)' if cfg['quick'] else ''}\n\n"
            f"Machine: {results['machine']}; wall time {results['wall_s']:.0f} s. "
            f"Relative error ‖q* − q^π_k‖₁/‖q*‖₁, mean ± std over {cfg['seeds']} Garnet MDPs "
            f"({cfg['states']} states, {cfg['actions']} actions, branching {cfg['branching']}, "
            f"γ = {cfg['gamma']}), one sampled transition per (s, a) per iteration.\n\n"
            + common.markdown_table(headers, rows) + "\n")


def _plot(cfg, results, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in results["methods"]:
        e = np.asarray(m["errors"])
        x = (np.arange(e.shape[1]) + 1) * cfg["log_every"]
        off = " (< 1e-4 after k = 10: off scale)" if e.mean(0)[-1] < 1e-4 else ""
        line, = ax.plot(x, e.mean(0), label=m["name"] + off, lw=1.3)
        lo, hi = np.percentile(e, [25, 75], axis=0)
        ax.fill_between(x, np.maximum(lo, 1e-6), np.maximum(hi, 1e-6), color=line.get_color(), alpha=0.12)
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 2)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("‖q* − q^π_k‖₁ / ‖q*‖₁")
    ax.set_title(f"Garnet({cfg['states']}, {cfg['actions']}, {cfg['branching']}), γ = {cfg['gamma']}, "
                 f"sampled transitions; mean and IQR over {cfg['seeds']} MDPs", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
