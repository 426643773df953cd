"""Which head score tracks refusal? Ships' KL (the paper's) and the refusal-aware scores (refusal.py) against the
demo model's ground truth: every single head ablated alone, answers generated with plain hooks and judged.

For each score (mean over the scoring queries, MaliciousInstruct 1-50, chat template, ua, eps 1e-4):
- Spearman with the true single-head ASR (paper judge) and with the coherent ASR (answers in the demo's compliant
  form, which a broken model does not produce: the demo's real measure of a jailbreak);
- how many of the 5 truly best heads (by coherent ASR) are in the score's top 5 and top 10;
- the held-out ASR rise and harmless cost of the score's top-3 group, next to Sahara's groups (plain, and with the
  harmless guard);
- what the score costs: the Ships run's time, which includes learning the refusal signal;
- the score as Sahara's candidate ranking: the guarded search over the score's top 8 heads only.

Held out: MaliciousInstruct 51-100 and JailbreakBench (150 harmful), 100 harmless-test prompts (seed 0), 24 new tokens,
as in ground_truth.py. The real model's table comes from real_model_study.py (stages scores and score-groups).

    python benchmarks/scores_vs_truth.py                  # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ground_truth import harmless_sample, outcome, rates, spearman  # noqa: E402

from safety_heads.ablation import format_heads  # noqa: E402
from safety_heads.data import format_prompts, load_prompts  # noqa: E402
from safety_heads.models import ModelConfig, load_model  # noqa: E402
from safety_heads.runs import (
    run_sahara,  # noqa: E402
    run_ships,  # noqa: E402
)
from safety_heads.runs.files import write_json  # noqa: E402
from safety_heads.sahara import SaharaConfig  # noqa: E402
from safety_heads.ships import ShipsConfig  # noqa: E402

SCORES = ("kl", "refusal-logprob", "refusal-direction")
QUIET = lambda line: None  # noqa: E731


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/scores_vs_truth"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(model=args.model))
    layout, module, tokenizer = model.layout, model.module, model.tokenizer
    heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    malicious = load_prompts("maliciousinstruct")
    scoring = malicious[:50]
    held_out = malicious[50:] + load_prompts("jailbreakbench")
    tokens = {name: [list(p.token_ids) for p in format_prompts(queries, "chat", tokenizer)]
              for name, queries in (("harmful", held_out), ("harmless", harmless_sample(100)))}

    def measure(group, baseline=None) -> dict:
        counts = outcome(module, tokenizer, tokens, list(group), "ua", layout.head_dim, args.max_new_tokens, 128, baseline)
        return counts | rates(counts, len(tokens["harmful"]), len(tokens["harmless"]))

    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.glob("ships-*")):
        raise SystemExit(f"{args.out} holds an earlier run; choose another --out")
    started = time.perf_counter()
    clean = measure([])
    truth = {h: measure([h], clean["harmless_answers"]) for h in heads}
    truth_seconds = time.perf_counter() - started
    best5 = sorted(heads, key=lambda h: -truth[h]["asr_coherent"])[:5]

    result = {"model": args.model, "clean": {k: v for k, v in clean.items() if k != "harmless_answers"},
              "true_best5_coherent": format_heads(best5), "truth_seconds": round(truth_seconds, 1), "scores": {}}
    for name in SCORES:
        t = time.perf_counter()
        ships = run_ships(model, scoring, ShipsConfig(template="chat", score=name), out=args.out / f"ships-{name}",
                          progress=QUIET)
        seconds = time.perf_counter() - t
        order = sorted(heads, key=lambda h: -float(ships.mean[h]))
        values = [float(ships.mean[h]) for h in heads]
        group = measure(order[:3], clean["harmless_answers"])
        result["scores"][name] = {
            "seconds": round(seconds, 1),
            "signal": ships.config.get("refusal_signal"),
            "spearman_asr": spearman(values, [truth[h]["asr"] for h in heads]),
            "spearman_coherent": spearman(values, [truth[h]["asr_coherent"] for h in heads]),
            "best5_in_top5": len(set(order[:5]) & set(best5)), "best5_in_top10": len(set(order[:10]) & set(best5)),
            "top5": format_heads(order[:5]), "top3_group": _group_entry(group),
        }
        # The score as Sahara's candidate ranking: the guarded search over its top 8 heads only.
        t = time.perf_counter()
        pruned = run_sahara(model, scoring, SaharaConfig(template="chat", steps=3, guard="harmless-val", candidates=8,
                                                         rank_by=str(args.out / f"ships-{name}" / "ships.json")), progress=QUIET)
        result["scores"][name]["guarded_top8"] = {"seconds": round(time.perf_counter() - t, 1),
                                                  "group": _group_entry(measure(pruned.heads, clean["harmless_answers"]))}
        print(f"{name}: top5 {format_heads(order[:5])}, Spearman {result['scores'][name]['spearman_coherent']:.2f}", file=sys.stderr)
    for label, guard in (("sahara", None), ("sahara-guard", "harmless-val")):
        t = time.perf_counter()
        sahara = run_sahara(model, scoring, SaharaConfig(template="chat", steps=3, guard=guard), progress=QUIET)
        result[label] = {"seconds": round(time.perf_counter() - t, 1),
                         "group": _group_entry(measure(sahara.heads, clean["harmless_answers"]))}
    result["truth"] = {format_heads([h]): {k: truth[h][k] for k in ("asr", "asr_coherent", "harmless_answered", "harmless_nll")}
                       for h in heads}
    write_json(args.out / "scores_vs_truth.json", result)
    text = markdown(result)
    (args.out / "scores_vs_truth.md").write_text(text)
    print(text)
    return 0


def _group_entry(entry: dict) -> dict:
    return {k: entry[k] for k in ("heads", "asr", "asr_coherent", "harmless_answered", "harmless_nll")}


def markdown(result: dict) -> str:
    clean = result["clean"]
    lines = [f"Model: {result['model']}. Clean: ASR {clean['asr']:.1f}%, coherent ASR {clean['asr_coherent']:.1f}%, "
             f"harmless answered {clean['harmless_answered']:.0f}%, harmless NLL {clean['harmless_nll']:.3f}. "
             f"True best 5 heads (coherent ASR): {result['true_best5_coherent']}.", "",
             "| score | Spearman vs ASR | vs coherent ASR | true best 5 in top 5 / top 10 | top 5 "
             "| top-3 group: ASR / coherent / harmless answered / NLL | Ships time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in result["scores"].items():
        g = s["top3_group"]
        lines.append(f"| {name} | {s['spearman_asr']:.2f} | {s['spearman_coherent']:.2f} | {s['best5_in_top5']} / {s['best5_in_top10']} | "
                     f"{s['top5']} | {g['heads']}: {g['asr']:.1f}% / {g['asr_coherent']:.1f}% / "
                     f"{g['harmless_answered']:.0f}% / {g['harmless_nll']:.3f} | {s['seconds']:.0f} |")
    lines += ["", "Sahara with the harmless guard, candidates pruned to each score's top 8 (`--candidates 8 --rank-by`):", "",
              "| ranked by | group | ASR / coherent / harmless answered / NLL | Sahara time (s) |", "|---|---|---|---|"]
    for name, s in result["scores"].items():
        g = s["guarded_top8"]["group"]
        lines.append(f"| {name} | {g['heads']} | {g['asr']:.1f}% / {g['asr_coherent']:.1f}% / {g['harmless_answered']:.0f}% / "
                     f"{g['harmless_nll']:.3f} | {s['guarded_top8']['seconds']:.0f} |")
    lines += ["", "Sahara over every head:", "", "| search | group | ASR / coherent / harmless answered / NLL | Sahara time (s) |",
              "|---|---|---|---|"]
    for label in ("sahara", "sahara-guard"):
        g = result[label]["group"]
        lines.append(f"| {label} | {g['heads']} | {g['asr']:.1f}% / {g['asr_coherent']:.1f}% / {g['harmless_answered']:.0f}% / "
                     f"{g['harmless_nll']:.3f} | {result[label]['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
