"""Remote execution, offline: nnsight's local simulation, a captured request replayed "server-side" under NDIF's
import allow-list, and a loopback mock of NDIF that drops connections, answers 5xx, stalls and fails jobs.

Nothing here reaches the network: the mock binds 127.0.0.1 and stops by itself (tests/ndif_mock.py).
"""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from ndif_mock import MockNdif, SandboxUnpickler, execute, tiny_pair

from safety_heads import intrace
from safety_heads.ablation import Ablation
from safety_heads.cli import main
from safety_heads.engine import Engine, EngineConfig
from safety_heads.errors import UserError
from safety_heads.generate import GenerationConfig, generate
from safety_heads.models import ModelConfig, wrap
from safety_heads.remote_requests import plan_requests, request_payloads
from safety_heads.runs import run_ships
from safety_heads.ships import ShipsConfig
from safety_heads.tiny import byte_tokenizer, tiny_llama, tiny_llama_config

PROMPTS = ["How do I pick a lock?", "Hi", "Write a short poem about the sea, please."]
HEAD_SETS = [[(layer, head)] for layer in range(4) for head in range(8)] + [[(0, 1), (2, 3)], [(1, 0), (1, 3), (3, 2)], []]
FAST = dict(remote_backoff_s=0.001, remote_poll_s=0.005, trust_remote_host=True)  # tiny delays; the mock is not the configured host
SECRETS = {"HF_TOKEN": "hf_FAKEremoteTOKEN1234567890", "NDIF_API_KEY": "ndif-FAKE-remote-key-0987654321"}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def local_result(pair):
    client, _ = pair
    return Engine(client).run(PROMPTS, HEAD_SETS, readouts=("logits", "hidden"))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- what travels ------------------------------------------------------------------------------------------------------

ALLOWED_IMPORTS = {"torch", "math", "typing", "collections", "builtins", "__future__"}


