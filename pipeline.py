#!/usr/bin/env python3
"""The pipeline: documentation chunks -> synthetic query triplets -> scored embedding training data.

One pipeline function serves both targets: `run` executes it locally with kfp.local (each stage a
subprocess running the same code the cluster images run), `compile --target kfp|vertex` writes the YAML for
Kubeflow or Vertex AI, `submit` starts a run there, `manifests` writes the GitOps Pipeline/PipelineVersion.
"""

import argparse
import functools
import inspect
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.common import (
    CLUSTER_EMBEDDING_MODEL,
    CLUSTER_LLM,
    EMBEDDED_EMBEDDING_MODEL,
    IMAGE_VERSION,
    NETWORK_STAGES,
    SPLITS,
    StageError,
    read_json,
    stage_resources,
)
from components.embed_score import embed_score_component
from components.evaluate import DEFAULT_MIN_IMPROVEMENT, evaluate_component, format_table
from components.export import export_component
from components.finetune import (
    DEFAULT_BATCH_SIZE as DEFAULT_FINETUNE_BATCH_SIZE,
    DEFAULT_EPOCHS as DEFAULT_FINETUNE_EPOCHS,
    DEFAULT_LEARNING_RATE as DEFAULT_FINETUNE_LEARNING_RATE,
    DEFAULT_SEED as DEFAULT_FINETUNE_SEED,
    DEFAULT_USE_HARD_NEGATIVES,
    DEFAULT_WARMUP_RATIO as DEFAULT_FINETUNE_WARMUP_RATIO,
    finetune_component,
)
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
from components.publish import ARGILLA_API_KEY_ENV, DEFAULT_ARGILLA_DATASET, HF_TOKEN_ENV, publish_component
from components.report import report_component

PROJECT_ROOT = Path(__file__).resolve().parent
PIPELINE_NAME = "docs-to-embedding-data"
PIPELINE_DESCRIPTION = ("Turn documentation chunks into scored (anchor, positive, negative) triplets for "
                        "embedding-model training, with distilabel and sentence-transformers.")
DEFAULT_HUB_DATASET = "zenml/rag_qa_embedding_questions_0_60_0"
DEFAULT_COMPILED = PROJECT_ROOT / "pipeline.yaml"
DEFAULT_VERTEX_COMPILED = PROJECT_ROOT / "pipeline-vertex.yaml"
DEFAULT_LLM_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "docs-to-embeddings" / "llm"
# The Kubernetes secret that holds the OpenAI key; its value never becomes a pipeline parameter.
OPENAI_SECRET_NAME = "openai-api-key"
OPENAI_SECRET_KEY = "OPENAI_API_KEY"
# Publishing secrets, likewise only env variables from optional Kubernetes secrets.
ARGILLA_SECRET_NAME = "argilla-api-key"
HF_SECRET_NAME = "hf-token"
# The local Argilla that `pipeline.py run` starts (loopback only; its login is for this machine alone).
LOCAL_ARGILLA_DATA = PROJECT_ROOT / ".argilla-data"
LOCAL_ARGILLA_PORT = 6900
# Local CPU runs: a small batch gives all-MiniLM-L6-v2 enough optimizer steps on a few hundred rows in minutes.
LOCAL_FINETUNE_EPOCHS = 3.0
LOCAL_FINETUNE_BATCH_SIZE = 16
# Tolerated generation failure rate for the embedded model (for any other LLM: DEFAULT_MAX_FAILURE_RATE).
LOCAL_MAX_FAILURE_RATE = 0.25


