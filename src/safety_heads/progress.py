"""Progress lines on stderr.

A line is written with its newline in one call. `print(line)` writes the text and the newline separately, so a Ctrl-C
landing between the two left the text pending in stderr's buffer and glued the next message (the one-line
"interrupted" notice) onto it.
"""

import sys


def print_progress(line: str) -> None:
    """Write one progress line to stderr, newline included, in a single write."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
