"""Ships on real queries three ways, in one run: naive per-head loop, exact (engine), estimate (gradients).

- naive: one nnsight trace per head per query, KL from its last-token logits (the original notebooks' way);
- exact: `ships.exact_scores` (the engine: batched head sets, prefix reuse);
- estimate: `estimate.estimate_scores` (one forward and one backward pass per query).

Prints: exact vs naive speed ratio and max relative error; estimate vs exact speed ratio, Spearman rank correlation
over all heads and recall of the exact top 10 within the estimate's top 10 (means over queries). Times are minima
over rounds, variants interleaved.

    python benchmarks/bench_ships.py --queries 4
    python benchmarks/bench_ships.py --model path/to/chat-model --queries 16 --template chat
"""

from __future__ import annotations

import argparse
import time

import torch

from safety_heads.data import format_prompts, load_prompts
from safety_heads.engine import Engine
from safety_heads.estimate import EstimateConfig, estimate_scores
from safety_heads.models import ModelConfig, load_model
from safety_heads.ships import exact_scores, kl_divergence

EPSILON = 1e-4


def naive_scores(loaded, tokens):
    lm, layout = loaded.lm, loaded.layout
    d = layout.head_dim
    ids = torch.tensor([tokens])
    with torch.no_grad(), lm.trace(input_ids=ids, use_cache=False):
        clean = lm.output.logits[0, -1].save()
    scores = torch.zeros(layout.n_layers, layout.n_heads, dtype=torch.float64)
    for layer in range(layout.n_layers):
        for head in range(layout.n_heads):
            with torch.no_grad(), lm.trace(input_ids=ids, use_cache=False):
                lm.model.layers[layer].self_attn.q_proj.output[..., head * d:(head + 1) * d] *= EPSILON
                ablated = lm.output.logits[0, -1].save()
            scores[layer, head] = kl_divergence(clean.float(), ablated.float())
    return scores


def ranks(values):
    return values.flatten().argsort().argsort().double()


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_recall(estimate, exact, k):
    top_exact = set(exact.flatten().topk(k).indices.tolist())
    top_estimate = set(estimate.flatten().topk(k).indices.tolist())
    return len(top_exact & top_estimate) / k


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dataset", default="maliciousinstruct")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--template", default="raw")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true", help="for big models: exact vs estimate only")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(model=args.model))
    if loaded.layout.query_axes != "flat" or loaded.layout.query_path != "self_attn.q_proj":
        raise SystemExit("the naive loop here is written for q_proj models (Llama, Mistral, Qwen2, Gemma 2)")
    engine = Engine(loaded)
    layout = loaded.layout
    heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    prompts = format_prompts(load_prompts(args.dataset, limit=args.queries), args.template, loaded.tokenizer)
    token_lists = [list(p.token_ids) for p in prompts]
    estimate_config = EstimateConfig(samples=args.samples)

    variants = {
        "exact": lambda t: exact_scores(engine, t, heads, kind="ua", epsilon=EPSILON),
        "estimate": lambda t: estimate_scores(engine, t, kind="ua", epsilon=EPSILON, config=estimate_config),
    }
    if not args.skip_naive:
        variants = {"naive": lambda t: naive_scores(loaded, t), **variants}
    best = {key: float("inf") for key in variants}
    results = {}
    for _ in range(args.rounds):
        for key, score in variants.items():
            start = time.perf_counter()
            results[key] = [score(t) for t in token_lists]
            best[key] = min(best[key], time.perf_counter() - start)

    k = min(10, len(heads) // 3)
    print(f"## Ships on {args.model}: {layout.n_layers} layers x {layout.n_heads} heads, {len(token_lists)} {args.dataset} "
          f"queries ({args.template}, mean {sum(map(len, token_lists)) / len(token_lists):.0f} tokens), ua eps={EPSILON:g}, "
          f"torch threads {torch.get_num_threads()}")
    for key in variants:
        print(f"  {key:10s} {best[key] * 1e3 / len(token_lists):9.1f} ms per query")
    if "naive" in results:
        error = max(((e - n).abs().max() / n.abs().max()).item() for e, n in zip(results["exact"], results["naive"]))
        print(f"  exact vs naive:    {best['naive'] / best['exact']:.2f}x faster, max relative error {error:.1e} (target >= 5x)")
    rho = sum(spearman(e, x) for e, x in zip(results["estimate"], results["exact"])) / len(token_lists)
    recall = sum(top_recall(e, x, k) for e, x in zip(results["estimate"], results["exact"])) / len(token_lists)
    print(f"  estimate vs exact: {best['exact'] / best['estimate']:.2f}x faster, Spearman {rho:.3f}, "
          f"top-{k} recall {recall:.2f} (targets: >= 50x, >= 0.8, >= 0.8 on trained models)")


if __name__ == "__main__":
    main()