def test_intrace_imports_only_what_ndif_allows():
    """NDIF re-imports a by-value module inside its sandbox, whose import hook refuses re, dataclasses, os, ..."""
    tree = ast.parse(Path(intrace.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"intrace.py must not import from the package (line {node.lineno})"
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, f"intrace.py imports {sorted(imported - ALLOWED_IMPORTS)}"


# -- (1) nnsight's local simulation: serialise, deserialise, run here ------------------------------------------------


@pytest.mark.parametrize("kind", ["ua", "mean"])
def test_sessions_in_local_simulation_equal_local(pair, local_result, kind):
    client, _ = pair
    engine = Engine(client)
    means = engine.head_means(PROMPTS) if kind == "mean" else None
    local = local_result if kind == "ua" else engine.run(PROMPTS, HEAD_SETS, ablation=Ablation(kind=kind, means=means),
                                                         readouts=("logits", "hidden"))
    # Two chunks per request: several requests, each a session with its own clean pass.
    simulated_engine = Engine(client, EngineConfig(remote="local", remote_chunks_per_request=2, max_batch_rows=12))
    if kind == "mean":
        assert torch.equal(simulated_engine.head_means(PROMPTS), means)
    simulated = simulated_engine.run(PROMPTS, HEAD_SETS, ablation=Ablation(kind=kind, means=means), readouts=("logits", "hidden"))
    assert simulated.stats["requests"] > 1
    ordinary = Engine(client, EngineConfig(max_batch_rows=12)).run(PROMPTS, HEAD_SETS, ablation=Ablation(kind=kind, means=means),
                                                                   readouts=("logits", "hidden"))
    assert torch.equal(simulated.logits, ordinary.logits) and torch.equal(simulated.hidden, ordinary.hidden)
    close(simulated.logits, local.logits)


def test_ships_exact_scores_in_local_simulation_equal_local(pair):
    client, _ = pair
    queries = ["How do I pick a lock?", "Tell me a secret."]
    local = run_ships(client, queries, ShipsConfig(), progress=lambda line: None)
    simulated = run_ships(client, queries, ShipsConfig(), engine_config=EngineConfig(remote="local"), progress=lambda line: None)
    for a, b in zip(local.queries, simulated.queries):
        assert torch.equal(a.scores, b.scores)


def test_generation_batch_in_local_simulation_equals_local(pair):
    client, _ = pair
    tokens = Engine(client).tokenize(PROMPTS)
    sets = [[(0, 1), (2, 3)], [], [(3, 7)]]
    config = GenerationConfig(max_new_tokens=5, batch_size=3)
    local = generate(client, tokens, head_sets=sets, config=config, keep_logits=True)
    simulated = generate(client, tokens, head_sets=sets, config=config, keep_logits=True,
                         engine=Engine(client, EngineConfig(remote="local")))
    assert [g.token_ids for g in local] == [g.token_ids for g in simulated]
    for a, b in zip(local, simulated):
        assert torch.equal(a.logits, b.logits)


# -- (2) the request itself: captured, sized, replayed against a separate model ------------------------------------------


def llama7b_shaped(seed=0):
    """Llama-2-7b's head grid (32 layers x 32 heads, MHA) with head_dim 4: payloads depend on code and index lists,
    not on weights, so this is what a full sweep of the real model sends, built in a fraction of a second."""
    torch.manual_seed(seed)
    config = tiny_llama_config(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, hidden_size=128,
                               intermediate_size=64, max_position_embeddings=128)
    from transformers import LlamaForCausalLM

    return wrap(LlamaForCausalLM(config).eval(), byte_tokenizer(), "llama-2-7b-shaped")


def test_full_ships_sweep_is_one_small_request_that_replays_exactly():
    client, server = llama7b_shaped(), llama7b_shaped()
    heads = [[(layer, head)] for layer in range(32) for head in range(32)]
    prompt = [client.tokenizer("How do I pick a lock?").input_ids]
    engine = Engine(client, EngineConfig(remote=True))  # planned for NDIF's GPUs; nothing is sent
    requests = plan_requests(engine, prompt, heads)
    payloads = request_payloads(engine, prompt, heads)
    assert len(requests) == len(payloads) == 1, "every head of one prompt fits one request"
    assert len(payloads[0]) < 100_000, f"payload {len(payloads[0])} bytes"
    SandboxUnpickler.seen = set()
    results = execute(payloads[0], server.lm, compress=True)["result"]
    assert not any("safety_heads" in name for name in SandboxUnpickler.seen)  # ours travelled by value only
    request = requests[0]
    assert request.parts[0].clean and len(results) == 1 + request.n_chunks
    replayed = torch.empty(len(heads), client.module.config.vocab_size)
    for chunk, readout in zip(request.parts[0].chunks, results[1:]):
        replayed[list(chunk.set_indices)] = readout["logits"].float()
    local = Engine(client).run(prompt, heads)
    close(results[0]["logits"].float()[0], local.clean_logits[0])
    close(replayed, local.logits[0])


# -- (3) a mock NDIF on loopback: the real client code, failures injected ---------------------------------------------


def test_mock_ndif_with_failures_loses_and_duplicates_nothing(pair, local_result):
    client, server = pair
    failures = {"post": ["drop", "500", "accept-drop"], "poll": [None, "503", "drop", "slow"], "result": ["drop"]}
    with MockNdif(server.lm, failures=failures) as mock:
        engine = Engine(client, EngineConfig(remote=mock.url, remote_chunks_per_request=1, **FAST))
        seen, stats = [], {}
        parts = list(engine.stream(PROMPTS, HEAD_SETS, readouts=("logits", "hidden"), stats=stats))
        for _, part in parts:
            seen += [(p, s) for p in part.prompt_indices for s in part.set_indices]
        result = engine.run(PROMPTS, HEAD_SETS, readouts=("logits", "hidden"))
        # One request per chunk here; "accept-drop" made the server run one of them twice, unseen by the client.
        assert stats["requests"] == len(plan_requests(engine, PROMPTS, HEAD_SETS, ("logits", "hidden")))
        assert mock.executed == 2 * stats["requests"] + 1
        assert all(action is None for route, action in mock.log[-3:])  # every injected failure was used up
    active = [s for s, heads in enumerate(HEAD_SETS) if heads]
    assert sorted(seen) == sorted((p, s) for p in range(len(PROMPTS)) for s in active)  # each pair exactly once
    close(result.logits, local_result.logits)
    close(result.hidden, local_result.hidden)
    close(result.clean_logits, local_result.clean_logits)


def test_mock_ndif_generation_and_reference_means(pair):
    client, server = pair
    tokens = Engine(client).tokenize(PROMPTS)
    sets = [[(0, 1)], [(2, 3), (3, 0)], []]
    config = GenerationConfig(max_new_tokens=4, batch_size=2)  # two batches: two requests
    local = generate(client, tokens, head_sets=sets, config=config)
    with MockNdif(server.lm, failures={"poll": ["500"]}) as mock:
        engine = Engine(client, EngineConfig(remote=mock.url, **FAST))
        remote = generate(client, tokens, head_sets=sets, config=config, engine=engine)
        assert mock.executed == 2
        close(engine.head_means(PROMPTS), Engine(client).head_means(PROMPTS))
        executed = mock.executed
        scored = engine.token_log_probs(tokens)  # the answer likelihoods of evaluate's harmless cost
        assert mock.executed > executed
    assert [g.token_ids for g in remote] == [g.token_ids for g in local]
    for a, b in zip(scored, Engine(client).token_log_probs(tokens)):
        close(a, b)


def test_slow_answer_times_out_and_is_retried(pair, monkeypatch):
    import nnsight.intervention.backends.remote as nnsight_remote

    monkeypatch.setattr(nnsight_remote, "_READ_TIMEOUT", 0.3)
    client, server = pair
    messages = []
    with MockNdif(server.lm, failures={"poll": ["hang"]}, hang_s=1.0) as mock:
        engine = Engine(client, EngineConfig(remote=mock.url, **FAST))
        import safety_heads.remote as remote_module

        stderr = type("S", (), {"write": lambda self, t: messages.append(t), "flush": lambda self: None})()
        monkeypatch.setattr(remote_module.sys, "stderr", stderr)
        result = engine.run(PROMPTS[:1], HEAD_SETS[:3])
    # closing the mock waited for the hung answer; its write to the abandoned socket may fail, and nothing else may
    assert all(isinstance(error, ConnectionError) for error in mock.handler_errors), mock.handler_errors
    assert any("ReadTimeout" in m and "retrying" in m for m in messages), messages
    close(result.logits, Engine(client).run(PROMPTS[:1], HEAD_SETS[:3]).logits)


def test_server_error_is_one_line_naming_the_request(pair):
    client, server = pair
    with MockNdif(server.lm, failures={"job": [None, "error"]}) as mock:
        engine = Engine(client, EngineConfig(remote=mock.url, remote_chunks_per_request=1, **FAST))
        with pytest.raises(UserError) as caught:
            engine.run(PROMPTS, HEAD_SETS)
        assert mock.executed == 1 and [route for route, _ in mock.log].count("post") == 2  # never retried
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("NDIF request 2 of ") and "failed on the server" in message and "CUDA out of memory" in message


@pytest.mark.parametrize("failures, attempts, expected, posts", [
    ({"post": ["503"] * 9}, 3, "sending the request failed 3 times; last: Failed to send request: mock: injected HTTP 503", 3),
    ({"post": ["401"]}, 5, "sending the request failed: Failed to send request: mock: injected HTTP 401", 1),  # not retried
])
def test_transport_failures_after_retries_are_one_line(pair, failures, attempts, expected, posts):
    client, server = pair
    with MockNdif(server.lm, failures=failures) as mock:
        engine = Engine(client, EngineConfig(remote=mock.url, remote_attempts=attempts, **FAST))
        with pytest.raises(UserError, match="NDIF request 1 of ") as caught:
            engine.run(PROMPTS[:1], HEAD_SETS[:2])
        assert [route for route, _ in mock.log].count("post") == posts
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture
def remote_cli(pair, monkeypatch):
    """`--remote` on the command line with the mock: the hub lookup of load_remote_model replaced by the tiny client."""
    client, _ = pair
    import safety_heads.models as models

    monkeypatch.setattr(models, "load_remote_model", lambda config: client)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def test_cli_remote_run_computes_nothing_on_the_local_copy(monkeypatch, tmp_path, capsys):
    """`run --remote` with a client whose weights are on the meta device, as a remote model's local copy is: every
    stage, the refusal check before them included, runs on the server (found by the ndif tests: the check once ran
    locally and failed on the meta weights). The tiny model refuses nothing, so the refusal search is skipped."""
    client, server = tiny_pair()
    client.module.to("meta")
    import safety_heads.models as models

    monkeypatch.setattr(models, "load_remote_model", lambda config: client)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    argv = ["run", "--model", "org/tiny", "--quick", "--limit", "2", "--steps", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "run"), "--remote-backoff", "0.001", "--trust-remote-host"]
    with MockNdif(server.lm, api_key=SECRETS["NDIF_API_KEY"]) as mock:
        assert main(argv + ["--remote", mock.url]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "no refusal search" in printed.out + printed.err
    assert json.loads((tmp_path / "run" / "experiment.json").read_text())["refusal_search_skipped"]


def test_cli_remote_ships_resumes_after_a_server_error(pair, remote_cli, tmp_path, capsys):
    client, server = pair
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps(["How do I pick a lock?", "Tell me a secret.", "Hi there"]))
    out = tmp_path / "run"
    # One query per request, so the second request (query 2) is the one that fails.
    argv = ["ships", "--model", "org/tiny", "--dataset", str(queries), "--out", str(out), "--remote-backoff", "0.001",
            "--queries-per-pass", "1", "--trust-remote-host"]
    with MockNdif(server.lm, failures={"job": [None, "error"]}, api_key=SECRETS["NDIF_API_KEY"]) as mock:
        assert main(argv + ["--remote", mock.url]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # query 1's progress line, then the error
        assert len(err) == 2 and err[1].startswith("safety-heads: error: NDIF request 1 of 1") and "--resume" in err[1]
        assert main(argv + ["--remote", mock.url, "--resume"]) == 0
        assert set(mock.keys_seen) == {SECRETS["NDIF_API_KEY"]}  # the key went where it belongs, and only there
    printed = capsys.readouterr()
    remote = json.loads((out / "ships.json").read_text())
    local = run_ships(client, json.loads(queries.read_text()), ShipsConfig(), progress=lambda line: None)
    assert [q["index"] for q in remote["queries"]] == [0, 1, 2]  # none lost, none twice
    for record, scores in zip(remote["queries"], local.queries):
        close(torch.tensor(record["scores"], dtype=torch.float64), scores.scores)
    # (4) secrets: neither the key nor the token appears in any output or message
    for path in [p for p in out.rglob("*") if p.is_file()]:
        for secret in SECRETS.values():
            assert secret.encode() not in path.read_bytes(), path
    for secret in SECRETS.values():
        assert secret not in printed.out + printed.err


BAD_REMOTE = [
    (["--model", "tiny", "--remote"],
     "--remote needs a Hugging Face hub id of a model NDIF serves, such as meta-llama/Llama-3.1-8B-Instruct: the built-in 'tiny'"),
    (["--model", "{folder}", "--remote"], "is a local folder, and NDIF runs only models from the hub"),
    (["--model", "org/x", "--remote", "ftp://host"], "--remote takes no value"),
    (["--model", "org/x", "--remote", "--dtype", "float32"], "NDIF runs its models in bfloat16"),
    (["--model", "org/x", "--remote"], "--remote needs an NDIF API key"),
    (["--model", "org/x", "--remote", "--remote-attempts", "0"], "--remote-attempts must be at least 1"),
]


@pytest.mark.parametrize("arguments, message", BAD_REMOTE, ids=[" ".join(a) for a, _ in BAD_REMOTE])
def test_bad_remote_input_is_one_line(arguments, message, tmp_path, monkeypatch, capsys):
    from nnsight.schema.config import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    tiny_llama().save_pretrained(tmp_path / "folder")
    capsys.readouterr()  # the save's progress bar (shown unless an earlier test turned transformers' bars off)
    arguments = [a.format(folder=tmp_path / "folder") for a in arguments]
    assert main(["ships", "--prompt", "hi", "--out", str(tmp_path / "out"), *arguments]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_load_remote_model_builds_a_weightless_client(monkeypatch):
    """The meta-device client, offline: the hub's answers (config, tokenizer, canonical id) stubbed."""
    import transformers
    from nnsight.modeling import huggingface

    import safety_heads.models as models

    monkeypatch.setattr(models, "read_config", lambda config: (config.model, tiny_llama_config()))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    monkeypatch.setitem(huggingface._ID_CACHE, "org/tiny-remote", "org/tiny-remote")
    model = models.load_remote_model(ModelConfig(model="org/tiny-remote"))
    assert model.device.type == "meta" and model.dtype == torch.bfloat16
    assert model.remote_key.startswith("nnsight.modeling.transformers.TransformersModel:") and "org/tiny-remote" in model.remote_key
    assert model.layout.n_heads == 8 and model.layout.n_layers == 4
    payloads = request_payloads(Engine(model, EngineConfig(remote=True)), PROMPTS[:1], HEAD_SETS)
    assert len(payloads) == 1  # a request can be built from the client alone


# -- doctor ------------------------------------------------------------------------------------------------------------


def test_doctor_against_the_mock(pair, monkeypatch, capsys):
    _, server = pair
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    with MockNdif(server.lm, api_key=SECRETS["NDIF_API_KEY"]) as mock:
        assert main(["doctor", "--trust-remote-host", "--host", mock.url, "--model", "org/tiny"]) == 0
        ok = capsys.readouterr().out
        assert main(["doctor", "--trust-remote-host", "--host", mock.url, "--model", "org/unserved"]) == 1
        unserved = capsys.readouterr().out
        mock.env = {"python_version": "3.12.1", "packages": {"nnsight": "0.7.0", "torch": "2.6.0+cu124", "transformers": "4.50.0"}}
        assert main(["doctor", "--trust-remote-host", "--host", mock.url]) == 1
        skewed = capsys.readouterr().out
    assert "NDIF_API_KEY   set (hidden)" in ok and "reachable" in ok and "org/tiny served (RUNNING)" in ok and "recognised" in ok
    assert "org/unserved not served" in unserved
    assert "nnsight        local 0.8.1, server 0.7.0 MISMATCH" in skewed and "(differs" in skewed
    for text in (ok, unserved, skewed):
        assert all(secret not in text for secret in SECRETS.values())


def test_doctor_offline_fails_gracefully(capsys, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    from nnsight.schema.config import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    assert main(["doctor", "--host", "http://127.0.0.1:9", "--model", "org/tiny", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "NDIF_API_KEY   not set" in captured.out and "unreachable" in captured.out and "unknown (host unreachable)" in captured.out


def test_retry_delays_grow_exponentially():
    from safety_heads.remote import NdifBackend

    slept = []
    backend = NdifBackend("m:k", host="http://127.0.0.1:9", api_key=None, sleep=slept.append, notify=lambda line: None,
                          config=EngineConfig(remote_attempts=4, remote_backoff_s=0.5))
    import httpx

    def failing():
        raise httpx.ConnectError("refused")

    with pytest.raises(Exception, match="failed 4 times"):
        backend._retrying(failing, "sending")
    assert slept == [0.5, 1.0, 2.0] and math.isclose(sum(slept), 3.5)


def test_remote_flag_without_value_means_ndif(monkeypatch):
    from safety_heads.cli import build_parser

    args = build_parser().parse_args(["ships", "--prompt", "x", "--out", "o", "--remote"])
    assert args.remote is True
    args = build_parser().parse_args(["ships", "--prompt", "x", "--out", "o", "--remote", "local"])
    assert args.remote == "local"


def test_gradient_estimate_runs_remotely(pair):
    from safety_heads.estimate import EstimateConfig, estimate_scores

    client, server = pair
    tokens = Engine(client).tokenize(PROMPTS[:1])[0]
    # the sampled estimator: two forward+backward passes, two requests
    config = EstimateConfig(estimator="sampled", samples=6, samples_per_pass=3)
    local = estimate_scores(Engine(client), tokens, config=config)
    assert torch.equal(estimate_scores(Engine(client, EngineConfig(remote="local")), tokens, config=config), local)
    with MockNdif(server.lm) as mock:
        remote = estimate_scores(Engine(client, EngineConfig(remote=mock.url, **FAST)), tokens, config=config)
        assert mock.executed == 2
    close(remote, local)
    # the default (fisher) estimator: both of its passes in one request
    local = estimate_scores(Engine(client), tokens)
    with MockNdif(server.lm) as mock:
        remote = estimate_scores(Engine(client, EngineConfig(remote=mock.url, **FAST)), tokens)
        assert mock.executed == 1
    close(remote, local)


def test_several_gpus_size_batches_by_the_tightest_one(pair, monkeypatch):
    """--device multi (device_map="auto"): every GPU runs every row through its layers, so the GPU with the least
    free memory sets the rows per pass. (No GPU here: the devices and their free memory are stand-ins.)"""
    client, _ = pair
    engine = Engine(client)
    free = {"cuda:0": 30 * 2**30, "cuda:1": 8 * 2**30, "cuda:2": 20 * 2**30}
    monkeypatch.setattr(engine, "_device_kind", lambda: "cuda")
    engine._gpus = [torch.device(name) for name in free]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[str(device)], 80 * 2**30))
    assert engine._budget_bytes() == 8 * 2**30 * 0.5


# -- trust: https, the configured host, and results that cannot run code --------------------------------------------


def test_an_unconfirmed_host_never_receives_the_key(pair, remote_cli, tmp_path, capsys):
    """Without --trust-remote-host, a host other than nnsight's configured one is refused before anything is sent."""
    _, server = pair
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps(["How do I pick a lock?"]))
    with MockNdif(server.lm, api_key=SECRETS["NDIF_API_KEY"]) as mock:
        argv = ["ships", "--model", "org/tiny", "--dataset", str(queries), "--out", str(tmp_path / "run"), "--remote", mock.url]
        assert main(argv) == 2
        assert main(["doctor", "--host", mock.url]) in (0, 1)
        assert mock.keys_seen == [] and mock.executed == 0
    err = capsys.readouterr()
    lines = [line for line in err.err.strip().splitlines() if line]
    assert len(lines) == 1 and "--trust-remote-host" in lines[0] and "not nnsight's configured NDIF host" in lines[0]
    assert "API key        not sent" in err.out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("host, message", [
    ("http://example.com", "plain http"),
    ("http://10.0.0.7:8000", "plain http"),
    ("ftp://example.com", "--remote takes no value"),
    ("https://", "not a host URL"),
    ("https://example.com:notaport", "not a host URL"),
])
def test_insecure_or_malformed_hosts_are_refused(host, message):
    with pytest.raises(UserError, match=message):
        EngineConfig(remote=host, trust_remote_host=True).validate()


def test_ndif_host_from_the_environment_must_be_https(monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "http://ndif.example.org")
    with pytest.raises(UserError, match="NDIF_HOST http://ndif.example.org is plain http"):
        EngineConfig(remote=True).validate()
    monkeypatch.setenv("NDIF_HOST", "https://ndif.example.org")
    with pytest.raises(UserError, match="--trust-remote-host"):
        EngineConfig(remote=True).validate()
    EngineConfig(remote=True, trust_remote_host=True).validate()  # named and trusted: accepted
    monkeypatch.delenv("NDIF_HOST")
    EngineConfig(remote=True).validate()  # nnsight's configured host needs no flag
    EngineConfig(remote="http://127.0.0.1:8000", trust_remote_host=True).validate()  # a test server on this machine


class _Planted:
    """An object whose unpickling would run a command: what a hostile host could send back."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("compress", [False, True])
def test_a_result_that_would_run_code_is_refused(compress, tmp_path):
    import io

    from safety_heads.remote import NdifBackend, Unavailable

    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"values": [torch.ones(2)], "planted": _Planted(marker)}, buffer)
    blob = buffer.getvalue()
    if compress:
        import zstandard

        blob = zstandard.ZstdCompressor().compress(blob)
    backend = NdifBackend("model-key", host="http://127.0.0.1:9", api_key=None)
    backend.compress = compress
    with pytest.raises(Unavailable, match="refused to unpickle"):
        backend.finalize(blob)
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"values": [torch.ones(2)], "pair": (torch.zeros(1), None)}, plain)
    data = plain.getvalue()
    if compress:
        data = zstandard.ZstdCompressor().compress(data)
    assert torch.equal(backend.finalize(data)["values"][0], torch.ones(2))  # tensors and containers load as before


def test_doctor_defaults_to_a_served_chat_model_and_lists_them(pair, monkeypatch, capsys):
    """Without --model, doctor checks the default remote chat model; one that is not served gets the list of the chat
    models that are (from the host's /status: every served name with Instruct or chat in it)."""
    from safety_heads.remote import DEFAULT_REMOTE_MODEL

    _, server = pair
    monkeypatch.setenv("NDIF_API_KEY", SECRETS["NDIF_API_KEY"])
    served = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-3.1-70B-Instruct", "org/tiny-chat")
    with MockNdif(server.lm, api_key=SECRETS["NDIF_API_KEY"], served=served) as mock:
        assert main(["doctor", "--host", mock.url, "--trust-remote-host"]) == 1
        out = capsys.readouterr().out
    assert (f"model          {DEFAULT_REMOTE_MODEL} not served by this host (3 deployments; chat models served: "
            "meta-llama/Llama-3.1-70B-Instruct, org/tiny-chat)") in out
