"""Tests of kljax.models: transformer LM (forward, causality, KV-cache decoding, GQA, value heads,
logical partition names) and the digits classifier."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kljax.models import (
    Classifier,
    TransformerLM,
    classifier_config,
    lm_config,
    positions_from_valid,
)

V, D = 13, 16


def tiny(**kw):
    # a large init std makes attention and positions matter, so the tests below are sensitive
    base = dict(vocab_size=V, width=D, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=24, max_len=16, init_std=0.4)
    base.update(kw)
    return TransformerLM(lm_config(**base), rngs=nnx.Rngs(0))


@nnx.jit
def fwd(model, tokens, positions=None, valid=None):
    return model(tokens, positions, valid)


@pytest.fixture(scope="module")
def lm():
    return tiny()


def random_tokens(b, t, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, V, (b, t)), jnp.int32)


# ------------------------------------------------------------------------------------------ config
def test_lm_config_defaults_and_unknown_field():
    cfg = lm_config(vocab_size=7)
    assert cfg.vocab_size == 7 and cfg.value_head == "none" and cfg.num_atoms == 1
    with pytest.raises(KeyError, match="num_layers"):
        lm_config(num_layers=2)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(width=18, num_heads=4), "head_dim"),
        (dict(value_head="q"), "value_head"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_config_raises_naming_field(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


# ------------------------------------------------------------------------------------------ forward
def test_forward_shapes_and_dtypes(lm):
    tokens = random_tokens(3, 5)
    logits = fwd(lm, tokens)
    assert logits.shape == (3, 5, V) and logits.dtype == jnp.float32
    h = lm.hidden(tokens)
    assert h.shape == (3, 5, D)
    assert lm.unembedding().shape == (D, V)
    np.testing.assert_allclose(lm.logits_from_hidden(h), logits, rtol=1e-5, atol=1e-5)
    # tied embeddings: the unembedding is the transposed embedding
    np.testing.assert_array_equal(lm.unembedding(), lm.embedding[...].T)
    assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_compute_still_returns_float32_logits():
    m = tiny(dtype="bfloat16", tie_embeddings=False)
    logits = fwd(m, random_tokens(2, 4))
    assert logits.dtype == jnp.float32
    assert m.unembedding().shape == (D, V)
    ref = fwd(tiny(tie_embeddings=False), random_tokens(2, 4))
    np.testing.assert_allclose(logits, ref, atol=0.1 * float(jnp.abs(ref).max()))


def test_causality(lm):
    tokens = random_tokens(2, 6)
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % V)
    a, b = fwd(lm, tokens), fwd(lm, changed)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert np.abs(np.asarray(a[:, 3:] - b[:, 3:])).max() > 1e-4


def test_rope_is_relative_shifting_positions_keeps_logits(lm):
    tokens = random_tokens(2, 6)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    np.testing.assert_allclose(fwd(lm, tokens, positions=pos + 5), fwd(lm, tokens), atol=1e-5)
    # but the model does see positions: a different spacing changes the logits
    assert np.abs(np.asarray(fwd(lm, tokens, positions=2 * pos) - fwd(lm, tokens))).max() > 1e-4


def test_left_padding_matches_unpadded_rows(lm):
    short = random_tokens(1, 3, seed=1)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1)
    valid = jnp.array([[0, 0, 0, 1, 1, 1]])
    out = fwd(lm, padded, positions=positions_from_valid(valid), valid=valid)
    np.testing.assert_allclose(out[:, 3:], fwd(lm, short), atol=1e-5)


def test_qkv_bias_model_runs_and_bias_matters():
    m = tiny(qkv_bias=True)
    tokens = random_tokens(2, 4)
    base = fwd(m, tokens)
    m.blocks[0].attn.bk[...] = jnp.ones_like(m.blocks[0].attn.bk[...])
    m.blocks[0].attn.bv[...] = jnp.ones_like(m.blocks[0].attn.bv[...])
    assert np.abs(np.asarray(fwd(m, tokens) - base)).max() > 1e-4


# ------------------------------------------------------------------------------------------ GQA
def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = tiny(num_heads=4, num_kv_heads=2)
    mha = tiny(num_heads=4, num_kv_heads=4)
    g = nnx.to_pure_dict(nnx.state(gqa, nnx.Param))
    m = nnx.to_pure_dict(nnx.state(mha, nnx.Param))
    for i, blk in g["blocks"].items():
        for name in blk["attn"]:
            w = blk["attn"][name]
            if name in ("wk", "wv"):  # query head j reads kv head j // group
                w = jnp.repeat(w, 2, axis=1)
            m["blocks"][i]["attn"][name] = w
        for part in ("mlp", "attn_norm", "mlp_norm"):
            m["blocks"][i][part] = blk[part]
    m["embedding"], m["final_norm"] = g["embedding"], g["final_norm"]
    state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(state, m)
    nnx.update(mha, state)
    tokens = random_tokens(2, 5)
    np.testing.assert_allclose(fwd(gqa, tokens), fwd(mha, tokens), atol=1e-5)
    assert gqa.blocks[0].attn.wk.shape == (D, 2, D // 4)


def test_multi_query_attention_single_kv_head():
    m = tiny(num_heads=4, num_kv_heads=1)
    assert fwd(m, random_tokens(2, 3)).shape == (2, 3, V)


# ------------------------------------------------------------------------------------------ KV cache
def _decode_all(model, tokens, valid, prefill_len, cache_len):
    pos = positions_from_valid(valid)
    cache = model.init_cache(tokens.shape[0], cache_len)
    step = nnx.jit(lambda m, t, p, c, v: m.decode(t, p, c, v))
    out, cache = step(model, tokens[:, :prefill_len], pos[:, :prefill_len], cache, valid[:, :prefill_len])
    outs = [out]
    for i in range(prefill_len, tokens.shape[1]):
        out, cache = step(model, tokens[:, i:i + 1], pos[:, i:i + 1], cache, valid[:, i:i + 1])
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


def test_decode_with_cache_equals_full_forward_left_padded(lm):
    # prompts of lengths 4, 2, 1 left-padded to 4, then 3 generated tokens each
    tokens = random_tokens(3, 7, seed=3)
    valid = jnp.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    tokens = jnp.where(valid > 0, tokens, 0)
    full = fwd(lm, tokens, positions=positions_from_valid(valid), valid=valid)
    dec, cache = _decode_all(lm, tokens, valid, prefill_len=4, cache_len=10)
    assert dec.shape == (3, 7, V) and dec.dtype == jnp.float32
    mask = np.asarray(valid) > 0
    np.testing.assert_allclose(np.asarray(dec)[mask], np.asarray(full)[mask], atol=1e-5)
    assert int(cache.index) == 7
    np.testing.assert_array_equal(cache.key_valid[:, :7], valid)
    np.testing.assert_array_equal(cache.key_valid[:, 7:], 0)
    # a finished row (valid 0 on a step) does not let later queries attend to that slot
    row = fwd(lm, tokens[2:, 3:], positions=jnp.arange(4)[None])  # row 2 alone, unpadded
    np.testing.assert_allclose(dec[2:, 3:], row, atol=1e-5)


def test_decode_skips_invalid_step_tokens(lm):
    tokens = random_tokens(1, 5, seed=4)
    valid = jnp.array([[1, 1, 0, 1, 1]])  # slot 2 is a pad emitted mid-sequence (e.g. after EOS)
    dec, _ = _decode_all(lm, tokens, valid, prefill_len=2, cache_len=8)
    kept = tokens[:, jnp.array([0, 1, 3, 4])]
    pos = jnp.array([[0, 1, 2, 3]])
    ref = fwd(lm, kept, positions=pos)
    np.testing.assert_allclose(dec[:, jnp.array([0, 1, 3, 4])], ref, atol=1e-5)


def test_cache_is_a_pytree_of_arrays(lm):
    cache = lm.init_cache(2, 8)
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 2 * 2 + 2
    assert cache.key_valid.shape == (2, 8) and cache.index.dtype == jnp.int32
    assert cache.k[0].shape == (2, 8, 2, D // 4)


# ------------------------------------------------------------------------------------------ value head
@pytest.mark.parametrize(
    "head, atoms, shape",
    [("scalar", 1, (2, 3)), ("scalar", 5, (2, 3, 5)), ("token", 1, (2, 3, V)), ("token", 4, (2, 3, V, 4))],
)
def test_value_head_shapes(head, atoms, shape):
    m = tiny(value_head=head, num_atoms=atoms, depth=1)
    vals = nnx.jit(lambda mod, t: mod.values(mod.hidden(t)))(m, random_tokens(2, 3))
    assert vals.shape == shape and vals.dtype == jnp.float32
    assert np.abs(np.asarray(m.value_kernel[...])).max() > 0  # small random, not zeros


def test_value_head_gives_body_gradient():
    m = tiny(value_head="scalar", depth=1)
    tokens = random_tokens(2, 3)

    def loss(model):
        return jnp.sum(model.values(model.hidden(tokens)) ** 2)

    grads = nnx.jit(nnx.grad(loss))(m)
    g = np.asarray(grads.blocks[0].mlp.w_down[...])
    assert np.abs(g).max() > 0


def test_values_without_head_raises(lm):
    with pytest.raises(ValueError, match="value_head"):
        lm.values(jnp.zeros((1, 2, D)))


# ------------------------------------------------------------------------------------------ sharding names
def test_partition_specs_carry_logical_names():
    m = tiny(tie_embeddings=False, value_head="token")
    specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
    spec = lambda v: tuple(v.value) if hasattr(v, "value") else tuple(v)  # noqa: E731
    assert spec(specs["embedding"]) == ("vocab", "embed")
    assert spec(specs["lm_head"]) == ("embed", "vocab")
    attn = specs["blocks"][0]["attn"]
    assert spec(attn["wq"]) == ("embed", "heads", "kv")
    assert spec(attn["wo"]) == ("heads", "kv", "embed")
    mlp = specs["blocks"][0]["mlp"]
    assert spec(mlp["w_gate"]) == ("embed", "mlp") and spec(mlp["w_down"]) == ("mlp", "embed")
    allowed = {"embed", "mlp", "heads", "kv", "vocab", None}
    names = jax.tree.leaves(jax.tree.map(spec, specs, is_leaf=lambda x: hasattr(x, "value")),
                            is_leaf=lambda x: isinstance(x, tuple))
    for n in names:
        assert set(n) <= allowed


# ------------------------------------------------------------------------------------------ classifier
def test_classifier_config_unknown_field():
    with pytest.raises(KeyError, match="layers"):
        classifier_config(layers=3)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_classifier_shapes_and_dropout(kind):
    m = Classifier(classifier_config(kind=kind, hidden=(16,), channels=(4,), dropout=0.5), nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(0).rand(3, 8, 8), jnp.float32)
    a, b = m(x), m(x)
    assert a.shape == (3, 10) and a.dtype == jnp.float32
    assert np.abs(np.asarray(a - b)).max() > 0  # two stochastic passes differ (R-Drop)
    m.eval()
    np.testing.assert_array_equal(m(x), m(x))
    with pytest.raises(ValueError, match="images"):
        m(jnp.ones((3, 4, 4)))


def test_classifier_loss_decreases():
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.rand(16, 8, 8), jnp.float32)
    y = jnp.asarray(rs.randint(0, 10, 16))
    m = Classifier(classifier_config(hidden=(32,)), nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    first = float(step(m, opt))
    for _ in range(20):
        last = float(step(m, opt))
    assert last < 0.5 * first


def test_decode_past_cache_end_raises(lm):
    cache = lm.init_cache(1, 3)
    with pytest.raises(ValueError, match="max_len=3"):
        lm.decode(random_tokens(1, 4), jnp.arange(4)[None], cache, jnp.ones((1, 4), jnp.int32))


def test_sharded_by_logical_names_gives_same_logits(lm):
    # map the logical names onto a 2×2×2 mesh of the 8 virtual CPU devices (conftest) and compare
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": None, "kv": None}  # V=13 is odd
    graphdef, state = nnx.split(lm)
    specs = nnx.get_partition_spec(state)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    shardings = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*[rules.get(a) for a in s])),
        specs, is_leaf=is_spec)
    sharded = jax.device_put(state, shardings)
    assert tuple(sharded["blocks"][0]["mlp"]["w_gate"][...].sharding.spec) == ("fsdp", "tensor")
    tokens = random_tokens(4, 5)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(sharded, tokens)
    np.testing.assert_allclose(out, fwd(lm, tokens), atol=1e-5)


@pytest.mark.parametrize("atoms,objective", [(1, "qsharp_bce"), (3, "qsharp_histogram")])
def test_values_at_taken_tokens_equals_the_gathered_token_head(atoms, objective):
    """The Q♯ critic loss reads the token head only at the taken tokens (`values_at`): the same loss
    and gradient as gathering from the full [B, T, V(, A)] outputs."""
    from kljax import objectives
    from kljax.train import qsharp
    lm = TransformerLM(lm_config(vocab_size=11, width=16, depth=1, num_heads=2, max_len=8, value_head="token",
                                 num_atoms=atoms, value_init_std=0.5), rngs=nnx.Rngs(0))
    r = np.random.default_rng(0)
    tokens = jnp.asarray(r.integers(0, 11, (3, 8)), jnp.int32)
    valid = jnp.ones((3, 8), bool)
    batch = {"tokens": tokens, "positions": positions_from_valid(valid), "valid": valid,
             "returns": jnp.asarray([1.0, 0.0, 1.0]), "mask": jnp.asarray(r.integers(0, 2, (3, 8)), jnp.float32)}
    h = lm.hidden(tokens, positions=batch["positions"], valid=valid)
    full = lm.values(h)
    idx = tokens[..., None] if atoms == 1 else tokens[..., None, None]
    gathered = jnp.take_along_axis(full, idx, axis=2)[:, :, 0]
    np.testing.assert_allclose(lm.values_at(h, tokens), gathered, rtol=1e-5, atol=1e-6)
    obj = objectives.get(objective)
    hp = {"atoms": jnp.linspace(0.0, 1.0, atoms)} if atoms > 1 else {}

    def dense(model):
        out = qsharp.critic_outputs(model, tokens, batch["positions"], valid)[:, :-1]
        return obj(out, tokens[:, 1:], batch["returns"], batch["mask"][:, :-1], **hp)[0]

    def taken(model):
        return qsharp.critic_loss(model, batch, None, objective=obj, hparams=hp)[0]
    (ld, gd), (lt, gt) = (nnx.value_and_grad(f)(lm) for f in (dense, taken))
    np.testing.assert_allclose(lt, ld, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), nnx.state(gt), nnx.state(gd))
