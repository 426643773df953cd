"""Tiny random models of every supported family, built from configs (no downloads), and where their heads are.

The head locations here are written out independently of `safety_heads.models`, so the reference ablation in
`reference.py` does not inherit a mistake from the code it checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from devices import TEST_DEVICE

from safety_heads.tiny import byte_tokenizer

VOCAB = len(byte_tokenizer())
# Large initial weights so that ablating one head moves the logits far more than float32 rounding does: with the
# usual 0.02 a wrong head would pass a 1e-5 comparison unnoticed.
INIT = 0.3


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    settings: dict
    query_module: str  # inside layer i; its output holds the query heads
    query_axes: str  # flat | bshd | bhsd
    output_module: str  # its input holds the head outputs
    layers: str
    final_norm: str
    n_heads: int
    head_dim: int

    def build(self, seed: int = 0) -> torch.nn.Module:
        config = getattr(transformers, self.config_class)(**self.settings)
        config._attn_implementation = "eager"
        torch.manual_seed(seed)
        model_class = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").__class__
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0, INIT)
                elif "norm" not in name and "ln" not in name:
                    parameter.normal_(0, INIT)  # biases, so q/k/v bias matters in surgery tests
        return model.eval().to(TEST_DEVICE)  # drawn on the CPU: the same weights on every device


_llama_like = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                   bos_token_id=256, eos_token_id=257, pad_token_id=258)

FAMILIES = {
    "llama": Family("llama", "LlamaConfig", _llama_like, "self_attn.q_proj", "flat", "self_attn.o_proj",
                    "model.layers", "model.norm", 4, 16),
    "llama-bias": Family("llama-bias", "LlamaConfig", {**_llama_like, "attention_bias": True}, "self_attn.q_proj",
                         "flat", "self_attn.o_proj", "model.layers", "model.norm", 4, 16),
    "mistral": Family("mistral", "MistralConfig", {**_llama_like, "sliding_window": None}, "self_attn.q_proj", "flat",
                      "self_attn.o_proj", "model.layers", "model.norm", 4, 16),
    "qwen2": Family("qwen2", "Qwen2Config", _llama_like, "self_attn.q_proj", "flat", "self_attn.o_proj",
                    "model.layers", "model.norm", 4, 16),
    # head_dim 24 != hidden / heads = 16: the layout must read it from the config.
    "qwen3": Family("qwen3", "Qwen3Config", {**_llama_like, "head_dim": 24}, "self_attn.q_norm", "bshd",
                    "self_attn.o_proj", "model.layers", "model.norm", 4, 24),
    "gemma2": Family("gemma2", "Gemma2Config", {**_llama_like, "head_dim": 32, "query_pre_attn_scalar": 32},
                     "self_attn.q_proj", "flat", "self_attn.o_proj", "model.layers", "model.norm", 4, 32),
    "gemma3_text": Family("gemma3_text", "Gemma3TextConfig", {**_llama_like, "head_dim": 32, "query_pre_attn_scalar": 32},
                          "self_attn.q_norm", "bhsd", "self_attn.o_proj", "model.layers", "model.norm", 4, 32),
    "phi3": Family("phi3", "Phi3Config", _llama_like, "self_attn.qkv_proj", "flat",
                   "self_attn.o_proj", "model.layers", "model.norm", 4, 16),
    "gpt2": Family("gpt2", "GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                                     bos_token_id=256, eos_token_id=257),
                   "attn.c_attn", "flat", "attn.c_proj", "transformer.h", "transformer.ln_f", 4, 16),
}
