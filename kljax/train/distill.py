"""Knowledge-distillation loop (`loop = "distill"`): a student LM (or digits classifier) trained
against a fixed teacher with any registered distillation objective.

Data per step (`distill.data`):
* ``dataset``  — off-policy: the task's training sequences (supervised KD).
* ``student``  — GKD (Agarwal et al., ICLR 2024): with probability λ (`distill.lam`) the batch's
  completions are sampled from the *current student* (on-policy), else taken from the dataset.
* ``teacher``  — sequence-level KD (Kim & Rush 2016): completions sampled from the teacher.
* ``adaptive`` — DistiLLM (Ko et al., ICML 2024): fresh student samples with probability
  φ·(1 − step/total), else a batch from a replay buffer of earlier student samples with probability φ
  (while the buffer is not full, fresh samples), else the dataset.

Whatever the source, the loss is ``objective(student_logits, teacher_logits, mask, **objective_hparams)``
on the completion positions (position t predicts token t+1), teacher logits detached inside the objective.

MiniLLM (`objective.name = "minillm"`): the policy-gradient sequence reverse KL needs the student's own
samples, so it requires `distill.data = "student"` with `distill.lam = 1` (every batch sampled from the
current student at `distill.temperature` = `objective.temperature`); the teacher scores those samples and
the objective gets them as `tokens=` (the next token of each position).

Teacher (`distill.teacher_from`): a workdir whose latest checkpoint holds a model with the same
vocabulary (e.g. an `sft` run), or ``"source"`` for the synthetic language task: the exact source
distribution (`task.true_logprobs`, smoothed by `distill.teacher_smoothing` so reverse-KL losses stay finite).

Evaluation: exact per-token KL between teacher and student over the full vocabulary on held-out
sequences, both directions (`eval/fkl` = KL(teacher‖student), `eval/rkl` = KL(student‖teacher));
for `synthetic_lm` also the exact KL from the true source (`eval/source_fkl`) and the mean true
log-likelihood of student samples (`eval/reward`, the task reward).

Digits (`task.name = "digits"`): classic Hinton KD of a classifier: the teacher classifier
(`distill.teacher_model`, a `classifier_config`) is trained with cross-entropy for
`distill.teacher_steps` steps in `workdir/teacher` (or loaded from `distill.teacher_from`), then the
student `model` with `objective` on its class logits (`kd` with α = 0 is the no-KD baseline).

Teacher from a Hugging Face folder (`distill.teacher_hf_path`, instead of `teacher_from`): it must share
the student's tokenizer; vocabularies that differ only by padding rows are compared on the common ids
(`kljax.models.aligned_vocab_size`), any other difference is an error naming both sizes.

Config fields (`distill.*`): teacher_from, teacher_hf_path, teacher_smoothing, data, lam, temperature, phi,
replay_size, replay_ratio (LM); teacher_model, teacher_steps, teacher_model_key (digits).
"""
from __future__ import annotations

import base64
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kljax import objectives, ops
from kljax.config import ConfigError, require
from kljax.objectives import distill as distill_obj
from kljax.sampling import generate
from kljax.train import checkpoint, sharding, state as state_lib
from kljax.train.preflight import check_objective, objective_hparams
from kljax.train.runs import load_model, model_from_config
from kljax.train.sequences import sequence_batch

DATA_SOURCES = ("dataset", "student", "teacher", "adaptive")


def exact_kl_metrics(student_logits, teacher_logits, mask) -> dict:
    """Mean per-token exact KL over the vocabulary, both directions, on positions where `mask` = 1.

    `fkl` = KL(teacher‖student) (forward), `rkl` = KL(student‖teacher) (reverse); teacher entries
    of −inf are tokens the teacher never emits.
    """
    from kljax import divergences as dv
    m = jnp.asarray(mask, jnp.float32)
    s = jnp.where(m[..., None] > 0, student_logits, 0.0)
    t = jnp.where(m[..., None] > 0, teacher_logits, 0.0)
    return {"fkl": ops.masked_mean(dv.forward_kl(t, s), m), "rkl": ops.masked_mean(dv.reverse_kl(t, s), m)}


# ----------------------------------------------------------------------------------------------
# Config checks (before anything compiles)
# ----------------------------------------------------------------------------------------------

