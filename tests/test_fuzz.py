"""Property-based fuzzing of every registered objective and of the data path (issue 10).

Objectives: hypothesis draws random but *valid* batches — masks with all-masked rows, single-token
rows, right-padded and scattered masks; logits at scale 1, 30 or 1e4 (and all-equal logits); a
vocabulary-padding column at −inf shared by every model (tokens never come from it); rewards with
zero-variance groups, binary or ±1e4; temperatures from 1e-3 to 1e3 — and asserts that the loss,
every metric and the gradient with respect to the differentiable logits are finite, and that the
gradient is exactly zero at masked positions. Each objective is compiled once (fixed shapes, data
and temperature are traced arguments; every aggregation mode is computed inside the same program),
so the examples reuse one compilation.

Data path: the symbol tokenizers on arbitrary unicode, ``encode_prompts`` on empty prompts, prompts
at exactly the maximum length and one over, EOS/PAD typed inside a prompt; task rewards and
``decode_completions`` on random completions (EOS anywhere, empty masks); ``data.make_dataset`` on
random sizes, batch sizes and shard counts. Input that is invalid must raise ``ValueError`` naming
the problem; everything else must be handled correctly.

``KLJAX_FUZZ_EXAMPLES`` raises the number of examples per test (default 25; derandomized, so CI is
deterministic). Every test counts the cases it ran; ``-s`` prints the totals.
"""
import collections
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kljax import data, objectives, ops, tasks

EXAMPLES = int(os.environ.get("KLJAX_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = collections.Counter()

B, T, V, G, A = 4, 3, 6, 2, 3        # V − 1 real tokens + one padding column
PAD_COL = V - 1
AGGS = ops.LOSS_AGG_MODES
REDUCTIONS = ("token_mean", "seq_mean", "sum", "batchmean")
# Compile cost dominates this file: XLA's cheaper backend passes (the same HLO, the same numerics
# checks) roughly halve it.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(CASES.values())
    print(f"\n[fuzz] {total} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))


def _finite_tree(tree):
    """Names of the leaves of ``tree`` that hold a NaN or inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not np.all(np.isfinite(np.asarray(leaf))):
            bad.append(jax.tree_util.keystr(path))
    return bad


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

ROW_KINDS = ("empty", "single", "full", "prefix", "scattered")


@st.composite
def masks(draw, b=B, t=T):
    rows = []
    for _ in range(b):
        kind = draw(st.sampled_from(ROW_KINDS))
        if kind == "empty":
            row = [0] * t
        elif kind == "single":
            row = [0] * t
            row[draw(st.integers(0, t - 1))] = 1
        elif kind == "full":
            row = [1] * t
        elif kind == "prefix":
            n = draw(st.integers(1, t))
            row = [1] * n + [0] * (t - n)
        else:
            row = draw(st.lists(st.integers(0, 1), min_size=t, max_size=t))
        rows.append(row)
    return np.asarray(rows, np.float32)


def _logits(rng, shape, scale, style, pad):
    if style == "equal":
        x = np.zeros(shape, np.float32)
    elif style == "spiky":  # one huge entry per position, the rest tiny
        x = rng.normal(size=shape).astype(np.float32)
        hot = rng.integers(0, shape[-1], shape[:-1])
        np.put_along_axis(x, hot[..., None], scale, axis=-1)
        x = np.where(x == scale, x, -scale * np.abs(x))
    else:
        x = scale * rng.normal(size=shape).astype(np.float32)
    if pad:
        x[..., PAD_COL] = -np.inf
    return x.astype(np.float32)


def _rewards(rng, kind, b=B):
    if kind == "zero_var":  # every group has equal rewards (GRPO's std = 0)
        return np.repeat(rng.integers(0, 2, b // G), G).astype(np.float32)
    if kind == "binary":
        return rng.integers(0, 2, b).astype(np.float32)
    if kind == "extreme":
        return (1e4 * rng.choice([-1.0, 1.0], b)).astype(np.float32)
    return rng.normal(size=b).astype(np.float32)


@st.composite
def policy_cases(draw):
    """Per-token inputs of a policy objective, from logits of the policy, π_old, π_ref, teacher."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pad = draw(st.booleans())
    out = {"mask": draw(masks())}
    for k in ("logits", "old_logits", "ref_logits", "teacher_logits"):
        out[k] = _logits(rng, (B, T, V), draw(st.sampled_from([1.0, 30.0, 1e4])),
                         draw(st.sampled_from(["normal", "equal", "spiky"])), pad)
    if draw(st.booleans()):  # on-policy: π_old = π_θ
        out["old_logits"] = out["logits"].copy()
    out["tokens"] = rng.integers(0, V - 1, (B, T)).astype(np.int32)  # never the padding column
    out["rewards"] = _rewards(rng, draw(st.sampled_from(["zero_var", "binary", "extreme", "normal"])))
    out["v_star"] = rng.normal(size=B).astype(np.float32)
    return out


@st.composite
def distill_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pad = draw(st.booleans())
    out = {"mask": draw(masks())}
    for k in ("student", "teacher"):
        out[k] = _logits(rng, (B, T, V), draw(st.sampled_from([1.0, 30.0, 1e4])),
                         draw(st.sampled_from(["normal", "equal", "spiky"])), pad)
    out["teacher_zeros"] = draw(st.booleans())
    if out["teacher_zeros"]:  # −inf teacher logits (top-k, a smaller vocabulary), ≥ 1 finite each
        t = out["teacher"]
        keep = rng.integers(0, V - 1, (B, T))
        zero = rng.uniform(size=t.shape) < 0.4
        np.put_along_axis(zero, keep[..., None], False, axis=-1)
        out["teacher"] = np.where(zero, -np.inf, t).astype(np.float32)
    out["tokens"] = rng.integers(0, V - 1, (B, T)).astype(np.int32)
    out["temperature"] = np.float32(draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3])))
    return out


