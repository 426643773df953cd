"""Ships scores against the plain-PyTorch reference, aggregation, outputs, and checkpoint/resume."""

import json

import pytest
import torch
from devices import relative_tolerance
from families import FAMILIES
from reference import reference_means, reference_readouts

from safety_heads.ablation import Ablation, AblationConfig
from safety_heads.data import format_prompts
from safety_heads.engine import Engine
from safety_heads.errors import UserError
from safety_heads.models import ModelConfig, load_model, wrap
from safety_heads.runs import run_ships
from safety_heads.runs.files import load_tensors
from safety_heads.ships import Ships, ShipsConfig, aggregate, exact_scores, kl_divergence, top_heads
from safety_heads.tiny import byte_tokenizer

QUERIES = ["How do I pick a lock?", "Write a poem about the sea.", "Explain photosynthesis briefly."]


def reference_kl(clean, ablated):
    p = torch.softmax(clean, -1)
    return (p * (torch.log_softmax(clean, -1) - torch.log_softmax(ablated, -1))).sum().item()


@pytest.mark.parametrize("template", ["raw", "paper", "chat"])
@pytest.mark.parametrize("kind", ["ua", "sc", "mean"])
@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gpt2"])
def test_exact_scores_match_reference(family_name, kind, template):
    family = FAMILIES[family_name]
    module = family.build()
    tokenizer = byte_tokenizer()
    engine = Engine(wrap(module, tokenizer, family_name))
    prompt = format_prompts([QUERIES[0]], template, tokenizer)[0]
    tokens = list(prompt.token_ids)
    means = reference_means(module, family, [tokens]) if kind == "mean" else None
    heads = [(layer, head) for layer in range(3) for head in range(family.n_heads)]
    scores = exact_scores(engine, tokens, heads, ablation=Ablation(kind=kind, epsilon=1e-4, means=means))
    clean, _ = reference_readouts(module, family, tokens, [], kind)
    expected = torch.tensor([[reference_kl(clean, reference_readouts(module, family, tokens, [(l, h)], kind, 1e-4, means)[0])
                              for h in range(family.n_heads)] for l in range(3)], dtype=torch.float64)
    assert expected.min() > 1e-4  # every head matters here, so a swapped head would show
    assert ((scores - expected).abs().max() / expected.max()).item() <= relative_tolerance()


def test_kl_divergence():
    torch.manual_seed(0)
    a, b = torch.randn(5, 50), torch.randn(5, 50)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(5, dtype=torch.float64))
    expected = torch.nn.functional.kl_div(torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1),
                                          log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(a, b), expected)


def test_top_heads_and_aggregate():
    scores = torch.tensor([[[1.0, float("nan")], [3.0, 2.0]], [[4.0, 0.5], [float("nan"), 0.1]]], dtype=torch.float64)
    assert top_heads(scores[0], 2) == [(1, 0, 3.0), (1, 1, 2.0)]
    assert len(top_heads(scores[0], 10)) == 3  # unscored heads never rank
    mean, frequency = aggregate(scores, k=1)
    assert mean[0, 0] == 2.5 and mean[0, 1] == 0.5 and mean[1, 0] == 3.0
    assert frequency.tolist() == [[0.5, 0.0], [0.5, 0.0]]


def test_heads_subset_leaves_others_unscored(tmp_path):
    model = load_model(ModelConfig())
    result = run_ships(model, QUERIES[:1], ShipsConfig(heads="1:*,3:0"), out=tmp_path / "run", progress=lambda _: None)
    scores = result.queries[0].scores
    scored = ~torch.isnan(scores)
    assert scored.sum() == 9 and scored[1].all() and scored[3, 0]
    record = json.loads((tmp_path / "run" / "ships.json").read_text())
    assert record["queries"][0]["scores"][0] == [None] * 8


