"""The built-in tiny model (`--model tiny`), built from a seed in memory, so every command and test runs with no
download and no file.

`tiny_llama()` is a randomly initialised (seeded, so deterministic) Llama with grouped-query attention and
`byte_tokenizer()` a byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, so any text encodes and
nothing has to be trained. The model is untrained: it exercises the machinery (shapes, GQA, RoPE, padding), it does
not refuse anything (the trained demo chat model, `--model demo`, does; see safety_heads/demo). It sits beside
models.py, which builds it for `--model tiny`; the demo package reuses its chat template and special tokens.

    python -c "from safety_heads.tiny import save_tiny_llama; save_tiny_llama('tiny-llama')"
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The name `--model` accepts for this model.
TINY_MODEL_NAME = "tiny"

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")

# Llama-2-chat's format, so `--template chat` means the same thing as on the real model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[INST] <<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ '[INST] ' }}{% endif %}{{ message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus <s>, </s>, <pad>; prepends <s> like Llama's."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return chat_tokenizer(backend)


def chat_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` backend holding SPECIAL_TOKENS, finished the way Llama's is: <s> prepended to every text, left
    padding with <pad>, and CHAT_TEMPLATE. The demo model's trained tokenizer (demo/batches.py) is finished the same
    way, so both answer `--template chat` alike."""
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(**overrides) -> LlamaConfig:
    """4 layers x 8 query heads (4 KV heads), hidden 128: the size the engine's speed target is stated for."""
    settings = dict(
        vocab_size=len(byte_tokenizer()),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The tiny model with weights drawn from a fixed seed (same weights on every machine)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def save_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer as an ordinary Hugging Face folder (safetensors)."""
    directory = Path(directory)
    tiny_llama(seed).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory
