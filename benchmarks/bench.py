"""`make bench`: run the speed benchmarks, print each figure beside its baseline, and keep them in docs/benchmarks.md.

    python -m benchmarks.bench                      # every benchmark, results into docs/benchmarks.md
    python -m benchmarks.bench --only embed_score_cpu --only reruns
    python -m benchmarks.bench --quick              # tiny sizes: checks the code, the figures mean nothing

Each benchmark's results replace its own block of docs/benchmarks.md (between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`), stamped with the machine, the date and the library versions, so `--only` refreshes one
block and leaves the others and the hand-written analysis around them alone. A quick run writes nowhere unless
`--output` says where.
"""

import argparse
import datetime
import os
import platform
import re
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Optional

from benchmarks.speed import Row, load

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = PROJECT_ROOT / "docs" / "benchmarks.md"
END_OF_RESULTS = "<!-- end of results -->"
VERSIONED = ("torch", "sentence-transformers", "transformers", "llama_cpp_python", "distilabel", "kfp")


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, usable cores, load, date, Python and library versions."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = []
    for name in VERSIONED:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{cpu_model()}, {cores} cores (load average {load:.1f} at the start), {date}; Python "
            f"{platform.python_version()}, {', '.join(versions)}")


def _figure(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2e}"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measure | ours | baseline | unit | ratio | note |", "|---|---:|---:|---|---:|---|"]
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        lines.append(f"| {row.name} | {_figure(row.ours)} | {_figure(row.baseline)} | {row.unit} | {ratio} | "
                     f"{row.note} |")
    return "\n".join(lines)


def block(name: str, rows: list[Row], seconds: float, quick: bool, machine_line: str) -> str:
    """A benchmark's block of docs/benchmarks.md, its markers included."""
    size = " (--quick: tiny sizes, not figures)" if quick else ""
    return (f"<!-- bench:{name} -->\n`{name}`{size}, {seconds:.0f} s: {machine_line}\n\n{table(rows)}\n"
            f"<!-- /bench:{name} -->")


def update_document(text: str, blocks: dict[str, str]) -> str:
    """`text` with each named block replaced, or added before the end-of-results marker (else at the end)."""
    for name, new in blocks.items():
        pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: new, text)
        elif END_OF_RESULTS in text:
            text = text.replace(END_OF_RESULTS, f"{new}\n\n{END_OF_RESULTS}")
        else:
            text = f"{text.rstrip()}\n\n{new}\n"
    return text


def run(names: list[str], quick: bool, output: Optional[Path]) -> dict[str, list[Row]]:
    """Run the named benchmarks (all when empty), print their tables, write their blocks into `output`."""
    benchmarks = load()
    unknown = [name for name in names if name not in benchmarks]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(benchmarks)}")
    machine_line = machine()
    print(machine_line, flush=True)
    results, blocks = {}, {}
    for name in names or list(benchmarks):
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            rows = benchmarks[name](quick)
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not lose the others' figures
            traceback.print_exc()
            rows = [Row(f"{name} failed", float("nan"), None, "-", note=f"{type(error).__name__}: {error}"[:300])]
        seconds = time.perf_counter() - started
        print(table(rows), flush=True)
        results[name] = rows
        blocks[name] = block(name, rows, seconds, quick, machine_line)
        if output is not None:  # after each benchmark, so a long run keeps what it finished
            output.parent.mkdir(parents=True, exist_ok=True)
            text = output.read_text(encoding="utf-8") if output.exists() else "# Benchmarks\n"
            output.write_text(update_document(text, {name: blocks[name]}), encoding="utf-8")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this benchmark")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check of the code, not figures")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"where the results go (default {OUTPUT.relative_to(PROJECT_ROOT)}; a quick run: "
                        "nowhere)")
    args = parser.parse_args(argv)
    output = args.output or (None if args.quick else OUTPUT)
    run(args.only, args.quick, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
