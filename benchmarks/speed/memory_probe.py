"""Run one stage's data path in a fresh process and print its peak memory as JSON (the memory benchmark's child).

    python -m benchmarks.speed.memory_probe embed INPUT_DIR OUTPUT_DIR
    python -m benchmarks.speed.memory_probe finetune-data SCORED_DIR

`ready_mb` is the resident size after the imports (and, for embed, the model load), before any data is read;
`peak_mb` the process's peak resident size (VmHWM; not ru_maxrss, which Linux carries over from the parent process
across fork and exec, so a child of a big process reports its parent's peak).

finetune's prepared dataset is an Arrow file memory-mapped from a temporary folder: its pages count in VmHWM only
once read. `peak_mb` is taken when the dataset is ready (the preparation's peak); then one pass reads every row, as
an epoch of training does, and `read_anon_mb` / `read_file_mb` are the resident anonymous memory (what the process
holds) and file-backed memory (the mapped pages read, which the kernel may drop and read again) after it.
"""

import json
import sys


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: resident peak), in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e3  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str]) -> int:
    """Measure the named data path."""
    what, paths = argv[0], argv[1:]
    if what == "embed":
        from components.common import EMBEDDED_EMBEDDING_MODEL, load_model
        from components.embed_score import embed_score

        load_model(EMBEDDED_EMBEDDING_MODEL, "cpu")  # the model's own memory counts in ready_mb
        ready = status_mb("VmRSS")
        embed_score(paths[0], paths[1], EMBEDDED_EMBEDDING_MODEL, device="cpu")
        peak, extra = status_mb("VmHWM"), {}
    elif what == "finetune-data":
        import datasets  # noqa: F401  the data path's libraries count in ready_mb, as the model does for embed
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        from components.finetune_data import temporary_training_data

        ready = status_mb("VmRSS")
        with temporary_training_data(paths[0], "mined", seed=0, batch_size=16) as (dataset, counts, _):
            peak = status_mb("VmHWM")
            for _ in dataset.iter(batch_size=1024):
                pass
            extra = {"rows": len(dataset), "read_anon_mb": status_mb("RssAnon"), "read_file_mb": status_mb("RssFile")}
    else:
        raise SystemExit(f"unknown data path {what!r}")
    print(json.dumps({"ready_mb": ready, "peak_mb": peak, **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
