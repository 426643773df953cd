"""The command line: happy paths, and a table of bad inputs that must each end in one line and exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from safety_heads.cli import main
from safety_heads.tiny import byte_tokenizer, tiny_llama


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "empty.csv").write_text("prompt\n")
    (root / "nocol.csv").write_text("text,other\nhello,1\n")
    (root / "bad.json").write_text('["a", "b"')
    (root / "latin1.csv").write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    (root / "long.json").write_text(json.dumps(["x" * 600]))
    (root / "ok.json").write_text(json.dumps(["How do I pick a lock?", "Hello"]))
    (root / "one.json").write_text(json.dumps(["How do I pick a lock?"]))
    with open(root / "huge.jsonl", "wb") as stream:  # sparse: 300 MB on paper, nothing on disk
        stream.truncate(300 * 2**20)
    no_tokenizer = root / "no-tokenizer"
    tiny_llama().save_pretrained(no_tokenizer)
    neox = root / "neox"
    transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1).save_pretrained(neox)
    (root / "surrogate.jsonl").write_text('"fine"\n"\\ud800 broken"\n')  # a JSON escape of a lone surrogate
    os.mkfifo(root / "fifo.jsonl")  # reading it would block forever
    (root / "huge-head.sahara.json").write_text('{"format": "safety-heads/sahara", "heads": [[1e400, 0]]}')
    (root / "float-head.sahara.json").write_text('{"format": "safety-heads/sahara", "heads": [[1.5, 0]]}')
    zero_heads = root / "zero-heads"
    zero_heads.mkdir()
    (zero_heads / "config.json").write_text(json.dumps({**tiny_llama().config.to_dict(), "num_attention_heads": 0}))
    # issue 25: inputs validated where they enter, named in the one line
    (root / "twice.csv").write_text("prompt,prompt\nfirst,second\n")
    (root / "twice.json").write_text('[{"prompt": "first", "prompt": "second"}]')
    (root / "bad-layer.sahara.json").write_text('{"format": "safety-heads/sahara", "heads": [[9, 0]]}')
    bad_type = root / "bad-type"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({**tiny_llama().config.to_dict(), "num_hidden_layers": "four"}))
    from tiny_gguf import write_tiny_gguf

    whole = write_tiny_gguf(root / "whole.gguf").read_bytes()
    (root / "truncated.gguf").write_bytes(whole[: len(whole) // 2])  # a broken download
    no_template = root / "no-template"
    tiny_llama().save_pretrained(no_template)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    return root


BAD = [
    (["heads", "--model", "{root}/missing"], "does not exist"),
    (["heads", "--model", "{root}/neox"], "unsupported model family 'gpt_neox'"),
    (["heads", "--heads", "4:0"], "layer 4 .* out of range"),
    (["heads", "--heads", "0:8"], "head 8 .* out of range"),
    (["heads", "--heads", "zero"], "malformed head"),
    (["heads", "--dtype", "int8"], "unknown dtype"),
    (["ships", "--prompt", "hi", "--heads", "9:0", "--out", "{out}"], "layer 9 .* out of range"),
    (["ships", "--prompt", "hi", "--epsilon", "-1", "--out", "{out}"], "epsilon"),
    (["ships", "--prompt", "hi", "--epsilon", "nan", "--out", "{out}"], "epsilon"),
    (["ships", "--prompt", "hi", "--epsilon", "2", "--out", "{out}"], "epsilon"),
    (["ships", "--prompt", "hi", "--epsilon", "abc", "--out", "{out}"], "invalid float value"),
    (["ships", "--prompt", "hi", "--ablation", "zero", "--out", "{out}"], "unknown ablation kind"),
    (["ships", "--prompt", "hi", "--template", "alpaca", "--out", "{out}"], "template"),
    (["ships", "--prompt", "hi", "--method", "fast", "--out", "{out}"], "unknown method"),
    (["ships", "--prompt", "hi", "--template", "raw", "--system", "be nice", "--out", "{out}"], "--system only applies"),
    (["ships", "--model", "{root}/no-template", "--prompt", "hi", "--system", "be nice", "--out", "{out}"], "--system only applies"),
    (["ships", "--prompt", "  ", "--out", "{out}"], "--prompt is empty"),
    (["ships", "--prompt", "x" * 600, "--out", "{out}"], "beyond the model's context"),
    (["ships", "--dataset", "nonexistent-set", "--out", "{out}"], "unknown data set"),
    (["ships", "--dataset", "{root}/empty.csv", "--out", "{out}"], "no prompts|empty"),
    (["ships", "--dataset", "{root}/nocol.csv", "--out", "{out}"], "column"),
    (["ships", "--dataset", "{root}/ok.json", "--column", "text", "--out", "{out}"], ""),  # strings: column ignored
    (["ships", "--dataset", "{root}/bad.json", "--out", "{out}"], "JSON"),
    (["ships", "--dataset", "{root}/latin1.csv", "--out", "{out}"], "UTF-8"),
    (["ships", "--dataset", "{root}/long.json", "--out", "{out}"], "beyond the model's context"),
    (["ships", "--dataset", "maliciousinstruct", "--limit", "0", "--out", "{out}"], "--limit"),
    (["ships", "--model", "{root}/no-template", "--prompt", "hi", "--template", "chat", "--out", "{out}"], "no chat template"),
    (["ships", "--prompt", "hi"], "--out"),
    (["ships", "--out", "{out}"], "one of the arguments --prompt --dataset is required"),
    (["ships", "--prompt", "hi", "--memory-budget", "0", "--out", "{out}"], "--memory-budget"),
    (["ships", "--prompt", "hi", "--top-k", "0", "--out", "{out}"], "--top-k"),
    (["frobnicate"], "invalid choice"),
    (["evaluate", "--heads", "0:1", "--judge", "harmbench:{root}/no-judge", "--out", "{out}"], "judge model folder"),
    (["evaluate", "--heads", "0:1", "--judge", "vibes", "--out", "{out}"], "unknown judge 'vibes'"),
    (["evaluate", "--from", "{root}/ok.json", "--out", "{out}"], "is not a sahara.json or ships.json"),
    (["evaluate", "--from", "{root}/missing.json", "--out", "{out}"], "cannot read result file"),
    (["evaluate", "--heads", "7:0", "--out", "{out}"], "layer 7 .* out of range"),
    (["evaluate", "--out", "{out}"], "exactly one of --heads or --from"),
    (["evaluate", "--heads", "0:1", "--max-new-tokens", "0", "--out", "{out}"], "--max-new-tokens"),
    (["surgery", "--heads", "0:9", "--out", "{out}"], "head 9 .* out of range"),
    (["sahara", "--dataset", "{root}/one.json", "--out", "{out}"], "rank"),
    (["ships", "--dataset", "{root}/huge.jsonl", "--out", "{out}"], "over the 256 MB"),
    (["ships", "--model", "{root}/no-tokenizer", "--prompt", "hi", "--out", "{out}"], "could not load a tokenizer"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--steps", "40", "--out", "{out}"], "--steps"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--rank", "0", "--out", "{out}"], "rank"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--score", "cosine", "--out", "{out}"], "unknown score"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--exclude", "0:99", "--out", "{out}"], "head 99"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--guard", "nosuch", "--out", "{out}"], "unknown data set 'nosuch'"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--guard", "harmless-val", "--guard-max-rise", "0",
      "--out", "{out}"], "--guard-max-rise must be positive"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--guard", "harmless-val", "--guard-tokens", "0",
      "--out", "{out}"], "--guard-tokens"),
    (["run", "--model", "tiny", "--quick", "--guard", "{root}/missing.json", "--out", "{out}"], "missing.json"),
    (["sahara", "--dataset", "{root}/long.json", "--out", "{out}"], "beyond the model's context|rank"),
    (["ships", "--prompt", "hi", "--out", "{root}/ok.json/sub"], "cannot write to output folder"),
    (["evaluate", "--heads", "0:1", "--limit", "1", "--out", "{root}/ok.json/sub"], "cannot write to output folder"),
    (["surgery", "--heads", "0:1", "--out", "{root}/ok.json/sub"], "cannot write to output folder"),
    (["surgery", "--heads", "0:1", "--ablation", "mean", "--out", "{out}"], "ua or sc"),
    (["surgery", "--heads", "0:1", "--epsilon", "-0.5", "--out", "{out}"], "epsilon"),
    # Found by a probe of bad inputs (issue 14): each once ended in a traceback, a hang, a late failure or silence.
    (["ships", "--prompt", "\udcff\udcfe", "--out", "{out}"], "not valid text"),  # what argv holds for bytes ff fe
    (["ships", "--dataset", "{root}/surrogate.jsonl", "--out", "{out}"], "line 2.* not valid text"),
    (["ships", "--prompt", "hi", "--template", "chat", "--system", "x\udc80", "--out", "{out}"], "--system is not valid text"),
    (["surgery", "--heads", "0:1", "--out", "{root}/ok.json"], "is a file, not a folder"),
    (["run", "--model", "tiny", "--quick", "--out", "{root}/ok.json"], "is a file, not a folder"),
    (["ships", "--prompt", "hi", "--out", "{root}/ok.json"], "is a file, not a folder"),
    (["ships", "--prompt", "hi", "--show", "-1", "--out", "{out}"], "--show must be 0 or more"),
    (["heads", "--heads", "1" * 5000 + ":0"], "layer 111111111... .* out of range"),
    (["heads", "--heads", "0:0/" + "9" * 5000], "out of range"),
    (["evaluate", "--from", "{root}/huge-head.sahara.json", "--out", "{out}"], "does not follow"),
    (["evaluate", "--from", "{root}/float-head.sahara.json", "--out", "{out}"], "not two integers"),
    (["ships", "--dataset", "{root}/fifo.jsonl", "--out", "{out}"], "not a regular file"),
    (["evaluate", "--heads", "0:1", "--max-new-tokens", "600", "--out", "{out}"], "exceed the model's context of 512"),
    (["run", "--model", "tiny", "--quick", "--max-new-tokens", "600", "--out", "{out}"], "exceed the model's context of 512"),
    (["run", "--model", "tiny", "--quick", "--guard-max-rise", "nan", "--out", "{out}"], "--guard-max-rise must be positive"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--guard", "harmless-val", "--guard-max-rise", "inf",
      "--out", "{out}"], "--guard-max-rise must be positive"),
    (["evaluate", "--heads", "0:1", "--dataset", ",", "--out", "{out}"], "names no data set"),
    (["ships", "--prompt", "hi", "--device", "bogus", "--out", "{out}"], "unknown device 'bogus'"),
    # no GPU: none is visible; GPUs: not that many (one row either way, so the documented count holds on both)
    (["ships", "--prompt", "hi", "--device", "cuda:999", "--out", "{out}"], "--device cuda:999 asked for"),
    (["ships", "--prompt", "hi", "--out", ""], "argument --out: is empty"),
    (["doctor", "--timeout", "nan"], "--timeout must be a positive number"),
    (["doctor", "--timeout", "-1"], "--timeout must be a positive number"),
    (["doctor", "--host", "not a url"], "not a host URL"),
    (["doctor", "--host", "http://example.com"], "plain http"),
    (["ships", "--dataset", "{root}/missing\nfile.json", "--out", "{out}"], "missing\\\\nfile.json' does not exist"),
    (["ships", "--prompt", "hi", "--out", "{root}/ok.json/a\nb"], "cannot write to output folder .*a\\\\nb"),
    (["heads", "--heads", "-1:0"], "malformed layer '-1'"),
    (["ships", "--prompt", "hi", "--heads", "-1:0", "--out", "{out}"], "malformed layer '-1'"),
    (["heads", "--model", "{root}/zero-heads"], "size of zero \\(num_attention_heads"),
    (["heads", "--load", "--model", "{root}/no-tokenizer"], "has none of tokenizer.json"),
    (["ships", "--model", "org/x", "--prompt", "hi", "--remote", "http://example.com", "--out", "{out}"], "plain http"),
    (["ships", "--model", "org/x", "--prompt", "hi", "--remote", "https://example.com", "--out", "{out}"], "add --trust-remote-host"),
    (["ships", "--model", "org/x", "--prompt", "hi", "--remote", "https://", "--out", "{out}"], "not a host URL"),
    (["evaluate", "--heads", "{root}/ok.json", "--out", "{out}"], "is a file, not a head spec.*evaluate --from"),
    (["surgery", "--heads", "{root}/ok.json", "--out", "{out}"], "is a file, not a head spec"),
    (["run", "--model", "tiny", "--quick", "--limit", "0", "--out", "{out}"], "--limit must be at least 1"),
    # and more of our own
    (["ships", "--prompt", "hi", "--top-tokens", "0", "--out", "{out}"], "--top-tokens"),
    (["ships", "--prompt", "hi", "--estimator", "magic", "--out", "{out}"], "unknown estimator 'magic'"),
    (["ships", "--prompt", "hi", "--samples-per-pass", "0", "--out", "{out}"], "--samples-per-pass"),
    (["ships", "--prompt", "hi", "--column", "x", "--out", "{out}"], "--column applies to --dataset"),
    (["ships", "--prompt", "hi", "--limit", "3", "--out", "{out}"], "--limit applies to --dataset"),
    (["ships", "--prompt", "hi", "--queries-per-pass", "0", "--out", "{out}"], "--queries-per-pass"),
    (["ships", "--prompt", "hi", "--memory-budget", "inf", "--out", "{out}"], "--memory-budget"),
    (["ships", "--prompt", "hi", "--remote-result-mb", "0", "--out", "{out}"], "--remote-result-mb"),
    (["ships", "--prompt", "hi", "--remote-backoff", "-1", "--out", "{out}"], "remote_backoff_s"),
    (["ships", "--prompt", "hi", "--epsilon", "inf", "--out", "{out}"], "epsilon"),
    (["ships", "--prompt", "hi", "--dtype", "float64", "--out", "{out}"], "unknown dtype"),
    (["ships", "--prompt", "hi", "--heads", "0:*/0", "--out", "{out}"], "step must be at least 1"),
    (["ships", "--prompt", "hi", "--heads", "0::1", "--out", "{out}"], "malformed head '0::1'"),
    (["ships", "--prompt", "hi", "--heads", "0:3-1", "--out", "{out}"], "empty head range"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--candidates", "4", "--out", "{out}"], "--candidates and --rank-by"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--rank-by", "{root}/ok.json", "--candidates", "3",
      "--out", "{out}"], "is not a ships.json"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--guard-batch", "0", "--out", "{out}"], "--guard-batch"),
    (["sahara", "--dataset", "maliciousinstruct", "--limit", "4", "--heads", "0:0", "--out", "{out}"], "exceeds the 1 candidate"),
    (["evaluate", "--heads", "0:1", "--sample", "--temperature", "nan", "--out", "{out}"], "--temperature"),
    (["evaluate", "--heads", "0:1", "--sample", "--top-p", "1.5", "--out", "{out}"], "--top-p"),
    (["evaluate", "--heads", "0:1", "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    (["evaluate", "--heads", "0:1", "--judge", "", "--out", "{out}"], "no judge given"),
    (["evaluate", "--heads", "0:1", "--judge", "paper,,gcg", "--out", "{out}"], "empty judge name"),
    (["run", "--quick", "--judge", "seed,", "--out", "{out}"], "empty judge name"),
    (["evaluate", "--heads", "0:1", "--per-query", "--out", "{out}"], "--per-query needs --from"),
    (["run", "--model", "tiny", "--quick", "--full", "--out", "{out}"], "choose one of --quick and --full"),
    (["run", "--model", "tiny", "--quick", "--judge", "vibes", "--out", "{out}"], "unknown judge 'vibes'"),
    (["run", "--model", "tiny", "--quick", "--exclude", "9:9", "--out", "{out}"], "layer 9 .* out of range"),
    (["run", "--model", "tiny", "--quick", "--template", "nope", "--out", "{out}"], "unknown template 'nope'"),
    (["surgery", "--heads", "0:1", "--epsilon", "nan", "--out", "{out}"], "epsilon"),
    (["heads", "--model", "{root}/ok.json"], "is a file"),
    (["get-model", "nosuch"], "unknown model 'nosuch'"),
    # issue 25
    (["ships", "--dataset", "{root}/twice.csv", "--out", "{out}"], "twice.csv' names the column 'prompt' twice"),
    (["ships", "--dataset", "{root}/twice.json", "--out", "{out}"], "twice.json' repeats the key 'prompt'"),
    (["evaluate", "--from", "{root}/bad-layer.sahara.json", "--out", "{out}"], "bad-layer.sahara.json': layer 9"),
    (["evaluate", "--heads", "0:1", "--harmless", "{root}/long.json", "--out", "{out}"], "^[^0-9]*--harmless .*long.json: prompt 0 is"),
    (["heads", "--model", "{root}/bad-type"], "num_hidden_layers': TypeError: .*expected int, got str"),
    (["heads", "--model", "{root}/truncated.gguf"], "truncated.gguf' is truncated or corrupt"),
    (["ships", "--prompt", "hi", "--out", "/"], "'/' is not empty"),
    (["doctor", "--timeout", "0"], "--timeout must be a positive number"),
    (["ships", "--prompt", "hi", "--range", "1-2", "--out", "{out}"], "--range applies to --dataset, not to --prompt"),
    (["ships", "--dataset", "maliciousinstruct", "--range", "51-120", "--out", "{out}"],
     r"has 100 prompts; --range 51-120 ends past them \(--range 51-100 is the rest\)"),
    (["sahara", "--dataset", "maliciousinstruct", "--range", "1-8", "--limit", "4", "--out", "{out}"], "one of --limit and --range"),
    (["sahara", "--dataset", "maliciousinstruct", "--range", "8", "--out", "{out}"], "is not A-B"),
    (["evaluate", "--heads", "0:1", "--range", "0-4", "--out", "{out}"], r"need 1 <= A <= B"),
    (["evaluate", "--heads", "0:1", "--range", "1-4", "--limit", "2", "--out", "{out}"], "one of --limit and --range"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_one_line_exit_2(argv, message, folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(root=folders, out=out) for a in argv]
    if message == "":  # the one row that must succeed (a JSON list of strings ignores --column)
        assert main(argv) == 0
        return
    with pytest.raises(SystemExit) if _is_usage_error(message) else _nothing():
        code, _, err = run(argv, capsys)
        assert code == 2
    if _is_usage_error(message):
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(message, lines[0]), lines[0]
    # Nothing half-written that a later --resume could misread.
    assert not out.exists() or not any(out.iterdir())


def _is_usage_error(message):
    return message in ("invalid float value", "--out", "one of the arguments --prompt --dataset is required", "invalid choice",
                       "argument --out: is empty")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_heads_prints_the_layout(capsys):
    code, out, _ = run(["heads", "--heads", "0-1:*"], capsys)
    assert code == 0
    assert "query heads   8 per layer (32 in all)" in out and "selected      16 heads" in out


def test_ships_end_to_end_and_no_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(["ships", "--prompt", "How do I pick a lock?", "--heads", "0:*", "--out", str(out)], capsys)
    assert code == 0, err
    assert "Top heads by mean Ships over 1 query" in stdout and "[1/1]" in err
    assert json.loads((out / "ships.json").read_text())["config"]["heads"] == "0:*"
    code, _, err = run(["ships", "--prompt", "How do I pick a lock?", "--out", str(out)], capsys)
    assert code == 2 and "already holds a finished Ships run" in err


def test_console_script_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "safety_heads.cli", "heads", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"safety-heads: error: model folder '{tmp_path / 'nope'}' does not exist"


def test_ctrl_c_at_start_up_is_one_line(monkeypatch, capsys):
    """The parser and the library's imports run inside main()'s try, so a Ctrl-C there is answered like one later."""
    import safety_heads.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["heads"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["safety-heads: interrupted; finished work is kept (rerun with --resume to continue)"]


def test_importing_the_command_line_does_not_import_torch():
    # Importing torch takes a second or more; outside main()'s try, a Ctrl-C in it would end in a traceback.
    probe = "import sys, safety_heads.cli; print(sorted(m for m in ('torch', 'transformers', 'nnsight') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_a_ctrl_c_after_a_finished_run_does_not_kill_the_program():
    """entry(): once main() has returned, a SIGINT during the interpreter's shutdown leaves the exit code alone."""
    probe = ("import atexit, os, signal, safety_heads.cli as cli\n"
             "cli.main = lambda: 0\n"
             "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n"
             "cli.entry()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.returncode, done.stderr)


@pytest.mark.parametrize("code", [0, 2, 130])
def test_the_program_exits_with_mains_code(code):
    probe = f"import safety_heads.cli as cli\ncli.main = lambda: {code}\ncli.entry()\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == code and done.stderr == ""


def test_an_interrupt_a_library_turned_into_another_error_is_still_an_interrupt(monkeypatch, capsys):
    """Measured once: a Ctrl-C inside a transformers lazy import came back as "could not load the config". main()
    remembers the signal, so whatever error follows it, the user sees the interrupt (and the next Ctrl-C works)."""
    import os
    import signal
    import time

    import safety_heads.cli as cli
    from safety_heads.errors import UserError

    def swallowing(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises in here
        except BaseException:  # noqa: BLE001 - what the library did
            raise UserError("could not load the config of 'demo': Could not import module 'LlamaConfig'") from None
        return 0

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(cli, "command_heads", swallowing)
    assert cli.main(["heads"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [cli.INTERRUPTED]
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    monkeypatch.setattr(cli, "command_heads", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # without an interrupt, a bug keeps its traceback
        cli.main(["heads"])


def test_invalid_utf8_on_the_real_command_line_is_one_line(tmp_path):
    """The bytes ff fe as a real argv (Python decodes them to lone surrogates), in a real process."""
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "safety_heads.cli", "ships", "--prompt", b"\xff\xfe", "--out", str(out)],
                            capture_output=True)
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not valid text" in lines[0] and not out.exists()


def test_every_flag_with_a_default_shows_it_in_help():
    from safety_heads.cli import _Help, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    missing = []
    for name, command in commands.items():
        formatter = _Help(name)
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and action.default not in (None, "==SUPPRESS==") and action.default is not False:
                if "default" not in formatter._get_help_string(action).lower():
                    missing.append(f"{name} {action.option_strings[0]}")
    assert not missing
    ships_help = " ".join(commands["ships"].format_help().split())
    assert "--seed SEED seed of the sampled estimator's draws (default 0)" in ships_help  # it said no default


def test_flag_defaults_come_from_the_config_dataclasses(monkeypatch):
    """The dataclass is where a default lives: change it there and the command line follows; and every flag that
    sets a config field has that field's default."""
    from dataclasses import MISSING, fields, is_dataclass

    from safety_heads.cli import _command_configs, build_parser
    from safety_heads.ships import ShipsConfig

    monkeypatch.setattr(ShipsConfig.__dataclass_fields__["top_k"], "default", 7)
    assert build_parser().parse_args(["ships", "--prompt", "x", "--out", "o"]).top_k == 7
    monkeypatch.undo()
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    checked = 0
    for name, configs in _command_configs().items():
        # A nested config's field defaults to what the outer config's default gives it (evaluate: no --ablation given)
        nested = {dest: getattr(value, dest) for cls in configs for f in fields(cls)
                  if is_dataclass(value := (f.default if f.default is not MISSING else f.default_factory())) and
                  not isinstance(value, type) for dest in value.__dataclass_fields__}
        for action in commands[name]._actions:
            field = next((f for cls in configs for f in fields(cls) if f.name == action.dest), None)
            if field is None or action.required:
                continue
            expected = field.default if field.default is not MISSING else field.default_factory()
            assert action.default == nested.get(action.dest, expected), f"{name} {action.option_strings}"
            checked += 1
    assert checked > 100
    assert parser.parse_args(["ships", "--prompt", "x", "--out", "o"]).model == "demo"  # one default model everywhere
    assert parser.parse_args(["heads"]).model == parser.parse_args(["run", "--out", "o"]).model == "demo"


def test_every_config_field_has_a_flag_or_is_left_out_on_purpose():
    """A field added to a config gets a flag (cli/parser.py), or a line in NOT_FLAGS saying it has none."""
    from dataclasses import fields

    from safety_heads.cli import NOT_FLAGS, _command_configs, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    missing, needless = [], []
    for name, configs in _command_configs().items():
        for cls in configs:
            for field in fields(cls):
                flagged = (cls.__name__, field.name) in commands[name].config_fields
                excluded = field.name in NOT_FLAGS.get(cls.__name__, ())
                if flagged == excluded:
                    (needless if flagged else missing).append(f"{name} {cls.__name__}.{field.name}")
    assert missing == [] and needless == []


def test_flags_are_generated_from_the_field(monkeypatch):
    """Name, type, switch direction and the default in the help all come from the dataclass field."""
    from safety_heads.cli import build_parser
    from safety_heads.engine import EngineConfig

    parser = build_parser()
    args = parser.parse_args(["ships", "--prompt", "x", "--out", "o", "--no-prefix-reuse", "--max-batch-rows", "3",
                              "--memory-budget", "64", "--remote-backoff", "0.5"])
    assert (args.prefix_reuse, args.max_batch_rows, args.memory_budget_mb, args.remote_backoff_s) == (False, 3, 64.0, 0.5)
    args = parser.parse_args(["evaluate", "--heads", "0:1", "--out", "o", "--sample", "--top-k-sampling", "5", "--top-k", "2"])
    assert (args.sample, args.top_k_sampling, args.top_k) == (True, 5, 2)
    monkeypatch.setattr(EngineConfig.__dataclass_fields__["remote_attempts"], "default", 9)
    sahara_help = " ".join(next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
                           .choices["sahara"].format_help().split())
    assert "timeouts and HTTP 5xx (default 9)" in sahara_help


def test_a_value_the_help_marks_as_the_default_is_the_default():
    """'svd (default) or paper-era', 'fisher (...; default) or sampled': the marked value is the flag's real default."""
    import re

    from safety_heads.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    checked = 0
    for name, command in commands.items():
        for action in command._actions:
            for marked in re.findall(r"([\w.-]+) \((?:[^()]*; )?default\)", action.help or ""):
                assert marked == action.default, f"{name} {action.option_strings[0]}: help says {marked}, default {action.default}"
                checked += 1
    assert checked >= 8


def test_range_takes_a_slice_and_records_it(tmp_path, capsys):
    """--range 51-53 on ships and sahara: exactly MaliciousInstruct's prompts 51 to 53, said and recorded."""
    from safety_heads.data import load_prompts

    expected = load_prompts("maliciousinstruct")[50:53]
    for command in ("ships", "sahara"):
        out = tmp_path / command
        extra = ["--steps", "1"] if command == "sahara" else []
        assert main([command, "--model", "tiny", "--dataset", "maliciousinstruct", "--range", "51-53", *extra,
                     "--out", str(out)]) == 0
        assert "3 queries of maliciousinstruct 51-53" in capsys.readouterr().out
        record = json.loads((out / f"{command}.json").read_text())
        assert record["config"]["range"] == "51-53" and record["config"]["positions"] == [51, 53]
        assert record["config"]["n_queries"] == 3
    assert [q["query"] for q in json.loads((tmp_path / "ships" / "ships.json").read_text())["queries"]] == expected


def test_run_says_which_mode_it_chose(capsys):
    """Without --quick or --full the mode follows this machine's GPU (also with --remote): the first line says which."""
    import torch

    assert main(["run", "--model", "tiny", "--steps", "0", "--out", "unused"]) == 2  # stops at the config check
    err = capsys.readouterr().err
    expected = "mode: --full (a local GPU" if torch.cuda.is_available() else "mode: --quick (no local GPU"
    assert err.startswith(expected) and "--steps must be at least 1" in err
    assert main(["run", "--model", "tiny", "--quick", "--steps", "0", "--out", "unused"]) == 2
    assert "mode:" not in capsys.readouterr().err  # chosen by the user: nothing to say


# -- issue 25: SIGTERM is answered like Ctrl-C; nothing from a data file reaches the terminal unescaped -------------


def test_sigterm_stops_in_one_line_with_status_143(monkeypatch, capsys):
    """The signal is sent by the command to its own process and handled before the next bytecode (not timed)."""
    import os
    import signal
    import time

    import safety_heads.cli as cli

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here
        return 0

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "command_heads", terminated)
    assert cli.main(["heads"]) == 143
    assert capsys.readouterr().err.strip().splitlines() == [cli.TERMINATED]
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_the_program_exits_143_after_sigterm():
    probe = "import safety_heads.cli as cli\ncli.main = lambda: 143\ncli.entry()\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr == ""


def test_a_prompt_from_a_data_file_reaches_the_terminal_escaped(tmp_path, capsys):
    data = tmp_path / "hostile.json"
    data.write_text(json.dumps(["Clear\x1b[2J\x1b]0;owned\x07 the screen", "Read \u202ethis backwards\u2066", "fine"]))
    assert main(["ships", "--dataset", str(data), "--heads", "0:0", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    for stream in (captured.err, captured.out):
        assert not any(c in stream for c in "\x1b\x07\u202e\u2066"), stream
    assert "\\x1b[2J" in captured.err and "\\u202e" in captured.err
    (tmp_path / "keys.json").write_text(json.dumps([{"\x1b[2Jtext": "a", "other\u202e": "b"}]))  # quoted in the error
    assert main(["ships", "--dataset", str(tmp_path / "keys.json"), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\\x1b[2Jtext" in err and len(err.strip().splitlines()) == 1
