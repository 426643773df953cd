"""cli/library_logs.py: library warnings never come before or beside a one-line error, whichever transformers
version is installed (5.19 warns about generation flags whenever nnsight wraps a model). In a real process:
test_cli.py's test_invalid_utf8_on_the_real_command_line_is_one_line (the demo model is loaded before that prompt is
refused; with transformers 5.19 it failed before the warnings were held)."""

import logging
import sys
import warnings

import safety_heads.cli as cli
from safety_heads.cli import main
from safety_heads.errors import UserError


def warn_like_a_library():
    logging.getLogger("transformers.generation").warning("The following generation flags are not valid: ['temperature']")
    logging.getLogger("accelerate").warning("some placement note")
    warnings.warn("a torch-style user warning", UserWarning, stacklevel=2)


def test_a_bad_input_after_library_warnings_is_one_line(monkeypatch, capsys):
    def failing(args):
        warn_like_a_library()
        raise UserError("the prompt is bad")

    monkeypatch.setattr(cli, "command_heads", failing)
    assert main(["heads"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["safety-heads: error: the prompt is bad"]


def test_a_finished_command_prints_the_held_warnings_after_its_output(monkeypatch, capsys):
    def working(args):
        warn_like_a_library()
        warn_like_a_library()  # held once each
        print("result line", file=sys.stderr)
        return 0

    monkeypatch.setattr(cli, "command_heads", working)
    assert main(["heads"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "result line",
        "[transformers] The following generation flags are not valid: ['temperature']",
        "[accelerate] some placement note",
        "[warning] UserWarning: a torch-style user warning",
    ]


def test_library_loggers_are_restored_after_the_command(monkeypatch):
    logger = logging.getLogger("transformers")
    before = (logger.handlers[:], logger.propagate)
    monkeypatch.setattr(cli, "command_heads", lambda args: 0)
    main(["heads"])
    assert (logger.handlers, logger.propagate) == before

