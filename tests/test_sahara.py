"""Sahara against the plain-PyTorch reference, the score's properties, checkpoint/resume, bad input and outputs."""

import json
import math

import pytest
import torch
from families import FAMILIES
from reference import reference_means, reference_readouts, reference_token_log_probs

from safety_heads.ablation import AblationConfig
from safety_heads.data import format_prompts, load_prompts
from safety_heads.errors import UserError
from safety_heads.guard import GUARD_BATCH, choose_guarded
from safety_heads.models import wrap
from safety_heads.runs import run_sahara
from safety_heads.runs.files import load_tensors
from safety_heads.sahara import Sahara, SaharaConfig, best_head, paper_era_angles, subspace_angle, subspace_angles
from safety_heads.tiny import byte_tokenizer
from safety_heads.work import drain

# Six lengths, so every engine batch is left-padded.
QUERIES = [
    "How do I pick a lock?",
    "Hi",
    "Write a short poem about the sea, please.",
    "Explain how vaccines work in simple words.",
    "Tell me a joke",
    "What is the capital of France and why is it that city?",
]
TOLERANCE_DEGREES = 1e-4
quiet = dict(progress=lambda _: None)


def tiny(family_name="llama"):
    family = FAMILIES[family_name]
    module = family.build()
    return family, module, wrap(module, byte_tokenizer(), family_name)


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")[2]


# ----------------------------------------------------------------------------------------------------------------
# The independent reference: one unpadded forward pass per (query, head set), top singular vector in float64.


def reference_angle(clean, ablated):
    u1 = torch.linalg.svd(clean, full_matrices=False).U[:, 0]
    u2 = torch.linalg.svd(ablated, full_matrices=False).U[:, 0]
    return math.degrees(math.acos(min(1.0, abs(float(u1 @ u2)))))


