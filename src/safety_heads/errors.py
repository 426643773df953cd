"""The one exception type users see.

Anything the user can fix (a wrong path, a head out of range, a bad epsilon) raises `UserError` with a message that
says what is wrong and how to fix it. The command line prints that message on one line and exits with code 2;
everything else is a bug and keeps its traceback.
"""

from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error, shortened to fit a UserError's one
    line), or its type's name when it has none. A first line that only introduces the next ("Validation error for
    field 'x':") is joined with that next line, which holds the reason."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


@contextmanager
def about(where: str | None):
    """A UserError raised inside names `where` first (the data set or file a checked prompt came from): the checks
    deeper down only know "prompt 3"."""
    try:
        yield
    except UserError as error:
        if where is None:
            raise
        raise UserError(f"{where}: {error}") from None
