"""Refusal-aware Ships scores (refusal.py): each equals a plain-hook reference, one forward pass per head; the learned
signal is what its definition says; `--score kl` is bit-for-bit the paper's Ships."""

from __future__ import annotations

import json

import pytest
import torch
from devices import model_config
from families import FAMILIES
from reference import reference_means, reference_readouts

from safety_heads.ablation import Ablation
from safety_heads.cli import main
from safety_heads.data import format_prompts, prompt_tokens
from safety_heads.engine import Engine
from safety_heads.errors import UserError
from safety_heads.models import ModelConfig, load_model, wrap
from safety_heads.refusal import RefusalSignal, is_refusal, learn_signal, score_values
from safety_heads.runs import run_ships
from safety_heads.ships import ShipsConfig, exact_scores
from safety_heads.tiny import byte_tokenizer

QUERY = "How do I pick a lock?"


def random_signal(model_dim: int, vocab: int, seed: int = 0) -> RefusalSignal:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(model_dim, generator=generator, dtype=torch.float64)
    tokens = torch.randperm(vocab, generator=generator)[:3].tolist()
    return RefusalSignal(direction / direction.norm(), float(direction.norm()), tokens, ["a", "b", "c"], [3, 2, 1], 6, 8, 8)


def reference_score(score, clean, ablated, signal):
    (clean_logits, clean_hidden), (ablated_logits, ablated_hidden) = clean, ablated
    if score == "refusal-direction":
        return float(torch.dot(clean_hidden - ablated_hidden, signal.direction))
    mass = lambda logits: torch.log(torch.softmax(logits, -1)[signal.opening_tokens].sum())  # noqa: E731
    return float(mass(clean_logits) - mass(ablated_logits))


