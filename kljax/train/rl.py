"""Policy-gradient RL with verifiable rewards, for any registered policy objective.

One loop step (one *roll-out*):

1. take `rl.prompts_per_step` prompts from the train split and sample `rl.group_size`
   completions of each with `generate` (temperature / top-k / top-p from `rl`);
2. score them with the task's reward; with `rl.dynamic_sampling` (DAPO) groups whose rewards are all
   equal are dropped and more prompts are sampled (up to `rl.max_sampling_rounds` rounds) until the
   batch is full again; rows still missing are filled with dropped groups (their group advantage is 0);
3. old log-probs (policy before the update: the sampler's own log-probs when sampling is untempered
   and untruncated, else a forward pass; `rl.old_logp = "auto" | "sampler" | "recompute"`), reference
   log-probs (and the reference logits when `objective.kl_estimator == "exact"`), and a teacher's
   log-probs (KDRL, `rl.teacher_from`);
4. run `rl.updates_per_rollout` epochs of minibatch updates (`rl.minibatch_size` rows = whole
   groups) with `objective(batch, **hparams)`, where the batch carries the rewards and
   `group_size` (the objective's own advantage estimator, `rl.advantage = "objective"`) or
   precomputed advantages (`"group_mean_std"`, `"group_mean"`, `"leave_one_out"`, `"batch"`, or `"gae"`:
   PPO with a critic, below);
5. reference: `rl.reference = "fixed"` keeps `init_from`'s params; `"reset"` replaces the reference by
   the current policy every `rl.reset_every` roll-outs (RPG's iterative reference / ProRL's reset).

Several processes: each samples and scores its own prompts (its grain shard; a group's G completions
are made in one process), the rewards become one global array, and advantages, minibatch selection
(one permutation from the step's seed on every process) and metrics use the global arrays, so the
numbers process 0 prints describe the whole batch. DAPO's dynamic sampling stays single-process.

PPO with a critic (`rl.advantage = "gae"`, InstructGPT/Ziegler et al. 2019): with `rl.critic = "shared"`
(default) the critic shares the policy's trunk (`model.value_head = "scalar"`, V(h_t) read at the hidden
state that predicts token t); with `rl.critic = "separate"` it is a second model of the policy's
architecture with a scalar head (the policy keeps `model.value_head = "none"`), its trunk initialized
from the policy's initial params (= the reference), its own optimizer (`optim` with learning rate
`rl.critic_lr`; 0 or None = `optim.learning_rate`), trained on the same minibatches by
`rl.vf_coef` · clipped value loss, and checkpointed in `RLState.critic`.
Per-token rewards r_t = R·1[t = last] − β·k1_t with k1_t = log π_old(y_t|h_t) − log π_ref(y_t|h_t);
advantages and returns by `advantages.gae(r, V_old, mask, rl.gamma, rl.lam)` (whitened over the
roll-out when `rl.whiten_advantages`); loss = objective (PPO-clip, its own `beta` = 0) +
`rl.vf_coef` · `value.clipped_value_loss(V, V_old, returns, clip_eps=rl.value_clip)`. β = `rl.kl_coef`;
with `rl.kl_target` > 0 it adapts after each roll-out by `advantages.adaptive_kl_beta` (Ziegler et al.'s
controller, horizon `rl.kl_horizon` samples) and is checkpointed. Metrics `objective/kl` (mean sequence
k1 of the roll-out), `kl_coef`, `value_loss`, `value_clipfrac`.

`total_steps` counts roll-outs; each runs `updates_per_rollout × rollout_rows / minibatch_size`
optimizer updates (`optim.total_steps` defaults to that product for the schedule).
"""
from __future__ import annotations

import concurrent.futures
import functools
import inspect
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import data as data_lib
from kljax import objectives, ops
from kljax.config import ConfigError, require
from kljax.objectives import advantages as adv_lib
from kljax.sampling import generate
from kljax.tasks.rewards import RewardError
from kljax.models import positions_from_valid
from kljax.train import common, driver, evaluation as eval_lib, runs as runs_lib
from kljax.train import sequences as seq_lib, setup as setup_lib
from kljax.train import sharding as shd, state as state_lib

ADVANTAGES = ("objective", "group_mean_std", "group_mean", "leave_one_out", "batch", "gae")
# rl.* fields of PPO with a critic (rl.advantage = "gae") and their defaults.
GAE_DEFAULTS = dict(gamma=1.0, lam=0.95, vf_coef=0.1, value_clip=0.2, kl_coef=0.05, kl_target=0.0,
                    kl_horizon=10000.0, whiten_advantages=True)
CRITICS = ("shared", "separate")  # rl.critic: value head on the policy's trunk, or a second model
# Objectives whose default advantage needs a group of samples per prompt (group_size >= 2).
_NO_GROUP_NEEDED = ("ppo", "reinforce_pp", "apo")


