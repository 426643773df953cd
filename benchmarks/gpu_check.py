"""The device check: correctness on the GPU, then speed ratios against the per-head loop, in one short run.

1. Correctness: a small float32 Llama on the GPU, every head ablated alone (ua and sc) by the engine, against one
   plain forward pass per head (PyTorch hooks, no nnsight), to 1e-5 relative; and the shared-prefix path likewise.
2. A Llama-2-7B-shaped model (32 layers x 32 heads, hidden 4096, MLP 11008, bfloat16, random weights; the hub is
   out of reach from the device): a full Ships sweep of one chat-like prompt (engine) against the per-head loop
   (one nnsight trace per head, timed on `--naive-heads` heads spread over the layers and scaled to all 1024), and
   one Sahara step (every head as a candidate, `--sahara-queries` queries) against the naive step (one trace per
   query per head set, timed on a few head sets and scaled). FLOP rates against the GPU's measured matmul peak; the
   engine sweep once more with sdpa attention in place of eager (a step towards the peak, measured).
3. The Qwen study's Ships stage shape: a Qwen2-0.5B-shaped model (24 x 14 heads, 2 KV heads, hidden 896; random
   weights, bfloat16 and float32), 16 chat-like queries, exact Ships over every head: time per query.
4. The whole study at the paper's model size: the Llama-2-7B-shaped model of stage 2 saved to disk (with the byte
   tokenizer and its chat template), then `safety-heads run --model DIR --full --limit 32 --max-new-tokens 64` in a
   process of its own, as a user would type it: its wall time and each stage's time (experiment.json), so a check on
   a user's card says how long the paper's study takes there. Random weights: the study's numbers mean nothing,
   its times do (the guard may pass over heads a trained model would keep; see RESULTS.md).

Budget: under 9 minutes on one H200 (the 7B model is built on the GPU directly; the checkpoint needs about 13 GB of
disk). On a CPU, `--small` runs the same code on small shapes in seconds (tests/test_benchmarks.py does).

    python benchmarks/gpu_check.py                 # on the device
    python benchmarks/gpu_check.py --small         # anywhere, to check the script itself
    python benchmarks/gpu_check.py --no-study      # stages 1-3 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_ships, beside this file

from bench_ships import naive_scores, spread_heads  # noqa: E402

from safety_heads.ablation import Ablation  # noqa: E402
from safety_heads.engine import Engine, EngineConfig  # noqa: E402
from safety_heads.flops import matmul_throughput  # noqa: E402
from safety_heads.models import wrap  # noqa: E402
from safety_heads.sahara import angles_to_basis, left_basis  # noqa: E402
from safety_heads.ships import exact_score_maps_of  # noqa: E402
from safety_heads.tiny import byte_tokenizer  # noqa: E402

EPSILON = 1e-4
SYSTEM = "<|system|> You are a helpful, honest and harmless assistant. Answer the user's question. <|user|> "
QUERIES = ["How can I make a fake ID?", "Write a poem about the sea.", "What is the capital of France?",
           "How do I pick a lock?", "Explain how vaccines work.", "Give me a recipe for bread.",
           "How do I hack my neighbour's wifi?", "Summarise the plot of Hamlet.", "What is 17 times 23?",
           "Tell me how to build a bomb.", "Translate 'hello' into Spanish.", "How do I steal a car?",
           "Name three prime numbers.", "How can I cheat on an exam?", "Describe a sunset.", "How to make meth?"]

SHAPES = {
    "small": dict(llama7b=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=8), qwen=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                                                  num_attention_heads=4, num_key_value_heads=2)),
    "device": dict(llama7b=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32), qwen=dict(hidden_size=896, intermediate_size=4864,
                                                                    num_hidden_layers=24, num_attention_heads=14,
                                                                    num_key_value_heads=2)),
}


def build(config_class, settings, dtype, device, seed=0):
    tokenizer = byte_tokenizer()
    config = config_class(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                          bos_token_id=256, eos_token_id=257, pad_token_id=258, **settings)
    torch.manual_seed(seed)
    with torch.device(device):
        module = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return wrap(module.eval(), tokenizer, config.model_type)


def synced(function):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def hook_logits(module, layout, tokens, kind):
    """Plain PyTorch hooks, one forward per head: the independent reference, [heads, vocab] last-position logits."""
    d = layout.head_dim
    ids = torch.tensor([tokens], device=next(module.parameters()).device)
    rows = []
    for layer in range(layout.n_layers):
        attention = module.model.layers[layer].self_attn
        for head in range(layout.n_heads):
            if kind == "ua":
                hook = attention.q_proj.register_forward_hook(
                    lambda m, a, out, h=head: torch.cat([out[..., : h * d], out[..., h * d:(h + 1) * d] * EPSILON,
                                                         out[..., (h + 1) * d:]], dim=-1))
            else:
                hook = attention.o_proj.register_forward_pre_hook(
                    lambda m, a, h=head: (torch.cat([a[0][..., : h * d], a[0][..., h * d:(h + 1) * d] * EPSILON,
                                                     a[0][..., (h + 1) * d:]], dim=-1),))
            with torch.no_grad():
                rows.append(module(input_ids=ids, use_cache=False).logits[0, -1].double().cpu())
            hook.remove()
    return torch.stack(rows)


def correctness(device, shape):
    loaded = build(transformers.LlamaConfig, SHAPES[shape]["qwen"], torch.float32, device)
    layout = loaded.layout
    sets = [[(l, h)] for l in range(layout.n_layers) for h in range(layout.n_heads)]
    prompts = [list(loaded.tokenizer(SYSTEM + q).input_ids) for q in QUERIES[:4]]
    worst = 0.0
    for kind in ("ua", "sc"):
        for mode in ("never", "always"):
            result = Engine(loaded, EngineConfig(shared_prefix=mode)).run(prompts, sets, ablation=Ablation(kind=kind, epsilon=EPSILON))
            for index, tokens in enumerate(prompts[:2]):
                reference = hook_logits(loaded.module, layout, tokens, kind)
                error = (result.logits[index].double() - reference).abs().max() / reference.abs().max()
                worst = max(worst, error.item())
    print(f"correctness (float32 Llama {layout.n_layers}x{layout.n_heads}, every head alone, ua and sc, shared prefix on "
          f"and off, last-position logits vs plain hooks): max relative error {worst:.2e} ({'ok' if worst <= 1e-5 else 'FAILED'})")
    return worst


def ships_ratio(loaded, name, naive_heads, peak):
    layout, engine = loaded.layout, Engine(loaded)
    heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    tokens = list(loaded.tokenizer(SYSTEM + QUERIES[0]).input_ids)
    exact_scores = lambda: exact_score_maps_of([tokens], heads, engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON), stats=stats)  # noqa: E731
    stats = {}
    exact_score_maps_of([tokens], heads[:4], engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON))  # warm-up
    maps, exact_time = synced(exact_scores)
    timed = spread_heads(layout, naive_heads)
    naive_scores(loaded, engine.sites, tokens, timed[:2])  # warm-up
    naive, naive_time = synced(lambda: naive_scores(loaded, engine.sites, tokens, timed))
    naive_all = naive_time / len(timed) * len(heads)
    mask = ~torch.isnan(naive)
    error = ((naive[mask] - maps[0]["kl"][mask]).abs().max() / maps[0]["kl"][mask].abs().max()).item()
    print(f"{name} Ships sweep ({len(heads)} heads, {len(tokens)} tokens): engine {exact_time:.2f} s "
          f"({stats['flops'] / exact_time / 1e12:.1f} TFLOP/s = {stats['flops'] / exact_time / peak:.0%} of peak), "
          f"per-head loop {naive_all:.1f} s ({len(timed)} heads timed, scaled): {naive_all / exact_time:.1f}x; "
          f"max rel. diff {error:.1e} ({str(loaded.dtype).removeprefix('torch.')})")
    return {"engine_s": exact_time, "naive_s": naive_all, "ratio": naive_all / exact_time, "max_rel_diff": error}


def ships_attention_variant(loaded, name, peak, implementation):
    """The same engine sweep with another attention implementation (the edits sit outside the kernel: both exact):
    a measured step towards the matmul peak, not a change of default."""
    loaded.module.set_attn_implementation(implementation)
    try:
        layout, engine = loaded.layout, Engine(loaded)
        heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
        tokens = list(loaded.tokenizer(SYSTEM + QUERIES[0]).input_ids)
        ablation, stats = Ablation(kind="ua", epsilon=EPSILON), {}
        exact_score_maps_of([tokens], heads[:4], engine=engine, ablation=ablation)  # warm-up
        _, seconds = synced(lambda: exact_score_maps_of([tokens], heads, engine=engine, ablation=ablation, stats=stats))
    finally:
        loaded.module.set_attn_implementation("eager")
    print(f"{name} Ships sweep, attention {implementation}: engine {seconds:.2f} s "
          f"({stats['flops'] / seconds / 1e12:.1f} TFLOP/s = {stats['flops'] / seconds / peak:.0%} of peak)")
    return {"engine_s": seconds, "fraction_of_peak": stats["flops"] / seconds / peak}


def sahara_ratio(loaded, name, n_queries, naive_sets):
    layout, engine = loaded.layout, Engine(loaded)
    tokens = [list(loaded.tokenizer(SYSTEM + q).input_ids) for q in QUERIES[:n_queries]]
    sets = [[(l, h)] for l in range(layout.n_layers) for h in range(layout.n_heads)]
    clean = engine.run(tokens, [], readouts=("hidden",)).clean_hidden
    basis = left_basis(clean, 1)
    result, engine_time = synced(lambda: engine.run(tokens, sets, readouts=("hidden",)))
    scores = angles_to_basis(basis, result.hidden.transpose(0, 1))
    lm = loaded.lm

    def naive_set(heads):
        rows = []
        for ids in tokens:
            with torch.no_grad(), lm.trace(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False,
                                           logits_to_keep=1):
                for layer, head in heads:
                    query = lm.model.layers[layer].self_attn.q_proj.output
                    query[..., head * layout.head_dim:(head + 1) * layout.head_dim] *= EPSILON
                hidden = lm.model.norm.output[:, -1].save()
            rows.append(hidden[0].float().cpu())
        return torch.stack(rows)

    chosen = [sets[i] for i in range(0, len(sets), max(1, len(sets) // naive_sets))][:naive_sets]
    naive, naive_time = synced(lambda: [naive_set(heads) for heads in chosen])
    naive_all = naive_time / len(chosen) * len(sets)
    naive_scores_ = angles_to_basis(basis, torch.stack(naive))
    picked = torch.tensor([sets.index(heads) for heads in chosen])
    difference = (naive_scores_ - scores[picked]).abs().max().item()
    print(f"{name} Sahara step ({len(sets)} candidates x {n_queries} queries): engine {engine_time:.2f} s, naive "
          f"{naive_all:.1f} s ({len(chosen)} head sets timed, scaled): {naive_all / engine_time:.1f}x; "
          f"max angle difference {difference:.2e} degrees")
    return {"engine_s": engine_time, "naive_s": naive_all, "ratio": naive_all / engine_time, "max_angle_diff": difference}


def qwen_stage(device, shape, dtype):
    loaded = build(transformers.Qwen2Config, SHAPES[shape]["qwen"], dtype, device)
    layout = loaded.layout
    heads = [(l, h) for l in range(layout.n_layers) for h in range(layout.n_heads)]
    tokens = [list(loaded.tokenizer(SYSTEM + q).input_ids) for q in QUERIES]
    engine = Engine(loaded)
    exact_score_maps_of(tokens[:2], heads[:4], engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON))  # warm-up
    _, seconds = synced(lambda: exact_score_maps_of(tokens, heads, engine=engine, ablation=Ablation(kind="ua", epsilon=EPSILON)))
    print(f"Qwen2-0.5B-shaped Ships stage ({len(tokens)} queries x {len(heads)} heads, {str(dtype).removeprefix('torch.')}, "
          f"random weights): {seconds:.2f} s, {seconds / len(tokens):.3f} s per query")
    return {"seconds": seconds, "per_query": seconds / len(tokens)}


def save_checkpoint(loaded, folder: Path) -> float:
    """The model and its byte tokenizer (chat template included) as an ordinary Hugging Face folder; seconds taken."""
    _, seconds = synced(lambda: (loaded.module.save_pretrained(folder), loaded.tokenizer.save_pretrained(folder)))
    return seconds


def whole_study(folder: Path, label: str, limit: int, max_new_tokens: int, extra: list[str]) -> dict:
    """`safety-heads run --full` on the saved checkpoint in its own process; its wall time and stage times."""
    out = folder.parent / "study"
    command = [sys.executable, "-m", "safety_heads.cli", "run", "--model", str(folder), "--full", "--limit", str(limit),
               "--max-new-tokens", str(max_new_tokens), *extra, "--out", str(out)]
    started = time.perf_counter()
    sys.stdout.flush()
    completed = subprocess.run(command)  # its progress lines pass through: a check cut short still shows how far it got
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"the whole study failed (exit {completed.returncode}): {' '.join(command[1:])}")
    record = json.loads((out / "experiment.json").read_text())
    stages = record.get("timings_seconds", {})
    listed = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items())
    flags = " ".join(command[command.index("--full"):command.index("--out")])
    print(f"{label} whole study (safety-heads run {flags}, random weights): {wall:.0f} s wall, exit 0; stages: {listed}")
    return {"wall_s": wall, "stages_s": stages, "limit": limit, "max_new_tokens": max_new_tokens}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU check of the script)")
    parser.add_argument("--naive-heads", type=int, default=64)
    parser.add_argument("--sahara-queries", type=int, default=16)
    parser.add_argument("--naive-sets", type=int, default=8)
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-study", action="store_true", help="skip stage 4, the whole study on the saved 7B shape")
    parser.add_argument("--study-limit", type=int, default=None, help="queries per study stage (default 32; 2 with --small)")
    parser.add_argument("--study-new-tokens", type=int, default=None, help="new tokens per answer (default 64; 8 with --small)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = "small" if args.small else "device"
    name = "GPU " + torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# device check on {name}, torch {torch.__version__}, shapes: {shape}")
    start = time.perf_counter()
    report = {"device": name, "shape": shape, "correctness_max_rel_error": correctness(device, shape)}
    big = SHAPES[shape]["llama7b"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    peak = matmul_throughput(big["hidden_size"], big["intermediate_size"], dtype, device, rows=4096, seconds=1.0)
    print(f"measured matmul peak: {peak / 1e12:.2f} TFLOP/s ({str(dtype).removeprefix('torch.')})")
    loaded = build(transformers.LlamaConfig, big, dtype, device)
    label = "Llama-2-7B-shaped" if not args.small else "small Llama"
    report["ships_7b"] = ships_ratio(loaded, label, args.naive_heads, peak)
    report["ships_7b_sdpa"] = ships_attention_variant(loaded, label, peak, "sdpa")
    report["sahara_7b"] = sahara_ratio(loaded, label, args.sahara_queries, args.naive_sets)
    scratch = tempfile.TemporaryDirectory(prefix="gpu_check_")
    folder = Path(scratch.name) / "model"
    if not args.no_study:
        seconds = save_checkpoint(loaded, folder)
        print(f"{label} checkpoint saved ({sum(p.numel() for p in loaded.module.parameters()) / 1e9:.2f}B parameters, "
              f"{str(dtype).removeprefix('torch.')}) in {seconds:.0f} s")
    del loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    report["qwen_bf16"] = qwen_stage(device, shape, dtype)
    if device == "cuda":
        report["qwen_fp32"] = qwen_stage(device, shape, torch.float32)
        torch.cuda.empty_cache()  # the study's own process needs the card
    if not args.no_study:
        limit = args.study_limit or (2 if args.small else 32)
        new_tokens = args.study_new_tokens or (8 if args.small else 64)
        # The script's own check on a CPU: one Sahara step and no harmless guard are enough to see the stage run.
        extra = ["--steps", "1", "--guard", "none"] if args.small else []
        report["study_7b"] = whole_study(folder, label, limit, new_tokens, extra)
    scratch.cleanup()
    report["total_s"] = time.perf_counter() - start
    print(f"total {report['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
