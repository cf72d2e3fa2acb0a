"""Device mesh from a config, logical-axis rules, batch sharding across processes, jitted steps.

One mesh with the named axes ("data", "fsdp", "tensor"). Parameters carry *logical* axis names
(`nnx.with_partitioning(init, ("embed", "mlp"))`); `rules` map each logical name to mesh axes, as in
MaxText's `logical_axis_rules`. The batch dimension is split over ("data", "fsdp"): fsdp is data
parallelism whose parameters are also sharded. Train steps are `jax.jit` with explicit in/out
shardings and the state donated (no `pmap`).

Multi-process: every process runs the same program; `initialize_distributed_from_env()` joins the
cluster that `launch/local_multiprocess.py` (or a pod launcher) describes through environment variables.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or tuple of axes, or None = replicated). First match wins; a mesh
# axis already used by an earlier dimension of the same array is skipped (an axis may shard only one
# dimension). Parameters are FSDP-sharded on "embed" and tensor-parallel on "mlp"/"heads"/"vocab".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
)

# A model's parameters may be laid out differently from the policy's on the same mesh (a bigger
# teacher or reference): "tensor" is Megatron-style tensor parallelism over every model-parallel
# device (fsdp × tensor), with the embedding dimension replicated, so the model's matmuls are split
# by their output features instead of gathering FSDP shards of the weights at each layer.
TENSOR_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", None),
    ("mlp", ("fsdp", "tensor")),
    ("heads", ("fsdp", "tensor")),
    ("kv", None),
    ("vocab", ("fsdp", "tensor")),
    ("length", None),
)
PARAM_LAYOUTS = {"fsdp": DEFAULT_RULES, "tensor": TENSOR_PARALLEL_RULES}


def layout_rules(cfg: Any, field: str) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules of the parameter layout named by config field `field` (default "fsdp")."""
    from kljax.config import require
    name = require(cfg, field, lambda v: v in PARAM_LAYOUTS, f"use one of {sorted(PARAM_LAYOUTS)}.", default="fsdp")
    return PARAM_LAYOUTS[name]


# Environment variables set by launch/local_multiprocess.py (and usable by any pod launcher).
ENV_COORDINATOR = "KLJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KLJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KLJAX_PROCESS_ID"


class MeshError(ValueError):
    """The mesh config does not fit the devices; the message names the `mesh.*` field and the fix."""