@flax.struct.dataclass
class RLState:
    """Checkpointed RL state: the policy's train state, the reference params, roll-outs done."""
    train: state_lib.TrainState
    ref_params: Any
    step: jax.Array
    kl_coef: Any = None  # β of the per-token KL reward (rl.advantage = "gae"; adapted with rl.kl_target)
    critic: Any = None  # the separate critic's TrainState (rl.critic = "separate"), else None


def _rl(cfg):
    return cfg.rl


def updates_per_step(cfg: Any) -> int:
    r = _rl(cfg)
    rows = int(r.prompts_per_step) * int(r.group_size)
    return int(r.updates_per_rollout) * (rows // int(r.minibatch_size))


def validate(cfg: Any, check_paths: bool = True) -> None:
    """RL config checks (before compiling): objective, group size, minibatch, reference, teacher."""
    common.validate_common(cfg)
    name = require(cfg, "objective.name", lambda v: isinstance(v, str), "name a policy objective.")
    try:
        fam = objectives.family(name)
    except KeyError as e:
        raise ConfigError(f"config field `objective.name`: {e.args[0]}") from None
    if fam != "policy":
        raise ConfigError(f"config field `objective.name` = {name!r} is a {fam} objective; loop 'rl' needs one of "
                          f"{objectives.names('policy')}.")
    fn = objectives.get(name)
    params = inspect.signature(fn).parameters
    bad = [k for k in cfg.objective.keys() if k != "name" and k not in params]
    if bad:
        raise ConfigError(f"config field(s) {['objective.' + b for b in bad]} are not hyper-parameters of "
                          f"{name!r}; valid: {[p for p in params if p != 'batch']}.")
    r = cfg.rl
    g = require(cfg, "rl.group_size", lambda v: int(v) >= 1, "use a positive group size.")
    adv = require(cfg, "rl.advantage", lambda v: v in ADVANTAGES, f"use one of {ADVANTAGES}.", default="objective")
    group_adv = adv in ("group_mean_std", "group_mean", "leave_one_out") or (
        adv == "objective" and name not in _NO_GROUP_NEEDED)
    if g < 2 and group_adv:
        raise ConfigError(f"config field `rl.group_size` = {g}: objective {name!r} with rl.advantage={adv!r} uses a "
                          "group baseline, which is 0 for a single sample (no learning signal); use "
                          "rl.group_size >= 2 or rl.advantage='batch'.")
    if adv == "gae":
        _validate_gae(cfg, name)
    else:
        for k in ("critic", "critic_lr"):
            if r.get(k, None) not in (None, "shared", 0, 0.0):
                raise ConfigError(f"config field `rl.{k}` = {r.get(k)!r} configures PPO's critic, which only "
                                  "rl.advantage='gae' trains; set rl.advantage='gae' or remove the field.")
    require(cfg, "rl.old_logp", lambda v: v in ("auto", "sampler", "recompute"),
            "use 'auto' (the sampler's log-probs when sampling is untempered and untruncated), 'sampler' or "
            "'recompute' (a forward pass of the policy before the update).", default="auto")
    if r.get("dynamic_sampling", False) and jax.process_count() > 1:
        raise ConfigError("config field `rl.dynamic_sampling` = True runs in one process only (DAPO's group "
                          f"filtering is host-side), and this run has {jax.process_count()} processes; "
                          "set --config.rl.dynamic_sampling=False or run one process.")
    if g < 2 and r.get("dynamic_sampling", False):
        raise ConfigError("config field `rl.dynamic_sampling` = True needs rl.group_size >= 2 (a group of one "
                          "always has zero reward variance).")
    rows = int(r.prompts_per_step) * g
    mesh = setup_lib.build_mesh(cfg)
    dp = shd.data_parallel_size(mesh)
    require(cfg, "rl.minibatch_size", lambda v: int(v) >= 1 and rows % int(v) == 0 and int(v) % g == 0
            and int(v) % dp == 0,
            f"the minibatch must hold whole groups (a multiple of rl.group_size={g}), divide the roll-out "
            f"(rl.prompts_per_step × rl.group_size = {rows}) and be a multiple of the data-parallel size {dp}.")
    require(cfg, "rl.prompts_per_step", lambda v: int(v) % jax.process_count() == 0,
            "use a multiple of the process count.")
    ref = require(cfg, "rl.reference", lambda v: v in ("fixed", "reset"), "use 'fixed' or 'reset'.",
                  default="fixed")
    if ref == "reset":
        require(cfg, "rl.reset_every", lambda v: int(v) >= 1, "reset the reference every K >= 1 roll-outs.")
    if not cfg.get("init_from", "") and not setup_lib.hf_path(cfg):
        raise ConfigError("config field `init_from` is empty: loop 'rl' starts from a pretrained model, which is "
                          "also the reference; set --config.init_from=<workdir of an sft run> (e.g. the "
                          "experiment's `pretrain` arg) or --config.model.hf_path=<Hugging Face folder>.")
    if check_paths and cfg.get("init_from", ""):  # a pipeline's later stages point at runs that do not exist yet
        runs_lib.check_run_exists(cfg.init_from, "init_from")
        if r.get("teacher_from", ""):
            runs_lib.check_run_exists(r.teacher_from, "rl.teacher_from")
    from kljax.train import reward_model
    reward_model.check_model_reward(cfg, check_paths)
    for field in ("rl.reference_sharding", "rl.teacher_sharding"):
        shd.layout_rules(cfg, field)
    if name == "kdrl" and not r.get("teacher_from", ""):
        raise ConfigError("objective 'kdrl' needs a teacher: set config field `rl.teacher_from` to a trained run's "
                          "workdir.")


def _gae_opts(cfg: Any) -> dict:
    return {k: cfg.rl.get(k, v) for k, v in GAE_DEFAULTS.items()}


def critic_kind(cfg: Any) -> str | None:
    """'shared' | 'separate' for PPO with a critic (rl.advantage = "gae"), else None."""
    if cfg.rl.get("advantage", "objective") != "gae":
        return None
    return cfg.rl.get("critic", "shared") or "shared"


def _validate_gae(cfg: Any, name: str) -> None:
    kind = require(cfg, "rl.critic", lambda v: v in CRITICS,
                   f"use one of {CRITICS} (a value head on the policy's trunk, or a second model).", default="shared")
    if kind == "shared":
        require(cfg, "model.value_head", lambda v: v == "scalar",
                "rl.advantage='gae' with rl.critic='shared' trains a critic on the policy's trunk: set "
                "model.value_head='scalar' (or rl.critic='separate' for a second value model).")
        if cfg.rl.get("critic_lr", None):
            raise ConfigError("config field `rl.critic_lr` is the separate critic's learning rate; with "
                              "rl.critic='shared' the value head trains with the policy (optim.learning_rate): "
                              "remove it or set rl.critic='separate'.")
    else:
        require(cfg, "model.value_head", lambda v: v in ("none", None),
                "with rl.critic='separate' the critic is its own model with its own scalar head; the policy "
                "needs none: set model.value_head='none' (or rl.critic='shared' to use the policy's head).",
                default="none")
        require(cfg, "rl.critic_lr", lambda v: v is None or float(v) >= 0,
                "use a positive learning rate for the critic (0 or None: optim.learning_rate).", default=None)
    if name not in ("ppo", "reinforce"):
        raise ConfigError(f"config field `objective.name` = {name!r}: rl.advantage='gae' feeds per-token advantages "
                          "to 'ppo' (PPO with a critic) or 'reinforce'.")
    if float(cfg.objective.get("beta", 0.0) or 0.0) != 0.0:
        raise ConfigError("config field `objective.beta` must be 0 with rl.advantage='gae': the KL penalty is "
                          "rl.kl_coef, in the per-token reward (set --config.objective.beta=0).")
    o = _gae_opts(cfg)
    for k in ("gamma", "lam"):
        if not 0.0 <= float(o[k]) <= 1.0:
            raise ConfigError(f"config field `rl.{k}` = {o[k]!r}: use a value in [0, 1].")
    for k in ("vf_coef", "kl_coef", "kl_target"):
        if not float(o[k]) >= 0.0:
            raise ConfigError(f"config field `rl.{k}` = {o[k]!r}: use a value >= 0.")
    if o["value_clip"] is not None and not float(o["value_clip"]) > 0:
        raise ConfigError(f"config field `rl.value_clip` = {o['value_clip']!r}: use a value > 0 (None: no clip).")
    if not float(o["kl_horizon"]) > 0:
        raise ConfigError(f"config field `rl.kl_horizon` = {o['kl_horizon']!r}: use a positive number of samples.")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _old_values(graphdef, params, rest, seq, valid, prompt_len):
    """Critic values V(h_t) [B, N] of the completion tokens (the scalar head at the predicting position)."""
    model = nnx.merge(graphdef, params, rest)
    h = model.hidden(seq, positions=positions_from_valid(valid), valid=valid)[:, prompt_len - 1:-1]
    return model.values(h)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _gae_batch(rewards, old_logp, ref_logp, values, mask, beta, gamma, lam, whiten):
    """Per-token rewards R·1[last] − β·k1, GAE advantages (whitened) and returns, mean sequence k1."""
    m = mask.astype(jnp.float32)
    k1 = (old_logp - ref_logp) * m
    last = jax.nn.one_hot(jnp.sum(m, -1).astype(jnp.int32) - 1, m.shape[1], dtype=m.dtype) * m
    token_r = rewards[:, None] * last - beta * k1
    adv, ret = adv_lib.gae(token_r, values, m, gamma, lam)
    if whiten:
        adv = ops.masked_whiten(adv, m)
    return adv, ret, jnp.mean(jnp.sum(k1, -1))


def _objective_kwargs(cfg: Any, group_size: int) -> tuple[Any, dict]:
    name = cfg.objective.name
    fn = objectives.get(name)
    kw = {k: v for k, v in cfg.objective.items() if k != "name"}
    if "group_size" in inspect.signature(fn).parameters:
        kw["group_size"] = group_size
    return fn, kw


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _logp_and_logits(graphdef, params, rest, seq, valid, prompt_len, want_logits, chunk_rows=0):
    """Completion log-probs (and logits) of a roll-out, `chunk_rows` rows at a time when that divides
    the batch: the `[rows, T, V]` logits of a whole roll-out need not fit in memory at once."""
    model = nnx.merge(graphdef, params, rest)

    def one(rows):
        logp, logits = seq_lib.completion_logp(model, rows[0], rows[1], prompt_len)
        return logp, (logits if want_logits else None)

    rows = seq.shape[0]
    if 0 < chunk_rows < rows and rows % chunk_rows == 0:
        # Chunk k holds rows k, k + n, k + 2n, ...: the row dimension of each chunk keeps the roll-out's
        # batch sharding (contiguous chunks would each sit on a few devices, or be replicated).
        n = rows // chunk_rows
        chunks = lambda x: jnp.moveaxis(x.reshape(chunk_rows, n, *x.shape[1:]), 1, 0)
        logp, logits = jax.lax.map(one, (chunks(seq), chunks(valid)))
        unchunk = lambda x: None if x is None else jnp.moveaxis(x, 0, 1).reshape(rows, *x.shape[2:])
        return unchunk(logp), unchunk(logits)
    return one((seq, valid))


def _model_logp(graphdef, params, rest, seq, valid, prompt_len, want_logits=False, chunk_rows=0):
    return _logp_and_logits(graphdef, params, rest, seq, valid, prompt_len, want_logits, chunk_rows)


def _repeat(batch, g):
    return {k: np.repeat(np.asarray(v), g, axis=0) for k, v in batch.items()}


def _group_std(rewards, g):
    return rewards.reshape(-1, g).std(axis=-1)


def fill_groups(first: dict, more, n_groups: int, group_size: int) -> tuple[dict, dict]:
    """DAPO dynamic sampling: keep groups whose rewards vary, drawing roll-outs from `more` until
    `n_groups` are kept or `more` is exhausted; then fill with dropped groups (zero group advantage).

    `first` and each item of `more` map names to arrays with `n·group_size` rows and include
    "rewards". Returns (batch of exactly `n_groups·group_size` rows, {"dynamic_sampling/rounds",
    "dynamic_sampling/frac_kept"}).
    """
    keep, spare = [], []
    ro, rounds = first, 1
    while True:
        std = _group_std(ro["rewards"], group_size)
        for gi in range(len(std)):
            sl = slice(gi * group_size, (gi + 1) * group_size)
            (keep if std[gi] > 0 else spare).append({k: v[sl] for k, v in ro.items()})
        if len(keep) >= n_groups:
            break
        ro = next(more, None)
        if ro is None:
            break
        rounds += 1
    groups = (keep + spare)[:n_groups]
    batch = {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}
    return batch, {"dynamic_sampling/rounds": float(rounds),
                   "dynamic_sampling/frac_kept": min(len(keep), n_groups) / n_groups}


VOCAB_TILE_AUTO = (32768, 8192)  # rl.vocab_tile = -1: tiles of 8192 columns when V >= 32768


def update_vocab_tile(cfg: Any, kw: dict, model: Any) -> int:
    """Vocabulary tile of the update's log-prob/entropy pass (0: dense `[B, N, V]` logits).

    `rl.vocab_tile` > 0 asks for that tile, 0 for dense logits, -1 (default) for 8192-column tiles when
    the vocabulary has at least 32768 entries. Objectives that read full logits (`kl_estimator='exact'`,
    `entropy_coef` > 0) and models without `hidden`/`unembedding` always use dense logits; asking for
    tiles with them is an error.
    """
    tile = int(cfg.rl.get("vocab_tile", -1))
    needs_logits = kw.get("kl_estimator") == "exact" or float(kw.get("entropy_coef", 0) or 0) > 0
    tileable = hasattr(model, "hidden") and hasattr(model, "unembedding")
    if tile > 0 and (needs_logits or not tileable):
        why = "the objective reads full logits (kl_estimator='exact' or entropy_coef > 0)" if needs_logits \
            else f"{type(model).__name__} has no hidden()/unembedding()"
        raise ValueError(f"rl.vocab_tile={tile} but {why}; set rl.vocab_tile=0 (dense logits)")
    if tile < 0:
        tile = VOCAB_TILE_AUTO[1] if tileable and not needs_logits and \
            model.unembedding().shape[1] >= VOCAB_TILE_AUTO[0] else 0
    return tile


def make_rl_loss(cfg: Any, prompt_len: int, group_size: int):
    """`loss_fn(model, batch, rng)` running the configured policy objective on one minibatch."""
    fn, kw = _objective_kwargs(cfg, group_size)
    critic = critic_kind(cfg) == "shared"  # a separate critic trains in its own step (make_critic_loss)
    if critic:
        from kljax.objectives.value import clipped_value_loss
        o = _gae_opts(cfg)
        vf_coef, vclip = float(o["vf_coef"]), (None if o["value_clip"] is None else float(o["value_clip"]))

    def loss_fn(model, batch, rng):
        del rng
        ent = None
        if critic:  # one trunk pass for the policy's logits and the critic's values
            seq, valid = batch["sequences"], batch["valid"]
            h = model.hidden(seq, positions=positions_from_valid(valid), valid=valid)[:, prompt_len - 1:-1]
            logits = model.logits_from_hidden(h)
            logp = ops.token_logprobs(logits, seq[:, prompt_len:])
        elif tile := update_vocab_tile(cfg, kw, model):  # a Python int at trace time
            logp, ent = seq_lib.completion_logp_entropy_tiled(model, batch["sequences"], batch["valid"],
                                                             prompt_len, tile)
            logits = None
        else:
            logp, logits = seq_lib.completion_logp(model, batch["sequences"], batch["valid"], prompt_len)
        ob = {"logp": logp, "logits": logits, "old_logp": batch["old_logp"], "ref_logp": batch["ref_logp"],
              "mask": batch["mask"]}
        for k in ("rewards", "advantages", "ref_logits", "teacher_logp"):
            if k in batch:
                ob[k] = batch[k]
        loss, m = fn(ob, **kw)
        m = dict(m)
        if critic:
            vloss, vm = clipped_value_loss(model.values(h), batch["old_values"], batch["returns"], batch["mask"],
                                           clip_eps=vclip)
            loss = loss + vf_coef * vloss
            m.update(vm)
        ent = ops.entropy(logits) if ent is None else ent
        m.setdefault("entropy", ops.masked_mean(jax.lax.stop_gradient(ent), batch["mask"]))
        return loss, m
    return loss_fn


def make_critic_loss(cfg: Any, prompt_len: int):
    """`loss_fn(critic_model, batch, rng)` of the separate critic: `rl.vf_coef` · clipped value loss of its
    values V(h_t) against the minibatch's GAE returns (the same loss the shared head adds to the policy's)."""
    from kljax.objectives.value import clipped_value_loss
    o = _gae_opts(cfg)
    vf_coef, vclip = float(o["vf_coef"]), (None if o["value_clip"] is None else float(o["value_clip"]))

    def loss_fn(model, batch, rng):
        del rng
        seq, valid = batch["sequences"], batch["valid"]
        h = model.hidden(seq, positions=positions_from_valid(valid), valid=valid)[:, prompt_len - 1:-1]
        vloss, vm = clipped_value_loss(model.values(h), batch["old_values"], batch["returns"], batch["mask"],
                                       clip_eps=vclip)
        return vf_coef * vloss, dict(vm)
    return loss_fn


def critic_config(cfg: Any) -> Any:
    """The separate critic's config: the policy's model with a scalar value head, `optim` at `rl.critic_lr`."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.model.value_head = "scalar"
        if cfg.rl.get("critic_lr", None):  # 0 / None: the policy's learning rate
            c.optim.learning_rate = float(cfg.rl.critic_lr)
    return c


def create_critic(sched_cfg: Any, mesh: Any, task: Any, policy_params: Any) -> state_lib.TrainState:
    """The separate critic's fresh train state: the policy's (initial) params for the trunk, a fresh head."""
    c = critic_config(sched_cfg)
    ts = setup_lib.create_state(c, mesh, task, pretrained=False)  # the trunk is overwritten just below
    # Copies: the policy's step donates its params, which must not be the critic's buffers too.
    params = runs_lib.merge_params(ts.params, jax.tree.map(lambda x: x.copy(), policy_params))
    if params is None:
        raise ConfigError("config field `rl.critic` = 'separate': the critic (the policy's model with "
                          "value_head='scalar') does not match the policy's parameters; this is a bug.")
    return ts.replace(params=params)


def reference_layout(cfg: Any, ts: Any, mesh: jax.sharding.Mesh):
    """`params -> copy` placed in the reference's layout (`rl.reference_sharding`, default the policy's)."""
    rules = shd.layout_rules(cfg, "rl.reference_sharding")
    if rules is shd.DEFAULT_RULES:
        return lambda params: jax.tree.map(lambda x: x.copy(), params)
    sharding, _ = state_lib.model_shardings(ts.model(), mesh, rules)
    return lambda params: jax.device_put(jax.tree.map(lambda x: x.copy(), params), sharding)


def schedule_config(cfg: Any) -> Any:
    """`cfg` whose lr schedule counts optimizer updates (several per roll-out) unless `optim.total_steps` is set."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        if "total_steps" not in c.optim:
            c.optim.total_steps = int(cfg.total_steps) * updates_per_step(cfg)
    return c