def validate(cfg, check_paths: bool = True) -> None:
    """Raise `ConfigError` naming the field and the fix for a distill config that cannot run."""
    from kljax.train import common, runs as runs_lib
    check_objective(cfg, "distill")
    require(cfg, "distill", lambda v: v is not None, "add a `distill` ConfigDict (teacher_from, data, lam, ...).")
    name = cfg.objective.name
    several = jax.process_count() > 1
    if cfg.task.name == "digits":
        if several:
            raise ConfigError(f"config field `task.name` = 'digits': classifier KD runs in one process only, and "
                              f"this run has {jax.process_count()} processes; run it as one process.")
        require(cfg, "distill.teacher_model", lambda v: "num_classes" in v,
                "digits KD needs `distill.teacher_model = classifier_config(...)` for the teacher.")
        return
    data = require(cfg, "distill.data", lambda v: v in DATA_SOURCES, f"use one of {DATA_SOURCES}.")
    sharding.layout_rules(cfg, "distill.teacher_sharding")
    vocab_tile(cfg, 0)  # a tile size the objective or teacher cannot use is an error before anything runs
    if cfg.distill.get("teacher_hf_path", ""):  # a Hugging Face teacher sharing the student's tokenizer
        if cfg.distill.get("teacher_from", ""):
            raise ConfigError("set one of `distill.teacher_from` and `distill.teacher_hf_path`, not both.")
    else:
        teacher = require(cfg, "distill.teacher_from", lambda v: isinstance(v, str) and (v != "" or not check_paths),
                          "a distillation loss needs a teacher: set `distill.teacher_from` to the workdir of a "
                          "trained model (e.g. an sft stage), 'source' for synthetic_lm's true distribution, or "
                          "`distill.teacher_hf_path` to a Hugging Face folder.")
        if teacher == "source" and cfg.task.name != "synthetic_lm":
            raise ConfigError(f"config field `distill.teacher_from` = 'source' needs task.name='synthetic_lm' "
                              f"(the only task with a known source distribution); got {cfg.task.name!r}.")
        if check_paths and teacher != "source":
            runs_lib.check_run_exists(teacher, "distill.teacher_from")
    if data == "student":
        require(cfg, "distill.lam", lambda v: 0.0 <= v <= 1.0, "GKD's λ is a probability in [0, 1].")
    if name == "minillm":
        validate_minillm(cfg)
    if data == "adaptive" and several:
        raise ConfigError(f"config field `distill.data` = 'adaptive' (DistiLLM's replay buffer, checkpointed by "
                          f"process 0 only) runs in one process only, and this run has {jax.process_count()} "
                          "processes; use 'student' (GKD) or run one process.")
    if data == "adaptive":
        require(cfg, "distill.phi", lambda v: 0.0 <= v <= 1.0, "DistiLLM's φ is a probability in [0, 1].")
        require(cfg, "distill.replay_size", lambda v: v >= cfg.batch_size,
                "the replay buffer must hold at least one batch (>= batch_size).")
    common.validate_common(cfg)
    if cfg.model.get("value_head", "none") != "none":
        raise ConfigError("config field `model.value_head` must be 'none' for a distillation student.")


def validate_minillm(cfg) -> None:
    """MiniLLM's loss is a score-function estimate: its gradient is ∇KL(q_θ‖p) only when every batch is
    sampled from the current student at the temperature the objective scores with."""
    data, lam = cfg.distill.get("data", "dataset"), cfg.distill.get("lam", None)
    if data != "student" or lam is None or float(lam) != 1.0:
        raise ConfigError(f"config field `distill.data` = {data!r} with `distill.lam` = {lam!r}: objective 'minillm' "
                          "trains on the student's own samples only (its policy gradient is biased on dataset, "
                          "teacher or replayed completions); set `distill.data = 'student'` and `distill.lam = 1.0` "
                          "(experiments/distill.py:minillm does).")
    t_sample = float(cfg.distill.get("temperature", 1.0))
    t_obj = float(cfg.objective.get("temperature", 1.0))
    if t_sample != t_obj:
        raise ConfigError(f"config field `distill.temperature` = {t_sample} differs from `objective.temperature` = "
                          f"{t_obj}: MiniLLM scores the samples with the distribution they were drawn from; set "
                          "both to the same value.")


