"""Ships on real queries, every method in one run, with a FLOP account: naive per-head loop, exact (engine), and the
gradient estimates, against each other.

- naive: one nnsight trace per head per query, `logits_to_keep=1` like the engine (the original notebooks' way, made
  no more expensive than it must be). On a real model it costs a full forward pass per head, so `--naive-heads N`
  times N heads spread over every layer on the first query and scales to all heads (every naive pass costs the same:
  the whole model on the same prompt); their scores are checked against exact.
- exact: `ships.exact_score_maps_of` over all queries at once (the engine: batched head sets, unablated lower layers
  reused, the template's common prefix computed once per head set), and, for comparison, one query at a time.
- estimate: `estimate.estimate_scores` per query, for each `--estimators` (fisher: exact per-layer changes and the
  top-token Fisher; sampled: the sampled Fisher); estimate+verify: the estimate's top `--verify` heads recomputed
  exactly, so its top 10 are exact values.

FLOPs are counted by `safety_heads.flops` (the engine's own count for exact; the same model for the others: a
forward pass per naive head; for the estimates, each backward row as one more forward, since frozen weights need
activation gradients only) and divided by the time; the
peak is this machine's measured matmul throughput on the model's own MLP shapes, in the same run.

    python benchmarks/bench_ships.py --queries 4
    python benchmarks/bench_ships.py --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --template chat \\
        --offset 50 --queries 16 --naive-heads 24 --json benchmarks/results/ships_qwen.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from safety_heads.ablation import Ablation
from safety_heads.data import format_prompts, load_prompts
from safety_heads.engine import Engine, EngineConfig
from safety_heads.estimate import EstimateConfig, estimate_scores
from safety_heads.flops import matmul_throughput
from safety_heads.intrace import layer_site
from safety_heads.models import ModelConfig, load_model
from safety_heads.ships import exact_score_maps_of, kl_divergence

EPSILON = 1e-4


def naive_scores(loaded, sites, tokens, heads):
    """One trace per head, the query heads scaled at the model's own query site (plain nnsight, no engine)."""
    lm, layout = loaded.lm, loaded.layout
    ids = torch.tensor([tokens], device=loaded.device)
    with torch.no_grad(), lm.trace(input_ids=ids, use_cache=False, logits_to_keep=1):
        clean = lm.output.logits[0, -1].save()
    scores = torch.full((layout.n_layers, layout.n_heads), float("nan"), dtype=torch.float64)
    for layer, head in heads:
        with torch.no_grad(), lm.trace(input_ids=ids, use_cache=False, logits_to_keep=1):
            query = layer_site(lm, sites, layer, sites["query_path"]).output
            start = sites["query_offset"] + head * layout.head_dim
            query[..., start : start + layout.head_dim] *= EPSILON
            ablated = lm.output.logits[0, -1].save()
        scores[layer, head] = kl_divergence(clean.float(), ablated.float())
    return scores


def spread_heads(layout, count):
    """About `count` heads, the same number in every layer (head indices cycling), or every head when count is 0."""
    if count <= 0 or count >= layout.n_layers * layout.n_heads:
        return [(layer, head) for layer in range(layout.n_layers) for head in range(layout.n_heads)]
    per_layer = math.ceil(count / layout.n_layers)
    return [(layer, (layer * per_layer + j) % layout.n_heads) for layer in range(layout.n_layers) for j in range(per_layer)]


def ranks(values):
    return values.flatten().argsort().argsort().double()


def spearman(a, b):
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_recall(estimate, exact, k):
    top_exact = set(exact.flatten().topk(k).indices.tolist())
    top_estimate = set(torch.nan_to_num(estimate, nan=-math.inf).flatten().topk(k).indices.tolist())
    return len(top_exact & top_estimate) / k


