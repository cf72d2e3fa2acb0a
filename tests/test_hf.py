"""Hugging Face import/export: tiny random Llama and Qwen2 models built with transformers (torch, CPU)
must give the same logits after ``from_hf``, and ``to_hf`` exports must load back in transformers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kljax.models import TransformerLM, from_hf, lm_config, positions_from_valid, to_hf

V = 16
FAMILIES = {
    # untied Llama with GQA and a non-default rope_theta; tied Qwen2 (q/k/v biases) with head_dim != width/heads
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, rope_theta=500.0)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True, head_dim=12, rope_theta=10000.0)),
}


def make_hf_model(family):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                     rms_norm_eps=1e-5, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF's init is tiny (std 0.02) and biases are zero; make every weight matter
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def torch_logits(model, tokens, attention_mask=None, position_ids=None):
    kw = {}
    if attention_mask is not None:
        kw = dict(attention_mask=torch.tensor(np.asarray(attention_mask)),
                  position_ids=torch.tensor(np.asarray(position_ids)))
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kw).logits.numpy()


TOKENS = np.random.RandomState(0).randint(0, V, (2, 7))


@nnx.jit
def fwd(model, tokens, positions=None, valid=None):
    return model(tokens, positions, valid)


def test_from_hf_matches_transformers_logits(hf_checkpoint):
    family, hf_model, path = hf_checkpoint
    model = from_hf(path)
    assert model.cfg.qkv_bias == (family == "qwen2")
    assert model.cfg.tie_embeddings == (family == "qwen2")
    ref = torch_logits(hf_model, TOKENS)
    out = np.asarray(fwd(model, jnp.asarray(TOKENS)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_from_hf_left_padded_batch_matches_transformers(hf_checkpoint):
    _, hf_model, path = hf_checkpoint
    model = from_hf(path)
    valid = np.array([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = np.asarray(positions_from_valid(valid))
    ref = torch_logits(hf_model, TOKENS, attention_mask=valid, position_ids=pos)
    out = np.asarray(fwd(model, jnp.asarray(TOKENS), jnp.asarray(pos), jnp.asarray(valid)))
    np.testing.assert_allclose(out[valid > 0], ref[valid > 0], atol=1e-4, rtol=1e-4)


def test_to_hf_round_trip_and_transformers_load(hf_checkpoint, tmp_path):
    family, hf_model, path = hf_checkpoint
    model = from_hf(path)
    to_hf(model, tmp_path)
    # kljax -> kljax: identical parameters
    again = from_hf(tmp_path)
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(again, nnx.Param))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # kljax -> transformers: the export loads as the right class and computes the same logits
    cls = FAMILIES[family][1]
    reloaded = cls.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), torch_logits(hf_model, TOKENS), atol=1e-5)


def test_to_hf_of_fresh_kljax_model_loads_in_transformers(tmp_path):
    cfg = lm_config(vocab_size=V, width=16, depth=1, num_heads=4, num_kv_heads=1, mlp_dim=24, max_len=32,
                    tie_embeddings=False, rope_theta=100.0, init_std=0.3)
    model = TransformerLM(cfg, rngs=nnx.Rngs(1))
    to_hf(model, tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    hf_model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(hf_model, TOKENS), np.asarray(fwd(model, jnp.asarray(TOKENS))),
                               atol=1e-4, rtol=1e-4)


def test_from_hf_sharded_checkpoint(tmp_path):
    hf_model = make_hf_model("llama")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model = from_hf(tmp_path)
    np.testing.assert_allclose(np.asarray(fwd(model, jnp.asarray(TOKENS))), torch_logits(hf_model, TOKENS),
                               atol=1e-4, rtol=1e-4)


def test_from_hf_adds_small_random_value_head(hf_checkpoint):
    _, hf_model, path = hf_checkpoint
    model = from_hf(path, value_head="token", num_atoms=3)
    h, vals = nnx.jit(lambda m, t: (m.hidden(t), m.values(m.hidden(t))))(model, jnp.asarray(TOKENS))
    assert vals.shape == (2, 7, V, 3)
    w = np.asarray(model.value_kernel[...])
    assert 0 < np.abs(w).max() < 1.0
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(h)), torch_logits(hf_model, TOKENS),
                               atol=1e-4, rtol=1e-4)


def test_from_hf_bfloat16_checkpoint(tmp_path):
    hf_model = make_hf_model("qwen2").to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    model = from_hf(tmp_path)  # float32 parameters by default
    assert model.embedding[...].dtype == jnp.float32
    ref = torch_logits(hf_model.float(), TOKENS)  # same (bf16-representable) weights in float32
    np.testing.assert_allclose(np.asarray(fwd(model, jnp.asarray(TOKENS))), ref, atol=1e-4, rtol=1e-4)
    bf = from_hf(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    to_hf(bf, tmp_path / "export")
    again = load_file(tmp_path / "export" / "model.safetensors")
    assert str(again["model.embed_tokens.weight"].dtype) == "bfloat16"


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture
def llama_dir(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    return tmp_path


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_hf(tmp_path)


def test_missing_safetensors(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_hf(llama_dir)


def test_unsupported_architecture_is_named(llama_dir):
    cfg = json.load(open(llama_dir / "config.json"))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    json.dump(cfg, open(llama_dir / "config.json", "w"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        from_hf(llama_dir)


def test_missing_tensor_is_named(llama_dir):
    tensors = load_file(llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        from_hf(llama_dir)


def test_shape_mismatch_names_tensor_and_shapes(llama_dir):
    cfg = json.load(open(llama_dir / "config.json"))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(llama_dir / "config.json", "w"))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*\[48, 32\].*\[40, 32\]"):
        from_hf(llama_dir)


def test_scaled_rope_is_rejected(llama_dir):
    cfg = json.load(open(llama_dir / "config.json"))
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    json.dump(cfg, open(llama_dir / "config.json", "w"))
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_hf(llama_dir)
