"""The pipeline as users run it: compiled for the cluster, and run end to end by kfp.local via the CLI."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from components.common import OUTPUT_COLUMNS, STAGE_IMAGES
from pipeline import ARGILLA_SECRET_NAME, HF_SECRET_NAME, OPENAI_SECRET_NAME, compile_pipeline
from tests.conftest import PROJECT_ROOT

STAGES = ("load-docs", "generate-queries", "embed-score", "report", "export", "publish", "finetune", "evaluate")
GPU_TASKS = ["exec-embed-score-component", "exec-evaluate-component", "exec-finetune-component"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    documents = list(yaml.safe_load_all(path.read_text()))
    return path.read_text(), documents[0], (documents[1] if len(documents) > 1 else {})


def test_compiled_pipeline_has_every_stage_with_its_own_image(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    images = {name: executor["container"]["image"] for name, executor in executors.items()}
    for stage in STAGES:
        underscored = stage.replace("-", "_")
        assert images[f"exec-{stage}-component"] == STAGE_IMAGES[underscored]
    assert len(set(images.values())) == len(STAGES)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {f"{stage}-component" for stage in STAGES}
    assert tasks["export-component"]["dependentTasks"] == ["embed-score-component", "report-component"]
    assert tasks["publish-component"]["dependentTasks"] == ["embed-score-component", "report-component"]
    assert tasks["finetune-component"]["dependentTasks"] == ["embed-score-component"]
    assert tasks["evaluate-component"]["dependentTasks"] == ["embed-score-component", "finetune-component"]
    model_input = tasks["evaluate-component"]["inputs"]["artifacts"]["finetuned_model"]["taskOutputArtifact"]
    assert model_input == {"outputArtifactKey": "model", "producerTask": "finetune-component"}


def test_gpu_request_is_on_embed_score_finetune_and_evaluate_only(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = sorted(name for name, executor in executors.items()
                      if "accelerator" in executor["container"].get("resources", {}))
    assert with_gpu == GPU_TASKS
    # One set of GPU parameters serves every GPU task.
    tasks = spec["root"]["dag"]["tasks"]
    for task in ("embed-score-component", "finetune-component", "evaluate-component"):
        parameters = tasks[task]["inputs"]["parameters"]
        assert parameters["pipelinechannel--gpu_accelerator_type"]["componentInputParameter"] == "gpu_accelerator_type"
        assert parameters["pipelinechannel--gpu_count"]["componentInputParameter"] == "gpu_count"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in GPU_TASKS:
        assert "nodeSelector" in k8s[name] and "tolerations" in k8s[name]
    assert not any("nodeSelector" in value for name, value in k8s.items() if name not in GPU_TASKS)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert defaults["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}


def test_cluster_defaults_and_secret_reference_only(compiled):
    text, spec, platform = compiled
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["llm"]["defaultValue"] == "openai:gpt-4o"
    assert defaults["embedding_model"]["defaultValue"] == "Snowflake/snowflake-arctic-embed-l"
    assert defaults["dataset"]["defaultValue"] == "zenml/rag_qa_embedding_questions_0_60_0"
    assert not any("key" in name.lower() and "api" in name.lower() for name in defaults)
    secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-generate-queries-component"]
    assert secret["secretAsEnv"][0]["secretName"] == OPENAI_SECRET_NAME
    assert "ZenML" not in defaults["context"]["defaultValue"]
    assert "sk-" not in text
    publish = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-publish-component"]
    assert {(s["secretName"], s["keyToEnv"][0]["envVar"], s["optional"]) for s in publish["secretAsEnv"]} == {
        (ARGILLA_SECRET_NAME, "ARGILLA_API_KEY", True), (HF_SECRET_NAME, "HF_TOKEN", True)}
    # Publishing targets are off unless configured; the run id comes from KFP, not from a person.
    for name in ("argilla_url", "hub_repo", "export_uri"):
        assert defaults[name]["defaultValue"] == ""
    run_id = spec["root"]["dag"]["tasks"]["publish-component"]["inputs"]["parameters"]["run_id"]
    assert run_id["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    hub = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-evaluate-component"]
    assert hub["secretAsEnv"][0]["secretName"] == HF_SECRET_NAME
    assert not any("token" in name.lower() and ("hf" in name.lower() or "hub" in name.lower()) for name in defaults)
    # Cluster finetuning defaults: ~100 optimizer steps on a thousand rows, in-batch negatives only (measured).
    assert defaults["finetune_epochs"]["defaultValue"] == 3.0
    assert defaults["finetune_batch_size"]["defaultValue"] == 32
    assert defaults["finetune_hard_negatives"]["defaultValue"] is False
    assert defaults["min_improvement"]["defaultValue"] == 0.01


def test_committed_pipeline_yaml_is_fresh(compiled):
    """Like ilab-on-ocp: the committed pipeline.yaml must equal a fresh compile (run `make compile`)."""
    text, _, _ = compiled
    committed = (PROJECT_ROOT / "pipeline.yaml").read_text()
    # Compared parsed: the compiler's comment header prints dict defaults in no fixed key order.
    assert list(yaml.safe_load_all(committed)) == list(yaml.safe_load_all(text)), (
        "pipeline.yaml is stale: run `make compile` and commit it")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "pipeline.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_local_run_end_to_end_then_served_from_cache(tmp_path, small_chunks, local_server, argilla_venv):
    """Two runs: the second is served from the LLM cache and re-publishes into the local Argilla without duplicates."""
    argilla_data = tmp_path / "argilla"
    args = ["run", "--dataset", str(small_chunks), "--output-dir", str(tmp_path / "out"),
            "--llm-cache", str(tmp_path / "cache"), "--max-failure-rate", "0.5",
            "--argilla-data-dir", str(argilla_data), "--argilla-port", "0", "--argilla-dataset", "e2e"]
    try:
        _run_twice_and_check(args, tmp_path, argilla_data, local_server)
    finally:
        local_server.stop_local_argilla(argilla_data)


def _argilla_records(local_server, argilla_data) -> list:
    import argilla as rg

    info = local_server.read_running(argilla_data)
    assert info is not None, "the local Argilla should still be running for browsing"
    client = rg.Argilla(api_url=info["url"], api_key=info["api_key"])
    return list(client.datasets(name="e2e").records(with_vectors=True))


def _run_twice_and_check(args, tmp_path, argilla_data, local_server):
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    info = local_server.read_running(argilla_data)
    assert f"Argilla (local, loopback only): {info['url']}" in first.stdout
    assert f"login: {info['username']} / {info['password']}" in first.stdout
    assert "Hugging Face Hub: skipped" in first.stdout and "Object storage: skipped" in first.stdout
    records = _argilla_records(local_server, argilla_data)
    assert len(records) == 5
    assert sorted(r.metadata["split"] for r in records) == ["test", "test", "train", "train", "train"]
    assert all(len(r.vectors["anchor-vector"]) == 384 for r in records)
    assert f"{tmp_path / 'out' / 'train.parquet'}  (3 rows)" in first.stdout
    for split, rows in (("train", 3), ("test", 2)):
        frame = pd.read_parquet(tmp_path / "out" / f"{split}.parquet")
        assert len(frame) == rows
        assert tuple(frame.columns[: len(OUTPUT_COLUMNS)]) == OUTPUT_COLUMNS
        for column in ("similarity-positive-negative", "similarity-anchor-positive", "similarity-anchor-negative"):
            assert frame[column].dropna().between(-1, 1).all()
        assert frame["anchor-vector"].map(len).eq(384).all()
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "report.md").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["generation_llm_requests"] > 0
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert evaluation["dims"] == [384, 256, 128, 64]
    for model in ("base", "finetuned"):
        assert set(evaluation["models"][model]["metrics"]) == {"384", "256", "128", "64"}
    assert "Retrieval, base vs finetuned" in first.stdout and evaluation["gate"]["reason"] in first.stdout
    assert (tmp_path / "out" / "model").is_dir() == evaluation["gate"]["finetuned_wins"]

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["generation_llm_requests"] == 0
    assert metrics["generation_cached"] == 5 - metrics["generation_failed"]
    assert sorted(r.id for r in _argilla_records(local_server, argilla_data)) == sorted(r.id for r in records)


@pytest.mark.slow
def test_local_run_with_bad_input_stops_with_the_reason(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    pd.DataFrame({"text": ["a chunk"]}).to_parquet(folder / "train.parquet")
    result = run_cli("run", "--dataset", str(folder), "--output-dir", str(tmp_path / "out"), "--no-llm-cache",
                     "--no-argilla")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "has no text column 'page_content'. Columns found: ['text']" in output
    assert "The pipeline stopped" in output
