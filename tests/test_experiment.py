"""`safety-heads run`: every output exists, parses and agrees with the others; the report says what the files say."""

import json
import re

import pytest
import torch

from safety_heads.cli import main
from safety_heads.runs.files import load_tensors

SMALL = ["--ships-limit", "2", "--sahara-limit", "4", "--eval-limit", "2", "--harmless-limit", "2", "--max-new-tokens", "6", "--steps", "2"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--quick", "--out", str(out), *SMALL]) == 0
    return out


def test_every_output_exists_and_parses(run_folder):
    for name in ("report.html", "report.md", "experiment.json", "ships_data.pt", "sahara_data.pt", "eval_data.pt",
                 "experiment_data.pt", "ships/ships.json", "sahara/sahara.json", "eval/eval.json", "eval-per-query/eval.json"):
        assert (run_folder / name).is_file(), name
    for name in ("experiment.json", "ships/ships.json", "sahara/sahara.json", "eval/eval.json"):
        json.loads((run_folder / name).read_text())
    compiled = load_tensors(run_folder / "experiment_data.pt")
    assert set(compiled) == {"ships", "sahara", "eval", "eval_per_query", "experiment"}
    assert torch.equal(compiled["ships"]["scores"], load_tensors(run_folder / "ships_data.pt")["scores"])
    assert not list(run_folder.rglob("*.checkpoint.jsonl"))


def test_outputs_agree(run_folder):
    sahara = json.loads((run_folder / "sahara" / "sahara.json").read_text())
    evaluation = json.loads((run_folder / "eval" / "eval.json").read_text())
    experiment = json.loads((run_folder / "experiment.json").read_text())
    assert experiment["heads"] == sahara["heads"] == evaluation["heads"]  # the group evaluated is the group found
    assert experiment["asr"] == evaluation["results"]
    html = (run_folder / "report.html").read_text()
    markdown = (run_folder / "report.md").read_text()
    group = ", ".join(f"{l}:{h}" for l, h in sahara["heads"])
    assert f"<b>{group}</b>" in html and f"**{group}**" in markdown
    for name, numbers in evaluation["results"].items():
        for judge, value in numbers["ablated"]["asr"].items():
            (first, last), n = numbers["positions"], numbers["n"]
            base, ablated = numbers["baseline"], numbers["ablated"]
            assert base["asr"][judge] == base["harmful"][judge] / n and value == ablated["harmful"][judge] / n
            cells = [f"{rates['asr'][judge]:.1%} [{rates['interval95'][judge][0]:.1%}-{rates['interval95'][judge][1]:.1%}]"
                     for rates in (base, ablated)]
            row = f"| {name.split(':')[0]} {first}-{last} | {judge} | {n} | {cells[0]} | {cells[1]} |"  # NAME:A-B: NAME
            assert row in markdown
    assert "data:image/png;base64," in html and "<script" not in html  # self-contained, nothing fetched
    assert not re.search(r'src="(?!data:)', html)
    assert "Content warning" in html


def test_both_groups_are_evaluated_on_prompts_the_searches_did_not_use(run_folder):
    """The searches read MaliciousInstruct 1-4 (Ships 1-2, Sahara 1-4), so the evaluation takes 5-6; JailbreakBench,
    which no search reads, from its start. The refusal search's group is evaluated on the same prompts, with the
    first evaluation's unablated answers."""
    from safety_heads.data import load_prompts

    experiment = json.loads((run_folder / "experiment.json").read_text())
    assert experiment["config"]["eval_datasets"] == "maliciousinstruct:5-6,jailbreakbench"
    searched = set(load_prompts("maliciousinstruct", limit=4))
    first, second = (json.loads((run_folder / name / "eval.json").read_text()) for name in ("eval", "eval-refusal"))
    queries = [s["query"] for s in first["samples"]["maliciousinstruct:5-6"]]
    assert queries == load_prompts("maliciousinstruct")[4:6] and not searched & set(queries)
    assert second["config"]["baseline_answers_from"] == "eval/eval.json"
    for name, samples in first["samples"].items():
        assert [s["baseline"] for s in samples] == [s["baseline"] for s in second["samples"][name]]
    refusal = json.loads((run_folder / "sahara-refusal" / "sahara.json").read_text())
    assert refusal["config"]["objective"] == "refusal-logprob" and second["heads"] == refusal["heads"]
    assert experiment["refusal_heads"] == refusal["heads"] and experiment["asr_refusal"] == second["results"]


def test_the_recommended_group_is_the_largest_held_out_rise_within_the_limits(run_folder):
    """experiment.json's recommended_group, recomputed from the two eval.json files by the rule recommend.py
    documents; the report and the command's output lead with it."""
    experiment = json.loads((run_folder / "experiment.json").read_text())
    recommendation = experiment["recommendation"]
    judge = recommendation["judge"]
    best, best_rise = [], 0.0
    for folder in ("eval", "eval-refusal"):
        evaluation = json.loads((run_folder / folder / "eval.json").read_text())
        rises = [(n["ablated"]["asr"][judge] - n["baseline"]["asr"][judge], n["n"]) for n in evaluation["results"].values()]
        pooled = sum(r * n for r, n in rises) / sum(n for _, n in rises)
        harmless = evaluation["harmless"]
        within = (harmless["ablated"]["refusal_rate"][judge] - harmless["baseline"]["refusal_rate"][judge] <= 0.10
                  and harmless["ablated"]["answer_nll"] - harmless["baseline"]["answer_nll"] <= 1.0)
        if within and pooled > best_rise:
            best, best_rise = [f"{l}:{h}" for l, h in evaluation["heads"]], pooled
    assert experiment["recommended_group"] == best
    assert [c["search"] for c in recommendation["candidates"]] == ["angle (the paper's Sahara)", "refusal-logprob (refusal search)"]
    markdown = (run_folder / "report.md").read_text()
    assert markdown.index("## Recommended heads") < markdown.index("## Summary")
    assert "angle (the paper's Sahara)" in markdown and "refusal-logprob (refusal search)" in markdown


def test_no_held_out_evaluates_the_first_prompts_and_the_paper_search_alone(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "--quick", "--out", str(out), *SMALL, "--no-held-out", "--refusal-objective", "refusal-direction"]) == 0
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["config"]["eval_datasets"] == "maliciousinstruct,jailbreakbench"
    assert experiment["config"]["refusal_objective"] == "refusal-direction"
    assert json.loads((out / "sahara-refusal" / "sahara.json").read_text())["config"]["objective"] == "refusal-direction"


