"""API generation benchmark: the generate_queries stage against a local OpenAI-compatible server.

The server (tests/support/servers.py) answers every request with a valid pair after a fixed latency, so the figure
is what the stage's concurrency makes of that latency, not what a model does. Throughput is rows the server
answered per second between the first request's arrival and the last answer (distilabel's start-up of a few
seconds is left out; the wall time, start-up included, is in the note).

1. Concurrency 1 (the serial baseline), 10 (the seed's), 16 and 64: rows/s and the ratio to serial.
2. A server that admits N requests a second (token bucket, 429 beyond): the adaptive in-flight limit against the
   same ceiling held fixed: rows/s, 429 answers, failed rows and the limit's lowest and final value.
3. Shards: local wall time of load_docs + generate_queries + embed_score + merges (d2e/fanout.py, kfp.local) with
   `shards=2` against `shards=1`, at a low concurrency so that waiting on the endpoint dominates. kfp.local runs
   at most two loop iterations at once.

    python -m benchmarks.bench --only api_generation [--quick]     (one of make bench's)
    python -m benchmarks.speed.api_generation [--quick] [--only concurrency|rate-limited|shards]
"""

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import KUBEFLOW_DOCS, PROJECT_ROOT
from components.common import EMBEDDED_EMBEDDING_MODEL
from components.generate_queries import GenerationSettings, GenerationTuning, generate_queries
from components.load_docs import load_docs
from d2e.fanout import run_fan_out_locally
from tests.support.servers import FaultyOpenAIServer, TokenBucket

LATENCY = 0.5  # seconds per request: a short answer of gpt-4o-mini takes about 0.5-1.5 s
CONCURRENCIES = (1, 10, 16, 64)
TARGET_AT_16 = 12.0  # issue 10: at 16 in flight, at least 12x the serial rate
RATE_LIMIT = 20.0  # requests a second the rate-limited server admits
RATE_BURST = 20.0  # a second of requests at once, as per-minute limits allow
FIXED_CEILING = 64
QUERIES_PER_CHUNK = 3
SHARD_CONCURRENCY = 2  # per shard: low, so that the run waits on the endpoint as a large corpus would
# No retry backoff of our own beyond the server's retry-after-ms; 1.0 is the fixed limit (concurrency.py).
TUNING = GenerationTuning(retry_base_delay=0.1, retry_max_delay=2.0)


def rows_for(concurrency: int, quick: bool) -> int:
    """Rows per measurement: a few waves of requests at this concurrency."""
    waves = 4 if quick else 10
    return max(24 if quick else 60, waves * concurrency)