# ----------------------------------------------------------------------------------------------
# LM distillation
# ----------------------------------------------------------------------------------------------

def lm_distill_loss(model, batch, rng, *, objective, hparams):
    """`objective(student_logits, teacher_logits, loss_mask, **hparams)` on one batch (`kd`/`nkd` also get
    `labels` = the next tokens, their hard-label term)."""
    logits = model(batch["tokens"], positions=batch["positions"], valid=batch["valid"])
    logits = logits[..., :batch["teacher_logits"].shape[-1]]  # aligned vocabulary (padding rows dropped)
    kw = dict(hparams)
    toks = batch["tokens"]
    nxt = jnp.concatenate([toks[:, 1:], jnp.zeros_like(toks[:, :1])], axis=1)  # position t predicts token t+1
    if objective in (objectives.get("kd"), objectives.get("nkd")):
        kw["labels"] = nxt  # hard labels = the batch's next tokens (dataset, student or teacher samples)
    elif objective is objectives.get("minillm"):
        kw["tokens"] = nxt  # the student's own samples (validate_minillm enforces on-policy data)
    loss, m = objective(logits, batch["teacher_logits"], batch["loss_mask"], **kw)
    out = dict(m)
    out["kl"] = m.get("distill/kl", jnp.zeros(()))
    return loss, out


# Distillation objectives whose loss is a per-token divergence summed over the vocabulary: with
# `distill.vocab_tile` they run from hidden states by tiles (`divergences.*_from_hidden`).
TILED_DIVERGENCES = {"fkl": ("forward_kl_from_hidden", ()), "rkl": ("reverse_kl_from_hidden", ()),
                     "jsd": ("generalized_jsd_from_hidden", ("beta",)), "skl": ("skew_kl_from_hidden", ("alpha",)),
                     "srkl": ("skew_reverse_kl_from_hidden", ("alpha",)),
                     "tvd": ("total_variation_from_hidden", ())}
VOCAB_TILE_AUTO = 8192  # tile size of `distill.vocab_tile = -1` once V >= 4 tiles


def vocab_tile(cfg, vocab_size: int) -> int:
    """Tile size of the distillation loss (0 = dense logits): `distill.vocab_tile` > 0 as given; -1 (auto)
    tiles of 8192 when V >= 32768, the teacher is a model and the objective is a tiled divergence
    with its default token-mean reduction and no τ² scaling."""
    d, o = cfg.distill, cfg.objective
    tile = int(d.get("vocab_tile", -1))
    supported = (o.name in TILED_DIVERGENCES and d.get("teacher_from", "") != "source"
                 and o.get("reduction", "token_mean") == "token_mean" and not o.get("tau_squared", False))
    if tile > 0 and not supported:
        raise ConfigError(f"config field `distill.vocab_tile` = {tile}: the tiled loss covers objectives "
                          f"{sorted(TILED_DIVERGENCES)} with reduction='token_mean', no tau_squared, and a teacher "
                          "model (not 'source'); set distill.vocab_tile=0 (dense logits).")
    if tile == -1:
        return VOCAB_TILE_AUTO if supported and vocab_size >= 4 * VOCAB_TILE_AUTO else 0
    return max(tile, 0)


def lm_distill_loss_tiled(model, batch, rng, teacher_unembedding, *, name, hparams, chunk_size):
    """The divergence of `TILED_DIVERGENCES[name]` (token mean over `loss_mask`) from the student's and
    the teacher's hidden states, by vocabulary tiles: no `[B, T, V]` logits of either model exist."""
    from kljax import divergences as dv
    from kljax.objectives.distill import reduce
    del rng
    fn_name, keys = TILED_DIVERGENCES[name]
    h = model.hidden(batch["tokens"], positions=batch["positions"], valid=batch["valid"])
    w = model.unembedding()[:, :teacher_unembedding.shape[1]]  # aligned vocabulary (padding rows dropped)
    mask = batch["loss_mask"]
    kw = {k: hparams[k] for k in keys if k in hparams}
    per_token = getattr(dv, fn_name)(batch["teacher_hidden"], teacher_unembedding, h, w, mask,
                                     temperature=float(hparams.get("temperature", 1.0)), chunk_size=chunk_size, **kw)
    loss = reduce(per_token, mask, "token_mean")  # the dense objective's reduction
    return loss, {"kl": loss} if name == "fkl" else {}


