"""Small image classifiers (MLP or tiny CNN) for the 8×8 digits task: images [B, 8, 8] -> logits [B, 10].

Dropout is optional; with ``dropout > 0`` two calls in training mode draw different masks (the two
stochastic passes R-Drop compares). ``model.eval()`` / ``model.train()`` or ``deterministic=`` switch it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

CLASSIFIER_KINDS = ("mlp", "cnn")

_CLS_DEFAULTS = dict(
    kind="mlp",             # "mlp" | "cnn"
    image_shape=(8, 8),
    num_classes=10,
    hidden=(64,),           # MLP hidden widths; for the CNN, the width of the dense layer after the convs
    channels=(16, 32),      # CNN only: channels of each 3×3 conv (each followed by ReLU)
    dropout=0.0,
    dtype="float32",
    param_dtype="float32",
)


def classifier_config(**kwargs) -> ml_collections.ConfigDict:
    """Config of a :class:`Classifier`; unset fields take defaults, unknown fields raise ``KeyError``."""
    unknown = sorted(set(kwargs) - set(_CLS_DEFAULTS))
    if unknown:
        raise KeyError(
            f"classifier_config got unknown field(s) {unknown}; valid fields are {sorted(_CLS_DEFAULTS)}"
        )
    cfg = ml_collections.ConfigDict(dict(_CLS_DEFAULTS))
    for k, v in kwargs.items():
        if k in ("dtype", "param_dtype"):
            v = jnp.dtype(v).name
        cfg[k] = tuple(v) if isinstance(v, list) else v
    return cfg


class Classifier(nnx.Module):
    """MLP (flatten -> [dense, relu, dropout]* -> dense) or tiny CNN (3×3 convs -> dense) classifier."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        kind = cfg.kind
        if kind not in CLASSIFIER_KINDS:
            raise ValueError(f"kind={kind!r} is not one of {list(CLASSIFIER_KINDS)}")
        if not 0.0 <= float(cfg.dropout) < 1.0:
            raise ValueError(f"dropout={cfg.dropout!r} is outside its valid range [0, 1)")
        if int(cfg.num_classes) < 2:
            raise ValueError(f"num_classes={cfg.num_classes!r} must be at least 2")
        self.kind = kind
        self.image_shape = tuple(int(s) for s in cfg.image_shape)
        self.dtype = jnp.dtype(cfg.dtype)
        pd = jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=pd, rngs=rngs)
        h, w = self.image_shape
        if kind == "cnn":
            convs, c_in = [], 1
            for c in cfg.channels:
                convs.append(nnx.Conv(c_in, int(c), kernel_size=(3, 3), padding="SAME", **kw))
                c_in = int(c)
            self.convs = nnx.List(convs)
            d_in = h * w * c_in
        else:
            self.convs = nnx.List([])
            d_in = h * w
        dense = []
        for width in cfg.hidden:
            dense.append(nnx.Linear(d_in, int(width), **kw))
            d_in = int(width)
        self.hidden_layers = nnx.List(dense)
        self.dropout = nnx.Dropout(float(cfg.dropout), rngs=rngs)
        self.out = nnx.Linear(d_in, int(cfg.num_classes), **kw)

    def __call__(self, images, *, deterministic=None, rngs=None):
        """images [B, H, W] (or [B, H, W, 1]) -> float32 logits [B, num_classes]."""
        x = jnp.asarray(images, self.dtype)
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"images must have shape [B, {self.image_shape[0]}, {self.image_shape[1]}], "
                             f"got {list(x.shape)}")
        if self.kind == "cnn":
            x = x[..., None]
            for conv in self.convs:
                x = jax.nn.relu(conv(x))
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden_layers:
            x = self.dropout(jax.nn.relu(layer(x)), deterministic=deterministic, rngs=rngs)
        return self.out(x).astype(jnp.float32)
