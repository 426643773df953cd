"""Sahara's objectives: the refusal objectives against a plain-hook reference (one forward pass per group and query),
the greedy search, resume, the guard and candidate pruning with them, and bad settings."""

import json

import pytest
import torch
from families import FAMILIES
from reference import reference_means, reference_readouts
from test_sahara import QUERIES as SAHARA_QUERIES  # the same kill by a progress line as Sahara's resume tests
from test_sahara import Interrupt, stop_at

from safety_heads import refusal
from safety_heads.ablation import AblationConfig
from safety_heads.cli import main
from safety_heads.data import format_prompts, load_prompts
from safety_heads.models import ModelConfig, load_model, wrap
from safety_heads.refusal import RefusalSignal
from safety_heads.runs import run_sahara
from safety_heads.sahara import SaharaConfig, find_group
from safety_heads.tiny import byte_tokenizer

QUERIES = SAHARA_QUERIES[:5]  # five lengths, so every engine batch is left-padded
quiet = dict(progress=lambda _: None)
REFUSAL_OBJECTIVES = ("refusal-logprob", "refusal-direction")


def random_signal(model_dim: int, vocab: int, seed: int = 0) -> RefusalSignal:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(model_dim, generator=generator, dtype=torch.float64)
    tokens = torch.randperm(vocab, generator=generator)[:3].tolist()
    return RefusalSignal(direction / direction.norm(), float(direction.norm()), tokens, ["a", "b", "c"], [3, 2, 1], 6, 8, 8)


@pytest.fixture
def learned(monkeypatch):
    """A random model refuses nothing, so its refusal signal is drawn at random (what is learned is tested in
    test_refusal.py); the search must use whatever signal it is given."""
    signals = {}

    def fake_learn(engine, model, harmful, harmless, need):
        signals[need] = random_signal(engine.d_model, model.module.config.vocab_size)
        return signals[need]

    monkeypatch.setattr(refusal, "learn_signal", fake_learn)
    return signals


def reference_drop(objective, clean, ablated, signal) -> float:
    """The refusal score's drop, written out independently of refusal.score_values."""
    (clean_logits, clean_hidden), (ablated_logits, ablated_hidden) = clean, ablated
    if objective == "refusal-direction":
        return float(torch.dot(clean_hidden - ablated_hidden, signal.direction))
    mass = lambda logits: torch.log(torch.softmax(logits, -1)[signal.opening_tokens].sum())  # noqa: E731
    return float(mass(clean_logits) - mass(ablated_logits))


