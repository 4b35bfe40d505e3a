"""Run one stage's data path in a fresh process and print its peak memory as JSON (the memory benchmark's child).

    python -m benchmarks.speed.memory_probe embed INPUT_DIR OUTPUT_DIR
    python -m benchmarks.speed.memory_probe finetune-data SCORED_DIR

`ready_mb` is the resident size after the imports (and, for embed, the model load), before any data is read;
`peak_mb` the process's peak resident size (ru_maxrss) at the end.
"""

import json
import resource
import sys


def resident_mb() -> float:
    """This process's resident size now, in MB (from /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def main(argv: list[str]) -> int:
    """Measure the named data path."""
    what, paths = argv[0], argv[1:]
    if what == "embed":
        from components.common import EMBEDDED_EMBEDDING_MODEL, load_model
        from components.embed_score import embed_score

        load_model(EMBEDDED_EMBEDDING_MODEL, "cpu")  # the model's own memory counts in ready_mb
        ready = resident_mb()
        embed_score(paths[0], paths[1], EMBEDDED_EMBEDDING_MODEL, device="cpu")
    elif what == "finetune-data":
        from components.finetune import load_training_data

        ready = resident_mb()
        dataset, counts, _ = load_training_data(paths[0], "mined", seed=0, batch_size=16)
    else:
        raise SystemExit(f"unknown data path {what!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux
    print(json.dumps({"ready_mb": ready, "peak_mb": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
