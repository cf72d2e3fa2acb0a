"""Tests of kljax.sampling: cached generate against full forward passes, processors, EOS, padding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kljax import sampling
from kljax.models import TransformerLM, lm_config, positions_from_valid

V = 11
EOS = 3
PAD = 0


def make_model(seed=0, vocab=V):
    cfg = lm_config(vocab_size=vocab, width=16, depth=2, num_heads=2, max_len=32)
    model = TransformerLM(cfg, rngs=nnx.Rngs(seed))
    # At initialization attention is nearly uniform, so positions would barely matter; larger
    # weights make attention sharp, so a wrong position or mask changes the logits visibly.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda w: 4.0 * w, params))
    return model


@pytest.fixture(scope="module")
def model():
    return make_model(0)


_FULL = {}


def full_logits(model, tokens, valid):
    """The uncached full forward pass on LEFT-padded (possibly internally invalid) sequences."""
    graphdef, state = nnx.split(model)
    if id(model) not in _FULL:   # one compiled forward per model object (graphdefs hold a ConfigDict)
        def fwd(state, tokens, valid):
            m = nnx.merge(graphdef, state)
            return m(tokens, positions=positions_from_valid(valid), valid=valid)
        _FULL[id(model)] = (model, jax.jit(fwd))
    fwd = _FULL[id(model)][1]
    return np.asarray(fwd(state, jnp.asarray(tokens), jnp.asarray(valid, jnp.int32)))


def left_padded_batch():
    # rows of prompt length 4, 2, 3 (P = 4), tokens avoid EOS so prompts never "end".
    prompts = np.array([[5, 6, 7, 8], [0, 0, 9, 4], [0, 10, 2, 6]], np.int32)
    valid = (np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]]) > 0).astype(np.int32)
    return prompts, valid


def process_np(logits, temperature=1.0, top_k=0, top_p=1.0):
    x = jnp.asarray(logits, jnp.float32)
    if temperature > 0:
        x = sampling.temperature_processor(x, temperature=temperature)
    x = sampling.top_k_processor(x, k=top_k)
    return np.asarray(sampling.top_p_processor(x, p=top_p))


# ------------------------------------------------------------------------------------------
# processors on known logits
# ------------------------------------------------------------------------------------------

def test_top_p_keeps_smallest_set_with_mass_at_least_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)   # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.log(probs)[None]
    kept = lambda p: set(np.nonzero(np.isfinite(np.asarray(sampling.top_p_processor(logits, p=p))[0]))[0])
    assert kept(0.3) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.85) == {1, 3, 2}
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    kept_logits = np.asarray(sampling.top_p_processor(logits, p=0.75))[0]
    np.testing.assert_allclose(kept_logits[[1, 3]], np.log(probs[[1, 3]]), rtol=1e-6)


def test_top_k_keeps_k_largest_and_temperature_scales():
    logits = jnp.array([[1.0, 4.0, 3.0, -2.0, 0.5]])
    out = np.asarray(sampling.top_k_processor(logits, k=2))[0]
    assert set(np.nonzero(np.isfinite(out))[0]) == {1, 2}
    assert np.all(np.asarray(sampling.top_k_processor(logits, k=0)) == np.asarray(logits))
    np.testing.assert_allclose(sampling.temperature_processor(logits, temperature=0.5), logits * 2.0)
    both = sampling.compose(functools.partial(sampling.temperature_processor, temperature=0.5),
                            functools.partial(sampling.top_k_processor, k=1))
    out = np.asarray(both(logits, None))[0]
    assert np.isfinite(out).sum() == 1 and out[1] == 8.0
    assert int(sampling.greedy(logits)[0]) == 1


def test_bad_hyperparameters_raise_naming_the_argument(model):
    prompts, valid = left_padded_batch()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(model, prompts, valid, key, 2, EOS, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampling.generate(model, prompts, valid, key, 2, EOS, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(model, prompts, valid, key, 0, EOS)
    right_padded = valid[:, ::-1]
    with pytest.raises(ValueError, match="LEFT-padded"):
        sampling.generate(model, prompts, right_padded, key, 2, EOS)


# ------------------------------------------------------------------------------------------
# generate vs the full forward pass
# ------------------------------------------------------------------------------------------

N = 6


def test_greedy_equals_argmax_of_full_forward_on_growing_sequence(model):
    prompts, valid = left_padded_batch()
    out = sampling.generate(model, prompts, valid, jax.random.key(0), N, eos_id=None, temperature=0.0)
    seq, val = prompts.copy(), valid.copy()
    for _ in range(N):
        logits = full_logits(model, seq, val)[:, -1]
        nxt = logits.argmax(-1).astype(np.int32)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        val = np.concatenate([val, np.ones((len(seq), 1), np.int32)], 1)
    np.testing.assert_array_equal(np.asarray(out.tokens), seq[:, prompts.shape[1]:])
    np.testing.assert_array_equal(np.asarray(out.sequences), seq)
    assert np.all(np.asarray(out.mask) == 1)


def test_top_k_one_equals_greedy(model):
    prompts, valid = left_padded_batch()
    g = sampling.generate(model, prompts, valid, jax.random.key(0), N, None, temperature=0.0)
    k1 = sampling.generate(model, prompts, valid, jax.random.key(7), N, None, temperature=1.3, top_k=1)
    np.testing.assert_array_equal(np.asarray(k1.tokens), np.asarray(g.tokens))
    np.testing.assert_allclose(np.asarray(k1.logp), 0.0, atol=1e-6)   # point mass after top-1


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 4, 0.8)])
def test_logp_is_log_softmax_of_processed_full_forward_logits(model, temperature, top_k, top_p):
    prompts, valid = left_padded_batch()
    out = sampling.generate(model, prompts, valid, jax.random.key(1), N, EOS,
                            temperature=temperature, top_k=top_k, top_p=top_p)
    seq = np.asarray(out.sequences)
    val = np.concatenate([valid, np.asarray(out.mask)], 1)
    logits = full_logits(model, seq, val)
    p = prompts.shape[1]
    x = process_np(logits[:, p - 1:-1], temperature, top_k, top_p)
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(x)), seq[:, p:, None], -1)[..., 0]
    mask = np.asarray(out.mask) > 0
    np.testing.assert_allclose(np.asarray(out.logp)[mask], expected[mask], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out.logp)))


@pytest.mark.slow
def test_rows_of_different_prompt_lengths_match_each_row_alone(model):
    prompts, valid = left_padded_batch()
    batch = sampling.generate(model, prompts, valid, jax.random.key(0), N, None, temperature=0.0)
    for r in range(len(prompts)):
        real = prompts[r][valid[r] > 0][None]
        alone = sampling.generate(model, real, np.ones_like(real), jax.random.key(0), N, None,
                                  temperature=0.0)
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(batch.tokens)[r])
        np.testing.assert_allclose(np.asarray(alone.logp)[0], np.asarray(batch.logp)[r], atol=1e-5)


def test_deterministic_for_a_key(model):
    prompts, valid = left_padded_batch()
    a = sampling.generate(model, prompts, valid, jax.random.key(3), N, None)
    b = sampling.generate(model, prompts, valid, jax.random.key(3), N, None)
    c = sampling.generate(model, prompts, valid, jax.random.key(4), N, None)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logp), np.asarray(b.logp))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


# ------------------------------------------------------------------------------------------
# EOS and the processor hook
# ------------------------------------------------------------------------------------------

def _force_eos(logits, state, at_step):
    """Row r emits EOS at step at_step[r] (a processor that reads state.step)."""
    force = state.step == at_step
    eos_only = jnp.full_like(logits, -1e9).at[:, EOS].set(0.0)
    return jnp.where(force[:, None], eos_only, logits.at[:, EOS].set(-1e9))


def test_eos_masks_and_pads_what_follows_and_stops_early(model):
    prompts, valid = left_padded_batch()
    at = jnp.array([1, 3, 0])
    proc = functools.partial(_force_eos, at_step=at)
    out = sampling.generate(model, prompts, valid, jax.random.key(2), N, EOS, logits_processor=proc,
                            pad_id=PAD)
    tokens, mask, logp = map(np.asarray, (out.tokens, out.mask, out.logp))
    for r, k in enumerate([1, 3, 0]):
        assert tokens[r, k] == EOS and np.all(mask[r, : k + 1] == 1)
        assert np.all(tokens[r, :k] != EOS)
        assert np.all(tokens[r, k + 1:] == PAD) and np.all(mask[r, k + 1:] == 0)
        assert np.all(logp[r, k + 1:] == 0.0)
        np.testing.assert_allclose(logp[r, k], 0.0, atol=1e-6)   # EOS was certain at that step
    # every row is done after step 3: the remaining slots are padding
    assert np.all(tokens[:, 4:] == PAD)


def _dera(logits, state, ref_model, lam):
    """Per-token DeRa: λ·h_θ + (1−λ)·h_ref, the reference run on the whole prefix buffer."""
    ref = ref_model(state.tokens, positions=state.positions, valid=state.valid)
    ref_last = jax.lax.dynamic_index_in_dim(ref, state.index, axis=1, keepdims=False)
    return lam * logits + (1.0 - lam) * ref_last


def test_processor_with_bound_second_model_is_applied_and_compiled_as_arguments(model):
    prompts, valid = left_padded_batch()
    ref = make_model(1)
    lam = 0.3
    out = sampling.generate(model, prompts, valid, jax.random.key(5), N, EOS,
                            logits_processor=functools.partial(_dera, ref_model=ref, lam=lam))
    seq = np.asarray(out.sequences)
    val = np.concatenate([valid, np.asarray(out.mask)], 1)
    p = prompts.shape[1]
    h = full_logits(model, seq, val)[:, p - 1:-1]
    h_ref = full_logits(ref, seq, val)[:, p - 1:-1]
    lp = np.asarray(jax.nn.log_softmax(lam * h + (1 - lam) * h_ref))
    expected = np.take_along_axis(lp, seq[:, p:, None], -1)[..., 0]
    mask = np.asarray(out.mask) > 0
    np.testing.assert_allclose(np.asarray(out.logp)[mask], expected[mask], rtol=1e-4, atol=1e-4)

    # new reference parameters and a new λ reuse the compiled program (they are arguments)
    before = sampling._generate_jit._cache_size()
    sampling.generate(model, prompts, valid, jax.random.key(5), N, EOS,
                      logits_processor=functools.partial(_dera, ref_model=make_model(2), lam=0.9))
    assert sampling._generate_jit._cache_size() == before


class CachedDeRa(nnx.Module):
    """The same DeRa mixing with the reference model's own KV cache (a stateful processor)."""

    def __init__(self, ref_model, lam):
        self.ref_model = ref_model
        self.lam = lam

    def init(self, prompts, prompt_valid, positions, cache_len):
        cache = self.ref_model.init_cache(prompts.shape[0], cache_len)
        logits, cache = self.ref_model.decode(prompts, positions, cache, prompt_valid)
        return cache, logits[:, -1]

    def __call__(self, logits, state):
        return self.lam * logits + (1.0 - self.lam) * state.carry[1]

    def update(self, carry, tokens, positions, valid):
        logits, cache = self.ref_model.decode(tokens, positions, carry[0], valid)
        return cache, logits[:, -1]


