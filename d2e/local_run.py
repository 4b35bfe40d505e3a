"""`pipeline.py run`: the whole pipeline on this machine with kfp.local, publishing into a local Argilla.

Every stage runs as a subprocess of this Python, running the same code the cluster images run. The settings arrive
already range-checked (`d2e/cli.py`); this module turns them into what a local run needs (absolute paths, the
project's own docs as the default dataset, outputs under --output-dir) and prints what came out.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from components.common import EMBEDDED_EMBEDDING_MODEL, MODEL_FOLDER, SPLITS, StageError, read_json
from components.evaluate import format_table
from components.generate_queries import default_failure_rate
from components.publish import ARGILLA_API_KEY_ENV
from components.report import generation_sentence
from d2e.console import kfp_local
from d2e.outputs import StagedOutputs
from d2e.parameters import group_specs
from d2e.preflight import check_run
from d2e.progress import CACHE_FOLDER, summary_file, watch_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The local Argilla that `run` starts (loopback only; its login is for this machine alone).
LOCAL_ARGILLA_DATA = PROJECT_ROOT / ".argilla-data"
LOCAL_ARGILLA_PORT = 6900


def is_local_path(value: str) -> bool:
    """A path that exists on this machine (not a URI, not a Hub id)."""
    return "://" not in value and Path(value).expanduser().exists()


def absolute(value: str) -> str:
    """An existing local path made absolute (the stages run in other working folders); anything else unchanged."""
    return str(Path(value).expanduser().resolve()) if is_local_path(value) else value


def llm_cache_uri(values: dict, no_cache: bool) -> str:
    """The LLM cache a local command uses: none, a gs:// prefix, or an absolute folder."""
    cache = values["llm_cache_uri"]
    if no_cache or not cache:
        return ""
    return cache if "://" in cache else str(Path(cache).expanduser().resolve())


def local_values(values: dict, given: set, results_dir: Path, no_cache: bool) -> dict:
    """The pipeline arguments of a local run, from the settings' values and the flags given.

    `results_dir` is where the stages write (the staging folder that `StagedOutputs` swaps into --output-dir).
    """
    values = dict(values, output_uri=str(results_dir), llm_cache_uri=llm_cache_uri(values, no_cache))
    values["dataset"] = absolute(values["dataset"] or str(PROJECT_ROOT))
    values["embedding_model"] = absolute(values["embedding_model"])
    if values["miner_model"]:  # empty means the embedding model ("" would resolve to the working folder)
        values["miner_model"] = absolute(values["miner_model"])
    if "max_failure_rate" not in given:
        # The lenient local default is for the embedded 135M model; any other LLM gets the cluster's tolerance.
        values["max_failure_rate"] = default_failure_rate(values["llm"])
    if not values["model_export_uri"]:
        values["model_export_uri"] = str(results_dir / MODEL_FOLDER)
    return values