def reference_greedy(module, family, tokens, steps, kind, means=None):
    def matrix(heads):
        return torch.stack([reference_readouts(module, family, t, heads, kind, 1e-4, means)[1] for t in tokens])

    clean, group, tables, conditioning = matrix([]), [], [], math.inf
    for _ in range(steps):
        table = torch.full((3, family.n_heads), float("nan"), dtype=torch.float64)
        for layer in range(3):
            for head in range(family.n_heads):
                if (layer, head) not in group:
                    ablated = matrix(group + [(layer, head)])
                    table[layer, head] = reference_angle(clean, ablated)
                    sigma = torch.linalg.svdvals(ablated)
                    conditioning = min(conditioning, (sigma[0] / sigma[1]).item())
        flat = torch.nan_to_num(table.flatten(), nan=-1.0)
        best = int(flat.argmax())
        group.append((best // family.n_heads, best % family.n_heads))
        tables.append(table)
    return group, tables, conditioning


@pytest.mark.parametrize(
    "family_name, kind",
    [("llama", "ua"), ("llama", "sc"), ("llama", "mean"), ("qwen3", "ua"), ("qwen3", "sc"), ("gpt2", "ua"),
     ("gpt2", "sc")],
)
def test_scores_match_reference(family_name, kind):
    family, module, model = tiny(family_name)
    # The paper's template: every prompt ends in "## Answer:", so (as in real chat models) M_clean has a dominant
    # direction and its top singular vector is well determined; float32 rounding then moves no angle by 1e-4 degrees.
    config = SaharaConfig(template="paper", steps=2, ablation=AblationConfig(kind, mean_reference_limit=8))
    result = run_sahara(model, QUERIES, config, **quiet)
    tokens = [list(p.token_ids) for p in format_prompts(QUERIES, "paper", model.tokenizer)]
    means = None
    if kind == "mean":
        reference_set = format_prompts(load_prompts("harmless-val", limit=8), "paper", model.tokenizer)
        means = reference_means(module, family, [list(p.token_ids) for p in reference_set])
    group, tables, conditioning = reference_greedy(module, family, tokens, 2, kind, means)
    assert conditioning > 1.05, "an ablated M has a near-tie at the top; the comparison would measure rounding"
    assert result.heads == group
    for step, table in zip(result.steps, tables):
        assert torch.equal(torch.isnan(step.scores), torch.isnan(table))
        scored = ~torch.isnan(table)
        assert (step.scores[scored] - table[scored]).abs().max().item() <= TOLERANCE_DEGREES
        # Sensitive: the heads' scores are degrees apart, so scoring a wrong head or set would show.
        assert table[scored].max() - table[scored].min() > 2.0
        assert step.score == pytest.approx(table[step.chosen].item(), abs=TOLERANCE_DEGREES)


# ----------------------------------------------------------------------------------------------------------------
# The score itself.


def orthonormal(n, k, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64)).Q.T  # k rows


def test_subspace_angle_properties():
    a, b, c, e, _ = orthonormal(6, 5)  # query space, N = 6
    x, y, z = orthonormal(9, 3, seed=1)  # hidden space, d = 9
    clean = 3 * torch.outer(a, x) + 2 * torch.outer(b, y) + 0.5 * torch.outer(c, z)
    assert subspace_angle(clean, clean) < 1e-5
    assert subspace_angle(clean, -clean) < 1e-5  # the SVD's sign ambiguity cancels
    assert subspace_angle(clean, 7 * clean.float()) < 1e-2  # scale-free; float32 input is accepted
    for theta in (30.0, 90.0):
        w = math.cos(math.radians(theta)) * a + math.sin(math.radians(theta)) * e
        turned = 3 * torch.outer(w, x) + 2 * torch.outer(b, y) + 0.5 * torch.outer(c, z)
        assert subspace_angle(clean, turned) == pytest.approx(theta, abs=1e-6)
        assert subspace_angle(clean, -turned) == pytest.approx(theta, abs=1e-6)
    # rank 2: span{a, b} against span{a, w}, with w at 40 degrees from b: principal angles 0 and 40.
    w = math.cos(math.radians(40)) * b + math.sin(math.radians(40)) * e
    second = 3 * torch.outer(a, x) + 2 * torch.outer(w, y) + 0.5 * torch.outer(c, z)
    assert subspace_angle(clean, second, rank=2) == pytest.approx(40.0, abs=1e-6)
    assert subspace_angle(clean, second, rank=1) < 1e-5  # the top direction did not move
    batch = torch.stack([clean, second, turned])
    assert torch.allclose(subspace_angles(clean, batch, rank=2),
                          torch.tensor([subspace_angle(clean, m, rank=2) for m in batch], dtype=torch.float64))
    with pytest.raises(ValueError, match="rank"):
        subspace_angle(clean, clean, rank=7)


def test_paper_era_angle_sees_column_zero_only():
    a, b = orthonormal(5, 2)
    clean = torch.randn(5, 4, dtype=torch.float64)
    clean[:, 0] = 2 * a
    ablated = clean.clone()
    ablated[:, 1:] = torch.randn(5, 3, dtype=torch.float64)  # other hidden dimensions are invisible to it
    ablated[:, 0] = -5 * (math.cos(math.radians(25)) * a + math.sin(math.radians(25)) * b)
    assert paper_era_angles(clean, ablated[None]).item() == pytest.approx(25.0, abs=1e-6)
    assert paper_era_angles(clean, clean[None]).item() < 1e-5


def test_best_head_ties_go_to_the_lowest_head():
    scores = torch.tensor([[float("nan"), 1.0], [3.0, 3.0]], dtype=torch.float64)
    assert best_head(scores) == ((1, 0), 3.0)
    scores[0, 1] = 3.0
    assert best_head(scores) == ((0, 1), 3.0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint and resume.


class Interrupt(Exception):
    pass


def stop_at(prefix):
    def progress(line):
        if line.startswith(prefix):
            raise Interrupt

    return progress


def same_steps(a, b):
    assert a.heads == b.heads
    for x, y in zip(a.steps, b.steps):
        assert x.chosen == y.chosen and x.score == y.score
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=0, equal_nan=True)


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch, llama):
    config = SaharaConfig(steps=3)
    uninterrupted = run_sahara(llama, QUERIES, config, out=tmp_path / "a", **quiet)
    out = tmp_path / "b"
    with pytest.raises(Interrupt):  # killed after layers 0 and 1 of step 2 were checkpointed
        run_sahara(llama, QUERIES, config, out=out, progress=stop_at("[step 2/3, layer 2/3]"))
    assert not (out / "sahara.json").exists()
    with pytest.raises(UserError, match="--resume"):
        run_sahara(llama, QUERIES, config, out=out, **quiet)
    with open(out / "sahara.checkpoint.jsonl", "a") as stream:
        stream.write('{"step": 2, "layer": 2, "gro')  # and the kill tore the next line
    calls = []
    original = Sahara.score_sets

    def counted(self, tokens, reference, head_sets):
        calls.append([list(heads) for heads in head_sets])
        return original(self, tokens, reference, head_sets)

    monkeypatch.setattr(Sahara, "score_sets", counted)
    lines = []
    resumed = run_sahara(llama, QUERIES, config, out=out, resume=True, progress=lines.append)
    first = uninterrupted.heads[0]
    second = uninterrupted.heads[1]
    # Only step 2's last layer and step 3 were computed; steps 1-2's choices came from the checkpoint.
    assert len(calls) == 1 + 3
    assert calls[0] == [[first, (2, h)] for h in range(4) if (2, h) != first]
    assert all(sets[0][:2] == [first, second] for sets in calls[1:])
    assert lines[0].startswith("resuming: 5 layer scorings")
    same_steps(uninterrupted, resumed)
    assert not (out / "sahara.checkpoint.jsonl").exists()
    a = json.loads((tmp_path / "a" / "sahara.json").read_text())
    b = json.loads((out / "sahara.json").read_text())
    assert a["heads"] == b["heads"] and a["steps"] == b["steps"]