def test_held_out_with_nothing_left_is_one_line(tmp_path, capsys):
    code = main(["run", "--quick", "--out", str(tmp_path / "x"), *SMALL[:2], "--sahara-limit", "100", *SMALL[4:]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no held-out prompts left in maliciousinstruct" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_resume_skips_finished_stages(run_folder, capsys):
    assert main(["run", "--quick", "--out", str(run_folder), "--resume", *SMALL]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 6  # ships, sahara, sahara-refusal, evaluate, evaluate-refusal, per query


def test_occupied_folder_needs_resume(run_folder, capsys):
    assert main(["run", "--quick", "--out", str(run_folder), *SMALL]) == 2
    assert "add --resume" in capsys.readouterr().err


def test_changed_settings_are_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):  # stop after the first stage
        run_with_stop(out, after="[2/6 sahara]")
    capsys.readouterr()
    assert main(["run", "--quick", "--out", str(out), "--resume", *SMALL[:-4], "--max-new-tokens", "7", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume" in err and "max_new_tokens=6 (now 7)" in err


class Interrupt(Exception):
    pass


def run_with_stop(out, after):
    from safety_heads.experiment import ExperimentConfig, run_experiment
    from safety_heads.models import ModelConfig, load_model

    def progress(line):
        if line.startswith(after):
            raise Interrupt

    config = ExperimentConfig(ships_limit=2, sahara_limit=4, eval_limit=2, harmless_limit=2, max_new_tokens=6, steps=2)
    run_experiment(load_model(ModelConfig()), config, out, progress=progress)


def test_excluded_heads_never_reach_the_sahara_group(run_folder, tmp_path):
    chosen = json.loads((run_folder / "sahara" / "sahara.json").read_text())["heads"]
    first = f"{chosen[0][0]}:{chosen[0][1]}"
    out = tmp_path / "out"
    assert main(["run", "--quick", "--out", str(out), *SMALL, "--exclude", first]) == 0
    sahara = json.loads((out / "sahara" / "sahara.json").read_text())
    assert chosen[0] not in sahara["heads"] and len(sahara["heads"]) == 2
    assert sahara["config"]["exclude"] == first
    assert json.loads((out / "experiment.json").read_text())["config"]["exclude"] == first


def test_the_guard_is_on_by_default_and_keeps_the_trap_head_out(run_folder, tmp_path):
    """On the demo model, Sahara's plain search (--guard none) takes head 0:6, whose ablation garbles every answer;
    the default guard passes over it, says so in sahara.json and the report, and records its setting."""
    guarded = json.loads((run_folder / "sahara" / "sahara.json").read_text())
    assert guarded["config"]["guard"] == "harmless-val" and guarded["config"]["guard_max_rise"] == 0.25
    out = tmp_path / "plain"
    assert main(["run", "--quick", "--out", str(out), *SMALL, "--guard", "none"]) == 0
    plain = json.loads((out / "sahara" / "sahara.json").read_text())
    assert plain["config"]["guard"] is None and all("passed_over" not in step for step in plain["steps"])
    assert [0, 6] in plain["heads"] and [0, 6] not in guarded["heads"]
    skipped = [head for step in guarded["steps"] for head in step["passed_over"]]
    assert [0, 6] in skipped
    step = next(s for s in guarded["steps"] if [0, 6] in s["passed_over"])
    assert step["guard_rise"][0][6] > 0.25 >= step["guard_rise"][step["chosen"][0]][step["chosen"][1]]
    assert f"0:6 (+{step['guard_rise'][0][6]:.3g})" in (run_folder / "report.md").read_text()
    assert "No guard: the paper's search" in (out / "report.md").read_text()
    assert json.loads((out / "experiment.json").read_text())["config"]["guard"] is None


def test_run_prunes_sahara_candidates_to_its_own_ships_ranking(tmp_path):
    from safety_heads.cli import main
    from safety_heads.runs.files import read_json

    out = tmp_path / "run"
    assert main(["run", "--model", "demo", "--quick", "--ships-limit", "2", "--sahara-limit", "4", "--eval-limit", "2",
                 "--harmless-limit", "2", "--max-new-tokens", "4", "--steps", "2", "--candidates", "3", "--out", str(out)]) == 0
    mean = read_json(out / "ships" / "ships.json")["aggregate"]["mean"]
    top3 = sorted(((l, h) for l in range(len(mean)) for h in range(len(mean[0]))), key=lambda x: -mean[x[0]][x[1]])[:3]
    sahara = read_json(out / "sahara" / "sahara.json")
    assert all(tuple(h) in top3 for h in sahara["heads"])
    scored = [(l, h) for l, row in enumerate(sahara["steps"][0]["scores"]) for h, v in enumerate(row) if v is not None]
    assert sorted(scored) == sorted(top3)  # only the candidates were tried
    assert sahara["config"]["candidates"] == 3


def test_limit_sets_every_stage_limit_not_given_on_its_own():
    from safety_heads.experiment import ExperimentConfig

    config = ExperimentConfig(mode="full", limit=2, sahara_limit=5).resolved()
    assert (config.ships_limit, config.sahara_limit, config.eval_limit, config.harmless_limit) == (2, 5, 2, 2)
    quick = ExperimentConfig(mode="quick").resolved()  # without --limit: the preset's
    assert (quick.ships_limit, quick.sahara_limit) == (4, 16)


def test_report_opens_with_a_summary_and_shows_the_figures(run_folder):
    """The demo model's run: a summary first (model, template, group, ASR, harmless cost, the demo's note), the
    figures as files and embedded, the configuration collapsed."""
    markdown = (run_folder / "report.md").read_text()
    html = (run_folder / "report.html").read_text()
    sahara = json.loads((run_folder / "sahara" / "sahara.json").read_text())
    evaluation = json.loads((run_folder / "eval" / "eval.json").read_text())
    summary = markdown.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert markdown.index("## Summary") < markdown.index("## Sahara") < markdown.index("## Ships")
    assert "Model demo, template chat." in summary
    assert "Sahara group: " + ", ".join(f"{l}:{h}" for l, h in sahara["heads"]) in summary
    judge = evaluation["headline_judge"]
    name = "maliciousinstruct:5-6"  # the held-out slice after the searches' prompts 1-4
    assert judge == "gcg" and list(evaluation["results"][name]["ablated"]["asr"])[0] != judge  # not the first
    numbers = evaluation["results"][name]
    base, (low, high) = numbers["baseline"]["asr"][judge], numbers["baseline"]["interval95"][judge]
    first, last = numbers["positions"]
    assert (f"ASR ({judge} judge; n prompts, 95% interval), baseline -> ablated: maliciousinstruct {first}-{last} "
            f"(n={numbers['n']}) {base:.1%} [{low:.1%}-{high:.1%}]") in summary
    assert f"ASR ({judge}) is the share of answers that contain none of the {judge} judge's 29 refusal phrases" in summary
    # run evaluates after the searches' prompts by default, and the summary says so (held_out_lines)
    assert first > sahara["config"]["n_queries"] and "- Held out: no ASR prompt is among the queries the searches used" in summary
    assert "never actually helps" in summary  # what the demo model's answers are
    for name in ("asr.png", "ships_map.png", "top_heads_by_layer.png"):
        assert (run_folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("data:image/png;base64,") >= 3 and "white dashed boxes: the Sahara group" in html
    assert "<details><summary>every setting of every stage (JSON)</summary><pre>" in html


def test_summary_flags_a_harmless_cost_only_where_a_broken_model_rises():
    """The warning fires above BROKEN_MODEL_NLL_RISE (1 nat/token: on the demo's ground truth every breaking group rose
    2.29 or more, every intact one 0.42 or less), not at the guard's 0.25, which the default quick start passes."""
    from safety_heads.evaluate import BROKEN_MODEL_NLL_RISE
    from safety_heads.report import summary

    evaluation = {"config": {"model": "m", "template": "chat"},
                  "results": {"mi": {"n": 10, "baseline": {"asr": {"paper": 0.1}}, "ablated": {"asr": {"paper": 0.6}}}},
                  "harmless": {"n": 8, "mean_kl": 0.5, "baseline": {"answer_nll": 0.5}, "ablated": {"answer_nll": 1.9}}}
    sahara = {"config": {"model": "m", "template": "chat", "n_queries": 4, "dataset": "mi", "guard_max_rise": 0.25},
              "heads": [[1, 2]]}
    lines = summary(None, sahara, evaluation)
    assert BROKEN_MODEL_NLL_RISE == 1.0
    assert any(line.startswith("WARNING: the harmless answers' NLL rose by 1.400") for line in lines)
    evaluation["harmless"]["ablated"]["answer_nll"] = 0.91  # +0.41: the quick start's, an intact group's rise
    assert not any(line.startswith("WARNING") for line in summary(None, sahara, evaluation))
    # An eval.json without intervals (written before them): computed from the rate and n, and the paper judge quoted
    assert "mi 1-10 (n=10) 10.0% [1.8%-40.4%] -> 60.0% [31.3%-83.2%]" in " ".join(lines)


def test_summary_says_whether_the_asr_prompts_were_held_out():
    """Held out = none of the ASR prompts among those a search used: another data set, or a disjoint --range."""
    from safety_heads.report import held_out_lines

    def evaluation(positions):
        return {"results": {"mi": {"n": 50, "positions": positions}, "jbb": {"n": 50, "positions": [1, 50]}}}

    sahara = {"config": {"dataset": "mi", "n_queries": 16, "positions": [1, 16]}}
    ships = {"config": {"dataset": "mi", "n_queries": 4}}  # an older file: --limit 4, the first 4
    assert held_out_lines(ships, sahara, evaluation([51, 100])) == [
        "Held out: no ASR prompt is among the queries the searches used (Ships on mi 1-4, Sahara on mi 1-16)."]
    (line,) = held_out_lines(ships, sahara, evaluation([16, 65]))
    assert line.startswith("NOT held out: mi 16-65 overlaps the queries Sahara used (mi 1-16)") and "Ships" not in line
    (line,) = held_out_lines(None, {"config": {"dataset": "mi", "n_queries": 8, "offset": 50}}, evaluation([51, 100]))
    assert line.startswith("NOT held out: mi 51-100 overlaps the queries Sahara used (mi 51-58)")
    assert held_out_lines(None, None, evaluation([1, 50])) == []  # --heads given by hand: no search to compare with
    # run's held-out sets are NAME:A-B slices; an eval.json without positions is read from the name
    sliced = {"results": {"mi:17-32": {"n": 16}}}
    assert held_out_lines(ships, sahara, sliced)[0].startswith("Held out:")
    (line,) = held_out_lines(ships, sahara, {"results": {"mi:10-20": {"n": 11}}})
    assert line.startswith("NOT held out: mi 10-20 overlaps the queries Sahara used (mi 1-16)")


def test_per_stage_heads_and_epsilon_reach_each_stage(tmp_path, capsys):
    """The notebook's QUICK mode in miniature: sampled heads for Ships and Sahara, eps 1e-5 to find heads and 0 to
    evaluate, the last layer's readout; each stage's file records what it used."""
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--quick", "--limit", "4", "--steps", "1", "--max-new-tokens", "4",
                 "--ships-heads", "*/2:*/2", "--sahara-heads", "*/2:*/4", "--ships-epsilon", "1e-5",
                 "--sahara-epsilon", "1e-5", "--eval-epsilon", "0", "--readout", "last-layer", "--judge", "seed",
                 "--out", str(out)]) == 0
    ships = json.loads((out / "ships" / "ships.json").read_text())
    sahara = json.loads((out / "sahara" / "sahara.json").read_text())
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert (ships["config"]["heads"], ships["config"]["epsilon"]) == ("*/2:*/2", 1e-5)
    scored = [(l, h) for l, row in enumerate(ships["queries"][0]["scores"]) for h, v in enumerate(row) if v is not None]
    assert scored == [(l, h) for l in (0, 2) for h in (0, 2, 4, 6)]  # only the sampled heads
    assert (sahara["config"]["heads"], sahara["config"]["epsilon"], sahara["config"]["readout"]) == ("*/2:*/4", 1e-5, "last-layer")
    assert tuple(sahara["heads"][0]) in {(l, h) for l in (0, 2) for h in (0, 4)}
    assert evaluation["config"]["epsilon"] == 0.0 and list(evaluation["config"]["judge_versions"]) == ["seed"]
    assert "warning: --epsilon 0.0 differs from the 1e-05" in capsys.readouterr().err  # said, not silent
