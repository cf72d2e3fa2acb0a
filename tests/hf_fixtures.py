"""What a user brings, built locally (nothing is downloaded): a byte-level BPE tokenizer trained with
`tokenizers` on generated text and saved by transformers, and tiny random Qwen2 / Llama checkpoints."""
import os
import random

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] | trim }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")

QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def corpus(n=400, seed=0):
    """Arithmetic questions and answers in words and digits."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"Question: what is {a} plus {b}? Answer: {a} + {b} = {a + b}. #### {a + b}")
        lines.append(f"The number {a} is {'even' if a % 2 == 0 else 'odd'} and \\boxed{{{a}}}.")
    return lines


def train_tokenizer(path, family="qwen2", vocab_size=300):
    """Train a byte-level BPE on `corpus()` and save it with transformers as `family`'s tokenizer would be."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if family == "qwen2":  # Qwen2's own pipeline (transformers' Qwen2Tokenizer rebuilds exactly this)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if family == "qwen2":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    else:
        specials = ["<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    if family == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=QWEN_TEMPLATE, padding_side="left")
    else:  # Llama: BOS added by the post-processor, no pad token
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       chat_template=LLAMA_TEMPLATE)
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def make_model(path, family="qwen2", vocab_size=320, seed=0, width=32, depth=2, tie=None, std=None):
    """A tiny random transformers model saved to `path` (its vocabulary may be padded past the tokenizer's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls_cfg, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=depth, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * width, max_position_embeddings=256,
                  tie_word_embeddings=(family == "qwen2") if tie is None else tie)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return model


def user_folder(path, family="qwen2", vocab_size=320, **kw):
    """A checkpoint folder as a user has it: weights + config + tokenizer files."""
    train_tokenizer(path, family)
    make_model(path, family, vocab_size, **kw)
    return str(path)