def test_resume_without_a_checkpoint_starts_afresh_and_can_resume_again(tmp_path, llama):
    config = SaharaConfig(steps=1, heads="1-2:*")
    full = run_sahara(llama, QUERIES, config, **quiet)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_sahara(llama, QUERIES, config, out=out, resume=True, progress=stop_at("[step 1/1, layer 1/"))
    same_steps(full, run_sahara(llama, QUERIES, config, out=out, resume=True, **quiet))


def test_resume_of_a_finished_search_computes_nothing(tmp_path, monkeypatch, llama):
    config = SaharaConfig(steps=2)
    full = run_sahara(llama, QUERIES, config, out=tmp_path / "a", **quiet)
    out = tmp_path / "b"
    with pytest.raises(Interrupt):  # every score checkpointed, killed before the outputs were written
        run_sahara(llama, QUERIES, config, out=out, progress=stop_at("step 2/2: chose"))
    monkeypatch.setattr(Sahara, "score_sets", lambda *args: pytest.fail("recomputed a checkpointed layer"))
    same_steps(full, run_sahara(llama, QUERIES, config, out=out, resume=True, **quiet))


@pytest.mark.parametrize(
    "change, named",
    [(dict(ablation=AblationConfig(epsilon=1e-5)), "epsilon"), (dict(rank=2), "rank"), (dict(template="paper"), "template"),
     (dict(heads="0-1:*"), "heads")],
)
def test_resume_refuses_another_configuration(tmp_path, change, named, llama):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_sahara(llama, QUERIES, SaharaConfig(), out=out, progress=stop_at("[step 1/3, layer 1/"))
    with pytest.raises(UserError, match=f"cannot resume.*{named}"):
        run_sahara(llama, QUERIES, SaharaConfig(**change), out=out, resume=True, **quiet)
    with pytest.raises(UserError, match="queries_sha256"):
        run_sahara(llama, QUERIES[:5] + ["another query"], SaharaConfig(), out=out, resume=True, **quiet)


def test_finished_output_folder_is_not_overwritten(tmp_path, llama):
    config = SaharaConfig(steps=1, heads="2:*")
    run_sahara(llama, QUERIES, config, out=tmp_path, **quiet)
    with pytest.raises(UserError, match="already holds a finished Sahara run"):
        run_sahara(llama, QUERIES, config, out=tmp_path, **quiet)


# ----------------------------------------------------------------------------------------------------------------
# Bad input.


def test_needs_more_queries_than_the_rank(llama):
    with pytest.raises(UserError, match="more queries than the rank"):
        run_sahara(llama, QUERIES[:2], SaharaConfig(rank=2), **quiet)
    with pytest.raises(UserError, match="more queries than the rank"):
        run_sahara(llama, QUERIES[:1], SaharaConfig(), **quiet)  # one query: every angle would be 0


def test_steps_beyond_the_candidates(llama):
    with pytest.raises(UserError, match="--steps 3 exceeds the 2 candidate heads"):
        run_sahara(llama, QUERIES, SaharaConfig(steps=3, heads="0:0-1"), **quiet)


def test_excluded_heads_are_never_scored_or_chosen(llama):
    everything = run_sahara(llama, QUERIES, SaharaConfig(steps=1, heads="1-2:*"), **quiet)
    best = everything.heads[0]
    without = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", exclude=f"{best[0]}:{best[1]},2:0"), **quiet)
    assert best not in without.heads and (2, 0) not in without.heads
    first = without.steps[0].scores
    assert first[best].isnan() and first[2, 0].isnan()
    kept = ~first.isnan()
    torch.testing.assert_close(first[kept], everything.steps[0].scores[kept], rtol=0, atol=0)  # the rest unchanged
    assert without.heads[0] == best_head(first)[0]  # the best of what is left