# --------------------------------------------------------------------------------------------
# Policy objectives
# --------------------------------------------------------------------------------------------

CLIP = dict(clip_eps_low=0.2, clip_eps_high=0.28, clip_c=3.0)
POLICY_HP = {
    "reinforce": dict(beta=0.1),
    "rloo": dict(beta=0.1, kl_in="loss", kl_estimator="k2", importance_weight="stop_gradient"),
    "ppo": dict(beta=0.1, clip_c=3.0),
    "grpo": dict(beta=0.1),
    "dr_grpo": dict(beta=0.1),
    "dapo": dict(beta=0.1, importance_weight="differentiable"),
    "reinforce_pp": dict(beta=0.1),
    "kdrl": dict(kd_coef=0.1, beta=0.1),
    "rapo": dict(alpha=0.1, entropy_coef=0.01),
    "pmd_mean": dict(),  # default τ = 0.01: A/τ is large
    "apo": dict(),
}
for _k in ("fkl", "rkl", "ufkl", "urkl"):
    POLICY_HP[f"rpg_{_k}"] = dict(beta=0.1, **CLIP)
    POLICY_HP[f"rpg_rf_{_k}"] = dict(beta=0.1, **CLIP)


def test_every_registered_objective_is_fuzzed():
    fuzzed = set(POLICY_HP) | set(DISTILL_HP) | set(PREFERENCE) | set(VALUE)
    assert fuzzed == set(objectives.names())


def _policy_batch(logits, d):
    tok = d["tokens"]
    batch = {
        "logp": ops.token_logprobs(logits, tok),
        "old_logp": ops.token_logprobs(d["old_logits"], tok),
        "ref_logp": ops.token_logprobs(d["ref_logits"], tok),
        "teacher_logp": ops.token_logprobs(d["teacher_logits"], tok),
        "mask": d["mask"],
        "rewards": d["rewards"],
        "logits": logits,
        "ref_logits": d["ref_logits"],
    }
    return batch


def _policy_runner(name, variants):
    """One jitted program: value and metrics of every (label, hparams) variant, and d/dlogits of
    their sum (a NaN or inf in any variant's gradient makes the sum's non-finite too, and one
    backward pass compiles much faster than one per variant; ``_variant_grads`` names the culprit)."""
    f = objectives.get(name)

    def one(logits, d, hp):
        batch = _policy_batch(logits, d)
        if name == "apo":
            batch["v_star"] = d["v_star"]
        return f(batch, **hp)

    def total(logits, d):
        out, tot = {}, 0.0
        for label, hp in variants.items():
            loss, metrics = one(logits, d, hp)
            out[label] = {"loss": loss, "metrics": metrics}
            tot = tot + loss
        return tot, out

    @_jit
    def run(logits, d):
        (_, out), g = jax.value_and_grad(total, has_aux=True)(logits, d)
        out["sum"] = {"grad": g}
        return out

    run.one = one
    run.variants = variants
    return run


def _variant_grads(run, logits, d):
    """Per-variant gradients, eagerly: only to name the variant when the summed gradient is bad."""
    return {label: _finite_tree(jax.grad(lambda x: run.one(x, d, hp)[0])(logits))
            for label, hp in run.variants.items()}


def assert_policy_result_finite(run, logits, d):
    res = run(logits, d)
    bad = _finite_tree(res)
    if bad and any("grad" in b for b in bad):
        bad.append(f"per-variant gradients: {_variant_grads(run, logits, d)}")
    assert not bad, f"non-finite: {bad}"
    masked = np.asarray(d["mask"]) == 0
    assert np.all(np.asarray(res["sum"]["grad"])[masked] == 0.0), "gradient at masked positions"


def _policy_variants(name):
    hp = dict(POLICY_HP[name])
    if name != "apo":
        hp["group_size"] = G
    if name == "apo":
        return {"default": hp}
    return {agg: dict(hp, loss_agg=agg) for agg in AGGS}


_RUNNERS = {}


def _runner(key, make):
    if key not in _RUNNERS:
        _RUNNERS[key] = make()
    return _RUNNERS[key]


