"""The one exception type users see.

Anything the user can fix (a wrong path, a head out of range, a bad epsilon) raises `UserError` with a message that
says what is wrong and how to fix it. The command line prints that message on one line and exits with code 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error, shortened to fit a UserError's one
    line), or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
