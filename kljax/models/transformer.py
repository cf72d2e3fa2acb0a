"""Decoder-only transformer language model (Llama / Qwen2 layout) in Flax NNX, with a KV cache.

Layout per block (pre-norm, as in Llama):  x += Attn(RMSNorm(x));  x += SwiGLU(RMSNorm(x)).
Attention uses grouped KV heads (GQA) and rotary position embeddings in Hugging Face's
"rotate-half" convention, so weights imported from a Llama or Qwen2 checkpoint give the same logits.

Parameters carry logical axis names from {"embed", "mlp", "heads", "kv", "vocab", None}
(``kv`` is the per-head feature axis); the train helpers map these to mesh axes.

Decoding: prompts are LEFT-padded, so every row writes its new keys at the same cache slots
``cache.index .. cache.index + L - 1``; ``cache.key_valid`` records which slots hold real tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

VALUE_HEADS = ("none", "scalar", "token")

_LM_DEFAULTS = dict(
    vocab_size=53,
    width=64,
    depth=3,
    num_heads=4,
    num_kv_heads=None,      # None -> num_heads (plain multi-head attention)
    head_dim=None,          # None -> width // num_heads
    mlp_dim=None,           # None -> 4 * width
    max_len=64,
    rope_theta=10000.0,
    norm_eps=1e-6,
    tie_embeddings=True,
    qkv_bias=False,         # Qwen2 has biases on the q/k/v projections
    dtype="float32",        # activation / compute dtype
    param_dtype="float32",
    value_head="none",      # "none" | "scalar" | "token"
    num_atoms=1,            # > 1: histogram over atoms per value output
    value_init_std=None,    # None -> 0.1 / sqrt(width); never zero (a zero head blocks body gradients)
    init_std=0.02,          # std of the normal initializer of embeddings and projections
)


def lm_config(**kwargs) -> ml_collections.ConfigDict:
    """Config of a :class:`TransformerLM`; unset fields take defaults, unknown fields raise ``KeyError``."""
    unknown = sorted(set(kwargs) - set(_LM_DEFAULTS))
    if unknown:
        raise KeyError(f"lm_config got unknown field(s) {unknown}; valid fields are {sorted(_LM_DEFAULTS)}")
    cfg = ml_collections.ConfigDict(dict(_LM_DEFAULTS))
    for k, v in kwargs.items():
        if k in ("dtype", "param_dtype"):
            v = jnp.dtype(v).name  # accept jnp.bfloat16 as well as "bfloat16"
        cfg[k] = v  # ConfigDict keeps None-typed fields open to any type
    return cfg


def _resolved(cfg) -> dict:
    """Validate ``cfg`` and fill the derived fields (kv heads, head_dim, mlp_dim, value std)."""
    c = {k: cfg.get(k, v) for k, v in _LM_DEFAULTS.items()}
    extra = sorted(set(cfg.keys()) - set(_LM_DEFAULTS))
    if extra:
        raise KeyError(f"model config has unknown field(s) {extra}; valid fields are {sorted(_LM_DEFAULTS)}")
    for name in ("vocab_size", "width", "depth", "num_heads", "max_len", "num_atoms"):
        if int(c[name]) < 1:
            raise ValueError(f"{name}={c[name]!r} must be a positive integer")
    if c["num_kv_heads"] is None:
        c["num_kv_heads"] = c["num_heads"]
    if c["num_heads"] % c["num_kv_heads"] != 0:
        raise ValueError(
            f"num_heads={c['num_heads']} must be a multiple of num_kv_heads={c['num_kv_heads']} (grouped KV heads)"
        )
    if c["head_dim"] is None:
        if c["width"] % c["num_heads"] != 0:
            raise ValueError(
                f"width={c['width']} is not divisible by num_heads={c['num_heads']}; set head_dim explicitly"
            )
        c["head_dim"] = c["width"] // c["num_heads"]
    if c["head_dim"] % 2 != 0:
        raise ValueError(f"head_dim={c['head_dim']} must be even (rotary embeddings rotate pairs)")
    if c["mlp_dim"] is None:
        c["mlp_dim"] = 4 * c["width"]
    if c["value_head"] not in VALUE_HEADS:
        raise ValueError(f"value_head={c['value_head']!r} is not one of {list(VALUE_HEADS)}")
    if c["value_init_std"] is None:
        c["value_init_std"] = 0.1 / math.sqrt(c["width"])
    if not c["value_init_std"] > 0:
        raise ValueError(
            f"value_init_std={c['value_init_std']!r} must be > 0: a zero value head on a pretrained body gives "
            "the body exactly zero gradient"
        )
    c["dtype"] = jnp.dtype(c["dtype"])
    c["param_dtype"] = jnp.dtype(c["param_dtype"])
    return c


def _param(rngs, shape, names, dtype, std=None):
    """A parameter drawn from N(0, std²) (zeros if std is None, ones if std == 'ones') with logical axis names."""
    if std is None:
        init = nnx.initializers.zeros
    elif std == "ones":
        init = nnx.initializers.ones
    else:
        init = nnx.initializers.normal(std)
    # eager_sharding=False: the names are logical, not mesh axes; the train helpers map them with their
    # rules and place the parameters through jit out_shardings.
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype), eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, computed in float32 (as HF Llama/Qwen2 do)."""

    def __init__(self, dim, eps, dtype, param_dtype, rngs):
        self.scale = _param(rngs, (dim,), ("embed",), param_dtype, "ones")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before multiplying by the weight
        return (x32.astype(self.dtype) * self.scale[...].astype(self.dtype)).astype(self.dtype)