@pytest.mark.parametrize("name", sorted(POLICY_HP))
@FUZZ
@given(case=policy_cases())
def test_policy_objective_finite(name, case):
    run = _runner(("policy", name), lambda: _policy_runner(name, _policy_variants(name)))
    d = {k: v for k, v in case.items() if k != "logits"}
    assert_policy_result_finite(run, case["logits"], d)
    CASES[f"policy/{name}"] += 1


def _kl_grid(placements):
    return {f"{est}-{place}-{w}": dict(kl_estimator=est, kl_in=place, importance_weight=w)
            for est in ("k1", "k2", "k3", "exact") for place, w in placements}


# Every valid (estimator, placement, weight) combination once, split over the two shared bodies.
KL_GRIDS = {
    "reinforce": _kl_grid([("reward", "none"), ("loss", "none")]),
    "ppo": _kl_grid([("loss", "differentiable"), ("loss", "stop_gradient")]),
}


@pytest.mark.parametrize("name", sorted(KL_GRIDS))
@FUZZ
@given(case=policy_cases())
def test_every_kl_placement_finite(name, case):
    """Every (estimator, placement, weight) combination, for the REINFORCE and the PPO bodies."""
    variants = {k: dict(v, beta=0.5, group_size=G) for k, v in KL_GRIDS[name].items()}
    run = _runner(("grid", name), lambda: _policy_runner(name, variants))
    d = {k: v for k, v in case.items() if k != "logits"}
    assert_policy_result_finite(run, case["logits"], d)
    CASES[f"kl_grid/{name}"] += 1


# --------------------------------------------------------------------------------------------
# Distillation objectives
# --------------------------------------------------------------------------------------------

DISTILL_HP = {
    "kd": dict(labels=True), "fkl": {}, "rkl": {}, "jsd": {}, "skl": {}, "srkl": {}, "tvd": {},
    "akl": {}, "bdkd": {}, "nkd": {}, "alpha": {}, "ab": {}, "tsallis": {},
    "minillm": dict(tokens=True),
}


# Objectives containing KL(student‖teacher): +inf when the teacher has −inf logits where the student
# has mass. All others are bounded there and must stay finite.
UNBOUNDED_UNDER_TEACHER_ZEROS = ("rkl", "akl", "bdkd", "minillm")


def _leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(v))
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _distill_runner(name):
    f = objectives.get(name)
    hp = dict(DISTILL_HP[name])

    def one(s, d, reduction):
        kw = {k: v for k, v in hp.items() if k not in ("labels", "tokens")}
        if hp.get("labels"):
            kw["labels"] = d["tokens"]
        if hp.get("tokens"):
            kw["tokens"] = d["tokens"]
        return f(s, d["teacher"], d["mask"], temperature=d["temperature"], reduction=reduction, **kw)

    @_jit
    def run(s, d):
        out = {}
        for red in REDUCTIONS:
            (loss, metrics), g = jax.value_and_grad(one, has_aux=True)(s, d, red)
            out[red] = {"loss": loss, "metrics": metrics, "grad": g}
        return out

    return run


@pytest.mark.parametrize("name", sorted(DISTILL_HP))
@FUZZ
@given(case=distill_cases())
def test_distill_objective_finite(name, case):
    run = _runner(("distill", name), lambda: _distill_runner(name))
    d = {k: v for k, v in case.items() if k not in ("student", "teacher_zeros")}
    res = run(case["student"], d)
    bad = _finite_tree(res)
    if case["teacher_zeros"] and name in UNBOUNDED_UNDER_TEACHER_ZEROS:
        # KL(student‖teacher) is +inf by definition there: +inf is right, NaN never is
        assert not [k for k, v in _leaves(res) if np.isnan(v).any()], bad
        assert not [k for k in bad if "grad" in k], bad
        bad = [k for k in bad if not k.endswith(("'loss']", "'distill/loss']", "'distill/seq_reverse_kl']"))]
    assert not bad, f"non-finite: {bad} (temperature {case['temperature']})"
    masked = np.asarray(case["mask"]) == 0
    for red, r in res.items():
        assert np.all(np.asarray(r["grad"])[masked] == 0.0), f"{red}: gradient at masked positions"
    CASES[f"distill/{name}"] += 1


# --------------------------------------------------------------------------------------------
# Preference objectives
# --------------------------------------------------------------------------------------------

PREFERENCE = {"dpo": {}, "ipo": {}, "h_dpo": dict(alpha=0.5), "dpkd": {}}


@st.composite
def preference_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pad = draw(st.booleans())
    out = {"chosen_mask": draw(masks()), "rejected_mask": draw(masks())}
    for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
        out[k] = _logits(rng, (B, T, V), draw(st.sampled_from([1.0, 30.0, 1e4])),
                         draw(st.sampled_from(["normal", "equal", "spiky"])), pad)
    out["tokens_c"] = rng.integers(0, V - 1, (B, T)).astype(np.int32)
    out["tokens_r"] = rng.integers(0, V - 1, (B, T)).astype(np.int32)
    out["temperature"] = np.float32(draw(st.sampled_from([1e-3, 1.0, 1e3])))
    return out


