"""grain input pipelines over random-access sources (tfds array_record or in-memory arrays).

Pipeline, on record indices: ``MapDataset.range(len(source))`` → shuffle (a fresh permutation per
epoch, from ``seed``) → repeat ``num_epochs`` times (``None``: forever) → (finite epochs: cut to whole
global batches) → this process's share (every ``shard_count``-th index, starting at ``shard_index``)
→ batch → read the batch's records in one ``__getitems__`` call → ``to_iter_dataset`` iterator. ``batch_size`` is the GLOBAL batch: each process
gets ``batch_size // shard_count`` rows, and the processes' batches at step k together are exactly
the global batch k (the same records whatever ``shard_count`` is). A process reads only its own
records: records are fetched by index, lazily, after sharding.

The iterator's ``get_state()`` is a small dict (``{"next_index": k}``) and ``set_state`` resumes
exactly; ``state_to_bytes``/``state_from_bytes`` turn it into JSON bytes for orbax (or any file).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

import grain
import numpy as np


class ArraySource:
    """Random-access source over in-memory arrays with a common leading dimension.

    ``source[i]`` is ``{name: array[i]}``; use it for data made on the fly (e.g. roll-outs).
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if not arrays:
            raise ValueError("ArraySource needs at least one array")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self._arrays.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"all arrays need the same leading (record) dimension; got {sizes}")
        self._len = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        taken = {k: v[idx] for k, v in self._arrays.items()}
        return [{k: v[i] for k, v in taken.items()} for i in range(len(idx))]

    def __repr__(self) -> str:
        shapes = {k: v.shape for k, v in self._arrays.items()}
        return f"ArraySource({shapes})"


def dataset_from_arrays(arrays: Mapping[str, Any]) -> grain.MapDataset:
    """A grain ``MapDataset`` over in-memory arrays (one record per leading index)."""
    return grain.MapDataset.source(ArraySource(arrays))


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def make_dataset(
    source,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    shard_index: int = 0,
    shard_count: int = 1,
    drop_remainder: bool = True,
) -> grain.MapDataset:
    """The batched, sharded ``MapDataset`` behind ``make_loader`` (same arguments)."""
    batch_size = _check_positive_int("batch_size", batch_size)
    shard_count = _check_positive_int("shard_count", shard_count)
    if isinstance(shard_index, bool) or not isinstance(shard_index, (int, np.integer)) or not (
        0 <= shard_index < shard_count
    ):
        raise ValueError(f"shard_index={shard_index!r} must be an int in [0, shard_count={shard_count})")
    if batch_size % shard_count:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by shard_count={shard_count} "
            f"so every process gets the same number of rows"
        )
    if num_epochs is not None:
        num_epochs = _check_positive_int("num_epochs", num_epochs)
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise TypeError(f"source must support len() and [index] (a random-access source), got {type(source)}")
    size = len(source)
    if size == 0:
        raise ValueError("source is empty")
    if num_epochs is not None and drop_remainder and size * num_epochs < batch_size:
        raise ValueError(
            f"{size} records x num_epochs={num_epochs} cannot fill one batch of batch_size={batch_size} "
            f"with drop_remainder=True; lower batch_size or raise num_epochs"
        )
    # The pipeline runs on record indices; each batch of indices is then read in one call
    # (`__getitems__`), which for array_record is several times faster than record by record.
    ds = grain.MapDataset.range(size)
    if shuffle:
        ds = ds.shuffle(seed=int(seed))  # a new permutation each epoch once repeated
    ds = ds.repeat(num_epochs)
    if num_epochs is not None and drop_remainder:
        # cut to whole global batches first, so no process gets a batch the others lack
        ds = ds[: (len(ds) // batch_size) * batch_size]
    # Global batches of indices first, then this process's contiguous slice of each: the processes'
    # slices, concatenated in process order (as `shard_batch` places them), are the one-process batch,
    # so a run gives the same numbers on any number of processes.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if shard_count > 1:
        ds = ds.map(_ProcessSlice(shard_index, shard_count))
    return ds.map(_BatchReader(source))


class _ProcessSlice:
    """Process `index`'s contiguous share of a batch of record indices (`np.array_split` order)."""

    def __init__(self, index: int, count: int):
        self.index, self.count = int(index), int(count)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return np.array_split(np.asarray(indices), self.count)[self.index]


class _BatchReader:
    """Maps an array of record indices to the stacked batch ``{name: array[b, ...]}``."""

    def __init__(self, source):
        self._source = source

    def _read(self, indices):
        if isinstance(self._source, grain.MapDataset):
            return [self._source[i] for i in indices]
        if hasattr(self._source, "__getitems__"):
            return list(self._source.__getitems__(indices))
        return [self._source[i] for i in indices]

    def __call__(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        records = self._read([int(i) for i in np.asarray(indices).reshape(-1)])
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}


def make_loader(
    source,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    shard_index: Optional[int] = None,
    shard_count: Optional[int] = None,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch: int = 4,
) -> grain.DatasetIterator:
    """Iterator of batches (dicts of numpy arrays, leading dim ``batch_size // shard_count``).

    Args:
      source: a random-access source (``task.data_source(split)``, ``ArraySource``, any object with
        ``len`` and ``[i]``) or a ``grain.MapDataset``.
      batch_size: the GLOBAL batch size; must be divisible by ``shard_count``.
      seed: shuffle seed; ``shuffle=False`` keeps the source order.
      num_epochs: passes over the data; ``None`` repeats forever.
      shard_index, shard_count: this process's share; default ``jax.process_index()`` and
        ``jax.process_count()``.
      drop_remainder: drop a last, incomplete batch (only reachable with finite ``num_epochs``).
      num_threads, prefetch: grain read threads and prefetch buffer (batches).

    The iterator has ``get_state()`` / ``set_state(state)`` for exact resumption.
    """
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    ds = make_dataset(source, batch_size, seed, shuffle, num_epochs, shard_index, shard_count, drop_remainder)
    options = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))
    return iter(ds.to_iter_dataset(options))


def read_all(source, chunk: int = 1024) -> Dict[str, np.ndarray]:
    """Every record of a (small) source as stacked arrays, in source order (e.g. a test split)."""
    size = len(source)
    if size == 0:
        raise ValueError("source is empty")
    reader = _BatchReader(source)
    parts = [reader(np.arange(i, min(i + chunk, size))) for i in range(0, size, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """JSON bytes of an iterator state (for an orbax ``JsonSave``/bytes item or a plain file)."""
    return json.dumps(dict(state), sort_keys=True).encode("utf-8")


def state_from_bytes(data: bytes) -> Dict[str, Any]:
    """Inverse of ``state_to_bytes``."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    state = json.loads(data)
    if not isinstance(state, dict):
        raise ValueError(f"not an iterator state: {state!r}")
    return state
