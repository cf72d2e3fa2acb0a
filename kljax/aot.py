"""Check a pod run before renting the pod: compile every jitted function of a loop for a TPU topology.

    python -m kljax.aot --config=experiments/<file>.py[:arg] --topology=v5e:8x8 [--config.field=value ...]

Runs on any machine (a laptop CPU is enough) with the `aot` extra (`pip install -e ".[aot]"`, which
brings the TPU compiler in `libtpu`). The run's mesh is built over the topology's devices
(`jax.experimental.topologies`), every function the configured loop jits is lowered with abstract,
sharded arguments (nothing is allocated) and compiled by the TPU compiler, and a table reports, per
device: argument, output, temporary and total bytes against the chip's HBM, and the FLOPs the
compiler counts. Exit status 0 when everything fits, 1 naming each function that does not and the
shortfall (with the mesh or batch change that would help), 2 for a config error.

Loops covered: `sft` (train step; evaluation sampler), `rl` (train step on one minibatch; roll-out
sampler, prefill + decode loop; old-policy and reference forward passes), `distill` on sequence
tasks (train step; teacher forward; student sampler).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Callable

# Per-chip HBM by the device kind the TPU compiler reports (public TPU system specs).
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v6 lite": 32.0}
GIB = 1024 ** 3


@dataclasses.dataclass
class Row:
    """One compiled function's per-device footprint."""
    name: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    out_of_memory: str = ""  # the TPU compiler's own out-of-memory message, when it refused the program

    @property
    def total_bytes(self) -> int:
        # Donated arguments (aliased to outputs) are counted once.
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def topology_devices(name: str) -> list:
    """The devices of a TPU topology, compiled for by libtpu on a machine without a TPU."""
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
    except Exception as e:  # libtpu missing or an unknown name: the message says which
        from kljax.config import ConfigError
        raise ConfigError(f"--topology={name!r}: could not describe it ({e}). Install the TPU compiler with "
                          "`pip install -e \".[aot]\"` and use a name like v5e:4x4 or v5p:2x2x2.") from None
    return list(desc.devices)


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def compile_row(name: str, lowered: Any) -> Row:
    """Compile a lowered function for the topology; read its memory and cost analyses."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit in HBM at all
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        found = re.search(r"required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", msg)
        need = float(found.group(1)) * GIB if found else 0.0
        return Row(name, 0, 0, int(need), 0, 0.0, out_of_memory=msg.splitlines()[0][:300])
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax returns one dict per program
        cost = cost[0] if cost else {}
    return Row(name, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
               int(mem.alias_size_in_bytes), float(cost.get("flops", 0.0)))


def _sds(shape, dtype, sharding):
    import jax
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _model_state(ts) -> Any:
    """The `nnx.State` the sampler takes, built from an abstract train state (leaves keep shardings)."""
    from flax import nnx
    return nnx.split(nnx.merge(ts.graphdef, ts.params, ts.model_state))[1]


def _lower_sampler(ts, mesh, rows: int, prompt_len: int, new_tokens: int, eos_id, pad_id: int, sample_kw: dict):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kljax import sampling
    from kljax.train import sharding as shd
    bs = shd.batch_sharding(mesh)
    graphdef = nnx.split(nnx.merge(ts.graphdef, ts.params, ts.model_state))[0]
    key = _sds((2,), jnp.uint32, shd.replicated(mesh))
    _, proc_def = jax.tree_util.tree_flatten(sampling._as_tree_partial(None))
    return sampling._generate_jit.lower(
        _model_state(ts), [], _sds((rows, prompt_len), jnp.int32, bs), _sds((rows, prompt_len), jnp.int32, bs), key,
        graphdef=sampling._Static(graphdef), proc_def=sampling._Static(proc_def), max_new_tokens=int(new_tokens),
        eos_id=None if eos_id is None else int(eos_id), pad_id=int(pad_id), **sample_kw)


def _lower_logp(ts, mesh, rows: int, seq_len: int, prompt_len: int, chunk_rows: int):
    import jax.numpy as jnp

    from kljax.train import rl
    from kljax.train import sharding as shd
    bs = shd.batch_sharding(mesh)
    return rl._logp_and_logits.lower(ts.graphdef, ts.params, ts.model_state, _sds((rows, seq_len), jnp.int32, bs),
                                     _sds((rows, seq_len), jnp.int32, bs), prompt_len, False,
                                     chunk_rows)


def _lower_step(loss_fn: Callable, cfg, mesh, ts, batch: dict, schedule_cfg=None):
    from kljax.train import setup as setup_lib
    from kljax.train import state as state_lib
    step = state_lib.make_train_step(loss_fn, mesh, state_lib.state_sharding(ts),
                                     schedule=setup_lib.schedule(schedule_cfg or cfg))
    return step.lower(ts, batch)


def _abstract_state(cfg, mesh, task):
    from kljax.models.transformer import TransformerLM
    from kljax.train import setup as setup_lib
    from kljax.train import sharding as shd
    from kljax.train import state as state_lib
    mc = setup_lib.model_config(cfg, task)
    tx = state_lib.optimizer_from_config(setup_lib.optim_config(cfg))
    return state_lib.abstract_train_state(lambda rngs: TransformerLM(mc, rngs=rngs), tx, mesh, shd.DEFAULT_RULES,
                                          int(cfg.seed))


def sft_functions(cfg, mesh, task) -> list[tuple[str, Any]]:
    import jax.numpy as jnp

    from kljax.train import evaluation as eval_lib, sft
    from kljax.train import sharding as shd
    ts = _abstract_state(cfg, mesh, task)
    bs, B, P, C = shd.batch_sharding(mesh), int(cfg.batch_size), task.prompt_len, task.completion_len
    batch = {"prompt": _sds((B, P), jnp.int32, bs), "prompt_valid": _sds((B, P), jnp.int32, bs),
             "target": _sds((B, C), jnp.int32, bs), "target_valid": _sds((B, C), jnp.int32, bs)}
    settings = eval_lib.eval_settings(cfg)
    eval_rows = int(cfg.get("eval", {}).get("batch_size", 128))
    return [("train_step", _lower_step(sft.sft_loss_fn(P), cfg, mesh, ts, batch)),
            ("eval_sampler (prefill+decode)",
             _lower_sampler(ts, mesh, eval_rows, P, C, task.eos_id, task.pad_id,
                            dict(temperature=float(settings.get("temperature", 0.0)), top_k=0, top_p=1.0)))]


def rl_functions(cfg, mesh, task) -> list[tuple[str, Any]]:
    import jax.numpy as jnp

    from kljax.train import rl
    from kljax.train import sharding as shd
    r = cfg.rl
    G, n_prompts, mb = int(r.group_size), int(r.prompts_per_step), int(r.minibatch_size)
    P = task.prompt_len
    N = int(r.get("max_new_tokens", 0) or task.completion_len)
    sched_cfg = cfg.copy_and_resolve_references()
    with sched_cfg.unlocked():
        if "total_steps" not in sched_cfg.optim:
            sched_cfg.optim.total_steps = int(cfg.total_steps) * rl.updates_per_step(cfg)
    ts = _abstract_state(sched_cfg, mesh, task)
    bs = shd.batch_sharding(mesh)
    batch = {"sequences": _sds((mb, P + N), jnp.int32, bs), "valid": _sds((mb, P + N), jnp.int32, bs),
             "mask": _sds((mb, N), jnp.float32, bs), "old_logp": _sds((mb, N), jnp.float32, bs),
             "ref_logp": _sds((mb, N), jnp.float32, bs), "rewards": _sds((mb,), jnp.float32, bs)}
    if r.get("advantage", "objective") == "gae":  # PPO with a critic: per-token advantages, critic targets
        batch.update({k: _sds((mb, N), jnp.float32, bs) for k in ("advantages", "old_values", "returns")})
    elif r.get("advantage", "objective") != "objective":
        batch["advantages"] = _sds((mb,), jnp.float32, bs)
    sample_kw = dict(temperature=float(r.get("temperature", 1.0)), top_k=int(r.get("top_k", 0)),
                     top_p=float(r.get("top_p", 1.0)))
    rows = n_prompts * G
    out = [("train_step (one minibatch)", _lower_step(rl.make_rl_loss(cfg, P, G), cfg, mesh, ts, batch, sched_cfg)),
           ("rollout_sampler (prefill+decode)", _lower_sampler(ts, mesh, rows, P, N, task.eos_id, task.pad_id,
                                                               sample_kw)),
           ("old_policy/reference forward", _lower_logp(ts, mesh, rows, P + N, P, mb))]
    if rl.critic_kind(cfg) == "separate":  # the second model's own update on the same minibatch
        ccfg = rl.critic_config(sched_cfg)
        out.append(("critic_step (one minibatch)", _lower_step(rl.make_critic_loss(cfg, P), ccfg, mesh,
                                                               _abstract_state(ccfg, mesh, task), batch)))
    return out


def distill_functions(cfg, mesh, task) -> list[tuple[str, Any]]:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kljax.train import distill, preflight, runs as runs_lib
    from kljax.train import sharding as shd
    if cfg.task.name == "digits":
        from kljax.config import ConfigError
        raise ConfigError("kljax.aot covers sequence distillation; the digits classifier loop is tiny.")
    objective = preflight.check_objective(cfg, "distill")
    ts = _abstract_state(cfg, mesh, task)
    bs, B = shd.batch_sharding(mesh), int(cfg.batch_size)
    P, C, V = task.prompt_len, task.completion_len, ts.params["embed"]["embedding"].shape[0] \
        if "embed" in ts.params else task.vocab_size
    T = P + C
    batch = {"tokens": _sds((B, T), jnp.int32, bs), "valid": _sds((B, T), jnp.int32, bs),
             "positions": _sds((B, T), jnp.int32, bs), "loss_mask": _sds((B, T), jnp.float32, bs),
             "teacher_logits": _sds((B, T, V), jnp.float32, bs)}
    loss = functools.partial(distill.lm_distill_loss, objective=objective, hparams=preflight.objective_hparams(cfg))
    out = [("train_step", _lower_step(loss, cfg, mesh, ts, batch))]
    teacher = ts  # the teacher's own architecture when its workdir is readable here
    spec = cfg.distill.get("teacher_from", "")
    if spec and spec != "source" and os.path.exists(os.path.join(spec, "config.json")):
        tcfg = runs_lib.read_config(spec)
        teacher = _abstract_state(tcfg, mesh, task)
    graphdef = nnx.split(nnx.merge(teacher.graphdef, teacher.params, teacher.model_state))[0]
    fwd = jax.jit(lambda st, t, p, v: nnx.merge(graphdef, st)(t, positions=p, valid=v))
    out.append(("teacher forward", fwd.lower(_model_state(teacher), batch["tokens"], batch["positions"],
                                             batch["valid"])))
    out.append(("student sampler (prefill+decode)",
                _lower_sampler(ts, mesh, B, P, C, task.eos_id, task.pad_id,
                               dict(temperature=float(cfg.distill.get("temperature", 1.0)), top_k=0, top_p=1.0))))
    return out


def reward_model_functions(cfg, mesh, task) -> list[tuple[str, Any]]:
    import jax.numpy as jnp

    from kljax.train import reward_model
    from kljax.train import sharding as shd
    ts = _abstract_state(cfg, mesh, task)
    bs, B, P, C = shd.batch_sharding(mesh), int(cfg.batch_size), task.prompt_len, task.completion_len
    batch = {"prompt": _sds((B, P), jnp.int32, bs), "prompt_valid": _sds((B, P), jnp.int32, bs)}
    batch.update({k: _sds((B, C), jnp.int32, bs) for k in reward_model.PAIR_FIELDS})
    center = float(cfg.get("reward_model", {}).get("center_coef", 0.0))
    return [("train_step (chosen + rejected rows)", _lower_step(reward_model.rm_loss_fn(center), cfg, mesh, ts, batch))]


LOOPS = {"sft": sft_functions, "rl": rl_functions, "distill": distill_functions,
         "reward_model": reward_model_functions}


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.2f} MiB"


def table(rows: list[Row], hbm_bytes: float, header: str) -> str:
    lines = [header, "", "| function | arguments | outputs | temporaries | total / device | of HBM | GFLOP / device |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.out_of_memory:
            lines.append(f"| {r.name} | — | — | — | {_fmt_bytes(r.total_bytes)} (compiler: out of memory) | "
                         f"{r.total_bytes / hbm_bytes:.0%} | — |")
            continue
        lines.append(f"| {r.name} | {_fmt_bytes(r.argument_bytes)} | {_fmt_bytes(r.output_bytes)} | "
                     f"{_fmt_bytes(r.temp_bytes)} | {_fmt_bytes(r.total_bytes)} | {r.total_bytes / hbm_bytes:.1%} | "
                     f"{r.flops / 1e9:,.1f} |")
    return "\n".join(lines)


def advice(cfg, mesh) -> str:
    fsdp = mesh.shape.get("fsdp", 1)
    return (f"shard parameters and optimizer state further (--config.mesh.fsdp={2 * fsdp} halves them per device) "
            "or lower the per-step batch (batch_size, rl.minibatch_size, rl.prompts_per_step, eval.batch_size).")


def check(cfg, topology: str, hbm_gib: float = 0.0) -> tuple[list[Row], str, int]:
    """Compile `cfg`'s loop for `topology`; return (rows, printed table, exit status)."""
    from kljax.config import ConfigError
    from kljax.train import setup as setup_lib
    from kljax.train import sharding as shd
    loop = cfg.get("loop", "")
    if loop not in LOOPS:
        raise ConfigError(f"config field `loop` = {loop!r}: kljax.aot covers {sorted(LOOPS)}.")
    devices = topology_devices(topology)
    try:
        mesh = shd.make_mesh(cfg.get("mesh", None) or {"data": -1}, devices)
    except shd.MeshError as e:
        raise ConfigError(f"{e} (topology {topology} has {len(devices)} chips)") from None
    task = setup_lib.build_task(cfg)
    kind = devices[0].device_kind
    hbm = (hbm_gib or HBM_GIB.get(kind, 0.0)) * GIB
    if not hbm:
        raise ConfigError(f"unknown per-chip memory for {kind!r}; pass --hbm_gib.")
    rows = [compile_row(name, lowered) for name, lowered in LOOPS[loop](cfg, mesh, task)]
    header = (f"kljax.aot: loop {loop}, topology {topology} ({len(devices)} × {kind}, {hbm / GIB:g} GiB HBM each), "
              f"mesh {dict(mesh.shape)}")
    text = table(rows, hbm, header)
    too_big = [r for r in rows if r.total_bytes > hbm or r.out_of_memory]
    status = 0
    for r in too_big:
        text += (f"\nDOES NOT FIT: {r.name} needs {_fmt_bytes(r.total_bytes)} per device, "
                 f"{_fmt_bytes(max(r.total_bytes - hbm, 0))} more than the {hbm / GIB:g} GiB of a {kind}; "
                 + advice(cfg, mesh) + (f"\n  (TPU compiler: {r.out_of_memory})" if r.out_of_memory else ""))
        status = 1
    return rows, text, status


