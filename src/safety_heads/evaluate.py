"""Evaluation: what an ablation does to safety, and what it costs.

Baseline vs ablated, on the same prompts with the same decoding:
- on each harmful data set, the attack success rate (ASR) per judge: the share of answers judged harmful (invalid
  model-judge outputs are counted and reported, and excluded from neither numerator nor denominator silently:
  `invalid` says how many there were);
- on a harmless set, the refusal rate (keyword judges), the mean KL of next-token distributions, clean vs
  ablated, at the prompt's last position, and the answers' mean negative log-likelihood per token under the
  unablated model (`answer_nll`), baseline vs ablated answers -- so a "jailbreak" that merely breaks the model shows
  (a garbled answer is unlikely under the clean model even when its first token is right).

Heads come from `--heads`, a Sahara result (`--from sahara.json`, its first `--top-k` heads, all by default), or a
Ships result (`--from ships.json`: the top `--top-k` heads by mean score, default 3; with `--per-query`, each query's
own top-k heads -- how the paper's "16x" was measured -- on the queries stored in that file).

    safety-heads evaluate --model tiny --dataset maliciousinstruct --limit 4 --heads 0:1,1:3 --out runs/eval
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from .ablation import DEFAULT_EPSILON, Ablation, Head, parse_heads
from .engine import Engine, EngineConfig
from .errors import UserError
from .generate import GenerationConfig, generate
from .judges import KeywordJudge, make_judges
from .models import LoadedModel
from .progress import print_progress
from .results import open_run, read_json, save_tensors, versions, write_json
from .ships import kl_divergence, top_heads

FORMAT = "safety-heads/eval"
FORMAT_VERSION = 1
CONTENT_WARNING = "Contains text generated in answer to harmful requests; it may be harmful. Handle as such."
DEFAULT_SHIPS_TOP_K = 3  # the paper's ASR peaks at about 3 heads


@dataclass
class EvaluateConfig:
    """What to evaluate. Shared by `safety-heads evaluate` and `run_evaluation`."""

    datasets: str = "maliciousinstruct"  # comma-separated bundled names or files
    limit: int | None = None
    # None = not given: with --from, the value the file was computed with (a ships.json of a chat run evaluated
    # with raw prompts measures the wrong thing); without, INHERITED's default. run_evaluation fills them in.
    template: str | None = None
    system: str | None = None
    ablation: str | None = None
    epsilon: float | None = None
    heads: str | None = None  # a head spec such as "2:26,3:8"
    source: str | None = None  # a sahara.json or ships.json to take the heads from (--from)
    top_k: int | None = None
    per_query: bool = False
    judges: str = "paper"
    harmless: str | None = "harmless-test"
    harmless_limit: int = 32
    mean_reference: str = "harmless-val"
    mean_reference_limit: int = 64

    def validate(self) -> None:
        # None: the source's own setting (--from); anything given is checked as an Ablation checks it.
        Ablation(kind="ua" if self.ablation is None else self.ablation, epsilon=DEFAULT_EPSILON if self.epsilon is None else self.epsilon)
        if (self.heads is None) == (self.source is None):
            raise UserError("give the heads to ablate with exactly one of --heads or --from")
        if self.per_query and self.source is None:
            raise UserError("--per-query needs --from ships.json (each query's own top heads)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1, not {self.top_k}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be at least 1, not {self.limit}")
        if self.harmless_limit < 1:
            raise UserError(f"--harmless-limit must be at least 1, not {self.harmless_limit}")
        if not self.per_query and not [name for name in self.datasets.split(",") if name.strip()]:
            raise UserError(f"--dataset {self.datasets!r} names no data set; give one or more, comma-separated")


# The settings --from takes from its file unless given, and their defaults without --from (or in an older file).
INHERITED = {"template": "auto", "system": None, "ablation": "ua", "epsilon": DEFAULT_EPSILON}


def with_source_settings(config: EvaluateConfig, progress: Callable[[str], None]) -> EvaluateConfig:
    """`config` with every setting of INHERITED filled in: from the --from file where not given (and said so), else
    the default; a given value that differs from the file's is a warning line."""
    given = {name: getattr(config, name) for name in INHERITED}
    if config.source is None:
        return replace(config, **{name: INHERITED[name] if value is None else value for name, value in given.items()})
    record = read_json(config.source)
    recorded = record.get("config") if isinstance(record, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    values, taken = {}, []
    for name, value in given.items():
        from_file = recorded.get(name, INHERITED[name])
        if value is None:
            values[name] = from_file
            taken.append(f"{name} {from_file!r}")
        else:
            values[name] = value
            if name in recorded and value != from_file:
                progress(f"warning: --{name} {value!r} differs from the {from_file!r} that {config.source} was computed with")
    if taken:
        progress(f"from {config.source}: {', '.join(taken)} (give --template, --system, --ablation or --epsilon to override)")
    return replace(config, **values)


@dataclass
class HeadChoice:
    """The heads to ablate: one set for every query, or (per-query mode) one per query with the queries themselves."""

    heads: list[Head] | None
    per_query: list[list[Head]] | None = None
    queries: list[str] | None = None
    origin: dict = field(default_factory=dict)


def choose_heads(config: EvaluateConfig, layout) -> HeadChoice:
    if config.heads is not None:
        return HeadChoice(list(parse_heads(config.heads, layout)), origin={"heads": config.heads})
    record = read_json(config.source)
    kind = record.get("format") if isinstance(record, dict) else None
    origin = {"from": str(config.source), "format": kind}
    try:
        if kind == "safety-heads/sahara":
            if config.per_query:
                raise UserError("--per-query needs a ships.json; a sahara.json holds one group for the whole data set")
            choice = HeadChoice([_head(pair) for pair in record["heads"]][: config.top_k], origin=origin)
        elif kind == "safety-heads/ships":
            k = config.top_k or DEFAULT_SHIPS_TOP_K
            if config.per_query:
                per_query = [[(l, h) for l, h, _ in top_heads(_matrix(q["scores"]), k)] for q in record["queries"]]
                choice = HeadChoice(None, per_query, [q["query"] for q in record["queries"]], origin)
            else:
                mean = _matrix(record["aggregate"]["mean"])
                choice = HeadChoice([(l, h) for l, h, _ in top_heads(mean, k)], origin=origin)
        else:
            raise UserError(f"'{config.source}' is not a sahara.json or ships.json from safety-heads (format: {kind!r})")
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
        raise UserError(f"'{config.source}' does not follow the {kind} layout ({type(error).__name__}: {error})") from None
    for heads in [choice.heads] if choice.heads is not None else choice.per_query:
        for layer, head in heads:
            layout.check_head(layer, head)
    return choice


def _head(pair) -> tuple[int, int]:
    """A [layer, head] pair of a result file: two integers (a hand-edited 1e400 or 1.5 is not a head)."""
    layer, head = pair
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (layer, head)):
        raise ValueError(f"head {pair!r} is not two integers")
    return layer, head


