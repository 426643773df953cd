"""Library warnings are held while a command runs, so that a one-line error stands alone on stderr.

transformers, accelerate, nnsight and torch write warnings to stderr as they go (transformers 5.19, for one, warns
"The following generation flags are not valid and may be ignored: ['temperature']" whenever nnsight wraps a model).
Such a line printed before our error line breaks the contract that bad input gives exactly one line. So while a
command runs their log records and Python warnings are collected; when it returns they are printed after its own
output, once each; when it raises (a one-line error, Ctrl-C, a bug's traceback) they are dropped: the error is
what the user must act on, and a warning is not its cause.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARY_LOGGERS = ("transformers", "accelerate", "nnsight", "huggingface_hub", "torch")


class _Held(logging.Handler):
    """Keeps each warning's text, in order, once."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    def emit(self, record: logging.LogRecord) -> None:
        self.add(f"[{record.name.split('.')[0]}] {record.getMessage()}")


@contextmanager
def held_library_warnings() -> Iterator[None]:
    """Collect library warnings while the block runs; print them after it if it returns, drop them if it raises.
    transformers' own logging must be set up before this (its first use adds a stderr handler to its logger)."""
    held = _Held()
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [held], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
        for warning in caught:
            held.add(f"[warning] {warning.category.__name__}: {warning.message}")
        for line in held.lines:
            print(line, file=sys.stderr)
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