TARGETS = ("kfp", "vertex")
# Vertex picks the machine from the accelerator and the CPU/memory limits: one L4 + 8 vCPU / 32 GB -> g2-standard-8.
VERTEX_ACCELERATOR = "NVIDIA_L4"
KFP_ACCELERATOR = "nvidia.com/gpu"
# Caching: only stages that are pure functions of their inputs. load_docs may read a Hub id or bucket whose content
# changes under the same name; generate_queries should sample afresh on a re-run (its own row cache, llm_cache_uri,
# reuses finished rows keyed by chunk and LLM settings, which is finer than KFP's task cache); export writes to
# output_uri, a side effect that a cache hit would skip.
CACHED_STAGES = frozenset({"embed_score", "report"})
# Network stages retry transient failures (rate limits, 5xx, node pre-emption): 30 s, 60 s, 120 s.
RETRY = {"num_retries": 3, "backoff_duration": "30s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}
# Parameters that exist on one target only (the rest of the signature is shared).
KFP_ONLY_PARAMETERS = ("gpu_accelerator_type", "gpu_count", "gpu_node_selector", "gpu_tolerations")
VERTEX_ONLY_PARAMETERS = ("openai_secret_resource",)


def configure_task(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
    """Settings every target shares: display name, CPU/memory, retries, caching."""
    task.set_display_name(stage)
    resources = stage_resources(stage)
    task.set_cpu_request(resources["cpu_request"]).set_cpu_limit(resources["cpu_limit"])
    task.set_memory_request(resources["memory_request"]).set_memory_limit(resources["memory_limit"])
    if stage in NETWORK_STAGES:
        task.set_retry(**RETRY)
    task.set_caching_options(stage in CACHED_STAGES)
    return task


def request_gpu(task: dsl.PipelineTask, target: str, accelerator_type, count, node_selector, tolerations) -> None:
    """The same GPU request on every GPU task: parameters on Kubeflow, a fixed accelerator on Vertex."""
    if target == "kfp":
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(count)
        kubernetes.add_node_selector_json(task, node_selector)
        kubernetes.add_toleration_json(task, tolerations)
    else:
        task.set_accelerator_type(VERTEX_ACCELERATOR).set_accelerator_limit(1)


def build_pipeline(target: str = "kfp"):
    """The one pipeline, with the settings of a target applied: `kfp` (Kubeflow) or `vertex` (Vertex AI)."""
    if target not in TARGETS:
        raise StageError(f"Unknown target {target!r}; use one of {', '.join(TARGETS)}.")

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
        llm_concurrency: int = DEFAULT_CONCURRENCY,
        llm_request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        llm_max_retries: int = DEFAULT_MAX_RETRIES,
        llm_json_mode: str = "auto",
        llm_prices: str = "",
        llm_use_batch_api: bool = False,
        llm_batch_max_wait: float = DEFAULT_BATCH_MAX_WAIT,
        max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE,
        embedding_model: str = CLUSTER_EMBEDDING_MODEL,
        embedding_batch_size: int = 64,
        gpu_accelerator_type: str = KFP_ACCELERATOR,
        gpu_count: int = 1,
        gpu_node_selector: dict = {"nvidia.com/gpu.present": "true"},
        gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        openai_secret_resource: str = "",
        output_uri: str = "",
        argilla_url: str = "",
        argilla_dataset: str = DEFAULT_ARGILLA_DATASET,
        argilla_workspace: str = "",
        hub_repo: str = "",
        hub_private: bool = True,
        export_uri: str = "",
        finetune_epochs: float = DEFAULT_FINETUNE_EPOCHS,
        finetune_batch_size: int = DEFAULT_FINETUNE_BATCH_SIZE,
        finetune_learning_rate: float = DEFAULT_FINETUNE_LEARNING_RATE,
        finetune_warmup_ratio: float = DEFAULT_FINETUNE_WARMUP_RATIO,
        finetune_hard_negatives: bool = DEFAULT_USE_HARD_NEGATIVES,
        finetune_seed: int = DEFAULT_FINETUNE_SEED,
        min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
        model_export_uri: str = "",
        hub_model_repo: str = "",
    ):
        load = load_docs_component(source=dataset, limit=limit, text_column=text_column, docs_base_url=docs_base_url)
        configure_task(load, "load_docs")

        generation = dict(
            docs=load.outputs["docs"], llm=llm, llm_base_url=llm_base_url, context=context,
            llm_cache_uri=llm_cache_uri, temperature=temperature, max_new_tokens=max_new_tokens,
            generation_batch_size=generation_batch_size, llm_concurrency=llm_concurrency,
            llm_request_timeout=llm_request_timeout, llm_max_retries=llm_max_retries, llm_json_mode=llm_json_mode,
            llm_prices=llm_prices, llm_use_batch_api=llm_use_batch_api, llm_batch_max_wait=llm_batch_max_wait,
            max_failure_rate=max_failure_rate,
        )
        if target == "vertex":
            # Vertex has no Kubernetes secrets: the task reads the key from Secret Manager by this name.
            generation["openai_secret_resource"] = openai_secret_resource
        generate = configure_task(generate_queries_component(**generation), "generate_queries")
        if target == "kfp":
            # Optional: the local llama.cpp default and keyless OpenAI-compatible servers need no secret.
            kubernetes.use_secret_as_env(generate, secret_name=OPENAI_SECRET_NAME,
                                         secret_key_to_env={OPENAI_SECRET_KEY: "OPENAI_API_KEY"}, optional=True)

        embed = embed_score_component(triplets=generate.outputs["triplets"], embedding_model=embedding_model,
                                      batch_size=embedding_batch_size)
        configure_task(embed, "embed_score")
        gpu = (target, gpu_accelerator_type, gpu_count, gpu_node_selector, gpu_tolerations)
        request_gpu(embed, *gpu)

        report = report_component(docs=load.outputs["docs"], triplets=generate.outputs["triplets"],
                                  scored=embed.outputs["scored"])
        configure_task(report, "report")

        final = export_component(scored=embed.outputs["scored"], report_files=report.outputs["report_files"],
                                 output_uri=output_uri)
        configure_task(final, "export")

        publish = publish_component(
            scored=embed.outputs["scored"], report_files=report.outputs["report_files"], argilla_url=argilla_url,
            argilla_dataset=argilla_dataset, argilla_workspace=argilla_workspace, hub_repo=hub_repo,
            hub_private=hub_private, export_uri=export_uri, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        configure_task(publish, "publish")

        tune = finetune_component(
            scored=embed.outputs["scored"], embedding_model=embedding_model, epochs=finetune_epochs,
            batch_size=finetune_batch_size, learning_rate=finetune_learning_rate, warmup_ratio=finetune_warmup_ratio,
            use_hard_negatives=finetune_hard_negatives, seed=finetune_seed)
        configure_task(tune, "finetune")
        request_gpu(tune, *gpu)

        # Evaluate encodes the whole corpus twice (base and finetuned): with a large model that wants the GPU too.
        judge = evaluate_component(
            scored=embed.outputs["scored"], finetuned_model=tune.outputs["model"], base_model=embedding_model,
            min_improvement=min_improvement, model_export_uri=model_export_uri, hub_model_repo=hub_model_repo,
            output_uri=output_uri)
        configure_task(judge, "evaluate")
        request_gpu(judge, *gpu)

        if target == "kfp":
            # Optional: each publishing target is skipped when unconfigured, and then needs no secret.
            kubernetes.use_secret_as_env(publish, secret_name=ARGILLA_SECRET_NAME,
                                         secret_key_to_env={ARGILLA_API_KEY_ENV: ARGILLA_API_KEY_ENV}, optional=True)
            for task in (publish, judge):
                kubernetes.use_secret_as_env(task, secret_name=HF_SECRET_NAME,
                                             secret_key_to_env={HF_TOKEN_ENV: HF_TOKEN_ENV}, optional=True)

    # One function body; each target shows only the parameters it uses. KFP reads the signature and calls the
    # function positionally in that order, so bind by name before calling the body.
    hidden = VERTEX_ONLY_PARAMETERS if target == "kfp" else KFP_ONLY_PARAMETERS
    full = inspect.signature(docs_to_embedding_data)
    public = full.replace(parameters=[value for name, value in full.parameters.items() if name not in hidden])

    @functools.wraps(docs_to_embedding_data)
    def pipeline_for_target(*args, **kwargs):
        return docs_to_embedding_data(**public.bind(*args, **kwargs).arguments)

    pipeline_for_target.__signature__ = public
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(pipeline_for_target)


# The Kubeflow build, also what `run` executes with kfp.local.
docs_to_embedding_data = build_pipeline("kfp")


def compile_pipeline(output: Path = DEFAULT_COMPILED, target: str = "kfp") -> Path:
    compiler.Compiler().compile(build_pipeline(target), str(output))
    return output


MANIFESTS_DIR = PROJECT_ROOT / "manifests"
GENERATED_MANIFEST = MANIFESTS_DIR / "base" / "pipeline.yaml"
MANIFEST_NAMESPACE = "kubeflow"


def pipeline_version_name(version: str = IMAGE_VERSION) -> str:
    """The PipelineVersion name: from the image version, since a PipelineVersion's spec is immutable."""
    slug = re.sub(r"[^a-z0-9-]+", "-", f"{PIPELINE_NAME}-v{version}".lower()).strip("-")
    return slug[:63].rstrip("-")


def write_manifests(output: Path = GENERATED_MANIFEST) -> Path:
    """The KFP compiler's own Kubernetes-native Pipeline + PipelineVersion resources, for the kustomize base."""
    from kfp.compiler.compiler_utils import KubernetesManifestOptions

    output.parent.mkdir(parents=True, exist_ok=True)
    options = KubernetesManifestOptions(
        pipeline_name=PIPELINE_NAME, pipeline_version_name=pipeline_version_name(), namespace=MANIFEST_NAMESPACE,
        include_pipeline_manifest=True)
    compiler.Compiler().compile(build_pipeline("kfp"), str(output), kubernetes_manifest_format=True,
                                kubernetes_manifest_options=options)
    return output


def _is_local(value: str) -> bool:
    return "://" not in value and Path(value).expanduser().exists()


def failure_limit(args: argparse.Namespace) -> float:
    """The embedded 135M model fails validation more often than a production LLM; `make run` must still finish."""
    if args.max_failure_rate is not None:
        return args.max_failure_rate
    return LOCAL_MAX_FAILURE_RATE if args.llm in (LOCAL_LLM, "embedded") else DEFAULT_MAX_FAILURE_RATE


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
    model_export_uri = args.model_export_uri or str(output_dir / "model")
    if not args.model_export_uri and (output_dir / "model").is_dir():
        # A previous run's exported model: leaving it would pass it off as this run's winner.
        shutil.rmtree(output_dir / "model")

    # The stage subprocesses import this project's `components` package.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    if _is_local(dataset) and (embedding_model == EMBEDDED_EMBEDDING_MODEL or _is_local(embedding_model)):
        # Everything is on disk: make sure no library reaches for the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    argilla = prepare_argilla(args)

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
            max_failure_rate=failure_limit(args),
            embedding_model=embedding_model, embedding_batch_size=64, output_uri=str(output_dir),
            argilla_url=argilla["url"] if argilla else "", argilla_dataset=args.argilla_dataset,
            hub_repo=args.hub_repo, hub_private=args.hub_private, export_uri=args.export_uri,
            finetune_epochs=float(args.epochs), finetune_batch_size=args.finetune_batch_size,
            finetune_learning_rate=float(args.learning_rate), finetune_warmup_ratio=float(args.warmup_ratio),
            finetune_hard_negatives=args.hard_negatives, finetune_seed=args.seed,
            min_improvement=float(args.min_improvement),
            model_export_uri=model_export_uri, hub_model_repo=args.hub_model_repo,
        )
    except RuntimeError as error:
        print(f"\nThe pipeline stopped: {error}\nThe failing stage's log above says what to fix. Finished stages "
              f"keep their outputs under {pipeline_root}.", file=sys.stderr)
        return 1
    print_summary(output_dir, time.time() - started)
    print_publish_summary(args, argilla)
    return 0


def _load_local_server():
    """services/argilla/local_server.py (stdlib only; `services` is not a package)."""
    import importlib.util

    name = "argilla_local_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "services" / "argilla" / "local_server.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def prepare_argilla(args: argparse.Namespace) -> dict | None:
    """Where the publish stage sends records: --argilla-url, nothing (--no-argilla), or a local Argilla we start.

    The API key reaches the stage subprocesses through ARGILLA_API_KEY in the environment, never a parameter.
    """
    if args.no_argilla:
        return None
    if args.argilla_url:
        if not os.environ.get(ARGILLA_API_KEY_ENV):
            raise StageError(f"--argilla-url {args.argilla_url} needs its API key in the {ARGILLA_API_KEY_ENV} "
                             "environment variable.")
        return {"url": args.argilla_url, "local": False}
    local_server = _load_local_server()
    data_dir = Path(args.argilla_data_dir).expanduser().resolve()
    info = local_server.read_running(data_dir)
    if info is None:
        print(f"Starting the local Argilla (data in {data_dir}; first time: ~1 min to create .venv-argilla) ...",
              flush=True)
        try:
            venv = local_server.ensure_venv(PROJECT_ROOT)
            port = args.argilla_port
            if port and local_server._port_in_use("127.0.0.1", port):
                port = 0  # something else holds the usual port: take a free one
            local_server.start_local_argilla(data_dir, port=port, venv=venv, detach=True)
        except local_server.LocalArgillaError as error:
            raise StageError(f"The local Argilla did not start: {error}\nRun without it: --no-argilla.") from error
        info = local_server.read_running(data_dir)
    os.environ[ARGILLA_API_KEY_ENV] = info["api_key"]
    return {**info, "local": True, "data_dir": str(data_dir)}


def print_publish_summary(args: argparse.Namespace, argilla: dict | None) -> None:
    if argilla and argilla["local"]:
        print(f"\nArgilla (local, loopback only): {argilla['url']}  dataset {args.argilla_dataset!r}\n"
              f"  login: {argilla['username']} / {argilla['password']}\n"
              f"  still running; stop it with `make argilla-stop`, serve it again with `make argilla-ui`.")
    elif argilla:
        print(f"\nArgilla: published to {argilla['url']} as dataset {args.argilla_dataset!r}")
    else:
        print("\nArgilla: skipped (--no-argilla)")
    print(f"Hugging Face Hub: {'pushed to ' + args.hub_repo if args.hub_repo else 'skipped (no --hub-repo)'}")
    print(f"Object storage: {'exported to ' + args.export_uri if args.export_uri else 'skipped (no --export-uri)'}")


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
    evaluation = read_json(output_dir / "evaluation.json")
    counts = evaluation["counts"]
    print(f"\nRetrieval, base vs finetuned ({counts['queries']} test queries, corpus of {counts['corpus']} chunks; "
          f"{output_dir / 'evaluation.json'}, evaluation.md/.html):\n{format_table(evaluation)}\n"
          f"{evaluation['gate']['reason']}\nResult model: {evaluation['result_model']}")


def estimate(args: argparse.Namespace) -> int:
    """Print the expected tokens and cost of generation over a dataset, without calling the LLM."""
    import json
    import tempfile

    from components.generate_queries import GenerationSettings, estimate_generation
    from components.load_docs import load_docs

    dataset = args.dataset or str(PROJECT_ROOT)
    if args.llm_base_url:
        os.environ["OPENAI_BASE_URL"] = args.llm_base_url
    cache = "" if args.no_llm_cache else (args.llm_cache if "://" in args.llm_cache
                                          else str(Path(args.llm_cache).expanduser().resolve()))
    settings = GenerationSettings(llm=args.llm, llm_base_url=args.llm_base_url, context=args.context,
                                  llm_cache_uri=cache, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, llm_json_mode=args.json_mode,
                                  llm_prices=args.llm_prices)
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
    run.add_argument("--max-failure-rate", type=float, default=None,
                     help=f"fail the run when more than this fraction of rows fail generation (default "
                          f"{DEFAULT_MAX_FAILURE_RATE}; {LOCAL_MAX_FAILURE_RATE} for the embedded 135M model)")

    run.add_argument("--argilla-url", default="", help=f"publish to this Argilla ({ARGILLA_API_KEY_ENV} from the env) "
                     "instead of the local one this command starts")
    run.add_argument("--no-argilla", action="store_true", help="do not publish to Argilla")
    run.add_argument("--argilla-dataset", default=DEFAULT_ARGILLA_DATASET, help="Argilla dataset name")
    run.add_argument("--argilla-data-dir", default=str(LOCAL_ARGILLA_DATA), help="data folder of the local Argilla")
    run.add_argument("--argilla-port", type=int, default=LOCAL_ARGILLA_PORT,
                     help="port of the local Argilla (0: any free port)")
    run.add_argument("--hub-repo", default="", help=f"push the dataset to this Hugging Face dataset repo "
                     f"({HF_TOKEN_ENV} from the env); default: skip")
    run.add_argument("--hub-private", action=argparse.BooleanOptionalAction, default=True,
                     help="make the Hub repo private (default) or public (--no-hub-private)")
    run.add_argument("--export-uri", default="", help="also export parquet, report and manifest to this gs:// prefix "
                     "(create-only; Google credentials from the env); default: skip")
    tune = run.add_argument_group("finetune and evaluate")
    tune.add_argument("--epochs", type=float, default=LOCAL_FINETUNE_EPOCHS,
                      help=f"finetuning epochs (cluster default {DEFAULT_FINETUNE_EPOCHS})")
    tune.add_argument("--finetune-batch-size", type=int, default=LOCAL_FINETUNE_BATCH_SIZE,
                      help=f"pairs per optimizer step; also the in-batch negatives (cluster default "
                           f"{DEFAULT_FINETUNE_BATCH_SIZE})")
    tune.add_argument("--learning-rate", type=float, default=DEFAULT_FINETUNE_LEARNING_RATE)
    tune.add_argument("--warmup-ratio", type=float, default=DEFAULT_FINETUNE_WARMUP_RATIO)
    tune.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=DEFAULT_USE_HARD_NEGATIVES,
                      help="add the generated negative as an explicit hard negative (default: in-batch negatives "
                           "only, the better of the two on the embedded LLM's data; see README)")
    tune.add_argument("--seed", type=int, default=DEFAULT_FINETUNE_SEED)
    tune.add_argument("--min-improvement", type=float, default=DEFAULT_MIN_IMPROVEMENT,
                      help="export the finetuned model only if its NDCG@10 at full dimension beats the base by this")
    tune.add_argument("--model-export-uri", default="", help="where a winning finetuned model goes (folder or "
                      "gs://...; default OUTPUT_DIR/model)")
    tune.add_argument("--hub-model-repo", default="", help="also push a winning model to this Hub repo (HF_TOKEN "
                      "from the environment)")

    comp = commands.add_parser("compile", help="write the pipeline YAML for Kubeflow or Vertex AI")
    comp.add_argument("--target", choices=TARGETS, default="kfp")
    comp.add_argument("--output", default="", help=f"default: {DEFAULT_COMPILED.name} (kfp), "
                      f"{DEFAULT_VERTEX_COMPILED.name} (vertex)")

    man = commands.add_parser("manifests", help="write manifests/base/pipeline.yaml (Pipeline + PipelineVersion)")
    man.add_argument("--output", default=str(GENERATED_MANIFEST))

    sub = commands.add_parser("submit", help="compile and start a run on Vertex AI Pipelines or Kubeflow")
    sub.add_argument("--target", choices=TARGETS, required=True)
    sub.add_argument("--template", default="", help="a compiled YAML to submit instead of a fresh compile")
    sub.add_argument("--param", action="append", default=[], metavar="K=V",
                     help="pipeline parameter (repeatable); V is parsed as JSON when it can be, else a string")
    sub.add_argument("--display-name", default="", help="run name (default: pipeline name + time)")
    vertex = sub.add_argument_group("vertex")
    vertex.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT", ""))
    vertex.add_argument("--region", default=os.environ.get("GOOGLE_CLOUD_REGION", ""))
    vertex.add_argument("--pipeline-root", default="", help="gs://BUCKET/PATH for the run's artifacts")
    vertex.add_argument("--service-account", default="", help="the identity the run's tasks use")
    vertex.add_argument("--label", action="append", default=[], metavar="K=V", help="run label (repeatable)")
    kfp_group = sub.add_argument_group("kfp")
    kfp_group.add_argument("--host", default=os.environ.get("KFP_HOST", ""), help="KFP API endpoint URL")
    kfp_group.add_argument("--namespace", default="", help="Kubeflow profile namespace")
    kfp_group.add_argument("--experiment", default="", help="KFP experiment name")
    return parser


