"""Progress lines on stderr.

A line is written with its newline in one call. `print(line)` writes the text and the newline separately, so a Ctrl-C
landing between the two left the text pending in stderr's buffer and glued the next message (the one-line
"interrupted" notice) onto it.
"""

import re
import sys
import time
from typing import Callable


def print_progress(line: str) -> None:
    """Write one progress line to stderr, newline included, in a single write."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class StageProgress:
    """Prefixes a stage's progress lines with its name and elapsed time, and estimates the time left in the stage
    from the first 'k/N' count in the line (queries, answers, layers)."""

    def __init__(self, name: str, index: int, total: int, emit: Callable[[str], None]):
        self.name, self.label, self.emit, self.start = name, f"[{index}/{total} {name}]", emit, time.monotonic()

    def __call__(self, line: str) -> None:
        elapsed = time.monotonic() - self.start
        match = re.search(r"(\d+)/(\d+)", line)
        estimate = ""
        if match and int(match.group(1)) > 0 and int(match.group(2)) >= int(match.group(1)):
            done, total = int(match.group(1)), int(match.group(2))
            estimate = f", ~{elapsed * (total - done) / done:.0f}s left in this count"
        self.emit(f"{self.label} {elapsed:.0f}s{estimate} | {line}")
