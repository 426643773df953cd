"""Train the demo chat model: a small Llama that refuses harmful requests and answers harmless ones.

Everything it needs is bundled: harmful requests from AdvBench, HarmBench and refusal_direction's harmful-train split
(answered with a refusal), harmless Alpaca instructions from harmless-train (answered compliantly). MaliciousInstruct
and JailbreakBench are held out, and so is every training request that (nearly) duplicates one of them: the
harmful-train split contains 88 MaliciousInstruct queries verbatim, AdvBench and HarmBench 20 JailbreakBench
behaviours. The harmful-val/test splits are never read (test holds all of JailbreakBench, val is HarmBench).

Why the data looks the way it does. Trained on plain requests alone, a small model learns keyword spotting: any
harmful word anywhere in the prompt, however diluted, means "refuse", so making a head's attention uniform (the `ua`
ablation) changes nothing -- the uniform average still contains the harmful words. Real aligned models decide on
*what the request asks for*, which needs attention to the right tokens. So besides plain requests the data holds
compositions of a harmful request H and harmless requests B with the same bag of words but opposite labels:

    "Do not H. Instead, B."  -> comply        "Do not B. Instead, H."  -> refuse
    "B Also, H"              -> refuse        "B Also, B2"             -> comply

In such data "a harmful word is present" predicts nothing; only "a harmful word sits in the part that is asked for"
does, and that is a question of where the last position attends.

Two more things were needed before any single head mattered (README.md lists the attempts): a short language-model
pretraining phase on the requests' text, where heads learn to read words, and a group-lasso penalty on each head's
output projection, so that the model keeps few heads in use instead of spreading the decision thinly over all 32.

Every response starts with a distinct first token ("I" for the refusal, "Sure" for compliance), so the first
response token already says whether the model refuses. Loss is on response tokens only (the prompt is masked).

The requests and compositions are corpus.py, the tokenizer and batches batches.py; this file is the recipe
(TrainConfig), the training loop and the saved folder.

    python -m safety_heads.demo.train          # writes src/safety_heads/demo/model (about 5 minutes, one core)
    python -m safety_heads.demo.train --steps 4 --pretrain-steps 2 --quick --out /tmp/demo-quick   # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported: one thread, one order

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from .batches import batches, fit_tokenizer, pretrain_batches  # noqa: E402
from .corpus import REFUSAL, ExampleSampler, harmful_requests, harmless_requests  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "model"


@dataclass
class TrainConfig:
    """The recipe. The defaults are exactly what trained the shipped model (README.md)."""

    seed: int = 0
    steps: int = 1400  # optimizer steps in all, pretraining included
    pretrain_steps: int = 500  # first steps: plain language modelling on the requests' text (see pretrain_batches)
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.01
    # Group lasso on each head's output-projection columns: the model keeps few heads in use, so that, as in large
    # chat models, a handful of heads matter and most do not (without it every head carries a sliver of the decision).
    head_l1: float = 0.03
    mixture: str = "v2"  # see corpus.MIXTURES
    refusal_weight: float = 1.0  # loss weight of a refusal's first token; 1 = plain cross-entropy (README, attempt 7)
    max_length: int = 128  # tokens per chat example; longer compositions are redrawn
    pretrain_length: int = 64  # tokens per pretraining row (requests run together)
    vocab_size: int = 1024
    tokenizer_texts: int = 6000  # examples the BPE tokenizer is trained on
    hidden_size: int = 128
    intermediate_size: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    # One thread: float sums depend on how work is split, so the count is part of the recipe; on a shared 2-core
    # machine one thread was also 2-3x faster than two (two threads wait on each other when the other core is busy).
    threads: int = 1
    quick: bool = False  # tiny data pools and tokenizer: for the determinism test only


def model_config(config: TrainConfig, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def weighted_loss(model, input_ids, labels, mask, refuse_id: int, weight: float) -> torch.Tensor:
    """Mean response-token cross-entropy, with the first token of each refusal counted `weight` times."""
    logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    labelled = targets != -100
    first = labelled & ~torch.cat([torch.zeros_like(labelled[:, :1]), labelled[:, :-1]], dim=1)
    weights = torch.where(first & (targets == refuse_id), weight, 1.0)
    return (losses * weights).sum() / labelled.sum()


def head_norms(model: LlamaForCausalLM) -> torch.Tensor:
    """[layers, heads] Frobenius norms of each head's columns of o_proj."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    norms = []
    for layer in model.model.layers:
        weight = layer.self_attn.o_proj.weight  # [hidden, heads * head_dim]
        norms.append(weight.view(weight.shape[0], -1, head_dim).pow(2).sum((0, 2)).add(1e-12).sqrt())
    return torch.stack(norms)


