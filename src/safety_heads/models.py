"""Load a model: a local Hugging Face folder, a hub id, a .gguf file, the built-in `tiny` or the shipped `demo`, or a
weightless client of a hub model that NDIF serves; wrapped for nnsight with its tokenizer and head layout.

Where the heads are (HeadLayout, the family registry) is layout.py; its names are re-exported here, where callers
and docs/adding-a-family.md have always imported them from.

    safety-heads heads --model tiny
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checked import Checked
from .errors import UserError, first_line
from .gguf_cache import dequantised_folder, is_gguf
from .layout import FAMILIES, HeadLayout, head_layout, layer_part, register_family, resolve  # noqa: F401 - re-exported

# ----------------------------------------------------------------------------------------------------------------
# Loading.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = re.compile(r"^(auto|cpu|multi|cuda(:\d{1,3})?)$")
HUB_PROBE_TIMEOUT_S = 5.0
# Eager attention computes the softmax in plain torch, so what we edit outside the kernel is all that changes and
# results match the plain-PyTorch reference bit for bit; sdpa is also exact (our edits sit outside the kernel) and
# faster on GPUs, but Gemma 2's soft-capping needs eager. Flash attention kernels are not offered: their padding
# handling differs from the masks the engine builds.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass
class ModelConfig(Checked):
    """Which model to load and how. Shared by the command line and the Python API."""

    # "tiny" (built in, random), "demo" (the trained demo chat model shipped with the package), a local Hugging Face
    # folder, a .gguf file (dequantised once and cached, gguf_cache.py), or a hub id such as meta-llama/Llama-2-7b-chat-hf
    model: str = "demo"
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto = one GPU if there is one, all GPUs (device_map="auto") if several, else cpu
    attn_implementation: str = "eager"
    revision: str | None = None
    trust_remote_code: bool = False  # off unless asked: a hub repo's own code runs on your machine

    def validate(self) -> None:
        if not DEVICE.match(self.device):
            raise UserError(f"unknown device '{self.device}'; choose auto, cpu, cuda, cuda:N or multi")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown dtype '{self.dtype}'; choose auto, {', '.join(DTYPES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UserError(
                f"unknown attention implementation '{self.attn_implementation}'; choose {' or '.join(ATTN_IMPLEMENTATIONS)}"
            )


@dataclass
class LoadedModel:
    """A model wrapped for nnsight, with its tokenizer and head layout."""

    lm: object  # nnsight.TransformersModel
    tokenizer: object
    layout: HeadLayout
    name: str
    dtype: torch.dtype
    config: ModelConfig = field(default_factory=ModelConfig)
    # The NDIF model key ("nnsight.modeling.transformers.TransformersModel:{repo_id, revision}") when this is a
    # weightless client of a model served remotely (load_remote_model); None for a model held here.
    remote_key: str | None = None

    @property
    def module(self) -> nn.Module:
        """The underlying transformers model (no nnsight wrapper)."""
        return self.lm._module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def on_device(self, inputs: dict) -> dict:
        """Model inputs (token ids, masks, positions) moved to where the model takes them: a model on one GPU has no
        hook that moves CPU inputs (accelerate adds those only across several devices), and nnsight moves only the
        inputs it tokenises itself."""
        device = self.device
        return {name: value.to(device) for name, value in inputs.items()}


def _resolve_device(device: str) -> tuple[dict, str]:
    """from_pretrained keyword arguments for a device choice, and the kind of device it lands on."""
    gpus = torch.cuda.device_count()
    if device == "auto":
        if gpus > 1:
            return {"device_map": "auto"}, "cuda"
        device = "cuda:0" if gpus == 1 else "cpu"
    if device == "multi":
        if gpus == 0:
            raise UserError("--device multi needs GPUs, and none is visible")
        return {"device_map": "auto"}, "cuda"
    if device.startswith("cuda") and gpus == 0:
        raise UserError(f"--device {device} asked for a GPU, but none is visible; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= gpus:  # else a torch error deep inside loading
        raise UserError(f"--device {device} asked for GPU {device[5:]}, but only {gpus} {'is' if gpus == 1 else 'are'} "
                        f"visible (cuda:0 to cuda:{gpus - 1})")
    if device == "cpu":
        return {}, "cpu"  # from_pretrained's default; device_map would need accelerate for nothing
    if not device.startswith("cuda"):
        raise UserError(f"unknown device '{device}'; choose auto, cpu, cuda, cuda:N or multi")
    return {"device_map": device}, "cuda"


def _single_device(placement: dict) -> str:
    """Where a model built here (not by from_pretrained) goes: the one device of a placement; GPU 0 for "auto" over
    several GPUs (a tiny model gains nothing from being spread)."""
    device = placement.get("device_map", "cpu")
    return "cuda:0" if device == "auto" else device


def _resolve_dtype(dtype: str, device_kind: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device_kind == "cuda" else torch.float32
    return DTYPES[dtype]


# A hub id is "name" or "org/name"; anything else (./x, /x, a/b/c, ~/x) can only be a folder.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def prepare_tokenizer(tokenizer):
    """Left padding (the last position is then the last prompt token in every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def wrap(module: nn.Module, tokenizer, name: str, config: ModelConfig | None = None) -> LoadedModel:
    """Wrap an already built transformers model (e.g. one made from a config in a test) for the engine.

    The module stays where its owner put it: wrapping never moves it to another device (`load_model` is what places a
    model, as `--device` says)."""
    import nnsight

    config = config or ModelConfig(model=name)
    layout = head_layout(module.config)
    module.eval()
    if getattr(module.config, "_attn_implementation", None) not in ATTN_IMPLEMENTATIONS:
        module.set_attn_implementation(config.attn_implementation)
    tokenizer = prepare_tokenizer(tokenizer)
    lm = nnsight.TransformersModel(module, tokenizer=tokenizer, **_stay_in_place(module))
    dtype = next(module.parameters()).dtype
    return LoadedModel(lm=lm, tokenizer=tokenizer, layout=layout, name=name, dtype=dtype, config=config)


def _stay_in_place(module: nn.Module) -> dict:
    """The pipeline nnsight builds around a ready module moves it to GPU 0 when no device is named (transformers'
    Pipeline: device=None means 0), behind the caller's back; naming the module's own device keeps it there. A module
    spread by accelerate (hf_device_map) is never moved, and the pipeline refuses a device for it."""
    if getattr(module, "hf_device_map", None) is not None:
        return {}
    return {"device": next(module.parameters()).device}


def load_model(config: ModelConfig) -> LoadedModel:
    """Load `config.model` (built-in "tiny", a local folder, or a hub id) in the chosen dtype and device."""
    if config.model == "tiny":
        from .tiny import TINY_MODEL_NAME, byte_tokenizer, tiny_llama

        placement, _ = _resolve_device(config.device)  # a bad --device, or cuda without a GPU, is refused for it too
        module = tiny_llama().to(_single_device(placement))  # wrap() leaves it there
        module.set_attn_implementation(config.attn_implementation)
        if config.dtype not in ("auto", "float32"):
            module = module.to(DTYPES[config.dtype])
        return wrap(module, byte_tokenizer(), TINY_MODEL_NAME, config)

    from transformers import AutoModelForCausalLM

    source, hf_config = read_config(config)
    head_layout(hf_config)  # fail on an unsupported family before loading any weights
    placement, device_kind = _resolve_device(config.device)
    dtype = _resolve_dtype(config.dtype, device_kind)
    common = _common_arguments(config)
    tokenizer = _load_tokenizer(source, config)
    try:
        module = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=config.attn_implementation, **placement, **common
        )
    except Exception as error:  # noqa: BLE001
        raise UserError(f"could not load the weights of '{config.model}': {first_line(error)}") from None
    return wrap(module, tokenizer, config.model, config)