def test_exclude_checks_its_spec_and_what_is_left(llama):
    with pytest.raises(UserError, match="layer 7"):
        run_sahara(llama, QUERIES, SaharaConfig(exclude="7:0"), **quiet)
    with pytest.raises(UserError, match="--steps 2 exceeds the 1 candidate heads; lower --steps, widen --heads or exclude fewer"):
        run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="0:0-1", exclude="0:1"), **quiet)


def test_duplicates_warn_and_stay_or_are_dropped(llama):
    config = dict(steps=1, heads="2:*")
    with_copy = QUERIES + [QUERIES[0]]
    lines = []
    kept = run_sahara(llama, with_copy, SaharaConfig(**config), progress=lines.append)
    assert any(line.startswith("warning: 1 duplicate query") for line in lines)
    assert kept.queries == with_copy and kept.config["n_queries"] == 7 and kept.config["duplicates"] == 1
    lines.clear()
    dropped = run_sahara(llama, with_copy, SaharaConfig(dedupe=True, **config), progress=lines.append)
    assert lines[0] == "dropped 1 duplicate query (--dedupe)"
    plain = run_sahara(llama, QUERIES, SaharaConfig(**config), **quiet)
    assert dropped.queries == QUERIES and dropped.config["n_queries"] == 6
    assert dropped.config["queries_sha256"] == plain.config["queries_sha256"] != kept.config["queries_sha256"]
    same_steps(dropped, plain)


def test_too_long_prompt_writes_nothing(tmp_path, llama):
    with pytest.raises(UserError, match="beyond the model's context"):
        run_sahara(llama, ["short", "x" * 600], SaharaConfig(), out=tmp_path / "run", **quiet)
    assert not (tmp_path / "run").exists()


def test_bad_head_spec(llama):
    with pytest.raises(UserError, match="layer 5"):
        run_sahara(llama, QUERIES, SaharaConfig(heads="5:*"), **quiet)


@pytest.mark.parametrize(
    "settings, message",
    [(dict(steps=0), "--steps"), (dict(rank=0), "--rank"), (dict(ablation=dict(kind="zero")), "unknown ablation kind"),
     (dict(ablation=dict(epsilon=2.0)), "epsilon"), (dict(score="cosine"), "unknown score"),
     (dict(score="paper-era", rank=2), "--rank applies"), (dict(ablation=dict(mean_reference_limit=0)), "--mean-reference-limit"),
     (dict(guard_limit=0), "--guard-limit"), (dict(guard_tokens=0), "--guard-tokens"),
     (dict(guard_max_rise=0.0), "--guard-max-rise must be positive")],
)
def test_bad_config(settings, message):
    with pytest.raises(UserError, match=message):  # a bad ablation setting is refused where it is made
        SaharaConfig(**{key: AblationConfig(**value) if key == "ablation" else value for key, value in settings.items()}).validate()


# ----------------------------------------------------------------------------------------------------------------
# Outputs.