class _Teacher:
    """Teacher next-token log-probs `[B, T, V]` for token sequences, and a sampler (sequence KD)."""

    def __init__(self, cfg, task, mesh=None):
        from kljax.train import runs as runs_lib, setup as setup_lib
        spec = cfg.distill.get("teacher_from", "")
        self.task = task
        if cfg.distill.get("teacher_hf_path", ""):
            self._from_hf(cfg, task, mesh)
        elif spec == "source":
            self.model = None
            self.smoothing = float(cfg.distill.get("teacher_smoothing", 0.0))
        else:
            runs_lib.check_run_exists(spec, "distill.teacher_from")
            self.model = runs_lib.load_model_from(spec, mesh or setup_lib.build_mesh(cfg),
                                                rules=sharding.layout_rules(cfg, "distill.teacher_sharding"))
            if self.model.vocab_size != task.vocab_size:
                raise ConfigError(f"config field `distill.teacher_from` = {spec!r}: teacher vocabulary "
                                  f"{self.model.vocab_size} != task vocabulary {task.vocab_size}.")
            graphdef, st = nnx.split(self.model)
            fwd = jax.jit(lambda st, t, p, v: nnx.merge(graphdef, st)(t, positions=p, valid=v))
            self._fwd = lambda t, p, v: fwd(st, t, p, v)
            hid = jax.jit(lambda st, t, p, v: nnx.merge(graphdef, st).hidden(t, positions=p, valid=v))
            self._hidden = lambda t, p, v: hid(st, t, p, v)
            self._unembedding = lambda: jax.jit(lambda st: nnx.merge(graphdef, st).unembedding())(st)

    def _from_hf(self, cfg, task, mesh):
        """Teacher = `distill.teacher_hf_path`, a Hugging Face folder whose tokenizer is the student's.

        Vocabularies are aligned by `kljax.models.aligned_vocab_size`: equal sizes as they are; sizes that
        differ only by padding rows past the tokenizer's ids compare the first min(teacher, student) ids
        (both distributions renormalized there); anything else is a `ConfigError` naming both sizes."""
        from kljax.models import aligned_vocab_size, from_hf
        from kljax.models.tokenizer import has_tokenizer, load_tokenizer
        from kljax.train import setup as setup_lib
        path = cfg.distill.teacher_hf_path
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ConfigError(f"config field `distill.teacher_hf_path` = {path!r}: no config.json there.")
        tok = getattr(task, "tokenizer", None)
        if has_tokenizer(path) and hasattr(tok, "fingerprint"):
            theirs = load_tokenizer(path)
            if theirs._tok.get_vocab(with_added_tokens=True) != tok._tok.get_vocab(with_added_tokens=True):
                raise ConfigError(f"config field `distill.teacher_hf_path` = {path!r}: the teacher's tokenizer "
                                  f"({theirs.vocab_size} ids) is not the student's ({tok.vocab_size} ids); "
                                  "distillation needs a shared tokenizer.")
        mc = setup_lib.model_config(cfg, task)
        self.model = from_hf(path, dtype=mc.dtype, param_dtype=mc.param_dtype)
        try:
            self.vocab = aligned_vocab_size(self.model.vocab_size, mc.vocab_size, task.vocab_size)
        except ValueError as e:
            raise ConfigError(f"config field `distill.teacher_hf_path` = {path!r}: {e}") from None
        graphdef, params, rest = state_lib.shard_model(self.model, mesh or setup_lib.build_mesh(cfg),
                                                       sharding.layout_rules(cfg, "distill.teacher_sharding"))
        n, self.params = self.vocab, params
        fwd = jax.jit(lambda params, rest, t, p, v: nnx.merge(graphdef, params, rest)(t, positions=p, valid=v)[..., :n])
        self._fwd = lambda t, p, v: fwd(params, rest, t, p, v)
        hid = jax.jit(lambda params, rest, t, p, v: nnx.merge(graphdef, params, rest).hidden(t, positions=p, valid=v))
        self._hidden = lambda t, p, v: hid(params, rest, t, p, v)
        self._unembedding = lambda: jax.jit(lambda params, rest: nnx.merge(graphdef, params, rest).unembedding()[:, :n])(
            params, rest)

    def logits(self, b: dict) -> np.ndarray:
        """Host log-probs of the 'source' teacher (synthetic_lm's true distribution) for numpy rows."""
        return self.task.true_logprobs(b["tokens"], smoothing=self.smoothing)

    def device_hidden(self, b: dict) -> jax.Array:
        """A teacher model's final hidden states `[B, T, D_teacher]` (the vocabulary-tiled losses' input)."""
        return self._hidden(b["tokens"], b["positions"], b["valid"])

    def unembedding(self) -> jax.Array:
        """The teacher's `[D_teacher, V]` output projection (aligned vocabulary), computed once."""
        return self._unembedding()

    def device_logits(self, b: dict) -> jax.Array:
        """A teacher model's float32 logits `[B, T, V]` for a batch of arrays on the mesh (the batch's
        sharding carries over: each device computes its own rows)."""
        return self._fwd(b["tokens"], b["positions"], b["valid"]).astype(jnp.float32)


