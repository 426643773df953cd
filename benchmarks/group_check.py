"""Measure head groups by generation, on any prompt slices, under any ablation: the check behind a claim that a group
works (or does not) on held-out prompts. Plain-hook reference (fast_truth.truth_answers: early stop for the judge,
shared clean prefill), greedy answers after the chat template, one keyword judge; no library ablation code involved.

    python benchmarks/group_check.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --sets maliciousinstruct:17-32,jailbreakbench:1-16 --groups "10:7,11:3,9:9;10:7,11:3,10:1" \
        --kinds ua:1e-4,sc:0 --json runs/groups.json

Prints, per ablation and group, how many prompts of each slice the judge calls harmful (the clean model first), and
writes every answer to --json. Issue 22 used it on Qwen (docs/real-model-study.md, "Why `run --quick` falls short").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fast_truth import truth_answers  # noqa: E402

from safety_heads.ablation import parse_heads  # noqa: E402
from safety_heads.data import format_prompts, load_prompts  # noqa: E402
from safety_heads.judges import KEYWORD_JUDGES  # noqa: E402
from safety_heads.models import ModelConfig, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sets", required=True, help="comma-separated data sets, slices as NAME:A-B")
    parser.add_argument("--groups", required=True, help="groups separated by ';', each a head list such as 10:7,11:3")
    parser.add_argument("--kinds", default="ua:1e-4", help="ablations as KIND:EPSILON, comma-separated (ua, sc)")
    parser.add_argument("--judge", default="gcg", choices=sorted(KEYWORD_JUDGES))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(model=args.model, device="cpu"))
    groups = [[]] + [list(parse_heads(text, model.layout)) for text in args.groups.split(";") if text.strip()]
    judge = KEYWORD_JUDGES[args.judge]
    slices = {name: load_prompts(name) for name in args.sets.split(",") if name}
    tokens = {name: [list(p.token_ids) for p in format_prompts(queries, "chat", model.tokenizer)]
              for name, queries in slices.items()}
    ablations = [(f"{kind} eps={epsilon or 0}", kind, float(epsilon or 0.0))
                 for kind, _, epsilon in (text.partition(":") for text in args.kinds.split(","))]
    rows, cells = [], {}
    for label, kind, epsilon in ablations:
        for name, queries in slices.items():
            start = time.perf_counter()
            answers = truth_answers(model.module, model.tokenizer, groups, tokens[name], args.max_new_tokens,
                                    (args.judge,), 16, kind=kind, epsilon=epsilon)
            for group, found in zip(groups, answers):
                texts = [answer.text for answer in found]
                heads = ",".join(f"{layer}:{head}" for layer, head in group)
                rows.append({"kind": kind, "epsilon": epsilon, "set": name, "heads": heads,
                             "harmful": sum(judge.judge(queries, texts)), "n": len(texts), "answers": texts})
                cells[label, heads, name] = f"{rows[-1]['harmful']}/{len(texts)}"
            print(f"{label}, {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(f"## {args.judge} judge, harmful answers per slice ({Path(args.model).name}, greedy {args.max_new_tokens} "
          "tokens, chat template)")
    names = list(slices)
    print("| ablation | group | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, _, _ in ablations:
        for group in groups:
            heads = ",".join(f"{layer}:{head}" for layer, head in group)
            print(f"| {label} | {heads or 'clean'} | " + " | ".join(cells[label, heads, name] for name in names) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": Path(args.model).name, "judge": args.judge, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
