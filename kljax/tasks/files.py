"""A task read from the user's files: prompts (and answers, SFT completions, preference pairs, any extra
columns) from local JSONL, JSON, Parquet or CSV files, tokenized with a Hugging Face tokenizer.

    task:
      name = "files"
      train_files = "data/train.jsonl"          # a path, a glob, or several separated by commas
      test_files = "data/test.jsonl"            # "" = the train files
      prompt_key = "prompt"                     # text, or a list of chat messages [{"role", "content"}]
      answer_key = ""                           # reference answer (rewards; the eval target when no completion)
      completion_key = ""                       # SFT / distillation target text
      chosen_key = rejected_key = ""            # preference pairs (both or neither)
      chat_template = False                     # render text prompts as [system?, user] with the template
      system_prompt = ""
      prompt_len = 256, completion_len = 256    # token budgets (the model's max_len must hold both)
      too_long = "drop"                         # or "error": examples over budget; never truncated
      reward = ""                               # see kljax.tasks.rewards; "" = exact match of the target
      tokenizer_path = ""                       # "" = model.hf_path (filled in by the loops)
      tfds_name = ""                            # instead of files: a prepared array_record tfds dataset
      tfds_data_dir = "", train_split = "train", test_split = "test"

Records: ``prompt``/``prompt_valid`` LEFT-padded to ``prompt_len`` (the prompt's own special tokens: BOS
when the tokenizer adds one, the chat template's tokens when it is used); ``target``/``target_valid`` the
completion (else the answer) then EOS, right-padded; ``chosen``/``rejected`` likewise for pairs; ``row`` and
``split_id`` point back to the file row, whose columns the reward functions receive.

A tfds dataset (``tfds_name``, prepared beforehand as array_record; nothing is downloaded) is read the
same way, its text features decoded to ``str``; its identity in the hash is its name, version and
``dataset_info.json``. The data are tokenized once and cached as array_record by a tfds builder under
``<data_dir>/files/h<hash>/``, the hash covering the files' contents, the tokenizer (its files' contents)
and every data field: editing a file or switching tokenizer rebuilds, moving the files does not.
Examples over budget are dropped (counted, printed when the data are built, and ``dropped(split)``) or,
with ``too_long="error"``, stop the build naming the file, the row and the lengths.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from kljax.tasks import base
from kljax.tasks import rewards as rewards_lib

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


_REPORTED: set = set()  # (config name, split) whose dropped count this process has printed


class FilesBuilder(base.TaskBuilder, skip_registration=True):
    name = "files"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=repr(self._task), features=self._task.features(),
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        base.GENERATION_COUNT[(self.name, self.builder_config.name)] += 1
        self.info.metadata["dropped"] = {}
        self.info.metadata["total"] = {}
        return {split: self._generate_examples(split) for split in self._task.splits}

    def _generate_examples(self, split):
        kept = 0
        rows = self._task.rows(split)
        for i, record in self._task.generate(split, rows):
            kept += 1
            yield i, record
        dropped = len(rows) - kept
        self.info.metadata["dropped"][split] = dropped
        self.info.metadata["total"][split] = len(rows)
        _REPORTED.add((self._task.config_name(), split))
        if dropped:
            print(f"files task: dropped {dropped} of {len(rows)} {split} examples longer than "
                  f"prompt_len={self._task.prompt_len} / completion_len={self._task.completion_len} tokens "
                  "(too_long='drop'; nothing is truncated)", flush=True)
        if kept == 0:
            raise ValueError(f"files task: no {split} example fits prompt_len={self._task.prompt_len} and "
                             f"completion_len={self._task.completion_len}; raise them")


# ---------------------------------------------------------------------------------------------- reading
def resolve(spec: str, field: str) -> List[str]:
    """Sorted files of a comma-separated list of paths/globs; an error names ``field`` if one matches none."""
    out: List[str] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        found = sorted(glob.glob(os.path.expanduser(part)))
        if not found:
            raise FileNotFoundError(f"task.{field}: {part!r} matches no file")
        for f in found:
            if os.path.splitext(f)[1].lower() not in FORMATS:
                raise ValueError(f"task.{field}: {f} is not one of {sorted(FORMATS)} (by extension)")
        out += found
    if not out:
        raise ValueError(f"task.{field} is empty: give a path or glob of JSONL/JSON/Parquet/CSV files")
    return out


_HASHES: Dict[Tuple[str, int, int], str] = {}


def file_hash(path: str) -> str:
    """sha256 of the file's bytes (memoized on path, size and modification time)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def read_rows(path: str) -> List[Dict[str, Any]]:
    """The rows of one data file as dicts (CSV values are strings)."""
    kind = FORMATS[os.path.splitext(path)[1].lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if kind == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    with open(path, encoding="utf-8") as f:
        if kind == "json":
            data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: a .json data file must hold a list of objects (or use .jsonl)")
            return data
        rows = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        return rows


@functools.lru_cache(maxsize=16)
def _rows_of(files: Tuple[str, ...], hashes: Tuple[str, ...]) -> Tuple[List[Dict[str, Any]], List[Tuple[str, int]]]:
    del hashes  # part of the cache key only: an edited file is read again
    rows, where = [], []
    for f in files:
        r = read_rows(f)
        rows += r
        where += [(f, i + 1) for i in range(len(r))]
    return rows, where


def _tfds_builder(name: str, data_dir: str):
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 — tfds raises several kinds for an unknown name
        raise ValueError(f"task.tfds_name={name!r}: {e}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(f"task.tfds_name={name!r} is not prepared in {builder.data_dir}: kljax downloads "
                                "nothing; prepare it first (tfds build --file_format=array_record) or set "
                                "task.tfds_data_dir")
    return builder


def _tfds_info(name: str, data_dir: str) -> str:
    """The prepared dataset's identity: full name, and dataset_info.json (shard lengths, sizes, checksums)."""
    builder = _tfds_builder(name, data_dir)
    path = os.path.join(builder.data_dir, "dataset_info.json")
    with open(path, "rb") as f:
        return builder.info.full_name + hashlib.sha256(f.read()).hexdigest()


def _plain(v):
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype.kind in "OSU" else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@functools.lru_cache(maxsize=8)
def _tfds_rows(name: str, data_dir: str, split: str, info: str) -> List[Dict[str, Any]]:
    del info  # part of the cache key only
    builder = _tfds_builder(name, data_dir)
    try:
        source = builder.as_data_source(split)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"task.tfds_name={name!r} split {split!r}: {e} (kljax reads array_record datasets: "
                         "tfds build --file_format=array_record)") from None
    return [_plain(dict(source[i])) for i in range(len(source))]


