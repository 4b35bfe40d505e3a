"""The local run (`pipeline.py run`): what it makes of the settings, and the whole pipeline end to end by kfp.local."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest

from components.common import MANIFEST_NAME, OUTPUT_COLUMNS
from d2e import parameters
from d2e.cli import build_parser, setting_values
from d2e.local_run import local_values
from tests.conftest import PROJECT_ROOT


def settings_of(*argv):
    return setting_values(build_parser().parse_args(["run", *argv]), tuple(parameters.GROUPS))


def test_local_run_defaults_to_this_projects_docs_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    values = local_values(*settings_of("--embedding-model", "model", "--llm-cache-uri", "cache"), tmp_path / "out",
                          no_cache=False)
    assert values["dataset"] == str(PROJECT_ROOT)
    assert values["embedding_model"] == str(tmp_path / "model")
    assert values["llm_cache_uri"] == str(tmp_path / "cache")
    assert values["output_uri"] == str(tmp_path / "out")
    assert values["model_export_uri"] == str(tmp_path / "out" / "model")
    assert local_values(*settings_of("--llm-cache-uri", "gs://b/p"), tmp_path, no_cache=False)["llm_cache_uri"] == (
        "gs://b/p")
    assert local_values(*settings_of(), tmp_path, no_cache=True)["llm_cache_uri"] == ""


def test_the_task_cache_is_on_only_for_inputs_on_this_machine_and_off_on_request(tmp_path, small_chunks):
    import argparse

    from d2e.local_run import task_cache

    values = local_values(*settings_of("--dataset", str(small_chunks)), tmp_path / "out", no_cache=False)
    flags = {"no_cache": False, "no_llm_cache": False}
    digest, note = task_cache(values, argparse.Namespace(**flags), tmp_path / "out" / ".kfp")
    assert len(digest) == 32 and note.startswith(f"on ({tmp_path / 'out' / '.kfp' / '.kfp_cache'}; --no-cache")
    for flag in flags:
        assert task_cache(values, argparse.Namespace(**{**flags, flag: True}), tmp_path) == (
            "", f"off (--{flag.replace('_', '-')}: every stage runs)")
    remote = dict(values, dataset="zenml/rag_qa_embedding_questions_0_60_0")
    digest, note = task_cache(remote, argparse.Namespace(**flags), tmp_path)
    assert digest == "" and note.startswith("off (the dataset or a model is not on this machine")


def test_the_lenient_failure_rate_is_for_the_embedded_model_only(tmp_path):
    assert local_values(*settings_of(), tmp_path, False)["max_failure_rate"] == 0.4
    assert local_values(*settings_of("--llm", "openai:gpt-4o"), tmp_path, False)["max_failure_rate"] == 0.05
    given = settings_of("--llm", "openai:gpt-4o", "--max-failure-rate", "0.3")
    assert local_values(*given, tmp_path, False)["max_failure_rate"] == 0.3


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "pipeline.py", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_local_run_end_to_end_then_served_from_cache(tmp_path, small_chunks, local_server, argilla_venv):
    """Two runs: the second is served from the task cache but for the stages with effects outside their artifacts,
    leaves the same results and re-publishes into the local Argilla without duplicates."""
    argilla_data = tmp_path / "argilla"
    args = ["run", "--dataset", str(small_chunks), "--output-dir", str(tmp_path / "out"),
            "--llm-cache-uri", str(tmp_path / "cache"), "--max-failure-rate", "0.5",
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


STAGES = ("load_docs", "generate_queries", "embed_score", "mine_negatives", "report", "export", "publish", "finetune",
          "evaluate", "export_model")
# The stages whose effects lie outside their artifacts: a re-run runs them again (d2e/targets.py).
UNCACHED = ("export", "publish", "export_model")
# What changes in OUTPUT_DIR from one identical run to the next: the log, the summary (its seconds), the records of
# the run or export that wrote a folder (OUTPUT_DIR's and an exported model's), and the time in each manifest (when
# its files were written).
PER_RUN = ("run.log", "summary.md", ".docs-to-embeddings", f"model/{MANIFEST_NAME}", "model/.docs-to-embeddings")
MANIFESTS = ("export.json", "evaluation.json")


def results(output_dir) -> dict:
    """OUTPUT_DIR's results, name -> bytes (manifests without their time), kfp.local's working folder left out."""
    found = {}
    for path in sorted(output_dir.rglob("*")):
        name = path.relative_to(output_dir).as_posix()
        if path.is_file() and not name.startswith(".kfp/") and name not in PER_RUN:
            found[name] = path.read_bytes()
    for name in MANIFESTS:
        manifest = json.loads(found[name])
        assert manifest.pop("created")
        found[name] = manifest
    return found


# What only run.log may hold: kfp's executor input dumps and base-image warnings, distilabel's own log.
LOG_ONLY = ("Got executor_input", "custom or non-Python base image", "distilabel.pipeline", "Streamed logs")


def check_console(result, output_dir):
    """Not a terminal (captured): a line per stage start and end, plain progress lines, nothing of the stages' own
    logs; those are in run.log; the summary is also in summary.md."""
    err = result.stderr
    assert f"Log of every stage: {output_dir / 'run.log'} (--verbose shows it live)" in err
    numbers = {}
    for stage in STAGES:  # each stage starts and ends once; kfp.local picks the order among independent tasks
        started = re.search(rf"\[(\d+)/10\] {stage} started", err)
        assert started and f"[{started[1]}/10] {stage} done in " in err, stage
        numbers[stage] = int(started[1])
    assert sorted(numbers.values()) == list(range(1, 11))
    assert numbers["load_docs"] == 1 and numbers["generate_queries"] == 2
    assert (numbers["embed_score"] < numbers["mine_negatives"] < numbers["finetune"] < numbers["evaluate"]
            < numbers["export_model"])
    assert "[1/10] load_docs done in " in err and " s: 5 rows in, 5 rows out" in err
    assert "[2/10] generate_queries started (5 rows in)" in err
    assert "served from the cache" not in err
    assert "      generate_queries: 5/5 rows (100%), " in err and " tokens, " in err
    assert "      embed_score: " in err and " texts (100%), " in err
    log = (output_dir / "run.log").read_text()
    for text in LOG_ONLY:
        assert text not in result.stdout + err, text
        assert text in log, text
    assert "generate_queries: 5/5 rows (100%)" in log  # the stage's own plain lines, as a cluster pod logs them
    summary = (output_dir / "summary.md").read_text()
    assert summary.startswith("# Run summary\n\n```text\nDone in ")
    assert result.stdout.split("Done in ", 1)[1].strip() in summary
    assert (output_dir / "report.md").read_text().split("\n")[2] == "## Summary"


def timed_cli_run(args):
    """`pipeline.py run` timed by the re-runs benchmark's own reader (benchmarks/speed/reruns.py): this test's two runs
    are what that benchmark measures, so its reading of a real run is checked here rather than in two more runs."""
    from benchmarks.speed import reruns

    timed = reruns.timed_run(args[1:], check=False)
    return SimpleNamespace(**timed)


def check_rerun_timing(first, second):
    """What the re-runs benchmark reads from the two runs: every stage timed, then the cached ones named."""
    from benchmarks.speed import reruns

    assert set(first.tasks) == set(STAGES) and first.cached == [], (first.tasks, first.cached)
    assert first.seconds > sum(first.tasks.values()) > 0
    assert 0 < first.before_tasks < first.seconds and 0 < first.after_tasks < first.seconds
    assert set(second.tasks) == set(UNCACHED) and set(second.cached) == set(STAGES) - set(UNCACHED)
    assert second.seconds < first.seconds
    row = reruns.rerun_row(vars(first), vars(second), floor=1.0)
    assert row.ratio == pytest.approx(second.seconds / first.seconds) and "evaluate" in row.note


def _run_twice_and_check(args, tmp_path, argilla_data, local_server):
    first = timed_cli_run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    check_console(first, tmp_path / "out")
    info = local_server.read_running(argilla_data)
    assert f"Argilla (local, loopback only): {info['url']}" in first.stdout
    assert f"login: {info['username']}, password and API key in {info['credentials_file']}" in first.stdout
    assert info["password"] not in first.stdout + first.stderr and info["api_key"] not in first.stdout + first.stderr
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
    assert f"task cache: on ({tmp_path / 'out' / '.kfp' / '.kfp_cache'}; --no-cache runs every stage)" in first.stdout
    first_results = results(tmp_path / "out")
    assert {"train.parquet", "test.parquet", "report.html", "metrics.json", "evaluation.json"} <= set(first_results)

    second = timed_cli_run(args)
    assert second.returncode == 0, second.stderr[-3000:]
    check_second_run(second, first, tmp_path / "out", first_results)
    check_rerun_timing(first, second)
    assert sorted(r.id for r in _argilla_records(local_server, argilla_data)) == sorted(r.id for r in records)


def check_second_run(second, first, output_dir, first_results):
    """Every stage but those with outside effects served from the task cache, said so; the same results."""
    err = second.stderr
    for stage in STAGES:
        served = re.search(rf"\[\d+/10\] {stage} served from the cache \(not run again\): (.*)", err)
        ran = re.search(rf"\[\d+/10\] {stage} done in ", err)
        assert (served is None, ran is not None) == ((stage in UNCACHED,) * 2), stage
        assert f"] {stage} started" in err if stage in UNCACHED else f"] {stage} started" not in err, stage
    assert "[1/10] load_docs served from the cache (not run again): 5 rows in, 5 rows out" in err
    assert "] generate_queries served from the cache (not run again): 5 rows in, 5 rows out" in err
    # Complete, and the same bytes: what the stages computed is the first run's (its generation figures too).
    assert results(output_dir) == first_results
    assert second.stdout.split("Generation: ", 1)[1].split("\n")[0] == first.stdout.split("Generation: ", 1)[1].split(
        "\n")[0]


@pytest.mark.slow
def test_local_run_with_bad_input_stops_with_the_reason_and_keeps_the_previous_results(tmp_path):
    from tests.d2e.test_outputs import previous_run, snapshot

    folder = tmp_path / "bad"
    folder.mkdir()
    pd.DataFrame({"text": ["a chunk"]}).to_parquet(folder / "train.parquet")
    out = tmp_path / "out"
    before = previous_run(out, tmp_path)  # results, our model with the user's file in it, the user's notes
    result = run_cli("run", "--dataset", str(folder), "--output-dir", str(out), "--no-llm-cache", "--no-argilla")
    assert result.returncode == 1
    # The failing stage's last lines reach the terminal, with the log's path; the kfp dumps stay in the log.
    assert "[1/10] load_docs FAILED after " in result.stderr
    assert "has no text column 'page_content'. Columns found: ['text']" in result.stderr
    assert f"The whole log: {out / 'run.log'}" in result.stderr
    assert "The pipeline stopped" in result.stderr
    assert f"The previous results in {out} were left as they were." in result.stderr
    assert "Got executor_input" not in result.stdout + result.stderr
    assert "Got executor_input" in (out / "run.log").read_text()
    # Byte for byte, but for kfp.local's working folder .kfp and run.log, which is always the latest run's log.
    assert {name: digest for name, digest in snapshot(out).items() if name != "run.log"} == before