def main(argv: list[str] | None = None) -> int:
    """`python -m kljax.aot --config=FILE[:arg] --topology=NAME [--hbm_gib=G] [--config.field=value ...]`."""
    import argparse

    from kljax import cli
    from kljax.config import ConfigError
    argv = list(sys.argv if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m kljax.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x2",
                   help="TPU topology name, e.g. v5e:4x4, v5e:8x8, v5p:2x2x2, v4:2x2x2, v6e:4x4")
    p.add_argument("--hbm_gib", type=float, default=0.0,
                   help="per-chip memory to check against, in GiB (0 = the chip's HBM from a built-in table)")
    p.add_argument("--config", required=True, help="experiment config path/to/file.py[:arg], as for kljax.main; "
                   "override fields with --config.<field>=<value>")
    if any(a in ("-h", "--help") for a in argv[1:]):
        p.print_help()
        return 0
    try:
        rest, plan = cli.preflight(argv, "")
    except cli.UsageError as e:
        return _error(str(e))
    args, unknown = p.parse_known_args(rest[1:] + [a for a in argv[1:] if a.startswith("--config=")])
    if unknown:
        return _error(f"unexpected arguments {unknown}; use --config=... --topology=... [--config.<field>=<value>]")
    try:
        _, text, status = check(plan.cfg, args.topology, args.hbm_gib)
    except ConfigError as e:
        return _error(str(e))
    print(text, flush=True)
    return status


def run() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs nothing; the TPU compiler is libtpu's
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes on this host may hold libtpu
    sys.exit(main())


if __name__ == "__main__":
    run()
