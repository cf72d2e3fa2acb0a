"""A pipeline of runs: each stage is an experiment config run in `workdir/<stage>`, later stages
starting from (and regularized toward) an earlier stage; ends with a markdown results table.

Config (`loop="pipeline"`):
    experiment  path of the experiment file whose `get_config(arg)` gives each stage's config
    stages      tuple of "name=arg" or "name=arg<from" ("name=other_file.py:arg" takes the stage from
                another experiment file next to `experiment`): run `get_config(arg)` (",smoke" appended
                when `smoke`) in `workdir/name`; unless `from` is empty ("name=arg<"), the stage's empty
                `init_from` and teacher/reference fields (`rl.teacher_from` stays empty unless the
                stage asks: a field set to "@" means "the `from` stage") point at `workdir/<from>`
                (default: the first stage). Add a stage (e.g. Q♯) with one more string.
    smoke       bool, run every stage's smoke variant
    title       heading of the results table

Finished stages (their `eval.json` exists) are not rerun; an interrupted stage resumes from its
checkpoint. The table (also `workdir/results.md`) lists each stage's final evaluation.
"""
from __future__ import annotations

import os
import time
from typing import Any

from kljax.config import ConfigError, require
from kljax.train import common, driver

COLUMNS = (("eval/accuracy", "accuracy"), ("eval/reward", "reward"),
           ("eval/kl", "KL to reference (nats/token)"), ("eval/entropy", "entropy (nats/token)"))
# What `eval/accuracy` measures, per task (the table's accuracy column is named after it).
ACCURACY_NAMES = {"star_graph": "path accuracy (whole-path exact match)",
                  "arithmetic": "exact-match accuracy (whole answer)"}
TEACHER_FIELDS = ("rl.teacher_from", "distill.teacher_from", "qsharp.reference_from", "qsharp.init_from")


def parse_stage(spec: str, first: str | None) -> tuple[str, str, str | None]:
    """"name=arg[<from]" -> (name, arg, from); `from` defaults to the first stage (None for it)."""
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise ConfigError(f"config field `stages` entry {spec!r}: write 'name=arg' or 'name=arg<from'.")
    arg, lt, src = rest.partition("<")
    if not lt:
        src = first if first != name else None
    return name, arg, (src or None)


def stage_configs(cfg: Any, workdir: str) -> list[tuple[str, Any, str | None]]:
    """[(name, stage config with paths resolved, from-name)] in order."""
    stages = require(cfg, "stages", lambda v: len(v) >= 1, "list at least one 'name=arg' stage.")
    first = parse_stage(stages[0], None)[0]
    out, seen = [], []
    for spec in stages:
        name, arg, src = parse_stage(spec, first)
        if src is not None and src not in seen:
            raise ConfigError(f"config field `stages` entry {spec!r} starts from {src!r}, which is not an earlier "
                              f"stage ({seen}).")
        exp = cfg.experiment
        if ".py:" in arg:  # a stage from another experiment file, e.g. "qsharp=star_graph_qsharp.py:qsharp"
            exp, _, arg = arg.partition(".py:")
            exp = exp + ".py"
            if not os.path.isabs(exp):
                exp = os.path.join(os.path.dirname(cfg.experiment), exp)
        if cfg.get("smoke", False):
            arg = arg + ",smoke"
        scfg = common.load_config_file(f"{exp}:{arg}")
        with scfg.unlocked():
            if src is not None:
                path = os.path.join(workdir, src)
                if scfg.get("loop") != "sft" and "init_from" in scfg and not scfg.init_from:
                    scfg.init_from = path
                for field in TEACHER_FIELDS:
                    sec, _, key = field.partition(".")
                    if sec in scfg and key in scfg[sec] and scfg[sec][key] == "@":
                        scfg[sec][key] = path
        out.append((name, scfg, src))
        seen.append(name)
    return out


def validate(cfg: Any, check_paths: bool = True) -> None:
    """Validate every stage's config (paths of earlier stages are not checked: they are made here)."""
    del check_paths
    require(cfg, "experiment", lambda v: isinstance(v, str) and os.path.exists(v),
            "give the path of an experiment config file.")
    for name, scfg, _ in stage_configs(cfg, "/nonexistent"):
        try:
            common.validate(scfg, check_paths=False)
        except ConfigError as e:
            raise ConfigError(f"pipeline stage {name!r}: {e}") from None