def _mesh_sizes(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
    sizes = []
    for name in MESH_AXES:
        value = mesh_cfg.get(name, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, name, 1)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (value < 1 and value != -1):
            raise MeshError(f"config field `mesh.{name}` = {value!r} is invalid: use a positive int or -1 (= the rest).")
        sizes.append(int(value))
    unknown = sorted(set(mesh_cfg.keys()) - set(MESH_AXES)) if hasattr(mesh_cfg, "keys") else []
    if unknown:
        raise MeshError(f"unknown mesh field(s) {['mesh.' + u for u in unknown]}; valid axes are {list(MESH_AXES)}.")
    rest = [i for i, s in enumerate(sizes) if s == -1]
    if len(rest) > 1:
        raise MeshError(f"config fields {['mesh.' + MESH_AXES[i] for i in rest]} are all -1: at most one axis may be -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if rest:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices, so `mesh.{MESH_AXES[rest[0]]}` = -1 has no integer size. Choose sizes whose "
                f"product divides {num_devices}.")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {fixed} devices but {num_devices} are available: set one of "
            f"`mesh.data`, `mesh.fsdp`, `mesh.tensor` to -1 or make their product {num_devices}.")
    return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") sized by `mesh_cfg` (a ConfigDict or dict).

    Missing axes default to 1; one axis may be -1 (= all remaining devices). Raises `MeshError`
    naming the `mesh.*` field and the device count when the sizes do not fit. Axis types are
    `Auto` so the compiler propagates shardings through the step.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _mesh_sizes(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: size of "data" × size of "fsdp"."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def _as_axes(mesh_axes: Any) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_mesh_axes(logical: Sequence[Any] | None, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                         mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec over mesh axes for one array whose dimensions carry the `logical` names.

    A logical name absent from `rules`, or None, is replicated. With `mesh` and `shape` given, mesh
    axes missing from the mesh are dropped, and a dimension whose size is not divisible by the
    product of its mesh axes is replicated (tiny test models: vocab 13 over tensor=2).
    """
    if logical is None:
        return P()
    table: dict[str, Any] = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical):
        if name is None or (not isinstance(name, str)):
            # Already a mesh-axes tuple or None: nested logical names are not supported.
            out.append(None)
            continue
        axes = [a for a in _as_axes(table.get(name)) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape]
        if mesh is not None and shape is not None and axes:
            if shape[dim] % math.prod(mesh.shape[a] for a in axes):
                axes = []
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return P(*out)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P) or x is None


def logical_to_mesh_sharding(partition_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                             shapes: Any = None) -> Any:
    """Tree of `NamedSharding`s from a tree of logical `PartitionSpec`s (e.g. `nnx.get_partition_spec`).

    `shapes` (same tree, leaves with `.shape`) enables the divisibility fallback of
    `logical_to_mesh_axes`. Leaves that are None (no annotation) are replicated.
    """
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_axes(s, rules, mesh)), partition_specs,
                            is_leaf=_is_spec)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, logical_to_mesh_axes(s, rules, mesh, x.shape)),
                        partition_specs, shapes, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (scalars, metrics, rng)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of the leading (batch) dimension over ("data", "fsdp"); other dimensions replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _local_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch shards this process's devices hold (= its share of `data_parallel_size`)."""
    names = mesh.axis_names
    me = jax.process_index()
    shards = set()
    for index, device in np.ndenumerate(mesh.devices):
        if device.process_index == me:
            coords = dict(zip(names, index))
            shards.add(tuple(coords.get(a, 0) for a in BATCH_AXES))
    return len(shards)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global `jax.Array`s from this process's numpy share of the batch (a pytree of arrays).

    Each process passes its own rows (e.g. from `make_loader(..., shard_index=jax.process_index())`);
    the global batch is the concatenation over processes in process order. When a process's devices
    hold k of the dp batch shards, it passes k/dp of the global batch (all of it if the batch is
    replicated over processes, e.g. a pure tensor-parallel mesh across hosts). The leading dimension is
    split over ("data", "fsdp"). Raises `ValueError` when the global batch is not divisible by the
    data-parallel size.
    """
    dp = data_parallel_size(mesh)
    local_shards = _local_batch_shards(mesh)
    sharding = batch_sharding(mesh)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar; batch leaves need a leading batch dimension.")
        if x.shape[0] % local_shards:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)}: global batch {x.shape[0] * dp // local_shards} "
                f"({x.shape[0]} rows in this process) is not divisible by the data-parallel size {dp} "
                f"(mesh.data × mesh.fsdp); choose a batch size that is a multiple of {dp}.")
        global_rows = x.shape[0] * dp // local_shards
        return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(one, local_batch)


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global array split over ("data", "fsdp") on its leading dimension, as
    numpy: the inverse of `shard_batch` (all rows in a single process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    x = jax.jit(lambda a: a, out_shardings=batch_sharding(mesh))(x)  # the layout shard_batch made
    pieces = {}
    for shard in x.addressable_shards:  # tensor-axis replicas hold the same rows: keep one
        pieces.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """Indices of the rows of a global batch of `global_rows` rows that this process holds under the
    batch sharding, in the order `shard_batch` expects its local rows (all rows in one process).

    A process that samples or reads its own share of a global batch takes these rows of it, so the
    global array it builds with `shard_batch` equals the one-process batch on any mesh."""
    spans = set()
    for index in batch_sharding(mesh).addressable_devices_indices_map((int(global_rows),)).values():
        sl = index[0]
        spans.add((sl.start or 0, global_rows if sl.stop is None else sl.stop))
    return np.concatenate([np.arange(a, b) for a, b in sorted(spans)]).astype(np.int64)


def replicate_small(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """A small global array (per-row flags, a few statistics) as numpy on every process; not for batches."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(jax.jit(lambda a: a, out_shardings=replicated(mesh))(x))


def jit_step(fn: Callable, mesh: Mesh, state_sharding: Any, in_batch_sharding: Any = None, *,
             donate_state: bool = True, metrics_sharding: Any = None, extra_sharding: Any = None) -> Callable:
    """`jax.jit(fn)` for `fn(state, batch) -> (state, metrics)` with explicit shardings.

    In: `state_sharding` (tree matching the state) and the batch split over ("data", "fsdp") unless
    `in_batch_sharding` is given (a sharding or a tree prefix of the batch). Out: the same state
    sharding and replicated metrics. The state argument is donated, so the caller must only use the
    returned state afterwards. With `extra_sharding`, `fn(state, batch, extra)` takes a third
    argument (frozen params, ...) with that sharding, not donated.
    """
    bs = batch_sharding(mesh) if in_batch_sharding is None else in_batch_sharding
    ms = replicated(mesh) if metrics_sharding is None else metrics_sharding
    ins = (state_sharding, bs) if extra_sharding is None else (state_sharding, bs, extra_sharding)
    return jax.jit(fn, in_shardings=ins, out_shardings=(state_sharding, ms),
                   donate_argnums=(0,) if donate_state else ())


ENV_HEARTBEAT_TIMEOUT = "KLJAX_HEARTBEAT_TIMEOUT"
ENV_DISTRIBUTED = "KLJAX_DISTRIBUTED"
DEFAULT_HEARTBEAT_TIMEOUT_S = 20  # JAX's 100 s leaves the survivors of a crash idling for minutes


def skip_absent_tpu() -> None:
    """Keep JAX from starting libtpu on a machine without TPU chips.

    With the `aot` extra installed, JAX otherwise initializes libtpu on every start, which prints
    pages of warnings on a CPU or GPU host before falling back. Sets `JAX_PLATFORMS` (cuda when its
    plugin is installed, else cpu) only when it is unset, libtpu is installed and no TPU device file
    (/dev/accel*, /dev/vfio/<n>) exists.
    """
    import glob
    import importlib.util
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
    platforms = "cuda,cpu" if cuda else "cpu"
    os.environ["JAX_PLATFORMS"] = platforms  # for child processes
    jax.config.update("jax_platforms", platforms)  # jax read the variable when it was imported


def heartbeat_timeout_s() -> int:
    """Seconds without a heartbeat after which the cluster declares a process lost and stops every other."""
    raw = os.environ.get(ENV_HEARTBEAT_TIMEOUT, str(DEFAULT_HEARTBEAT_TIMEOUT_S))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise RuntimeError(f"{ENV_HEARTBEAT_TIMEOUT}={raw!r} must be a positive number of seconds.")
    return value


def cluster_auto_detectable() -> bool:
    """True on a host that JAX's own cluster detection recognises as one of several (SLURM, TPU VM slice).

    `KLJAX_DISTRIBUTED=auto` forces the auto-detected initialization, `KLJAX_DISTRIBUTED=off` disables it.
    """
    forced = os.environ.get(ENV_DISTRIBUTED, "").lower()
    if forced in ("auto", "off"):
        return forced == "auto"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
    return len(hosts) > 1 and all(h and " " not in h for h in hosts)  # libtpu may leave a warning text here


def initialize_distributed_from_env() -> tuple[int, int]:
    """Join a multi-process JAX cluster; return `(process_id, num_processes)`.

    Local launches (`launch/local_multiprocess.py`) describe the cluster with `KLJAX_COORDINATOR`
    (host:port), `KLJAX_NUM_PROCESSES` and `KLJAX_PROCESS_ID`. Without them, on a SLURM job with
    several tasks or a multi-worker TPU VM slice (or with `KLJAX_DISTRIBUTED=auto`), it calls
    `jax.distributed.initialize()` with no arguments so JAX detects the cluster itself. Otherwise
    (one process) it does nothing. A process that stops sending heartbeats for `KLJAX_HEARTBEAT_TIMEOUT`
    seconds (default 20) is declared lost and every other process terminates with a message naming it.
    On CPU it selects gloo collectives, which cross-process CPU computations need. Call before any
    other JAX use.
    """
    num = int(os.environ.get(ENV_NUM_PROCESSES, "1"))
    if num <= 1:
        if not cluster_auto_detectable():
            return 0, 1
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s())
        return jax.process_index(), jax.process_count()
    coordinator = os.environ.get(ENV_COORDINATOR)
    pid = os.environ.get(ENV_PROCESS_ID)
    if not coordinator or pid is None:
        raise RuntimeError(f"{ENV_NUM_PROCESSES}={num} but {ENV_COORDINATOR} or {ENV_PROCESS_ID} is unset; "
                           "start the processes with launch/local_multiprocess.py.")
    if os.environ.get("JAX_PLATFORMS", "") in ("cpu", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=int(pid),
                               heartbeat_timeout_seconds=heartbeat_timeout_s())
    return jax.process_index(), jax.process_count()
