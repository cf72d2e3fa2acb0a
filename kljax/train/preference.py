"""Offline preference optimization (`loop = "preference"`): DPO / IPO / H-DPO / DPKD on the task's own
(prompt, chosen, rejected) rows, or on pairs built from the reference policy as in the Q♯ star-graph
code (`collect_rollouts.py`, `train_dpo.py`).

Pairs (`preference.pairs`): "dataset" = the first `preference.num_pairs` training rows of a task with
chosen/rejected completions (the `files` task with `task.chosen_key` / `task.rejected_key`: TRL's
DPOTrainer data); evaluation is then the objective's metrics (implicit-reward accuracy and margin) on
the test split's pairs. "reference_samples" (default): for `preference.num_pairs` training prompts, sample π_ref (the `init_from` model) at
`preference.temperature` up to `preference.max_tries` times until a completion gets reward < 1
(wrong path); chosen = the ground-truth target, rejected = that failed sample. Prompts where π_ref
never fails are dropped (Q♯ code: at most 1000 tries). Pairs are saved to `workdir/pairs.npz`
(several processes: each saves its own rows, `pairs.process<i>of<n>.npz`).

The policy starts from π_ref (`init_from`, or the `model.hf_path` checkpoint); π_ref stays fixed. Loss:
`objective(batch)` with per-token log-probs `chosen_logp`, `rejected_logp`, `ref_chosen_logp`,
`ref_rejected_logp` and masks (DPO: −log σ(β·[log π/π_ref(y_w) − log π/π_ref(y_l)]), Rafailov et al. 2023).
Evaluation of reference-sample pairs: greedy path accuracy and exact KL(π‖π_ref) (`make_generation_eval`).

Several processes: each process samples and scores only its rows of every chunk of prompts; the pairs
are global arrays sharded over the batch axes, and each training batch is gathered from them on the
device with indices drawn for the global batch (the same on every process).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kljax import ops
from kljax.config import ConfigError, require
from kljax.sampling import generate
from kljax.train import sharding as shd
from kljax.train.preflight import check_objective, objective_hparams


def collect_pairs(ref_model, task, records: dict, key, *, max_tries: int, temperature: float = 1.0) -> dict:
    """Chosen = target, rejected = the first failed π_ref sample per prompt (rows without one dropped).

    Returns `prompt`, `prompt_valid`, `chosen`, `chosen_valid`, `rejected`, `rejected_valid`
    (numpy, completion arrays [B, N] right-padded like `target`). One process; `run` uses
    `sample_rejected` on each process's share.
    """
    rejected, rejected_valid, found = sample_rejected(ref_model, task, records, key, max_tries=max_tries,
                                                      temperature=temperature)
    keep = np.nonzero(found)[0]
    return {"prompt": records["prompt"][keep], "prompt_valid": records["prompt_valid"][keep],
            "chosen": records["target"][keep], "chosen_valid": records["target_valid"][keep],
            "rejected": rejected[keep], "rejected_valid": rejected_valid[keep]}


def sample_rejected(ref_model, task, records: dict, key, *, max_tries: int, temperature: float = 1.0,
                    mesh=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rejected, rejected_valid, found) for this process's `records`: the first π_ref sample per prompt
    whose reward is < 1, tried up to `max_tries` times.

    With `mesh`, `records` are this process's rows of a global batch (`shard_batch` order): sampling runs
    on the global batch under the mesh, each process scores its own rows, and every process stops after
    the same try (when no prompt of the global batch still lacks a failed sample).
    """
    n = task.completion_len
    b = len(records["prompt"])
    if mesh is None:
        dev = {"prompt": jnp.asarray(records["prompt"]), "prompt_valid": jnp.asarray(records["prompt_valid"])}
        local = np.asarray
    else:
        dev = shd.shard_batch({"prompt": records["prompt"], "prompt_valid": records["prompt_valid"]}, mesh)
        local = functools.partial(shd.local_rows, mesh=mesh)
    rejected = np.full((b, n), task.pad_id, np.int32)
    rejected_valid = np.zeros((b, n), np.int32)
    found = np.zeros(b, bool)
    for t in range(int(max_tries)):
        done = found if mesh is None else shd.replicate_small(shd.shard_batch({"f": found}, mesh)["f"], mesh)
        if done.all():
            break
        o = generate(ref_model, dev["prompt"], dev["prompt_valid"], jax.random.fold_in(key, t), n, task.eos_id,
                     temperature=temperature, pad_id=task.pad_id)
        toks, m = local(o.tokens), local(o.mask)
        fail = np.asarray(task.reward(toks, m, records)) < 1.0
        new = fail & ~found
        rejected[new], rejected_valid[new] = toks[new], m[new]
        found |= new
    return rejected, rejected_valid, found


