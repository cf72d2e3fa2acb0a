"""Command-line checks and listings of `python -m kljax.main` that run before anything is written.

* `preflight(argv)` (before absl parses the flags): `--help` (exit 0: usage, flags, every experiment
  with its args), a missing config file, an unknown experiment arg and an unknown
  `--config.<field>` are one-line errors with a did-you-mean (exit 2), never a traceback.
  `--config.objective.<hparam>=v` for a hyper-parameter the experiment does not set but the (possibly
  switched) objective takes is accepted and applied by `apply_overrides`.
* `apply_overrides(cfg, plan)` (after parsing): adds those hyper-parameters; when
  `--config.objective.name` switched the objective, drops the experiment's hyper-parameters the new
  objective does not take (printing a note naming each); ones given on the command line are kept
  (and then refused by validation if the objective does not take them).
* `dry_run(...)`: the resolved config (fields differing from the experiment's defaults marked `*`),
  the mesh and the parameter count; writes nothing.
* `print_fields(cfg)`: every field of the config with its value and a one-line description.

Exit statuses of `kljax.main` (`EXIT_*`): 0 done, 2 config/usage error, 74 I/O error (disk full,
unwritable path), 130 interrupted by SIGINT and 143 by SIGTERM after saving a checkpoint (rerun
the same command to resume), 1 anything else (a bug: traceback).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import glob
import inspect
import os
import re
import sys
from typing import Any

EXIT_CONFIG = 2
EXIT_IO = 74        # sysexits EX_IOERR
EXIT_SIGINT = 130   # 128 + SIGINT
EXIT_SIGTERM = 143  # 128 + SIGTERM

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(_REPO, "experiments")


class UsageError(Exception):
    """A command-line mistake; the message names it and the fix (exit status 2)."""


# ----------------------------------------------------------------------------------------------
# Experiments and their args (from the experiment files' docstrings)


def experiment_files() -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(EXPERIMENTS_DIR, "*.py")) if not p.endswith("__init__.py"))


def _docstring(path: str) -> str:
    try:
        with open(path) as f:
            return ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
        return ""


_ARG_LINE = re.compile(r"^ {2}([a-z_][a-z0-9_]*|,[a-z_]+|<\w+>:?)\s+(\S.*)$")


def experiment_args(path: str) -> list[tuple[str, str]]:
    """[(arg, one-line description)] listed in an experiment file's docstring."""
    out, seen = [], set()
    for line in _docstring(path).splitlines():
        m = _ARG_LINE.match(line)
        if m and not m.group(2).startswith("python -m") and m.group(1) not in seen:
            seen.add(m.group(1))
            out.append((m.group(1).lstrip(",").rstrip(":"), m.group(2).strip()))
        elif line.startswith("<") and ">:" in line:  # "<objective>: any registered ..." style
            name, _, desc = line.partition(":")
            out.append((name, desc.strip()))
        elif line.startswith("Args:") and not line[5:].strip().startswith("("):  # "Args: `smoke` shrinks ..."
            m = re.match(r"Args:\s*`(\w+)`\s*(.*)", line)
            if m:
                out.append((m.group(1), m.group(2).strip()))
    if not out:  # no Args section: the args of the docstring's example commands
        for arg in dict.fromkeys(re.findall(r"--config=\S+?\.py:([\w,]+)", _docstring(path))):
            out.append((arg, f"as in the docstring's command (python -m kljax.main --config={os.path.basename(path)}:"
                             f"{arg} ...)"))
    return out


def experiments_help() -> str:
    lines = ["Experiments (--config=experiments/<file>.py:<arg>[,<arg>...]):"]
    for path in experiment_files():
        doc = _docstring(path)
        rel = os.path.relpath(path, os.getcwd()) if path.startswith(os.getcwd()) else path
        lines.append(f"  {rel}: {doc.splitlines()[0] if doc else ''}")
        for arg, desc in experiment_args(path):
            lines.append(f"      {arg:<16} {desc}")
    return "\n".join(lines)


