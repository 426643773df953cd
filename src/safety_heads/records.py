"""What a result records about how it was made: the model, every setting, the data's hash, library versions and
the compute it took. Methods put this in their results; a resumed run must match it exactly."""

from __future__ import annotations

import hashlib
from copy import deepcopy
from dataclasses import fields

import torch


def versions() -> dict[str, str]:
    """Library versions that change numbers: recorded in every result."""
    import nnsight
    import transformers

    from . import __version__

    return {
        "safety_heads": __version__,
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only loading refuses
        "transformers": transformers.__version__,
        "nnsight": nnsight.__version__,
    }


def run_record(model, config, queries, source: dict) -> dict:
    """Everything that determines a run's numbers (model, dtype, every config field, the data); a resumed run must
    match it exactly. `config` is any dataclass; `queries` are hashed, not stored."""
    digest = hashlib.sha256("\n\x00".join(queries).encode()).hexdigest()
    return {
        "model": model.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config.attn_implementation,
        **settings(config),
        **source,
        "n_queries": len(queries),
        "queries_sha256": digest,
    }


def settings(config) -> dict:
    """A config's fields as a result records them: flat, the nested ablation setting under the keys results have always
    used (AblationConfig.record: ablation, epsilon, mean_reference, mean_reference_limit), and without the fields that
    only say how work is batched, which change no number (metadata={"recorded": False})."""
    from .ablation import AblationConfig

    values = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if isinstance(value, AblationConfig):
            values |= value.record()
        elif item.metadata.get("recorded", True):
            values[item.name] = deepcopy(value)
    return values


def compute_record(flops: float, seconds: float) -> dict:
    """What a run's engine sweeps cost in this process: FLOPs (flops.py), the run's wall seconds, and the rate."""
    return {"engine_flops": flops, "seconds": seconds, "gflop_per_s": flops / seconds / 1e9 if seconds > 0 else None}


def source_name(source: dict | None) -> str | None:
    """'--dataset maliciousinstruct' for a run's recorded source, to name it in an error about one of its prompts."""
    dataset = (source or {}).get("dataset")
    return f"--dataset {dataset}" if dataset else None