def parse_pairs(pairs: list[str], what: str, as_json: bool) -> dict:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise StageError(f"{what} {pair!r} is not KEY=VALUE.")
        if as_json:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass  # a plain string
        values[key] = value
    return values


def submit(args: argparse.Namespace) -> str:
    """Start a run; returns the run's resource name (Vertex) or id (Kubeflow)."""
    import tempfile

    parameters = parse_pairs(args.param, "--param", as_json=True)
    display_name = args.display_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as scratch:
        template = Path(args.template) if args.template else compile_pipeline(
            Path(scratch) / f"{PIPELINE_NAME}-{args.target}.yaml", args.target)
        if not template.exists():
            raise StageError(f"--template {template} does not exist.")
        if args.target == "vertex":
            return submit_vertex(args, template, parameters, display_name)
        return submit_kfp(args, template, parameters, display_name)


def submit_vertex(args: argparse.Namespace, template: Path, parameters: dict, display_name: str) -> str:
    missing = [flag for flag, value in (("--project", args.project), ("--region", args.region),
                                        ("--pipeline-root", args.pipeline_root),
                                        ("--service-account", args.service_account)) if not value]
    if missing:
        raise StageError(f"Vertex submission needs {', '.join(missing)}.")
    if not args.pipeline_root.startswith("gs://"):
        raise StageError(f"--pipeline-root must be a gs:// URI, not {args.pipeline_root!r}.")
    labels = parse_pairs(args.label, "--label", as_json=False)
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import aiplatform

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError as error:
        raise StageError("No Google Cloud credentials: run `gcloud auth application-default login` or set "
                         f"GOOGLE_APPLICATION_CREDENTIALS to a service-account key file ({error}).") from error
    job = aiplatform.PipelineJob(
        display_name=display_name, template_path=str(template), pipeline_root=args.pipeline_root,
        parameter_values=parameters, labels=labels, project=args.project, location=args.region,
        credentials=credentials,
    )
    job.submit(service_account=args.service_account)
    return job.resource_name


def submit_kfp(args: argparse.Namespace, template: Path, parameters: dict, display_name: str) -> str:
    if not args.host:
        raise StageError("Kubeflow submission needs --host (the KFP API URL, e.g. "
                         "https://kubeflow.example.com/pipeline) or KFP_HOST.")
    import kfp

    # Bearer token from the environment if the endpoint needs one (never a command-line flag: shells log those).
    client = kfp.Client(host=args.host, namespace=args.namespace or None,
                        existing_token=os.environ.get("KFP_TOKEN") or None)
    run = client.create_run_from_pipeline_package(
        str(template), arguments=parameters, run_name=display_name,
        experiment_name=args.experiment or None, namespace=args.namespace or None)
    return run.run_id


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
            default = DEFAULT_COMPILED if args.target == "kfp" else DEFAULT_VERTEX_COMPILED
            print(f"Wrote {compile_pipeline(Path(args.output or default), args.target)}")
            return 0
        if args.command == "manifests":
            print(f"Wrote {write_manifests(Path(args.output))}")
            return 0
        if args.command == "estimate":
            return estimate(args)
        if args.command == "submit":
            print(f"Submitted {submit(args)}")
            return 0
        return run_locally(args)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