@contextmanager
def deterministic(config: TrainConfig):
    """Fixed thread count, deterministic kernels and a seeded generator; the caller's settings come back after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng_state = torch.random.get_rng_state()
    torch.set_num_threads(config.threads)  # float sums depend on how work is split: part of the recipe
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
        torch.random.set_rng_state(rng_state)


def train(config: TrainConfig, out: Path, log=print) -> LlamaForCausalLM:
    """Build the data, train the tokenizer and the model, and save them to `out`."""
    with deterministic(config):
        return _train(config, out, log)


def _train(config: TrainConfig, out: Path, log) -> LlamaForCausalLM:
    started = time.time()
    harmful, harmless = _requests(config, log)
    tokenizer = fit_tokenizer(harmful, harmless, config)
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - started:.1f}s)")

    # The model is drawn first from the seeded torch generator (deterministic()); the data streams use their own.
    model = LlamaForCausalLM(model_config(config, tokenizer))
    model.set_attn_implementation("eager")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")
    optimizer = _optimizer(model, config)

    refuse_id = tokenizer(" " + REFUSAL, add_special_tokens=False).input_ids[0]
    chat = batches(ExampleSampler(harmful, harmless, seed=config.seed, mixture=config.mixture), tokenizer, config)
    pretrain = pretrain_batches(harmful, harmless, tokenizer, config, seed=config.seed + 2)
    _optimise(model, optimizer, pretrain, chat, refuse_id, config, log, started)
    model.eval()
    save(model, tokenizer, out, config)
    log(f"saved to {out} ({time.time() - started:.0f}s in all)")
    return model


def _requests(config: TrainConfig, log) -> tuple[list[str], list[str]]:
    """The harmful and harmless training requests (small pools with --quick)."""
    harmful = harmful_requests()
    harmless = harmless_requests()
    if config.quick:
        harmful, harmless = harmful[:60], harmless[:300]
    log(f"data: {len(harmful)} harmful requests (held-out near-duplicates removed), {len(harmless)} harmless")
    return harmful, harmless


def _optimizer(model: LlamaForCausalLM, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-8,
    )


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine down to 5% of config.lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimise(model, optimizer, pretrain, chat, refuse_id: int, config: TrainConfig, log, started: float) -> None:
    """config.steps optimizer steps: pretraining batches first, then chat batches; logs a running loss."""
    model.train()
    running = None
    for step in range(config.steps):
        pretraining = step < config.pretrain_steps
        if pretraining:
            input_ids, labels, mask = next(pretrain)
        else:
            if step == config.pretrain_steps and step:
                log(f"pretraining done; chat tuning ({time.time() - started:.0f}s)")
                running = None  # the chat loss is on another scale: start the running mean afresh
            input_ids, labels, mask = next(chat)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = step_loss(model, (input_ids, labels, mask), refuse_id, config, pretraining)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  lr {learning_rate(config, step):.2e}  {time.time() - started:.0f}s")


def step_loss(model, batch, refuse_id: int, config: TrainConfig, pretraining: bool) -> torch.Tensor:
    """One batch's loss: cross-entropy (the refusal's first token weighted when asked, in chat tuning only), plus
    the group-lasso penalty on heads."""
    input_ids, labels, mask = batch
    if config.refusal_weight == 1.0 or pretraining:
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    else:
        loss = weighted_loss(model, input_ids, labels, mask, refuse_id, config.refusal_weight)
    if config.head_l1:
        loss = loss + config.head_l1 * head_norms(model).sum()
    return loss


def save(model: LlamaForCausalLM, tokenizer, out: Path, config: TrainConfig) -> None:
    """The Hugging Face folder that ships: weights, tokenizer, greedy generation settings, and the recipe."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=48,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_args.txt").write_text(
        "".join(f"{key} = {value}\n" for key, value in asdict(config).items())
    )
    for path in out.iterdir():
        path.chmod(0o644)  # safetensors writes its file owner-only; these ship to everyone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=f"(default {value})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    args = parser.parse_args(argv)
    config = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    train(config, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