def rope_tables(positions, head_dim, theta):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (HF: emb = concat(freqs, freqs))."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, N, Hd] by angles: x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def positions_from_valid(valid):
    """Positions of LEFT-padded rows: 0 at the first real token, counting real tokens; pads get 0."""
    valid = jnp.asarray(valid).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


_NEG = -1e30


class Attention(nnx.Module):
    """Causal self-attention with grouped KV heads and rotary positions."""

    def __init__(self, c, rngs):
        d, h, k, hd = c["width"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
        std, pd = c["init_std"], c["param_dtype"]
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
        self.rope_theta = c["rope_theta"]
        self.dtype = c["dtype"]
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "kv"), pd, std)
        self.wk = _param(rngs, (d, k, hd), ("embed", "heads", "kv"), pd, std)
        self.wv = _param(rngs, (d, k, hd), ("embed", "heads", "kv"), pd, std)
        self.wo = _param(rngs, (h, hd, d), ("heads", "kv", "embed"), pd, std / math.sqrt(2 * c["depth"]))
        self.qkv_bias = bool(c["qkv_bias"])
        if self.qkv_bias:
            self.bq = _param(rngs, (h, hd), ("heads", "kv"), pd)
            self.bk = _param(rngs, (k, hd), ("heads", "kv"), pd)
            self.bv = _param(rngs, (k, hd), ("heads", "kv"), pd)

    def project_qkv(self, x, positions):
        dt = self.dtype
        q = jnp.einsum("btd,dnh->btnh", x, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dnh->btnh", x, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dnh->btnh", x, self.wv[...].astype(dt))
        if self.qkv_bias:
            q = q + self.bq[...].astype(dt)
            k = k + self.bk[...].astype(dt)
            v = v + self.bv[...].astype(dt)
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        """q [B,T,H,Hd], k/v [B,S,K,Hd], mask [B,T,S] bool -> [B,T,D]."""
        b, t, h, hd = q.shape
        groups = h // self.num_kv_heads
        qg = q.reshape(b, t, self.num_kv_heads, groups, hd)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, h, hd)
        return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(self.dtype))


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) · up(x))."""

    def __init__(self, c, rngs):
        d, f, std, pd = c["width"], c["mlp_dim"], c["init_std"], c["param_dtype"]
        self.dtype = c["dtype"]
        self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), pd, std)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), pd, std / math.sqrt(2 * c["depth"]))

    def __call__(self, x):
        dt = self.dtype
        gate = x @ self.w_gate[...].astype(dt)
        up = x @ self.w_up[...].astype(dt)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, c, rngs):
        self.attn_norm = RMSNorm(c["width"], c["norm_eps"], c["dtype"], c["param_dtype"], rngs)
        self.attn = Attention(c, rngs)
        self.mlp_norm = RMSNorm(c["width"], c["norm_eps"], c["dtype"], c["param_dtype"], rngs)
        self.mlp = MLP(c, rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        """Returns (x, (k, v)) where (k, v) are this call's keys/values, or the updated cache slices."""
        q, k, v = self.attn.project_qkv(self.attn_norm(x), positions)
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        x = x + self.attn.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x, (k, v)


