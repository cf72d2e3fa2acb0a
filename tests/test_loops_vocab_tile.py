"""The RL update computes log-probs and entropy by vocabulary tiles when `rl.vocab_tile` asks (or, by
default, above a vocabulary threshold); the loss, its metrics and its gradient equal the dense path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kljax.config import rl_base_config
from kljax.models import TransformerLM, lm_config
from kljax.train import rl

V, P, N, G = 29, 4, 5, 3  # vocabulary (tile 8 does not divide it), prompt, completion, group size


def _cfg(tile, **objective):
    cfg = rl_base_config({"name": "grpo", "beta": 0.04, "kl_estimator": "k3", **objective})
    cfg.rl.vocab_tile = tile
    return cfg


def _batch():
    rng = np.random.default_rng(0)
    rows = 2 * G
    seq = jnp.asarray(rng.integers(0, V, (rows, P + N)), jnp.int32)
    mask = np.ones((rows, N), np.float32)
    mask[0, 3:] = 0.0  # a finished row: its padded tokens must not count
    valid = jnp.asarray(np.concatenate([np.ones((rows, P), np.int32), mask.astype(np.int32)], 1))
    return {
        "sequences": seq, "valid": valid, "mask": jnp.asarray(mask),
        "old_logp": jnp.asarray(rng.normal(-3.0, 0.3, (rows, N)), jnp.float32),
        "ref_logp": jnp.asarray(rng.normal(-3.0, 0.3, (rows, N)), jnp.float32),
        "rewards": jnp.asarray(rng.integers(0, 2, rows), jnp.float32),
    }


@pytest.fixture(scope="module")
def model():
    return TransformerLM(lm_config(vocab_size=V, width=16, depth=1, num_heads=2, max_len=16), rngs=nnx.Rngs(0))


def _loss_and_grad(model, cfg):
    loss_fn = rl.make_rl_loss(cfg, P, G)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, batch):
        def f(params):
            return loss_fn(nnx.merge(graphdef, params, rest), batch, None)
        return jax.value_and_grad(f, has_aux=True)(params)

    return run(params, _batch())


def test_tiled_update_equals_dense(model):
    (loss_d, m_d), g_d = _loss_and_grad(model, _cfg(0))
    (loss_t, m_t), g_t = _loss_and_grad(model, _cfg(8))
    np.testing.assert_allclose(loss_t, loss_d, rtol=1e-5, atol=1e-6)
    for k in ("entropy", "kl"):
        np.testing.assert_allclose(m_t[k], m_d[k], rtol=1e-5, atol=1e-6)
    assert float(m_d["entropy"]) > 0
    flat_d, flat_t = jax.tree.leaves(g_d), jax.tree.leaves(g_t)
    assert len(flat_d) == len(flat_t)
    for a, b in zip(flat_t, flat_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vocab_tile_choice(model):
    kw = {"kl_estimator": "k3"}
    assert rl.update_vocab_tile(_cfg(8), kw, model) == 8
    assert rl.update_vocab_tile(_cfg(0), kw, model) == 0
    assert rl.update_vocab_tile(_cfg(-1), kw, model) == 0  # V = 29 is below the auto threshold

    class Big:
        def hidden(self):
            pass

        def unembedding(self):
            return jnp.zeros((1, rl.VOCAB_TILE_AUTO[0]))

    assert rl.update_vocab_tile(_cfg(-1), kw, Big()) == rl.VOCAB_TILE_AUTO[1]
    # Objectives that read full logits keep them, and asking for tiles with them is an error.
    assert rl.update_vocab_tile(_cfg(-1), {"kl_estimator": "exact"}, Big()) == 0
    with pytest.raises(ValueError, match="rl.vocab_tile"):
        rl.update_vocab_tile(_cfg(8), {"kl_estimator": "exact"}, model)
