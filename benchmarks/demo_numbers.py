"""The numbers every command writes on the demo model, as one canonical JSON: the before/after check of a refactor.

Runs ships (exact, kl and refusal-direction; estimate+verify; mean ablation), sahara (with and without the guard,
pruned candidates), evaluate (--from a sahara.json, per query from a ships.json) and `run --quick` through the command
line (the interface a refactor keeps), then keeps every number, string and list of the JSON results except what
may change between two runs of the same code (wall times, FLOP rates, library versions, paths). Two fingerprints
made on the same machine must be byte-identical:

    python benchmarks/demo_numbers.py --out /tmp/before.json            # on the old code
    python benchmarks/demo_numbers.py --out /tmp/after.json --compare /tmp/before.json

Float results differ between CPUs (AVX2 vs AVX-512 kernels round differently), so a fingerprint is compared only
with one made on the same machine; it is not a stored expectation. Takes about five minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Keys whose values are not results: how long it took, what it cost, where files went, which versions ran.
VOLATILE = {"seconds", "gflop_per_s", "timings_seconds", "versions", "compute", "elapsed_s", "stages", "source_path",
            "out", "path", "report", "engine_flops", "flops"}

COMMANDS = {
    "ships-exact": "ships --dataset maliciousinstruct --limit 6 --out {out}",
    "ships-refusal": "ships --dataset maliciousinstruct --limit 3 --score refusal-direction --out {out}",
    "ships-verify": "ships --dataset maliciousinstruct --limit 2 --method estimate+verify --top-k 5 --out {out}",
    "ships-mean": "ships --dataset jailbreakbench --limit 2 --ablation mean --heads 0-1:* --out {out}",
    "sahara": "sahara --dataset maliciousinstruct --limit 8 --steps 2 --out {out}",
    "sahara-guard": "sahara --dataset maliciousinstruct --limit 8 --steps 2 --guard harmless-val --guard-limit 4 "
                    "--guard-tokens 8 --out {out}",
    "sahara-pruned": "sahara --dataset maliciousinstruct --limit 8 --steps 2 --candidates 6 --rank-by {runs}/ships-exact/ships.json "
                     "--readout last-layer --out {out}",
    "evaluate": "evaluate --dataset maliciousinstruct --limit 4 --harmless-limit 4 --max-new-tokens 12 "
                "--from {runs}/sahara/sahara.json --out {out}",
    "evaluate-per-query": "evaluate --limit 4 --per-query --top-k 2 --max-new-tokens 12 --harmless= "
                          "--from {runs}/ships-exact/ships.json --out {out}",
    "run": "run --quick --limit 3 --steps 2 --max-new-tokens 10 --out {out}",
}


def canonical(value, runs: str):
    """`value` with volatile keys dropped, recursively, and the runs folder written as {runs} in every string (a
    path recorded in a result, such as --from or --rank-by); floats kept as JSON writes them (repr)."""
    if isinstance(value, dict):
        return {k: canonical(v, runs) for k, v in sorted(value.items()) if k not in VOLATILE}
    if isinstance(value, list):
        return [canonical(item, runs) for item in value]
    if isinstance(value, str):
        return value.replace(runs, "{runs}")
    return value


def fingerprint(runs: Path, reuse: bool = False) -> dict:
    record = {}
    for name, template in COMMANDS.items():
        out = runs / name
        command = [sys.executable, "-m", "safety_heads.cli", *template.format(out=out, runs=runs).split()]
        if not reuse:
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if done.returncode != 0:
                raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        files = sorted(path for path in out.rglob("*.json"))
        record[name] = {str(path.relative_to(out)): canonical(json.loads(path.read_text()), str(runs)) for path in files}
        print(f"{name}: {len(files)} JSON files", file=sys.stderr)
    return record


def first_difference(old, new, where: str = "") -> str | None:
    if type(old) is not type(new):
        return f"{where}: {old!r:.80} -> {new!r:.80}"
    if isinstance(old, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                return f"{where}/{key}: only in {'after' if key not in old else 'before'}"
            found = first_difference(old[key], new[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(old, list):
        if len(old) != len(new):
            return f"{where}: {len(old)} items -> {len(new)}"
        for index, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    return None if old == new else f"{where}: {old!r:.80} -> {new!r:.80}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the fingerprint (JSON)")
    parser.add_argument("--compare", help="a fingerprint made before: report the first difference, exit 1 if any")
    parser.add_argument("--runs", help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="read the runs already in --runs instead of running them")
    args = parser.parse_args()
    if args.reuse and not args.runs:
        parser.error("--reuse needs --runs")
    with tempfile.TemporaryDirectory() as temporary:
        record = fingerprint(Path(args.runs or temporary), args.reuse)
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    Path(args.out).write_text(text)
    if args.compare:
        before = Path(args.compare).read_text()
        if before == text:
            print(f"identical: {args.out} and {args.compare} ({len(text)} bytes)")
            return 0
        print(f"DIFFERENT: {first_difference(json.loads(before), record)}")
        return 1
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
