"""Sweep every head of one prompt the naive way and with the engine, in the same run; print speed ratios and errors.

Naive = what the original notebooks do: one nnsight trace per head (ua: the head's query slice x epsilon), plus a
plain-PyTorch-hooks loop (one forward per head) as a second baseline. Engine = `Engine.run` with every single-head
set. Times are the minimum over rounds, variants interleaved; trust the ratios, not the milliseconds.

    python benchmarks/bench_engine.py            # both configurations
    python benchmarks/bench_engine.py --quick    # the small one only
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safety_heads.engine import Engine
from safety_heads.models import wrap
from safety_heads.tiny import byte_tokenizer

EPSILON = 1e-4
CONFIGS = {
    # name: (layers, heads, kv heads, hidden, intermediate, tokens, target ratio vs naive nnsight)
    "4x8-h128": (4, 8, 4, 128, 256, 24, 5.0),
    "8x16-h1024": (8, 16, 8, 1024, 2816, 64, 2.0),
}


def build(layers, heads, kv_heads, hidden, intermediate):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(byte_tokenizer()), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False)
    module = LlamaForCausalLM(config).eval()
    module.set_attn_implementation("eager")
    return module


def naive_nnsight(loaded, ids, heads):
    lm, d = loaded.lm, loaded.layout.head_dim
    out = []
    for layer, head in heads:
        with torch.no_grad(), lm.trace(input_ids=ids, use_cache=False):
            lm.model.layers[layer].self_attn.q_proj.output[..., head * d:(head + 1) * d] *= EPSILON
            logits = lm.output.logits[:, -1].save()
        out.append(logits[0].float())
    return torch.stack(out)


def naive_hooks(module, ids, heads, d):
    out = []
    for layer, head in heads:
        def hook(m, a, o, head=head):
            o = o.clone()
            o[..., head * d:(head + 1) * d] *= EPSILON
            return o
        handle = module.model.layers[layer].self_attn.q_proj.register_forward_hook(hook)
        with torch.no_grad():
            out.append(module(input_ids=ids, use_cache=False).logits[0, -1].float())
        handle.remove()
    return torch.stack(out)


def measure(name, rounds):
    layers, n_heads, kv_heads, hidden, intermediate, tokens, target = CONFIGS[name]
    module = build(layers, n_heads, kv_heads, hidden, intermediate)
    loaded = wrap(module, byte_tokenizer(), name)
    engine = Engine(loaded)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, tokens))
    heads = [(l, h) for l in range(layers) for h in range(n_heads)]
    d = loaded.layout.head_dim

    variants = {
        "naive nnsight (1 trace/head)": lambda: naive_nnsight(loaded, ids, heads),
        "naive hooks (1 forward/head)": lambda: naive_hooks(module, ids, heads, d),
        "engine": lambda: engine.run([ids[0].tolist()], [[h] for h in heads]).logits[0],
    }
    best = {key: float("inf") for key in variants}
    outputs = {}
    for _ in range(rounds):
        for key, run in variants.items():
            start = time.perf_counter()
            outputs[key] = run()
            best[key] = min(best[key], time.perf_counter() - start)
    reference = outputs["naive hooks (1 forward/head)"]
    error = ((outputs["engine"] - reference).abs().max() / reference.abs().max()).item()
    stats = {}
    list(engine.stream([ids[0].tolist()], [[h] for h in heads], stats=stats))
    naive_layer_rows = len(heads) * layers
    print(f"\n## {name}: {layers} layers x {n_heads} heads ({kv_heads} KV), hidden {hidden}, {tokens} tokens, "
          f"{len(heads)} heads, torch threads {torch.get_num_threads()}")
    for key in variants:
        print(f"  {key:30s} {best[key] * 1e3:9.1f} ms")
    ratio = best["naive nnsight (1 trace/head)"] / best["engine"]
    print(f"  engine speed-up vs naive nnsight: {ratio:.2f}x (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})")
    print(f"  engine speed-up vs naive hooks:   {best['naive hooks (1 forward/head)'] / best['engine']:.2f}x")
    print(f"  engine traces: {stats['traces']} (naive: {len(heads)}); layer-row evaluations: {stats['layer_rows']} "
          f"(naive: {naive_layer_rows})")
    print(f"  max relative error vs hooks reference: {error:.2e}")
    return ratio, error


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the small configuration")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = ["4x8-h128"] if args.quick else list(CONFIGS)
    for name in names:
        measure(name, args.rounds)


if __name__ == "__main__":
    main()