def _preference_runner(name):
    f = objectives.get(name)
    hp = PREFERENCE[name]

    def seq_batch(params, d):
        c, r = params
        return {
            "chosen_logp": ops.token_logprobs(c, d["tokens_c"]),
            "rejected_logp": ops.token_logprobs(r, d["tokens_r"]),
            "ref_chosen_logp": ops.token_logprobs(d["ref_chosen"], d["tokens_c"]),
            "ref_rejected_logp": ops.token_logprobs(d["ref_rejected"], d["tokens_r"]),
            "chosen_mask": d["chosen_mask"], "rejected_mask": d["rejected_mask"],
        }

    def one(params, d, variant):
        if name == "dpkd":
            batch = {"student_logits": params[0], "teacher_logits": d["ref_chosen"],
                     "mask": d["chosen_mask"]}
            return f(batch, temperature=d["temperature"], reference_free=variant == "free")
        batch = seq_batch(params, d)
        if variant == "sequence":  # [B] sequence log-probs (the masked sums)
            batch = {k: ops.masked_sum(v, batch[("chosen" if "chosen" in k else "rejected") + "_mask"],
                                       axis=-1)
                     for k, v in batch.items() if not k.endswith("mask")}
        return f(batch, average_log_prob=variant == "average", **hp)

    variants = ("free", "teacher") if name == "dpkd" else ("sum", "average", "sequence")

    @_jit
    def run(params, d):
        out = {}
        for v in variants:
            (loss, metrics), g = jax.value_and_grad(one, has_aux=True)(params, d, v)
            out[v] = {"loss": loss, "metrics": metrics, "grad": g}
        return out

    return run


@pytest.mark.parametrize("name", sorted(PREFERENCE))
@FUZZ
@given(case=preference_cases())
def test_preference_objective_finite(name, case):
    run = _runner(("preference", name), lambda: _preference_runner(name))
    d = {k: v for k, v in case.items() if k not in ("chosen", "rejected")}
    res = run((case["chosen"], case["rejected"]), d)
    bad = _finite_tree(res)
    assert not bad, f"non-finite: {bad}"
    CASES[f"preference/{name}"] += 1


# --------------------------------------------------------------------------------------------
# Value objectives (critic losses)
# --------------------------------------------------------------------------------------------

VALUE = ("qsharp_bce", "qsharp_histogram")
ATOMS = np.array([0.0, 0.5, 1.0], np.float32)


@st.composite
def value_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    out = {"mask": draw(masks()), "tokens": rng.integers(0, V, (B, T)).astype(np.int32)}
    out["critic"] = (scale * rng.normal(size=(B, T, V))).astype(np.float32)
    out["hist"] = (scale * rng.normal(size=(B, T, V, A))).astype(np.float32)
    kind = draw(st.sampled_from(["binary", "soft", "per_token", "outside"]))
    if kind == "binary":
        r = rng.integers(0, 2, B).astype(np.float32)
    elif kind == "soft":
        r = rng.uniform(size=B).astype(np.float32)
    elif kind == "per_token":
        r = rng.uniform(size=(B, T)).astype(np.float32)
    else:  # returns beyond the atoms (clipped for the histogram; BCE labels stay in [0, 1])
        r = rng.integers(0, 2, B).astype(np.float32)
    out["returns"] = r
    out["hist_returns"] = (r * 3.0 - 1.0) if kind == "outside" else r
    return out


def _value_runner(name):
    f = objectives.get(name)

    def one(c, d, agg, proj):
        if name == "qsharp_bce":
            return f(c, d["tokens"], d["returns"], d["mask"], loss_agg=agg)
        return f(c, d["tokens"], d["hist_returns"], d["mask"], atoms=ATOMS, projection=proj, loss_agg=agg)

    projections = ("two_hot",) if name == "qsharp_bce" else ("two_hot", "nearest")

    @_jit
    def run(c, d):
        out = {}
        for agg in AGGS:
            for proj in projections:
                (loss, metrics), g = jax.value_and_grad(one, has_aux=True)(c, d, agg, proj)
                out[f"{agg}/{proj}"] = {"loss": loss, "metrics": metrics, "grad": g}
        return out

    return run


@pytest.mark.parametrize("name", VALUE)
@FUZZ
@given(case=value_cases())
def test_value_objective_finite(name, case):
    key = "critic" if name == "qsharp_bce" else "hist"
    run = _runner(("value", name), lambda: _value_runner(name))
    d = {k: v for k, v in case.items() if k not in ("critic", "hist")}
    res = run(case[key], d)
    bad = _finite_tree(res)
    assert not bad, f"non-finite: {bad}"
    masked = np.asarray(case["mask"]) == 0
    for label, r in res.items():
        assert np.all(np.asarray(r["grad"])[masked] == 0.0), f"{label}: gradient at masked positions"
    CASES[f"value/{name}"] += 1


