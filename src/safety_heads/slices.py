"""Which prompts of a data set: a slice named with the set ("maliciousinstruct:51-100"), `--range A-B`, and the
held-out slice after the prompts a search used. 1-based and inclusive, as the docs write them; data.load_prompts
reads a slice name anywhere a data set is named.

    safety-heads evaluate --dataset maliciousinstruct --range 51-58 --heads 0:1 --out runs/eval-slice
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import load_prompts, slice_match
from .errors import UserError


def held_out(datasets: str, used: dict[str, int], limit: int | None) -> str:
    """A comma-separated list of data sets with each one in `used` (name -> how many of its first prompts a search
    read) replaced by the slice after those, at most `limit` long: prompts no search has seen. A data set not in
    `used`, or given with its own slice ("maliciousinstruct:51-100"), is kept as given."""
    names = []
    for name in [part.strip() for part in datasets.split(",") if part.strip()]:
        if name not in used:
            names.append(name)
            continue
        total = len(load_prompts(name))
        first = used[name] + 1
        if first > total:
            raise UserError(f"no held-out prompts left in {name}: the searches use all {total}; lower --ships-limit / "
                            f"--sahara-limit, evaluate on other --eval-datasets, or add --no-held-out")
        names.append(slice_name(name, first, total if limit is None else min(total, first + limit - 1)))
    return ",".join(names)


def slice_name(name: str, first: int, last: int | None = None) -> str:
    """The name of prompts first..last (1-based, inclusive; None: to the end) of a data set, as load_prompts reads it."""
    return f"{name}:{first}-{'' if last is None else last}"


@dataclass(frozen=True)
class PromptRange:
    """`--range A-B`: a data set's prompts A to B, 1-based and inclusive, as papers name slices ("MaliciousInstruct
    51-100"). `offset` and `count` are what load_prompts takes."""

    first: int
    last: int

    @property
    def offset(self) -> int:
        return self.first - 1

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_range(text: str | None) -> PromptRange | None:
    """'51-100' -> PromptRange(51, 100); None stays None. A bad range is a one-line UserError."""
    if text is None:
        return None
    parts = str(text).strip().split("-")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise UserError(f"--range {text!r} is not A-B (1-based, inclusive), e.g. --range 51-100")
    first, last = (int(part) for part in parts)
    if first < 1 or last < first:
        raise UserError(f"--range {text!r}: need 1 <= A <= B (1-based, inclusive), e.g. --range 51-100")
    return PromptRange(first, last)


def split_slice(name: str) -> tuple[str, int, int | None]:
    """'maliciousinstruct:51-100' -> ('maliciousinstruct', 51, 100); a name without a slice -> (name, 1, None)."""
    sliced = slice_match(name)
    if not sliced:
        return name, 1, None
    return sliced["name"], int(sliced["first"]), int(sliced["last"]) if sliced["last"] else None


def load_slice(source: str, column: str | None = None, limit: int | None = None, prompt_range: str | None = None,
               dedupe: bool = False) -> list[str]:
    """The prompts of `source` that --limit N (the first N) or --range A-B (prompts A to B) select; both at once is
    an error, and so is a range that ends past the data set (it would silently give fewer prompts than asked), or a
    range on a name that already holds a slice (NAME:A-B)."""
    chosen = parse_range(prompt_range)
    if chosen is None:
        return load_prompts(source, column=column, limit=limit, dedupe=dedupe)
    if limit is not None:
        raise UserError(f"give one of --limit and --range, not both (--range {chosen} already says how many)")
    if split_slice(source) != (source, 1, None):
        raise UserError(f"'{source}' is already a slice; give it as the name or as --range {chosen}, not both")
    every = load_prompts(source, column=column, dedupe=dedupe)
    if chosen.first > len(every):
        raise UserError(f"{source} has {len(every)} prompts; --range {chosen} starts past them")
    if chosen.last > len(every):
        raise UserError(f"{source} has {len(every)} prompts; --range {chosen} ends past them (--range "
                        f"{chosen.first}-{len(every)} is the rest)")
    return every[chosen.offset : chosen.last]


def positions(source: str, prompt_range: str | None, count: int) -> list[int]:
    """[first, last]: the 1-based positions in its data set of the `count` prompts a command used, from --range A-B
    or a NAME:A-B slice (recorded in results, so a reader can tell which slice was measured and whether two slices
    overlap)."""
    chosen = parse_range(prompt_range)
    first = chosen.first if chosen else split_slice(source)[1]
    return [first, first + count - 1]