def _vocab_limit(limit, logits, state):
    """Logits processor: ids >= `limit` are never sampled. MiniLLM scores the student's samples with its
    logits cut to the teacher-aligned vocabulary (padding rows dropped), so it must sample from exactly that
    renormalized distribution."""
    del state
    return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def _source_sample(task, prompts, n, key):
    """Completions sampled from synthetic_lm's true source (the 'source' teacher), [B, N] + mask."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # The source is a bigram chain; prompts are a single BOS token.
    toks = task.sample(prompts.shape[0], rng)[:, 1:1 + n]
    valid = task.validity(toks)
    return toks, valid


class _DistillData:
    """Per-step batches for the LM distillation loop: draws the data source, samples completions
    (student / teacher / source), builds the sequence batch and the teacher logits.

    Wraps the dataset loader. Its checkpointed state is the loader's, plus (DistiLLM, `replay_size` > 0)
    the replay buffer and the per-source counts, so a resumed run replays what the interrupted one
    would have.
    """

    def __init__(self, cfg, task, teacher, loader, mesh, tiled: bool = False):
        self.cfg, self.task, self.teacher, self.loader, self.mesh = cfg, task, teacher, loader, mesh
        self.tiled = tiled  # batches carry the teacher's hidden states instead of its logits
        self.data = cfg.distill.data
        self.temperature = float(cfg.distill.get("temperature", 1.0))
        self.key = jax.random.PRNGKey(int(cfg.seed) + 1)
        self.replay: list = []
        self.replay_size = int(cfg.distill.get("replay_size", 0) or 0)
        self.counts = {"dataset": 0, "student": 0, "teacher": 0, "replay": 0}
        limit = getattr(teacher, "vocab", None) if cfg.objective.get("name", "") == "minillm" else None
        # One Partial object for the run, so `generate` reuses its compilation.
        self.student_processor = None if limit is None else jax.tree_util.Partial(_vocab_limit, jnp.int32(limit))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.loader)  # raw dataset rows; `batch` turns them into the step's batch

    def get_state(self):
        if not self.replay_size:
            return self.loader.get_state()
        loader = self.loader.get_state()
        if isinstance(loader, bytes):  # checkpoints store JSON
            loader = {"__bytes_b64__": base64.b64encode(loader).decode("ascii")}
        return {"loader": loader, "counts": dict(self.counts),
                "replay": [[np.asarray(c).tolist(), np.asarray(v).tolist()] for c, v in self.replay]}

    def set_state(self, s):
        if not (self.replay_size and isinstance(s, dict) and "replay" in s):
            self.loader.set_state(s)
            return
        loader = s["loader"]
        if isinstance(loader, dict) and set(loader) == {"__bytes_b64__"}:
            loader = base64.b64decode(loader["__bytes_b64__"])
        self.loader.set_state(loader)
        self.counts.update(s["counts"])
        self.replay = [(np.asarray(c, np.int32), np.asarray(v, np.int32)) for c, v in s["replay"]]

    def choose(self, step: int, key) -> str:
        """Which data trains step `step`: 'dataset' | 'student' | 'teacher' | 'replay'."""
        cfg = self.cfg
        if self.data == "teacher":
            return "teacher"
        if self.data == "student":
            return "student" if bool(distill_obj.gkd_use_student_data(key, float(cfg.distill.lam))) else "dataset"
        if self.data == "adaptive":
            src = int(distill_obj.distillm_data_source(
                key, float(cfg.distill.phi), step, int(cfg.total_steps), len(self.replay) >= self.replay_size,
                cfg.distill.get("replay_ratio", "decreasing")))
            which = {distill_obj.DATASET: "dataset", distill_obj.STUDENT: "student", distill_obj.REPLAY: "replay"}[src]
            if which == "replay" and len(self.replay) < int(cfg.batch_size):
                which = "student"
            return which
        return "dataset"

    def sample(self, which, student, prompts, pv, key):
        n = self.task.completion_len
        if which == "teacher" and self.teacher.model is None:
            return _source_sample(self.task, prompts, n, key)
        model = student if which == "student" else self.teacher.model
        # This process's prompts, sampled under the mesh; the completions come back as its own rows.
        dev = sharding.shard_batch({"p": np.asarray(prompts), "v": np.asarray(pv)}, self.mesh)
        proc = self.student_processor if which == "student" else None
        out = generate(model, dev["p"], dev["v"], key, n, self.task.eos_id, temperature=self.temperature,
                       pad_id=self.task.pad_id, logits_processor=proc)
        return sharding.local_rows(out.tokens, self.mesh), sharding.local_rows(out.mask, self.mesh)

    def batch(self, step: int, student, raw: dict) -> tuple[dict, str]:
        k_choice, k_gen = jax.random.split(jax.random.fold_in(self.key, step))
        which = self.choose(step, k_choice)
        self.counts[which] += 1
        if which == "dataset":
            comp, cv = raw["target"], raw["target_valid"]
        elif which == "replay":
            idx = np.asarray(jax.random.choice(k_gen, len(self.replay), (int(self.cfg.batch_size),), replace=False))
            comp = np.stack([self.replay[i][0] for i in idx])
            cv = np.stack([self.replay[i][1] for i in idx])
        else:
            comp, cv = self.sample(which, student, raw["prompt"], raw["prompt_valid"], k_gen)
            if self.data == "adaptive" and which == "student":
                self.replay.extend(zip(comp, cv))
                del self.replay[:max(0, len(self.replay) - self.replay_size)]
        b = sequence_batch(raw["prompt"], raw["prompt_valid"], comp, cv)
        if self.teacher.model is None:
            b["teacher_logits"] = self.teacher.logits(b).astype(np.float32)
            return sharding.shard_batch(b, self.mesh), which
        dev = sharding.shard_batch(b, self.mesh)
        if self.tiled:  # the vocabulary-tiled loss streams the teacher's logits from its hidden states
            dev["teacher_hidden"] = self.teacher.device_hidden(dev)
        else:
            dev["teacher_logits"] = self.teacher.device_logits(dev)  # never through the host
        return dev, which


def make_lm_kl_eval(cfg, task, teacher, mesh):
    """`eval_fn(ts)`: exact KL to the teacher (and, for synthetic_lm, to the true source) on test
    sequences, plus generation metrics of the student (`eval_lib.evaluate_generation`)."""
    from kljax.train import evaluation as eval_lib
    test = eval_lib.test_records(cfg, task)
    host = sequence_batch(test["prompt"], test["prompt_valid"], test["target"], test["target_valid"])
    # Every process holds the whole (small) test set: replicate it on the mesh.
    put = functools.partial(jax.device_put, device=sharding.replicated(mesh))
    b = {k: put(np.asarray(v)) for k, v in host.items()}
    t_logits = put(teacher.logits(host)) if teacher.model is None else teacher.device_logits(b)
    true = put(task.true_logprobs(host["tokens"])) if task.name == "synthetic_lm" else None

    @functools.partial(jax.jit, static_argnums=0)
    def kl(graphdef, st, tokens, positions, valid, target, mask):
        logits = nnx.merge(graphdef, st)(tokens, positions=positions, valid=valid)
        return exact_kl_metrics(logits[..., :target.shape[-1]], target, mask)

    key = jax.random.PRNGKey(int(cfg.seed) + 12345)
    settings = eval_lib.eval_settings(cfg)

    def eval_fn(ts):
        model = ts.model()
        g, st = nnx.split(model)
        args = (b["tokens"], b["positions"], b["valid"])
        out = {f"eval/{k}": float(v) for k, v in kl(g, st, *args, t_logits, b["loss_mask"]).items()}
        if true is not None:
            out["eval/source_fkl"] = float(kl(g, st, *args, true, b["loss_mask"])["fkl"])
        out.update(eval_lib.evaluate_generation(model, task, test, key, mesh=mesh, **settings))
        return out

    return eval_fn


def run(cfg, workdir: str):
    """Run the `distill` loop described by `cfg` in `workdir`; returns the final eval metrics."""
    from kljax.data import make_loader
    from kljax.train import driver, setup as setup_lib
    validate(cfg)
    if cfg.task.name == "digits":
        return run_classifier_kd(cfg, workdir)
    objective = check_objective(cfg, "distill")
    hparams = objective_hparams(cfg)
    task, mesh, ts = setup_lib.setup(cfg)
    teacher = _Teacher(cfg, task, mesh)
    tile = vocab_tile(cfg, int(getattr(teacher, "vocab", 0) or task.vocab_size))
    if tile:  # the teacher's unembedding is a step argument, not a constant baked into the program
        w_teacher = teacher.unembedding()
        loss = functools.partial(lm_distill_loss_tiled, name=cfg.objective.name, hparams=hparams, chunk_size=tile)
        step = state_lib.make_train_step(loss, mesh, state_lib.state_sharding(ts), schedule=setup_lib.schedule(cfg),
                                         extra_shardings=w_teacher.sharding)
        train_step = lambda ts, b: step(ts, b, w_teacher)  # noqa: E731
    else:
        train_step = setup_lib.make_step(functools.partial(lm_distill_loss, objective=objective, hparams=hparams),
                                      cfg, mesh, ts)
    loader = make_loader(task.data_source("train", setup_lib.data_dir(cfg)), int(cfg.batch_size), seed=int(cfg.seed))
    data = _DistillData(cfg, task, teacher, loader, mesh, tiled=bool(tile))
    codes = {"dataset": 0.0, "student": 1.0, "teacher": 2.0, "replay": 3.0}

    def step_fn(ts, raw):
        step = int(jax.device_get(ts.step))
        batch, which = data.batch(step, ts.model(), raw)
        ts, m = train_step(ts, batch)
        m = dict(m)
        m["data/source"] = codes[which]
        m["data/student_frac"] = data.counts["student"] / max(sum(data.counts.values()), 1)
        return ts, m

    eval_fn = make_lm_kl_eval(cfg, task, teacher, mesh)
    return driver.run_loop(cfg, workdir, state=ts, step_fn=step_fn, batches=data, eval_fn=eval_fn,
                           bar_keys=("loss", "kl"))


# ----------------------------------------------------------------------------------------------
# Classic KD for the digits classifier (Hinton et al. 2015)
# ----------------------------------------------------------------------------------------------

def classifier_kd_loss(model, batch, rng, *, objective, hparams, teacher_logits_key="teacher_logits"):
    """Objective on class logits viewed as one "position": [B, C] -> [B, 1, C]; labels for `kd`'s CE term."""
    logits = model(batch["image"], deterministic=True)
    s = logits[:, None, :]
    mask = jnp.ones(s.shape[:2], jnp.float32)
    kw = dict(hparams)
    if "teacher_logits" not in batch:  # plain cross-entropy (teacher training)
        loss = -jnp.mean(ops.token_logprobs(s, batch["label"][:, None]))
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return loss, {"accuracy": acc}
    if objectives.get("kd") is objective:
        kw["labels"] = batch["label"][:, None]
    loss, m = objective(s, batch[teacher_logits_key][:, None, :], mask, **kw)
    m = dict(m)
    m["accuracy"] = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    m["kl"] = m.get("distill/kl", jnp.zeros(()))
    return loss, m