@st.composite
def guidance_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = lambda: draw(st.sampled_from([1.0, 30.0, 1e4]))  # noqa: E731
    ref = (scale() * rng.normal(size=(B, V))).astype(np.float32)
    ref[:, PAD_COL] = -np.inf
    crit = (scale() * rng.normal(size=(B, V))).astype(np.float32)
    if draw(st.booleans()):  # a certain success / failure: p exactly 1 or 0
        crit[0, 0], crit[1, 1] = np.inf, -np.inf
    return {"ref": ref, "crit": crit, "hist": (scale() * rng.normal(size=(B, V, A))).astype(np.float32),
            "atoms": (np.linspace(0.0, 1.0, A) * draw(st.sampled_from([1.0, 100.0]))).astype(np.float32),
            "eta": np.float32(10.0 ** draw(st.floats(-6, 6)))}


@FUZZ
@given(case=guidance_cases())
def test_qsharp_guidance_finite(case):
    """Q♯ guided logits for η from 1e-6 to 1e6, critics at ±inf, −inf reference entries, both top-k
    modes: no NaN, −inf exactly where the reference is −inf or top-k masks, finite elsewhere; the
    sampled distribution is a distribution."""
    from kljax.objectives import value as V
    run = _runner(("guidance",), lambda: _jit(lambda c: {
        f"{kind}/{rest}": V.qsharp_logits(c["ref"], c["crit"] if kind == "bernoulli" else c["hist"], c["eta"],
                                          kind, atoms=c["atoms"] if kind == "histogram" else None, top_k=3,
                                          top_k_rest=rest)
        for kind in ("bernoulli", "histogram") for rest in ("mask", "reference")}))
    out = run(case)
    ref = case["ref"]
    for label, x in out.items():
        x = np.asarray(x)
        assert not np.isnan(x).any(), label
        assert np.all(np.isneginf(x[np.isneginf(ref)])), label
        kept = np.isfinite(x)
        assert np.all(kept | np.isneginf(x)), label
        assert np.all(kept.sum(-1) >= 1), label
        if label.endswith("reference"):
            assert np.all(kept == np.isfinite(ref)), label
        p = np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    CASES["value/qsharp_logits"] += 1


# --------------------------------------------------------------------------------------------
# Data path: tokenizers, prompts, rewards, loaders
# --------------------------------------------------------------------------------------------

TASKS = {
    "arithmetic": tasks.get("arithmetic", num_digits=2, train_size=8, test_size=8),
    "star_graph": tasks.get("star_graph", degree=2, path_len=3, num_nodes=12, train_size=8, test_size=8),
    "synthetic_lm": tasks.get("synthetic_lm", vocab=4, seq_len=6, train_size=8, test_size=8),
}
TASK_NAMES = sorted(TASKS)


def _texts(task):
    """Strings mixing the task's own symbols (so valid prompts come up) with arbitrary unicode."""
    syms = list(task.tokenizer.symbols) + [" ", ",", "  ", "\t"]
    piece = st.one_of(st.sampled_from(syms), st.sampled_from(syms), st.text(max_size=2),
                      st.sampled_from(["٣", "３", "²", "\u00a0", "é", "\U0001F600", "\x00", "-1"]))
    return st.lists(piece, max_size=12).map("".join)


def _clear_error(err, text):
    msg = str(err)
    return ("vocabulary" in msg or "out of range" in msg or "empty" in msg or "contains" in msg
            or "prompt_len" in msg)


@pytest.mark.parametrize("name", TASK_NAMES)
@FUZZ
@given(data_=st.data())
def test_tokenizer_on_arbitrary_text(name, data_):
    """encode(text) accepts exactly the text made of vocabulary symbols (ASCII digits for numbers)
    and whitespace (commas between numbers), and decodes back to it; anything else is a ValueError
    naming the symbol."""
    task = TASKS[name]
    tok = task.tokenizer
    text = data_.draw(_texts(task))
    try:
        ids = tok.encode(text)
    except ValueError as e:
        assert _clear_error(e, text), f"unclear error for {text!r}: {e}"
    else:
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.encode(tok.decode(ids)) == ids
        allowed = set("".join(tok.symbols)) | ({","} if tok.numeral_count else set())
        assert all(c.isspace() or c in allowed for c in text), f"accepted {text!r} as {ids}"
        # the canonical text, stripped of separators, is the input stripped of separators
        strip = lambda x: "".join(c for c in x if not c.isspace() and c != ",")  # noqa: E731
        if not tok.numeral_count:
            assert strip(tok.decode(ids)) == strip(text)
    CASES[f"data/tokenizer/{name}"] += 1


