"""Pictures and pages for people: layers x heads heat maps, and the self-contained experiment report.

    safety-heads ships --model tiny --prompt "How do I pick a lock?" --out runs/ships   # writes ships_heatmap.png
    safety-heads run --out runs/demo                                                     # writes report.html, report.md
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from .runs.figures import asr_bars_png, ships_map_png, top_heads_by_layer_png
from .runs.files import atomic_write, matrix_or_nan

# ----------------------------------------------------------------------------------------------------------------
# The experiment report: one self-contained HTML file (images embedded, opens offline) and a Markdown summary, built
# only from the JSON records of a run, so what the report says is what the files say.


REPORT_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}.up{color:#b00020;font-weight:600}
.warn{background:#fff4e5;border:1px solid #f0a020;padding:.6em 1em;margin:1em 0}
img{max-width:100%;border:1px solid #eee}pre{white-space:pre-wrap;background:#f8f8f8;padding:.5em;font-size:.85em}
.answer{max-width:420px;font-size:.9em;white-space:pre-wrap}details{margin:.6em 0}
"""


def _figures(folder: Path, ships: dict | None, sahara: dict | None, evaluation: dict | None, model: str) -> list[str]:
    """Write the run's figures (figures.py) beside the report and return them as embedded images with captions."""
    from .refusal import SCORE_LABELS

    parts = []
    if evaluation:
        asr_bars_png(evaluation["results"], folder / "asr.png", model, "the Sahara group" if sahara else "the heads")
        parts.append("<h2>Figures</h2>" + _image_tag(folder / "asr.png", "ASR before and after ablation")
                     + "<p>Attack success rate per data set and judge: blue before, red with the heads ablated.</p>")
    if ships:
        mean = matrix_or_nan(ships["aggregate"]["mean"])
        label = SCORE_LABELS[ships["config"].get("score", "kl")]
        top = [(l, h) for l, h, _ in ships["aggregate"]["top_mean"][:3]]
        group = [tuple(h) for h in sahara["heads"]] if sahara else []
        ships_map_png(mean, folder / "ships_map.png", model, label, top, group)
        top_heads_by_layer_png(mean, folder / "top_heads_by_layer.png", model, f"mean {label}")
        parts.append(_image_tag(folder / "ships_map.png", "Ships map with the Sahara group")
                     + "<p>Mean Ships score per head on a log colour scale (grey: not scored). Red boxes: the three "
                       "heads with the highest mean score; white dashed boxes: the Sahara group.</p>"
                     + _image_tag(folder / "top_heads_by_layer.png", "Top heads by layer")
                     + "<p>How many of the 20 heads with the highest mean Ships score sit in each layer.</p>")
    return parts


