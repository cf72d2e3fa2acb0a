"""Offline preference optimization (`loop = "preference"`): DPO / IPO / H-DPO / DPKD on pairs built
from the reference policy, as in the Q♯ star-graph code (`collect_rollouts.py`, `train_dpo.py`).

Pairs: for `preference.num_pairs` training prompts, sample π_ref (the `init_from` model) at
`preference.temperature` up to `preference.max_tries` times until a completion gets reward < 1
(wrong path); chosen = the ground-truth target, rejected = that failed sample. Prompts where π_ref
never fails are dropped (Q♯ code: at most 1000 tries). Pairs are saved to `workdir/pairs.npz`.

The policy starts from π_ref (same model config); π_ref stays fixed. Loss:
`objective(batch)` with per-token log-probs `chosen_logp`, `rejected_logp`, `ref_chosen_logp`,
`ref_rejected_logp` and masks (DPO: −log σ(β·[log π/π_ref(y_w) − log π/π_ref(y_l)]), Rafailov et al. 2023).
Evaluation: greedy path accuracy and exact KL(π‖π_ref) (`common.make_generation_eval`).
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
from kljax.train.distill import check_objective, objective_hparams


def collect_pairs(ref_model, task, records: dict, key, *, max_tries: int, temperature: float = 1.0) -> dict:
    """Chosen = target, rejected = the first failed π_ref sample per prompt (rows without one dropped).

    Returns `prompt`, `prompt_valid`, `chosen`, `chosen_valid`, `rejected`, `rejected_valid`
    (numpy, completion arrays [B, N] right-padded like `target`).
    """
    b = len(records["prompt"])
    n = task.completion_len
    rejected = np.full((b, n), task.pad_id, np.int32)
    rejected_valid = np.zeros((b, n), np.int32)
    found = np.zeros(b, bool)
    for t in range(int(max_tries)):
        if found.all():
            break
        o = generate(ref_model, records["prompt"], records["prompt_valid"], jax.random.fold_in(key, t), n,
                     task.eos_id, temperature=temperature, pad_id=task.pad_id)
        toks, m = np.asarray(o.tokens), np.asarray(o.mask)
        fail = np.asarray(task.reward(toks, m, records)) < 1.0
        new = fail & ~found
        rejected[new], rejected_valid[new] = toks[new], m[new]
        found |= new
    keep = np.nonzero(found)[0]
    return {"prompt": records["prompt"][keep], "prompt_valid": records["prompt_valid"][keep],
            "chosen": records["target"][keep], "chosen_valid": records["target_valid"][keep],
            "rejected": rejected[keep], "rejected_valid": rejected_valid[keep]}


def _completion_token_logp(model, prompt, prompt_valid, completion, completion_valid):
    from kljax.train import common
    seq = jnp.concatenate([prompt, completion], axis=1)
    valid = jnp.concatenate([prompt_valid, completion_valid], axis=1)
    logp, _ = common.completion_logp(model, seq, valid, prompt.shape[1])
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
    from kljax.train import common
    check_objective(cfg, "preference")
    common.validate_common(cfg)
    require(cfg, "init_from", lambda v: isinstance(v, str) and (v != "" or not check_paths),
            "offline preference optimization starts from (and is regularized toward) a reference: set init_from "
            "to the workdir of a pretrained LM.")
    if check_paths:
        common.check_run_exists(cfg.init_from, "init_from")
    require(cfg, "preference.num_pairs", lambda v: int(v) >= int(cfg.batch_size),
            "collect at least one batch of pairs (>= batch_size).")
    require(cfg, "preference.max_tries", lambda v: int(v) >= 1, "use at least one try.")


def run(cfg, workdir: str):
    from kljax.data import make_loader, ArraySource
    from kljax.train import common
    validate(cfg)
    objective = check_objective(cfg, "preference")
    hparams = objective_hparams(cfg)
    task = common.build_task(cfg)
    mesh = common.build_mesh(cfg)
    ref_ts, _ = common.load_state_from(cfg.init_from, mesh)
    ref_model = ref_ts.model()
    ts = common.init_params_from(common.create_state(cfg, mesh, task), cfg.init_from, mesh)

    path = os.path.join(os.path.abspath(workdir), "pairs.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            pairs = {k: z[k] for k in z.files}
    else:
        from kljax.data import read_all
        src = task.data_source("train", common.data_dir(cfg))
        n = min(int(cfg.preference.num_pairs), len(src))
        rows = read_all(common._Prefix(src, n))
        chunks = []
        bs = int(cfg.eval.get("batch_size", 128))
        for lo in range(0, n, bs):
            part = {k: v[lo:lo + bs] for k, v in rows.items()}
            chunks.append(collect_pairs(ref_model, task, part, jax.random.PRNGKey(int(cfg.seed) + 17 + lo),
                                        max_tries=int(cfg.preference.max_tries),
                                        temperature=float(cfg.preference.get("temperature", 1.0))))
        pairs = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        if len(pairs["prompt"]) < int(cfg.batch_size):
            raise ConfigError(f"only {len(pairs['prompt'])} of {n} prompts gave a failed π_ref sample within "
                              f"preference.max_tries={cfg.preference.max_tries}; raise `preference.max_tries` or "
                              f"`preference.num_pairs` (need >= batch_size={cfg.batch_size} pairs).")
        # Reference log-probs once (π_ref is fixed).
        for side in ("chosen", "rejected"):
            lp = []
            for lo in range(0, len(pairs["prompt"]), bs):
                sl = slice(lo, lo + bs)
                seq = np.concatenate([pairs["prompt"][sl], pairs[side][sl]], axis=1)
                valid = np.concatenate([pairs["prompt_valid"][sl], pairs[f"{side}_valid"][sl]], axis=1)
                logits = common.model_logits(ref_model, seq, valid, pairs["prompt"].shape[1])
                lp.append(np.asarray(ops.token_logprobs(logits, pairs[side][sl])))
            pairs[f"ref_{side}_logp"] = np.concatenate(lp).astype(np.float32)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez(path + ".tmp.npz", **pairs)
            os.replace(path + ".tmp.npz", path)

    train_step = common.make_step(functools.partial(preference_loss, objective=objective, hparams=hparams),
                                  cfg, mesh, ts)
    loader = make_loader(ArraySource(pairs), int(cfg.batch_size), seed=int(cfg.seed))
    batches = common.ShardedIterator(loader, mesh)
    eval_fn = common.make_generation_eval(cfg, task, mesh, ref_model=ref_model)

    def step_fn(ts, batch):
        ts, m = train_step(ts, batch)
        m = dict(m)
        m["pairs"] = float(len(pairs["prompt"]))
        return ts, m

    return common.run_loop(cfg, workdir, state=ts, step_fn=step_fn, batches=batches, eval_fn=eval_fn,
                           bar_keys=("loss", "rewards/accuracies", "rewards/margins"))