def _fmt(v: Any) -> str:
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def accuracy_name(task_name: str) -> str:
    """What a task's `eval/accuracy` measures (the accuracy column's header)."""
    return ACCURACY_NAMES.get(task_name, "exact-match accuracy")


def decoding(scfg: Any) -> str:
    """How a stage's evaluation samples: greedy, sampled at T, or guided (Q♯/CD at η, top-k)."""
    if scfg.get("loop", "") == "qsharp" and "qsharp" in scfg:
        q = scfg.qsharp
        eta = float(q.get("report_eta", q.get("rollin_eta", 0.1)))
        g = tuple(q.get("guidances", ("qsharp", "cd")))[0]
        tk = int(q.get("top_k", 0) or 0)
        return (f"{ {'qsharp': 'Q♯', 'cd': 'CD'}.get(g, g)}-guided η={eta:g}, sampled T={float(q.get('temperature', 1.0)):g}"
                + (f", top-k {tk}" if tk else ""))
    t = float(scfg.eval.get("temperature", 0.0)) if "eval" in scfg else 0.0
    return "greedy" if t == 0 else f"sampled T={t:g}"


def results_table(cfg: Any, workdir: str, rows: list[tuple[str, str, dict, float]],
                  stage_cfgs: list[Any] | None = None) -> str:
    """Markdown table of each stage's final evaluation; with `stage_cfgs` (one per row) the accuracy
    column is named after what the task measures and a column says how each row decoded."""
    acc = accuracy_name(stage_cfgs[0].task.get("name", "")) if stage_cfgs else "accuracy"
    cols = [acc if k == "eval/accuracy" else label for k, label in COLUMNS]
    head = ["stage", "method", *(["decoding"] if stage_cfgs else []), *cols, "steps", "wall (s)"]
    lines = [f"## {cfg.get('title', 'Results')}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    for i, (name, method, ev, wall) in enumerate(rows):
        dec = [decoding(stage_cfgs[i])] if stage_cfgs else []
        cells = [name, method, *dec, *(_fmt(ev.get(k)) for k, _ in COLUMNS), _fmt(ev.get("step")), f"{wall:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0][2].get("eval/num_examples") if rows else None
    lines += ["", f"Test examples per row: {n}. KL: exact KL(π‖π_ref) over the vocabulary on generated tokens "
              "(π_ref = the stage the run started from)."]
    return "\n".join(lines) + "\n"


def _method(scfg: Any) -> str:
    if scfg.loop == "sft":
        return "SFT (next-token CE)"
    if "objective" in scfg:
        extra = ""
        if "rl" in scfg and scfg.rl.get("reference", "fixed") == "reset":
            extra = f", reference reset every {scfg.rl.reset_every}"
        beta = scfg.objective.get("beta", None)
        return f"{scfg.loop}: {scfg.objective.name}" + (f" (β={beta}{extra})" if beta is not None else extra)
    return str(scfg.loop)


def run(cfg: Any, workdir: str) -> dict:
    """Run the stages in order (skipping finished ones), print and write `workdir/results.md`."""
    os.makedirs(workdir, exist_ok=True)
    from kljax.train import checkpoint
    checkpoint.check_or_write_config(workdir, cfg)
    rows, scfgs = [], []
    for name, scfg, _ in stage_configs(cfg, workdir):
        sdir = os.path.join(workdir, name)
        t0 = time.time()
        if os.path.exists(os.path.join(sdir, driver.EVAL_FILE)):
            ev = driver.read_eval(sdir)
            print(f"[pipeline] stage {name}: already finished ({sdir}/eval.json)", flush=True)
        else:
            print(f"[pipeline] stage {name}: {_method(scfg)} -> {sdir}", flush=True)
            common.validate(scfg)
            ev = common.loop_module(scfg).run(scfg, sdir)
        rows.append((name, _method(scfg), ev, float(ev.get("wall_s", time.time() - t0))))
        scfgs.append(scfg)
    table = results_table(cfg, workdir, rows, scfgs)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print("\n" + table, flush=True)
    return {name: ev for name, _, ev, _ in rows}
