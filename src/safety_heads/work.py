"""Resumable work: how a method hands its finished units to whoever keeps them.

A method's `Job` has a `record` (everything that determines its numbers) and `run(finished)`, a generator that skips
the units in `finished`, yields each unit it computes (a query's scores, a Sahara layer's scores, a guard check, a
batch of answers) and returns the method's result. The runs layer (runs/) checkpoints the units as they come and
hands them back on resume; `finish` runs a job with nothing kept, for use from Python.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Protocol, TypeVar

Unit = TypeVar("Unit")
Result = TypeVar("Result", covariant=True)


class Job(Protocol[Result]):
    record: dict

    def run(self, finished: list) -> Generator[object, None, Result]: ...


def drain(work: Generator[object, None, Result], keep=None) -> Result:
    """Run `work` to the end, passing each unit it yields to `keep` (if given); its return value."""
    while True:
        try:
            unit = next(work)
        except StopIteration as done:
            return done.value
        if keep is not None:
            keep(unit)


def finish(job: Job[Result]) -> Result:
    """A job's result, computed from scratch and kept nowhere."""
    return drain(job.run([]))
