"""Embedded generation: the generate_queries stage against raw llama-cpp-python on the same model and prompts.

Baseline: `llama_cpp.Llama` on the SmolLM2 GGUF the stage ships with, every core, the stage's prompt for each chunk
(prompts.build_messages: question style, first worked example, the local excerpt length), the same JSON-schema
grammar, temperature, repeat penalty and output cap, one request at a time; llama.cpp's own counters split prompt
processing from generation; the model load is timed apart. Ours: the whole stage on the same chunks with a fresh
LLM cache (validation, regenerations, distilabel's worker process and model load included), its token counts from
its stats.json.
"""

import os
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.speed import Row, benchmark
from benchmarks.speed.data import chunks, write_split_folder


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (distilabel's workers): unlike wall time,
    hardly moved by other work on a shared machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


TODAY_CHUNKS_PER_SECOND = 0.09  # `make run` on the project's docs before issue 10 (issue 10: 60 chunks in 668 s)


def local_settings(cache: str):
    """The stage's local settings with a fresh cache, one question per chunk, every row kept."""
    from components.generate_queries import GenerationSettings
    from components.settings import build

    return build(GenerationSettings, {"llm_cache_uri": cache, "queries_per_chunk": 1, "max_failure_rate": 1.0},
                 local=True)


def raw_llama(rows: list[dict], settings) -> dict:
    """One request per chunk through llama-cpp-python directly; seconds and tokens for prompts and generation."""
    import llama_cpp

    from components.generate_queries.llm import parse_llm_spec, response_format_for
    from components.generate_queries.prompts import build_messages
    from components.generate_queries.settings import GenerationTuning

    spec = parse_llm_spec(settings.llm)
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec.model, n_ctx=4096, n_threads=os.cpu_count() or 1, seed=0, verbose=False)
    load_seconds = time.perf_counter() - started
    totals = dict.fromkeys(("prompt_tokens", "completion_tokens", "prompt_seconds", "eval_seconds"), 0.0)
    started, cpu = time.perf_counter(), cpu_seconds()
    for row in rows:
        messages = build_messages(row, settings.context, "question", 0, settings.prompt_excerpt_chars)
        llama_cpp.llama_perf_context_reset(llm.ctx)
        reply = llm.create_chat_completion(messages=messages, response_format=response_format_for(spec),
                                           temperature=settings.temperature, max_tokens=settings.max_new_tokens,
                                           repeat_penalty=GenerationTuning().repeat_penalty, seed=0)
        perf = llama_cpp.llama_perf_context(llm.ctx)
        totals["prompt_tokens"] += reply["usage"]["prompt_tokens"]
        totals["completion_tokens"] += reply["usage"]["completion_tokens"]
        totals["prompt_seconds"] += perf.t_p_eval_ms / 1000
        totals["eval_seconds"] += perf.t_eval_ms / 1000
    totals["seconds"], totals["cpu_seconds"] = time.perf_counter() - started, cpu_seconds() - cpu
    totals["load_seconds"] = load_seconds
    return totals


def stage_run(rows: list[dict], settings, work: Path) -> dict:
    """The stage on the same chunks; its token counts and wall time."""
    import pandas as pd

    from components.generate_queries.run import generate_queries, stop_fork_server

    source = write_split_folder(pd.DataFrame(rows), work / "in")
    started, cpu = time.perf_counter(), cpu_seconds()
    stats = generate_queries(source, work / "out", settings)
    stop_fork_server()  # distilabel's workers are the fork server's children: its exit counts their CPU time here
    return {**stats, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu}


@benchmark("embedded_generation")
def embedded_generation(quick: bool) -> list[Row]:
    """Tokens/s of the stage and of raw llama.cpp; chunks/s against today's 0.09."""
    # 24 chunks: a run's fixed start (distilabel's pipeline, the fork server, the model load: ~6 s) weighs on the
    # rate as on a short run; at 8 chunks it was a third of the stage's time (docs/benchmarks.md).
    rows = [dict(row) for row in chunks()[:2 if quick else 24]]
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as work:
        settings = local_settings(str(Path(work) / "llm-cache"))
        raw = raw_llama(rows, settings)
        ours = stage_run(rows, settings, Path(work))
    raw_tokens = raw["prompt_tokens"] + raw["completion_tokens"]
    our_tokens = ours["prompt_tokens"] + ours["completion_tokens"]
    raw_rate, our_rate = raw_tokens / raw["seconds"], our_tokens / ours["seconds"]
    requests = ours["llm_requests"]
    count = len(rows)
    # Our requests hold more generated tokens than raw's (regenerations), and generating is ~6x slower than reading a
    # prompt: what our token mix would take at raw llama.cpp's own two rates, over what it took.
    at_raw_rates = (ours["prompt_tokens"] / (raw["prompt_tokens"] / raw["prompt_seconds"])
                    + ours["completion_tokens"] / (raw["completion_tokens"] / raw["eval_seconds"]))
    return [
        Row("embedded generation, prompt + completion tokens/s", our_rate, raw_rate, "tokens/s",
            note=f"{count} chunks; raw: {raw_tokens:.0f} tokens in {raw['seconds']:.1f} s (+{raw['load_seconds']:.1f}"
            f" s model load), ours: {our_tokens} tokens in {ours['seconds']:.1f} s over {requests} requests "
            f"({ours['failed']} rows failed); tokens per CPU-second (less moved by other load): ours "
            f"{our_tokens / ours['cpu_seconds']:.1f}, raw {raw_tokens / raw['cpu_seconds']:.1f}, "
            f"{(our_tokens / ours['cpu_seconds']) / (raw_tokens / raw['cpu_seconds']):.2f}x; our "
            f"{ours['prompt_tokens']} prompt and {ours['completion_tokens']} generated tokens take "
            f"{at_raw_rates:.1f} s at raw llama.cpp's prompt and generation rates: "
            f"{at_raw_rates / ours['seconds']:.2f} of raw speed for our token mix; "
            f"target >= 0.8x"),
        Row("raw llama.cpp prompt processing", raw["prompt_tokens"] / raw["prompt_seconds"], None, "tokens/s",
            note=f"{raw['prompt_tokens']:.0f} prompt tokens, {raw['prompt_tokens'] / count:.0f} a request"),
        Row("raw llama.cpp generation", raw["completion_tokens"] / raw["eval_seconds"], None, "tokens/s",
            note=f"{raw['completion_tokens']:.0f} completion tokens, {raw['completion_tokens'] / count:.0f} a request"),
        Row("embedded generation, chunks/s (ours vs today's make run)", count / ours["seconds"],
            TODAY_CHUNKS_PER_SECOND, "chunks/s",
            note=f"raw llama.cpp, one request a chunk: {count / raw['seconds']:.3f} chunks/s; target >= 3x today"),
    ]
