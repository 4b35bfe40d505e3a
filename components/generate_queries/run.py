"""A generation run: read both splits, run the distilabel task over every row, write rows, stats and the verdict.

The output is written before the failure-rate check, so a failing run still keeps every finished row.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from components.common import StageError, get_logger, read_splits, write_json, write_splits
from components.generate_queries.breaker import raise_if_unreachable
from components.generate_queries.cache import CACHE_FAULTS
from components.generate_queries.cost import estimated_cost, parse_prices, price_fields, price_table, run_price
from components.generate_queries.llm import LLMSpec, build_llm, parse_llm_spec, response_format_for
from components.generate_queries.prompts import STYLE_COLUMN, VARIANT_COLUMN, parse_styles, query_rows
from components.generate_queries.settings import GenerationSettings, GenerationTuning
from components.generate_queries.status import GENERATED_COLUMNS, from_transport, new_status
from components.settings import as_dict
from components.sharding import shard_rows

log = get_logger("generate_queries")

# Counted per split and in total in stats.json; each is the sum of the per-row column of the same meaning.
COUNTED_COLUMNS = {"llm_requests": "generation_requests", "llm_retries": "llm_retries",
                   "prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens"}
STATUSES = ("generated", "cached", "failed")
# Settings that stats.json leaves out: a URL may carry credentials, and the cache location is reported as on/off.
UNREPORTED_SETTINGS = ("llm_base_url", "llm_cache_uri", "llm_prices")
NO_CACHE_WARNING = ("WARNING: no LLM cache (llm_cache_uri is empty): finished rows are kept nowhere, so a re-run "
                    "after any failure pays for every row again. Set llm_cache_uri=gs://BUCKET/PREFIX.")
# An API batch holds this many times `llm_concurrency` rows (see batch_size_for).
BATCH_CONCURRENCY_MULTIPLE = 4


def generate_queries(input_dir: str | os.PathLike, output_dir: str | os.PathLike, settings: GenerationSettings,
                     tuning: Optional[GenerationTuning] = None, shard: int = 0) -> dict[str, Any]:
    """Generate positive/negative queries for both splits; write them with per-row status and stats.json.

    With `settings.shards` > 1 only the chunks of shard number `shard` are read (components/shards.py).
    The output is written before the failure-rate check, so a failing run still keeps every finished row.
    """
    import pandas as pd

    tuning = tuning or GenerationTuning()
    spec = _checked_spec(settings)
    frames = {split: _query_frame(shard_rows(frame, shard, settings.shards), settings)
              for split, frame in read_splits(input_dir).items()}
    records = [{**row, "_split": split, "_position": position}
               for split, frame in frames.items() for position, row in enumerate(frame.to_dict("records"))]
    log.info("generating queries for %d chunks with %s (cache: %s)", len(records), spec.label,
             settings.llm_cache_uri or "off")
    if spec.provider == "openai" and not settings.llm_cache_uri:
        log.warning(NO_CACHE_WARNING)
    results, concurrency = _run_distilabel(records, spec, settings, tuning) if records else ([], None)
    by_key = {(row["_split"], row["_position"]): row for row in results}
    out_frames = {}
    for split, frame in frames.items():
        rows = [{**row, **_generated_fields(by_key.get((split, position)), spec)}
                for position, row in enumerate(frame.to_dict("records"))]
        out_frames[split] = pd.DataFrame(rows, columns=[*frame.columns, *GENERATED_COLUMNS])
    stats = summarise(out_frames, spec, settings.llm_prices, settings.llm_use_batch_api)
    # Counted per row by the task (another process); reported here, never part of the data.
    stats.update({fault: sum(int(row.get(fault) or 0) for row in results) for fault in CACHE_FAULTS})
    stats["settings"] = {**{name: value for name, value in as_dict(settings).items()
                            if name not in UNREPORTED_SETTINGS},
                         "llm_cache": bool(settings.llm_cache_uri), "max_attempts": tuning.max_attempts}
    if concurrency is not None:  # an API endpoint: how the adaptive in-flight limit moved (concurrency.py)
        stats["llm_concurrency_limit"] = concurrency
    write_splits(out_frames, output_dir)
    write_json(Path(output_dir) / "stats.json", stats)
    _log_result(stats)
    raise_if_unreachable(stats, output_dir)
    _check_failure_rate(stats, settings.max_failure_rate, output_dir)
    return stats


def _query_frame(chunks: Any, settings: GenerationSettings) -> Any:
    """One row per query to generate: each chunk `queries_per_chunk` times, with its style and variant."""
    import pandas as pd

    rows = query_rows(chunks.to_dict("records"), parse_styles(settings.query_styles), settings.queries_per_chunk)
    return pd.DataFrame(rows, columns=[*chunks.columns, STYLE_COLUMN, VARIANT_COLUMN])


def _checked_spec(settings: GenerationSettings) -> LLMSpec:
    """The LLM spec, after every check that can fail before any work starts."""
    spec = parse_llm_spec(settings.llm)
    build_llm(spec, base_url=settings.llm_base_url)  # a missing key
    response_format_for(spec, settings.llm_json_mode)  # a bad setting
    price_table(parse_prices(settings.llm_prices))
    try:
        parse_styles(settings.query_styles)
    except ValueError as error:
        raise StageError(str(error)) from error
    if settings.llm_use_batch_api and (spec.provider != "openai" or not settings.llm_cache_uri):
        raise StageError("The Batch API needs --llm openai:MODEL and an LLM cache (--llm-cache-uri / llm_cache_uri), "
                         "where the submitted job ids are kept so a re-run resumes them.")
    return spec


def _generated_fields(generated: Optional[dict[str, Any]], spec: LLMSpec) -> dict[str, Any]:
    if generated is None or generated.get("generation_status") is None:
        # A batch distilabel could not process (the step raised; distilabel fills its outputs with None):
        # keep the row, mark it failed.
        return new_status(spec.label, error="no output from the generation step")
    generated = from_transport(generated)
    return {key: generated.get(key) for key in GENERATED_COLUMNS}


def summarise(frames: dict[str, Any], spec: LLMSpec, llm_prices: str = "", batch_api: bool = False) -> dict[str, Any]:
    """Counts per split and in total (statuses, requests, retries, tokens, failure reasons) and the cost."""
    stats: dict[str, Any] = {"llm": spec.label, "provider": spec.provider, "splits": {}}
    totals = dict.fromkeys(("rows", *STATUSES, *COUNTED_COLUMNS), 0)
    for split, frame in frames.items():
        split_stats = _split_stats(frame)
        stats["splits"][split] = split_stats
        for key in totals:
            totals[key] += split_stats[key]
    totals["failure_rate"] = totals["failed"] / totals["rows"] if totals["rows"] else 0.0
    stats.update(totals)
    price = run_price(spec, llm_prices, batch_api)
    # What this run spent: cached rows cost nothing now. None when the model's price is unknown.
    stats["price_per_million_tokens"] = price_fields(price)
    stats["estimated_cost_usd"] = estimated_cost(stats["prompt_tokens"], stats["completion_tokens"], price)
    return stats


def _split_stats(frame: Any) -> dict[str, Any]:
    if not len(frame):
        return {"rows": 0, **dict.fromkeys((*STATUSES, *COUNTED_COLUMNS), 0), "failure_reasons": {}}
    status = frame["generation_status"].value_counts().to_dict()
    failed = frame["generation_status"] == "failed"
    return {"rows": int(len(frame)), **{name: int(status.get(name, 0)) for name in STATUSES},
            **{name: int(frame[column].sum()) for name, column in COUNTED_COLUMNS.items()},
            "failure_reasons": frame["generation_error"][failed].value_counts().to_dict()}


def _log_result(stats: dict[str, Any]) -> None:
    cost = stats["estimated_cost_usd"]
    log.info("done: %d rows, %d generated, %d from cache, %d failed (%.1f%%); %d LLM requests (%d retries); "
             "%d prompt + %d completion tokens; estimated cost %s", stats["rows"], stats["generated"], stats["cached"],
             stats["failed"], 100 * stats["failure_rate"], stats["llm_requests"], stats["llm_retries"],
             stats["prompt_tokens"], stats["completion_tokens"],
             f"${cost:.4f}" if cost is not None else "unknown (no price for this model: set --llm-prices)")
    faults = {fault: stats.get(fault, 0) for fault in CACHE_FAULTS if stats.get(fault)}
    if faults:
        log.warning("LLM cache faults (each cost only its row's cache look-up or write): %s", faults)


def _check_failure_rate(stats: dict[str, Any], limit: float, output_dir: str | os.PathLike) -> None:
    if stats["failure_rate"] <= limit:
        return
    reasons: dict[str, int] = {}
    for split_stats in stats["splits"].values():
        for reason, count in split_stats["failure_reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    raise StageError(
        f"{stats['failed']} of {stats['rows']} rows ({100 * stats['failure_rate']:.1f}%) failed generation, above "
        f"the limit of {100 * limit:.1f}%. Reasons: {reasons}. The partial results "
        f"(every finished row, failed rows marked) are in {output_dir}, and finished rows are cached, so a re-run "
        "only retries the failures. Use a stronger --llm, or raise --max-failure-rate."
    )


def _run_distilabel(records: list[dict[str, Any]], spec: LLMSpec, settings: GenerationSettings,
                    tuning: GenerationTuning) -> tuple[list[dict[str, Any]], Optional[dict[str, int]]]:
    """The rows distilabel returns, and the in-flight limit's summary (None when no API request was made)."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from components.generate_queries.task import make_task

    work_dir = tempfile.mkdtemp(prefix="distilabel-")
    batch_size = batch_size_for(settings, spec)
    limit_path = Path(work_dir) / "concurrency.json"
    try:
        with Pipeline(name="generate-queries", cache_dir=work_dir) as pipeline:
            loader = LoadDataFromDicts(data=records, batch_size=batch_size)
            task = make_task(spec, settings, tuning, total_rows=len(records), input_batch_size=batch_size,
                             concurrency_stats_path=str(limit_path))
            loader >> task
        # distilabel's own cache is per pipeline run; the row cache is what makes re-runs free.
        distiset = run_in_clean_workers(lambda: pipeline.run(use_cache=False))
        concurrency = json.loads(limit_path.read_text()) if spec.provider == "openai" and limit_path.exists() else None
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        remove_closed_queue_handlers()
    if distiset is None or "default" not in distiset:
        return [], concurrency
    return distiset["default"]["train"].to_list(), concurrency