def served_from_this_machine(model: str, remote) -> bool:
    """A model that exists only on this machine (demo, a folder, a .gguf file) sent to a server on this machine
    (scripts/ndif-local), which reads the same files; hub ids keep NDIF's rules wherever the server is. The
    `local_server` of check_remote_model and load_remote_model, for `remote` (EngineConfig.remote)."""
    from urllib.parse import urlparse

    from .remote import host_for, is_loopback

    try:
        on_loopback = is_loopback(urlparse(host_for(remote)).hostname)
    except ValueError:  # a malformed URL: refused in one line when the engine checks the setting
        return False
    return on_loopback and (model == "demo" or Path(model).expanduser().exists())


def check_remote_model(config: ModelConfig, local_server: bool = False) -> None:
    """NDIF serves hub checkpoints only: say so in one line, before anything is downloaded. A server on this machine
    (`local_server`: scripts/ndif-local) also serves `demo`, local folders and .gguf files, in float32."""
    name = config.model
    if local_server and name != "tiny":
        if config.dtype not in ("auto", "float32"):
            raise UserError(f"the local NDIF server (scripts/ndif-local) runs models in float32; drop --dtype {config.dtype}")
        return
    if name in ("tiny", "demo"):
        raise UserError(
            f"--remote needs a Hugging Face hub id of a model NDIF serves, such as meta-llama/Llama-3.1-8B-Instruct: the "
            f"built-in '{name}' model exists only on this machine (--remote local simulates a remote run with it)"
        )
    if Path(name).expanduser().exists():
        raise UserError(f"--remote needs a Hugging Face hub id: '{name}' is a local folder, and NDIF runs only models from the hub")
    if not HUB_ID.match(name):
        raise UserError(f"--remote needs a Hugging Face hub id of a model NDIF serves, such as "
                        f"meta-llama/Llama-3.1-8B-Instruct, not '{name}'")
    if config.dtype not in ("auto", "bfloat16"):
        raise UserError(f"NDIF runs its models in bfloat16; drop --dtype {config.dtype} when using --remote")