@flax.struct.dataclass
class KVCache:
    """Decoding state: per-layer keys/values [B, S, K, Hd], key_valid [B, S] int32, write index (int32 scalar)."""

    k: tuple
    v: tuple
    key_valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


class TransformerLM(nnx.Module):
    """Decoder-only LM: tokens [B, T] -> float32 logits [B, T, V]; optional value head on the final hidden state."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = _resolved(cfg)
        # the resolved config (derived fields filled in), frozen so it is hashable static data under nnx.jit
        self.cfg = ml_collections.FrozenConfigDict(
            {**c, "dtype": c["dtype"].name, "param_dtype": c["param_dtype"].name}
        )
        self.vocab_size, self.width, self.max_len = c["vocab_size"], c["width"], c["max_len"]
        self.num_kv_heads, self.head_dim = c["num_kv_heads"], c["head_dim"]
        self.dtype = c["dtype"]
        self.tie_embeddings = bool(c["tie_embeddings"])
        self.value_head = c["value_head"]
        self.num_atoms = int(c["num_atoms"])
        pd, std = c["param_dtype"], c["init_std"]
        self.embedding = _param(rngs, (c["vocab_size"], c["width"]), ("vocab", "embed"), pd, std)
        self.blocks = nnx.List([Block(c, rngs) for _ in range(c["depth"])])
        self.final_norm = RMSNorm(c["width"], c["norm_eps"], c["dtype"], pd, rngs)
        if not self.tie_embeddings:
            self.lm_head = _param(rngs, (c["width"], c["vocab_size"]), ("embed", "vocab"), pd, std)
        vstd = c["value_init_std"]
        if self.value_head == "scalar":
            self.value_kernel = _param(rngs, (c["width"], self.num_atoms), ("embed", None), pd, vstd)
            self.value_bias = _param(rngs, (self.num_atoms,), (None,), pd)
        elif self.value_head == "token":
            self.value_kernel = _param(
                rngs, (c["width"], c["vocab_size"], self.num_atoms), ("embed", "vocab", None), pd, vstd
            )
            self.value_bias = _param(rngs, (c["vocab_size"], self.num_atoms), ("vocab", None), pd)

    # ---------------------------------------------------------------- full-sequence forward
    def hidden(self, tokens, positions=None, valid=None):
        """Final-norm hidden states [B, T, D].

        ``valid`` [B, T] (1 = real token) masks padded keys. ``positions`` default to ``arange(T)``;
        for LEFT-padded rows pass ``positions_from_valid(valid)`` so each row's first real token is at 0.
        Outputs at padded query positions are finite but meaningless (mask them in losses).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T], got {list(tokens.shape)}")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
        if valid is not None:
            mask = causal & (jnp.asarray(valid) > 0)[:, None, :]
        else:
            mask = jnp.broadcast_to(causal, (b, t, t))
        x = self._embed(tokens)
        for block in self.blocks:
            x, _ = block(x, positions, mask)
        return self.final_norm(x)

    def __call__(self, tokens, positions=None, valid=None):
        return self.logits_from_hidden(self.hidden(tokens, positions, valid))

    def _embed(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def unembedding(self):
        """[D, V] output projection (the transposed embedding when tied)."""
        if self.tie_embeddings:
            return self.embedding[...].T
        return self.lm_head[...]

    def logits_from_hidden(self, h):
        w = self.unembedding().astype(self.dtype)
        return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32).astype(jnp.float32)

    def values(self, h):
        """Value head on hidden states: scalar -> [B,T] ([B,T,A] if atoms>1); token -> [B,T,V] ([B,T,V,A])."""
        if self.value_head == "none":
            raise ValueError("this model has no value head; build it with lm_config(value_head='scalar' or 'token')")
        w = self.value_kernel[...].astype(self.dtype)
        if self.value_head == "scalar":
            out = jnp.einsum("btd,da->bta", h, w, preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("btd,dva->btva", h, w, preferred_element_type=jnp.float32)
        out = out + self.value_bias[...].astype(jnp.float32)
        return out[..., 0] if self.num_atoms == 1 else out

    def values_at(self, h, tokens):
        """Token value head read only at `tokens` [B, T]: [B, T] ([B, T, A] if atoms > 1), equal to
        `values(h)` gathered there, without forming the [B, T, V] outputs (the head's columns of the
        taken tokens are gathered instead: B·T·D, not B·T·V)."""
        if self.value_head != "token":
            raise ValueError("values_at reads a per-token value head; build the model with value_head='token'")
        w = jnp.take(self.value_kernel[...], tokens, axis=1).astype(self.dtype)  # [D, B, T, A]
        out = jnp.einsum("btd,dbta->bta", h, w, preferred_element_type=jnp.float32)
        out = out + jnp.take(self.value_bias[...], tokens, axis=0).astype(jnp.float32)
        return out[..., 0] if self.num_atoms == 1 else out

    # ---------------------------------------------------------------- cached decoding
    def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        """Empty cache for ``batch_size`` rows and ``max_len`` slots (default: the config's max_len)."""
        s = self.max_len if max_len is None else int(max_len)
        if s < 1:
            raise ValueError(f"max_len={max_len!r} must be a positive integer")
        shape = (int(batch_size), s, self.num_kv_heads, self.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in self.blocks)
        zeros_v = tuple(jnp.zeros(shape, self.dtype) for _ in self.blocks)
        return KVCache(k=zeros, v=zeros_v, key_valid=jnp.zeros((int(batch_size), s), jnp.int32),
                       index=jnp.zeros((), jnp.int32))

    def decode_hidden(self, tokens, positions, cache: KVCache, valid=None):
        """Append L tokens at slots cache.index.. and return (final-norm hidden [B, L, D], new cache)."""
        tokens = jnp.asarray(tokens)
        b, l = tokens.shape
        if valid is None:
            valid = jnp.ones((b, l), jnp.int32)
        index = cache.index
        if not isinstance(index, jax.core.Tracer) and int(index) + l > cache.max_len:
            # under jit this cannot be checked; dynamic_update_slice would silently clamp the write
            raise ValueError(
                f"decode would write slots {int(index)}..{int(index) + l - 1} but the cache has "
                f"max_len={cache.max_len}; call init_cache with a larger max_len"
            )
        key_valid = jax.lax.dynamic_update_slice_in_dim(
            cache.key_valid, jnp.asarray(valid).astype(jnp.int32), index, axis=1
        )
        s = key_valid.shape[1]
        query_slot = index + jnp.arange(l, dtype=jnp.int32)
        causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= query_slot[:, None]  # [L, S]
        mask = causal[None] & (key_valid > 0)[:, None, :]
        x = self._embed(tokens)
        new_k, new_v = [], []
        for block, ck, cv in zip(self.blocks, cache.k, cache.v):
            x, (k, v) = block(x, positions, mask, kv=(ck, cv), index=index)
            new_k.append(k)
            new_v.append(v)
        new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), key_valid=key_valid, index=index + l)
        return self.final_norm(x), new_cache

    def decode(self, tokens, positions, cache: KVCache, valid=None):
        """Append L tokens to the cache; return (float32 logits [B, L, V], updated cache)."""
        h, cache = self.decode_hidden(tokens, positions, cache, valid)
        return self.logits_from_hidden(h), cache