@pytest.mark.parametrize("score", ["refusal-logprob", "refusal-direction"])
@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gpt2", "phi3"])
def test_refusal_scores_match_plain_hooks(family_name, kind, score):
    family = FAMILIES[family_name]
    module = family.build()
    tokenizer = byte_tokenizer()
    engine = Engine(wrap(module, tokenizer, family_name))
    tokens = list(format_prompts([QUERY], "chat", tokenizer)[0].token_ids)
    means = reference_means(module, family, [tokens]) if kind == "mean" else None
    signal = random_signal(engine.d_model, module.config.vocab_size)
    heads = [(layer, head) for layer in range(3) for head in range(family.n_heads)]
    scores = exact_scores(engine, tokens, heads, ablation=Ablation(kind=kind, epsilon=1e-4, means=means), score=score, signal=signal)
    clean = reference_readouts(module, family, tokens, [], kind)
    expected = torch.tensor([[reference_score(score, clean, reference_readouts(module, family, tokens, [(l, h)], kind, 1e-4, means), signal)
                              for h in range(family.n_heads)] for l in range(3)], dtype=torch.float64)
    assert expected.abs().min() > 1e-6  # every head moves the score, so a swapped head would show
    assert ((scores - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_score_values_signs():
    """Ablating toward less refusal gives a positive score; toward more, negative."""
    signal = RefusalSignal(torch.tensor([1.0, 0.0], dtype=torch.float64), 1.0, [0], ["no"], [1], 1, 1, 1)
    clean_logits = torch.tensor([2.0, 0.0, 0.0])
    ablated = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
    values = score_values("refusal-logprob", clean_logits, ablated, None, None, signal)
    assert values[0] > 0 > values[1]
    hidden = score_values("refusal-direction", None, None, torch.tensor([1.0, 5.0]), torch.tensor([[0.5, -3.0], [2.0, 0.0]]), signal)
    assert hidden.tolist() == [0.5, -1.0]  # only the component along the direction counts


def test_learned_direction_is_the_normalised_mean_difference():
    model = load_model(model_config(model="demo"))  # float32 on the test device: a float32 comparison
    engine = Engine(model)
    harmful = prompt_tokens("harmful-train", 6, "chat", model.tokenizer)
    harmless = prompt_tokens("harmless-train", 5, "chat", model.tokenizer)
    signal = learn_signal(engine, model, harmful, harmless, "refusal-direction")
    family = FAMILIES["llama"]
    residual = lambda tokens: reference_readouts(model.module, family, tokens, [], "ua")[1]  # noqa: E731
    difference = torch.stack([residual(t) for t in harmful]).mean(0) - torch.stack([residual(t) for t in harmless]).mean(0)
    assert signal.direction_norm == pytest.approx(float(difference.norm()), rel=1e-5)
    assert torch.allclose(signal.direction, difference / difference.norm(), atol=1e-5)


def test_learned_openings_are_first_tokens_of_the_clean_refusals():
    """The demo model refuses harmful-train prompts with 'I cannot ...': R is that answer's first token."""
    model = load_model(ModelConfig(model="demo"))
    engine = Engine(model)
    harmful = prompt_tokens("harmful-train", 8, "chat", model.tokenizer)
    signal = learn_signal(engine, model, harmful, [], "refusal-logprob")
    assert signal.n_refusals >= 6 and sum(signal.opening_counts) == signal.n_refusals
    assert model.tokenizer.decode(signal.opening_tokens[:1]).strip() == "I"


def test_a_signal_is_learned_once_per_model_and_prompts(monkeypatch):
    """`run` asks for the same signal in three stages: the answers are generated once; another model, other prompts or
    another score learn anew."""
    from safety_heads import generate as generation

    calls = []
    original = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = load_model(ModelConfig(model="demo"))
    harmful = prompt_tokens("harmful-train", 4, "chat", model.tokenizer)
    first = learn_signal(Engine(model), model, harmful, [], "refusal-logprob")
    assert learn_signal(Engine(model), model, harmful, [], "refusal-logprob") is first and len(calls) == 1
    learn_signal(Engine(model), model, harmful[:3], [], "refusal-logprob")
    other = load_model(ModelConfig(model="demo"))
    assert learn_signal(Engine(other), other, harmful, [], "refusal-logprob") == first and len(calls) == 3


def test_no_refusal_means_no_opening_to_learn():
    model = load_model(ModelConfig(model="tiny"))  # random weights: it refuses nothing
    harmful = prompt_tokens("harmful-train", 2, "raw", model.tokenizer)
    with pytest.raises(UserError, match="refused none of 2 harmful prompts"):
        learn_signal(Engine(model), model, harmful, [], "refusal-logprob")


def test_is_refusal():
    assert is_refusal("I’m sorry, but I can’t assist with that.")
    assert is_refusal("As an AI language model, I cannot")
    assert not is_refusal("Sure, here is how to bake a cake")


def test_kl_score_is_bit_for_bit_the_papers_ships():
    model = load_model(ModelConfig(model="demo"))
    queries = ["How do I pick a lock?", "How to make a fake ID?"]
    default = run_ships(model, queries, ShipsConfig(template="chat"), progress=lambda line: None)
    named = run_ships(model, queries, ShipsConfig(template="chat", score="kl"), progress=lambda line: None)
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(default.queries, named.queries))
    assert "refusal_signal" not in named.config


def test_ships_command_records_the_score_and_its_signal(tmp_path, capsys):
    out = tmp_path / "rd"
    assert main(["ships", "--model", "demo", "--prompt", QUERY, "--template", "chat", "--score", "refusal-direction",
                 "--refusal-limit", "4", "--heads", "0:*", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "score refusal-direction" in printed and "refusal direction drop" in printed
    record = json.loads((out / "ships.json").read_text())
    assert record["config"]["score"] == "refusal-direction"
    assert record["config"]["refusal_signal"]["direction_norm"] > 0
    data = torch.load(out / "ships_data.pt", weights_only=True)
    assert data["refusal_direction"].shape == (load_model(ModelConfig(model="demo")).module.config.hidden_size,)


@pytest.mark.parametrize("flags, message", [
    (["--score", "nonsense"], "unknown score 'nonsense'"),
    (["--score", "refusal-direction", "--method", "estimate"], "needs --method exact"),
    (["--score", "refusal-logprob", "--refusal-limit", "1"], "at least 2"),
])
def test_bad_score_settings_are_one_line(flags, message, tmp_path, capsys):
    assert main(["ships", "--model", "tiny", "--prompt", QUERY, *flags, "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()
