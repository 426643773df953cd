"""Ablated generation the original notebook's way vs ours, in one run: speed ratio and identical greedy outputs.

Original (nnsight cookbook notebook): one query at a time, one trace per new token, each trace re-running the whole
prefix with the ablation applied, the argmax appended (no KV cache, no `generate`).
Ours: `generate.generate`, a batch of queries per nnsight `generate`, KV cache on, the ablation at every step.

    python benchmarks/bench_generate.py                     # 16 queries x 64 new tokens on the tiny model
    python benchmarks/bench_generate.py --queries 4 --tokens 16
"""

from __future__ import annotations

import argparse
import time

import torch

from safety_heads.data import format_prompts, load_prompts
from safety_heads.generate import GenerationConfig, generate
from safety_heads.models import ModelConfig, load_model

HEADS = [(0, 1), (1, 3)]
EPSILON = 1e-4


def per_token_traces(model, token_ids, new_tokens):
    """The notebook's loop: a fresh full-prefix trace per generated token."""
    lm, d = model.lm, model.layout.head_dim
    ids = list(token_ids)
    out = []
    for _ in range(new_tokens):
        with torch.no_grad(), lm.trace(input_ids=torch.tensor([ids]), use_cache=False):
            for layer, head in HEADS:
                lm.model.layers[layer].self_attn.q_proj.output[..., head * d:(head + 1) * d] *= EPSILON
            logits = lm.output.logits[0, -1].save()
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model = load_model(ModelConfig(model=args.model))
    prompts = format_prompts(load_prompts("maliciousinstruct", limit=args.queries), "raw", model.tokenizer)
    tokens = [list(p.token_ids) for p in prompts]
    # Pin the length: the notebook loop never stops early, so ours must not either for a like-for-like count.
    eos = model.tokenizer.eos_token_id
    model.module.generation_config.eos_token_id = None

    start = time.perf_counter()
    naive = [per_token_traces(model, t, args.tokens) for t in tokens]
    naive_time = time.perf_counter() - start
    config = GenerationConfig(max_new_tokens=args.tokens, batch_size=args.batch_size)
    start = time.perf_counter()
    ours = generate(model, tokens, head_sets=[HEADS] * len(tokens), config=config)
    ours_time = time.perf_counter() - start
    model.module.generation_config.eos_token_id = eos

    same = sum(a == b.token_ids for a, b in zip(naive, ours))
    ratio = naive_time / ours_time
    print(f"## Ablated generation ({', '.join(f'{l}:{h}' for l, h in HEADS)}, ua eps={EPSILON:g}) on {args.model}: "
          f"{len(tokens)} queries x {args.tokens} new tokens, greedy, torch threads {torch.get_num_threads()}")
    print(f"  notebook way (1 trace per token, full prefix, 1 query at a time): {naive_time:8.2f} s")
    print(f"  ours (batched nnsight generate, KV cache, ablation every step):    {ours_time:8.2f} s")
    print(f"  speed-up {ratio:.1f}x (target >= 10x: {'met' if ratio >= 10 else 'NOT met'}); "
          f"identical greedy outputs for {same}/{len(tokens)} queries")


if __name__ == "__main__":
    main()
