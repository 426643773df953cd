"""Sahara with candidate pruning against the full search, on one model, in one run: the groups each finds, the
score of every step, what pruning loses, and the speed-up.

- Ranking: exact Ships (KL, the paper's) on `--ships-queries` queries, as `safety-heads run` ranks candidates.
- Full: the paper's greedy search over every head (no guard), `--steps` steps on `--queries` queries.
- Pruned: the same search over only the `--candidates` heads the ranking puts highest.
Both searches use the engine with its defaults (shared prefix, base reuse). Every stage checkpoints into `--out`,
so a killed run resumes where it stopped (`--out` kept); times are printed for stages computed whole in one run.

    python benchmarks/bench_sahara_pruning.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --queries 8 --out runs/pruning --json benchmarks/results/sahara_pruning_qwen.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safety_heads.data import load_prompts
from safety_heads.models import ModelConfig, load_model
from safety_heads.runs import run_sahara, run_ships
from safety_heads.sahara import SaharaConfig
from safety_heads.ships import ShipsConfig


def quiet(line: str) -> None:
    pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="maliciousinstruct")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--ships-queries", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--ships-json", default=None,
                        help="rank by this ships.json instead of computing one (e.g. a `safety-heads run` Ships stage)")
    parser.add_argument("--sets-per-call", type=int, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_model(ModelConfig(model=args.model))
    out = Path(args.out)
    queries = load_prompts(args.dataset, limit=args.queries)
    timings = {}

    def stage(name, final, work):
        """A stage's JSON record: read back when an earlier run finished it, else computed (resuming its checkpoint)."""
        if not (out / name / final).exists():
            resume, start = (out / name).exists(), time.perf_counter()
            work(out / name, resume)
            if not resume:  # a resumed stage's time is only its remainder
                timings[name] = time.perf_counter() - start
        return json.loads((out / name / final).read_text())

    if args.ships_json:
        ranking_file = Path(args.ships_json)
        ships = json.loads(ranking_file.read_text())
    else:
        ships = stage("ships", "ships.json", lambda folder, resume: run_ships(
            model, load_prompts(args.dataset, limit=args.ships_queries), ShipsConfig(template=args.template),
            out=folder, resume=resume, progress=print))
        ranking_file = out / "ships" / "ships.json"
    search = dict(template=args.template, steps=args.steps, sets_per_call=args.sets_per_call)
    full = stage("sahara-full", "sahara.json", lambda folder, resume: run_sahara(
        model, queries, SaharaConfig(**search), out=folder, resume=resume, progress=print))
    pruned = stage("sahara-pruned", "sahara.json", lambda folder, resume: run_sahara(
        model, queries, SaharaConfig(**search, candidates=args.candidates, rank_by=str(ranking_file)),
        out=folder, resume=resume, progress=print))

    mean = ships["aggregate"]["mean"]
    ranking = sorted(((value, (layer, head)) for layer, row in enumerate(mean) for head, value in enumerate(row)),
                     reverse=True)
    rank_of = {head: rank for rank, (_, head) in enumerate(ranking, start=1)}
    rows = []
    for full_step, pruned_step in zip(full["steps"], pruned["steps"]):
        rows.append({"step": full_step["step"], "full_head": full_step["chosen"], "full_score": full_step["score"],
                     "full_head_ships_rank": rank_of[tuple(full_step["chosen"])], "pruned_head": pruned_step["chosen"],
                     "pruned_score": pruned_step["score"], "score_ratio": pruned_step["score"] / full_step["score"]})
    report = {"model": args.model, "dataset": args.dataset, "queries": args.queries, "ranking": str(ranking_file),
              "ranking_queries": ships["config"]["n_queries"],
              "candidates": args.candidates, "steps": rows, "full_group": full["heads"], "pruned_group": pruned["heads"],
              "seconds_this_run": timings}
    print(f"## Sahara pruning on {args.model}: {args.queries} {args.dataset} queries, {args.steps} steps, candidates = "
          f"the top {args.candidates} of Ships (KL) on {ships['config']['n_queries']} queries")
    for row in rows:
        print(f"  step {row['step']}: full {row['full_head']} ({row['full_score']:.4g} deg, Ships rank "
              f"{row['full_head_ships_rank']}), pruned {row['pruned_head']} ({row['pruned_score']:.4g} deg, "
              f"{row['score_ratio']:.0%} of the full step's)")
    if "sahara-full" in timings and "sahara-pruned" in timings:  # both computed (not resumed) in this run
        print(f"  time: full {timings['sahara-full']:.0f} s, pruned {timings['sahara-pruned']:.0f} s: "
              f"{timings['sahara-full'] / timings['sahara-pruned']:.1f}x (Ships ranking {timings.get('ships', 0):.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
