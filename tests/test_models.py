"""Loading from folders, hub ids and the built-in tiny model (all offline); head layouts are test_layout.py."""

import pytest
import torch
import transformers

import safety_heads.models as models
from safety_heads.errors import UserError
from safety_heads.models import ModelConfig, load_model
from safety_heads.tiny import save_tiny_llama


def test_tiny_model_is_deterministic():
    a, b = load_model(ModelConfig()), load_model(ModelConfig())
    for (name, x), (_, y) in zip(a.module.named_parameters(), b.module.named_parameters()):
        assert torch.equal(x, y), name
    assert a.module.config._attn_implementation == "eager"
    assert a.tokenizer.padding_side == "left"


def test_load_local_folder(tmp_path):
    save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(ModelConfig(model=str(tmp_path / "tiny"), device="cpu"))
    reference = load_model(ModelConfig(model="tiny", device="cpu"))
    ids = torch.tensor([[256, 72, 105]])
    with torch.no_grad():
        assert torch.equal(loaded.module(ids).logits, reference.module(ids).logits)
    assert loaded.dtype == torch.float32
    assert loaded.module.config._attn_implementation == "eager"
    assert loaded.layout.n_heads == 8 and loaded.layout.n_kv_heads == 4


def test_load_local_folder_in_bfloat16(tmp_path):
    save_tiny_llama(tmp_path / "tiny")
    loaded = load_model(ModelConfig(model=str(tmp_path / "tiny"), dtype="bfloat16", device="cpu"))
    assert loaded.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(ModelConfig(model=str(tmp_path / "nothing" / "here")))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_folder_without_tokenizer(tmp_path):
    from safety_heads.tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(UserError, match="could not load a tokenizer"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_unsupported_family_in_a_folder_fails_before_loading_weights(tmp_path):
    transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported model family 'gpt_neox'"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_hub_id_uses_hf_token_and_reports_failure_in_one_line(monkeypatch):
    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs, source=source)
        raise OSError("We couldn't connect to the hub.\nmore detail")

    monkeypatch.setenv("HF_TOKEN", "hf_fake_secret")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(models, "_require_hub", lambda name: None)  # as if the hub were reachable: transformers decides
    with pytest.raises(UserError) as error:
        load_model(ModelConfig(model="meta-llama/Llama-2-7b-chat-hf", revision="main"))
    assert seen["source"] == "meta-llama/Llama-2-7b-chat-hf"
    assert seen["token"] == "hf_fake_secret" and seen["revision"] == "main" and seen["trust_remote_code"] is False
    message = str(error.value)
    assert "\n" not in message and "hf_fake_secret" not in message and "couldn't connect" in message


def test_hub_load_passes_dtype_device_and_attention(monkeypatch, tmp_path):
    """The real hub path with from_pretrained redirected to a local folder: the arguments reach transformers."""
    folder = save_tiny_llama(tmp_path / "tiny")
    calls = {}
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def redirected(klass, source, *, _original=original, _name=cls.__name__, **kwargs):
            calls[_name] = (source, kwargs)
            return _original(klass, str(folder), **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(redirected))
    loaded = load_model(ModelConfig(model="org/tiny-chat", dtype="bfloat16", device="cpu"))
    source, kwargs = calls["AutoModelForCausalLM"]
    assert source == "org/tiny-chat"
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["attn_implementation"] == "eager"
    assert "device_map" not in kwargs  # CPU: from_pretrained's own placement
    assert loaded.name == "org/tiny-chat" and loaded.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(dtype="float8"), "unknown dtype"),
        (dict(attn_implementation="flash_attention_2"), "unknown attention implementation"),
        (dict(model="org/x", device="tpu"), "unknown device"),
        (dict(model="org/x", device="cuda:0"), "none is visible"),
        (dict(model="org/x", device="cuda:3"), "asked for GPU 3, but only 1 is visible"),
    ],
)
def test_bad_model_settings(settings, message, monkeypatch):
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: transformers.AutoConfig.for_model("llama"))
    gpus = 0 if "none is visible" in message else 1  # the same answer on a machine with GPUs or without
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(UserError, match=message):
        load_model(ModelConfig(**settings))


def test_a_hub_id_that_cannot_be_reached_fails_at_once_in_one_line(monkeypatch):
    """Offline, transformers retries for about half a minute and prints a line per retry; we check first."""
    import socket

    from huggingface_hub import constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection to it is refused at once
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    try:
        with pytest.raises(UserError, match="not in the local Hugging Face cache and http://127.0.0.1:.* cannot be reached"):
            load_model(ModelConfig(model="no-such-org/x"))
    finally:
        closed.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        load_model(ModelConfig(model="no-such-org/x"))


def _devices(module) -> set[str]:
    return {str(parameter.device) for parameter in module.parameters()}


def test_wrapping_never_moves_a_module():
    """A module stays where its owner put it. Without a named device, the pipeline nnsight builds around a ready module
    moves it to GPU 0 (or, on a machine without one, to the CPU): a module on the meta device shows that on any
    machine, since moving it fails outright. On a machine with a GPU the CPU and GPU cases are checked too."""
    from safety_heads.models import wrap
    from safety_heads.tiny import byte_tokenizer, tiny_llama

    places = ["meta", "cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    for place in places:
        with torch.device(place):
            module = tiny_llama()
        loaded = wrap(module, byte_tokenizer(), "tiny")
        assert _devices(module) == {place} and loaded.module is module and str(loaded.device) == place, place


def test_tiny_model_goes_where_device_says():
    assert str(load_model(ModelConfig(model="tiny", device="cpu")).device) == "cpu"
    expected = "cuda:0" if torch.cuda.device_count() == 1 else "cpu"
    assert str(load_model(ModelConfig(model="tiny")).device) == expected  # auto: the one GPU if there is one
