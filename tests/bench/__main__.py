"""Run the benchmarks: `python -m tests.bench [NAME...] [--json PATH] [--workdir DIR] [--keep]`."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from edgeforward.logs import configure_logging

from .common import Result, fmt, machine

BENCHES = ("ingest", "serial", "drain", "reconnect", "memory", "idle", "footprint", "wear", "layout", "startup")


def _row(result: Result) -> str:
    ratio = "" if result.ratio is None else f"{result.ratio:.3g}"
    met = {True: "yes", False: "NO", None: "-"}[result.met]
    return (
        f"{result.bench:<8} {result.name:<46} {fmt(result.value):>12} {result.unit:<12} "
        f"{'' if result.baseline is None else fmt(result.baseline):>12}  {result.baseline_name:<40} "
        f"{ratio:>7}  {met:<3} {result.target}"
    )


def markdown(results: list[Result], facts: dict[str, Any]) -> str:
    """The results as the README's table."""
    lines = [
        "| benchmark | figure | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        baseline = "" if result.baseline is None else f"{fmt(result.baseline)} {result.unit} ({result.baseline_name})"
        ratio = "" if result.ratio is None else f"{result.ratio:.3g}"
        met = {True: "yes", False: "**no**", None: "-"}[result.met]
        lines.append(
            f"| {result.bench}: {result.name} | {fmt(result.value)} {result.unit} | {baseline} | {ratio} "
            f"| {result.target} | {met} |"
        )
    lines.append("")
    lines.append(
        f"Machine: {facts['cores']} cores, {facts['cpu']}, Linux {facts['kernel']}, "
        f"Python {facts['python']}, SQLite {facts['sqlite']}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks (all by default), print the table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="any of " + ", ".join(BENCHES) + " (default: all)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--workdir", type=Path, help="where the databases go (default: a fresh temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    names = args.names or list(BENCHES)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edgeforward-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # Only trouble from the parts under test: their info lines would bury the table.
    configure_logging("warning", "console")
    facts = machine()
    print(f"machine: {facts}", flush=True)
    results: list[Result] = []
    failed: dict[str, str] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for name in names:
            print(f"--- {name}", flush=True)
            began = time.perf_counter()
            try:
                module = importlib.import_module(f"tests.bench.bench_{name}")
                produced: list[Result] = module.run(work)
            except Exception as exc:  # one failing benchmark must not hide the others
                traceback.print_exc()
                failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            finally:
                timings[name] = round(time.perf_counter() - began, 1)
            for result in produced:
                print(_row(result), flush=True)
                if result.notes:
                    print(f"{'':<9}{result.notes}", flush=True)
            results.extend(produced)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    print(f"\n{markdown(results, facts)}\n")
    print(f"took {total:.0f} s: {timings}")
    for name, error in failed.items():
        print(f"FAILED {name}: {error}", file=sys.stderr)
    if args.json:
        document = {
            "machine": facts,
            "seconds": round(total, 1),
            "seconds_by_bench": timings,
            "results": [r.as_json() for r in results],
            "failed": failed,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
