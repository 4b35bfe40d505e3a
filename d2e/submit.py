"""`pipeline.py submit`: compile (or take a compiled template) and start a run on Vertex AI Pipelines or Kubeflow."""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from components.common import CLUSTER_LLM, StageError


def parse_pairs(pairs: list[str], what: str, as_json: bool) -> dict:
    """KEY=VALUE strings as a dict; with `as_json`, a VALUE that parses as JSON becomes that value."""
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


def no_cache_warning(parameters: dict) -> str:
    """A warning when the run would call a paid LLM API with no LLM cache ("" when there is nothing to say)."""
    if not str(parameters.get("llm", CLUSTER_LLM)).startswith("openai:") or parameters.get("llm_cache_uri"):
        return ""
    return ("WARNING: no LLM cache (--param llm_cache_uri=gs://BUCKET/PREFIX is not set) with an API model: "
            "generated rows are kept nowhere, so a re-run after any failure pays for every row again.")


def submit(args: argparse.Namespace) -> str:
    """Start a run; returns the run's resource name (Vertex) or id (Kubeflow)."""
    from pipeline import PIPELINE_NAME, compile_pipeline

    parameters = parse_pairs(args.param, "--param", as_json=True)
    warning = no_cache_warning(parameters)
    if warning:
        print(warning, file=sys.stderr)
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
    """Create the PipelineJob on Vertex AI with the caller's Google credentials."""
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
    try:
        from google.cloud import aiplatform
    except ImportError as error:  # `make run`'s set-up leaves the Vertex SDK to requirements-dev.lock
        raise StageError("Vertex submission needs google-cloud-aiplatform: run `make setup-dev` (or "
                         ".venv/bin/pip install -r requirements-dev.lock -c requirements.lock).") from error

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
    """Create the run on a Kubeflow Pipelines API endpoint."""
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