def _completion_token_logp(model, prompt, prompt_valid, completion, completion_valid):
    from kljax.train import sequences as seq_lib
    seq = jnp.concatenate([prompt, completion], axis=1)
    valid = jnp.concatenate([prompt_valid, completion_valid], axis=1)
    logp, _ = seq_lib.completion_logp(model, seq, valid, prompt.shape[1])
    return logp


def preference_loss(model, batch, rng, *, objective, hparams):
    """`objective` on per-token log-probs of chosen/rejected under the policy; the reference's
    log-probs are precomputed in the batch (`ref_chosen_logp`, `ref_rejected_logp`)."""
    del rng
    pol = {side: _completion_token_logp(model, batch["prompt"], batch["prompt_valid"], batch[side],
                                        batch[f"{side}_valid"]) for side in ("chosen", "rejected")}
    inputs = {"chosen_logp": pol["chosen"], "rejected_logp": pol["rejected"],
              "ref_chosen_logp": batch["ref_chosen_logp"], "ref_rejected_logp": batch["ref_rejected_logp"],
              "chosen_mask": batch["chosen_valid"].astype(jnp.float32),
              "rejected_mask": batch["rejected_valid"].astype(jnp.float32)}
    loss, m = objective(inputs, **hparams)
    m = dict(m)
    m["logps/chosen"] = jnp.mean(ops.masked_sum(pol["chosen"], inputs["chosen_mask"], axis=-1))
    m["logps/rejected"] = jnp.mean(ops.masked_sum(pol["rejected"], inputs["rejected_mask"], axis=-1))
    return loss, m


def validate(cfg, check_paths: bool = True) -> None:
    from kljax.train import common, runs as runs_lib, setup as setup_lib
    check_objective(cfg, "preference")
    common.validate_common(cfg)
    if not setup_lib.hf_path(cfg):
        require(cfg, "init_from", lambda v: isinstance(v, str) and (v != "" or not check_paths),
                "offline preference optimization starts from (and is regularized toward) a reference: set "
                "init_from to the workdir of a pretrained LM, or model.hf_path to a Hugging Face folder.")
        if check_paths:
            runs_lib.check_run_exists(cfg.init_from, "init_from")
    source = require(cfg, "preference.pairs", lambda v: v in PAIR_SOURCES, f"use one of {PAIR_SOURCES}.",
                     default="reference_samples")
    require(cfg, "preference.num_pairs", lambda v: int(v) >= int(cfg.batch_size),
            "collect at least one batch of pairs (>= batch_size).")
    if source == "dataset":
        from kljax.train import reward_model
        reward_model.check_task_has_pairs(cfg, setup_lib.build_task(cfg), "preference.pairs='dataset'")
    else:
        require(cfg, "preference.max_tries", lambda v: int(v) >= 1, "use at least one try.")


PAIR_SOURCES = ("reference_samples", "dataset")


PAIR_FIELDS = ("prompt", "prompt_valid", "chosen", "chosen_valid", "rejected", "rejected_valid",
               "ref_chosen_logp", "ref_rejected_logp", "keep")


@functools.partial(jax.jit, static_argnums=(0, 7))
def _ref_logp(graphdef, params, rest, prompt, prompt_valid, completion, completion_valid, prompt_len):
    from flax import nnx
    del prompt_len  # the prompt's width; static so each shape compiles once
    model = nnx.merge(graphdef, params, rest)
    return _completion_token_logp(model, prompt, prompt_valid, completion, completion_valid).astype(jnp.float32)


