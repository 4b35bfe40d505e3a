"""The speed benchmarks of `make bench`: a registry of functions, each returning rows of figures.

A benchmark is a function `(quick: bool) -> list[Row]` registered with `@benchmark("name")` in a module listed in
MODULES. `quick` asks for tiny sizes (the smoke test, a first try); the figures then mean nothing. Each Row holds our
figure, the baseline measured in the same run on the same data, their unit and ratio, and a note. To add one: write
the module, decorate the function, add the module to MODULES; `python -m benchmarks.bench --only name` runs it.
"""

import dataclasses
import importlib
from typing import Callable, Optional

# Imported by `load()`; each registers its benchmarks on import.
MODULES = (
    "benchmarks.speed.embed_cpu",
    "benchmarks.speed.memory",
    "benchmarks.speed.generation",
    "benchmarks.speed.reruns",
    "benchmarks.speed.api_generation",
    "benchmarks.speed.stage_times",
    "benchmarks.speed.llama_batching",
)


@dataclasses.dataclass
class Row:
    """One figure: ours against the baseline. `ratio` defaults to ours / baseline (better when above 1 for a rate,
    below 1 for a time or a memory peak: say which in the note or the measure's name)."""

    name: str
    ours: float
    baseline: Optional[float]
    unit: str
    ratio: Optional[float] = None
    note: str = ""

    def __post_init__(self):
        if self.ratio is None and self.baseline:
            self.ratio = self.ours / self.baseline


Benchmark = Callable[[bool], list[Row]]
BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    """Register a benchmark function under `name` (the `--only` value and its section in docs/benchmarks.md)."""

    def register(function: Benchmark) -> Benchmark:
        BENCHMARKS[name] = function
        return function

    return register


def load() -> dict[str, Benchmark]:
    """Every registered benchmark, in MODULES order."""
    for module in MODULES:
        importlib.import_module(module)
    return BENCHMARKS
