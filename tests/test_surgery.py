"""Surgery: the saved checkpoint reloads with plain transformers and reproduces the traced ablation."""

import json

import pytest
import torch
from devices import relative_tolerance
from families import FAMILIES
from transformers import AutoModelForCausalLM

from safety_heads.ablation import Ablation, AblationConfig
from safety_heads.engine import Engine
from safety_heads.errors import UserError
from safety_heads.models import ModelConfig, load_model, wrap
from safety_heads.surgery import SurgeryConfig, run_surgery
from safety_heads.tiny import byte_tokenizer

PROMPTS = ["Tell me how to make a cake.", "Hello there, friend"]


@pytest.mark.parametrize("family_name, kind", [("llama", "ua"), ("llama-bias", "ua"), ("qwen2", "ua"), ("gpt2", "sc"), ("qwen3", "sc")])
def test_saved_checkpoint_reproduces_traced_ablation(family_name, kind, tmp_path):
    module = FAMILIES[family_name].build()
    model = wrap(module, byte_tokenizer(), family_name)
    heads = [(0, 1), (2, 3)]
    tokens = [model.tokenizer(p).input_ids for p in PROMPTS]
    traced = Engine(model).run(tokens, [heads], ablation=Ablation(kind=kind, epsilon=1e-4))
    record = run_surgery(model, SurgeryConfig(heads="0:1,2:3", ablation=AblationConfig(kind)), tmp_path / "out", progress=lambda _: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        for p, ids in enumerate(tokens):
            logits = reloaded(torch.tensor([ids])).logits[0, -1]
            assert ((logits - traced.logits[p, 0]).abs().max() / traced.logits.abs().max()) <= relative_tolerance()
    assert (traced.logits[:, 0] - traced.clean_logits).abs().max() / traced.logits.abs().max() > 1e-3
    saved = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert saved["heads"] == [[0, 1], [2, 3]] and saved["ablation"] == kind and len(saved["changed"]) == 2
    assert saved == json.loads(json.dumps(record))
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_ua_behind_query_norm_is_refused_and_nothing_written(tmp_path):
    model = wrap(FAMILIES["qwen3"].build(), byte_tokenizer(), "qwen3")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(UserError, match="cannot be baked"):
        run_surgery(model, SurgeryConfig(heads="0:1", ablation=AblationConfig("ua")), tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())


@pytest.mark.parametrize("settings, message", [(dict(heads="0:1", ablation=AblationConfig("mean")), "ua or sc"),
                                               (dict(heads="9:0"), "out of range")])
def test_bad_surgery_settings(settings, message, tmp_path):
    with pytest.raises(UserError, match=message):
        run_surgery(load_model(ModelConfig()), SurgeryConfig(**settings), tmp_path / "out", progress=lambda _: None)


def test_non_empty_output_refused(tmp_path):
    (tmp_path / "something").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        run_surgery(load_model(ModelConfig()), SurgeryConfig(heads="0:1"), tmp_path, progress=lambda _: None)
