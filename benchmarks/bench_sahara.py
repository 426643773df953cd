"""One full Sahara greedy step (every head) the naive way and with the engine, in the same run; print the speed ratio
and the largest score difference.

Naive = what the original code does (lib/Sahara/attribution.py): one forward pass per query per head set, here one
nnsight trace each (ua: the head's query slice x epsilon), reading the final-norm hidden state at the last token;
the clean matrix the same way; then the top left singular vectors compared in float64 (svd.py at HEAD). Engine =
`run_sahara` with steps=1: per layer, all queries x all that layer's head sets in few batched forward passes with
prefix reuse, plus the same float64 SVD. Model: the built-in tiny Llama (4 layers x 8 heads, hidden 128); queries:
the first 32 of the bundled MaliciousInstruct, template raw. Times are the minimum over rounds, variants
interleaved; trust the ratio, not the seconds.

    python benchmarks/bench_sahara.py            # 32 queries, 3 rounds
    python benchmarks/bench_sahara.py --quick    # 8 queries, 2 rounds
    python benchmarks/bench_sahara.py --threads 1 --memory-budget 16   # a busy CPU; cache-sized batches
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from safety_heads.ablation import AblationConfig
from safety_heads.data import format_prompts, load_prompts
from safety_heads.engine import Engine, EngineConfig
from safety_heads.models import ModelConfig, load_model
from safety_heads.runs import run_sahara
from safety_heads.sahara import SaharaConfig

EPSILON = 1e-4
TARGET = 10.0


def naive_hidden(loaded, ids, heads):
    """One trace per query: the final-norm hidden state at the last token with `heads` ablated (ua)."""
    lm, d = loaded.lm, loaded.layout.head_dim
    with torch.no_grad(), lm.trace(input_ids=torch.tensor([ids]), use_cache=False):
        for layer, head in heads:
            lm.model.layers[layer].self_attn.q_proj.output[..., head * d:(head + 1) * d] *= EPSILON
        hidden = lm.model.norm.output[:, -1].save()
    return hidden[0].double()


def naive_angle(clean, ablated):
    """The authors' HEAD score (compute_subspace_similarity), in float64: arccos of |u1 . u2| in degrees."""
    u1 = torch.linalg.svd(clean, full_matrices=False).U[:, :1]
    u2 = torch.linalg.svd(ablated, full_matrices=False).U[:, :1]
    sigma = torch.linalg.svdvals(u1.T @ u2).clamp(-1, 1)
    return math.degrees(torch.acos(sigma).item())


def naive_step(loaded, tokens):
    layout = loaded.layout
    clean = torch.stack([naive_hidden(loaded, ids, []) for ids in tokens])
    scores = torch.full((layout.n_layers, layout.n_heads), float("nan"), dtype=torch.float64)
    for layer in range(layout.n_layers):
        for head in range(layout.n_heads):
            ablated = torch.stack([naive_hidden(loaded, ids, [(layer, head)]) for ids in tokens])
            scores[layer, head] = naive_angle(clean, ablated)
    return scores


def engine_step(loaded, queries, engine_config):
    config = SaharaConfig(steps=1, ablation=AblationConfig(epsilon=EPSILON), template="raw")
    return run_sahara(loaded, queries, config, engine_config=engine_config, progress=lambda _: None).steps[0].scores


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="8 queries, 2 rounds")
    parser.add_argument("--queries", type=int, default=None, help="how many MaliciousInstruct queries (default 32)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                        help="the engine's memory budget (default: the engine's; small budgets batch less)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_queries = args.queries or (8 if args.quick else 32)
    rounds = args.rounds or (2 if args.quick else 3)

    loaded = load_model(ModelConfig())
    engine_config = EngineConfig(memory_budget_mb=args.memory_budget)
    queries = load_prompts("maliciousinstruct", limit=n_queries)
    tokens = [list(p.token_ids) for p in format_prompts(queries, "raw", loaded.tokenizer)]
    layout = loaded.layout
    n_heads = layout.n_layers * layout.n_heads

    variants = {"naive (1 trace per query per head set)": lambda: naive_step(loaded, tokens),
                "engine (run_sahara, steps=1)": lambda: engine_step(loaded, queries, engine_config)}
    best = {key: math.inf for key in variants}
    outputs = {}
    for _ in range(rounds):
        for key, run in variants.items():
            start = time.perf_counter()
            outputs[key] = run()
            best[key] = min(best[key], time.perf_counter() - start)
    naive, engine = outputs.values()
    difference = (naive - engine).abs().max().item()
    same_best = int(torch.argmax(naive.flatten())) == int(torch.argmax(engine.flatten()))
    # What run_sahara asks of the engine: the clean matrix once, then one call per layer (each with its clean pass).
    stats: dict = {}
    engine = Engine(loaded, engine_config)
    list(engine.stream(tokens, [], readouts=("hidden",), stats=stats))
    for layer in range(layout.n_layers):
        list(engine.stream(tokens, [[(layer, h)] for h in range(layout.n_heads)], readouts=("hidden",), stats=stats))
    naive_layer_rows = n_queries * (n_heads + 1) * layout.n_layers
    lengths = [len(ids) for ids in tokens]

    print(f"\n## Sahara, one greedy step: tiny Llama {layout.n_layers} layers x {layout.n_heads} heads, "
          f"{n_queries} MaliciousInstruct queries ({min(lengths)}-{max(lengths)} tokens, template raw), "
          f"ua eps={EPSILON:g}, {rounds} rounds, torch threads {torch.get_num_threads()}, "
          f"engine memory budget {args.memory_budget or 'default'} MB")
    for key in variants:
        print(f"  {key:40s} {best[key]:8.2f} s")
    ratio = best["naive (1 trace per query per head set)"] / best["engine (run_sahara, steps=1)"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"  engine speed-up vs naive: {ratio:.1f}x (target >= {TARGET:g}x: {verdict})")
    print(f"  traces: naive {n_queries * (n_heads + 1)}, engine {stats['traces']}; layer x row evaluations: naive "
          f"{naive_layer_rows}, engine {stats['layer_rows']} (prefix reuse; rows padded to the longest prompt)")
    print(f"  scores: {naive.min().item():.4g}-{naive.max().item():.4g} degrees; "
          f"max |naive - engine| = {difference:.2e} degrees; same best head: {same_best}")


if __name__ == "__main__":
    main()
