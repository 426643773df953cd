"""Progress lines reach stderr whole: text and newline in one write, so a Ctrl-C cannot glue the next message on."""

import ast
import sys
from pathlib import Path

import safety_heads
from safety_heads.progress import print_progress


class RecordingStream:
    def __init__(self):
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def test_a_progress_line_is_one_write_with_its_newline(monkeypatch):
    stream = RecordingStream()
    monkeypatch.setattr(sys, "stderr", stream)
    print_progress("[1/8] top heads 0:1")
    print_progress("[2/8] top heads 0:2")
    assert stream.writes == ["[1/8] top heads 0:1\n", "[2/8] top heads 0:2\n"]
    assert stream.flushes == 2


def test_library_modules_print_progress_only_through_print_progress():
    # print(line, file=sys.stderr) writes the text and the newline separately: the race CI once hit with Ctrl-C.
    # Only the command line's own final messages and the demo's training scripts may use print for stderr.
    package = Path(safety_heads.__file__).parent
    allowed = set((package / "cli").glob("*.py")) | set((package / "demo").glob("*.py"))
    offenders = []
    for path in package.rglob("*.py"):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                if any(k.arg == "file" for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