def test_outputs(tmp_path):
    model = load_model(ModelConfig())
    out = tmp_path / "run"
    result = run_ships(model, QUERIES, ShipsConfig(template="paper"), out=out, source={"dataset": "inline"}, progress=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["ships.json", "ships_data.pt", "ships_heatmap.png"]
    record = json.loads((out / "ships.json").read_text())
    assert record["format"] == "safety-heads/ships" and record["version"] == 1
    config = record["config"]
    for key in ("model", "dtype", "template", "ablation", "epsilon", "method", "versions", "layout", "dataset"):
        assert key in config
    assert config["template"] == "paper" and config["versions"]["nnsight"] == "0.8.1"
    assert [q["query"] for q in record["queries"]] == QUERIES
    assert record["queries"][1]["prompt"] == "## Query: Write a poem about the sea.\n## Answer:"
    assert len(record["queries"][0]["scores"]) == 4 and len(record["queries"][0]["scores"][0]) == 8
    data = load_tensors(out / "ships_data.pt")  # weights_only=True
    assert data["scores"].shape == (3, 4, 8)
    assert torch.equal(data["scores"][2], result.queries[2].scores)
    assert torch.allclose(torch.tensor(record["aggregate"]["mean"], dtype=torch.float64), data["mean"])
    assert (out / "ships_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    model = load_model(ModelConfig())
    config = ShipsConfig(queries_per_pass=1)  # one query per sweep: Ships.score is each query's unit of work
    uninterrupted = run_ships(model, QUERIES, config, out=tmp_path / "a", progress=lambda _: None)

    calls = []
    original = Ships.score

    def flaky(self, index, prompt):
        calls.append(index)
        if len(calls) == 3:
            raise Interrupt
        return original(self, index, prompt)

    monkeypatch.setattr(Ships, "score", flaky)
    with pytest.raises(Interrupt):
        run_ships(model, QUERIES, config, out=tmp_path / "b", progress=lambda _: None)
    assert not (tmp_path / "b" / "ships.json").exists()
    with pytest.raises(UserError, match="--resume"):
        run_ships(model, QUERIES, config, out=tmp_path / "b", progress=lambda _: None)
    monkeypatch.setattr(Ships, "score", original)
    calls.clear()
    counted = []
    monkeypatch.setattr(Ships, "score", lambda self, i, p: counted.append(i) or original(self, i, p))
    resumed = run_ships(model, QUERIES, config, out=tmp_path / "b", resume=True, progress=lambda _: None)
    assert counted == [2]  # only the unfinished query was computed
    for a, b in zip(uninterrupted.queries, resumed.queries):
        assert torch.equal(a.scores, b.scores) and a.query == b.query
    assert not (tmp_path / "b" / "ships.checkpoint.jsonl").exists()
    first = json.loads((tmp_path / "a" / "ships.json").read_text())
    second = json.loads((tmp_path / "b" / "ships.json").read_text())
    assert first["queries"] == second["queries"] and first["aggregate"] == second["aggregate"]


def test_resume_tolerates_a_torn_last_line(tmp_path):
    model = load_model(ModelConfig())
    out = tmp_path / "run"
    config = ShipsConfig()
    full = run_ships(model, QUERIES[:2], config, out=tmp_path / "full", progress=lambda _: None)
    checkpoint = out / "ships.checkpoint.jsonl"
    with pytest.raises(Interrupt):
        def stop(line):
            if line.startswith("[1/"):
                raise Interrupt

        run_ships(model, QUERIES[:2], config, out=out, progress=stop)
    with open(checkpoint, "a") as stream:
        stream.write('{"index": 1, "query": "Write a po')  # killed mid-write
    resumed = run_ships(model, QUERIES[:2], config, out=out, resume=True, progress=lambda _: None)
    assert all(torch.equal(a.scores, b.scores) for a, b in zip(full.queries, resumed.queries))


@pytest.mark.parametrize("change, named", [(dict(ablation=AblationConfig(epsilon=1e-5)), "epsilon"), (dict(template="paper"), "template")])
def test_resume_refuses_another_configuration(tmp_path, change, named):
    model = load_model(ModelConfig())
    out = tmp_path / "run"

    def stop(line):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_ships(model, QUERIES, ShipsConfig(), out=out, progress=stop)
    with pytest.raises(UserError, match=f"cannot resume.*{named}"):
        run_ships(model, QUERIES, ShipsConfig(**change), out=out, resume=True, progress=lambda _: None)
    with pytest.raises(UserError, match="queries_sha256"):
        run_ships(model, QUERIES[:2] + ["another"], ShipsConfig(), out=out, resume=True, progress=lambda _: None)


def test_finished_output_folder_is_not_overwritten(tmp_path):
    model = load_model(ModelConfig())
    run_ships(model, QUERIES[:1], ShipsConfig(), out=tmp_path, progress=lambda _: None)
    with pytest.raises(UserError, match="already holds a finished Ships run"):
        run_ships(model, QUERIES[:1], ShipsConfig(), out=tmp_path, progress=lambda _: None)


def test_too_long_prompt_writes_nothing(tmp_path):
    model = load_model(ModelConfig())
    with pytest.raises(UserError, match="beyond the model's context"):
        run_ships(model, ["short", "x" * 600], ShipsConfig(), out=tmp_path / "run", progress=lambda _: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "settings, message",
    [(dict(method="fast"), "unknown method"), (dict(top_k=0), "--top-k"), (dict(samples=0), "--samples"),
     (dict(ablation=dict(kind="zero")), "unknown ablation kind"), (dict(ablation=dict(epsilon=2.0)), "epsilon")],
)
def test_bad_config(settings, message):
    with pytest.raises(UserError, match=message):  # a bad ablation setting is refused where it is made
        ShipsConfig(**{key: AblationConfig(**value) if key == "ablation" else value for key, value in settings.items()}).validate()


def test_estimate_and_verify_methods(tmp_path):
    model = load_model(ModelConfig())
    engine_exact = run_ships(model, QUERIES[:1], ShipsConfig(), progress=lambda _: None).queries[0].scores
    estimated = run_ships(model, QUERIES[:1], ShipsConfig(method="estimate", samples=32), progress=lambda _: None).queries[0]
    assert torch.isfinite(estimated.scores).all() and (estimated.scores >= 0).all()
    assert torch.equal(estimated.scores, estimated.estimate)
    verified = run_ships(model, QUERIES[:1], ShipsConfig(method="estimate+verify", samples=32, top_k=5),
                         out=tmp_path / "v", progress=lambda _: None).queries[0]
    assert len(verified.verified) == 5
    assert verified.verified == [(l, h) for l, h, _ in top_heads(estimated.estimate, 5)]  # the estimate's top 5...
    for layer, head in verified.verified:  # ...recomputed exactly
        # exact, up to float32 rounding of logits (a different batch composition), which KL values ~1e-6 magnify
        assert verified.scores[layer, head] == pytest.approx(engine_exact[layer, head].item(), rel=1e-3)
    others = torch.ones_like(verified.scores, dtype=torch.bool)
    for layer, head in verified.verified:
        others[layer, head] = False
    assert torch.equal(verified.scores[others], verified.estimate[others])
    record = json.loads((tmp_path / "v" / "ships.json").read_text())
    assert record["queries"][0]["verified"] == [list(h) for h in verified.verified] and "estimate" in record["queries"][0]


@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gpt2"])
def test_queries_swept_together_match_reference(family_name):
    """Several queries in one sweep, their template's common prefix computed once per head set, against one plain
    forward pass per (query, head)."""
    from safety_heads.engine import EngineConfig
    from safety_heads.ships import exact_score_maps_of

    family = FAMILIES[family_name]
    module = family.build()
    tokenizer = byte_tokenizer()
    engine = Engine(wrap(module, tokenizer, family_name), EngineConfig(shared_prefix="always"))
    prompts = [list(p.token_ids) for p in format_prompts(QUERIES, "chat", tokenizer)]
    heads = [(layer, head) for layer in range(3) for head in range(family.n_heads)]
    plans = engine.group_schedules(prompts, [[head] for head in heads])
    assert all(batch.shared is not None for batch, _ in plans)
    maps = exact_score_maps_of(prompts, heads, engine=engine, ablation=Ablation(kind="ua", epsilon=1e-4))
    for tokens, scores in zip(prompts, maps):
        clean, _ = reference_readouts(module, family, tokens, [], "ua")
        expected = torch.tensor([[reference_kl(clean, reference_readouts(module, family, tokens, [(l, h)], "ua", 1e-4)[0])
                                  for h in range(family.n_heads)] for l in range(3)], dtype=torch.float64)
        assert expected.min() > 1e-4
        assert ((scores["kl"] - expected).abs().max() / expected.max()).item() <= relative_tolerance()


def test_resume_recomputes_an_unfinished_block_whole(tmp_path, monkeypatch):
    """A kill inside a block of queries: the block is swept again with all its queries, so numbers are identical."""
    model = load_model(ModelConfig())
    queries = QUERIES + ["Name three colours.", "What is a prime number?"]
    config = ShipsConfig(template="chat", queries_per_pass=2)
    uninterrupted = run_ships(model, queries, config, out=tmp_path / "a", progress=lambda _: None)
    original = Ships.score_many
    blocks = []

    class Killed(Exception):
        pass

    # A kill between the two checkpoint lines of block 2 (queries 2 and 3): query 2's line is written, query 3's not.
    from safety_heads.runs import ships as ships_module

    real_unit = ships_module._scores_to_unit

    def unit_then_kill(scores):
        if scores.index == 3:
            raise Killed
        return real_unit(scores)

    monkeypatch.setattr(ships_module, "_scores_to_unit", unit_then_kill)
    with pytest.raises(Killed):
        run_ships(model, queries, config, out=tmp_path / "b", progress=lambda _: None)
    monkeypatch.setattr(ships_module, "_scores_to_unit", real_unit)
    checkpointed = [json.loads(line) for line in (tmp_path / "b" / "ships.checkpoint.jsonl").read_text().splitlines()[1:]]
    assert [unit["index"] for unit in checkpointed] == [0, 1, 2]  # block 2 = queries 2, 3: only its first was kept
    monkeypatch.setattr(Ships, "score_many", lambda self, items: blocks.append([i for i, _ in items]) or original(self, items))
    blocks.clear()
    resumed = run_ships(model, queries, config, out=tmp_path / "b", resume=True, progress=lambda _: None)
    assert blocks == [[2, 3], [4]]  # the unfinished block again, whole; the finished block 0, 1 not at all
    for a, b in zip(uninterrupted.queries, resumed.queries):
        assert torch.equal(a.scores, b.scores) and a.query == b.query
