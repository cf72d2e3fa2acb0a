"""Tokenizers read from Hugging Face files (tokenizers + jinja2, no transformers) must agree with
transformers' own tokenizer on the same files: ids, text, special tokens, chat template; exports load back."""
import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_fixtures as hfx
from kljax.models import aligned_vocab_size, from_hf, load_tokenizer, to_hf

TEXTS = ["Question: what is 12 plus 7? Answer:", "an unseen sentence, with ünïcode and 1234567!",
         "  two  spaces\nand a newline"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " what is 3 plus 4? "},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "and 5 plus 5?"}]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hfx.user_folder(path, request.param, vocab_size=320)  # 300 tokenizer ids, 20 padding rows
    return request.param, str(path)


def test_ids_text_and_special_tokens_match_transformers(folder):
    family, path = folder
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.eos_id == theirs.eos_token_id
    assert ours.bos_id == theirs.bos_token_id
    assert ours.vocab_size == len(theirs)
    assert ours.padding_side == theirs.padding_side
    if family == "llama":  # BOS from the post-processor; no pad token in the files: pad = EOS
        assert ours.encode("hi")[0] == ours.bos_id
        assert theirs.pad_token_id is None and ours.pad_id == ours.eos_id
    else:
        assert ours.bos_id is None and ours.pad_id == theirs.pad_token_id != ours.eos_id


def test_chat_template_renders_like_transformers(folder):
    _, path = folder
    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for gen in (True, False):
        want = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen) == want
    text = ours.apply_chat_template(CHAT[:2])
    assert ours.encode(text, add_special_tokens=False) == theirs.apply_chat_template(
        CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_padded_vocabulary_loads_and_extra_ids_decode_to_nothing(folder):
    _, path = folder
    model, tok = from_hf(path, tokenizer=True)
    assert model.cfg.vocab_size == 320 and tok.vocab_size == 300
    ids = tok.encode("what is 3", add_special_tokens=False)
    assert tok.decode(ids + [305, 319]) == tok.decode(ids) == "what is 3"


def test_export_with_tokenizer_loads_in_transformers(folder, tmp_path):
    family, path = folder
    model, tok = from_hf(path, tokenizer=True)
    to_hf(model, tmp_path, tokenizer=tok)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    orig = AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == orig(text)["input_ids"]
    assert theirs.apply_chat_template(CHAT, tokenize=False) == orig.apply_chat_template(CHAT, tokenize=False)
    assert (theirs.eos_token, theirs.pad_token, theirs.bos_token) == (orig.eos_token, orig.pad_token, orig.bos_token)
    assert theirs.padding_side == orig.padding_side
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.eos_token_id == tok.eos_id and hf.generation_config.eos_token_id == tok.eos_id
    # and kljax reads its own export back identically
    again = load_tokenizer(tmp_path)
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert again.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)


def test_tokenizer_larger_than_model_vocabulary_is_an_error(tmp_path):
    hfx.train_tokenizer(tmp_path, "qwen2")
    hfx.make_model(tmp_path, "qwen2", vocab_size=200)
    with pytest.raises(ValueError, match=r"300 ids.*vocabulary.*200"):
        from_hf(tmp_path, tokenizer=True)


def test_missing_tokenizer_and_missing_template_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    hfx.train_tokenizer(tmp_path, "qwen2")
    for f in ("chat_template.jinja",):
        if os.path.exists(tmp_path / f):
            os.remove(tmp_path / f)
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(tmp_path / "tokenizer_config.json", "w"))
    with pytest.raises(ValueError, match="chat template"):
        load_tokenizer(tmp_path).apply_chat_template(CHAT)


def test_aligned_vocab_size_rule():
    assert aligned_vocab_size(320, 320, 300) == 320
    assert aligned_vocab_size(384, 320, 300) == 320   # padding rows only
    assert aligned_vocab_size(300, 320, 300) == 300
    with pytest.raises(ValueError, match=r"teacher vocabulary 256 and student vocabulary 320"):
        aligned_vocab_size(256, 320, 300)


def test_unknown_special_token_is_an_error(tmp_path):
    hfx.train_tokenizer(tmp_path, "qwen2")
    cfg = json.load(open(tmp_path / "tokenizer_config.json"))
    cfg["eos_token"] = "<|not_a_token|>"
    json.dump(cfg, open(tmp_path / "tokenizer_config.json", "w"))
    with pytest.raises(ValueError, match="not_a_token"):
        load_tokenizer(tmp_path)

