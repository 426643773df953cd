"""A tiny random Llama written as a GGUF file with the `gguf` package's writer: the GGUF path (transformers' reader,
the dequantised cache, the engine on the result) tested without downloading a model.

Byte-level vocabulary (the 256 GPT-2 byte symbols, one merge, three control tokens) and a ChatML chat template,
stored in the file's metadata as llama.cpp writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LAYERS, D_MODEL, HEADS, KV_HEADS, HEAD_DIM, FFN = 2, 32, 4, 2, 8, 48
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["ab", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 257 + [3, 3, 3])  # 1 = normal, 3 = control
    writer.add_token_merges(["a b"])
    writer.add_token_scores([0.0] * vocab)
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_pad_token_id(259)
    writer.add_chat_template(CHAT_TEMPLATE)

    def random(name: str, *shape: int) -> None:
        # Large weights, as in families.py: ablating one head must move the logits far beyond float32 rounding.
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.3).astype(np.float32))

    random("token_embd.weight", vocab, D_MODEL)
    writer.add_tensor("output_norm.weight", np.ones(D_MODEL, np.float32))
    random("output.weight", vocab, D_MODEL)
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D_MODEL, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D_MODEL, np.float32))
        random(f"blk.{i}.attn_q.weight", HEADS * HEAD_DIM, D_MODEL)
        random(f"blk.{i}.attn_k.weight", KV_HEADS * HEAD_DIM, D_MODEL)
        random(f"blk.{i}.attn_v.weight", KV_HEADS * HEAD_DIM, D_MODEL)
        random(f"blk.{i}.attn_output.weight", D_MODEL, HEADS * HEAD_DIM)
        random(f"blk.{i}.ffn_gate.weight", FFN, D_MODEL)
        random(f"blk.{i}.ffn_up.weight", FFN, D_MODEL)
        random(f"blk.{i}.ffn_down.weight", D_MODEL, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
