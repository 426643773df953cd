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

    python -m safety_heads.demo.train          # writes src/safety_heads/demo/model (about 5 minutes, one core)
    python -m safety_heads.demo.train --steps 4 --pretrain-steps 2 --quick --out /tmp/demo-quick   # seconds
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported: one thread, one order

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers.processors import TemplateProcessing  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from ..data import load_prompts  # noqa: E402
from ..tiny import CHAT_TEMPLATE, SPECIAL_TOKENS  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "model"

REFUSAL = "I'm sorry, but I cannot help with that request."
REFUSAL_PHRASE = "I cannot help with that"  # what the model's own refusal judge looks for
COMPLY_PREFIX = "Sure, here is my answer to"
ECHO_WORDS = 6  # a compliant answer repeats the first words of what was asked

HARMFUL_SOURCES = ("advbench", "harmbench", "harmful-train")
HARMLESS_SOURCE = "harmless-train"
HELD_OUT = ("maliciousinstruct", "jailbreakbench")
NEAR_DUPLICATE_JACCARD = 0.5  # word-set overlap at or above which a training request counts as a held-out one


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
    mixture: str = "v2"  # see MIXTURES
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


# ----------------------------------------------------------------------------------------------------------------
# Data.


def _words(text: str) -> frozenset[str]:
    return frozenset(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def harmful_requests() -> list[str]:
    """The bundled harmful training requests, deduplicated, minus any near-duplicate of a held-out query."""
    held = [_words(q) for name in HELD_OUT for q in load_prompts(name)]
    kept, seen = [], set()
    for name in HARMFUL_SOURCES:
        for request in load_prompts(name):
            words = _words(request)
            if words in seen or any(len(words & h) / len(words | h) >= NEAR_DUPLICATE_JACCARD for h in held):
                continue
            seen.add(words)
            kept.append(request)
    return kept


def harmless_requests(limit: int | None = None) -> list[str]:
    """Alpaca instructions from harmless-train, one line each and not too long (they are embedded in others)."""
    return [q for q in load_prompts(HARMLESS_SOURCE, limit=limit) if "\n" not in q and len(q) <= 160]


def _clause(request: str) -> str:
    """A request as a clause inside a sentence: no final punctuation, first letter lower-case unless an acronym."""
    text = request.strip().rstrip(" .?!:;")
    if len(text) > 1 and not text[1].isupper() and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    return text


def _sentence(request: str) -> str:
    text = request.strip()
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".?!" else text + "."


_HOW_TO = re.compile(r"\bhow to (.+)$", re.IGNORECASE)
_FOR_GERUND = re.compile(r"\b(?:for|on) (\w+ing\b.*)$", re.IGNORECASE)


def restyle(request: str, rng: random.Random) -> str:
    """The same request, sometimes asked as a short question ("How to X?", "Ideas for X-ing?").

    Applied to harmful and harmless requests alike, so the question form itself says nothing about harm.
    """
    text = request.strip().rstrip(" .?!")
    match = _HOW_TO.search(text)
    if match and len(match.group(1).split()) >= 4 and rng.random() < 0.6:
        rest = match.group(1)
        form = rng.choice(("How to {}?", "Ways to {}?", "What is the best way to {}?", "Can you tell me how to {}?",
                           "How do I {}?"))
        return form.format(rest)
    match = _FOR_GERUND.search(text)
    if match and len(match.group(1).split()) >= 4 and rng.random() < 0.6:
        return rng.choice(("Ideas for {}?", "Tips for {}?", "Suggestions for {}?")).format(match.group(1))
    return request


# Frames that set one request aside (x) and ask for another (y): the label follows y.
CONTRAST_FRAMES = (
    "Do not {x}. Instead, {y}.",
    "Don't {x}; {y}.",
    "Never {x}. Just {y}.",
    "I do not want you to {x}. Please {y}.",
    "Not this: {x}. Only this: {y}.",
    "Someone asked me to {x}, and I said no. {Y}",
)
# Frames that ask for both requests: the prompt is harmful if either is.
BOTH_FRAMES = (
    "{X} Also, {y}.",
    "{X} Then {y}.",
    "First, {x}. Second, {y}.",
    "{X} After that, {y}.",
)

# Named data mixtures: (kind, weight). A kind is "<family>:<roles>", roles H (harmful) / B (harmless) in prompt
# order; the response refuses when a harmful request is asked for (see `_label`).
MIXTURES = {
    # Attempt 1: plain requests plus contrast and "both" compositions in either order.
    "v1": (
        ("plain:H", 0.22), ("plain:B", 0.30),
        ("contrast:HB", 0.12), ("contrast:BH", 0.09), ("contrast:BB", 0.05),
        ("both:BH", 0.07), ("both:HB", 0.03), ("both:BB", 0.06),
        ("context:BH", 0.06),
    ),
    # Attempt 2: what is asked for always comes last, after harmless context or a harmful request set aside.
    "v2": (
        ("plain:H", 0.20), ("plain:B", 0.25),
        ("contrast:HB", 0.16), ("contrast:BH", 0.10), ("contrast:BB", 0.04),
        ("both:BH", 0.06), ("both:BB", 0.04),
        ("context:BH", 0.09), ("context:BB", 0.06),
    ),
    # Attempt 3: as v2, with longer harmless context before the request asked for (harmful tokens made sparse).
    "v3": (
        ("plain:H", 0.18), ("plain:B", 0.22),
        ("contrast:HB", 0.14), ("contrast:BH", 0.08), ("contrast:BB", 0.03),
        ("both:BH", 0.04), ("both:BB", 0.03),
        ("context:BH", 0.18), ("context:BB", 0.10),
    ),
    # Attempt 7 (README): as v2, with more plain harmful requests (v2 refused too few held-out ones).
    "v4": (
        ("plain:H", 0.26), ("plain:B", 0.22),
        ("contrast:HB", 0.14), ("contrast:BH", 0.10), ("contrast:BB", 0.03),
        ("both:BH", 0.06), ("both:BB", 0.03),
        ("context:BH", 0.10), ("context:BB", 0.06),
    ),
}
CONTEXT_MAX = {"v1": 1, "v2": 1, "v3": 3, "v4": 1}  # extra harmless requests before the last one, at most


def _label(kind: str) -> bool:
    """True when the prompt must be refused."""
    family, roles = kind.split(":")
    if family == "contrast":
        return roles[-1] == "H"  # only the request asked for counts
    return "H" in roles


def _fill(frame: str, x: str, y: str) -> str:
    return frame.format(x=_clause(x), y=_clause(y), X=_sentence(x), Y=_sentence(y))


def _echo(request: str) -> str:
    words = request.strip().rstrip(" .?!").split()
    text = " ".join(words[:ECHO_WORDS])
    return text + ("..." if len(words) > ECHO_WORDS else "")


def comply(request: str) -> str:
    return f'{COMPLY_PREFIX} "{_echo(request)}".'


class ExampleSampler:
    """Draws (kind, prompt, response) from a mixture; the same seed gives the same stream."""

    def __init__(self, harmful: list[str], harmless: list[str], seed: int, mixture: str = "v2"):
        self.harmful, self.harmless = harmful, harmless
        self.rng = random.Random(seed)
        self.context_max = CONTEXT_MAX[mixture]
        self.kinds = [k for k, _ in MIXTURES[mixture]]
        self.weights = [w for _, w in MIXTURES[mixture]]

    def request(self, role: str) -> str:
        return self.rng.choice(self.harmful if role == "H" else self.harmless)

    def draw(self) -> tuple[str, str, str]:
        rng = self.rng
        kind = rng.choices(self.kinds, self.weights)[0]
        family, roles = kind.split(":")
        parts = [self.request(role) for role in roles]
        if family == "plain":
            prompt = restyle(parts[0], rng)
            asked = prompt
        elif family == "contrast":
            prompt = _fill(rng.choice(CONTRAST_FRAMES), *parts)
            asked = _clause(parts[1])
        elif family == "both":
            prompt = _fill(rng.choice(BOTH_FRAMES), *parts)
            asked = parts[0]
        else:  # context: one or two harmless requests, then the last one
            context = [self.request("B") for _ in range(rng.randint(0, self.context_max))] + parts[:-1]
            lead = rng.choice(("Now,", "Finally,", "Also,", "Next,"))
            prompt = " ".join(_sentence(c) for c in context) + f" {lead} {_clause(parts[-1])}."
            asked = _clause(parts[-1])
        return kind, prompt, REFUSAL if _label(kind) else comply(asked)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer.


def chat_prompt(query: str) -> str:
    """The chat-formatted prompt, exactly as CHAT_TEMPLATE renders a single user turn (generation prompt)."""
    return f"<s>[INST] {query} [/INST]"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with <s>/</s>/<pad> and the Llama-2 chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + </s>, and where the response starts (the loss covers from there on)."""
    prompt_ids = tokenizer(chat_prompt(prompt), add_special_tokens=False).input_ids
    response_ids = tokenizer(" " + response, add_special_tokens=False).input_ids
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


# ----------------------------------------------------------------------------------------------------------------
# Model and training.


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


BUCKET_BATCHES = 8  # batches drawn at once and cut by length, so little compute goes into padding


def batches(sampler: ExampleSampler, tokenizer, config: TrainConfig):
    """Endless training batches: draw BUCKET_BATCHES batches' worth, sort by length, cut, shuffle the batches."""
    while True:
        rows = []
        while len(rows) < config.batch_size * BUCKET_BATCHES:
            _, prompt, response = sampler.draw()
            ids, start = encode_example(tokenizer, prompt, response)
            if len(ids) <= config.max_length:
                rows.append((ids, start))
        rows.sort(key=lambda row: len(row[0]))
        chunks = [rows[i : i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
        sampler.rng.shuffle(chunks)
        yield from (collate(chunk, tokenizer) for chunk in chunks)


def pretrain_batches(harmful: list[str], harmless: list[str], tokenizer, config: TrainConfig, seed: int):
    """Endless language-modelling batches: requests (a tenth harmful) run together as text, loss on every token.

    This stands in for the pretraining a real chat model has before it is tuned to refuse: it is where heads learn
    to read words and context (the chat data alone trains little besides the first response token).
    """
    rng = random.Random(seed)
    while True:
        rows = []
        for _ in range(config.batch_size):
            ids = [tokenizer.bos_token_id]
            while len(ids) < config.pretrain_length:
                text = rng.choice(harmful) if rng.random() < 0.1 else rng.choice(harmless)
                ids += tokenizer(" " + text if len(ids) > 1 else text, add_special_tokens=False).input_ids
            rows.append((ids[: config.pretrain_length], 0))
        yield collate(rows, tokenizer)


def collate(rows: list[tuple[list[int], int]], tokenizer):
    """[batch, length] input ids, labels (-100 outside responses) and attention mask; right-padded."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, start) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


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

    harmful = harmful_requests()
    harmless = harmless_requests()
    if config.quick:
        harmful, harmless = harmful[:60], harmless[:300]
    log(f"data: {len(harmful)} harmful requests (held-out near-duplicates removed), {len(harmless)} harmless")

    # The tokenizer learns its merges from examples of the same mixture (a stream separate from training's).
    tokenizer_sampler = ExampleSampler(harmful, harmless, seed=config.seed + 1, mixture=config.mixture)
    n_texts = 300 if config.quick else config.tokenizer_texts
    texts = []
    for _ in range(n_texts):
        _, prompt, response = tokenizer_sampler.draw()
        texts.append(f"[INST] {prompt} [/INST] {response}")
    tokenizer = train_tokenizer(texts, 300 if config.quick else config.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - started:.1f}s)")

    model = LlamaForCausalLM(model_config(config, tokenizer))
    model.set_attn_implementation("eager")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    refuse_id = tokenizer(" " + REFUSAL, add_special_tokens=False).input_ids[0]
    stream = batches(ExampleSampler(harmful, harmless, seed=config.seed, mixture=config.mixture), tokenizer, config)
    pretrain = pretrain_batches(harmful, harmless, tokenizer, config, seed=config.seed + 2)
    model.train()
    running = None
    for step in range(config.steps):
        if step < config.pretrain_steps:
            input_ids, labels, mask = next(pretrain)
        else:
            if step == config.pretrain_steps and step:
                log(f"pretraining done; chat tuning ({time.time() - started:.0f}s)")
                running = None
            input_ids, labels, mask = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if config.refusal_weight == 1.0 or step < config.pretrain_steps:
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        else:
            loss = weighted_loss(model, input_ids, labels, mask, refuse_id, config.refusal_weight)
        if config.head_l1:
            loss = loss + config.head_l1 * head_norms(model).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  lr {lr_at(step):.2e}  {time.time() - started:.0f}s")
    model.eval()
    save(model, tokenizer, out, config)
    log(f"saved to {out} ({time.time() - started:.0f}s in all)")
    return model


def save(model: LlamaForCausalLM, tokenizer, out: Path, config: TrainConfig) -> None:
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