def chunk_folder(work: Path, rows: int) -> Path:
    """A load_docs output holding at least `rows` query rows (QUERIES_PER_CHUNK per chunk, both splits)."""
    folder = work / f"chunks-{rows}"
    if not folder.exists():
        per_split = -(-rows // (2 * QUERIES_PER_CHUNK))
        load_docs(str(KUBEFLOW_DOCS), folder, limit=per_split)
    return folder


def measure(server: FaultyOpenAIServer, work: Path, rows: int, concurrency: int,
            tuning: GenerationTuning = TUNING) -> dict[str, Any]:
    """Run the stage once against `server`; rows/s over the server's busy window, and the stage's stats."""
    settings = GenerationSettings(llm="openai:bench-model", llm_base_url=server.base_url, llm_cache_uri="",
                                  queries_per_chunk=QUERIES_PER_CHUNK, llm_concurrency=concurrency,
                                  generation_batch_size=concurrency, llm_max_retries=6, max_failure_rate=1.0,
                                  llm_prices='{"bench-model": [0, 0]}')
    first = len(server.log)
    started = time.monotonic()
    out = Path(tempfile.mkdtemp(dir=work))
    stats = generate_queries(chunk_folder(work, rows), out, settings, tuning)
    wall = time.monotonic() - started
    log = server.log[first:]
    answered = sum(entry["fault"] == "ok" for entry in log)
    window = max(entry.get("end", entry["start"]) for entry in log) - min(entry["start"] for entry in log)
    return {"rows": stats["rows"], "generated": stats["generated"], "failed": stats["failed"], "wall_s": wall,
            "rows_per_s": answered / window if window else 0.0,
            "rate_limited": sum(entry["fault"] == "rate_limited" for entry in log),
            "limit": stats.get("llm_concurrency_limit") or {}}


def concurrency_rows(work: Path, quick: bool) -> list[dict[str, Any]]:
    """Rows/s at each concurrency against a fixed-latency server, and the ratio to concurrency 1."""
    server = FaultyOpenAIServer(delay=LATENCY).start()
    try:
        results = {c: measure(server, work, rows_for(c, quick), c) for c in CONCURRENCIES}
        in_flight = server.max_in_flight
    finally:
        server.stop()
    serial = results[1]["rows_per_s"]
    rows = []
    for concurrency, result in results.items():
        ratio = result["rows_per_s"] / serial if serial else None
        note = (f"{result['generated']}/{result['rows']} rows, {LATENCY:.2f} s a request, wall "
                f"{result['wall_s']:.1f} s with start-up")
        if concurrency == 16:
            note += f"; target >= {TARGET_AT_16:.0f}x serial: {'met' if ratio and ratio >= TARGET_AT_16 else 'NOT met'}"
        if concurrency == max(CONCURRENCIES):
            note += f"; most requests in flight at the server: {in_flight}"
        rows.append({"name": f"API generation, concurrency {concurrency}", "ours": round(result["rows_per_s"], 2),
                     "baseline": round(serial, 2), "unit": "rows/s", "ratio": round(ratio, 2) if ratio else None,
                     "note": note})
    return rows


def rate_limited_rows(work: Path, quick: bool) -> list[dict[str, Any]]:
    """Adaptive vs fixed in-flight limit against a server that admits RATE_LIMIT requests a second."""
    rows_count = 120 if quick else 300
    results: dict[str, dict[str, Any]] = {}
    for name, decrease in (("fixed", 1.0), ("adaptive", TUNING.concurrency_decrease)):
        server = FaultyOpenAIServer(delay=LATENCY, bucket=TokenBucket(RATE_LIMIT, RATE_BURST)).start()
        try:
            results[name] = measure(server, work, rows_count, FIXED_CEILING,
                                    dataclasses.replace(TUNING, concurrency_decrease=decrease))
        finally:
            server.stop()
    ours, fixed = results["adaptive"], results["fixed"]

    def describe(result: dict[str, Any]) -> str:
        limit = result["limit"]
        return (f"{result['generated']}/{result['rows']} rows generated, {result['failed']} failed, "
                f"{result['rate_limited']} 429s, in-flight limit lowest {limit.get('lowest')} final "
                f"{limit.get('final')}")

    header = f"{RATE_LIMIT:.0f} req/s admitted, ceiling {FIXED_CEILING}"
    return [
        {"name": f"API generation, rate limited ({header}): rows/s", "ours": round(ours["rows_per_s"], 2),
         "baseline": round(fixed["rows_per_s"], 2), "unit": "rows/s",
         "ratio": round(ours["rows_per_s"] / fixed["rows_per_s"], 2) if fixed["rows_per_s"] else None,
         "note": f"adaptive: {describe(ours)}; fixed: {describe(fixed)}"},
        {"name": f"API generation, rate limited ({header}): 429 answers", "ours": ours["rate_limited"],
         "baseline": fixed["rate_limited"], "unit": "429s",
         "ratio": round(ours["rate_limited"] / fixed["rate_limited"], 3) if fixed["rate_limited"] else None,
         "note": "fewer is better: each 429 is a wasted request against the quota"},
    ]


def shards_rows(work: Path, quick: bool) -> list[dict[str, Any]]:
    """Local wall time of the fan-out with 2 shards against 1, same chunks, same fixed-latency server."""
    rows_count = 48 if quick else 120
    chunks = chunk_folder(work, rows_count)
    server = FaultyOpenAIServer(delay=LATENCY).start()
    seconds = {}
    try:
        for shards in (1, 2):
            root = work / f"shards-{shards}"
            started = time.monotonic()
            # kfp.local prints every task's whole log: kept in a file, not on the bench's screen.
            with open(work / f"shards-{shards}.log", "w") as log, contextlib.redirect_stdout(log):
                run_fan_out_locally(root, dataset=str(chunks), llm="openai:bench-model", llm_base_url=server.base_url,
                                    llm_cache_uri="", queries_per_chunk=QUERIES_PER_CHUNK,
                                    llm_concurrency=SHARD_CONCURRENCY, llm_prices='{"bench-model": [0, 0]}',
                                    embedding_model=EMBEDDED_EMBEDDING_MODEL, shards=shards)
            seconds[shards] = time.monotonic() - started
    finally:
        server.stop()
    requests = sum(entry["fault"] == "ok" for entry in server.log)
    return [{"name": "Shards: local wall time of load_docs + generate_queries + embed_score, 2 shards vs 1",
             "ours": round(seconds[2], 1), "baseline": round(seconds[1], 1), "unit": "s",
             "ratio": round(seconds[1] / seconds[2], 2),
             "note": f"{requests // 2} rows a run, {LATENCY:.2f} s a request, llm_concurrency {SHARD_CONCURRENCY} per "
                     "shard; ratio is the speed-up (baseline / ours); each shard pays its own task start-up"}]


PARTS = {"concurrency": concurrency_rows, "rate-limited": rate_limited_rows, "shards": shards_rows}


def run(quick: bool, work: Optional[Path] = None, parts: tuple[str, ...] = tuple(PARTS)) -> list[dict[str, Any]]:
    """The figures of this benchmark (every part unless named), as rows (name, ours, baseline, unit, ratio, note)."""
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-local")  # the local server takes any key
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The kfp.local stage subprocesses import this project.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="bench-api-") as scratch:
        folder = Path(work or scratch)
        return [row for part in parts for row in PARTS[part](folder, quick)]


@benchmark("api_generation")
def api_generation(quick: bool) -> list[Row]:
    """`make bench`'s entry: every part, as registry rows."""
    return [Row(**row) for row in run(quick)]


def main() -> None:
    """Print the figures as a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows per measurement")
    parser.add_argument("--only", choices=tuple(PARTS), action="append", help="this part only (repeatable)")
    args = parser.parse_args()
    for row in run(args.quick, parts=tuple(args.only or PARTS)):
        ratio = f"{row['ratio']}x" if row["ratio"] is not None else "-"
        print(f"{row['name']}: {row['ours']} {row['unit']} vs {row['baseline']} ({ratio})\n    {row['note']}")


if __name__ == "__main__":
    main()