def _flag_help() -> str:
    from absl import flags
    names = ("config", "workdir", "host_devices", "dry_run", "print_fields")
    lines = ["Flags:"]
    for n in names:
        if n in flags.FLAGS:
            lines.append(f"  --{n}: {flags.FLAGS[n].help}")
    lines.append("  --config.<field>=<value>: override one config field (see --print_fields for all of them).")
    lines.append("  --helpfull: every absl/JAX flag.")
    return "\n".join(lines)


def print_help(doc: str) -> None:
    print(doc.strip() + "\n")
    print(_flag_help() + "\n")
    print("Exit status: 0 done; 2 config or usage error (nothing written); 74 I/O error (e.g. disk full); "
          "130/143 interrupted by SIGINT/SIGTERM after saving a checkpoint (rerun to resume); 1 a bug.\n")
    print(experiments_help())


# ----------------------------------------------------------------------------------------------
# argv checks before absl parses it


@dataclasses.dataclass
class Plan:
    """What `preflight` made of argv: the config spec, the resolved config (overrides applied), the
    fields set on the command line, the notes printed, and the experiment's default config."""
    spec: str
    cfg: Any
    overridden: list[str]
    notes: list[str]
    defaults: Any = None


def _split_flags(argv: list[str]) -> list[tuple[int, str, str | None, int]]:
    """[(index, name, value or None, how many argv items)] for every `--name[=value]` in argv."""
    out = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            break
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if eq:
                out.append((i, name, value, 1))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-") and (name == "config" or
                                                                             name.startswith("config.")):
                out.append((i, name, argv[i + 1], 2))
                i += 1
            else:
                out.append((i, name, None, 1))
        i += 1
    return out


