"""Q♯ (Zhou et al. 2025, arXiv 2502.20548, Algorithm 1) and the CD baseline (`loop = "qsharp"`).

The reference π_ref is the model of `init_from` (e.g. a star-graph pretraining run). A critic Z_θ
(a `TransformerLM` with `value_head="token"`: one output per next token, [B, T, V] for the Bernoulli
critic, [B, T, V, A] for the histogram critic) learns the distribution of π_ref's reward-to-go after
each (prefix, next token). For any η, guided decoding samples from

    π^η(y | x) ∝ π_ref(y | x) · exp(Q⋆(x, y) / η),   Q⋆/η = log E_{Z_θ}[exp(Z / η)]

the optimum of E_π[r] − η·KL(π‖π_ref) (reverse KL) when Z_θ is exact.

Rounds k = 1..K (`qsharp.rounds`), each:
1. For `qsharp.rollouts_per_round` training prompts draw a switch time h ~ Unif{0..H−1} per prompt;
   roll in with the guided policy π^k (critic of round k−1, η = `qsharp.rollin_eta`) for the first h
   tokens, then continue with π_ref to the end (round 1 rolls in with π_ref: no critic yet).
2. Label every (prefix, token) at completion positions t ≥ h with the task reward R of the whole
   completion (the reward-to-go of π_ref from there; rewards come only at the end).
3. Aggregate with the earlier rounds (DAgger-style) and train the critic `qsharp.critic_steps` steps
   on minibatches of the aggregate with `objective.name` = `qsharp_bce` or `qsharp_histogram`.

Evaluation uses ONE trained critic at every η in `qsharp.etas`: Q♯ guidance and CD guidance
(π ∝ π_ref·exp(E[Z]/η), Mudgal et al. 2024), both restricted to π_ref's top-k tokens
(`qsharp.top_k`, 0 = all; the other tokens at −inf with `qsharp.top_k_rest = "mask"`, the default, or at
their unguided reference logits with "reference") and sampled at `qsharp.temperature` (the guided
policy is π^η only at temperature 1: the processor runs before the temperature); metrics per η: pass@1 accuracy,
reward, and the exact per-token KL(π^η‖π_ref) summed over the vocabulary (mean per token, and per
sequence). The reference alone is evaluated too (`eval/ref/...`).

Guidance runs inside `kljax.sampling.generate` through its logits-processor hook: at each step the
critic is run on the prefix buffer and read at the current slot.

The aggregated data are saved per round in `workdir/qsharp_data/round_<k>.npz`, so a resumed run
trains on exactly the same data.

Several processes: each process rolls out its own share of the round's prompts (its grain shard) under
the mesh and scores its own rows; the round's data are global arrays sharded over the batch axes (each
process saves its rows, `round_<k>.process<i>of<n>.npz`), critic minibatches are gathered on the device
with the same indices everywhere, and the evaluation sums per-row statistics of the global batch.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import divergences as dv
from kljax.config import ConfigError, require
from kljax.objectives import value as value_obj
from kljax.models import positions_from_valid
from kljax.sampling import generate
from kljax.tasks import base as task_base
from kljax.train import sharding
from kljax.train.preflight import check_objective, objective_hparams
from kljax.train.sequences import sequence_batch

KIND_OF = {"qsharp_bce": "bernoulli", "qsharp_histogram": "histogram"}
GUIDANCE = ("qsharp", "cd", "reference")


# ----------------------------------------------------------------------------------------------
# Critic on a prefix, guidance processor
# ----------------------------------------------------------------------------------------------

def critic_outputs(critic, tokens, positions, valid):
    """Critic outputs at every slot: a TransformerLM's token value head ([B, S, V] or [B, S, V, A]),
    or any callable `critic(tokens, positions, valid)` (e.g. an oracle in tests)."""
    if hasattr(critic, "hidden") and hasattr(critic, "values"):
        return critic.values(critic.hidden(tokens, positions=positions, valid=valid))
    return critic(tokens, positions, valid)


def guided_logits(ref_logits, critic_out, eta, guidance: str, kind: str, atoms=None, top_k: int = 0,
                  top_k_rest: str = "mask"):
    """Next-token logits of the guided policy from π_ref's logits and the critic's outputs.

    guidance "qsharp": ref + log E[exp(Z/η)]; "cd": ref + E[Z]/η (E[Z] = σ(l) for a Bernoulli critic,
    the histogram mean otherwise); "reference": ref. All restricted to π_ref's top-k when top_k > 0, the
    other tokens at −inf (`top_k_rest="mask"`) or at their unguided reference logits ("reference").
    """
    k = int(top_k) if top_k else None
    if guidance == "reference":
        return ref_logits if k is None else value_obj.restrict_top_k(ref_logits, ref_logits, k, top_k_rest)
    if guidance == "cd":
        mean = jax.nn.sigmoid(critic_out) if kind == "bernoulli" else value_obj.histogram_mean(critic_out, atoms)
        return value_obj.qsharp_logits(ref_logits, mean, eta, "cd", top_k=k, top_k_rest=top_k_rest)
    return value_obj.qsharp_logits(ref_logits, critic_out, eta, kind, atoms=atoms, top_k=k, top_k_rest=top_k_rest)


def _processor(guidance, kind, top_k, top_k_rest, critic, eta, switch_at, atoms, logits, state):
    """Guided logits while `state.step < switch_at` (per row), π_ref's logits afterwards (roll-out)."""
    out = critic_outputs(critic, state.tokens, state.positions, state.valid)
    c = jax.lax.dynamic_index_in_dim(out, state.index, axis=1, keepdims=False)
    g = guided_logits(logits, c.astype(jnp.float32), eta, guidance, kind, atoms, top_k, top_k_rest)
    use = (state.step < switch_at)[:, None]
    return jnp.where(use, g, logits)