def prepare_environment(values: dict) -> None:
    """The stage subprocesses import this project's `components`; with everything on disk, nothing reaches the Hub."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    models = [model for model in (values["embedding_model"], values["miner_model"]) if model]
    if is_local_path(values["dataset"]) and all(model == EMBEDDED_EMBEDDING_MODEL or is_local_path(model)
                                                for model in models):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_locally(values: dict, given: set, args: argparse.Namespace) -> int:
    """Run the whole pipeline with kfp.local; every stage runs as a subprocess of this Python.

    The results are staged and swapped into --output-dir only when every stage succeeded (d2e/outputs.py).
    """
    check_run(values, args)  # before anything starts: no Argilla, no output folder, no LLM call
    output_dir = Path(args.output_dir).expanduser().resolve()
    staged = StagedOutputs(output_dir)
    staged.prepare(values["model_export_uri"])  # before any stage: nothing of the user's is in the way
    try:
        return _run_staged(values, given, args, staged)
    finally:
        staged.discard()  # after a failure (after a success the folder is gone already)


def task_cache(values: dict, args: argparse.Namespace, pipeline_root: Path) -> tuple[str, str]:
    """(the inputs fingerprint, or "" when the task cache is off; what the run says about the task cache)."""
    from d2e.fingerprint import fingerprint

    if args.no_cache or args.no_llm_cache:
        return "", f"off ({'--no-cache' if args.no_cache else '--no-llm-cache'}: every stage runs)"
    digest = fingerprint(values)
    if digest is None:
        return "", ("off (the dataset or a model is not on this machine: a Hub id or gs:// can change under the same "
                    "name; every stage runs)")
    return digest, f"on ({pipeline_root / CACHE_FOLDER}; --no-cache runs every stage)"


def _run_staged(values: dict, given: set, args: argparse.Namespace, staged: StagedOutputs) -> int:
    from d2e.parameters import pipeline_specs
    from pipeline import PIPELINE_NAME, build_pipeline

    output_dir = staged.output_dir
    pipeline_root = output_dir / ".kfp"
    values = local_values(values, given, staged.folder, args.no_llm_cache)
    values["inputs_fingerprint"], cache_note = task_cache(values, args, pipeline_root)
    prepare_environment(values)
    argilla = prepare_argilla(values["argilla_url"], args)
    values["argilla_url"] = argilla["url"] if argilla else ""

    print(f"Running {PIPELINE_NAME} locally\n  dataset: {values['dataset']}\n  llm: {values['llm']}\n  embedding "
          f"model: {values['embedding_model']}\n  LLM cache: {values['llm_cache_uri'] or 'off'}\n  task cache: "
          f"{cache_note}\n  output: {output_dir}", flush=True)
    started = time.time()
    pipeline = build_pipeline("kfp", local=True)  # the local run's caching: d2e/targets.py
    # The cluster-only settings (GPU request, secret names) mean nothing to kfp.local: their defaults stay.
    arguments = {spec.name: values[spec.name] for spec in pipeline_specs("kfp")
                 if spec.name not in {spec.name for spec in group_specs("target")}}
    try:
        with kfp_local(pipeline_root, cache=bool(values["inputs_fingerprint"])), \
                watch_run(output_dir, pipeline_root, pipeline, args.verbose, shards=values["shards"]):
            pipeline(**arguments)
    except RuntimeError as error:
        print(f"\nThe pipeline stopped: {error}\nThe failing stage's last lines above say what to fix (the whole "
              f"log: {output_dir / 'run.log'}). Finished stages keep their outputs under {pipeline_root}. The "
              f"previous results in {output_dir} were left as they were.", file=sys.stderr)
        return 1
    staged.commit()
    with summary_file(output_dir / "summary.md"):
        print_summary(output_dir, time.time() - started)
        print_publish_summary(values, argilla)
    return 0


def prepare_argilla(argilla_url: str, args: argparse.Namespace) -> dict | None:
    """Where the publish stage sends records: argilla_url, nothing (--no-argilla), or a local Argilla we start.

    The API key reaches the stage subprocesses through ARGILLA_API_KEY in the environment, never a parameter.
    """
    import services.argilla as local_argilla

    if args.no_argilla:
        return None
    if argilla_url:
        if not os.environ.get(ARGILLA_API_KEY_ENV):
            raise StageError(f"--argilla-url {argilla_url} needs its API key in the {ARGILLA_API_KEY_ENV} "
                             "environment variable.")
        return {"url": argilla_url, "local": False}
    data_dir = Path(args.argilla_data_dir).expanduser().resolve()
    info = local_argilla.read_running(data_dir)
    if info is None:
        print(f"Starting the local Argilla (data in {data_dir}; first time: ~1 min to create .venv-argilla) ...",
              flush=True)
        try:
            venv = local_argilla.ensure_venv(PROJECT_ROOT)
            port = args.argilla_port
            if port and local_argilla.port_in_use("127.0.0.1", port):
                port = 0  # something else holds the usual port: take a free one
            local_argilla.start_local_argilla(data_dir, port=port, venv=venv, detach=True)
        except local_argilla.LocalArgillaError as error:
            raise StageError(f"The local Argilla did not start: {error}\nRun without it: --no-argilla.") from error
        info = local_argilla.read_running(data_dir)
    os.environ[ARGILLA_API_KEY_ENV] = info["api_key"]
    return {**info, "local": True, "data_dir": str(data_dir)}


def print_publish_summary(values: dict, argilla: dict | None) -> None:
    """Where the dataset was published, and how to browse the local Argilla."""
    if argilla and argilla["local"]:
        from services.argilla import login_hint

        print(f"\nArgilla (local, loopback only): {argilla['url']}  dataset {values['argilla_dataset']!r}\n"
              f"  login: {login_hint(argilla)}\n"
              f"  still running; stop it with `make argilla-stop`, serve it again with `make argilla-ui`.")
    elif argilla:
        print(f"\nArgilla: published to {argilla['url']} as dataset {values['argilla_dataset']!r}")
    else:
        print("\nArgilla: skipped (--no-argilla)")
    hub, export = values["hub_repo"], values["export_uri"]
    print(f"Hugging Face Hub: {'pushed to ' + hub if hub else 'skipped (no --hub-repo)'}")
    print(f"Object storage: {'exported to ' + export if export else 'skipped (no --export-uri)'}")


def print_summary(output_dir: Path, seconds: float) -> None:
    """The outputs, the generation counts and the retrieval table of a finished run."""
    metrics = read_json(output_dir / "metrics.json")
    print(f"\nDone in {seconds:.0f} s. Outputs in {output_dir}:")
    for split in SPLITS:
        print(f"  {output_dir / f'{split}.parquet'}  ({metrics[f'{split}_rows']} rows)")
    print(f"  {output_dir / 'report.md'}  (also report.html, similarity_histograms.png, metrics.json)")
    print(generation_sentence(metrics))
    evaluation = read_json(output_dir / "evaluation.json")
    counts = evaluation["counts"]
    print(f"\nRetrieval, base vs finetuned ({counts['queries']} test queries, corpus of {counts['corpus']} chunks; "
          f"{output_dir / 'evaluation.json'}, evaluation.md/.html):\n{format_table(evaluation)}\n"
          f"{evaluation['gate']['reason']}\nResult model: {evaluation['result_model']}")