def _fields(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict, sub-configs included."""
    import ml_collections
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        out.append(path)
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.extend(_fields(v, path + "."))
    return out


def _lookup(cfg: Any, path: str):
    import ml_collections
    node = cfg
    for part in path.split("."):
        if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _did_you_mean(word: str, candidates, n: int = 1) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _field_hint(field: str, fields: list[str]) -> str:
    """Did-you-mean for a dotted field: the closest full path, else fields whose last part is close."""
    hint = _did_you_mean(field, fields)
    if hint:
        return hint
    leaf = field.rpartition(".")[2]
    by_leaf: dict[str, list[str]] = {}
    for f in fields:
        by_leaf.setdefault(f.rpartition(".")[2], []).append(f)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.75)
    cands = [f for c in close for f in by_leaf[c]][:3]
    return f" Did you mean {' or '.join(repr(c) for c in cands)}?" if cands else ""


def load_experiment(spec: str):
    """`get_config(arg)` of "path.py[:arg]" with mistakes as `UsageError` (did-you-mean for files and args)."""
    from kljax.train import common
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        names = [os.path.relpath(p) for p in experiment_files()]
        by_base = {os.path.basename(n): n for n in names}
        close = difflib.get_close_matches(os.path.basename(path), list(by_base), n=1, cutoff=0.75)
        hint = f" Did you mean {by_base[close[0]]!r}?" if close else ""
        raise UsageError(f"config file {path!r} (from --config={spec}) does not exist.{hint} "
                         f"Experiments: {', '.join(names)}.")
    try:
        return common.load_config_file(spec)
    except Exception as e:  # an experiment's own arg check (ValueError) or a broken file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        valid = {a for a, _ in experiment_args(path)} | set(re.findall(r"'([a-z_][a-z0-9_]*)'", msg))
        hints = []
        for part in arg.split(","):
            close = difflib.get_close_matches(part, sorted(valid), n=1, cutoff=0.6) if part not in valid else []
            if close:
                hints.append(f"{close[0]!r} for {part!r}")
        hint = f" Did you mean {', '.join(hints)}?" if hints else ""
        raise UsageError(f"--config={spec}: {type(e).__name__}: {msg}.{hint} "
                         f"(python -m kljax.main --help lists each experiment's args)") from None


def parse_value(raw: str, current: Any, field: str) -> Any:
    """`raw` (a command-line string) as the type of the field's current value."""
    import ml_collections
    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(f"--config.{field}={raw}: `{field}` is a group of fields; set one of "
                         f"{', '.join(f'{field}.{k}' for k in current.keys())}.")
    try:
        if isinstance(current, bool):
            low = raw.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        if isinstance(current, (tuple, list)):
            v = ast.literal_eval(raw)
            return tuple(v) if isinstance(v, (tuple, list)) else (v,)
    except (ValueError, SyntaxError) as e:
        raise UsageError(f"--config.{field}={raw}: {e} (the field holds {type(current).__name__} "
                         f"{current!r}).") from None
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _set(cfg: Any, field: str, value: Any) -> None:
    parent, _, leaf = field.rpartition(".")
    node = _lookup(cfg, parent)[1] if parent else cfg
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise UsageError(f"--config.{field}={value!r}: {e}") from None


def preflight(argv: list[str], default_spec: str) -> tuple[list[str], Plan | None]:
    """Check argv and resolve the config before absl parses the other flags.

    Returns (argv without the `--config*` flags, plan), or (argv, None) for `--help`.
    Raises `UsageError` (one line naming the mistake and the fix) for a missing file, an unknown
    experiment arg or field, or a value of the wrong type.
    """
    if any(a in ("--help", "-h", "-help", "--helpshort") for a in argv[1:]):
        return argv, None
    from kljax import objectives
    flags_ = _split_flags(argv)
    spec = next((v for _, n, v, _ in flags_ if n == "config" and v is not None), default_spec)
    defaults = load_experiment(spec)
    cfg = load_experiment(spec)
    fields = _fields(cfg)
    overridden, added, drop = [], {}, set()
    for i, n, v, k in flags_:
        if n != "config" and not n.startswith("config."):
            continue
        drop.update(range(i, i + k))
        if n == "config":
            continue
        field = n[len("config."):]
        if v is None:
            raise UsageError(f"--config.{field} needs a value: --config.{field}=<value>.")
        ok, current = _lookup(cfg, field)
        if ok:
            _set(cfg, field, parse_value(v, current, field))
            overridden.append(field)
            continue
        parent, _, leaf = field.rpartition(".")
        pok, block = _lookup(cfg, parent) if parent else (False, None)
        if pok and (parent == "objective" or parent.endswith(".objective")) and "name" in block:
            added[field] = v  # applied once every objective.name override is in
            continue
        raise UsageError(f"--config.{field}: no such config field in {spec}.{_field_hint(field, fields)} "
                         f"(python -m kljax.main --config={spec} --print_fields lists every field)")
    notes: list[str] = []
    with cfg.unlocked():
        for field, raw in added.items():
            parent, _, leaf = field.rpartition(".")
            block = _lookup(cfg, parent)[1]
            name = block.name
            params = inspect.signature(objectives.get(name)).parameters if name in objectives.names() else {}
            valid = [p for p, q in params.items() if q.default is not inspect.Parameter.empty]
            if leaf not in valid:
                raise UsageError(f"--config.{field}: objective {name!r} has no hyper-parameter {leaf!r}."
                                 f"{_did_you_mean(leaf, valid)} Its hyper-parameters: {', '.join(valid)}.")
            block[leaf] = parse_value(raw, params[leaf].default, field)
            overridden.append(field)
        for field in list(overridden):
            if not field.endswith("objective.name"):
                continue
            parent = field[:-len(".name")]
            block, old_block = _lookup(cfg, parent)[1], _lookup(defaults, parent)[1]
            if block.name not in objectives.names() or old_block.get("name", None) == block.name:
                continue
            params = inspect.signature(objectives.get(block.name)).parameters
            for k in list(block.keys()):
                if k == "name" or k in params or f"{parent}.{k}" in overridden:
                    continue
                notes.append(f"note: --config.{field}={block.name}: dropped {parent}.{k}={block[k]!r} "
                             f"(a hyper-parameter of {old_block.get('name')!r}, not of {block.name!r}).")
                del block[k]
    return [a for j, a in enumerate(argv) if j not in drop], Plan(spec=spec, cfg=cfg, overridden=overridden,
                                                                   notes=notes, defaults=defaults)


# ----------------------------------------------------------------------------------------------
# --dry_run and --print_fields


def _flat(cfg: Any) -> dict[str, Any]:
    from kljax.config import _flatten, to_jsonable
    return _flatten(to_jsonable(cfg))


def param_count(cfg: Any) -> int:
    """Number of trainable parameters of `cfg.model` (abstract: nothing is allocated)."""
    import jax
    from flax import nnx
    from kljax.train import setup as setup_lib
    if cfg.get("loop", "") == "distill" and "num_classes" in cfg.model:
        from kljax.train.runs import model_from_config
        build = lambda: model_from_config(cfg.model, nnx.Rngs(0))  # noqa: E731
    else:
        mc = setup_lib.model_config(cfg)
        from kljax.models import TransformerLM
        build = lambda: TransformerLM(mc, rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(build)
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def dry_run(cfg: Any, plan: Plan, workdir: str | None) -> None:
    """Print the resolved config (fields differing from the experiment's defaults marked `*`), the
    mesh and the parameter count. Writes nothing."""
    import jax
    from kljax.train import setup as setup_lib
    now, base = _flat(cfg), _flat(plan.defaults) if plan.defaults is not None else {}
    print(f"config {plan.spec} (validated; * = differs from the experiment's default):")
    for k in sorted(now):
        mark = "*" if base.get(k, "<absent>") != now[k] else " "
        extra = f"   (default {base[k]!r})" if mark == "*" and k in base else ""
        print(f" {mark} {k} = {now[k]!r}{extra}")
    for k in sorted(set(base) - set(now)):
        print(f" * {k} removed   (default {base[k]!r})")
    stages = [("", cfg)]
    if cfg.get("loop", "") == "pipeline":
        from kljax.train import pipeline
        stages = [(name, s) for name, s, _ in pipeline.stage_configs(cfg, workdir or "<workdir>")]
    for name, s in stages:
        label = f"stage {name}: " if name else ""
        mesh = setup_lib.build_mesh(s)
        print(f"{label}mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
              f"{param_count(s):,} parameters")
    print(f"workdir: {workdir or '(none given)'} — nothing was written (dry run).")


FIELD_DOCS: dict[str, str] = {
    "loop": "training loop: sft | rl | distill | qsharp | preference | pipeline",
    "seed": "seed of the parameters, data order and sampling",
    "task": "the task (dataset + reward); task.name picks it, the other fields are its parameters",
    "task.name": "registered task name (star_graph, arithmetic, synthetic_lm, digits, files, ...)",
    "task.data_dir": "where the task's generated/tokenized data is cached ('' = $KLJAX_DATA_DIR or ~/.cache/kljax/data)",
    "task.module": "user module(s) imported before the task is built (pkg.module or path/file.py; they call "
                   "kljax.tasks.register)",
    "task.reward": "files task: reward terms '[w*]file.py:fn, [w*]pkg.module:fn, math_answer, format, length_penalty' "
                   "(TRL's fn(prompts, completions, **columns) contract)",
    "model": "decoder-only transformer (kljax.models.lm_config) or classifier",
    "model.vocab_size": "vocabulary size; 0 = the task's",
    "model.max_len": "longest sequence; 0 = task prompt + completion length",
    "model.width": "residual width (d_model)",
    "model.depth": "number of transformer blocks",
    "model.num_heads": "attention heads",
    "model.num_kv_heads": "key/value heads (grouped-query attention); None = num_heads",
    "model.head_dim": "per-head width; None = width / num_heads",
    "model.mlp_dim": "MLP hidden width; None = 4 × width",
    "model.rope_theta": "RoPE base frequency",
    "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "share input embedding and output projection",
    "model.qkv_bias": "bias on the q/k/v projections (Qwen2 style)",
    "model.dtype": "compute dtype",
    "model.param_dtype": "parameter dtype",
    "model.hf_path": "local Hugging Face folder (config.json, *.safetensors, tokenizer files): the model's architecture, "
                     "weights and tokenizer; then only dtype, param_dtype, value_head, num_atoms, max_len apply",
    "model.value_head": "'none' | 'token' (per-next-token critic, Q♯) | 'scalar'",
    "model.num_atoms": "critic outputs per token (histogram atoms; 1 = Bernoulli)",
    "model.value_init_std": "init std of the value head; None = init_std",
    "model.init_std": "init std of the weights",
    "mesh": "device mesh axis sizes; -1 = the remaining devices",
    "mesh.data": "data-parallel axis size",
    "mesh.fsdp": "fully-sharded data-parallel axis size (parameters sharded)",
    "mesh.tensor": "tensor-parallel axis size",
    "optim": "optimizer (optax) and learning-rate schedule",
    "optim.name": "adamw | adam | sgd | ...",
    "optim.learning_rate": "peak learning rate",
    "optim.warmup_steps": "linear warm-up steps",
    "optim.schedule": "constant | cosine | linear (after warm-up)",
    "optim.weight_decay": "decoupled weight decay",
    "optim.grad_clip": "global gradient-norm clip (0 = off)",
    "optim.b1": "Adam β1",
    "optim.b2": "Adam β2",
    "optim.end_lr_ratio": "final learning rate / peak (cosine, linear)",
    "optim.total_steps": "schedule length; default: total_steps (RL: roll-outs × updates per roll-out)",
    "total_steps": "training steps (RL: roll-outs); may be raised when resuming",
    "batch_size": "GLOBAL batch (a multiple of the data-parallel size)",
    "log_every": "write metrics every N steps (metrics.jsonl, TensorBoard)",
    "eval_every": "evaluate every N steps (0 = only at the end)",
    "checkpoint": "orbax checkpoints in workdir/checkpoints",
    "checkpoint.every": "save every N steps (and at the end, and on SIGTERM/SIGINT)",
    "checkpoint.keep": "keep the last N checkpoints (plus the best one)",
    "checkpoint.best_metric": "keep the best checkpoint by this eval metric ('' = off)",
    "checkpoint.best_mode": "max | min for best_metric",
    "checkpoint.async_save": "write checkpoints in the background",
    "eval": "generation evaluation on the test split",
    "eval.num_examples": "test examples (0 = all)",
    "eval.batch_size": "evaluation batch (a multiple of the data-parallel size)",
    "eval.temperature": "sampling temperature (0 = greedy)",
    "eval.pass_k": "also report pass@k with k samples (0 = off)",
    "eval.pass_k_temperature": "temperature of the pass@k samples",
    "eval.max_new_tokens": "tokens to generate (0 = task completion length)",
    "init_from": "workdir of a finished run whose latest checkpoint initializes the model (RL: also the reference)",
    "objective": "the loss: objective.name (kljax.objectives.names()) and its keyword hyper-parameters",
    "objective.name": "registered objective; switching it drops the old objective's hyper-parameters",
    "rl": "policy-gradient RL with verifiable rewards (kljax/train/rl.py)",
    "rl.group_size": "completions sampled per prompt",
    "rl.prompts_per_step": "prompts per roll-out",
    "rl.updates_per_rollout": "epochs of minibatch updates per roll-out",
    "rl.minibatch_size": "rows per update (whole groups)",
    "rl.temperature": "sampling temperature of roll-outs",
    "rl.top_k": "top-k sampling (0 = off)",
    "rl.top_p": "nucleus sampling (1 = off)",
    "rl.max_new_tokens": "completion length (0 = task's)",
    "rl.advantage": "objective | group_mean_std | group_mean | leave_one_out | batch | gae (PPO with a critic)",
    "rl.critic": "gae: shared (value head on the policy's trunk, model.value_head='scalar') | separate (a second "
                 "model with its own optimizer; model.value_head='none')",
    "rl.critic_lr": "gae with rl.critic='separate': the critic's learning rate (None = optim.learning_rate)",
    "rl.reference": "fixed (init_from) | reset (to the policy every reset_every roll-outs)",
    "rl.reset_every": "roll-outs between reference resets",
    "rl.dynamic_sampling": "DAPO: drop groups with equal rewards and resample",
    "rl.max_sampling_rounds": "DAPO: most sampling rounds per roll-out",
    "rl.teacher_from": "workdir of a teacher run (KDRL)",
    "rl.reference_sharding": "the reference's parameter layout: fsdp (the policy's) | tensor (tensor-parallel over fsdp × tensor devices, embed replicated)",
    "rl.teacher_sharding": "the teacher's parameter layout: fsdp | tensor (as rl.reference_sharding)",
    "rl.vocab_tile": "update log-probs/entropy by vocabulary tiles from hidden states: tile size, 0 = dense logits, -1 = auto (8192 when V >= 32768 and the objective needs no full logits)",
    "distill": "knowledge distillation (kljax/train/distill.py)",
    "distill.teacher_from": "teacher workdir, or 'source' (synthetic_lm's exact distribution)",
    "distill.teacher_hf_path": "instead of teacher_from: a Hugging Face teacher folder sharing the student's tokenizer",
    "distill.vocab_tile": "distillation loss by vocabulary tiles from hidden states (fkl, rkl, jsd, skl, srkl, tvd; a teacher model): tile size, 0 = dense logits, -1 = auto (8192 when V >= 32768)",
    "distill.teacher_sharding": "the teacher's parameter layout: fsdp (the student's) | tensor (tensor-parallel over fsdp × tensor devices, embed replicated)",
    "distill.teacher_smoothing": "mix of the uniform distribution into the 'source' teacher",
    "distill.data": "dataset | student (GKD) | onpolicy | teacher (sequence KD) | adaptive (DistiLLM)",
    "distill.lam": "GKD: probability of student-generated data",
    "distill.phi": "DistiLLM: probability of student data",
    "distill.replay_size": "DistiLLM replay buffer size",
    "distill.replay_ratio": "DistiLLM replay schedule",
    "distill.temperature": "sampling temperature of generated data",
    "distill.teacher_model": "digits: the teacher classifier config",
    "distill.teacher_steps": "digits: teacher training steps",
    "qsharp": "Q♯ critic training and guided evaluation (kljax/train/qsharp.py)",
    "qsharp.rounds": "Q♯ rounds (roll-outs with the current guided policy, then critic fitting)",
    "qsharp.critic_steps": "critic steps per round",
    "qsharp.rollouts_per_round": "roll-outs collected per round",
    "qsharp.etas": "guidance strengths η evaluated",
    "qsharp.rollin_eta": "η of the roll-in policy",
    "qsharp.guidances": "qsharp and/or cd guidance evaluated",
    "qsharp.top_k": "guide only π_ref's top-k next tokens (0 = all)",
    "qsharp.top_k_rest": "tokens outside the top-k: mask (−inf, never sampled; Q♯ star-graph code) | reference "
                         "(their unguided reference logits; Q♯ math code)",
    "preference": "offline preference optimization (kljax/train/preference.py)",
    "preference.num_pairs": "preference pairs collected",
    "preference.max_tries": "samples tried per prompt to find a rejected completion",
    "experiment": "pipeline: experiment file whose args are the stages",
    "stages": "pipeline: 'name=arg[<from]' stages run in workdir/name",
    "title": "pipeline: results table title",
}


def field_doc(field: str, cfg: Any = None) -> str:
    if field in FIELD_DOCS:
        return FIELD_DOCS[field]
    parent, _, leaf = field.rpartition(".")
    if cfg is not None and (parent == "objective" or parent.endswith(".objective")):
        from kljax import objectives
        _, block = _lookup(cfg, parent)
        if block is not None and block.get("name", None) in objectives.names():
            p = inspect.signature(objectives.get(block.name)).parameters.get(leaf)
            if p is not None:
                return f"hyper-parameter of {block.name!r} (its default: {p.default!r}; see its docstring)"
    if parent.startswith("task"):
        return "task parameter (see the task's docstring in kljax/tasks)"
    return ""


def print_fields(cfg: Any, spec: str) -> None:
    """Every field of `cfg` with its value and description."""
    import ml_collections
    print(f"config fields of {spec} (override with --config.<field>=<value>):")
    for f in _fields(cfg):
        _, v = _lookup(cfg, f)
        value = "" if isinstance(v, ml_collections.ConfigDict) else f" = {v!r}"
        doc = field_doc(f, cfg)
        print(f"  {f}{value}" + (f"   # {doc}" if doc else ""))


def fail(msg: str, status: int = EXIT_CONFIG) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(status)