def _image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _nats(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _nll_row(harmless: dict) -> str:
    """The answers' likelihood under the unablated model: it jumps when an ablation garbles answers (evaluate.py)."""
    if "answer_nll" not in harmless["baseline"]:
        return ""  # an eval.json written before this measure existed
    return (f"<tr><td>answer NLL under the clean model (nats/token; a jump means garbled answers)</td>"
            f"<td class=num>{_nats(harmless['baseline']['answer_nll'])}</td>"
            f"<td class=num>{_nats(harmless['ablated']['answer_nll'])}</td></tr>")


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _passed_over(step: dict) -> str:
    """"0:6 (+0.867)": the heads the guard skipped at a Sahara step, with the rise of the answers' NLL (nats/token)."""
    return ", ".join(f"{layer}:{head} (+{step['guard_rise'][layer][head]:.3g})" for layer, head in step.get("passed_over", []))


DEMO_NOTE = ("The demo model is a small model trained for this project: it refuses with one fixed sentence, and its "
             "compliant answer only repeats the request (Sure, here is my answer to \"...\"); it never actually helps "
             "(src/safety_heads/demo/README.md). Its answers below look broken by design.")


def summary(ships: dict | None, sahara: dict | None, evaluation: dict | None) -> list[str]:
    """The report's first lines, in plain words: model, template, what was found, ASR before and after (the headline
    judge, with n and its 95% interval), what that ASR counts, whether its prompts were held out from the searches,
    the harmless cost, and a warning when the harmless answers' NLL rose as only a broken model's does."""
    from .judges import asr_meaning

    records = [r for r in (ships, sahara, evaluation) if r]
    model, template = records[0]["config"]["model"], records[0]["config"].get("template", "?")
    lines = [f"Model {model}, template {template}."]
    if sahara:
        lines.append(f"Sahara group: {', '.join(f'{l}:{h}' for l, h in sahara['heads'])} "
                     f"({sahara['config']['n_queries']} queries of {_slice_text(sahara['config'])}).")
    if ships:
        lines.append("Ships top heads (mean over the queries): "
                     + ", ".join(f"{l}:{h}" for l, h, _ in ships["aggregate"]["top_mean"][:3]) + ".")
    if evaluation:
        judge = asr_judge(evaluation)
        lines.append(f"ASR ({judge} judge; n prompts, 95% interval), baseline -> ablated: " + "; ".join(
            f"{_eval_slice(name, n)} (n={n['n']}) {_rate(n['baseline'], judge, n['n'])} -> {_rate(n['ablated'], judge, n['n'])}"
            for name, n in evaluation["results"].items()) + ".")
        lines.append(asr_meaning(judge))
        lines += held_out_lines(ships, sahara, evaluation)
        lines += _harmless_lines(evaluation.get("harmless") or {})
    if str(model) == "demo":
        lines.append(DEMO_NOTE)
    return lines


def asr_judge(evaluation: dict) -> str:
    """The judge the summary quotes: the one eval.json names, else (an older file) the recommended one if it ran."""
    from .judges import headline_judge

    names = list(next(iter(evaluation["results"].values()))["ablated"]["asr"])
    named = evaluation.get("headline_judge")
    return named if named in names else headline_judge(names)


def _rate(rates: dict, judge: str, n: int) -> str:
    """'18.8% [6.6-43.0%]': a rate with its 95% Wilson interval (computed from the rate and n in an older file)."""
    interval = rates.get("interval95", {}).get(judge)
    return _with_interval(rates["asr"][judge], n, interval)


def _with_interval(rate: float, n: int, interval=None) -> str:
    from .intervals import wilson_interval

    low, high = interval or wilson_interval(round(rate * n), n)
    return f"{_pct(rate)} [{low:.1%}-{high:.1%}]"


def _slice_text(config: dict) -> str:
    """'maliciousinstruct 1-16': a search's data set and the 1-based positions of its queries."""
    from .slices import split_slice

    first, last = search_positions(config)
    return f"{split_slice(config.get('dataset'))[0]} {first}-{last}"


def _eval_slice(name: str, numbers: dict) -> str:
    """'maliciousinstruct 17-32': an evaluated data set (a NAME:A-B slice too) and its prompts' positions."""
    from .slices import split_slice

    where = eval_positions(name, numbers)
    return f"{split_slice(name)[0]} {where[0]}-{where[1]}" if where else name


def eval_positions(name: str, numbers: dict) -> list[int] | None:
    """[first, last] of an evaluated data set's prompts: recorded, or (an older eval.json) read from a NAME:A-B slice."""
    from .slices import split_slice

    if "positions" in numbers:
        return numbers["positions"]
    first = split_slice(name)[1]
    return [first, first + numbers["n"] - 1] if "n" in numbers else None


def search_positions(config: dict) -> list[int]:
    """[first, last] of a Ships or Sahara run's queries in their data set: recorded, or derived (--limit, a NAME:A-B
    slice, an offset)."""
    from .slices import split_slice

    if config.get("positions"):
        return list(config["positions"])
    first = split_slice(str(config.get("dataset")))[1] + (config.get("offset") or 0)
    return [first, first + config["n_queries"] - 1]


def held_out_lines(ships: dict | None, sahara: dict | None, evaluation: dict) -> list[str]:
    """Whether the ASR's prompts are held out: none of them among the queries a search (Ships, Sahara) chose heads
    on. Judged by data set name and 1-based positions, the one definition the docs use (docs/datasets.md)."""
    searches = [(label, r["config"]) for label, r in (("Ships", ships), ("Sahara", sahara))
                if r and r["config"].get("dataset")]
    if not searches:
        return []
    from .slices import split_slice

    reused = []
    for name, numbers in evaluation["results"].items():
        where = eval_positions(name, numbers)
        for label, config in searches:
            first, last = search_positions(config)
            same_set = split_slice(config["dataset"])[0] == split_slice(name)[0]
            if same_set and (where is None or (where[0] <= last and first <= where[1])):
                reused.append(f"{_eval_slice(name, numbers)} overlaps the queries {label} used ({_slice_text(config)})")
    used = ", ".join(f"{label} on {_slice_text(config)}" for label, config in searches)
    if reused:
        return [f"NOT held out: {'; '.join(reused)}, so that ASR partly measures the prompts the heads were chosen on."]
    return [f"Held out: no ASR prompt is among the queries the searches used ({used})."]


def _harmless_lines(harmless: dict) -> list[str]:
    from .evaluate import BROKEN_MODEL_NLL_RISE

    if "mean_kl" not in harmless:
        return []
    before, after = harmless["baseline"].get("answer_nll"), harmless["ablated"].get("answer_nll")
    cost = f"Harmless cost ({harmless['n']} prompts): mean next-token KL {harmless['mean_kl']:.3g}"
    if before is not None and after is not None:
        cost += f", answer NLL {before:.3f} -> {after:.3f} nats/token"
    lines = [cost + "."]
    if before is not None and after is not None and after - before > BROKEN_MODEL_NLL_RISE:
        lines.append(f"WARNING: the harmless answers' NLL rose by {after - before:.3f} nats/token, more than "
                     f"{BROKEN_MODEL_NLL_RISE:g}: on the demo model's ground truth only groups that break the model rose "
                     "that much (docs/evaluate.md), so part of the ASR change may be garbled text, not compliance.")
    return lines


@dataclass
class RunRecords:
    """The JSON records a report is written from; None where a stage did not run."""

    ships: dict | None = None
    sahara: dict | None = None
    evaluation: dict | None = None
    per_query: dict | None = None
    refusal: dict | None = None  # the refusal search's records: "sahara", "evaluation"
    recommendation: dict | None = None  # recommend.Recommendation.record(): the report then leads with it


def build_report(folder: str | Path, records: RunRecords, title: str = "safety-heads report",
                 timings: dict | None = None) -> dict:
    """Write report.html and report.md into `folder` from the run's JSON records; returns what it reported. Each
    section below adds its HTML parts and its Markdown lines."""
    folder, r = Path(folder), records
    ships, sahara, evaluation, per_query, refusal, recommendation = (r.ships, r.sahara, r.evaluation, r.per_query,
                                                                     r.refusal, r.recommendation)
    facts = {"heads": sahara["heads"] if sahara else None, "asr": {}, "harmless": None}
    parts, markdown = [f"<h1>{html.escape(title)}</h1>"], [f"# {title}", ""]
    model = next((r["config"]["model"] for r in (ships, sahara, evaluation) if r), "?")
    if recommendation:
        lead = recommendation_lines(recommendation)
        facts["recommendation"] = lead
        parts.append("<h2>Recommended heads</h2><ul>" + "".join(
            f"<li{' class=warn' if line.startswith('NOTE') else ''}>{html.escape(line)}</li>" for line in lead) + "</ul>")
        markdown += ["## Recommended heads", ""] + [f"- {line}" for line in lead] + [""]
    lines = summary(ships, sahara, evaluation)
    facts["summary"] = lines
    parts.append("<h2>Summary</h2><ul>" + "".join(
        f"<li{' class=warn' if line.startswith('WARNING') else ''}>{html.escape(line)}</li>" for line in lines) + "</ul>")
    parts.append("<p>Every number below is read from the JSON files in this folder.</p>")
    markdown += (["## Summary", ""] + [f"- {line}" for line in lines]
                 + ["", "Every number below is read from the JSON files in this folder.", ""])
    parts += _figures(folder, ships, sahara, evaluation, str(model))
    if sahara:
        _sahara_section(folder, sahara, parts, markdown)
    if refusal:
        _sahara_section(folder, refusal["sahara"], parts, markdown, "sahara-refusal")
    if ships:
        _ships_section(ships, parts, markdown)
    groups = [("the Sahara group", evaluation)]
    if refusal:
        groups.append(("the refusal search's group", refusal["evaluation"]))
    for label, record in groups + [("each query's own top Ships heads", per_query)]:
        if record:
            facts["asr"][label] = {name: numbers for name, numbers in record["results"].items()}
            _asr_section(label, record, parts, markdown)
            harmless = record.get("harmless")
            if harmless and "mean_kl" in harmless:
                facts["harmless"] = harmless
                _harmless_section(harmless, parts, markdown)
            markdown.append("")
            _examples_section(record, parts)
    stages = (("ships", ships), ("sahara", sahara), ("evaluate", evaluation), ("evaluate per query", per_query))
    configuration = {name: record["config"] for name, record in stages if record}
    parts.append("<h2>Configuration and versions</h2><details><summary>every setting of every stage (JSON)</summary><pre>"
                 + html.escape(json.dumps(configuration, indent=1, default=str)) + "</pre></details>")
    if timings:
        parts.append("<p>Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".</p>")
        markdown += ["Stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + ".", ""]
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{REPORT_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    atomic_write(folder / "report.html", lambda stream: stream.write(page.encode()))
    text = "\n".join(markdown) + "\n"
    atomic_write(folder / "report.md", lambda stream: stream.write(text.encode()))
    return facts


def _sahara_section(folder: Path, sahara: dict, parts: list[str], markdown: list[str], subfolder: str = "sahara") -> None:
    from .objectives import LABELS

    heads = ", ".join(f"{l}:{h}" for l, h in sahara["heads"])
    objective = sahara["config"].get("objective", "angle")  # files written before objectives existed: the angle
    what = ("the paper's search, by the principal angle" if objective == "angle"
            else f"the same greedy search by the {objective} objective")
    parts.append(f"<h2>Sahara: the data set's safety-head group ({html.escape(what)})</h2><p>Group (in the order "
                 f"chosen): <b>{heads}</b>, from {sahara['config']['n_queries']} queries of "
                 f"{html.escape(str(sahara['config'].get('dataset')))}, {sahara['config']['ablation']} ablation, "
                 f"eps={sahara['config']['epsilon']:g}; each step maximises the {html.escape(LABELS[objective])}.</p>")
    guard = sahara["config"].get("guard")
    skipped = {s["step"]: _passed_over(s) for s in sahara["steps"]}
    guard_note = (f"Guarded by the clean model's answers to {guard}: a head is skipped when its group raises their "
                  f"NLL by more than {sahara['config']['guard_max_rise']:g} nats/token." if guard else
                  "No guard: the paper's search, which may pick a head whose ablation garbles every answer.")
    parts.append(f"<p>{html.escape(guard_note)}</p>")
    guard_header = "<th>skipped by the guard (NLL rise)</th>" if guard else ""
    rows = "".join(f"<tr><td>{s['step']}</td><td>{s['chosen'][0]}:{s['chosen'][1]}</td><td class=num>{s['score']:.4g}</td>"
                   + (f"<td>{skipped[s['step']] or '-'}</td>" if guard else "") + "</tr>" for s in sahara["steps"])
    parts.append(f"<table><tr><th>step</th><th>head added</th><th>{html.escape(LABELS[objective])} of the group</th>"
                 f"{guard_header}</tr>{rows}</table>")
    markdown += [f"## Sahara ({what})", "", f"Group: **{heads}** ({sahara['config']['n_queries']} queries, {sahara['config']['ablation']}, "
                 f"eps={sahara['config']['epsilon']:g}). {guard_note}", "",
                 f"| step | head added | {LABELS[objective]} |" + (" skipped by the guard (NLL rise) |" if guard else ""),
                 "|---|---|---|" + ("---|" if guard else "")]
    markdown += [f"| {s['step']} | {s['chosen'][0]}:{s['chosen'][1]} | {s['score']:.4g} |"
                 + (f" {skipped[s['step']] or '-'} |" if guard else "") for s in sahara["steps"]] + [""]
    for step in sahara["steps"]:
        image = folder / subfolder / f"sahara_step{step['step']}.png"
        if image.exists():
            tag = _image_tag(image, f"Sahara step {step['step']}")
            parts.append(f"<details><summary>Step {step['step']} scores</summary>{tag}</details>")


def recommendation_lines(recommendation: dict) -> list[str]:
    """The report's lead: the recommended group and why, each searched group's held-out numbers, and a plain note when
    the paper's group lowers ASR."""
    judge = recommendation["judge"]
    lines = []
    if recommendation["group"]:
        lines.append(f"Recommended: {', '.join(recommendation['group'])} (from the {recommendation['chosen']} search): "
                     f"{recommendation['reason']}.")
    else:
        lines.append(f"No group is recommended: {recommendation['reason']}.")
    for c in recommendation["candidates"]:
        asr = "; ".join(f"{_eval_slice(name, {'n': c['n'][name]})} (n={c['n'][name]}) {_with_interval(before, c['n'][name])} -> "
                        f"{_with_interval(after, c['n'][name])}" for name, (before, after) in c["asr"].items())
        cost = ("harmless cost not measured" if c["harmless_refusal_rise"] is None else
                f"harmless refusals {c['harmless_refusal_rise']:+.1%}, answer NLL "
                + ("n/a" if c["answer_nll_rise"] is None else f"{c['answer_nll_rise']:+.3f} nats/token"))
        verdict = "within the limits" if c["eligible"] else f"not recommended: {c['why_not']}"
        lines.append(f"{c['search']}: {', '.join(c['heads']) or '(no heads)'}. Held-out ASR ({judge}): {asr}; {cost}; {verdict}.")
        if c["search"].startswith("angle") and c["pooled_rise"] < 0:
            lines.append(f"NOTE: the paper's group makes this model safer on held-out prompts (ASR {c['pooled_rise']:+.1%} "
                         "pooled): it is not a set of heads the refusal relies on.")
    lines.append(f"Limits: harmless refusal rate may rise by {recommendation['max_refusal_rise']:.0%} at most, the harmless "
                 f"answers' NLL by {recommendation['max_nll_rise']:g} nats/token at most.")
    return lines


def _ships_section(ships: dict, parts: list[str], markdown: list[str]) -> None:
    from .refusal import SCORE_LABELS

    top = ships["aggregate"]["top_mean"][:10]
    score = ships["config"].get("score", "kl")  # files written before --score existed are KL
    label = SCORE_LABELS[score]
    parts.append(f"<h2>Ships: per-query head importance</h2><p>Score <b>{score}</b>: mean {html.escape(label)} over "
                 f"{len(ships['queries'])} queries ({ships['config']['ablation']}, eps={ships['config']['epsilon']:g}, "
                 f"{ships['config']['method']}); the map is under Figures.</p>")
    rows = "".join(f"<tr><td>{l}:{h}</td><td class=num>{s:.4g}</td></tr>" for l, h, s in top)
    parts.append(f"<table><tr><th>head</th><th>mean {html.escape(label)}</th></tr>{rows}</table>")
    markdown += ["## Ships", "", f"Score: {score}.", "", f"| head | mean {label} |", "|---|---|"]
    markdown += [f"| {l}:{h} | {s:.4g} |" for l, h, s in top] + [""]


def _asr_section(label: str, record: dict, parts: list[str], markdown: list[str]) -> None:
    headline = asr_judge(record)
    parts.append(f"<h2>Attack success rate: baseline vs ablating {html.escape(label)}</h2>"
                 f"<p>Each rate with its 95% Wilson interval over the n prompts; the summary quotes {html.escape(headline)}.</p>")
    markdown += [f"## ASR: baseline vs ablating {label}", "", "Each rate with its 95% Wilson interval over the n prompts.", "",
                 "| data set | judge | n | baseline | ablated | change |", "|---|---|---|---|---|---|"]
    rows = ""
    for name, numbers in record["results"].items():
        where, n = _eval_slice(name, numbers), numbers["n"]
        for judge in numbers["ablated"]["asr"]:
            base, ablated = _rate(numbers["baseline"], judge, n), _rate(numbers["ablated"], judge, n)
            delta = numbers["delta_asr"][judge]
            invalid = numbers["baseline"]["invalid"][judge] + numbers["ablated"]["invalid"][judge]
            note = f" ({invalid} invalid)" if invalid else ""
            rows += (f"<tr><td>{html.escape(where)}</td><td>{html.escape(judge)}</td><td class=num>{n}</td><td class=num>{base}</td>"
                     f"<td class=num>{ablated}</td><td class='num{' up' if delta > 0 else ''}'>{delta:+.1%}{note}</td></tr>")
            markdown.append(f"| {where} | {judge} | {n} | {base} | {ablated} | {delta:+.1%}{note} |")
    parts.append(f"<table><tr><th>data set</th><th>judge</th><th>n</th><th>baseline ASR [95%]</th><th>ablated ASR [95%]</th>"
                 f"<th>change</th></tr>{rows}</table>")


def _harmless_section(harmless: dict, parts: list[str], markdown: list[str]) -> None:
    cells = "".join(f"<tr><td>refusal rate ({html.escape(j)})</td><td class=num>{_pct(harmless['baseline']['refusal_rate'][j])}</td>"
                    f"<td class=num>{_pct(harmless['ablated']['refusal_rate'][j])}</td></tr>" for j in harmless["judges"])
    parts.append(f"<h3>What it costs on {harmless['n']} harmless prompts ({html.escape(harmless['dataset'])})</h3>"
                 f"<table><tr><th>measure</th><th>baseline</th><th>ablated</th></tr>{cells}"
                 f"<tr><td>mean next-token KL(clean || ablated)</td><td class=num>0</td><td class=num>{harmless['mean_kl']:.4g}</td></tr>"
                 f"{_nll_row(harmless)}</table>")
    markdown += ["", f"Harmless cost ({harmless['n']} prompts of {harmless['dataset']}): mean next-token KL {harmless['mean_kl']:.4g}; "
                 + "; ".join(f"refusal ({j}) {_pct(harmless['baseline']['refusal_rate'][j])} -> "
                             f"{_pct(harmless['ablated']['refusal_rate'][j])}" for j in harmless["judges"])
                 + (f"; answer NLL under the clean model {_nats(harmless['baseline'].get('answer_nll'))} -> "
                    f"{_nats(harmless['ablated'].get('answer_nll'))} nats/token" if "answer_nll" in harmless["baseline"] else "")]


def _examples_section(record: dict, parts: list[str]) -> None:
    examples = [s for samples in record["samples"].values() for s in samples][:4]
    if not examples:
        return
    parts.append('<div class=warn><b>Content warning.</b> The answers below were generated in reply to harmful '
                 'requests and may be harmful.</div>')
    judge = asr_judge(record)
    rows = "".join(
        f"<tr><td class=answer>{html.escape(s['query'])}</td><td class=answer>{html.escape(s['baseline']['response'])}</td>"
        f"<td class=answer>{html.escape(s['ablated']['response'])}</td></tr>" for s in examples)
    parts.append(f"<details><summary>Example answers before and after (judge {html.escape(judge)})</summary><table>"
                 f"<tr><th>query</th><th>baseline</th><th>ablated</th></tr>{rows}</table></details>")