def planned_flops(loaded, token_lists, heads, **settings):
    """FLOPs per query the engine would run for a full sweep under `settings` (from its plan; nothing runs)."""
    engine = Engine(loaded, EngineConfig(**settings))
    plans = engine.group_schedules(token_lists, engine.normalise_sets([[head] for head in heads]))
    total = sum(engine.pass_flops(batch, None) + sum(engine.pass_flops(batch, chunk) for chunk in chunks)
                for batch, chunks in plans)
    return total / len(token_lists)


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dataset", default="maliciousinstruct")
    parser.add_argument("--offset", type=int, default=0, help="skip this many prompts of the data set (held-out queries)")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--template", default="raw")
    parser.add_argument("--naive-heads", type=int, default=0, help="heads the naive loop times (0 = every head)")
    parser.add_argument("--estimators", default="fisher,sampled", help="comma-separated; fisher:N backpropagates N top tokens")
    parser.add_argument("--top-tokens", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--verify", type=int, default=30, help="heads estimate+verify recomputes exactly")
    parser.add_argument("--skip-single", action="store_true", help="skip exact one query at a time")
    parser.add_argument("--unshared", action="store_true", help="also exact over all queries with --shared-prefix never")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--save-maps", default=None, help="save every score matrix to this .pt file")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(model=args.model))
    engine = Engine(loaded, EngineConfig())
    layout, model = loaded.layout, engine.flops
    heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    queries = load_prompts(args.dataset, limit=args.offset + args.queries)[args.offset :]
    token_lists = [list(p.token_ids) for p in format_prompts(queries, args.template, loaded.tokenizer)]
    n, mean_tokens = len(token_lists), sum(map(len, token_lists)) / len(token_lists)
    hf = loaded.module.config
    peak = matmul_throughput(engine.d_model, getattr(hf, "intermediate_size", 4 * engine.d_model), loaded.dtype)
    report = {"model": args.model, "layers": layout.n_layers, "heads": layout.n_heads, "dataset": args.dataset,
              "offset": args.offset, "queries": n, "template": args.template, "mean_tokens": mean_tokens,
              "torch_threads": torch.get_num_threads(), "matmul_peak_flops": peak}
    print(f"## Ships on {args.model}: {layout.n_layers} x {layout.n_heads} heads, {n} {args.dataset} queries from "
          f"{args.offset + 1} ({args.template}, mean {mean_tokens:.0f} tokens), ua eps={EPSILON:g}, "
          f"{torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.1f} GFLOP/s ({loaded.dtype})")

    def line(name, seconds, flops, note=""):
        report[name] = {"seconds_per_query": seconds / n, "flops_per_query": flops / n}
        print(f"  {name:24s} {seconds / n:9.2f} s/query  {flops / n / 1e12:7.3f} TFLOP/query  "
              f"{flops / seconds / 1e9:6.1f} GFLOP/s = {flops / seconds / peak:4.0%} of peak  {note}")

    # The FLOP account of a full sweep, from the engine's plans: what each saving removes.
    mean_length = sum(map(len, token_lists)) / n
    per_head = model.layers(1, mean_length, mean_length, layout.n_layers) + model.head(1)
    account = {"naive (a forward per head)": per_head * len(heads),
               "batched, every layer": planned_flops(loaded, token_lists, heads, prefix_reuse=False, shared_prefix="never"),
               "+ prefix reuse": planned_flops(loaded, token_lists, heads, shared_prefix="never"),
               "+ shared prefix (default)": planned_flops(loaded, token_lists, heads)}
    report["flop_account_per_query"] = account
    print("  FLOP account of a full sweep, per query: " + "; ".join(f"{k} {v / 1e9:.1f} GFLOP" for k, v in account.items()))

    # exact, all queries in one sweep (the shared prefix on, as `auto` decides)
    stats = {}
    maps, exact_time = timed(lambda: exact_score_maps_of(token_lists, heads, engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON),
                                                         stats=stats))
    exact = [m["kl"] for m in maps]
    line("exact (all queries)", exact_time, stats["flops"])
    if not args.skip_single:
        single_stats = {}
        singles, single_time = timed(lambda: [exact_score_maps_of([t], heads, engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON),
                                                                  stats=single_stats)[0]["kl"] for t in token_lists])
        error = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(exact, singles))
        line("exact (one at a time)", single_time, single_stats["flops"], f"max rel. diff to all-at-once {error:.1e}")

    if args.unshared:
        unshared_stats = {}
        plain = Engine(loaded, EngineConfig(shared_prefix="never"))
        unshared, unshared_time = timed(lambda: exact_score_maps_of(token_lists, heads, engine=plain,
                                                                    ablation=Ablation(kind="ua", epsilon=EPSILON),
                                                                    stats=unshared_stats))
        error = max(((a["kl"] - b).abs().max() / b.abs().max()).item() for a, b in zip(unshared, exact))
        line("exact (no shared prefix)", unshared_time, unshared_stats["flops"],
             f"max rel. diff {error:.1e}; the shared prefix saves {unshared_time / exact_time:.2f}x")

    # naive on the first query: a full forward per head
    timed_heads = spread_heads(layout, args.naive_heads)
    naive, naive_time = timed(lambda: naive_scores(loaded, engine.sites, token_lists[0], timed_heads))
    per_head = naive_time / len(timed_heads)
    naive_flops = model.layers(1, len(token_lists[0]), len(token_lists[0]), layout.n_layers) + model.head(1)
    mask = ~torch.isnan(naive)
    naive_error = ((naive[mask] - exact[0][mask]).abs().max() / exact[0][mask].abs().max()).item()
    scale = mean_tokens / len(token_lists[0])  # the naive cost grows with the prompt's length
    naive_query_time = per_head * len(heads) * scale
    report["naive"] = {"timed_heads": len(timed_heads), "seconds_per_head": per_head,
                       "seconds_per_query": naive_query_time, "max_relative_error_vs_exact": naive_error}
    print(f"  {'naive (per head)':24s} {naive_query_time:9.2f} s/query  ({len(timed_heads)} heads timed on query 1, "
          f"{per_head:.3f} s each, x {len(heads)} heads x {scale:.2f} for the mean length)  "
          f"{naive_flops / per_head / 1e9:6.1f} GFLOP/s = {naive_flops / per_head / peak:4.0%} of peak; "
          f"max rel. error vs exact {naive_error:.1e}")
    print(f"  exact vs naive: {naive_query_time / (exact_time / n):.2f}x faster (all queries at once)"
          + (f", {naive_query_time / (single_time / n):.2f}x one at a time" if not args.skip_single else ""))
    report["exact_vs_naive"] = naive_query_time / (exact_time / n)

    k = min(10, len(heads) // 3)
    maps_out = {"exact": torch.stack(exact)}
    for label in [e for e in args.estimators.split(",") if e]:
        estimator, _, top = label.partition(":")
        config = EstimateConfig(estimator=estimator, top_tokens=int(top or args.top_tokens), samples=args.samples)
        estimates, estimate_time = timed(lambda config=config: [
            estimate_scores(engine, t, ablation=Ablation(kind="ua", epsilon=EPSILON), config=config)
                                                  for t in token_lists])
        rows = (config.top_tokens + 1) if estimator == "fisher" else args.samples
        # The weights are frozen, so the backward pass computes activation gradients only: about one more forward.
        forward_rows = rows * 2 + (2 if estimator == "fisher" else 0)
        flops = sum(model.layers(forward_rows, len(t), len(t), layout.n_layers) + model.head(forward_rows) for t in token_lists)
        rho = [spearman(e, x) for e, x in zip(estimates, exact)]
        recall = [top_recall(e, x, k) for e, x in zip(estimates, exact)]
        line(f"estimate {label}", estimate_time, flops,
             f"Spearman {sum(rho) / n:.3f} (min {min(rho):.2f}), top-{k} recall {sum(recall) / n:.2f} (min {min(recall):.1f}), "
             f"{exact_time / estimate_time:.2f}x faster than exact")
        report[f"estimate {label}"].update(spearman=rho, recall=recall, speedup_vs_exact=exact_time / estimate_time)
        # estimate+verify: the estimate's top `verify` heads recomputed exactly (their values replace the estimates)
        verify_stats = {}

        def verify(estimates=estimates, verify_stats=verify_stats):
            out = []
            for estimate, tokens in zip(estimates, token_lists):
                flat = estimate.flatten().topk(args.verify).indices.tolist()
                chosen = [(i // layout.n_heads, i % layout.n_heads) for i in flat]
                checked = exact_score_maps_of([tokens], chosen, engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON),
                                              stats=verify_stats)[0]["kl"]
                out.append(torch.where(torch.isnan(checked), estimate, checked))  # as `--method estimate+verify` does
            return out

        verified, verify_time = timed(verify)
        recall = [top_recall(v, x, k) for v, x in zip(verified, exact)]
        rho = [spearman(v, x) for v, x in zip(verified, exact)]
        total = estimate_time + verify_time
        line(f"estimate {label}+verify", total, flops + verify_stats["flops"],
             f"Spearman {sum(rho) / n:.3f} (min {min(rho):.2f}), top-{k} recall {sum(recall) / n:.2f} (min "
             f"{min(recall):.1f}) verifying {args.verify}, {exact_time / total:.2f}x faster than exact")
        report[f"estimate {label}+verify"].update(spearman=rho, recall=recall, speedup_vs_exact=exact_time / total,
                                                   verify=args.verify)
        maps_out[label] = {"estimate": torch.stack(estimates), "verified": torch.stack(verified)}

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.save_maps:  # every score matrix, for analysis (torch.load(..., weights_only=True))
        torch.save(maps_out, args.save_maps)


if __name__ == "__main__":
    main()
