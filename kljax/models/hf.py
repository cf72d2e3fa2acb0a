"""Import and export of Hugging Face checkpoints (Llama and Qwen2 families) as kljax ``TransformerLM``s.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Weights are read with the safetensors numpy API (no torch).

Weight layout (HF stores ``nn.Linear`` weights as [out, in]; kljax keeps [in, out] with heads split):
  q_proj.weight [H·Hd, D]  -> attn.wq [D, H, Hd]     k/v_proj [K·Hd, D] -> attn.wk/wv [D, K, Hd]
  o_proj.weight [D, H·Hd]  -> attn.wo [H, Hd, D]     q/k/v_proj.bias    -> attn.bq/bk/bv [H|K, Hd]
  gate/up_proj [F, D]      -> mlp.w_gate/w_up [D, F] down_proj [D, F]   -> mlp.w_down [F, D]
  embed_tokens [V, D]      -> embedding [V, D]       lm_head [V, D]     -> lm_head [D, V]
RoPE follows HF's rotate-half convention in ``transformer.apply_rope``, so no q/k permutation is needed.
"""
from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from kljax.models.tokenizer import HFTokenizer, load_tokenizer
from kljax.models.transformer import TransformerLM, lm_config

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_MODEL_TYPES = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------ config
def _architecture(hf: dict, path) -> str:
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in _MODEL_TYPES:
        archs = [_MODEL_TYPES[hf["model_type"]]]
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    found = archs or [hf.get("model_type")]
    raise ValueError(
        f"unsupported architecture {found} in {os.path.join(path, 'config.json')}; "
        f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_theta(hf: dict, path) -> float:
    """rope_theta from transformers 5 (``rope_parameters``) or 4.x (top-level ``rope_theta``) configs."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for p in (params, scaling):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"rope_type={kind!r} in {os.path.join(path, 'config.json')} is not supported; "
                "only the default (unscaled) rotary embedding is implemented"
            )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, path=".", **overrides):
    """kljax ``lm_config`` equivalent to a Llama/Qwen2 ``config.json`` dict (``overrides`` win)."""
    arch = _architecture(hf, path)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu', SwiGLU as in Llama)")
    if arch == "LlamaForCausalLM" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("Llama configs with attention_bias=True or mlp_bias=True are not supported")
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 configs with use_sliding_window=True are not supported (full attention only)")
    heads = int(hf["num_attention_heads"])
    width = int(hf["hidden_size"])
    kw = dict(
        vocab_size=int(hf["vocab_size"]),
        width=width,
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or width // heads),
        mlp_dim=int(hf["intermediate_size"]),
        max_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=_rope_theta(hf, path),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
    )
    kw.update(overrides)
    return lm_config(**kw), arch


# ------------------------------------------------------------------------------------------ reading
class _Checkpoint:
    """Lazy access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, path):
        single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
            for shard in sorted(set(self.files.values())):
                if not os.path.exists(shard):
                    raise FileNotFoundError(f"shard {shard} listed in {index} does not exist")
        elif os.path.exists(single):
            self.files = {}
            with safe_open(single, framework="numpy") as f:
                for name in f.keys():
                    self.files[name] = single
        else:
            raise FileNotFoundError(
                f"no safetensors weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} "
                "(save with save_pretrained(..., safe_serialization=True))"
            )
        self.path = path

    def has(self, name):
        return name in self.files

    def get(self, name, shape):
        if name not in self.files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        with safe_open(self.files[name], framework="numpy") as f:
            x = f.get_tensor(name)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(
                f"tensor {name!r} has shape {list(x.shape)} in the checkpoint but the model expects {list(shape)}"
            )
        return x


