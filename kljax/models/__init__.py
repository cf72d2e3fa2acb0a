"""Flax NNX models: a decoder-only transformer LM with KV cache and optional value head, small
classifiers for the digits task, and Hugging Face (Llama / Qwen2) safetensors import/export."""
from kljax.models.classifier import Classifier, classifier_config  # noqa: F401
from kljax.models.hf import from_hf, to_hf  # noqa: F401
from kljax.models.tokenizer import HFTokenizer, aligned_vocab_size, load_tokenizer  # noqa: F401
from kljax.models.transformer import (  # noqa: F401
    KVCache,
    TransformerLM,
    lm_config,
    positions_from_valid,
)

__all__ = ["TransformerLM", "lm_config", "KVCache", "positions_from_valid", "Classifier",
           "classifier_config", "from_hf", "to_hf", "HFTokenizer", "load_tokenizer", "aligned_vocab_size"]
