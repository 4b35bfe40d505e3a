#!/usr/bin/env python3
"""The pipeline: documentation chunks -> synthetic query triplets -> scored embedding training data.

One pipeline function serves both targets: `run` executes it locally with kfp.local (each stage a
subprocess running the same code the cluster images run), `compile` writes the YAML for Kubeflow.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.common import (
    CLUSTER_EMBEDDING_MODEL,
    CLUSTER_LLM,
    EMBEDDED_EMBEDDING_MODEL,
    SPLITS,
    StageError,
    read_json,
)
from components.embed_score import embed_score_component
from components.export import export_component
from components.generate_queries import (
    DEFAULT_BATCH_MAX_WAIT,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONTEXT,
    DEFAULT_EXPECTED_COMPLETION_TOKENS,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TEMPERATURE,
    JSON_MODES,
    LOCAL_LLM,
    generate_queries_component,
)
from components.load_docs import DEFAULT_TEXT_COLUMN, load_docs_component
from components.report import report_component

PROJECT_ROOT = Path(__file__).resolve().parent
PIPELINE_NAME = "docs-to-embedding-data"
DEFAULT_HUB_DATASET = "zenml/rag_qa_embedding_questions_0_60_0"
DEFAULT_COMPILED = PROJECT_ROOT / "pipeline.yaml"
DEFAULT_LLM_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "docs-to-embeddings" / "llm"
# The Kubernetes secret that holds the OpenAI key; its value never becomes a pipeline parameter.
OPENAI_SECRET_NAME = "openai-api-key"
OPENAI_SECRET_KEY = "OPENAI_API_KEY"


@dsl.pipeline(name=PIPELINE_NAME, description="Turn documentation chunks into scored (anchor, positive, negative) "
              "triplets for embedding-model training, with distilabel and sentence-transformers.")
def docs_to_embedding_data(
    dataset: str = DEFAULT_HUB_DATASET,
    limit: int = 0,
    text_column: str = DEFAULT_TEXT_COLUMN,
    docs_base_url: str = "",
    llm: str = CLUSTER_LLM,
    llm_base_url: str = "",
    context: str = DEFAULT_CONTEXT,
    llm_cache_uri: str = "",
    temperature: float = DEFAULT_TEMPERATURE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    generation_batch_size: int = 16,
    llm_concurrency: int = 16,
    llm_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    llm_max_retries: int = DEFAULT_MAX_RETRIES,
    llm_json_mode: str = "auto",
    llm_prices: str = "",
    llm_use_batch_api: bool = False,
    llm_batch_max_wait: float = DEFAULT_BATCH_MAX_WAIT,
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE,
    embedding_model: str = CLUSTER_EMBEDDING_MODEL,
    embedding_batch_size: int = 64,
    gpu_accelerator_type: str = "nvidia.com/gpu",
    gpu_count: int = 1,
    gpu_node_selector: dict = {"nvidia.com/gpu.present": "true"},
    gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    output_uri: str = "",
):
    load = load_docs_component(source=dataset, limit=limit, text_column=text_column, docs_base_url=docs_base_url)
    load.set_display_name("load_docs")

    generate = generate_queries_component(
        docs=load.outputs["docs"], llm=llm, llm_base_url=llm_base_url, context=context, llm_cache_uri=llm_cache_uri,
        temperature=temperature, max_new_tokens=max_new_tokens, batch_size=generation_batch_size,
        concurrency=llm_concurrency, request_timeout=llm_request_timeout, max_retries=llm_max_retries,
        json_mode=llm_json_mode, llm_prices=llm_prices, use_batch_api=llm_use_batch_api,
        batch_max_wait=llm_batch_max_wait, max_failure_rate=max_failure_rate,
    )
    generate.set_display_name("generate_queries")
    # Optional: the local llama.cpp default and keyless OpenAI-compatible servers need no secret.
    kubernetes.use_secret_as_env(generate, secret_name=OPENAI_SECRET_NAME,
                                 secret_key_to_env={OPENAI_SECRET_KEY: "OPENAI_API_KEY"}, optional=True)

    embed = embed_score_component(triplets=generate.outputs["triplets"], embedding_model=embedding_model,
                                  batch_size=embedding_batch_size)
    embed.set_display_name("embed_score")
    embed.set_accelerator_type(gpu_accelerator_type).set_accelerator_limit(gpu_count)
    kubernetes.add_node_selector_json(embed, gpu_node_selector)
    kubernetes.add_toleration_json(embed, gpu_tolerations)

    report = report_component(docs=load.outputs["docs"], triplets=generate.outputs["triplets"],
                              scored=embed.outputs["scored"])
    report.set_display_name("report")

    final = export_component(scored=embed.outputs["scored"], report_files=report.outputs["report_files"],
                             output_uri=output_uri)
    final.set_display_name("export")


def compile_pipeline(output: Path = DEFAULT_COMPILED) -> Path:
    compiler.Compiler().compile(docs_to_embedding_data, str(output))
    return output


def _is_local(value: str) -> bool:
    return "://" not in value and Path(value).expanduser().exists()


def run_locally(args: argparse.Namespace) -> int:
    """Run the whole pipeline with kfp.local; every stage runs as a subprocess of this Python."""
    from kfp import local

    dataset = args.dataset or str(PROJECT_ROOT)
    if _is_local(dataset):
        dataset = str(Path(dataset).expanduser().resolve())
    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline_root = output_dir / ".kfp"
    embedding_model = args.embedding_model
    if _is_local(embedding_model):
        embedding_model = str(Path(embedding_model).expanduser().resolve())
    cache = "" if args.no_llm_cache else (args.llm_cache if "://" in args.llm_cache
                                          else str(Path(args.llm_cache).expanduser().resolve()))

    # The stage subprocesses import this project's `components` package.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    if _is_local(dataset) and (embedding_model == EMBEDDED_EMBEDDING_MODEL or _is_local(embedding_model)):
        # Everything is on disk: make sure no library reaches for the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    print(f"Running {PIPELINE_NAME} locally\n  dataset: {dataset}\n  llm: {args.llm}\n  embedding model: "
          f"{embedding_model}\n  LLM cache: {cache or 'off'}\n  output: {output_dir}", flush=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.time()
    try:
        docs_to_embedding_data(
            dataset=dataset, limit=args.limit, text_column=args.text_column, docs_base_url=args.docs_base_url,
            llm=args.llm, llm_base_url=args.llm_base_url, context=args.context, llm_cache_uri=cache,
            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            generation_batch_size=args.batch_size, llm_concurrency=args.concurrency,
            llm_request_timeout=args.request_timeout, llm_max_retries=args.max_retries, llm_json_mode=args.json_mode,
            llm_prices=args.llm_prices, llm_use_batch_api=args.batch_api, llm_batch_max_wait=args.batch_max_wait,
            max_failure_rate=args.max_failure_rate,
            embedding_model=embedding_model, embedding_batch_size=64, output_uri=str(output_dir),
        )
    except RuntimeError as error:
        print(f"\nThe pipeline stopped: {error}\nThe failing stage's log above says what to fix. Finished stages "
              f"keep their outputs under {pipeline_root}.", file=sys.stderr)
        return 1
    print_summary(output_dir, time.time() - started)
    return 0


def print_summary(output_dir: Path, seconds: float) -> None:
    metrics = read_json(output_dir / "metrics.json")
    print(f"\nDone in {seconds:.0f} s. Outputs in {output_dir}:")
    for split in SPLITS:
        print(f"  {output_dir / f'{split}.parquet'}  ({metrics[f'{split}_rows']} rows)")
    print(f"  {output_dir / 'report.md'}  (also report.html, similarity_histograms.png, metrics.json)")
    print(f"Generation: {metrics['generation_generated']} generated, {metrics['generation_cached']} from cache, "
          f"{metrics['generation_failed']} failed; {metrics['generation_llm_requests']} LLM requests "
          f"({metrics.get('generation_llm_retries', 0)} retries); {metrics['generation_prompt_tokens']} prompt + "
          f"{metrics['generation_completion_tokens']} completion tokens; estimated cost "
          + (f"${metrics['generation_estimated_cost_usd']:.4f}." if "generation_estimated_cost_usd" in metrics
             else "unknown (no price for this model: --llm-prices)."))


def estimate(args: argparse.Namespace) -> int:
    """Print the expected tokens and cost of generation over a dataset, without calling the LLM."""
    import json
    import tempfile

    from components.generate_queries import GenerationSettings, estimate_generation, parse_prices
    from components.load_docs import load_docs

    dataset = args.dataset or str(PROJECT_ROOT)
    if args.llm_base_url:
        os.environ["OPENAI_BASE_URL"] = args.llm_base_url
    cache = "" if args.no_llm_cache else (args.llm_cache if "://" in args.llm_cache
                                          else str(Path(args.llm_cache).expanduser().resolve()))
    settings = GenerationSettings(llm=args.llm, context=args.context, cache_uri=cache, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, json_mode=args.json_mode,
                                  prices=parse_prices(args.llm_prices))
    with tempfile.TemporaryDirectory(prefix="estimate-") as chunks:
        load_docs(dataset, chunks, limit=args.limit, text_column=args.text_column, docs_base_url=args.docs_base_url)
        result = estimate_generation(chunks, settings, args.expected_completion_tokens)
    cost = result["estimated_cost_usd"]
    print(f"Estimate for {result['llm']} over {result['rows']} chunks ({result['cached_rows']} already cached):\n"
          f"  prompt tokens:     ~{result['estimated_prompt_tokens']:,} ({result['token_count_method']})\n"
          f"  completion tokens: ~{result['estimated_completion_tokens']:,} ({args.expected_completion_tokens} per row)\n"
          "  estimated cost:    " + (f"${cost:.4f}" if cost is not None else "unknown: no price for this model, "
                                     "pass --llm-prices '{\"MODEL\": [prompt, completion]}' (US$ per 1M tokens)")
          + (f" (Batch API: ${result['estimated_batch_api_cost_usd']:.4f})"
             if result["estimated_batch_api_cost_usd"] is not None else "")
          + "\n  One attempt per row; retries and regenerations add to this.")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline locally with kfp.local")
    est = commands.add_parser("estimate", help="print the expected generation tokens and cost; calls no LLM")
    for sub in (run, est):
        add_generation_arguments(sub)
    est.add_argument("--expected-completion-tokens", type=int, default=DEFAULT_EXPECTED_COMPLETION_TOKENS,
                     help="completion tokens expected per row (two short questions in JSON)")
    est.add_argument("--json", action="store_true", help="also print the estimate as JSON")
    run.add_argument("--output-dir", default="outputs", help="where train/test parquet and the report go")
    run.add_argument("--embedding-model", default=EMBEDDED_EMBEDDING_MODEL, help="local path, Hub id, or the "
                     f"embedded default {EMBEDDED_EMBEDDING_MODEL}")
    run.add_argument("--batch-size", type=int, default=8, help="rows per distilabel batch")
    run.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                     help="requests in flight at once for an API endpoint (the in-process model is serial)")
    run.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, help="seconds per request")
    run.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES,
                     help="retries per request after 429/5xx/timeouts/dropped connections")
    run.add_argument("--batch-api", action="store_true", help="OpenAI Batch API: half price, results within "
                     "24 h; job ids are kept in the LLM cache, so a re-run resumes them")
    run.add_argument("--batch-max-wait", type=float, default=DEFAULT_BATCH_MAX_WAIT,
                     help="seconds to wait for a Batch API job before stopping (a re-run resumes it)")
    run.add_argument("--max-failure-rate", type=float, default=DEFAULT_MAX_FAILURE_RATE,
                     help="fail the run when more than this fraction of rows fail generation")

    comp = commands.add_parser("compile", help="write the KFP pipeline YAML")
    comp.add_argument("--output", default=str(DEFAULT_COMPILED))
    return parser


def add_generation_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--dataset", default="", help="Hub dataset id, parquet folder/file (local or gs://), saved "
                     "DatasetDict folder, or Markdown folder. Default: this project's README and docs/.")
    run.add_argument("--limit", type=int, default=0, help="at most N chunks per split (0: all)")
    run.add_argument("--llm", default=LOCAL_LLM, help="'local' (embedded SmolLM2 via llama.cpp), "
                     "'llamacpp:/path/model.gguf', or 'openai:MODEL' (OPENAI_API_KEY / OPENAI_BASE_URL from the env)")
    run.add_argument("--llm-base-url", default="", help="OpenAI-compatible base URL (else OPENAI_BASE_URL)")
    run.add_argument("--context", default=DEFAULT_CONTEXT, help="what the documents are, for the query prompt")
    run.add_argument("--text-column", default=DEFAULT_TEXT_COLUMN, help="column holding the chunk text")
    run.add_argument("--docs-base-url", default="", help="URL prefix for pages built from Markdown")
    run.add_argument("--llm-cache", default=str(DEFAULT_LLM_CACHE),
                     help="folder or gs://bucket/prefix of cached LLM results")
    run.add_argument("--no-llm-cache", action="store_true", help="do not read or write the LLM cache")
    run.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    run.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    run.add_argument("--json-mode", default="auto", choices=JSON_MODES,
                     help="output constraint for OpenAI-compatible endpoints (see docs/configuration.md)")
    run.add_argument("--llm-prices", default="", help='price overrides, JSON: \'{"MODEL": [prompt, completion]}\' '
                     "in US$ per 1M tokens")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compile":
            print(f"Wrote {compile_pipeline(Path(args.output))}")
            return 0
        if args.command == "estimate":
            return estimate(args)
        return run_locally(args)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