def train_classifier(model_cfg, task, cfg, steps: int, seed: int, mesh, workdir: str | None = None):
    """Cross-entropy training of a digits classifier (the KD teacher); checkpointed in `workdir` if given,
    so a resumed KD run reuses the finished teacher."""
    from kljax.data import make_loader
    from kljax.train import setup as setup_lib
    ocfg = setup_lib.optim_config(cfg)
    ocfg.update(total_steps=int(steps), warmup_steps=min(int(ocfg.get("warmup_steps", 0)), int(steps) - 1))
    tx, sched = state_lib.optimizer_from_config(ocfg), state_lib.schedule_from_config(ocfg)
    ts = state_lib.create_train_state(lambda rngs: model_from_config(model_cfg, rngs), tx, mesh, rng=seed)
    loss = functools.partial(classifier_kd_loss, objective=None, hparams={})
    step_fn = state_lib.make_train_step(loss, mesh, state_lib.state_sharding(ts), schedule=sched)
    mgr = checkpoint.Manager(workdir, None, every=int(steps), keep=1, async_save=False) if workdir else None
    try:
        if mgr is not None:
            got = mgr.restore_latest(state_lib.abstract_state(ts))
            if got is not None and int(jax.device_get(got[0].step)) >= steps:
                return got[0].model()
        loader = make_loader(task.data_source("train", setup_lib.data_dir(cfg)), int(cfg.batch_size), seed=seed)
        for _ in range(int(steps)):
            b = next(loader)
            ts, _m = step_fn(ts, sharding.shard_batch({"image": b["image"], "label": b["label"]}, mesh))
        if mgr is not None:
            mgr.save(int(steps), ts, None, force=True)
    finally:
        if mgr is not None:
            mgr.close()
    return ts.model()