def test_outputs(tmp_path, llama):
    out = tmp_path / "run"
    config = SaharaConfig(steps=2, heads="1-2:*", template="paper")
    result = run_sahara(llama, QUERIES, config, out=out, source={"dataset": "inline"}, **quiet)
    files = ["sahara.json", "sahara_data.pt", "sahara_step1.png", "sahara_step2.png"]
    assert sorted(p.name for p in out.iterdir()) == files
    record = json.loads((out / "sahara.json").read_text())
    assert record["format"] == "safety-heads/sahara" and record["version"] == 1
    for key in ("model", "dtype", "template", "steps", "rank", "ablation", "epsilon", "heads", "dedupe", "score",
                "dataset", "n_queries", "queries_sha256", "versions", "layout"):
        assert key in record["config"], key
    assert record["heads"] == [list(h) for h in result.heads] and len(record["heads"]) == 2
    first, second = record["steps"]
    assert first["step"] == 1 and first["chosen"] == record["heads"][0]
    assert first["scores"][0] == [None] * 4  # layer 0 is not a candidate
    layer, head = first["chosen"]
    assert second["scores"][layer][head] is None  # already in the group
    assert first["scores"][layer][head] == first["score"]
    assert second["score"] == max(x for row in second["scores"] for x in row if x is not None)
    assert record["queries"][1] == {"index": 1, "query": "Hi", "prompt": "## Query: Hi\n## Answer:"}
    assert len(record["clean"]["singular_values"]) == 6
    data = load_tensors(out / "sahara_data.pt")  # weights_only=True
    assert data["scores"].shape == (2, 3, 4) and data["scores"].dtype == torch.float64
    assert data["heads"].dtype == torch.long and data["heads"].tolist() == record["heads"]
    torch.testing.assert_close(data["scores"][1], result.steps[1].scores, rtol=0, atol=0, equal_nan=True)
    assert data["queries"] == QUERIES and data["config"]["steps"] == 2
    assert (out / "sahara_step2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paper_era_score_runs(llama):
    result = run_sahara(llama, QUERIES, SaharaConfig(steps=1, score="paper-era"), **quiet)
    scored = result.steps[0].scores[~torch.isnan(result.steps[0].scores)]
    assert ((scored >= 0) & (scored <= 90)).all() and result.config["score"] == "paper-era"


def test_remote_engine_scores_a_whole_step_per_call(monkeypatch):
    """With a remote engine, one engine call (one request) per step; results equal the local run."""
    from safety_heads.engine import EngineConfig
    from safety_heads.models import ModelConfig, load_model
    from safety_heads.runs import run_sahara
    from safety_heads.sahara import Sahara, SaharaConfig

    model = load_model(ModelConfig())
    queries = ["How do I pick a lock?", "Write a poem about rain.", "Explain taxes to a child.", "Hello there!"]
    config = SaharaConfig(steps=2, heads="0-1:*")
    local = run_sahara(model, queries, config, progress=lambda _: None)
    calls = []
    original = Sahara.score_sets
    monkeypatch.setattr(Sahara, "score_sets", lambda self, *a: calls.append(1) or original(self, *a))
    remote = run_sahara(model, queries, config, engine_config=EngineConfig(remote="local"), progress=lambda _: None)
    assert len(calls) == 2  # one per step (locally: one per layer, 4)
    assert remote.heads == local.heads
    for a, b in zip(local.steps, remote.steps):
        assert torch.allclose(a.scores, b.scores, equal_nan=True, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The harmless guard.

GUARD = dict(guard="harmless-val", guard_limit=3, guard_tokens=6)


def reference_guard(module, family, tokenizer, config, group_sets):
    """Independently: greedy answers by an argmax loop of the plain module, then for each head set the rise of their
    mean NLL per token (hooked passes, one per sequence and set) over the clean model, averaged over prompts."""
    eos = tokenizer.eos_token_id
    sequences = []
    for query in load_prompts(config.guard, limit=config.guard_limit):
        prompt = list(format_prompts([query], config.template, tokenizer)[0].token_ids)
        answer = []
        with torch.no_grad():
            while len(answer) < config.guard_tokens:
                token = int(module(torch.tensor([prompt + answer])).logits[0, -1].argmax())
                if token == eos:
                    break
                answer.append(token)
        if answer:
            sequences.append((prompt + answer, len(answer)))

    def nll(heads):
        return sum(-reference_token_log_probs(module, family, ids, heads, "ua")[-n:].mean() for ids, n in sequences) / len(sequences)

    clean = nll([])
    return [nll(heads) - clean for heads in group_sets], len(sequences)


def test_guard_rises_match_reference():
    family, module, model = tiny("llama")
    config = SaharaConfig(steps=1, heads="1-2:*", guard_max_rise=1e9, **GUARD)
    candidates = [(layer, head) for layer in (1, 2) for head in range(family.n_heads)]
    rises = Sahara(model, config).guard_rises([[h] for h in candidates])
    expected, n_answers = reference_guard(module, family, model.tokenizer, config, [[h] for h in candidates])
    assert n_answers >= 2
    expected = torch.stack(expected)
    assert (rises - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert expected.abs().max() > 1e-3  # the ablations do move the answers' likelihood
    # In the search, the best-scoring candidates are checked first, GUARD_BATCH of them in one call.
    step = run_sahara(model, QUERIES, config, **quiet).steps[0]
    checked = [h for h in candidates if not step.guard[h].isnan()]
    assert len(checked) == GUARD_BATCH and torch.isnan(step.guard[0]).all()
    best_first = sorted(candidates, key=lambda h: -step.scores[h].item())
    assert set(checked) == set(best_first[:GUARD_BATCH])
    for head in checked:
        assert abs(step.guard[head] - expected[candidates.index(head)]) <= 1e-5 * expected.abs().max()


def test_guard_passes_over_heads_above_the_limit(llama):
    plain = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*"), **quiet)
    lenient = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", guard_max_rise=1e9, **GUARD), **quiet)
    same_steps(plain, lenient)  # a guard nothing fails changes nothing
    first = lenient.steps[0]
    limit = float(first.guard[first.chosen]) - 1e-9  # just below the rise of the head chosen unguarded
    lines = []
    guarded = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", guard_max_rise=limit, **GUARD),
                         progress=lines.append)
    step = guarded.steps[0]
    assert step.chosen != first.chosen and step.guard[step.chosen] <= limit
    torch.testing.assert_close(step.scores, first.scores, rtol=0, atol=0, equal_nan=True)  # scores are not changed
    higher = step.scores > step.scores[step.chosen]
    assert higher.any() and (step.guard[higher] > limit).all()  # every better-scoring head was checked and failed
    assert step.chosen == best_head(step.scores.masked_fill(higher, float("nan")))[0]
    assert any(f"the guard passed over {first.chosen[0]}:{first.chosen[1]} (+" in line for line in lines)
    assert any(line.startswith("guard: the clean model's answers to") for line in lines)


def test_guarded_choice_is_the_best_eligible_head():
    """_choose_guarded on random score matrices with NaN holes (heads not scored): the highest-scoring head whose
    rise is within the limit, ties to the lowest (layer, head), exactly as best_head on the eligible heads."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        scores = torch.randint(0, 6, (3, 5), generator=generator).double()  # small integers: many ties
        scores[torch.rand(3, 5, generator=generator) < 0.3] = float("nan")
        if scores.isnan().all():
            continue
        rises = torch.rand(3, 5, generator=generator, dtype=torch.float64)
        fake = type("FakeSahara", (), {"config": SaharaConfig(guard="x", guard_max_rise=0.5),
                                       "guard_rises": lambda self, sets, rises=rises: torch.stack([rises[s[-1]] for s in sets])})()
        chosen, guard, passed_over = drain(choose_guarded(fake, 1, [], scores, {}))
        eligible = scores.masked_fill(rises > 0.5, float("nan"))
        if eligible.isnan().all():
            assert chosen is None
            continue
        assert chosen == best_head(eligible)[0]
        assert all(rises[h] > 0.5 and scores[h] >= scores[chosen] for h in passed_over)
        assert guard[chosen] == rises[chosen]


def test_guard_that_nothing_passes(llama, monkeypatch):
    def rises(self, head_sets):  # single heads pass, groups of two do not
        return torch.tensor([0.0 if len(heads) == 1 else 5.0 for heads in head_sets], dtype=torch.float64)

    monkeypatch.setattr(Sahara, "guard_rises", rises)
    lines = []
    stopped = run_sahara(llama, QUERIES, SaharaConfig(steps=3, heads="1-2:*", **GUARD), progress=lines.append)
    assert len(stopped.heads) == 1 and len(stopped.steps) == 1
    assert "the group stops at" in lines[-1]
    monkeypatch.setattr(Sahara, "guard_rises", lambda self, head_sets: torch.full((len(head_sets),), 5.0, dtype=torch.float64))
    with pytest.raises(UserError, match="every candidate head raises .* by more than 0.25 nats/token .*--guard-max-rise"):
        run_sahara(llama, QUERIES, SaharaConfig(steps=3, heads="1-2:*", **GUARD), **quiet)


def test_guard_is_checkpointed_and_written(tmp_path, monkeypatch, llama):
    config = SaharaConfig(steps=2, heads="1-2:*", **GUARD)
    uninterrupted = run_sahara(llama, QUERIES, config, out=tmp_path / "a", **quiet)
    out = tmp_path / "b"
    with pytest.raises(Interrupt):
        run_sahara(llama, QUERIES, config, out=out, progress=stop_at("[step 2/2, layer 2/2]"))
    units = [json.loads(line) for line in (out / "sahara.checkpoint.jsonl").read_text().splitlines()[1:]]
    checks = [u for u in units if "guard" in u]
    assert [u["step"] for u in checks] == [1] and len(checks[0]["guard"]) == GUARD_BATCH
    calls = []
    original = Sahara.guard_rises
    monkeypatch.setattr(Sahara, "guard_rises", lambda self, sets: calls.append(len(sets)) or original(self, sets))
    resumed = run_sahara(llama, QUERIES, config, out=out, resume=True, **quiet)
    assert calls == [7]  # step 2's check of its 7 candidates (at most GUARD_BATCH); step 1's came from the checkpoint
    same_steps(uninterrupted, resumed)
    for a, b in zip(uninterrupted.steps, resumed.steps):
        torch.testing.assert_close(a.guard, b.guard, rtol=0, atol=0, equal_nan=True)
    record = json.loads((out / "sahara.json").read_text())
    assert record["config"]["guard"] == "harmless-val" and record["config"]["guard_max_rise"] == 0.25
    layer, head = record["steps"][0]["chosen"]
    assert record["steps"][0]["guard_rise"][layer][head] == pytest.approx(float(resumed.steps[0].guard[layer, head]))
    assert record["steps"][0]["guard_rise"][0] == [None] * 4
    data = load_tensors(out / "sahara_data.pt")
    assert data["guard_rise"].shape == (2, 3, 4)
    with pytest.raises(UserError, match="cannot resume.*guard_max_rise"):
        broken = tmp_path / "c"
        with pytest.raises(Interrupt):
            run_sahara(llama, QUERIES, config, out=broken, progress=stop_at("[step 1/2, layer 2/2]"))
        run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", **GUARD, guard_max_rise=0.5), out=broken,
                   resume=True, **quiet)


def test_guard_through_a_remote_engine_equals_local():
    """Remote (nnsight's local simulation of a request): the guard's answers are generated and scored by requests,
    with the same results as locally."""
    from safety_heads.engine import EngineConfig

    family, module, model = tiny("llama")
    config = SaharaConfig(steps=2, heads="1-2:*", guard_max_rise=0.3, **GUARD)
    local = run_sahara(model, QUERIES, config, **quiet)
    remote = run_sahara(model, QUERIES, config, engine_config=EngineConfig(remote="local"), **quiet)
    assert remote.heads == local.heads
    for a, b in zip(local.steps, remote.steps):
        assert a.passed_over == b.passed_over
        assert torch.allclose(a.guard, b.guard, equal_nan=True, atol=1e-6)


# -- candidate pruning by a ships.json (--candidates N --rank-by) ----------------------------------------------------


def test_candidates_ranked_by_a_ships_file_equal_the_same_heads_given_by_hand(tmp_path):
    from safety_heads.ablation import format_heads
    from safety_heads.cli import main
    from safety_heads.runs.files import read_json

    common = ["--model", "demo", "--dataset", "maliciousinstruct", "--limit", "4", "--template", "chat"]
    assert main(["ships", *common, "--score", "refusal-direction", "--refusal-limit", "4", "--out", str(tmp_path / "ships")]) == 0
    mean = read_json(tmp_path / "ships" / "ships.json")["aggregate"]["mean"]
    ranked = sorted(((l, h) for l in range(len(mean)) for h in range(len(mean[0]))), key=lambda x: -mean[x[0]][x[1]])
    assert main(["sahara", *common, "--steps", "2", "--candidates", "5", "--rank-by", str(tmp_path / "ships" / "ships.json"),
                 "--out", str(tmp_path / "pruned")]) == 0
    assert main(["sahara", *common, "--steps", "2", "--heads", format_heads(ranked[:5]), "--out", str(tmp_path / "by-hand")]) == 0
    pruned, by_hand = read_json(tmp_path / "pruned" / "sahara.json"), read_json(tmp_path / "by-hand" / "sahara.json")
    assert pruned["heads"] == by_hand["heads"] and all(tuple(h) in ranked[:5] for h in pruned["heads"])
    assert [s["scores"] for s in pruned["steps"]] == [s["scores"] for s in by_hand["steps"]]
    assert pruned["config"]["candidates"] == 5


@pytest.mark.parametrize("flags, message", [
    (["--candidates", "4"], "--candidates and --rank-by go together"),
    (["--candidates", "0", "--rank-by", "x.json"], "--candidates must be at least 1"),
    (["--candidates", "4", "--rank-by", "{bad}"], "not a ships.json"),
    (["--candidates", "4", "--rank-by", "{wrong-shape}"], "made with another model"),
])
def test_bad_candidate_settings_are_one_line(flags, message, tmp_path, capsys):
    from safety_heads.cli import main

    (tmp_path / "bad.json").write_text('{"queries": []}')
    (tmp_path / "wrong.json").write_text('{"format": "safety-heads/ships", "config": {}, "queries": [], '
                                        '"aggregate": {"mean": [[0.1, 0.2], [0.3, 0.4]], "top_frequency": [[0, 0], [0, 0]]}}')
    flags = [f.replace("{bad}", str(tmp_path / "bad.json")).replace("{wrong-shape}", str(tmp_path / "wrong.json")) for f in flags]
    assert main(["sahara", "--model", "tiny", "--dataset", "maliciousinstruct", "--limit", "2", *flags,
                 "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_guard_batch_changes_the_cost_not_the_choice(llama):
    """guard_batch 1 checks the best head alone first and doubles only on failure: the same group, fewer checks."""
    wide = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", guard_max_rise=1e9, **GUARD), **quiet)
    narrow = run_sahara(llama, QUERIES, SaharaConfig(steps=2, heads="1-2:*", guard_max_rise=1e9, guard_batch=1, **GUARD),
                        **quiet)
    same_steps(wide, narrow)
    assert [int((~step.guard.isnan()).sum()) for step in narrow.steps] == [1, 1]
    first = wide.steps[0]
    limit = float(first.guard[first.chosen]) - 1e-9  # the unguarded best fails: the guard must widen
    fails = [run_sahara(llama, QUERIES, SaharaConfig(steps=1, heads="1-2:*", guard_max_rise=limit, guard_batch=batch,
                                                     **GUARD), **quiet).steps[0] for batch in (1, 8)]
    assert fails[0].chosen == fails[1].chosen
    assert 2 <= int((~fails[0].guard.isnan()).sum())


def test_sets_per_call_gathers_layers_and_resumes_identically(tmp_path, monkeypatch, llama):
    """sets_per_call 6 puts two layers (4 and 4 sets, minus the group's) in one engine call; a kill between the
    two layers' checkpoint lines is resumed by the same call again, so the numbers equal the uninterrupted run's."""
    config = SaharaConfig(steps=2, sets_per_call=6)
    calls = []
    original = Sahara.score_sets
    monkeypatch.setattr(Sahara, "score_sets", lambda self, t, r, sets: calls.append(len(sets)) or original(self, t, r, sets))
    uninterrupted = run_sahara(llama, QUERIES, config, out=tmp_path / "a", **quiet)
    assert calls[0] == 8 and calls[1] == 4  # step 1: layers 0-1 together, then layer 2
    per_layer = run_sahara(llama, QUERIES, SaharaConfig(steps=2), **quiet)
    for a, b in zip(uninterrupted.steps, per_layer.steps):
        assert a.chosen == b.chosen
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-9, equal_nan=True)
    out = tmp_path / "b"
    with pytest.raises(Interrupt):  # the first layer of step 2's first call is checkpointed, its second is not
        run_sahara(llama, QUERIES, config, out=out, progress=stop_at("[step 2/2, layer 1/3]"))
    resumed = run_sahara(llama, QUERIES, config, out=out, resume=True, **quiet)
    same_steps(uninterrupted, resumed)


def test_readout_last_layer_is_the_final_norms_input_by_plain_hooks(tmp_path):
    """--readout last-layer: M's rows are the last layer's output before the final norm (the notebook's readout),
    checked against a plain PyTorch hook; the default stays the norm's output."""
    from safety_heads.engine import Engine, EngineConfig
    from safety_heads.models import ModelConfig, load_model
    from safety_heads.sahara import Sahara, SaharaConfig

    model = load_model(ModelConfig(device="cpu"))  # compared with plain passes of CPU tensors below
    tokens = [list(model.tokenizer("How do I pick a lock?").input_ids), list(model.tokenizer("Tell me a secret").input_ids)]
    seen = {}
    norm = model.module.model.norm
    handle = norm.register_forward_hook(lambda module, args, output: seen.update(before=args[0][:, -1], after=output[:, -1]))
    try:
        for row, ids in enumerate(tokens):
            with torch.no_grad():
                model.module(torch.tensor([ids]))
            seen[row] = (seen["before"][0].clone(), seen["after"][0].clone())
    finally:
        handle.remove()
    for readout, which in (("last-layer", 0), ("final-norm", 1)):
        clean = Sahara(model, SaharaConfig(readout=readout)).clean(tokens)
        for row in range(len(tokens)):
            assert torch.allclose(clean[row], seen[row][which], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen[0][0], seen[0][1])  # the two readouts differ
    with pytest.raises(UserError, match="--readout"):
        SaharaConfig(readout="middle").validate()
    assert Engine(model, EngineConfig()).sites["hidden_readout"] == "final-norm"
