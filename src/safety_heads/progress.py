"""Progress lines on stderr, safe for a terminal.

A line is written with its newline in one call. `print(line)` writes the text and the newline separately, so a Ctrl-C
landing between the two left the text pending in stderr's buffer and glued the next message (the one-line
"interrupted" notice) onto it.

Lines quote prompts from data files, which may hold anything: an ESC sequence would drive the user's terminal (move the
cursor, retitle the window, hide text), a right-to-left override would reorder what they read. `terminal_safe`
escapes every such character before it is written.
"""

import re
import sys
import time
import unicodedata
from collections.abc import Callable

# Joiners shape emoji and scripts; they move nothing and hide nothing, so they are shown as they are.
_HARMLESS_FORMAT = {"\u200c", "\u200d"}


def terminal_safe(text: str) -> str:
    """`text` with every control, line break and invisible format character (ESC, CR, NEL, bidi overrides and
    isolates, zero-width spaces, ...) written as a visible escape (\\x1b, \\n, \\u202e); one line, shown as is."""
    return "".join(_escape(c) if _unsafe(c) else c for c in text)


def _unsafe(character: str) -> bool:
    if character == "\t" or character in _HARMLESS_FORMAT:
        return False
    return unicodedata.category(character) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn") and not character.isprintable()


def _escape(character: str) -> str:
    named = {"\n": "\\n", "\r": "\\r"}.get(character)
    if named:
        return named
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def print_progress(line: str) -> None:
    """Write one progress line to stderr, newline included, in a single write."""
    sys.stderr.write(terminal_safe(line) + "\n")
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
