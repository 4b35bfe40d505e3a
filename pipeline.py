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
from components.export import export_component
from components.generate_queries import (
    DEFAULT_CONTEXT,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    LOCAL_LLM,
    generate_queries_component,
)
from components.load_docs import DEFAULT_TEXT_COLUMN, load_docs_component
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
        max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE,
        embedding_model: str = CLUSTER_EMBEDDING_MODEL,
        embedding_batch_size: int = 64,
        gpu_accelerator_type: str = KFP_ACCELERATOR,
        gpu_count: int = 1,
        gpu_node_selector: dict = {"nvidia.com/gpu.present": "true"},
        gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        openai_secret_resource: str = "",
        output_uri: str = "",
    ):
        load = load_docs_component(source=dataset, limit=limit, text_column=text_column, docs_base_url=docs_base_url)
        configure_task(load, "load_docs")

        generation = dict(
            docs=load.outputs["docs"], llm=llm, llm_base_url=llm_base_url, context=context,
            llm_cache_uri=llm_cache_uri, temperature=temperature, max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size, max_failure_rate=max_failure_rate,
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
        if target == "kfp":
            embed.set_accelerator_type(gpu_accelerator_type).set_accelerator_limit(gpu_count)
            kubernetes.add_node_selector_json(embed, gpu_node_selector)
            kubernetes.add_toleration_json(embed, gpu_tolerations)
        else:
            embed.set_accelerator_type(VERTEX_ACCELERATOR).set_accelerator_limit(1)

        report = report_component(docs=load.outputs["docs"], triplets=generate.outputs["triplets"],
                                  scored=embed.outputs["scored"])
        configure_task(report, "report")

        final = export_component(scored=embed.outputs["scored"], report_files=report.outputs["report_files"],
                                 output_uri=output_uri)
        configure_task(final, "export")

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
    cache = "" if args.no_llm_cache else str(Path(args.llm_cache).expanduser().resolve())

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
            generation_batch_size=args.batch_size, max_failure_rate=args.max_failure_rate,
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
          f"{metrics['generation_failed']} failed; {metrics['generation_llm_requests']} LLM requests.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline locally with kfp.local")
    run.add_argument("--dataset", default="", help="Hub dataset id, parquet folder/file (local or gs://), saved "
                     "DatasetDict folder, or Markdown folder. Default: this project's README and docs/.")
    run.add_argument("--limit", type=int, default=0, help="at most N chunks per split (0: all)")
    run.add_argument("--output-dir", default="outputs", help="where train/test parquet and the report go")
    run.add_argument("--llm", default=LOCAL_LLM, help="'local' (embedded SmolLM2 via llama.cpp), "
                     "'llamacpp:/path/model.gguf', or 'openai:MODEL' (OPENAI_API_KEY / OPENAI_BASE_URL from the env)")
    run.add_argument("--llm-base-url", default="", help="OpenAI-compatible base URL (else OPENAI_BASE_URL)")
    run.add_argument("--embedding-model", default=EMBEDDED_EMBEDDING_MODEL, help="local path, Hub id, or the "
                     f"embedded default {EMBEDDED_EMBEDDING_MODEL}")
    run.add_argument("--context", default=DEFAULT_CONTEXT, help="what the documents are, for the query prompt")
    run.add_argument("--text-column", default=DEFAULT_TEXT_COLUMN, help="column holding the chunk text")
    run.add_argument("--docs-base-url", default="", help="URL prefix for pages built from Markdown")
    run.add_argument("--llm-cache", default=str(DEFAULT_LLM_CACHE), help="folder of cached LLM results")
    run.add_argument("--no-llm-cache", action="store_true", help="do not read or write the LLM cache")
    run.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    run.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    run.add_argument("--batch-size", type=int, default=8, help="rows per LLM batch (concurrent requests for APIs)")
    run.add_argument("--max-failure-rate", type=float, default=DEFAULT_MAX_FAILURE_RATE,
                     help="fail the run when more than this fraction of rows fail generation")

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
        if args.command == "submit":
            print(f"Submitted {submit(args)}")
            return 0
        return run_locally(args)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
