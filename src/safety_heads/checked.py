"""Checked: the base of every config dataclass (ShipsConfig, EngineConfig, ...), so a config is validated once, where
it is made, and never used unchecked: the dataclass's generated __init__ (and dataclasses.replace, which calls it)
ends in __post_init__, which calls the config's own `validate`. A bad value is a UserError at construction, in one
line, before a model loads or a folder is touched.

    @dataclass
    class MyConfig(Checked):
        steps: int = 3

        def validate(self) -> None:
            if self.steps < 1:
                raise UserError(f"--steps must be at least 1, not {self.steps}")
"""

from __future__ import annotations


class Checked:
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError for a bad setting; every subclass says what it checks."""