def batch_size_for(settings: GenerationSettings, spec: LLMSpec) -> int:
    """Rows per distilabel batch: for an API endpoint, enough that the in-flight limit stays full.

    distilabel hands the task one batch at a time, and a batch ends with its slowest row (a retry after a 429, a
    regeneration): the fewer rows a batch has beyond `llm_concurrency`, the longer the endpoint idles at its end.
    """
    if spec.provider != "openai":
        return settings.generation_batch_size
    return max(settings.generation_batch_size, BATCH_CONCURRENCY_MULTIPLE * settings.llm_concurrency)


# What distilabel's worker processes import: the fork server imports it once, so each worker starts without paying
# for it (about 4 s of CPU a worker on this kind of machine; a run starts several, and a test session many runs).
WORKER_PRELOAD = ("distilabel.pipeline.local", "components.generate_queries.task", "components.generate_queries.llm")
# The environment the running fork server was started with (its workers get that one, not the caller's current one).
_fork_server_environment: Optional[int] = None


def run_in_clean_workers(run: Callable[[], Any]) -> Any:
    """Run distilabel with worker processes forked from a clean fork server instead of from this process.

    A worker forked from this process (Linux's default) inherits its thread pools and locks in whatever state they
    were: in a process that had already used torch (a test session, a notebook), the llama.cpp step worker
    deadlocked at 0% CPU. The "forkserver" method forks workers from a fresh single-threaded Python that has
    imported only WORKER_PRELOAD, so they start clean (as "spawn" would) without importing distilabel again each
    (which "spawn" does). A forked worker keeps the fork server's environment, so a server started under another
    environment (a key set since, a test's settings) is stopped and started again. distilabel 1.5 fixes its pool's
    context class at import time, so that class is swapped for the duration of the run.
    """
    import multiprocessing

    from distilabel.pipeline import local as distilabel_local

    global _fork_server_environment
    environment = hash(frozenset(os.environ.items()))
    if _fork_server_environment not in (None, environment):
        stop_fork_server()  # the next worker starts a fresh server with today's environment
    _fork_server_environment = environment
    multiprocessing.set_forkserver_preload(list(WORKER_PRELOAD))

    class ForkServerNoDaemonContext(type(multiprocessing.get_context("forkserver"))):
        Process = distilabel_local._NoDaemonProcess

    previous_context = distilabel_local._NoDaemonContext
    previous_method = multiprocessing.get_start_method(allow_none=True)
    distilabel_local._NoDaemonContext = ForkServerNoDaemonContext
    multiprocessing.set_start_method("forkserver", force=True)
    try:
        return run()
    finally:
        distilabel_local._NoDaemonContext = previous_context
        multiprocessing.set_start_method(previous_method, force=True)


def stop_fork_server() -> None:
    """Stop the workers' fork server if one runs (the next run starts a fresh one). It is waited for, so the CPU time
    of the workers it forked is then counted in this process's children's (what the generation benchmark reads)."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # CPython's own (test) hook: closes the server's lifeline and waits for it


def remove_closed_queue_handlers() -> None:
    """Remove the QueueHandler distilabel leaves on the root logger after a run.

    Its queue is closed by then; at interpreter exit it would print "--- Logging error ---".
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "QueueHandler":
            root.removeHandler(handler)
