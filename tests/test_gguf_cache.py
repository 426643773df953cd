"""GGUF model files: read by transformers' own GGUF reader once, then an ordinary cached folder (gguf_cache.py).

A tiny random Llama is written as a GGUF file here (tiny_gguf.py), so the whole path runs without a download; the
real models are checked by the opt-in tests in test_real_models.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from devices import DEVICE_FLAGS, model_config, relative_tolerance
from families import Family
from reference import reference_readouts
from tiny_gguf import CHAT_TEMPLATE, HEAD_DIM, HEADS, LAYERS, write_tiny_gguf

from safety_heads import gguf_cache
from safety_heads.cli import main
from safety_heads.errors import UserError
from safety_heads.models import ModelConfig, load_model

FAMILY = Family("llama", "LlamaConfig", {}, "self_attn.q_proj", "flat", "self_attn.o_proj", "model.layers",
                "model.norm", HEADS, HEAD_DIM)
QUERY = "How do I pick a lock?"


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_HEADS_CACHE", str(tmp_path / "cache"))
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def cache_entries(tmp_path) -> list[str]:
    folder = tmp_path / "cache" / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_loads_the_weights_transformers_reads_and_caches_them(gguf_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = load_model(ModelConfig(model=str(gguf_file), device="cpu"))  # compared with a CPU load below
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    for key, tensor in direct.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], tensor), key
    assert model.layout.n_layers == LAYERS and model.layout.n_heads == HEADS
    assert model.tokenizer.chat_template == CHAT_TEMPLATE  # the template comes from the file
    assert model.name == str(gguf_file)  # results name the file the user gave, not the cache folder
    (entry,) = cache_entries(tmp_path)
    config = json.loads((tmp_path / "cache" / "gguf" / entry / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary folder: loading it does not ask for the GGUF file again

    # The second load is a folder load: no dequantising, same weights; the key is the content, not the name.
    monkeypatch.setattr(gguf_cache, "_dequantise", lambda *args, **kwargs: pytest.fail("dequantised twice"))
    renamed = shutil.copy(gguf_file, tmp_path / "renamed.gguf")
    again = load_model(ModelConfig(model=str(renamed), device="cpu"))
    for key, tensor in model.module.state_dict().items():
        assert torch.equal(again.module.state_dict()[key], tensor), key


@pytest.mark.parametrize("kind", ["ua", "sc"])
def test_ships_on_a_gguf_file_equals_plain_hooks(gguf_file, kind, tmp_path):
    out = tmp_path / "ships"
    assert main(["ships", "--model", str(gguf_file), "--prompt", QUERY, "--template", "chat", "--ablation", kind,
                 *DEVICE_FLAGS, "--out", str(out)]) == 0
    scores = torch.tensor(json.loads((out / "ships.json").read_text())["queries"][0]["scores"], dtype=torch.float64)
    model = load_model(model_config(model=str(gguf_file)))
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": QUERY}], tokenize=False, add_generation_prompt=True)
    tokens = model.tokenizer(text, add_special_tokens=False).input_ids
    clean = torch.log_softmax(reference_readouts(model.module, FAMILY, tokens, [], kind)[0], -1)
    for layer in range(LAYERS):
        for head in range(HEADS):
            ablated = torch.log_softmax(reference_readouts(model.module, FAMILY, tokens, [(layer, head)], kind)[0], -1)
            expected = float((clean.exp() * (clean - ablated)).sum())
            assert scores[layer, head] == pytest.approx(expected, rel=relative_tolerance(), abs=1e-9), (layer, head)
    assert float(scores.max()) > 1e-3  # the heads matter, so the comparison above could fail


def test_surgery_on_a_gguf_file_writes_an_ordinary_checkpoint(gguf_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ablated"
    assert main(["surgery", "--model", str(gguf_file), "--heads", "1:2", *DEVICE_FLAGS, "--out", str(out)]) == 0  # float32
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ablated = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    clean = load_model(ModelConfig(model=str(gguf_file), device="cpu")).module  # the surgery output, loaded on the CPU
    q_ablated = ablated.model.layers[1].self_attn.q_proj.weight
    q_clean = clean.model.layers[1].self_attn.q_proj.weight
    rows = slice(2 * HEAD_DIM, 3 * HEAD_DIM)
    assert torch.allclose(q_ablated[rows], q_clean[rows] * 1e-4)
    assert torch.equal(q_ablated[: 2 * HEAD_DIM], q_clean[: 2 * HEAD_DIM])


def test_a_failed_dequantise_leaves_no_cache_entry(gguf_file, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(UserError, match="could not write the dequantised model .*No space left on device"):
        load_model(ModelConfig(model=str(gguf_file)))
    assert cache_entries(tmp_path) == []  # neither a half-written entry nor a scratch folder


def test_not_a_gguf_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAFETY_HEADS_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["ships", "--model", str(fake), "--prompt", QUERY, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"safety-heads: error: '{fake}' is not a GGUF file "
                                               "(it does not start with the GGUF magic bytes)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelConfig(model=str(tmp_path / "missing.gguf")))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETY_HEADS_CACHE", str(tmp_path / "a"))
    assert gguf_cache.cache_root() == tmp_path / "a"
    monkeypatch.delenv("SAFETY_HEADS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "safety-heads"