def run(cfg: Any, workdir: str) -> dict:
    """Train `cfg.total_steps` roll-outs in `workdir` (resuming); return the final evaluation."""
    loop = _RLLoop(cfg)
    try:
        return driver.run_loop(cfg, workdir, state=loop.state, step_fn=loop.step, batches=_PromptIter(loop.prompts),
                               eval_fn=loop.eval_fn, bar_keys=("reward", "kl", "kl_forward", "entropy", "loss"),
                               desc=f"rl {cfg.objective.name}")
    finally:
        loop.pool.shutdown(wait=False)


class _RLLoop:
    """One RL run: what it builds once, and the named parts of a step (module docstring, 1-5)."""

    def __init__(self, cfg: Any):
        from kljax.train import reward_model
        from kljax.train import setup as setup_lib
        self.cfg, r = cfg, cfg.rl
        self.r = r
        self.G, self.n_prompts, self.mb = int(r.group_size), int(r.prompts_per_step), int(r.minibatch_size)
        self.rows = self.n_prompts * self.G
        self.sched_cfg = schedule_config(cfg)
        # Params from init_from, else the model.hf_path checkpoint's (also the reference).
        self.task, self.mesh, ts = setup_lib.setup(self.sched_cfg)
        task, mesh = self.task, self.mesh
        self.P = task.prompt_len
        self.n_new = int(r.get("max_new_tokens", 0) or task.completion_len)
        self.ref_layout = reference_layout(cfg, ts, mesh)
        ref_params = self.ref_layout(ts.params)
        self.teacher = None
        if r.get("teacher_from", ""):
            t, _ = runs_lib.load_state_from(r.teacher_from, mesh, rules=shd.layout_rules(cfg, "rl.teacher_sharding"))
            self.teacher = (t.graphdef, t.params, t.model_state)
        self.gae_opts = _gae_opts(cfg)
        self.separate = critic_kind(cfg) == "separate"
        critic_ts = create_critic(self.sched_cfg, mesh, task, ts.params) if self.separate else None
        self.replicated = shd.replicated(mesh)
        self.state = RLState(train=ts, ref_params=ref_params, step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                             kl_coef=jax.device_put(jnp.asarray(float(self.gae_opts["kl_coef"]), jnp.float32),
                                                    self.replicated),
                             critic=critic_ts)
        self.exact = cfg.objective.get("kl_estimator", "") == "exact"
        self.adv_kind = r.get("advantage", "objective")
        self.policy_step = state_lib.make_train_step(make_rl_loss(cfg, self.P, self.G), mesh,
                                                     state_lib.state_sharding(ts),
                                                     schedule=setup_lib.schedule(self.sched_cfg))
        self.critic_step = None
        if self.separate:
            self.critic_step = state_lib.make_train_step(make_critic_loss(cfg, self.P), mesh,
                                                         state_lib.state_sharding(critic_ts),
                                                         schedule=setup_lib.schedule(critic_config(self.sched_cfg)))
        self.prompts = data_lib.make_loader(task.data_source("train", setup_lib.data_dir(cfg)), self.n_prompts,
                                            seed=int(cfg.seed))
        # Evaluation KL is always to the initial (pretrained) model, also when the reference is reset.
        ref_model_for_eval = nnx.merge(ts.graphdef, jax.tree.map(lambda x: x.copy(), ref_params), ts.model_state)
        self.eval_fn = eval_lib.make_generation_eval(cfg, task, mesh, ref_model=ref_model_for_eval,
                                                   model_of=lambda s: s.train.model())
        self.dynamic = bool(r.get("dynamic_sampling", False))
        self.max_rounds = int(r.get("max_sampling_rounds", 4))
        self.sample_kw = dict(temperature=float(r.get("temperature", 1.0)), top_k=int(r.get("top_k", 0)),
                              top_p=float(r.get("top_p", 1.0)))
        self.reward_stats: dict = {}
        rm_dir = reward_model.model_reward_workdir(cfg)
        self.rm_score = reward_model.load_reward_fn(rm_dir, mesh) if rm_dir else None  # "model:<workdir>"
        # Untempered, untruncated sampling draws from the policy itself: its log-probs are the old ones.
        old = r.get("old_logp", "auto")
        self.sampler_is_policy = old == "sampler" or (
            old == "auto" and self.sample_kw == dict(temperature=1.0, top_k=0, top_p=1.0))
        # A minibatch is a gather from the global roll-out, placed straight onto the batch sharding (the
        # same permutation on every process, no batch through one host).
        self.select_rows = jax.jit(lambda tree, idx: jax.tree.map(lambda v: v[idx], tree),
                                   out_shardings=shd.batch_sharding(mesh))
        # Rewards (possibly slow Python) are scored on a thread while the device computes the log-probs.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kljax-reward")

    # -- 1-2. sample groups and score them ------------------------------------------------------

    def _score(self, toks, mask, rep):
        t0 = time.perf_counter()
        rewards = np.asarray(self.task.reward(toks, mask, rep), np.float32)
        self._add_time("time/reward_s", time.perf_counter() - t0)
        self.reward_stats.update({k: v for k, v in getattr(self.task, "last_reward_metrics", {}).items()
                                  if k.startswith("rewards/")})
        return rewards

    def _add_time(self, key, seconds):
        self.reward_stats[key] = self.reward_stats.get(key, 0.0) + seconds

    def _rollout(self, model, batch, key, overlap=False):
        """Sample this process's groups under the mesh, score its own rows on the host, and return
        global arrays (a group never straddles processes: its G copies are made here). `overlap`: the
        rewards are a future of this process's rows (see `step`)."""
        mesh = self.mesh
        rep = _repeat(batch, self.G)
        dev = shd.shard_batch({"prompt": rep["prompt"], "prompt_valid": rep["prompt_valid"]}, mesh)
        out = generate(model, dev["prompt"], dev["prompt_valid"], key, self.n_new, self.task.eos_id,
                       pad_id=self.task.pad_id, **self.sample_kw)
        ro = {"sequences": out.sequences, "prompt_valid": dev["prompt_valid"], "mask": out.mask,
              "sampler_logp": out.logp}
        if self.rm_score is not None:  # a reward model: scored on the device, batch-sharded
            t0 = time.perf_counter()
            ro["rewards"] = jax.block_until_ready(self.rm_score(dev["prompt"], dev["prompt_valid"], out.tokens,
                                                                out.mask))
            self._add_time("time/reward_s", time.perf_counter() - t0)
            return ro
        toks, mask = shd.local_rows(out.tokens, mesh), shd.local_rows(out.mask, mesh)
        ro["rewards"] = (self.pool.submit(self._score, toks, mask, rep) if overlap else
                         shd.shard_batch({"r": self._score(toks, mask, rep)}, mesh)["r"])
        return ro

    def sample_groups(self, model, key):
        """A full roll-out batch of `n_prompts` groups (DAPO: only groups with reward variance)."""
        first = self._rollout(model, next(self.prompts), jax.random.fold_in(key, 0), overlap=not self.dynamic)
        if not self.dynamic:
            return first, {}
        # DAPO's group filtering runs on host arrays (validation keeps it to one process).
        host = lambda ro: {k: np.asarray(v) for k, v in ro.items()}  # noqa: E731
        more = (host(self._rollout(model, next(self.prompts), jax.random.fold_in(key, i)))
                for i in range(1, self.max_rounds))
        batch, stats = fill_groups(host(first), more, self.n_prompts, self.G)
        return shd.shard_batch(batch, self.mesh), stats

    def await_rewards(self, rewards, step):
        """The global reward array (waiting for the scoring thread when it overlapped the passes)."""
        if not isinstance(rewards, concurrent.futures.Future):
            return rewards
        t0 = time.perf_counter()
        try:
            rewards = shd.shard_batch({"r": rewards.result()}, self.mesh)["r"]
        except RewardError as e:
            raise e.at_step(step + 1) from e
        self.reward_stats["time/reward_wait_s"] = time.perf_counter() - t0
        return rewards

    # -- 3. old, reference and teacher log-probs ------------------------------------------------

    def forward_passes(self, st: RLState, ro: dict) -> dict:
        """The update batch of the whole roll-out: sequences, masks and the log-probs the loss needs."""
        train, P, mb = st.train, self.P, self.mb
        seq, mask = ro["sequences"], ro["mask"]
        valid = jnp.concatenate([ro["prompt_valid"], mask.astype(ro["prompt_valid"].dtype)], axis=1)
        if self.sampler_is_policy:  # the sampler's log-probs are the policy's: no second forward pass
            old_logp = ro["sampler_logp"]
        else:
            old_logp, _ = _model_logp(train.graphdef, train.params, train.model_state, seq, valid, P, False, mb)
        ref_logp, ref_logits = _model_logp(train.graphdef, st.ref_params, train.model_state, seq, valid, P,
                                           self.exact, mb)
        full = {"sequences": seq, "valid": valid, "mask": mask.astype(jnp.float32), "old_logp": old_logp,
                "ref_logp": ref_logp}
        if self.exact:
            full["ref_logits"] = ref_logits
        if self.teacher is not None:
            t = self.teacher
            full["teacher_logp"], _ = _model_logp(t[0], t[1], t[2], seq, valid, P, False, mb)
        return full

    # -- 4a. advantages -------------------------------------------------------------------------

    def advantages(self, st: RLState, full: dict) -> tuple[Any, dict]:
        """Adds `advantages` (and PPO's critic targets) to `full`; returns (next KL coefficient, stats).

        Every process computes the same values from the global arrays."""
        rw, kind = full["rewards"], self.adv_kind
        if kind == "gae":  # PPO with a critic: per-token KL reward, GAE, critic targets
            g = self.gae_opts
            vs = st.critic if self.separate else st.train
            old_values = _old_values(vs.graphdef, vs.params, vs.model_state, full["sequences"], full["valid"], self.P)
            a, ret, seq_kl = _gae_batch(rw, full["old_logp"], full["ref_logp"], old_values, full["mask"],
                                        st.kl_coef, float(g["gamma"]), float(g["lam"]), bool(g["whiten_advantages"]))
            full.update(advantages=a.astype(jnp.float32), old_values=old_values, returns=ret)
            stats = {"objective/kl": float(seq_kl), "kl_coef": float(st.kl_coef)}
            kl_coef = st.kl_coef
            if float(g["kl_target"]) > 0:  # Ziegler et al.'s adaptive controller, n_steps = roll-out rows
                kl_coef = adv_lib.adaptive_kl_beta(kl_coef, seq_kl, float(g["kl_target"]), float(g["kl_horizon"]),
                                                   self.rows)
            return kl_coef, stats
        if kind != "objective":
            G = self.G
            a = {"group_mean_std": lambda: adv_lib.group_normalized(rw, G),
                 "group_mean": lambda: adv_lib.group_mean(rw, G),
                 "leave_one_out": lambda: adv_lib.leave_one_out(rw, G)}.get(kind, lambda: adv_lib.batch_normalized(rw))()
            full["advantages"] = a.astype(jnp.float32)
        return st.kl_coef, {}

    # -- 4b. minibatch epochs -------------------------------------------------------------------

    def minibatch_epochs(self, train, critic, full: dict, step: int):
        """`rl.updates_per_rollout` epochs over minibatches of whole groups, reshuffled each epoch (the
        same permutation on every process, from the step); returns (train, critic, mean metrics)."""
        G = self.G
        rng = np.random.default_rng([int(self.cfg.seed), step])
        n_groups = self.rows // G
        sums: dict = {}
        n = 0
        for _ in range(int(self.r.updates_per_rollout)):
            order = rng.permutation(n_groups)
            for lo in range(0, n_groups, self.mb // G):
                idx = (order[lo:lo + self.mb // G][:, None] * G + np.arange(G)[None]).reshape(-1)
                mbatch = self.select_rows(full, jax.device_put(idx, self.replicated))
                train, m = self.policy_step(train, mbatch)
                if self.separate:  # the critic's own update on the same minibatch
                    critic, cm = self.critic_step(critic, mbatch)
                    m = dict(m)
                    m.update({(k if k.startswith("value") else f"critic/{k}"): v for k, v in cm.items()})
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        out = {k: v / n for k, v in sums.items()}
        out["num_updates"] = float(n)
        return train, critic, out

    # -- 5. reference ---------------------------------------------------------------------------

    def next_reference(self, st: RLState, train, step: int):
        """The reference after this step: reset to the policy every `rl.reset_every` roll-outs."""
        if self.r.get("reference", "fixed") == "reset" and (step + 1) % int(self.r.reset_every) == 0:
            return self.ref_layout(train.params), {"reference_reset": 1.0}
        return st.ref_params, {}

    # -- one roll-out ---------------------------------------------------------------------------

    def step(self, st: RLState, _):
        step = int(jax.device_get(st.step))
        key = jax.random.fold_in(st.train.rng, 1_000_003 + step)  # differs from the update keys fold_in(rng, t)
        self.reward_stats.clear()
        try:
            ro, ds_stats = self.sample_groups(st.train.model(), key)
        except RewardError as e:  # names the function and the prompt; add the step
            raise e.at_step(step + 1) from e
        full = self.forward_passes(st, ro)  # on the device while the rewards are scored on the host
        full["rewards"] = self.await_rewards(ro["rewards"], step)
        kl_coef, adv_stats = self.advantages(st, full)
        train, critic, out = self.minibatch_epochs(st.train, st.critic, full, step)
        ref_params, ref_stats = self.next_reference(st, train, step)
        out.update({k: float(v) for k, v in adv_lib.reward_metrics(full["rewards"], self.G).items()})
        out["completions/mean_length"] = float(ro["mask"].sum(-1).mean())
        for extra in (ds_stats, self.reward_stats, adv_stats, ref_stats):
            out.update(extra)
        return RLState(train=train, ref_params=ref_params, step=st.step + 1, kl_coef=kl_coef, critic=critic), out


class _PromptIter:
    """Checkpoint handle of the prompt loader: roll-outs draw prompts themselves (dynamic sampling
    may take several batches per step), so `next` yields nothing and the state is the loader's."""

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self):
        return None

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)
