"""Hugging Face tokenizers without transformers: ``tokenizer.json`` through the ``tokenizers`` library,
special tokens and the chat template from ``tokenizer_config.json`` (the template rendered with
``jinja2`` the way transformers renders it).

    tok = load_tokenizer("path/to/Qwen2.5-0.5B")     # the folder from_hf reads
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}]), add_special_tokens=False)
    text = tok.decode(ids)
    tok.save("out/")                                  # tokenizer.json + tokenizer_config.json

Rules (all read from the files, never guessed):

- EOS is ``eos_token`` of ``tokenizer_config.json`` (or ``special_tokens_map.json``); the pad id is
  ``pad_token``'s, and the EOS id when the files name no pad token (what TRL does).
- BOS: ``encode(text)`` runs the ``post_processor`` of ``tokenizer.json``, which adds BOS exactly when the
  model's tokenizer does (Llama: yes; Qwen2: no). Text rendered from a chat template already holds the
  template's special tokens, so it is encoded with ``add_special_tokens=False``, as transformers does.
- ``padding_side`` is kept as the files say (it is written back on export). kljax itself always left-pads
  prompts for generation and right-pads completions, whatever the files say.
- Vocabulary: ``vocab_size`` counts the added tokens. A model may have more embedding rows than that
  (Qwen2 pads to a multiple of 128): the extra ids decode to nothing. See :func:`aligned_vocab_size`
  for teacher/student pairs.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_text(value) -> Optional[str]:
    """A special token as saved by transformers: a string or an AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


class HFTokenizer:
    """A Hugging Face fast tokenizer read from its files (see the module docstring for the rules)."""

    def __init__(self, tokenizer, config: Optional[Dict[str, Any]] = None, path: str = ""):
        self._tok = tokenizer
        self.config: Dict[str, Any] = dict(config or {})
        self.path = path
        self.special_tokens: Dict[str, Optional[str]] = {k: _token_text(self.config.get(k)) for k in _SPECIAL_KEYS}
        self.chat_template: Optional[str] = self.config.get("chat_template") or None
        if isinstance(self.chat_template, list):  # several named templates: use "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        self.padding_side: str = self.config.get("padding_side", "right")
        for key, tok in self.special_tokens.items():
            if tok is not None and self._tok.token_to_id(tok) is None:
                raise ValueError(f"{key}={tok!r} in {os.path.join(path, CONFIG_FILE)} is not a token of "
                                 f"{os.path.join(path, TOKENIZER_FILE)}")

    # ------------------------------------------------------------------ ids of special tokens
    def _id(self, key: str) -> Optional[int]:
        tok = self.special_tokens.get(key)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def eos_id(self) -> int:
        i = self._id("eos_token")
        if i is None:
            raise ValueError(f"the tokenizer in {self.path or '<memory>'} names no eos_token in {CONFIG_FILE}; "
                             "generation needs one: add \"eos_token\" to that file")
        return i

    @property
    def pad_id(self) -> int:
        i = self._id("pad_token")
        return self.eos_id if i is None else i

    @property
    def bos_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids past the tokenizer's vocabulary (a model's padding rows) are dropped."""
        n = self.vocab_size
        ids = [int(i) for i in ids if 0 <= int(i) < n]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """The chat template rendered as text (encode it with ``add_special_tokens=False``)."""
        if not self.chat_template:
            raise ValueError(f"the tokenizer in {self.path or '<memory>'} has no chat template "
                             f"(no \"chat_template\" in {CONFIG_FILE}, no {TEMPLATE_FILE}); set "
                             "task.chat_template=False or use a chat model's tokenizer")
        return _render(self.chat_template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                       **{k: v for k, v in self.special_tokens.items() if v is not None}, **kwargs)

    def fingerprint(self) -> str:
        """Hash of everything that changes the ids (tokenizer.json and the config): a cache key."""
        import hashlib
        h = hashlib.sha256(self._tok.to_str().encode())
        h.update(json.dumps(self.config, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ files
    def save(self, path) -> str:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (chat template inside) into ``path``."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, TOKENIZER_FILE))
        cfg = dict(self.config)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        cfg["padding_side"] = self.padding_side
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(path, SPECIAL_MAP_FILE), "w") as f:
            json.dump({k: v for k, v in self.special_tokens.items() if v is not None}, f, indent=2)
        return path

    def __repr__(self):
        return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos={self.special_tokens['eos_token']!r}, "
                f"pad={self.special_tokens['pad_token']!r}, bos={self.special_tokens['bos_token']!r})")


def _render(template: str, **context) -> str:
    """Render a chat template as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**context)


def has_tokenizer(path) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), TOKENIZER_FILE))


def load_tokenizer(path) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder (``tokenizer.json`` + ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer
    path = os.fspath(path)
    tj = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(tj):
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {path}: kljax reads fast (tokenizers-library) "
                                "tokenizers; save one with transformers' tokenizer.save_pretrained(path)")
    config: Dict[str, Any] = {}
    for name in (SPECIAL_MAP_FILE, CONFIG_FILE):  # the config wins over the special-token map
        p = os.path.join(path, name)
        if os.path.exists(p):
            with open(p) as f:
                config.update({k: v for k, v in json.load(f).items() if v is not None})
    tp = os.path.join(path, TEMPLATE_FILE)
    if os.path.exists(tp) and not config.get("chat_template"):
        with open(tp) as f:
            config["chat_template"] = f.read()
    config.pop("added_tokens_decoder", None)  # tokenizer.json holds them
    return HFTokenizer(Tokenizer.from_file(tj), config, path)


def aligned_vocab_size(teacher_vocab: int, student_vocab: int, tokenizer_vocab: int) -> int:
    """The vocabulary on which a teacher and a student that share a tokenizer are compared.

    Rule: equal sizes are used as they are. Sizes that differ only by padding rows (both at least the
    tokenizer's ``tokenizer_vocab`` ids) are compared on the first ``min(teacher, student)`` ids: the
    rows past the tokenizer's vocabulary are ids no text maps to, and both models' distributions are
    renormalized over the common ids. Anything else is a real mismatch and raises ``ValueError``.
    """
    t, s, k = int(teacher_vocab), int(student_vocab), int(tokenizer_vocab)
    if t == s:
        return t
    if min(t, s) >= k:
        return min(t, s)
    raise ValueError(f"teacher vocabulary {t} and student vocabulary {s} differ and the smaller one is below the "
                     f"tokenizer's {k} ids: they do not share a tokenizer (only padding rows past {k} may differ)")