def _pair_chunk(ref_model, task, src, mesh, lo: int, hi: int, key, *, max_tries: int, temperature: float,
                from_dataset: bool = False) -> dict:
    """Global arrays of the pairs of training prompts [lo, hi): each process reads and scores only its
    rows; the chunk is padded to a multiple of the data-parallel size with copies of its last prompt
    (`keep` = 0 there, and where π_ref never failed). Reference log-probs are computed once (π_ref is
    fixed), on the global arrays."""
    from flax import nnx
    from kljax.data import _BatchReader
    dp = shd.data_parallel_size(mesh)
    want = -(-(hi - lo) // dp) * dp
    mine = shd.process_rows(mesh, want)
    rows = np.minimum(lo + mine, hi - 1)
    rec = _BatchReader(src)(rows)
    if from_dataset:  # the task's own pairs
        chosen, chosen_valid = rec["chosen"], rec["chosen_valid"]
        rejected, rejected_valid, found = rec["rejected"], rec["rejected_valid"], np.ones(len(rows), bool)
    else:
        chosen, chosen_valid = rec["target"], rec["target_valid"]
        rejected, rejected_valid, found = sample_rejected(ref_model, task, rec, key, max_tries=max_tries,
                                                          temperature=temperature, mesh=mesh)
    g = shd.shard_batch({"prompt": rec["prompt"], "prompt_valid": rec["prompt_valid"], "chosen": chosen,
                         "chosen_valid": chosen_valid, "rejected": rejected, "rejected_valid": rejected_valid,
                         "keep": found & (lo + mine < hi)}, mesh)
    graphdef, params, rest = nnx.split(ref_model, nnx.Param, ...)
    for side in ("chosen", "rejected"):
        g[f"ref_{side}_logp"] = _ref_logp(graphdef, params, rest, g["prompt"], g["prompt_valid"], g[side],
                                          g[f"{side}_valid"], int(g["prompt"].shape[1]))
    return g


def _pairs_file(workdir: str) -> str:
    n = jax.process_count()
    name = "pairs.npz" if n == 1 else f"pairs.process{jax.process_index()}of{n}.npz"
    return os.path.join(os.path.abspath(workdir), name)


def _load_pairs(path: str, mesh) -> dict | None:
    """The global pair arrays saved by this process (its rows), or None when absent or saved under a
    different layout (collection is deterministic, so it is simply redone)."""
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if "rows" not in z.files or not set(PAIR_FIELDS) <= set(z.files):
            return None
        total = int(z["global_rows"])
        if total % shd.data_parallel_size(mesh) or not np.array_equal(z["rows"], shd.process_rows(mesh, total)):
            return None
        return shd.shard_batch({k: z[k] for k in PAIR_FIELDS}, mesh)


def _save_pairs(path: str, pairs: dict, mesh) -> None:
    """This process's rows of the pair arrays (every process writes its own file)."""
    total = int(pairs["keep"].shape[0])
    local = {k: shd.local_rows(v, mesh) for k, v in pairs.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".tmp.npz", rows=shd.process_rows(mesh, total), global_rows=np.int64(total), **local)
    os.replace(path + ".tmp.npz", path)


class _GatheredBatches:
    """Global index batches from a grain loader (the same on every process, checkpointable), each
    turned into a batch-sharded minibatch by a gather on the device: no batch passes through a host."""

    def __init__(self, it, gather):
        self.it, self.gather = it, gather

    def __iter__(self):
        return self

    def __next__(self):
        return self.gather(next(self.it)["index"])

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def _collect_pairs(cfg, task, ref_model, mesh, split: str, n: int, from_dataset: bool) -> dict:
    """Global pair arrays (with reference log-probs and `keep`) of the first `n` rows of `split`, in
    chunks of `eval.batch_size` prompts; each process reads and samples only its own rows."""
    from kljax.train import setup as setup_lib
    src = task.data_source(split, setup_lib.data_dir(cfg))
    n = min(n, len(src))
    bs = int(cfg.eval.get("batch_size", 128))
    chunks = [_pair_chunk(ref_model, task, src, mesh, lo, min(lo + bs, n), jax.random.PRNGKey(int(cfg.seed) + 17 + lo),
                          max_tries=int(cfg.preference.get("max_tries", 1)),
                          temperature=float(cfg.preference.get("temperature", 1.0)), from_dataset=from_dataset)
              for lo in range(0, n, bs)]
    concat = jax.jit(lambda cs: {k: jnp.concatenate([c[k] for c in cs]) for k in cs[0]},
                     out_shardings=shd.batch_sharding(mesh))
    return concat(chunks)


def make_pair_eval(cfg, task, ref_model, mesh, loss_fn):
    """`eval_fn(ts)`: the objective's metrics (`rewards/accuracies`, `rewards/margins`, ...) on the test
    split's pairs, as `eval/*` (one jitted pass; rows padded to the data-parallel size are dropped)."""
    from flax import nnx
    pairs = _collect_pairs(cfg, task, ref_model, mesh, "test", int(cfg.eval.num_examples), True)
    kept = np.nonzero(shd.replicate_small(pairs["keep"], mesh))[0]
    kept = kept[:len(kept) // shd.data_parallel_size(mesh) * shd.data_parallel_size(mesh)]
    select = jax.jit(lambda tree, idx: jax.tree.map(lambda v: v[idx], tree), out_shardings=shd.batch_sharding(mesh))
    batch = select({k: v for k, v in pairs.items() if k != "keep"}, jax.device_put(kept, shd.replicated(mesh)))

    @functools.partial(jax.jit, static_argnums=0)
    def metrics(graphdef, params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, None)[1]

    def eval_fn(ts):
        m = jax.device_get(metrics(ts.graphdef, ts.params, ts.model_state, batch))
        out = {f"eval/{k}": float(v) for k, v in m.items()}
        out["eval/num_examples"] = int(len(kept))
        return out
    return eval_fn


def run(cfg, workdir: str):
    from kljax.data import make_loader, ArraySource
    from kljax.train import driver, evaluation as eval_lib, setup as setup_lib
    validate(cfg)
    from flax import nnx
    objective = check_objective(cfg, "preference")
    hparams = objective_hparams(cfg)
    task, mesh, ts = setup_lib.setup(cfg)  # init_from's params, else model.hf_path's: also the reference
    ref_model = nnx.merge(ts.graphdef, jax.tree.map(lambda x: x.copy(), ts.params), ts.model_state)
    from_dataset = cfg.preference.get("pairs", "reference_samples") == "dataset"

    path = _pairs_file(workdir)
    pairs = _load_pairs(path, mesh)
    if pairs is None:
        # Each process samples and scores its own rows of every chunk of prompts; the pairs stay global
        # arrays, sharded over the batch axes (one dataset, each process holding its share).
        pairs = _collect_pairs(cfg, task, ref_model, mesh, "train", int(cfg.preference.num_pairs), from_dataset)
        _save_pairs(path, pairs, mesh)
    kept = np.nonzero(shd.replicate_small(pairs["keep"], mesh))[0]
    if len(kept) < int(cfg.batch_size):
        raise ConfigError(f"only {len(kept)} of {int(cfg.preference.num_pairs)} prompts gave a failed π_ref sample "
                          f"within preference.max_tries={cfg.preference.max_tries}; raise `preference.max_tries` or "
                          f"`preference.num_pairs` (need >= batch_size={cfg.batch_size} pairs).")
    data = {k: v for k, v in pairs.items() if k != "keep"}

    loss_fn = functools.partial(preference_loss, objective=objective, hparams=hparams)
    train_step = setup_lib.make_step(loss_fn, cfg, mesh, ts)
    # The shuffled order of the kept pairs is drawn once for the global batch, identically on every process.
    loader = make_loader(ArraySource({"index": kept}), int(cfg.batch_size), seed=int(cfg.seed), shard_index=0,
                         shard_count=1)
    select_rows = jax.jit(lambda tree, idx: jax.tree.map(lambda v: v[idx], tree),
                          out_shardings=shd.batch_sharding(mesh))
    replicated = shd.replicated(mesh)
    batches = _GatheredBatches(loader, lambda idx: select_rows(data, jax.device_put(idx, replicated)))
    eval_fn = (make_pair_eval(cfg, task, ref_model, mesh, loss_fn) if from_dataset else
               eval_lib.make_generation_eval(cfg, task, mesh, ref_model=ref_model))

    def step_fn(ts, batch):
        ts, m = train_step(ts, batch)
        m = dict(m)
        m["pairs"] = float(len(kept))
        return ts, m

    return driver.run_loop(cfg, workdir, state=ts, step_fn=step_fn, batches=batches, eval_fn=eval_fn,
                           bar_keys=("loss", "rewards/accuracies", "rewards/margins"))