@pytest.mark.parametrize("name", TASK_NAMES)
@FUZZ
@given(data_=st.data())
def test_encode_prompts_valid_or_clear_error(name, data_):
    """Random prompts, empty ones, prompts of exactly prompt_len tokens and one more, EOS/PAD inside:
    a correct left-padded encoding or a ValueError that names the prompt and the problem."""
    task = TASKS[name]
    tok = task.tokenizer
    content = [i for i in range(tok.vocab_size) if i not in (task.eos_id, task.pad_id)]
    kind = data_.draw(st.sampled_from(["text", "empty", "exact", "over", "eos", "pad"]))
    if kind == "text":
        text = data_.draw(_texts(task))
    elif kind == "empty":
        text = data_.draw(st.sampled_from(["", " ", "\t\n"]))
    else:
        n = task.prompt_len + (1 if kind == "over" else 0)
        ids = data_.draw(st.lists(st.sampled_from(content), min_size=n, max_size=n))
        if kind in ("eos", "pad"):
            ids[data_.draw(st.integers(0, n - 1))] = task.eos_id if kind == "eos" else task.pad_id
        text = tok.decode(ids)
    try:
        out = task.encode_prompts([text])
    except ValueError as e:
        assert "prompt 0" in str(e) and _clear_error(e, text), f"unclear error for {text!r}: {e}"
        assert kind != "exact", f"a prompt of exactly prompt_len tokens was refused: {e}"
        if kind == "over":
            assert "prompt_len" in str(e)
    else:
        assert kind not in ("empty", "over", "eos", "pad"), f"{kind} prompt {text!r} was accepted"
        ids = tok.encode(text)
        p, v = out["prompt"][0], out["prompt_valid"][0]
        assert p.shape == v.shape == (task.prompt_len,)
        assert v[-1] == 1 and np.all(np.diff(v) >= 0)  # left-padded, as the sampler needs
        assert p[v > 0].tolist() == ids and np.all(p[v == 0] == task.pad_id)
    CASES[f"data/prompts/{name}"] += 1


@pytest.fixture(scope="module")
def files_tasks(tmp_path_factory):
    """The `files` task on a user's JSONL with a byte-level BPE tokenizer (Qwen2-style: no BOS,
    EOS = <|im_end|>, PAD = <|endoftext|>), with both over-budget policies and the chat template."""
    import json

    import hf_fixtures as hfx
    root = tmp_path_factory.mktemp("files")
    hfx.train_tokenizer(root / "tok", "qwen2")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": "what is 1 plus 2?", "answer": "3"}) for _ in range(2)))
    kw = dict(train_files=str(train), tokenizer_path=str(root / "tok"), answer_key="answer",
              prompt_len=8, completion_len=6)
    return {"drop": tasks.get("files", **kw), "error": tasks.get("files", too_long="error", **kw),
            "chat": tasks.get("files", chat_template=True, **dict(kw, prompt_len=24))}


@FUZZ
@given(data_=st.data())
def test_files_task_prompts_valid_or_clear_error(files_tasks, data_):
    """User rows with unicode, empty or missing prompts, prompts of exactly prompt_len tokens and one
    more, EOS/PAD strings inside, over-long answers: a correct record, a counted drop, or a ValueError
    naming the file row and the problem."""
    mode = data_.draw(st.sampled_from(["drop", "error", "chat"]))
    task = files_tasks[mode]
    tok = task.tokenizer
    kind = data_.draw(st.sampled_from(["text", "empty", "none", "exact", "over", "special"]))
    if kind == "text":
        prompt = data_.draw(st.text(max_size=10))
    elif kind == "empty":
        prompt = ""
    elif kind == "none":
        prompt = None
    elif kind in ("exact", "over"):  # one token per digit with this pre-tokenizer
        prompt = "7" * (task.prompt_len + (kind == "over"))
    else:
        prompt = "1 " + data_.draw(st.sampled_from(["<|im_end|>", "<|endoftext|>"])) + " 2"
    answer = data_.draw(st.one_of(st.text(max_size=6), st.just("12345678")))
    try:
        recs = [r for _, r in task.generate("train", [{"prompt": prompt, "answer": answer}])]
    except ValueError as e:
        msg = str(e)
        assert "row" in msg and ("no tokens" in msg or "empty" in msg or "_len" in msg), msg
        if "prompt_len" in msg:
            assert mode == "error"
        elif "completion_len" in msg:
            assert mode == "error"
        else:  # a missing prompt; or no tokens at all (no BOS with this tokenizer, no template)
            assert kind == "none" or (kind in ("empty", "text") and mode != "chat"), msg
        CASES["data/files"] += 1
        return
    assert kind != "none" and (kind != "empty" or mode == "chat"), f"{kind} prompt accepted"
    want = task.prompt_ids(prompt)
    ans = task.completion_ids(answer)
    fits = len(want) <= task.prompt_len and len(ans) <= task.completion_len
    assert len(recs) == (1 if fits else 0)  # over budget: dropped (with "error" it raised above)
    if kind == "exact" and mode != "chat" and len(ans) <= task.completion_len:  # (the template adds tokens)
        assert len(recs) == 1 and recs[0]["prompt_valid"].all()
    for r in recs:
        v = r["prompt_valid"]
        assert v[-1] == 1 and np.all(np.diff(v) >= 0)  # left-padded: the sampler accepts it
        assert r["prompt"][v > 0].tolist() == want
        assert r["target"][r["target_valid"] > 0].tolist() == ans
    if kind == "special" and recs:
        assert {tok.eos_id, tok.pad_id} & set(want)  # kept as the special token, not refused
    CASES["data/files"] += 1