# ---------------------------------------------------------------------------------------------- the task
@dataclasses.dataclass(frozen=True)
class Files(base.SequenceTask):
    train_files: str = ""
    test_files: str = ""
    prompt_key: str = "prompt"
    answer_key: str = ""
    completion_key: str = ""
    chosen_key: str = ""
    rejected_key: str = ""
    chat_template: bool = False
    system_prompt: str = ""
    prompt_len: int = 256
    completion_len: int = 256
    too_long: str = "drop"
    max_examples: int = 0
    tfds_name: str = ""          # a prepared (array_record) tfds dataset instead of files, e.g. "gsm8k/main"
    tfds_data_dir: str = ""      # where it is prepared ("" = tfds's default)
    train_split: str = "train"   # its splits (tfds split syntax, e.g. "train[:90%]")
    test_split: str = "test"
    tokenizer_path: str = base.reward_only("")   # the tokenizer's contents enter the hash, not its path
    reward_spec: str = base.reward_only("")       # config field `task.reward` (see `files_task`)

    name = "files"
    builder_class = FilesBuilder

    def __post_init__(self):
        from kljax.models.tokenizer import load_tokenizer
        base.check_int("prompt_len", self.prompt_len, 1)
        base.check_int("completion_len", self.completion_len, 2)
        base.check_int("max_examples", self.max_examples, 0)
        if self.too_long not in ("drop", "error"):
            raise ValueError(f"too_long={self.too_long!r}: use 'drop' or 'error'")
        if bool(self.chosen_key) != bool(self.rejected_key):
            raise ValueError("set both chosen_key and rejected_key (preference pairs) or neither")
        if not self.tokenizer_path:
            raise ValueError("the files task needs a tokenizer: set model.hf_path (or task.tokenizer_path) to a "
                             "Hugging Face folder with tokenizer.json")
        if self.tfds_name:
            if self.train_files or self.test_files:
                raise ValueError("set task.tfds_name or task.train_files/test_files, not both")
            files = {"train": (), "test": ()}
            object.__setattr__(self, "_tfds_info", _tfds_info(self.tfds_name, self.tfds_data_dir))
        else:
            files = {"train": tuple(resolve(self.train_files, "train_files"))}
            files["test"] = tuple(resolve(self.test_files, "test_files")) if self.test_files else files["train"]
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "tokenizer", load_tokenizer(self.tokenizer_path))
        object.__setattr__(self, "_config_name", self._content_name())
        if self.reward_spec:
            rewards_lib.parse(self.reward_spec)  # import errors now, not mid-run
        object.__setattr__(self, "last_reward_metrics", {})

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    # ------------------------------------------------------------------ cache key
    def config_name(self) -> str:
        """``h<hash>`` of the files' contents (as they were when the task was built), the tokenizer and the
        data fields."""
        return self._config_name

    def _content_name(self) -> str:
        h = hashlib.sha256()
        if self.tfds_name:  # the prepared dataset's info (name, version, shard lengths and sizes)
            h.update(self._tfds_info.encode())
        for split in self.splits:
            h.update(split.encode())
            for f in self.files[split]:
                h.update(file_hash(f).encode())
        h.update(self.tokenizer.fingerprint().encode())
        for f in dataclasses.fields(self):
            if f.name not in ("train_files", "test_files", "tfds_data_dir") and not f.metadata.get("reward_only"):
                h.update(f"{f.name}={getattr(self, f.name)!r}".encode())
        return "h" + h.hexdigest()[:20]

    # ------------------------------------------------------------------ records
    def features(self) -> tfds.features.FeaturesDict:
        feats = dict(super().features())
        feats["row"] = tfds.features.Scalar(dtype=np.int32)
        feats["split_id"] = tfds.features.Scalar(dtype=np.int32)
        if self.chosen_key:
            c = self.completion_len
            for k in ("chosen", "chosen_valid", "rejected", "rejected_valid"):
                feats[k] = tfds.features.Tensor(shape=(c,), dtype=np.int32)
        return tfds.features.FeaturesDict(feats)

    def rows(self, split: str):
        if self.tfds_name:
            tsplit = self.train_split if split == "train" else self.test_split
            rows = _tfds_rows(self.tfds_name, self.tfds_data_dir, tsplit, self._tfds_info)
        else:
            files = self.files[split]
            rows, _ = _rows_of(files, tuple(file_hash(f) for f in files))
        return rows[: self.max_examples] if self.max_examples else rows

    def _where(self, split: str, i: int) -> str:
        if self.tfds_name:
            return f"tfds {self.tfds_name} split {self.train_split if split == 'train' else self.test_split!r} example {i}"
        files = self.files[split]
        _, where = _rows_of(files, tuple(file_hash(f) for f in files))
        f, line = where[i]
        return f"{f} row {line}"

    def _column(self, row: Dict[str, Any], key: str, split: str, i: int):
        if key not in row:
            raise KeyError(f"files task: column {key!r} is missing in {self._where(split, i)}; its columns are "
                           f"{sorted(row)} (set task.{self._key_field(key)})")
        return row[key]

    def _key_field(self, key):
        for f in ("prompt_key", "answer_key", "completion_key", "chosen_key", "rejected_key"):
            if getattr(self, f) == key:
                return f
        return "prompt_key"

    def prompt_ids(self, prompt: Any) -> List[int]:
        """Token ids of one prompt value (text, or chat messages), with its special tokens."""
        tok = self.tokenizer
        if isinstance(prompt, (list, tuple)):  # conversational
            return tok.encode(tok.apply_chat_template(list(prompt), add_generation_prompt=True),
                              add_special_tokens=False)
        if prompt is None:
            raise ValueError("empty prompt")
        if self.chat_template:
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
                {"role": "user", "content": str(prompt)}]
            return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
        text = (self.system_prompt + str(prompt)) if self.system_prompt else str(prompt)
        return tok.encode(text)

    def completion_ids(self, text: Any) -> List[int]:
        """Token ids of a completion/answer text followed by EOS (no BOS)."""
        return self.tokenizer.encode("" if text is None else str(text), add_special_tokens=False) + [self.eos_id]

    def generate(self, split: str, rows: Optional[Sequence[Dict[str, Any]]] = None):
        """``(row index, record)`` for each example within budget (over-budget: dropped or an error)."""
        rows = self.rows(split) if rows is None else rows
        sid = self.splits.index(split)
        target_key = self.completion_key or self.answer_key
        for i, row in enumerate(rows):
            try:
                p = self.prompt_ids(self._column(row, self.prompt_key, split, i))
            except ValueError as e:
                raise ValueError(f"files task: {self._where(split, i)}: {e}") from None
            if not p:
                # the sampler continues the last prompt token: a prompt without one cannot be sampled
                raise ValueError(f"files task: {self._where(split, i)}: the prompt ({self.prompt_key}="
                                 f"{row.get(self.prompt_key)!r}) has no tokens; give it text, or remove the row")
            parts = {"target": self.completion_ids(self._column(row, target_key, split, i)) if target_key
                     else [self.eos_id]}
            if self.chosen_key:
                parts["chosen"] = self.completion_ids(self._column(row, self.chosen_key, split, i))
                parts["rejected"] = self.completion_ids(self._column(row, self.rejected_key, split, i))
            over = [f"prompt has {len(p)} tokens > prompt_len={self.prompt_len}"] if len(p) > self.prompt_len else []
            over += [f"{k} has {len(v)} tokens (EOS included) > completion_len={self.completion_len}"
                     for k, v in parts.items() if len(v) > self.completion_len]
            if over:
                if self.too_long == "error":
                    raise ValueError(f"files task: {self._where(split, i)}: {'; '.join(over)}. Raise the budget, "
                                     "shorten the example or set task.too_long='drop'")
                continue
            prompt, prompt_valid = base.left_pad(p, self.prompt_len, self.pad_id)
            rec = {"prompt": prompt, "prompt_valid": prompt_valid, "row": np.int32(i), "split_id": np.int32(sid)}
            for k, ids in parts.items():
                rec[k], rec[k + "_valid"] = base.right_pad(ids, self.completion_len, self.pad_id, k)
            yield i, rec

    def split_size(self, split: str) -> int:
        return len(self.data_source(split))

    def data_source(self, split: str, data_dir: Optional[str] = None):
        """As for every task; the first use in a process of cached data that dropped examples says so."""
        src = super().data_source(split, data_dir)
        key = (self.config_name(), split)
        if key not in _REPORTED:
            _REPORTED.add(key)
            n = self.dropped(split, data_dir)
            if n:
                print(f"files task: {n} {split} examples over prompt_len={self.prompt_len} / completion_len="
                      f"{self.completion_len} were dropped when this data was built (too_long='drop')", flush=True)
        return src

    def dropped(self, split: str, data_dir: Optional[str] = None) -> int:
        """How many examples of ``split`` were over budget and dropped when the data were built."""
        return int(self.prepare(data_dir).info.metadata.get("dropped", {}).get(split, 0))

    # ------------------------------------------------------------------ reward
    def batch_rows(self, batch) -> List[Dict[str, Any]]:
        """The file rows of the records in ``batch`` (by their ``row``/``split_id``)."""
        rows = {s: self.rows(s) for s in self.splits}
        return [rows[self.splits[int(s)]][int(r)] for r, s in zip(np.asarray(batch["row"]).reshape(-1),
                                                                   np.asarray(batch["split_id"]).reshape(-1))]

    def reward(self, completions, completion_mask, batch) -> np.ndarray:
        """float32[B]: ``task.reward``'s weighted functions of (prompts, completion texts, columns), or
        without one the exact match of the target (the completion/answer tokens then EOS)."""
        if not self.reward_spec:
            return base.exact_match(completions, completion_mask, batch["target"], batch["target_valid"],
                                    self.eos_id).astype(np.float32)
        texts = self.decode_completions(completions, completion_mask)
        rows = self.batch_rows(batch)
        keys: List[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys and k != self.prompt_key]
        columns = {k: [r.get(k) for r in rows] for k in keys}
        if self.answer_key and "answer" not in columns and self.answer_key in columns:
            columns["answer"] = columns[self.answer_key]  # what the built-in math_answer reads
        prompts = [r.get(self.prompt_key) for r in rows]
        if prompts and isinstance(prompts[0], (list, tuple)):  # conversational data: completions as TRL passes them
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        total, metrics = rewards_lib.score(rewards_lib.parse(self.reward_spec), prompts, texts, columns)
        object.__setattr__(self, "last_reward_metrics", metrics)
        return total


def files_task(reward: str = "", **fields) -> Files:
    """The registered factory of ``task.name = "files"``: config field ``task.reward`` is ``Files.reward_spec``
    (``reward`` is the task's method). Unknown fields raise ``TypeError`` listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(Files) if f.name != "reward_spec"] + ["reward"]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise TypeError(f"task 'files' has no parameter(s) {unknown}; valid parameters: {valid}")
    return Files(reward_spec=reward, **fields)
