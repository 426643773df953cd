"""The `safety-heads` command. Each subcommand is a thin call into the library.

Flags map one to one onto the typed configs the Python API takes (ModelConfig, EngineConfig, ShipsConfig, ...), so
there is one schema. Anything the user can fix ends with one line on stderr and exit code 2; Ctrl-C with one line
and exit code 130; finished work is never lost (long runs checkpoint and `--resume`).

    safety-heads heads --model tiny
    safety-heads ships --model tiny --prompt "How do I pick a lock?" --out runs/ships
    safety-heads sahara --model tiny --dataset maliciousinstruct --limit 16 --out runs/sahara
    safety-heads evaluate --model tiny --dataset maliciousinstruct --limit 4 --heads 0:1 --out runs/eval
    safety-heads surgery --model tiny --heads 0:1,1:3 --out runs/surgery
    safety-heads doctor --model meta-llama/Llama-3.1-8B-Instruct
    safety-heads get-model qwen2.5-coder-0.5b-instruct --dir models

The package: flags.py turns the config dataclasses into flags, parser.py lists every command's flags, commands.py
holds the commands; this module is `main` (one-line errors, Ctrl-C) and `entry`, the console script.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import UserError
from .commands import (command_doctor, command_evaluate, command_export, command_get_model, command_heads,  # noqa: F401
                       command_run, command_sahara, command_ships, command_surgery)
from .flags import _Help, one_line, values_may_start_with_minus  # noqa: F401 - _Help: tests/test_cli.py
from .library_logs import held_library_warnings
from .parser import NOT_FLAGS, _command_configs, build_parser  # noqa: F401 - the tests read both tables

# Nothing here imports torch at module level: importing it takes a second or more, and a Ctrl-C in that second must
# still end in the one-line "interrupted" message, which only main()'s try can give (the library is imported there).


def _command(name: str):
    """A command's function, looked up when it runs (so that a test can replace one: cli.command_heads)."""
    return globals()["command_" + name.replace("-", "_")]


# A full disk, a quota, a read-only or forbidden place: the user can fix these, and finished work is in the checkpoint.
WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


INTERRUPTED = "safety-heads: interrupted; finished work is kept (rerun with --resume to continue)"
TERMINATED = "safety-heads: terminated (SIGTERM); finished work is kept (rerun with --resume to continue)"
# The exit codes of a command stopped by a signal it answered: 128 + the signal's number, as a shell reports them.
STOPPED = {signal.SIGINT: (130, INTERRUPTED), signal.SIGTERM: (143, TERMINATED)}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a scheduler's time limit, a container stopping), stopped as Ctrl-C is: one line, the
    checkpoint kept. A KeyboardInterrupt, so everything that lets Ctrl-C through lets it through too."""


def main(argv: Sequence[str] | None = None) -> int:
    interrupted: list[int] = []  # the signals that arrived while main() ran
    previous = {}
    try:  # everything, imports included: a Ctrl-C at start-up is answered like one later on
        if threading.current_thread() is threading.main_thread():
            for signum in STOPPED:
                previous[signum] = signal.signal(signum, lambda number, frame: _interrupt(interrupted, number))
        args = build_parser().parse_args(values_may_start_with_minus(sys.argv[1:] if argv is None else argv))
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # stderr carries our progress lines and one-line errors only
        with held_library_warnings():  # printed after the command's output; never before or beside an error line
            return _command(args.command)(args)
    except KeyboardInterrupt as stop:
        return _stopped(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    except Exception as error:
        if interrupted:  # a library turned the interrupt into another error (measured: a transformers lazy import)
            return _stopped(interrupted[0])
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            error = UserError(f"cannot write {error.filename or 'a result file'}: {error.strerror}; finished work is "
                              "kept: make room (or fix the permissions), then rerun with --resume")
        if isinstance(error, UserError):
            print(f"safety-heads: error: {one_line(str(error))}", file=sys.stderr)
            return 2
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stopped(signum: int) -> int:
    code, message = STOPPED[signum]
    print(message, file=sys.stderr)
    return code


def _interrupt(interrupted: list[int], signum: int) -> None:
    """The SIGINT and SIGTERM handler while main() runs: Python's own for SIGINT (raise KeyboardInterrupt; Terminated
    for SIGTERM), remembering which signal came."""
    interrupted.append(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def entry() -> None:
    """The `safety-heads` program: main(), then exit with its code. Once main() has returned, everything is written
    and reported, so a late Ctrl-C or SIGTERM (during the interpreter's shutdown) is ignored rather than turning a
    finished run into a death by signal."""
    try:
        code = main()
    except KeyboardInterrupt as stop:  # in the instant between main()'s handler and the next line
        code = _stopped(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
    for signum in STOPPED:
        signal.signal(signum, signal.SIG_IGN)
    if code in (130, 143):
        # Measured: after a Ctrl-C caught in the first seconds (while torch and transformers import), the interpreter's
        # shutdown sometimes ended the process by SIGINT (status -2, not 130: 2 of 7 tries); the cause inside the
        # shutdown is not pinned down. Checkpoint lines are fsynced as written and outputs are written atomically, so
        # nothing is left to flush but our own streams: leave directly (130 in 14 of 14 tries).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
