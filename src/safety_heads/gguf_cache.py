"""GGUF model files, read once by transformers' own GGUF reader and cached as an ordinary Hugging Face folder.

Dequantising a GGUF file takes minutes on a laptop CPU, so the first load writes the dequantised model (float32
safetensors, config, tokenizer and its chat template, all from the file) to a cache folder keyed by the file's sha256;
every later load is a plain folder load. The cache entry is written to a temporary folder and renamed into place, so
a kill leaves either a whole entry or none.

    safety-heads ships --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --prompt "How do I pick a lock?"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import UserError, first_line
from .progress import print_progress

GGUF_MAGIC = b"GGUF"


def is_gguf(source: str) -> bool:
    return source.lower().endswith(".gguf")


def cache_root() -> Path:
    """$SAFETY_HEADS_CACHE, else $XDG_CACHE_HOME/safety-heads, else ~/.cache/safety-heads."""
    explicit = os.environ.get("SAFETY_HEADS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "safety-heads"


def dequantised_folder(source: str, trust_remote_code: bool = False) -> Path:
    """The cached Hugging Face folder of a .gguf file, made on first use."""
    from .downloads import file_sha256

    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file '{source}' does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise UserError(f"'{source}' is not a GGUF file (it does not start with the GGUF magic bytes)")
    digest = file_sha256(path)
    folder = cache_root() / "gguf" / digest[:32]
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    check_readable(path, source)  # a broken file is one line, before any progress line
    started = time.perf_counter()
    _dequantise(path, folder, trust_remote_code, announce=lambda: print_progress(
        f"dequantising {path.name} once (takes minutes on a CPU); cached in {folder}"))
    print_progress(f"dequantised {path.name} in {time.perf_counter() - started:.0f} s")
    return folder


def check_readable(path: Path, source: str) -> None:
    """The file's header, metadata and tensor table, read with the gguf package's reader (the one transformers uses)
    without dequantising anything: a truncated or corrupt file (a broken download) fails here in one line."""
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise UserError(f"reading GGUF files needs the 'gguf' package ({error}); pip install gguf") from None
    try:
        reader = GGUFReader(path)
        architecture = reader.get_field("general.architecture")
    except Exception as error:  # noqa: BLE001 - numpy, struct and the reader raise many types on a broken file
        size = path.stat().st_size
        raise UserError(f"'{source}' is truncated or corrupt: its header or tensor table does not fit its {size} bytes "
                        f"({type(error).__name__}); download it again") from None
    if architecture is None or not reader.tensors:
        raise UserError(f"'{source}' holds no model (no general.architecture or no tensors); give a model's .gguf file")


@contextlib.contextmanager
def _quiet_progress_bars():
    """Our one progress line instead of transformers' bars (they are redrawn hundreds of times into logs)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as transformers_logging

    original = getattr(gguf_utils, "tqdm", None)
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _dequantise(path: Path, folder: Path, trust_remote_code: bool, announce) -> None:
    """`announce()` runs once the file's metadata and tokenizer are read, before the minutes of dequantising: what
    fails before it is the file's fault and ends in one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress_bars():
        directory, name = str(path.parent), path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, trust_remote_code=trust_remote_code)
            announce()
            module = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code)
        except ImportError as error:
            raise UserError(f"reading GGUF files needs the 'gguf' package ({error}); pip install gguf") from None
        except Exception as error:  # noqa: BLE001 - transformers raises many types; the user needs one line
            raise UserError(f"could not read GGUF file '{path}': {first_line(error)}") from None
        # The weights are plain float32 tensors now; only the loader's bookkeeping still calls the model "quantized",
        # which makes save_pretrained refuse it and would make the saved config ask for the GGUF file again.
        module.hf_quantizer = None
        if hasattr(module.config, "quantization_config"):
            del module.config.quantization_config
        folder.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            module.save_pretrained(scratch, safe_serialization=True, max_shard_size="64GB")
            tokenizer.save_pretrained(scratch)
            (scratch / "SOURCE").write_text(f"dequantised from {path.name} by safety-heads\n")
            try:
                os.replace(scratch, folder)
            except OSError:  # another process finished the same entry first: theirs is as good as ours
                if not (folder / "config.json").is_file():
                    raise
        except OSError as error:
            raise UserError(f"could not write the dequantised model to {folder.parent}: {error.strerror or error} "
                            "(free some space, or point SAFETY_HEADS_CACHE at another folder)") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
