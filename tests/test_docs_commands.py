"""Every `safety-heads ...` command in README.md, docs/ and the demo model's README parses with the real parser.

A renamed flag, a dropped option or a missing required one (such as --out) in a documented command fails here, not in
a reader's terminal. Nothing runs: each command is only parsed (`build_parser().parse_args`), so no model loads.
Taken: every line of a fenced code block that calls safety-heads (backslash continuations joined, `# comments` and
`VAR=value` prefixes dropped), and every inline `safety-heads ...` code span in the prose that gives a flag. An
inline span that ends in " ..." is a fragment (other flags left out on purpose): its command and every flag it names
must exist; everything else must parse whole, required flags included.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from safety_heads.cli.parser import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "src" / "safety_heads" / "demo" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CALL = re.compile(r"(?:^|&&|;|\|\||\s)safety-heads\s+(.*)$")
INLINE = re.compile(r"(?<!`)`(safety-heads [^`]+)`(?!`)")


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each safety-heads call in the page's fenced code blocks."""
    found, fenced, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = number
        joined = pending + line.strip()
        if joined.endswith("\\"):
            pending = joined[:-1] + " "
            continue
        pending = ""
        command = _strip_comment(joined)
        match = CALL.search(command)
        if match:
            found.append((start, "safety-heads " + match.group(1).split("&&")[0].strip()))
    return found


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # outside quotes)."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
    except ValueError:
        return line
    return " ".join(shlex.quote(word) for word in words)


def documented_commands() -> list[tuple[str, str]]:
    commands = []
    for page in PAGES:
        text = page.read_text()
        where = page.relative_to(ROOT)
        commands += [(f"{where}:{number}", command) for number, command in _code_lines(text)]
        for number, line in enumerate(text.splitlines(), 1):
            if line.lstrip().startswith(("```", "    ")):
                continue
            commands += [(f"{where}:{number}", span) for span in INLINE.findall(line) if " --" in span]
    return commands


COMMANDS = documented_commands()


def test_the_pages_hold_the_commands_this_test_is_for():
    """The extraction finds the commands a reader copies, so an empty or broken extraction cannot pass silently."""
    where = {place.split(":")[0] for place, _ in COMMANDS}
    assert {"README.md", "docs/run.md", "docs/sahara.md", "docs/evaluate.md", "src/safety_heads/demo/README.md"} <= where
    assert len(COMMANDS) > 60
    assert ("README.md", "safety-heads run --quick --out runs/quickstart") in {(p.split(":")[0], c) for p, c in COMMANDS}


@pytest.mark.parametrize("place,command", COMMANDS, ids=[place for place, _ in COMMANDS])
def test_documented_command_parses(place, command, capsys):
    if command.endswith(" ..."):
        return check_fragment(place, command)
    argv = shlex.split(command)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code == 0:  # --help, --version
            return
        error = capsys.readouterr().err.strip().splitlines()[-1:]
        pytest.fail(f"{place}: `{command}` does not parse (exit {stop.code}): {error}")


def check_fragment(place: str, command: str) -> None:
    """`safety-heads ships --score NAME ...`: the command exists and so does every flag it names."""
    words = shlex.split(command.removesuffix(" ..."))[1:]
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert words and words[0] in commands, f"{place}: `{command}` names no command"
    options = {option for action in commands[words[0]]._actions for option in action.option_strings}
    for word in words[1:]:
        flag = word.split("=", 1)[0]
        assert not flag.startswith("--") or flag in options, f"{place}: `{command}`: {words[0]} has no {flag}"


def test_a_broken_command_would_fail():
    """The check has teeth: the run.md example before issue 27 (no --out) and a renamed flag are refused."""
    for argv in (["ships", "--prompt", "How to make a bomb?", "--epsilon", "1e-5"],
                 ["evaluate", "--heads", "0:1", "--judges", "gcg", "--out", "x"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    with pytest.raises(AssertionError, match="ships has no --scores"):
        check_fragment("here", "safety-heads ships --scores NAME ...")


def test_sahara_page_names_every_sahara_option():
    """docs/sahara.md lists all of `safety-heads sahara`'s options (it once left out four the README used)."""
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    page = (ROOT / "docs" / "sahara.md").read_text()
    options = [o for action in commands["sahara"]._actions for o in action.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and not re.search(rf"`{re.escape(o)}[ `=]", page)]
    assert len(options) > 30 and not missing, f"docs/sahara.md does not name {missing}"