def run_classifier_kd(cfg, workdir: str):
    """Digits: train (or load) the teacher classifier, then distill it into the student `cfg.model`.

    `objective.name = "kd"` with `objective.alpha = 0` is the no-KD baseline (plain cross-entropy).
    Eval: test accuracy of student and teacher, exact KL(teacher‖student) and KL(student‖teacher).
    """
    from kljax.data import make_loader, read_all
    from kljax.train import driver, runs as runs_lib, setup as setup_lib
    objective = check_objective(cfg, "distill")
    hparams = objective_hparams(cfg)
    task = setup_lib.build_task(cfg)
    mesh = setup_lib.build_mesh(cfg)
    if cfg.distill.get("teacher_from", ""):
        runs_lib.check_run_exists(cfg.distill.teacher_from, "distill.teacher_from")
        teacher = load_model(cfg.distill.teacher_from, "distill.teacher_from",
                             model_key=cfg.distill.get("teacher_model_key", "model"))
    else:
        teacher = train_classifier(cfg.distill.teacher_model, task, cfg, int(cfg.distill.teacher_steps),
                                   int(cfg.seed) + 100, mesh, os.path.join(os.path.abspath(workdir), "teacher"))
    test = read_all(task.data_source("test", setup_lib.data_dir(cfg)))
    t_graph, t_state = nnx.split(teacher)
    t_fwd = jax.jit(lambda st, x: nnx.merge(t_graph, st)(x, deterministic=True))
    t_test = np.asarray(t_fwd(t_state, test["image"]))
    teacher_acc = float(np.mean(np.argmax(t_test, -1) == test["label"]))

    tx = state_lib.optimizer_from_config(setup_lib.optim_config(cfg))
    ts = state_lib.create_train_state(lambda rngs: model_from_config(cfg.model, rngs), tx, mesh, rng=int(cfg.seed))
    train_step = setup_lib.make_step(functools.partial(classifier_kd_loss, objective=objective, hparams=hparams),
                                  cfg, mesh, ts)
    loader = make_loader(task.data_source("train", setup_lib.data_dir(cfg)), int(cfg.batch_size), seed=int(cfg.seed))

    def add_teacher(b):
        b = {"image": b["image"], "label": b["label"]}
        b["teacher_logits"] = np.asarray(t_fwd(t_state, b["image"]))
        return b

    batches = setup_lib.ShardedIterator(loader, mesh, transform=add_teacher)

    def eval_fn(ts):
        s = np.asarray(ts.model()(test["image"], deterministic=True))
        kl = exact_kl_metrics(jnp.asarray(s)[:, None], jnp.asarray(t_test)[:, None], jnp.ones((len(s), 1)))
        return {"eval/accuracy": float(np.mean(np.argmax(s, -1) == test["label"])),
                "eval/teacher_accuracy": teacher_acc, "eval/fkl": float(kl["fkl"]), "eval/rkl": float(kl["rkl"])}

    return driver.run_loop(cfg, workdir, state=ts, step_fn=train_step, batches=batches, eval_fn=eval_fn,
                           bar_keys=("loss", "accuracy"))
