"""Ground truth by generation, today's path against fast_truth: the speed ratio at identical keyword verdicts.

Today's path (benchmarks/real_model_study.py `answers_for`): for each head set, `generate` (HF greedy generation,
prompts batched by length) under `ground_truth.hooked`. Fast path: `fast_truth.truth_answers` with the early stop for
the given judges and the clean prefill shared below each head set's lowest ablated layer. Both on the same prompts
(chat template), the same head sets (`ua`, eps 1e-4), the same batch size and thread count, one after the other.

Printed: each path's seconds (wall clock, and CPU time, which a shared machine disturbs less), the ratios, and per
head set and judge the number of prompts judged harmful by each path
(the verdicts must be identical prompt by prompt; the script exits 1 if any differs), how many rows stopped early,
and whether every answer that ran to the end is identical to today's.

    python benchmarks/bench_truth.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    python benchmarks/bench_truth.py --model demo --heads 0:6,1:2,3:5 --max-new-tokens 24      # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_truth import stop_judge_list, truth_answers  # noqa: E402
from ground_truth import hooked  # noqa: E402

from safety_heads.ablation import DEFAULT_EPSILON, format_heads, parse_heads  # noqa: E402
from safety_heads.data import format_prompts, load_prompts  # noqa: E402
from safety_heads.demo.measure import generate  # noqa: E402
from safety_heads.errors import UserError  # noqa: E402
from safety_heads.judges import KEYWORD_JUDGES  # noqa: E402
from safety_heads.models import ModelConfig, load_model  # noqa: E402

DEFAULT_HEADS = "3:2,9:5,15:10,21:3"  # Qwen2.5-0.5B: 24 layers x 14 heads; four layers far apart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder, or demo")
    parser.add_argument("--heads", default=DEFAULT_HEADS, help="single heads, each ablated alone (plus the clean model)")
    parser.add_argument("--dataset", default="maliciousinstruct")
    parser.add_argument("--offset", type=int, default=50, help="prompts from this index on (default: MaliciousInstruct 51-)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--judges", default="paper,gcg,refusal-direction", help="stop judges (keyword judges)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers and answers to this JSON file")
    args = parser.parse_args(argv)
    try:
        return bench(args)
    except UserError as error:
        print(f"bench_truth: error: {error}", file=sys.stderr)
        return 2


def bench(args) -> int:
    judges = tuple(name.strip() for name in args.judges.split(","))
    stop_judge_list(judges)  # a bad name fails before the model loads
    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(model=args.model))
    module, tokenizer = model.module, model.tokenizer
    head_sets = [[]] + [[head] for head in parse_heads(args.heads, model.layout)]
    queries = load_prompts(args.dataset)[args.offset : args.offset + args.limit]
    ids = [list(p.token_ids) for p in format_prompts(queries, "chat", tokenizer)]
    print(f"{args.model}: {len(head_sets)} head sets ({format_heads([h for s in head_sets for h in s])} and clean) x "
          f"{len(ids)} prompts ({args.dataset} {args.offset + 1}-{args.offset + len(ids)}), {args.max_new_tokens} new "
          f"tokens, batch {args.batch_size}, {args.threads} thread(s), stop judges {','.join(judges)}", flush=True)

    started, cpu = time.perf_counter(), time.process_time()
    today = []
    for heads in head_sets:
        with hooked(module, heads, "ua", model.layout.head_dim, DEFAULT_EPSILON):
            today.append(generate(module, tokenizer, ids, args.max_new_tokens, args.batch_size))
    today_seconds, today_cpu = time.perf_counter() - started, time.process_time() - cpu
    started, cpu = time.perf_counter(), time.process_time()
    fast = truth_answers(module, tokenizer, head_sets, ids, args.max_new_tokens, judges, args.batch_size)
    fast_seconds, fast_cpu = time.perf_counter() - started, time.process_time() - cpu

    rows, identical = compare(head_sets, ids, today, fast, judges)
    ratio = today_seconds / fast_seconds
    print(f"today's path {today_seconds:.1f} s, fast path {fast_seconds:.1f} s: {ratio:.2f}x (CPU time {today_cpu:.1f} s / "
          f"{fast_cpu:.1f} s: {today_cpu / fast_cpu:.2f}x); verdicts {'identical' if identical else 'DIFFER'} for "
          f"{', '.join(judges)}")
    if args.out:
        args.out.write_text(json.dumps({
            "model": args.model, "heads": args.heads, "prompts": len(ids), "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "threads": args.threads, "today_seconds": today_seconds,
            "fast_seconds": fast_seconds, "ratio": ratio,
            "today_cpu_seconds": today_cpu, "fast_cpu_seconds": fast_cpu, "identical_verdicts": identical, "rows": rows,
            "answers": {"today": today, "fast": [[[a.text, a.stopped] for a in answers] for answers in fast]},
        }, indent=1) + "\n")
    return 0 if identical else 1


def compare(head_sets, ids, today, fast, judges) -> tuple[list[dict], bool]:
    """Per head set: harmful counts by judge on both paths, rows stopped, unstopped answers that differ. Prints a
    table; True when every verdict is identical prompt by prompt."""
    identical = True
    rows = []
    print("| heads | " + " | ".join(f"harmful by {name} (today / fast)" for name in judges)
          + " | rows stopped early | finished answers that differ |")
    print("|---|" + "---|" * (len(judges) + 2))
    for heads, full, quick in zip(head_sets, today, fast):
        texts = [answer.text for answer in quick]
        row = {"heads": format_heads(heads) or "clean", "stopped": sum(a.stopped for a in quick),
               "finished_differ": sum(a.text != b for a, b in zip(quick, full) if not a.stopped)}
        for name in judges:
            judge = KEYWORD_JUDGES[name]
            before, after = judge.judge(ids, full), judge.judge(ids, texts)
            row[name] = [sum(before), sum(after)]
            identical &= before == after
        rows.append(row)
        print(f"| {row['heads']} | " + " | ".join(f"{row[n][0]} / {row[n][1]}" for n in judges)
              + f" | {row['stopped']} of {len(ids)} | {row['finished_differ']} |")
    return rows, identical


if __name__ == "__main__":
    raise SystemExit(main())