@pytest.mark.parametrize("bad", ["1+2=", b"1+2="])
def test_encode_prompts_refuses_a_single_string(bad):
    with pytest.raises(TypeError, match="list of prompt strings"):
        TASKS["arithmetic"].encode_prompts(bad)
    with pytest.raises(ValueError, match="at least one prompt"):
        TASKS["arithmetic"].encode_prompts([])


_RECORDS = {n: [r for _, r in zip(range(4), t.generate("test"))] for n, t in TASKS.items() if n != "synthetic_lm"}


@pytest.mark.parametrize("name", sorted(_RECORDS))
@FUZZ
@given(data_=st.data())
def test_rewards_on_random_completions(name, data_):
    """Rewards and decoding on random completions (EOS anywhere or nowhere, empty masks): float32[B]
    in the task's reward set; the exact target completion scores 1."""
    task = TASKS[name]
    recs = _RECORDS[name]
    batch = {k: np.stack([r[k] for r in recs]) for k in recs[0]}
    b, n = batch["target"].shape
    comp = np.asarray(data_.draw(st.lists(st.lists(st.integers(0, task.vocab_size - 1), min_size=n, max_size=n),
                                          min_size=b, max_size=b)), np.int32)
    mask = data_.draw(masks(b, n)).astype(np.int32)
    exact_rows = data_.draw(st.lists(st.booleans(), min_size=b, max_size=b))
    for i, e in enumerate(exact_rows):
        if e:  # the target itself, as the sampler returns it (mask through EOS)
            comp[i], mask[i] = batch["target"][i], batch["target_valid"][i]
    r = task.reward(comp, mask, batch)
    assert r.shape == (b,) and r.dtype == np.float32 and np.all(np.isfinite(r))
    allowed = {0.0, 1.0, float(getattr(task, "format_reward", 0.0)), float(getattr(task, "wrong_reward", 0.0))}
    assert set(r.tolist()) <= allowed
    assert np.all(r[np.asarray(exact_rows)] == 1.0)
    texts = task.decode_completions(comp, mask)
    assert len(texts) == b and all(isinstance(t, str) for t in texts)
    CASES[f"data/rewards/{name}"] += 1


@FUZZ
@given(size=st.integers(0, 12), batch_size=st.integers(1, 8), shard_count=st.integers(1, 4),
       num_epochs=st.sampled_from([None, 1, 2]), drop_remainder=st.booleans(), shuffle=st.booleans(),
       seed=st.integers(0, 3))