@functools.lru_cache(maxsize=None)
def _processor_fn(guidance: str, kind: str, top_k: int, top_k_rest: str = "mask"):
    # One function object per static setting, so `generate` reuses its compilation across calls.
    return functools.partial(_processor, guidance, kind, int(top_k), top_k_rest)


def make_processor(critic, eta, switch_at, *, guidance="qsharp", kind="bernoulli", atoms=None, top_k=0,
                   top_k_rest="mask"):
    """Logits processor for `generate`: guidance by `critic` at `eta` before step `switch_at` [B]."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance={guidance!r} must be one of {GUIDANCE}")
    atoms = jnp.zeros((1,), jnp.float32) if atoms is None else jnp.asarray(atoms, jnp.float32)
    return jax.tree_util.Partial(_processor_fn(guidance, kind, int(top_k), top_k_rest), critic,
                                 jnp.asarray(eta, jnp.float32), jnp.asarray(switch_at, jnp.int32), atoms)


# ----------------------------------------------------------------------------------------------
# Data collection (one round)
# ----------------------------------------------------------------------------------------------

def collect_round(ref_model, critic, task, records: dict, key, *, eta, kind, atoms=None, top_k=0,
                  temperature=1.0, guided: bool = True, top_k_rest="mask", mesh=None) -> dict:
    """Roll in with the guided policy for h ~ Unif{0..N−1} tokens, roll out with π_ref, label.

    Returns numpy arrays: `tokens`, `valid`, `positions` [B, P+N] (prompt + completion), `mask`
    [B, P+N] (1 where position t predicts a completion token at index ≥ h), `returns` [B] (the
    task reward of the completion), `switch` [B] (h). With `guided=False` (round 1) the whole
    completion comes from π_ref.

    With `mesh`, `records` are this process's rows of the round's global batch and the result is
    global arrays sharded over the batch axes: sampling runs under the mesh, each process scores its
    own rows, and h is drawn for the global batch (the same data on any mesh or process count).
    """
    prompts, pv = records["prompt"], records["prompt_valid"]
    b, p = prompts.shape
    n = task.completion_len
    k_switch, k_gen = jax.random.split(key)
    if mesh is None:
        switch = np.asarray(jax.random.randint(k_switch, (b,), 0, n), np.int32)
        dev, switch_arg, local = {"prompt": prompts, "prompt_valid": pv}, switch, np.asarray
    else:
        dev = sharding.shard_batch({"prompt": prompts, "prompt_valid": pv}, mesh)
        rows = dev["prompt"].shape[0]
        switch = np.asarray(jax.random.randint(k_switch, (rows,), 0, n), np.int32)[sharding.process_rows(mesh, rows)]
        switch_arg = sharding.shard_batch({"s": switch}, mesh)["s"]
        local = functools.partial(sharding.local_rows, mesh=mesh)
    proc = None
    if guided and critic is not None:
        proc = make_processor(critic, eta, switch_arg, guidance="qsharp", kind=kind, atoms=atoms, top_k=top_k,
                              top_k_rest=top_k_rest)
    out = generate(ref_model, dev["prompt"], dev["prompt_valid"], k_gen, n, task.eos_id, temperature=temperature,
                   logits_processor=proc, pad_id=task.pad_id)
    toks, cmask = local(out.tokens), local(out.mask)
    returns = np.asarray(task.reward(toks, cmask, records), np.float32)
    batch = sequence_batch(prompts, pv, toks, cmask)
    j = np.arange(p + n) + 1 - p  # completion index predicted at position t
    after = (j[None, :] >= switch[:, None]).astype(np.float32)
    batch["mask"] = batch.pop("loss_mask") * after
    batch["returns"] = returns
    batch["switch"] = switch
    return batch if mesh is None else sharding.shard_batch(batch, mesh)


def critic_loss(model, batch, rng, *, objective, hparams):
    """Critic loss on aggregated roll-outs: objective(critic outputs, next tokens, returns, mask).

    A TransformerLM critic is read only at the taken next tokens (`values_at`): the loss needs nothing
    else, so the `[B, T, V]` outputs of its token head are never formed."""
    toks, nxt = batch["tokens"], batch["tokens"][:, 1:]
    if hasattr(model, "values_at"):
        h = model.hidden(toks, positions=batch["positions"], valid=batch["valid"])[:, :-1]
        out, taken = model.values_at(h, nxt), None
    else:
        out, taken = critic_outputs(model, toks, batch["positions"], batch["valid"])[:, :-1], nxt
    loss, m = objective(out, taken, batch["returns"], batch["mask"][:, :-1], **hparams)
    return loss, dict(m)


# ----------------------------------------------------------------------------------------------
# Evaluation: one critic, several η, Q♯ and CD
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("guidance", "kind", "top_k", "prompt_len", "ref_def", "critic_def",
                                             "top_k_rest"))
def _guided_kl(ref_state, critic_state, sequences, valid, eta, atoms, *, guidance, kind, top_k, prompt_len,
               ref_def, critic_def, top_k_rest="mask"):
    ref = nnx.merge(ref_def, ref_state)
    critic = nnx.merge(critic_def, critic_state)
    positions = positions_from_valid(valid)
    ref_logits = ref(sequences, positions=positions, valid=valid)[:, prompt_len - 1:-1]
    c = critic_outputs(critic, sequences, positions, valid)[:, prompt_len - 1:-1]
    g = guided_logits(ref_logits.astype(jnp.float32), c.astype(jnp.float32), eta, guidance, kind, atoms, top_k,
                      top_k_rest)
    return dv.kl(g, ref_logits)  # KL(π^η ‖ π_ref) per token, summed over the vocabulary


def evaluate_guided(ref_model, critic, task, records: dict, key, *, etas, kind, atoms=None, top_k=0,
                    temperature=1.0, guidances=("qsharp", "cd"), batch_size=128, mesh=None,
                    top_k_rest="mask") -> dict:
    """pass@1 accuracy, reward, KL(π^η‖π_ref) per token and per sequence for each guidance and η,
    plus the reference (`eval/ref/...`). Names: `eval/<guidance>/eta=<η>/<metric>`.

    With `mesh`, every process samples and scores only its rows of each batch (padded to a multiple
    of the data-parallel size) and the sums are taken over the global per-row statistics."""
    n = task.completion_len
    p = records["prompt"].shape[1]
    atoms_arr = jnp.zeros((1,), jnp.float32) if atoms is None else jnp.asarray(atoms, jnp.float32)
    ref_def, ref_state = nnx.split(ref_model)
    critic_def, critic_state = nnx.split(critic)
    settings = [("reference", None)] + [(g, float(e)) for g in guidances for e in etas]
    out: dict[str, float] = {}
    total = len(records["prompt"])
    dp = 1 if mesh is None else sharding.data_parallel_size(mesh)
    for guidance, eta in settings:
        sums = np.zeros(4)  # accuracy, reward, KL over tokens, tokens
        for lo in range(0, total, batch_size):
            hi = min(lo + batch_size, total)
            if mesh is None:
                mine = np.arange(hi - lo)
            else:
                mine = sharding.process_rows(mesh, -(-(hi - lo) // dp) * dp)
            rows = {k: v[np.minimum(lo + mine, hi - 1)] for k, v in records.items()}
            real = (lo + mine < hi).astype(np.float64)
            b = len(rows["prompt"])
            never = np.full((b,), n, np.int32)  # guide every step
            if mesh is None:
                dev = {"prompt": rows["prompt"], "prompt_valid": rows["prompt_valid"], "never": never}
                local = np.asarray
            else:
                dev = sharding.shard_batch({"prompt": rows["prompt"], "prompt_valid": rows["prompt_valid"],
                                            "never": never}, mesh)
                local = functools.partial(sharding.local_rows, mesh=mesh)
            proc = make_processor(critic, 1.0 if eta is None else eta, dev["never"], guidance=guidance, kind=kind,
                                  atoms=atoms, top_k=top_k, top_k_rest=top_k_rest)
            o = generate(ref_model, dev["prompt"], dev["prompt_valid"], jax.random.fold_in(key, lo), n,
                         task.eos_id, temperature=temperature, logits_processor=proc, pad_id=task.pad_id)
            toks, m = local(o.tokens), local(o.mask)
            ok = task_base.exact_match(toks, m, rows["target"], rows["target_valid"], task.eos_id)
            rew = np.asarray(task.reward(toks, m, rows), np.float64)
            valid = jnp.concatenate([jnp.asarray(dev["prompt_valid"]), o.mask.astype(jnp.int32)], axis=1)
            kl = local(_guided_kl(ref_state, critic_state, o.sequences, valid.astype(jnp.int32),
                                  jnp.float32(1.0 if eta is None else eta), atoms_arr, guidance=guidance,
                                  kind=kind, top_k=int(top_k), prompt_len=p, ref_def=ref_def,
                                  critic_def=critic_def, top_k_rest=top_k_rest))
            kl = np.where(m > 0, kl, 0.0)
            per_row = np.stack([ok * real, rew * real, kl.sum(-1) * real, m.sum(-1) * real], axis=-1)
            if mesh is None:
                sums += per_row.sum(0)
            else:  # the totals of the global batch, the same on every process
                g = sharding.shard_batch({"s": per_row.astype(np.float32)}, mesh)["s"]
                sums += sharding.replicate_small(jnp.sum(g, axis=0), mesh)
        acc, rew, kl_sum, ntok = (float(x) for x in sums)
        name = "eval/ref" if guidance == "reference" else f"eval/{guidance}/eta={eta:g}"
        out[f"{name}/accuracy"] = acc / total
        out[f"{name}/reward"] = rew / total
        out[f"{name}/kl"] = kl_sum / max(ntok, 1.0)
        out[f"{name}/kl_seq"] = kl_sum / total
    return out


# ----------------------------------------------------------------------------------------------
# Config checks and the loop
# ----------------------------------------------------------------------------------------------

def atoms_of(cfg):
    """Histogram support: `model.num_atoms` atoms evenly spaced on [`qsharp.v_min`, `qsharp.v_max`]
    (None for a Bernoulli critic, `num_atoms` = 1)."""
    a = int(cfg.model.get("num_atoms", 1))
    if a <= 1:
        return None
    return np.linspace(float(cfg.qsharp.get("v_min", 0.0)), float(cfg.qsharp.get("v_max", 1.0)), a).astype(np.float32)


def validate(cfg, check_paths: bool = True) -> None:
    """Raise `ConfigError` naming the field and the fix for a qsharp config that cannot run."""
    from kljax.train import common, runs as runs_lib, setup as setup_lib
    check_objective(cfg, "value")
    common.validate_common(cfg)
    name = cfg.objective.name
    require(cfg, "model.value_head", lambda v: v == "token",
            f"objective {name!r} trains a critic with one output per next token: set model.value_head='token'.")
    atoms = int(cfg.model.get("num_atoms", 1))
    if name == "qsharp_histogram" and atoms < 2:
        raise ConfigError("config field `model.num_atoms` = 1 is invalid: qsharp_histogram needs a histogram critic; "
                          "set model.num_atoms >= 2 (e.g. 2 for 0/1 rewards, 11 for graded rewards).")
    if name == "qsharp_bce" and atoms != 1:
        raise ConfigError(f"config field `model.num_atoms` = {atoms} is invalid: qsharp_bce is the Bernoulli critic "
                          "(one logit per token); use num_atoms=1 or objective qsharp_histogram.")
    if not setup_lib.hf_path(cfg):  # else the model.hf_path checkpoint is π_ref (and the critic's trunk)
        require(cfg, "init_from", lambda v: isinstance(v, str) and (v != "" or not check_paths),
                "Q♯ needs the reference policy π_ref: set init_from to the workdir of a pretrained LM "
                "(e.g. runs/star_pretrain), or model.hf_path to a Hugging Face folder.")
        if check_paths:
            runs_lib.check_run_exists(cfg.init_from, "init_from")
    q = require(cfg, "qsharp", lambda v: v is not None, "add a `qsharp` ConfigDict.")
    require(q, "rounds", lambda v: int(v) >= 1, "use at least one round.", prefix="qsharp")
    require(q, "critic_steps", lambda v: int(v) >= 1, "use at least one critic step per round.", prefix="qsharp")
    require(q, "rollouts_per_round", lambda v: int(v) >= 1, "collect at least one roll-out per round.",
            prefix="qsharp")
    dp = sharding.data_parallel_size(setup_lib.build_mesh(cfg))
    require(q, "rollouts_per_round", lambda v: int(v) % dp == 0 and int(v) % jax.process_count() == 0,
            f"a round is one global batch split over the data-parallel size {dp} and {jax.process_count()} "
            f"process(es): use a multiple of {int(np.lcm(dp, jax.process_count()))}.", prefix="qsharp")
    require(q, "etas", lambda v: len(v) >= 1 and all(float(e) > 0 for e in v), "list positive η values.",
            prefix="qsharp")
    if float(q.get("report_eta", q.get("rollin_eta", q.etas[0]))) not in [float(e) for e in q.etas]:
        raise ConfigError("config field `qsharp.report_eta` (default: qsharp.rollin_eta) must be one of qsharp.etas; "
                          "add it to qsharp.etas or set qsharp.report_eta.")
    require(q, "critic_init", lambda v: v in ("reference", "scratch"), "use 'reference' or 'scratch'.",
            default="reference", prefix="qsharp")
    require(q, "top_k_rest", lambda v: v in value_obj.TOP_K_REST,
            f"use one of {value_obj.TOP_K_REST}: the tokens outside π_ref's top-k are never sampled ('mask', the "
            "Q♯ star-graph code) or keep their unguided reference logits ('reference', the Q♯ math code).",
            default="mask", prefix="qsharp")
    if int(cfg.total_steps) != int(q.rounds) * int(q.critic_steps):
        raise ConfigError(f"config field `total_steps` = {cfg.total_steps} must equal qsharp.rounds × "
                          f"qsharp.critic_steps = {int(q.rounds) * int(q.critic_steps)}.")


def merge_params(ts, src_params):
    """`ts` with every parameter that `src_params` has with the same path and shape copied in
    (a critic started from the reference's body; its value head stays freshly initialized)."""
    def merge(cur, src):
        if isinstance(cur, dict):
            s = src if isinstance(src, dict) else {}
            return {k: merge(v, s.get(k)) for k, v in cur.items()}
        if src is None or tuple(src.shape) != tuple(cur.shape):
            return cur
        # A copy: the train step donates its state, which must not delete the reference's arrays.
        return jax.device_put(jnp.array(src, dtype=cur.dtype, copy=True), cur.sharding)
    # The optimizer state is fresh (zero moments), so it stays valid for the new params.
    return ts.replace(params=merge(ts.params, src_params))


class RoundData:
    """Aggregated, labelled roll-outs of all rounds so far (saved per round in `workdir/qsharp_data`).

    With a mesh, each round is global arrays sharded over the batch axes, and each process saves and
    reloads only its own rows (`round_<k>.process<i>of<n>.npz`): one global dataset, held in shares."""

    def __init__(self, workdir: str, mesh=None):
        self.dir = os.path.join(workdir, "qsharp_data")
        self.mesh = mesh
        self.rounds: list[dict] = []
        self._all = None

    def path(self, k: int) -> str:
        n = jax.process_count()
        name = f"round_{k}.npz" if n == 1 else f"round_{k}.process{jax.process_index()}of{n}.npz"
        return os.path.join(self.dir, name)

    def saved(self) -> int:
        """Rounds this process has on disk."""
        k = 0
        while os.path.exists(self.path(k)):
            k += 1
        return k

    def load_existing(self, upto: int) -> None:
        while len(self.rounds) < upto and os.path.exists(self.path(len(self.rounds))):
            with np.load(self.path(len(self.rounds))) as z:
                rows = {k: z[k] for k in z.files}
            self.rounds.append(rows if self.mesh is None else sharding.shard_batch(rows, self.mesh))
            self._all = None

    def add(self, k: int, data: dict) -> None:
        if self.mesh is not None or jax.process_index() == 0:
            local = data if self.mesh is None else {n: sharding.local_rows(v, self.mesh) for n, v in data.items()}
            os.makedirs(self.dir, exist_ok=True)
            tmp = self.path(k) + ".tmp.npz"
            np.savez(tmp, **local)
            os.replace(tmp, self.path(k))
        self.rounds.append(data)
        self._all = None

    def all(self) -> dict:
        if self._all is None:
            if self.mesh is None:
                self._all = {k: np.concatenate([r[k] for r in self.rounds]) for k in self.rounds[0]}
            else:
                concat = jax.jit(lambda rs: {k: jnp.concatenate([r[k] for r in rs]) for k in rs[0]},
                                 out_shardings=sharding.batch_sharding(self.mesh))
                self._all = concat(self.rounds)
        return self._all


def reference_config(cfg):
    """`cfg` for π_ref when it is the `model.hf_path` checkpoint: the critic's model without its value head."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.model.value_head, c.model.num_atoms = "none", 1
    return c


def run(cfg, workdir: str):
    """Run Q♯ rounds (and evaluate Q♯ and CD guidance at every η) in `workdir`; returns the final eval."""
    from kljax.data import make_loader
    from kljax.train import driver, evaluation as eval_lib, runs as runs_lib, setup as setup_lib
    validate(cfg)
    q = cfg.qsharp
    objective = check_objective(cfg, "value")
    kind = KIND_OF[cfg.objective.name]
    atoms = atoms_of(cfg)
    hparams = objective_hparams(cfg)
    if atoms is not None:
        hparams["atoms"] = jnp.asarray(atoms)
    task = setup_lib.build_task(cfg)
    mesh = setup_lib.build_mesh(cfg)
    ref_ts = (runs_lib.load_state_from(cfg.init_from, mesh)[0] if cfg.get("init_from", "") else
              setup_lib.create_state(reference_config(cfg), mesh, task))  # model.hf_path's checkpoint
    ref_model = ref_ts.model()
    ts = setup_lib.create_state(cfg, mesh, task)
    if q.get("critic_init", "reference") == "reference":
        ts = merge_params(ts, ref_ts.params)
    train_step = setup_lib.make_step(functools.partial(critic_loss, objective=objective, hparams=hparams), cfg, mesh, ts)
    loader = make_loader(task.data_source("train", setup_lib.data_dir(cfg)), int(q.rollouts_per_round),
                         seed=int(cfg.seed))
    data = RoundData(os.path.abspath(workdir), mesh)
    steps_per_round = int(q.critic_steps)
    key = jax.random.PRNGKey(int(cfg.seed) + 3)
    top_k = int(q.get("top_k", 0))
    top_k_rest = q.get("top_k_rest", "mask")
    temperature = float(q.get("temperature", 1.0))
    rollin_eta = float(q.get("rollin_eta", q.etas[0]))
    stats: dict = {}
    select_rows = jax.jit(lambda tree, idx: jax.tree.map(lambda v: v[idx], tree),
                          out_shardings=sharding.batch_sharding(mesh))

    def step_fn(ts, _):
        step = int(jax.device_get(ts.step))
        k = step // steps_per_round
        if len(data.rounds) <= k:
            data.load_existing(k + 1)
        if len(data.rounds) <= k:
            # The round's prompts: fresh rows from the training split (deterministic per round).
            rows = next(loader)
            batch = collect_round(ref_model, ts.model(), task, rows, jax.random.fold_in(key, k), eta=rollin_eta,
                                  kind=kind, atoms=atoms, top_k=top_k, temperature=temperature, guided=k > 0,
                                  top_k_rest=top_k_rest, mesh=mesh)
            data.add(k, batch)
            stats["rollout_reward"] = float(jnp.mean(batch["returns"]))
        agg = data.all()
        n = int(agg["returns"].shape[0])
        idx = np.asarray(jax.random.choice(jax.random.fold_in(key, 10_000 + step), n, (int(cfg.batch_size),),
                                           replace=n < int(cfg.batch_size)))
        # A gather from the global data onto the batch sharding (the same indices on every process).
        mb = select_rows({k2: agg[k2] for k2 in ("tokens", "valid", "positions", "mask", "returns")},
                         jax.device_put(idx, sharding.replicated(mesh)))
        ts, m = train_step(ts, mb)
        m = dict(m)
        m.update({"qsharp/round": float(k + 1), "qsharp/data_size": float(n),
                  "qsharp/rollout_reward": stats.get("rollout_reward", float(jnp.mean(data.rounds[k]["returns"])))})
        return ts, m

    records = eval_lib.test_records(cfg, task)
    eval_key = jax.random.PRNGKey(int(cfg.seed) + 12345)
    guidances = tuple(q.get("guidances", ("qsharp", "cd")))

    report_eta = float(q.get("report_eta", rollin_eta))

    def eval_fn(ts):
        out = evaluate_guided(ref_model, ts.model(), task, records, eval_key, etas=tuple(q.etas), kind=kind,
                              atoms=atoms, top_k=top_k, top_k_rest=top_k_rest, temperature=temperature,
                              guidances=guidances, batch_size=int(cfg.eval.get("batch_size", 128)),
                              mesh=mesh)
        # Headline numbers (pipeline tables): Q♯ at `qsharp.report_eta`.
        head = f"eval/{guidances[0]}/eta={report_eta:g}"
        for m in ("accuracy", "reward", "kl"):
            if f"{head}/{m}" in out:
                out[f"eval/{m}"] = out[f"{head}/{m}"]
        return out

    # Rounds are not iterator-driven; the loader's position is implied by the round index, so on resume
    # skip the rounds already collected.
    for _ in range(data.saved()):
        next(loader)
    return driver.run_loop(cfg, workdir, state=ts, step_fn=step_fn, batches=None, eval_fn=eval_fn,
                           bar_keys=("loss", "critic/accuracy", "qsharp/rollout_reward"))