def load_remote_model(config: ModelConfig, local_server: bool = False) -> LoadedModel:
    """A weightless client of a hub model served by NDIF: the architecture on the meta device (module paths, head
    layout, sizes), the tokenizer, and the model key requests name it by. Needs the hub (config, tokenizer, the
    repo's canonical id), with HF_TOKEN for gated repos; no weights are downloaded. With `local_server` (a server on
    this machine, scripts/ndif-local) a local model is named by its folder's real path, as that server deployed it."""
    import nnsight

    check_remote_model(config, local_server)
    source, hf_config = read_config(config)
    local = local_server and Path(source).is_dir()
    if local:  # nnsight canonicalises a repo id through the hub; a folder's id is its own path (its private cache)
        import nnsight.modeling.huggingface as nnsight_hf

        source = os.path.realpath(source)
        nnsight_hf._ID_CACHE[source] = source
    head_layout(hf_config)  # an unsupported family fails before anything else
    tokenizer = prepare_tokenizer(_load_tokenizer(source, config))
    try:
        lm = nnsight.TransformersModel(
            source, revision=config.revision, task="text-generation", tokenizer=tokenizer, config=hf_config,
            attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code,
        )
    except Exception as error:  # noqa: BLE001
        raise UserError(f"could not build the architecture of '{config.model}' (no weights): {first_line(error)}") from None
    try:
        key = lm.to_model_key()  # canonicalises the repo id through the hub, once
    except Exception as error:  # noqa: BLE001
        raise UserError(f"could not look up '{config.model}' on the Hugging Face hub: {first_line(error)}") from None
    layout = head_layout(lm._module.config)
    # NDIF runs every model in bfloat16 (reference/nnsight.md section 6), scripts/ndif-local in float32: recorded in
    # results, and used for sizes and for the means a request carries.
    dtype = torch.float32 if local else torch.bfloat16
    return LoadedModel(lm=lm, tokenizer=tokenizer, layout=layout, name=config.model, dtype=dtype, config=config, remote_key=key)


def read_config(config: ModelConfig):
    """The transformers config of a local folder or hub id (no weights), and the source string to load from."""
    from transformers import AutoConfig

    source = config.model
    if source == "demo":  # the trained demo chat model shipped inside the package
        from .demo import DEMO_MODEL_PATH

        if not (DEMO_MODEL_PATH / "config.json").is_file():
            raise UserError("the demo model is missing from this installation; rebuild it with: python -m safety_heads.demo.train")
        source = str(DEMO_MODEL_PATH)
    if is_gguf(source):  # read once by transformers' GGUF reader, then an ordinary cached folder (gguf_cache.py)
        source = str(dequantised_folder(source, config.trust_remote_code))
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"model path '{source}' is a file; give the Hugging Face folder that holds config.json")
        if not (local / "config.json").is_file():
            raise UserError(f"model folder '{source}' has no config.json; is it a Hugging Face model folder?")
        source, where = str(local), f"from '{source}'"
    elif not HUB_ID.match(source):
        raise UserError(f"model folder '{source}' does not exist")
    else:
        where = "from the Hugging Face hub"
        cached = _cached_config(source, config)
        if cached is not None:
            return source, cached
        _require_hub(config.model)
    try:
        return source, AutoConfig.from_pretrained(source, **_common_arguments(config))
    except ZeroDivisionError:  # transformers divides by the head counts while it reads the config
        raise UserError(f"the config of '{config.model}' has a size of zero (num_attention_heads, num_key_value_heads or "
                        "hidden_size); a model needs at least one: fix its config.json") from None
    except Exception as error:  # noqa: BLE001
        raise UserError(f"could not load the config of '{config.model}' {where}: {first_line(error)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(source: str, config: ModelConfig):
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"could not load a tokenizer for '{config.model}': the folder has none of {', '.join(TOKENIZER_FILES)}; "
                        "save the tokenizer beside the weights (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(source, **_common_arguments(config))
    except Exception as error:  # noqa: BLE001 - transformers raises many types; the user needs one line
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
        raise UserError(f"could not load a tokenizer for '{config.model}': {text[:300]}") from None


def _cached_config(source: str, config: ModelConfig):
    """The config of a hub model already in the local cache, else None (without touching the network)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, **_common_arguments(config))
    except Exception:  # noqa: BLE001 - not cached (or unreadable): the hub decides
        return None


def _require_hub(name: str) -> None:
    """One quick connection to the hub before transformers tries: offline, it would retry for half a minute and print
    a line per retry before failing."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"'{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; give a local folder "
                        "or a .gguf file, or unset HF_HUB_OFFLINE")
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise UserError(f"'{name}' is not in the local Hugging Face cache and {constants.ENDPOINT} cannot be reached "
                        f"({error.strerror or error}); give a local folder or a .gguf file, or connect") from None


def read_layout(config: ModelConfig) -> HeadLayout:
    """The HeadLayout from config.json alone: describing heads needs no weights."""
    if config.model == "tiny":
        from .tiny import tiny_llama_config

        return head_layout(tiny_llama_config())
    return head_layout(read_config(config)[1])


def _common_arguments(config: ModelConfig) -> dict:
    token = os.environ.get("HF_TOKEN") or None  # read from the environment only; never logged or written anywhere
    return dict(revision=config.revision, trust_remote_code=config.trust_remote_code, token=token)
