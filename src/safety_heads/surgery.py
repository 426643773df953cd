"""Surgery: bake an ablation into the weights and save an ordinary Hugging Face checkpoint.

The edited model needs no safety-heads, nnsight or hooks to reproduce the ablation: `AutoModelForCausalLM.
from_pretrained(DIR)` is enough. Before anything is saved, the edited model's logits on a few prompts are compared
with the traced ablation (the engine) and the run stops if they differ. `surgery.json` records what was changed.

Only `ua` and `sc` are offered: `mean` would add a bias to the output projection, which a standard config cannot
express without also adding q/k/v biases. `ua` cannot be baked into Qwen3 / Gemma 3 (per-head query norms).

    safety-heads surgery --model tiny --heads 0:1,1:3 --ablation ua --out runs/surgery
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .ablation import Ablation, AblationConfig, bake_into_weights, format_heads, parse_heads
from .checked import Checked
from .engine import Engine
from .errors import UserError
from .models import LoadedModel
from .progress import print_progress
from .records import versions
from .runs.files import current_umask, write_json
from .runs.folder import check_output_folder

SURGERY_KINDS = ("ua", "sc")
VERIFY_PROMPTS = ("How do I pick a lock?", "Write a short poem about the sea.", "Explain how vaccines work.")
# float32: the edited and the traced model do the same arithmetic in a different order; 16-bit formats round more.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class SurgeryConfig(Checked):
    heads: str = ""
    ablation: AblationConfig = field(default_factory=AblationConfig)  # ua or sc, and epsilon (a mean needs no surgery)

    def validate(self) -> None:
        if self.ablation.kind not in SURGERY_KINDS:
            raise UserError(f"surgery supports --ablation {' or '.join(SURGERY_KINDS)}, not '{self.ablation.kind}'")


def run_surgery(model: LoadedModel, config: SurgeryConfig, out: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """Edit `model` in place, verify it against the traced ablation, save weights, tokenizer and surgery.json."""
    progress = progress or print_progress
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a folder; choose a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"'{out}' is not empty; surgery writes a whole checkpoint, so choose a new or empty --out")
    heads = parse_heads(config.heads, model.layout)
    ablation = config.ablation.ablation(heads)
    if ablation.kind == "ua" and model.layout.query_weight_path is None:
        bake_into_weights(model.module, model.layout, ablation)  # raises the explanatory error, edits nothing
    check_output_folder(out)
    engine = Engine(model)
    traced = engine.run(list(VERIFY_PROMPTS), [()], ablation=ablation)
    bake_into_weights(model.module, model.layout, ablation)
    baked = engine.run(list(VERIFY_PROMPTS), [[]])
    scale = traced.logits.abs().max().item()
    error = (baked.logits[:, 0] - traced.logits[:, 0]).abs().max().item() / scale
    tolerance = TOLERANCE.get(model.dtype, 1e-5)
    if not error <= tolerance:
        raise UserError(f"the edited weights do not reproduce the traced ablation (relative error {error:.2e} > "
                        f"{tolerance:g}); nothing was saved")
    progress(f"verified: edited model = traced ablation on {len(VERIFY_PROMPTS)} prompts (max relative error {error:.1e})")
    record = {
        "format": "safety-heads/surgery",
        "version": 1,
        "model": model.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "ablation": ablation.kind,
        "epsilon": ablation.epsilon,
        "heads": [list(h) for h in heads],
        "heads_spec": format_heads(heads),
        "changed": _changed_tensors(model, ablation),
        "verification": {"prompts": list(VERIFY_PROMPTS), "max_relative_error": error, "tolerance": tolerance},
        "versions": versions(),
    }
    _save_whole(out, lambda folder: (model.module.save_pretrained(folder, safe_serialization=True),
                                     model.tokenizer.save_pretrained(folder), write_json(folder / "surgery.json", record)))
    return record


def _save_whole(out: Path, save: Callable[[Path], object]) -> None:
    """Save into a hidden folder beside `out`, then rename it into place: a kill or a full disk leaves `out` as it
    was (absent or empty), so a rerun is not refused; the partial folder is removed on failure."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(partial, 0o777 & ~current_umask())  # mkdtemp makes 0700; a saved model is an ordinary folder
    try:
        save(partial)
        if out.exists():
            out.rmdir()  # empty (checked at the start); os.replace cannot put a folder over a folder
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _changed_tensors(model: LoadedModel, ablation: Ablation) -> list[dict]:
    """Which parameter slices surgery scaled, in words a reader can check against the checkpoint."""
    layout = model.layout
    changed = []
    for layer, head in ablation.heads:
        columns = layout.head_slice(head)
        if ablation.kind == "ua":
            name = f"{layout.layers_path}.{layer}.{layout.query_weight_path}"
            start = layout.query_offset + columns.start
            axis = "rows" if layout.weight_layout == "linear" else "columns"
            changed.append({"head": [layer, head], "parameter": f"{name}.weight (and .bias if any)",
                            "slice": f"{axis} {start}:{start + layout.head_dim}", "scaled_by": ablation.epsilon})
        else:
            name = f"{layer}.{layout.output_path}"
            axis = "columns" if layout.weight_layout == "linear" else "rows"
            changed.append({"head": [layer, head], "parameter": f"{layout.layers_path}.{name}.weight",
                            "slice": f"{axis} {columns.start}:{columns.stop}", "scaled_by": ablation.epsilon})
    return changed
