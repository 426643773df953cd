"""`python -m safety_heads.cli ...`: the `safety-heads` program."""

from . import entry

entry()