@pytest.mark.slow
def test_stateful_processor_with_its_own_cache_equals_full_recompute(model):
    prompts, valid = left_padded_batch()
    ref = make_model(1)
    full = sampling.generate(model, prompts, valid, jax.random.key(6), N, EOS,
                             logits_processor=functools.partial(_dera, ref_model=ref, lam=0.3))
    cached = sampling.generate(model, prompts, valid, jax.random.key(6), N, EOS,
                               logits_processor=CachedDeRa(ref, 0.3))
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(cached.logp), np.asarray(full.logp), atol=1e-4)


@pytest.mark.slow
def test_generate_inside_a_jitted_function(model):
    prompts, valid = left_padded_batch()
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompts, valid, key):
        return sampling.generate(nnx.merge(graphdef, state), prompts, valid, key, N, EOS)

    inside = run(state, prompts, valid, jax.random.key(9))
    outside = sampling.generate(model, prompts, valid, jax.random.key(9), N, EOS)
    np.testing.assert_array_equal(np.asarray(inside.tokens), np.asarray(outside.tokens))


# ------------------------------------------------------------------------------------------
# sampling frequencies
# ------------------------------------------------------------------------------------------

def test_first_token_frequencies_match_softmax_of_logits_over_temperature():
    m = make_model(3, vocab=5)
    n, temperature = 4000, 0.8
    prompt = np.array([[1, 2]], np.int32)
    prompts = np.repeat(prompt, n, 0)
    out = sampling.generate(m, prompts, np.ones_like(prompts), jax.random.key(11), 1, None,
                            temperature=temperature)
    freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=5) / n
    probs = np.asarray(jax.nn.softmax(full_logits(m, prompt, np.ones_like(prompt))[0, -1] / temperature))
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) < 4 * sigma + 1e-3), (freq, probs)
    assert probs.max() - probs.min() > 0.05   # the logits are not uniform, so the test can fail