def _hf_layout(cfg, arch):
    """Pairs (kljax path, HF name, HF shape, to_kljax, to_hf) for every LM parameter."""
    d, v, f = cfg.width, cfg.vocab_size, cfg.mlp_dim
    h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rows = [(("embedding",), "model.embed_tokens.weight", (v, d), lambda x: x, lambda x: x),
            (("final_norm", "scale"), "model.norm.weight", (d,), lambda x: x, lambda x: x)]
    if not cfg.tie_embeddings:
        rows.append((("lm_head",), "lm_head.weight", (v, d), lambda x: x.T, lambda x: x.T))

    def heads_in(n):   # [n·Hd, D] -> [D, n, Hd]
        return lambda x: x.T.reshape(d, n, hd), lambda x: x.reshape(d, n * hd).T

    def bias_in(n):    # [n·Hd] -> [n, Hd]
        return lambda x: x.reshape(n, hd), lambda x: x.reshape(n * hd)

    for i in range(cfg.depth):
        p = f"model.layers.{i}."
        rows += [
            (("blocks", i, "attn_norm", "scale"), p + "input_layernorm.weight", (d,), lambda x: x, lambda x: x),
            (("blocks", i, "mlp_norm", "scale"), p + "post_attention_layernorm.weight", (d,),
             lambda x: x, lambda x: x),
            (("blocks", i, "attn", "wq"), p + "self_attn.q_proj.weight", (h * hd, d), *heads_in(h)),
            (("blocks", i, "attn", "wk"), p + "self_attn.k_proj.weight", (k * hd, d), *heads_in(k)),
            (("blocks", i, "attn", "wv"), p + "self_attn.v_proj.weight", (k * hd, d), *heads_in(k)),
            (("blocks", i, "attn", "wo"), p + "self_attn.o_proj.weight", (d, h * hd),
             lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
            (("blocks", i, "mlp", "w_gate"), p + "mlp.gate_proj.weight", (f, d), lambda x: x.T, lambda x: x.T),
            (("blocks", i, "mlp", "w_up"), p + "mlp.up_proj.weight", (f, d), lambda x: x.T, lambda x: x.T),
            (("blocks", i, "mlp", "w_down"), p + "mlp.down_proj.weight", (d, f), lambda x: x.T, lambda x: x.T),
        ]
        if cfg.qkv_bias:
            rows += [
                (("blocks", i, "attn", "bq"), p + "self_attn.q_proj.bias", (h * hd,), *bias_in(h)),
                (("blocks", i, "attn", "bk"), p + "self_attn.k_proj.bias", (k * hd,), *bias_in(k)),
                (("blocks", i, "attn", "bv"), p + "self_attn.v_proj.bias", (k * hd,), *bias_in(k)),
            ]
    return rows


def _get_in(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_in(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def from_hf(path, *, dtype="float32", param_dtype="float32", max_len=None, value_head="none", num_atoms=1,
            seed=0, tokenizer=False):
    """Load a local Hugging Face Llama/Qwen2 checkpoint folder into a :class:`TransformerLM`.

    ``value_head``/``num_atoms`` add a freshly initialized (small random, seeded by ``seed``) value head on
    the pretrained body, e.g. for a Q♯ critic. ``max_len`` overrides ``max_position_embeddings``.
    ``tokenizer=True`` returns ``(model, tokenizer)``, the tokenizer read from the same folder by
    :func:`kljax.models.tokenizer.load_tokenizer` (an error if the folder has none, or if it produces ids past
    the model's vocabulary; a vocabulary padded larger than the tokenizer's is fine).
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {path}; a Hugging Face checkpoint folder needs one")
    with open(cfg_path) as f:
        hf = json.load(f)
    overrides = dict(dtype=dtype, param_dtype=param_dtype, value_head=value_head, num_atoms=num_atoms)
    if max_len is not None:
        overrides["max_len"] = int(max_len)
    cfg, arch = config_from_hf(hf, path, **overrides)
    ckpt = _Checkpoint(path)

    def build():
        return TransformerLM(cfg, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    pdt = jnp.dtype(param_dtype)
    for kpath, name, shape, to_kljax, _ in _hf_layout(cfg, arch):
        x = to_kljax(ckpt.get(name, shape))
        expected = _get_in(pure, kpath).shape
        assert x.shape == expected, (name, x.shape, expected)  # layout table bug, not user input
        _set_in(pure, kpath, jnp.asarray(x, dtype=pdt))
    if value_head != "none":
        # only the value head is initialized; jit drops the unused random draws of the body
        fresh = jax.jit(lambda: {k: v for k, v in nnx.to_pure_dict(nnx.state(build())).items()
                                 if k.startswith("value_")})()
        pure.update(fresh)
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    if not tokenizer:
        return model
    tok = load_tokenizer(path)
    check_vocab(cfg.vocab_size, tok, path)
    return model, tok


def check_vocab(model_vocab: int, tok: HFTokenizer, path="") -> None:
    """Raise unless every id of ``tok`` has an embedding row (extra, padding rows are fine)."""
    if tok.vocab_size > int(model_vocab):
        raise ValueError(f"the tokenizer in {path} has {tok.vocab_size} ids but the model's vocabulary "
                         f"(config.json vocab_size) is {int(model_vocab)}: they do not belong together")


# ------------------------------------------------------------------------------------------ writing
def config_to_hf(cfg, arch) -> dict:
    """config.json dict (transformers 5 layout, with the 4.x ``rope_theta`` key kept) for a kljax config."""
    hf = dict(
        architectures=[arch],
        model_type=SUPPORTED_ARCHITECTURES[arch],
        vocab_size=int(cfg.vocab_size),
        hidden_size=int(cfg.width),
        num_hidden_layers=int(cfg.depth),
        num_attention_heads=int(cfg.num_heads),
        num_key_value_heads=int(cfg.num_kv_heads),
        head_dim=int(cfg.head_dim),
        intermediate_size=int(cfg.mlp_dim),
        max_position_embeddings=int(cfg.max_len),
        rope_theta=float(cfg.rope_theta),
        rope_parameters=dict(rope_type="default", rope_theta=float(cfg.rope_theta)),
        rms_norm_eps=float(cfg.norm_eps),
        tie_word_embeddings=bool(cfg.tie_embeddings),
        hidden_act="silu",
        attention_dropout=0.0,
        dtype=str(jnp.dtype(cfg.param_dtype)),
    )
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def to_hf(model: TransformerLM, path, tokenizer=None) -> str:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors) in folder ``path``.

    Models with q/k/v biases are written as Qwen2ForCausalLM, others as LlamaForCausalLM. A value head
    has no Hugging Face counterpart and is not written (a warning says so). ``tokenizer`` (an
    :class:`HFTokenizer` or a folder holding one) is written beside the weights, and its EOS/BOS/pad ids go
    into config.json and generation_config.json, so ``AutoTokenizer``/``AutoModelForCausalLM`` load the
    folder as one model. Returns ``path``.
    """
    path = os.fspath(path)
    cfg = model.cfg  # resolved: num_kv_heads, head_dim and mlp_dim are filled in
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    if cfg.value_head != "none":
        warnings.warn(f"to_hf: the {cfg.value_head!r} value head is not written (Hugging Face has no such head)")
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors = {}
    for kpath, name, shape, _, to_hf_layout in _hf_layout(cfg, arch):
        x = np.asarray(jax.device_get(_get_in(pure, kpath)))
        tensors[name] = np.ascontiguousarray(to_hf_layout(x))
        assert tensors[name].shape == tuple(shape), (name, tensors[name].shape, shape)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
    hf = config_to_hf(cfg, arch)
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, HFTokenizer) else load_tokenizer(tokenizer)
        check_vocab(cfg.vocab_size, tok, getattr(tok, "path", ""))
        tok.save(path)
        ids = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
        hf.update(ids)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in ids.items() if v is not None}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    return path
