"""Requests and bytes a remote run sends to NDIF, ours vs the original notebooks' one request per head.

Counted on a Llama-2-7b-shaped model built on the meta device (32 layers x 32 heads, hidden 4096, vocab 32000; no
weights, nothing runs): the requests are planned by the engine and serialised exactly as they would be sent
(`remote_requests.request_payloads`, a capture backend), so the byte counts are the real payloads. Nothing is sent anywhere.

- Ships, one query: every one of the 1024 heads ablated on its own, last-token logits back.
- Sahara, one greedy step: every head added to the current group (1022 head sets) over 32 queries, last-token
  final-norm hidden states back; the whole step in one engine call, which is what sahara.py does with a remote
  engine (locally it calls the engine once per layer, so that a kill loses at most one layer).

Naive = one trace per head set (`lm.trace(..., remote=True)`, the head's query slice x epsilon, readouts saved),
plus one clean trace: what the original notebooks did for Ships, ported to nnsight. For Sahara the cookbook notebook
sent one request per query per head set (32x more than counted here), so the Sahara ratio is a lower bound. One
such request is captured and its size multiplied by the count. Prompt lengths follow the bundled maliciousinstruct
queries under the paper template, at ~4 characters per Llama token.

    python benchmarks/bench_remote.py
    python benchmarks/bench_remote.py --budget-gb 40
"""

from __future__ import annotations

import argparse

import nnsight
import torch
from transformers import LlamaConfig

from safety_heads.data import format_prompts, load_prompts
from safety_heads.engine import Engine, EngineConfig
from safety_heads.models import LoadedModel, head_layout, prepare_tokenizer
from safety_heads.remote import CaptureBackend
from safety_heads.remote_requests import plan_requests, request_payloads
from safety_heads.tiny import byte_tokenizer

EPSILON = 1e-4
TARGET = 100.0  # fewer requests than the naive method, at least


def llama2_7b_on_meta() -> LoadedModel:
    """What `models.load_remote_model` builds for meta-llama/Llama-2-7b-chat-hf, with the hub's config written out
    (and a stand-in tokenizer): nnsight's weightless client on the meta device."""
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    tokenizer = prepare_tokenizer(byte_tokenizer())
    lm = nnsight.TransformersModel("meta-llama/Llama-2-7b-chat-hf", config=config, tokenizer=tokenizer,
                                   task="text-generation", attn_implementation="eager")
    return LoadedModel(lm=lm, tokenizer=tokenizer, layout=head_layout(config), name="Llama-2-7b shape", dtype=torch.bfloat16)


def prompts(n: int) -> list[list[int]]:
    """Token lists of Llama-like length: the paper template around maliciousinstruct queries, ~4 characters a token."""
    tokenizer = byte_tokenizer()
    texts = [p.text for p in format_prompts(load_prompts("maliciousinstruct", limit=n), "paper", tokenizer)]
    return [[(7 * i + j) % 250 for j in range(max(8, len(text) // 4))] for i, text in enumerate(texts)]


def naive_request_bytes(model, ids: list[list[int]], readout: str) -> int:
    """One request of the one-head-per-request method: ablate head (0, 0), save the readout."""
    lm, d = model.lm, model.layout.head_dim
    batch = torch.tensor(ids)  # equal lengths here; the original code padded its batch of queries
    capture = CaptureBackend()
    with lm.trace(input_ids=batch, backend=capture):
        lm.model.layers[0].self_attn.q_proj.output[..., 0:d] *= EPSILON
        if readout == "logits":
            lm.output.logits[:, -1].save()
        else:
            lm.model.norm.output[:, -1].save()
    return len(capture.payloads[0])


def report(name, engine, ids, sets, readouts, naive_count):
    requests = plan_requests(engine, ids, sets, readouts)
    payloads = request_payloads(engine, ids, sets, readouts=readouts)
    ours = len(payloads)
    ours_bytes = sum(len(p) for p in payloads)
    width = sum(32000 if r == "logits" else 4096 for r in readouts)
    back = (len(sets) + 1) * len(ids) * width * 2
    equal_ids = [row[: min(len(r) for r in ids)] for row in ids]
    naive_bytes = naive_count * naive_request_bytes(engine.model, equal_ids, readouts[0])
    chunks = sum(r.n_chunks for r in requests)
    groups = len({id(part.batch) for r in requests for part in r.parts})
    print(f"{name}")
    print(f"  ours : {ours:5d} request(s), {chunks} ablated forward passes ({groups} prompt group(s)), {ours_bytes / 1e3:.1f} kB sent "
          f"(largest request {max(len(p) for p in payloads) / 1e3:.1f} kB)")
    print(f"  naive: {naive_count:5d} requests, one forward pass each, {naive_bytes / 1e3:.1f} kB sent "
          f"({naive_bytes / naive_count / 1e3:.1f} kB each)")
    print(f"  readouts back (both ways, bfloat16): {back / 2**20:.0f} MiB")
    print(f"  ratio: {naive_count / ours:.0f}x fewer requests, {naive_bytes / ours_bytes:.0f}x fewer bytes sent"
          + ("" if naive_count / ours >= TARGET else f"  (below the {TARGET:.0f}x target)"))
    return naive_count / ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-gb", type=float, default=40.0, help="activation memory per forward pass on the server")
    parser.add_argument("--result-mb", type=float, default=256.0, help="readouts per request (EngineConfig.remote_result_mb)")
    parser.add_argument("--queries", type=int, default=32, help="queries in the Sahara step")
    args = parser.parse_args()
    model = llama2_7b_on_meta()
    engine = Engine(model, EngineConfig(remote=True, memory_budget_mb=args.budget_gb * 1024, remote_result_mb=args.result_mb))
    heads = [[(layer, head)] for layer in range(32) for head in range(32)]
    print(f"Llama-2-7b shape (32 x 32 heads), activation budget {args.budget_gb:g} GB per forward pass, "
          f"{args.result_mb:g} MB of readouts per request; nothing is sent.\n")
    ships = report("Ships, one query, all 1024 heads (logits)", engine, prompts(1), heads, ("logits",), 1024 + 1)
    group = [(13, 7), (2, 21)]  # a Sahara step adds each other head to the group found so far
    sets = [group + [h[0]] for h in heads if h[0] not in group]
    ids = prompts(args.queries)
    sahara = report(f"Sahara greedy step, {args.queries} queries x {len(sets)} head sets (hidden states)", engine,
                    ids, sets, ("hidden",), len(sets) + 1)
    # Locally sahara.py calls the engine once per layer (a kill loses at most a layer); with a remote engine it
    # scores every layer of a step in one call, as counted above. For comparison, the per-layer count:
    per_layer = sum(len(plan_requests(engine, ids, [s for s in sets if s[-1][0] == layer], ("hidden",))) for layer in range(32))
    print(f"  (were it called once per layer, as sahara.py does locally: {per_layer} requests, "
          f"{(len(sets) + 1) / per_layer:.0f}x fewer than naive)")
    print(f"\nrequest ratios: Ships {ships:.0f}x, Sahara step {sahara:.0f}x (target >= {TARGET:.0f}x)")

if __name__ == "__main__":
    main()
