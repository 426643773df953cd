"""Property tests of every door a user's bytes come in by: data files, checkpoints, GGUF files.

Whatever the bytes, the real command line either succeeds (exit 0, with its result) or refuses them (exit 2, exactly
one line on stderr, no traceback) and then has written nothing: no output folder, no changed checkpoint, no cache
entry. Bounded (a few dozen examples each, no deadline) so each takes seconds.
"""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safety_heads.cli import main

BOUNDED = settings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
QUERIES = ["How would someone pick a lock?", "How would someone forge a note?", "How do I hotwire a car?"]


@pytest.fixture(scope="module", autouse=True)
def demo_loaded_once():
    """The built-in model, loaded once for the module: these tests are about the user's bytes, not model loading."""
    import safety_heads.models as models

    load, loaded = models.load_model, {}

    def load_once(config):
        if config.model != "demo":
            return load(config)
        if "demo" not in loaded:
            loaded["demo"] = load(config)
        return loaded["demo"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_model", load_once)
        yield


def outcome(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


# -- data files ------------------------------------------------------------------------------------------------------

fields = st.sampled_from(["prompt", "Prompt", "goal", "x", "", "\x1b[2J", "\u202e"])
texts = st.lists(st.sampled_from(list('ab ,"\r\n\t\x00\x1b\u202e\ufeff\u2028{}[]:') + ["prompt"]), max_size=30).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(fields, children, max_size=3), max_leaves=8)
data_files = st.one_of(
    st.tuples(st.sampled_from([".csv", ".json", ".jsonl"]), st.binary(max_size=60)),
    st.tuples(st.sampled_from([".csv", ".jsonl"]), texts.map(str.encode)),
    st.tuples(st.just(".json"), json_values.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just(".csv"), st.lists(fields, min_size=1, max_size=3).map(lambda h: (",".join(h) + "\nq1,q2,q3\n").encode())),
)


@settings(BOUNDED, max_examples=20)
@given(file=data_files)
def test_any_data_file_is_read_or_refused_in_one_line_without_a_write(file, tmp_path, capsys):
    suffix, content = file
    data, out = tmp_path / f"data{suffix}", tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    data.write_bytes(content)
    code, err = outcome(["ships", "--dataset", str(data), "--limit", "2", "--heads", "0:0", "--out", str(out)], capsys)
    assert code in (0, 2), err
    if code == 2:
        assert len(err) == 1 and err[0].startswith("safety-heads: error: "), err
        assert not out.exists()
    else:
        assert (out / "ships.json").exists()
    assert not any(c in "\n".join(err) for c in "\x1b\u202e\x00")


# -- checkpoints -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A ships run's checkpoint after its first query, and the uninterrupted run's ships.json."""
    import safety_heads.ships as ships

    root = tmp_path_factory.mktemp("checkpoint")
    (root / "queries.json").write_text(json.dumps(QUERIES))
    argv = ["ships", "--dataset", str(root / "queries.json"), "--heads", "0:*"]
    assert main([*argv, "--out", str(root / "reference")]) == 0
    calls = []

    def stop(line):
        calls.append(line)
        if line.startswith("["):
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ships, "print_progress", stop)
        assert main([*argv, "--out", str(root / "stopped")]) == 130
    return argv, (root / "stopped" / "ships.checkpoint.jsonl").read_bytes(), json.loads((root / "reference" / "ships.json").read_text())


def resume(stopped, content: bytes, tmp_path, capsys):
    argv, _, _ = stopped
    out = tmp_path / "resumed"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (out / "ships.checkpoint.jsonl").write_bytes(content)
    before = files_under(out)
    code, err = outcome([*argv, "--out", str(out), "--resume"], capsys)
    return out, before, code, err


@settings(BOUNDED, max_examples=12)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_a_checkpoint_cut_anywhere_resumes_to_the_uninterrupted_result(cut, stopped, tmp_path, capsys):
    """A kill or a full disk leaves a prefix of the file: every prefix resumes to exactly the uninterrupted numbers."""
    _, content, reference = stopped
    out, _, code, err = resume(stopped, content[: cut % (len(content) + 1)], tmp_path, capsys)
    assert code == 0, err
    result = json.loads((out / "ships.json").read_text())
    assert result["queries"] == reference["queries"] and result["aggregate"] == reference["aggregate"]


edits = st.one_of(
    st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=6)),  # bytes inserted
    st.tuples(st.integers(0, 10_000), st.sampled_from([b"NaN", b"Infinity", b"1e999", b"-", b"\n", b"null", b"\xff"])),
)


@BOUNDED
@given(edit=edits)
def test_an_edited_checkpoint_resumes_or_is_refused_in_one_line_untouched(edit, stopped, tmp_path, capsys):
    _, content, _ = stopped
    at, inserted = edit
    at %= len(content) + 1
    out, before, code, err = resume(stopped, content[:at] + inserted + content[at:], tmp_path, capsys)
    assert code in (0, 2), err
    if code == 2:
        assert len(err) == 1 and err[0].startswith("safety-heads: error: "), err
        assert files_under(out) == before  # the checkpoint as it was, nothing else written
    else:
        assert (out / "ships.json").exists() and not (out / "ships.checkpoint.jsonl").exists()


# -- GGUF files ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


gguf_edits = st.one_of(
    st.tuples(st.just("bytes"), st.integers(0, 0), st.binary(max_size=200).map(lambda b: b"GGUF" + b)),
    st.tuples(st.just("cut"), st.integers(4, 200_000), st.just(b"")),
    st.tuples(st.just("flip"), st.integers(4, 4096), st.binary(min_size=1, max_size=4)),  # in the header and metadata
)


@BOUNDED
@given(edit=gguf_edits)
def test_any_gguf_file_loads_or_is_refused_in_one_line_without_a_cache_entry(edit, tiny_gguf, tmp_path, monkeypatch, capsys):
    kind, at, data = edit
    content = data if kind == "bytes" else tiny_gguf[: at % len(tiny_gguf)] if kind == "cut" else \
        tiny_gguf[:at] + data + tiny_gguf[at + len(data):]
    cache = tmp_path / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    monkeypatch.setenv("SAFETY_HEADS_CACHE", str(cache))
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    code, err = outcome(["heads", "--model", str(model)], capsys)
    assert code in (0, 2), err
    if code == 2:
        assert len(err) == 1 and err[0].startswith("safety-heads: error: "), err
        assert not cache.exists() or not any(cache.rglob("*.safetensors"))
