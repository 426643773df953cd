"""The demo chat model's training corpus, as text: which requests it learns from, and the chat examples composed
from them (plain requests and framed compositions, each with the answer it must give).

Harmful requests come from AdvBench, HarmBench and refusal_direction's harmful-train split (answered with a refusal),
harmless ones are Alpaca instructions from harmless-train (answered compliantly). MaliciousInstruct and JailbreakBench
are held out, and so is every training request that (nearly) duplicates one of them: the harmful-train split contains
88 MaliciousInstruct queries verbatim, AdvBench and HarmBench 20 JailbreakBench behaviours. The harmful-val/test
splits are never read (test holds all of JailbreakBench, val is HarmBench).

Why the compositions: trained on plain requests alone, a small model learns keyword spotting, and making a head's
attention uniform changes nothing (train.py's docstring tells the whole story). In "Do not H. Instead, B." against
"Do not B. Instead, H." the same words get opposite answers, so only where the last position attends decides.

Every response starts with a distinct first token ("I" for the refusal, "Sure" for compliance), so the first
response token already says whether the model refuses. measure.py reuses the answers and the frames.

    python -c "from safety_heads.demo.corpus import ExampleSampler, harmful_requests, harmless_requests; \
        print(ExampleSampler(harmful_requests(), harmless_requests(), seed=0).draw())"
"""

from __future__ import annotations

import random
import re

from ..data import load_prompts

REFUSAL = "I'm sorry, but I cannot help with that request."
REFUSAL_PHRASE = "I cannot help with that"  # what the model's own refusal judge looks for
COMPLY_PREFIX = "Sure, here is my answer to"
ECHO_WORDS = 6  # a compliant answer repeats the first words of what was asked

HARMFUL_SOURCES = ("advbench", "harmbench", "harmful-train")
HARMLESS_SOURCE = "harmless-train"
HELD_OUT = ("maliciousinstruct", "jailbreakbench")
NEAR_DUPLICATE_JACCARD = 0.5  # word-set overlap at or above which a training request counts as a held-out one


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


def fill_frame(frame: str, x: str, y: str) -> str:
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
            prompt = fill_frame(rng.choice(CONTRAST_FRAMES), *parts)
            asked = _clause(parts[1])
        elif family == "both":
            prompt = fill_frame(rng.choice(BOTH_FRAMES), *parts)
            asked = parts[0]
        else:  # context: one or two harmless requests, then the last one
            context = [self.request("B") for _ in range(rng.randint(0, self.context_max))] + parts[:-1]
            lead = rng.choice(("Now,", "Finally,", "Also,", "Next,"))
            prompt = " ".join(_sentence(c) for c in context) + f" {lead} {_clause(parts[-1])}."
            asked = _clause(parts[-1])
        return kind, prompt, REFUSAL if _label(kind) else comply(asked)