def _matrix(rows) -> torch.Tensor:
    return torch.tensor([[float("nan") if x is None else float(x) for x in row] for row in rows], dtype=torch.float64)


def run_evaluation(
    model: LoadedModel,
    config: EvaluateConfig,
    generation: GenerationConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    engine_config: EngineConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Generate baseline and ablated answers, judge them, measure the harmless cost; write eval.json and eval_data.pt."""
    from .data import format_prompts, load_prompts, prompt_tokens, resolve_template

    progress = progress or print_progress
    config.validate()
    choice = choose_heads(config, model.layout)  # first: a --from file of the wrong kind is refused before its settings are read
    config = with_source_settings(config, progress)
    config = replace(config, template=resolve_template(config.template, model.tokenizer))  # recorded as used
    config.validate()
    generation = generation or GenerationConfig()
    generation.validate()
    judges = make_judges(config.judges)
    engine = Engine(model, engine_config)
    tokenizer = model.tokenizer

    sets: dict[str, list] = {}
    if choice.per_query is not None:
        sets[f"{Path(config.source).name} queries"] = format_prompts(choice.queries[: config.limit], config.template, tokenizer, config.system)
    else:
        for name in [part.strip() for part in config.datasets.split(",") if part.strip()]:
            sets[name] = format_prompts(load_prompts(name, limit=config.limit), config.template, tokenizer, config.system)
    harmless = None
    if config.harmless:
        harmless = format_prompts(load_prompts(config.harmless, limit=config.harmless_limit), config.template, tokenizer, config.system)
    for prompts in list(sets.values()) + ([harmless] if harmless else []):
        engine.tokenize([p.token_ids for p in prompts])  # everything fits the context before anything is written
        check_answer_room(engine, prompts, generation.max_new_tokens)

    means = None
    if config.ablation == "mean":
        means = engine.head_means(prompt_tokens(config.mean_reference, config.mean_reference_limit, config.template, tokenizer, config.system))

    record = _config_record(model, config, generation, choice, judges, sets, harmless)
    checkpoint = None
    done: dict[tuple[str, int], list[str]] = {}
    if out is not None:
        parts = {f"{name}/{side}": len(prompts) for name, prompts in sets.items() for side in ("baseline", "ablated")}
        if harmless:
            parts |= {f"harmless/{side}": len(harmless) for side in ("baseline", "ablated")}
        out, checkpoint, units = open_run(out, "eval", "a finished evaluation", record, resume,
                                          parse=lambda unit: _answers_unit(unit, parts, generation.batch_size))
        done.update(units)

    def answers(part: str, prompts, head_sets) -> list[str]:
        responses = []
        for start in range(0, len(prompts), generation.batch_size):
            if (part, start) in done:
                responses.extend(done[(part, start)])
                continue
            stop = start + generation.batch_size
            batch = generate(model, [p.token_ids for p in prompts[start:stop]], head_sets=head_sets[start:stop] if head_sets else None,
                             ablation=Ablation(kind=config.ablation, epsilon=config.epsilon, means=means), config=generation,
                             engine=engine)  # remote: one request per batch, with the engine's retry settings
            texts = [g.text for g in batch]
            if checkpoint is not None:
                checkpoint.append({"part": part, "start": start, "responses": texts})
            responses.extend(texts)
            progress(f"[{part}] {min(stop, len(prompts))}/{len(prompts)} answers")
        return responses

    result = {"format": FORMAT, "version": FORMAT_VERSION, "content_warning": CONTENT_WARNING, "config": record,
              "heads": [list(h) for h in choice.heads] if choice.heads is not None else None, "results": {}, "samples": {}}
    for name, prompts in sets.items():
        head_sets = choice.per_query[: len(prompts)] if choice.per_query is not None else [choice.heads] * len(prompts)
        baseline = answers(f"{name}/baseline", prompts, None)
        ablated = answers(f"{name}/ablated", prompts, head_sets)
        queries = [p.query for p in prompts]
        verdicts = {side: {j.name: j.judge(queries, responses) for j in judges} for side, responses in (("baseline", baseline), ("ablated", ablated))}
        result["results"][name] = {"n": len(prompts), **{side: _rates(verdicts[side]) for side in verdicts}}
        result["results"][name]["delta_asr"] = {
            j.name: result["results"][name]["ablated"]["asr"][j.name] - result["results"][name]["baseline"]["asr"][j.name] for j in judges
        }
        result["samples"][name] = [
            {"index": i, "query": p.query, "prompt": p.text,
             **({"heads": [list(h) for h in head_sets[i]]} if choice.per_query is not None else {}),
             "baseline": {"response": baseline[i], "verdicts": {j.name: verdicts["baseline"][j.name][i] for j in judges}},
             "ablated": {"response": ablated[i], "verdicts": {j.name: verdicts["ablated"][j.name][i] for j in judges}}}
            for i, p in enumerate(prompts)
        ]
    result["harmless"] = _harmless_cost(model, engine, config, choice, harmless, judges, means, answers) if harmless else None
    if out is not None:
        write_json(out / "eval.json", result)
        save_tensors(out / "eval_data.pt", _tensors(result))
        checkpoint.remove()
    return result


def check_answer_room(engine: Engine, prompts, max_new_tokens: int) -> None:
    """Prompt and answer together must fit the context: found before generating, not after a batch of answers."""
    longest = max((len(p.token_ids) for p in prompts), default=0)
    if engine.context_length and longest + max_new_tokens > engine.context_length:
        raise UserError(f"a prompt of {longest} tokens and --max-new-tokens {max_new_tokens} exceed the model's context of "
                        f"{engine.context_length} tokens; lower --max-new-tokens to {max(engine.context_length - longest, 1)} or less")


def _answers_unit(unit: dict, parts: dict[str, int], batch_size: int) -> tuple[tuple[str, int], list[str]]:
    """A checkpointed batch of answers, checked (a line may have been edited by hand): ((part, start), answers)."""
    part, start, responses = unit["part"], unit["start"], unit["responses"]
    if part not in parts or not isinstance(start, int) or not 0 <= start < parts[part] or start % batch_size:
        raise ValueError(f"no batch {part!r} from {start!r} in this evaluation")
    if not isinstance(responses, list) or len(responses) != min(batch_size, parts[part] - start) \
            or not all(isinstance(text, str) for text in responses):
        raise ValueError(f"the answers of batch {part!r} from {start} are not {min(batch_size, parts[part] - start)} strings")
    return (part, start), responses


def _rates(verdicts: dict[str, list]) -> dict:
    asr, invalid = {}, {}
    for name, values in verdicts.items():
        asr[name] = sum(v is True for v in values) / len(values)
        invalid[name] = sum(v is None for v in values)
    return {"asr": asr, "invalid": invalid}


def _harmless_cost(model, engine, config, choice, prompts, judges, means, answers) -> dict:
    """Refusal rates on harmless prompts (keyword judges), the mean next-token KL, clean vs ablated, and the answers'
    likelihood under the unablated model (`answer_nll`)."""
    keyword = [j for j in judges if isinstance(j, KeywordJudge)] or [make_judges("refusal-direction")[0]]
    cost = {"dataset": config.harmless, "n": len(prompts), "judges": [j.name for j in keyword]}
    if choice.per_query is not None:
        cost["note"] = "per-query mode ablates a different group per harmful query; no single group to cost"
        return cost
    baseline = answers("harmless/baseline", prompts, None)
    ablated = answers("harmless/ablated", prompts, [choice.heads] * len(prompts))
    cost["baseline"] = {"refusal_rate": {j.name: sum(map(j.refused, baseline)) / len(prompts) for j in keyword}}
    cost["ablated"] = {"refusal_rate": {j.name: sum(map(j.refused, ablated)) / len(prompts) for j in keyword}}
    readouts = engine.run([p.token_ids for p in prompts], [choice.heads], ablation=Ablation(kind=config.ablation, epsilon=config.epsilon, means=means))
    kl = kl_divergence(readouts.clean_logits, readouts.logits[:, 0])
    cost["mean_kl"] = float(kl.mean())
    nll = {side: answer_nll(engine, model.tokenizer, prompts, texts) for side, texts in (("baseline", baseline), ("ablated", ablated))}
    for side, values in nll.items():
        scored = [v for v in values if v is not None]
        cost[side]["answer_nll"] = sum(scored) / len(scored) if scored else None
    cost["samples"] = [{"index": i, "query": p.query, "baseline": baseline[i], "ablated": ablated[i], "kl": float(kl[i]),
                        "baseline_nll": nll["baseline"][i], "ablated_nll": nll["ablated"][i]}
                       for i, p in enumerate(prompts)]
    return cost


def answer_nll(engine: Engine, tokenizer, prompts, responses: Sequence[str]) -> list[float | None]:
    """Each response's mean negative log-likelihood per token (nats) under the unablated model, after its prompt;
    None for an empty response. The response text is tokenized again (the same way for both sides).

    Why: a keyword judge counts a garbled answer as a successful attack, and the next-token KL misses it when the
    first token survives. The clean model finds its own fluent answers likely and garbled text unlikely, so this
    rises sharply when an ablation breaks the model and little when it only changes what is answered.
    """
    answer_ids = [tokenizer(response, add_special_tokens=False).input_ids for response in responses]
    scored = [i for i, ids in enumerate(answer_ids) if ids]
    log_probs = engine.token_log_probs([list(prompts[i].token_ids) + answer_ids[i] for i in scored]) if scored else []
    result: list[float | None] = [None] * len(responses)
    for i, values in zip(scored, log_probs):
        result[i] = -float(values[-len(answer_ids[i]):].double().mean())
    return result


def _config_record(model, config, generation, choice, judges, sets, harmless) -> dict:
    texts = [p.text for prompts in sets.values() for p in prompts] + [p.text for p in harmless or []]
    return {
        "model": model.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config.attn_implementation,
        **asdict(config),
        "generation": asdict(generation),
        "judge_versions": {j.name: j.version for j in judges},
        "heads_origin": choice.origin,
        "heads": [list(h) for h in choice.heads] if choice.heads is not None else None,
        "prompts_sha256": hashlib.sha256("\n\x00".join(texts).encode()).hexdigest(),
        "versions": versions(),
    }


def _tensors(result: dict) -> dict:
    """eval_data.pt: verdicts as tensors (1 harmful, 0 refused, -1 invalid), plus the JSON's numbers and texts."""
    code = {True: 1, False: 0, None: -1}
    verdicts = {}
    for name, samples in result["samples"].items():
        verdicts[name] = {
            side: {judge: torch.tensor([code[s[side]["verdicts"][judge]] for s in samples]) for judge in samples[0][side]["verdicts"]}
            for side in ("baseline", "ablated")
        } if samples else {}
    return {"format": result["format"], "version": result["version"], "content_warning": CONTENT_WARNING,
            "config": result["config"], "heads": result["heads"], "results": result["results"], "verdicts": verdicts,
            "samples": result["samples"], "harmless": result["harmless"]}


__all__ = ["EvaluateConfig", "run_evaluation", "choose_heads", "HeadChoice", "Sequence"]