def reference_greedy(module, family, tokens, steps, kind, objective, signal, means=None):
    """Algorithm 1 by plain hooks: each candidate group's mean drop over the queries, one pass per group and query."""
    clean = [reference_readouts(module, family, t, [], kind, 1e-4, means) for t in tokens]
    group, tables = [], []
    for _ in range(steps):
        table = torch.full((3, family.n_heads), float("nan"), dtype=torch.float64)
        for layer in range(3):
            for head in range(family.n_heads):
                if (layer, head) not in group:
                    drops = [reference_drop(objective, c, reference_readouts(module, family, t, group + [(layer, head)], kind, 1e-4,
                                                                      means), signal)
                             for c, t in zip(clean, tokens)]
                    table[layer, head] = sum(drops) / len(drops)
        flat = torch.nan_to_num(table.flatten(), nan=-float("inf"))
        best = int(flat.argmax())
        group.append((best // family.n_heads, best % family.n_heads))
        tables.append(table)
    return group, tables


@pytest.mark.parametrize("objective", REFUSAL_OBJECTIVES)
@pytest.mark.parametrize("family_name, kind", [("llama", "ua"), ("llama", "sc"), ("llama", "mean"), ("qwen3", "ua"),
                                               ("gpt2", "ua"), ("phi3", "sc")])
def test_refusal_objectives_match_plain_hooks(family_name, kind, objective, learned):
    family = FAMILIES[family_name]
    module = family.build()
    model = wrap(module, byte_tokenizer(), family_name)
    config = SaharaConfig(template="chat", steps=2, ablation=AblationConfig(kind, mean_reference_limit=8), objective=objective)
    result = find_group(model, QUERIES, config, **quiet)
    tokens = [list(p.token_ids) for p in format_prompts(QUERIES, "chat", model.tokenizer)]
    means = None
    if kind == "mean":
        reference_set = format_prompts(load_prompts("harmless-val", limit=8), "chat", model.tokenizer)
        means = reference_means(module, family, [list(p.token_ids) for p in reference_set])
    group, tables = reference_greedy(module, family, tokens, 2, kind, objective, learned[objective], means)
    assert result.heads == group
    for step, table in zip(result.steps, tables):
        assert torch.equal(torch.isnan(step.scores), torch.isnan(table))
        scored = ~torch.isnan(table)
        scale = table[scored].abs().max().item()
        assert scale > 0 and (table[scored].max() - table[scored].min()).item() > 0.05 * scale  # a swapped set would show
        assert ((step.scores[scored] - table[scored]).abs().max() / scale).item() <= 1e-5
        assert step.score == pytest.approx(table[step.chosen].item(), rel=1e-5, abs=1e-5 * scale)
    assert result.config["objective"] == objective and "refusal_signal" in result.config


def test_the_default_objective_is_the_papers_angle(learned):
    model = wrap(FAMILIES["llama"].build(), byte_tokenizer(), "llama")
    result = find_group(model, QUERIES, SaharaConfig(steps=1), **quiet)
    assert SaharaConfig().objective == "angle" and result.config["objective"] == "angle"
    assert not learned and "refusal_signal" not in result.config  # nothing learned for the angle


@pytest.mark.parametrize("objective", REFUSAL_OBJECTIVES)
def test_resume_equals_uninterrupted_with_the_guard(tmp_path, learned, objective):
    model = wrap(FAMILIES["llama"].build(), byte_tokenizer(), "llama")
    config = SaharaConfig(template="chat", steps=3, objective=objective, guard="harmless-val", guard_limit=4,
                          guard_tokens=6, guard_max_rise=50.0)
    uninterrupted = run_sahara(model, QUERIES, config, out=tmp_path / "a", **quiet)
    out = tmp_path / "b"
    with pytest.raises(Interrupt):
        run_sahara(model, QUERIES, config, out=out, progress=stop_at("[step 2/3, layer 2/3]"))
    resumed = run_sahara(model, QUERIES, config, out=out, resume=True, **quiet)
    assert resumed.heads == uninterrupted.heads
    for a, b in zip(uninterrupted.steps, resumed.steps):
        assert torch.equal(a.scores.nan_to_num(-1), b.scores.nan_to_num(-1)) and a.score == b.score
    first, second = (json.loads((tmp_path / name / "sahara.json").read_text()) for name in ("a", "b"))
    assert first["steps"] == second["steps"] and first["config"]["refusal_signal"] == second["config"]["refusal_signal"]


def test_guard_exclude_and_candidates_work_with_a_refusal_objective(tmp_path, capsys):
    """On the command line, on the tiny model (refusal-direction needs no refusing model): pruned to the 6 heads a
    ships.json ranks highest, 0:0 excluded, guarded; the group comes from the allowed candidates."""
    ships = tmp_path / "ships"
    assert main(["ships", "--model", "tiny", "--dataset", "maliciousinstruct", "--limit", "2", "--score", "refusal-direction",
                 "--refusal-limit", "4", "--out", str(ships)]) == 0
    out = tmp_path / "sahara"
    assert main(["sahara", "--model", "tiny", "--dataset", "maliciousinstruct", "--limit", "4", "--steps", "2",
                 "--objective", "refusal-direction", "--refusal-limit", "4", "--candidates", "6", "--rank-by",
                 str(ships / "ships.json"), "--exclude", "0:0", "--guard", "harmless-val", "--guard-limit", "2",
                 "--guard-tokens", "4", "--guard-max-rise", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "objective refusal-direction" in printed
    record = json.loads((out / "sahara.json").read_text())
    mean = torch.tensor(json.loads((ships / "ships.json").read_text())["aggregate"]["mean"], dtype=torch.float64)
    allowed = sorted(((l, h) for l in range(mean.shape[0]) for h in range(mean.shape[1])), key=lambda x: -float(mean[x]))
    allowed = [head for head in allowed[:6]]
    for step in record["steps"]:
        scored = {(l, h) for l, row in enumerate(step["scores"]) for h, v in enumerate(row) if v is not None}
        assert scored <= set(allowed) and (0, 0) not in scored and "guard_rise" in step
    assert record["config"]["objective"] == "refusal-direction"
    assert record["config"]["refusal_signal"]["direction_norm"] > 0


def test_demo_model_learns_its_refusal_and_the_search_weakens_it(tmp_path):
    """On the demo chat model, which refuses: refusal-logprob learns its openings, and each step's group lowers the
    log-probability of a refusal opening on average (a positive, growing objective)."""
    model = load_model(ModelConfig(model="demo"))
    queries = load_prompts("maliciousinstruct", limit=6)
    result = find_group(model, queries, SaharaConfig(steps=2, objective="refusal-logprob", refusal_limit=8), **quiet)
    signal = result.config["refusal_signal"]
    assert signal["opening_tokens"] and int(signal["refusals"].split("/")[0]) >= 4
    assert 0 < result.steps[0].score <= result.steps[1].score


@pytest.mark.parametrize("flags, message", [
    (["--objective", "loudness"], "invalid choice"),
    (["--objective", "refusal-direction", "--rank", "2"], "--score and --rank set the angle objective"),
    (["--objective", "refusal-logprob", "--refusal-limit", "1"], "--refusal-limit must be at least 2"),
])
def test_bad_objective_settings_are_one_line(flags, message, tmp_path, capsys):
    try:
        code = main(["sahara", "--model", "tiny", "--dataset", "maliciousinstruct", "--limit", "4", *flags,
                     "--out", str(tmp_path / "x")])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_model_that_refuses_nothing_is_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["sahara", "--model", "tiny", "--dataset", "maliciousinstruct", "--limit", "4", "--objective",
                 "refusal-logprob", "--refusal-limit", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "refused none of 2 harmful prompts" in err and len(err.splitlines()) == 1
    assert not out.exists()