def test_make_dataset_shards_are_the_global_batches(size, batch_size, shard_count, num_epochs,
                                                    drop_remainder, shuffle, seed):
    """Random sizes, batch sizes and shard counts: a ValueError naming the field when the
    combination cannot work; otherwise the shards' batches at every step are the global batch."""
    src = data.ArraySource({"id": np.arange(size, dtype=np.int32),
                            "x": np.arange(2 * size, dtype=np.float32).reshape(size, 2)}) if size else None
    expect_error = (size == 0 or batch_size % shard_count
                    or (num_epochs is not None and drop_remainder and size * num_epochs < batch_size))
    kw = dict(seed=seed, shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder)
    if size == 0:
        with pytest.raises(ValueError, match="at least one array|empty"):
            data.make_dataset(data.ArraySource({"id": np.zeros((0,), np.int32)}), batch_size, **kw)
        CASES["data/loader"] += 1
        return
    try:
        shards = [data.make_dataset(src, batch_size, shard_index=k, shard_count=shard_count, **kw)
                  for k in range(shard_count)]
        whole = data.make_dataset(src, batch_size, shard_index=0, shard_count=1, **kw)
    except ValueError as e:
        assert expect_error, f"unexpected error: {e}"
        assert any(w in str(e) for w in ("batch_size", "shard_count", "num_epochs")), str(e)
        CASES["data/loader"] += 1
        return
    assert not expect_error
    steps = 3 if num_epochs is None else len(whole)
    for k in range(steps):
        g = whole[k]
        np.testing.assert_array_equal(g["x"][:, 0], 2 * g["id"])  # records intact
        if drop_remainder or num_epochs is None:
            parts = [s[k] for s in shards]
            assert all(len(p["id"]) == batch_size // shard_count for p in parts)
            assert sorted(np.concatenate([p["id"] for p in parts]).tolist()) == sorted(g["id"].tolist())
    if num_epochs is not None:
        every = sorted(np.concatenate([s[k]["id"] for s in shards for k in range(len(s))]).tolist())
        assert every == sorted(np.concatenate([whole[k]["id"] for k in range(len(whole))]).tolist())
        if drop_remainder:
            assert len(every) == (size * num_epochs // batch_size) * batch_size
        else:
            assert len(every) == size * num_epochs
    CASES["data/loader"] += 1


# --------------------------------------------------------------------------------------------
# Regressions: what the fuzzing found (each failed before its fix)
# --------------------------------------------------------------------------------------------

def _teacher_with_zeros():
    """Teacher logits with −inf entries (padding / top-k) where the student has mass."""
    rng = np.random.default_rng(0)
    s = (3.0 * rng.normal(size=(2, 3, V))).astype(np.float32)
    t = (3.0 * rng.normal(size=(2, 3, V))).astype(np.float32)
    t[..., 1] = -np.inf
    t[0, 0, :3] = -np.inf
    mask = np.ones((2, 3), np.float32)
    return s, t, mask


@pytest.mark.parametrize("name", ["fkl", "kd", "jsd", "skl", "tvd"])
def test_teacher_zeros_do_not_make_metrics_infinite(name):
    """A forward-KL-type loss stays finite when the teacher has −inf logits; its *reverse* KL
    metric used to be +inf there, and the training loops stop on any non-finite metric."""
    s, t, mask = _teacher_with_zeros()
    loss, m = objectives.get(name)(s, t, mask)
    assert np.isfinite(loss)
    assert not _finite_tree(m), m
    assert float(m["distill/reverse_kl_inf_frac"]) == 1.0  # every position has a zero-mass token
    assert float(m["distill/kl_inf_frac"]) == 0.0


def test_reverse_kl_metric_is_mean_over_finite_positions():
    s, t, mask = _teacher_with_zeros()
    t[1] = s[1] + 0.5  # row 1: no zeros, a finite reverse KL
    _, m = objectives.get("fkl")(s, t, mask)
    from kljax import divergences as dv
    want = np.mean(np.asarray(dv.reverse_kl(t[1], s[1])))
    np.testing.assert_allclose(m["distill/reverse_kl"], want, rtol=1e-5)
    np.testing.assert_allclose(m["distill/reverse_kl_inf_frac"], 0.5)


@pytest.mark.parametrize("temperature", [1e-3, 1.0])
@pytest.mark.parametrize("name", ["rkl", "akl", "bdkd", "minillm"])
def test_infinite_objective_is_inf_not_nan(name, temperature):
    """Reverse-KL losses against a teacher with zero-mass tokens are +inf (their true value); at a
    low temperature exp(log q) underflows and they used to be 0·inf = NaN (``ops.xlogy_exp``;
    MiniLLM's score term)."""
    s, t, mask = _teacher_with_zeros()
    kw = {"tokens": np.full((2, 3), 1, np.int32)} if name == "minillm" else {}  # a zero-mass token
    (loss, m), g = jax.value_and_grad(
        lambda x: objectives.get(name)(x, t, mask, temperature=temperature, **kw), has_aux=True)(s)
    assert np.isposinf(loss), loss
    assert np.all(np.isfinite(g))
    assert not any(np.isnan(np.asarray(v)).any() for v in m.values())


def test_akl_zero_tail_weight_drops_an_infinite_reverse_term():
    """AKL with the whole gap in the head (g_tail = 0) is g_head·KL(p‖q), finite, even where
    KL(q‖p) = +inf (it used to be 0·inf = NaN)."""
    t = np.array([[[0.0, 0.0, -np.inf, -np.inf]]], np.float32)
    s = np.array([[[0.3, -0.2, 0.1, 0.4]]], np.float32)
    loss, _ = objectives.get("akl")(s, t, None, mu=1.0)
    want, _ = objectives.get("fkl")(s, t, None)
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_xlogy_exp_keeps_infinities_where_the_probability_underflows():
    logp = jnp.array([-1e5, -1.0, -jnp.inf, -1e5])
    value = jnp.array([jnp.inf, 2.0, jnp.inf, 3.0])
    out = np.asarray(ops.xlogy_exp(logp, value))
    assert np.isposinf(out[0]) and out[2] == 0.0 and out[3] == 0.0
    np.testing.assert_allclose(out[1], np.exp(-1.0) * 2.0, rtol=1e-6)
    g = jax.grad(lambda lp: jnp.sum(ops.xlogy_exp(lp, value)[1:]))(logp)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("text", ["٣", "３", "²", "1,٣"])
def test_numeral_tokenizer_refuses_non_ascii_digits(text):
    """``\\d`` read "٣" (Arabic-Indic) and "３" (fullwidth) as node 3 and "²" gave int()'s message."""
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TASKS["star_graph"].tokenizer.encode(text)


@pytest.mark.parametrize("text,word", [("", "empty"), ("  ", "empty"), ("1<eos>+2=", "<eos>"),
                                       ("<pad>1+2=", "<pad>")])
def test_encode_prompts_refuses_empty_prompts_and_special_tokens(text, word):
    """An empty prompt used to become an all-padding row that the sampler refused later with
    "prompt_valid[:, -1] must be 1"; EOS/PAD inside a prompt were accepted silently."""
    with pytest.raises(ValueError, match=f"prompt 1 .*{word}"):
        TASKS["arithmetic"].encode_prompts(["1+2=", text])


@pytest.mark.parametrize("prompt,word", [("", "no tokens"), (None, "empty prompt")])
def test_files_task_refuses_an_empty_prompt_naming_the_row(files_tasks, prompt, word):
    """An empty prompt (no BOS, no template) became an all-padding record that the sampler refused
    mid-run; a missing one raised "empty prompt" without saying where."""
    with pytest.raises(ValueError, match=f"train.jsonl row 1: .*{word}"):
        list(files_tasks["drop"].generate("train", [{"prompt": prompt, "answer": "3"}]))
