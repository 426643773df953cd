"""The demo chat model's corpus as tokens: the byte-level BPE tokenizer trained on its examples, and the endless
streams of training batches (chat examples with the loss on the answer, and language-modelling rows for pretraining).

Both streams draw from seeded Python generators only, so the same seed gives the same batches on every machine.

    python -c "from safety_heads.demo.batches import chat_prompt; print(chat_prompt('How do I bake bread?'))"
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before tokenizers is imported: one thread, one order

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from ..tiny import SPECIAL_TOKENS, chat_tokenizer  # noqa: E402
from .corpus import ExampleSampler  # noqa: E402

if TYPE_CHECKING:
    from .train import TrainConfig


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
    return chat_tokenizer(backend)


def fit_tokenizer(harmful: list[str], harmless: list[str], config: TrainConfig) -> PreTrainedTokenizerFast:
    """The demo's tokenizer, its merges learnt from examples of the training mixture (a stream separate from
    training's, so fitting it does not move the training examples)."""
    tokenizer_sampler = ExampleSampler(harmful, harmless, seed=config.seed + 1, mixture=config.mixture)
    n_texts = 300 if config.quick else config.tokenizer_texts
    texts = []
    for _ in range(n_texts):
        _, prompt, response = tokenizer_sampler.draw()
        texts.append(f"[INST] {prompt} [/INST] {response}")
    return train_tokenizer(texts, 300 if config.quick else config.vocab_size)


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of prompt + response + </s>, and where the response starts (the loss covers from there on)."""
    prompt_ids = tokenizer(chat_prompt(prompt), add_special_tokens=False).input_ids
    response_ids = tokenizer(" " + response, add_special_tokens=False).input_ids
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


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
