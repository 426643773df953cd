"""The built-in tiny model (safety_heads/tiny.py): the same weights from the same seed, and a byte tokenizer that
encodes any text."""

import torch

from safety_heads.tiny import TINY_MODEL_NAME, byte_tokenizer, save_tiny_llama, tiny_llama, tiny_llama_config


def test_same_seed_same_weights_and_the_callers_generator_is_left_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny_llama(), tiny_llama()
    assert torch.equal(torch.rand(3), expected_next)  # building the model drew nothing from the caller's stream
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    other = tiny_llama(seed=1)
    assert not torch.equal(a.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_size_and_grouped_query_attention():
    config = tiny_llama_config()
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (4, 8, 4)
    assert tiny_llama_config(num_hidden_layers=2).num_hidden_layers == 2
    assert TINY_MODEL_NAME == "tiny"


def test_byte_tokenizer_round_trips_any_text_and_prepends_bos():
    tokenizer = byte_tokenizer()
    text = "Grüße, 世界! [INST]"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 256
    assert len(ids) == 1 + len(text.encode("utf-8"))  # one token per byte: no merges
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (257, 258, "left")


def test_saved_folder_holds_the_same_model(tmp_path):
    folder = save_tiny_llama(tmp_path / "tiny")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(folder)
    for (name, x), (_, y) in zip(tiny_llama().state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name
