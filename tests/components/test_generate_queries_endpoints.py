"""generate_queries against real OpenAI-compatible servers: a fault-injecting one, llama.cpp's, and fake GCS.

The fault server scripts 429 (with Retry-After), 500, hangs, dropped connections, malformed bodies and answers
missing the negative; the tests count what reached it, so "no request" and "no second generation" are measured.
"""

import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pandas as pd
import pytest

from components.common import StageError
from components.generate_queries import (
    OUTPUT_SCHEMA,
    GenerationSettings,
    GenerationTuning,
    estimate_generation,
    estimated_cost,
    generate_queries,
    parse_llm_spec,
    parse_prices,
    price_for,
    response_format_for,
    retry_delay,
)
from components.load_docs import load_docs
from components.storage import GCSStore, LocalStore, open_store
from tests.conftest import PROJECT_ROOT
from tests.support.servers import always, anchor_id, anchor_of, every_third_fails

FAKE_KEY = "sk-test-DO-NOT-LEAK-123"
TEST_PRICES = json.dumps({"test-model": [1.0, 2.0]})  # US$ per 1M tokens, for a model the table does not know
# Short backoff and polling so fault tests take seconds; Retry-After comes from the server (1 s).
FAST = GenerationTuning(retry_base_delay=0.1, retry_max_delay=2.0, batch_poll_interval=0.1)


@pytest.fixture(scope="module")
def chunks_40(tmp_path_factory, kubeflow_docs):
    """40 real chunks (20 train, 20 test) of the Kubeflow docs, as load_docs writes them."""
    folder = tmp_path_factory.mktemp("chunks40")
    load_docs(str(kubeflow_docs), folder, limit=20)
    sizes = {split: len(pd.read_parquet(folder / f"{split}.parquet")) for split in ("train", "test")}
    assert sizes == {"train": 20, "test": 20}
    return folder


@pytest.fixture(scope="module")
def chunks_6(tmp_path_factory, kubeflow_docs):
    folder = tmp_path_factory.mktemp("chunks6")
    load_docs(str(kubeflow_docs), folder, limit=3)
    return folder


def fast_settings(tmp_path: Path, **overrides) -> GenerationSettings:
    """Small timeouts so fault tests take seconds."""
    values = dict(llm="openai:test-model", llm_cache_uri=str(tmp_path / "cache"), llm_concurrency=8,
                  generation_batch_size=8, llm_request_timeout=1.0, llm_max_retries=6, llm_prices=TEST_PRICES,
                  max_failure_rate=0.05, queries_per_chunk=1)
    values.update(overrides)
    return GenerationSettings(**values)


def generate(input_dir, output_dir, settings: GenerationSettings, **tuning) -> dict:
    """generate_queries with the FAST tuning, `tuning` overriding parts of it."""
    return generate_queries(input_dir, output_dir, settings, dataclasses.replace(FAST, **tuning))


def read_rows(folder: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(folder / f"{split}.parquet") for split in ("train", "test")], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Rules without a server


def _status_error(status: int, headers: dict) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(status, headers=headers, request=request)
    cls = {429: openai.RateLimitError, 500: openai.InternalServerError, 401: openai.AuthenticationError,
           400: openai.BadRequestError}[status]
    return cls("error", response=response, body=None)


def test_retry_delay_honours_retry_after_and_never_retries_client_errors():
    assert retry_delay(_status_error(429, {"retry-after": "7"}), 0) == 7.0
    assert retry_delay(_status_error(429, {"retry-after-ms": "250"}), 3) == 0.25
    assert retry_delay(_status_error(429, {"retry-after": "600"}), 0, cap=60) == 60  # capped
    assert retry_delay(_status_error(429, {}), 2, base=1.0) == 4.0  # no header: exponential backoff
    assert retry_delay(_status_error(500, {}), 0, base=0.5) == 0.5
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    assert retry_delay(openai.APITimeoutError(request=request), 1, base=1.0) == 2.0
    assert retry_delay(openai.APIConnectionError(request=request), 0, base=1.0) == 1.0
    assert retry_delay(_status_error(401, {}), 0) is None
    assert retry_delay(_status_error(400, {}), 0) is None


def test_prices_and_cost():
    assert price_for(parse_llm_spec("openai:gpt-4o")) == (2.50, 10.00)
    assert price_for(parse_llm_spec("openai:gpt-4o-2024-08-06")) == (2.50, 10.00)  # a dated snapshot
    assert price_for(parse_llm_spec("openai:gpt-4o-mini-2024-07-18")) == (0.15, 0.60)  # longest prefix wins
    assert price_for(parse_llm_spec("local")) == (0.0, 0.0)
    assert price_for(parse_llm_spec("openai:smollm2")) is None
    assert price_for(parse_llm_spec("openai:gpt-4o"), {"gpt-4o": [1, 2]}) == (1.0, 2.0)
    assert estimated_cost(1_000_000, 500_000, (2.5, 10.0)) == 7.5
    assert estimated_cost(10, 10, None) is None
    assert parse_prices('{"m": {"prompt": 1, "completion": 3}}') == {"m": {"prompt": 1, "completion": 3}}
    with pytest.raises(StageError, match="must be JSON"):
        parse_prices("gpt-4o=3")
    with pytest.raises(StageError, match="prompt, completion"):
        parse_prices('{"m": "cheap"}')


def test_response_format_per_endpoint():
    spec = parse_llm_spec("openai:gpt-4o")
    strict = response_format_for(spec, "auto", base_url="https://api.openai.com/v1")
    assert strict["type"] == "json_schema" and strict["json_schema"]["strict"] is True
    assert response_format_for(spec, "auto", base_url="http://vllm:8000/v1") == {"type": "json_object",
                                                                                 "schema": OUTPUT_SCHEMA}
    assert response_format_for(spec, "json_object", base_url="") == {"type": "json_object"}
    assert response_format_for(spec, "off") is None
    with pytest.raises(StageError, match="json mode"):
        response_format_for(spec, "xml")


@pytest.mark.parametrize("make_store", [lambda path: LocalStore(path)], ids=["local"])
def test_local_store_create_only_keeps_the_first_write(tmp_path, make_store):
    store = make_store(tmp_path / "store")
    assert store.put("ab/key.json", b"first", create_only=True) is True
    assert store.put("ab/key.json", b"second", create_only=True) is False
    assert store.get("ab/key.json") == b"first" and store.get("ab/missing.json") is None
    assert store.list() == ["ab/key.json"]  # no temporary files left behind


def test_gcs_store_create_only_against_fake_gcs(gcs_bucket):
    store = open_store(f"gs://{gcs_bucket.name}/llm-cache")
    assert isinstance(store, GCSStore)
    assert store.get("ab/key.json") is None
    assert store.put("ab/key.json", b"first", create_only=True) is True
    assert store.put("ab/key.json", b"second", create_only=True) is False  # 412 from the server: kept
    assert store.get("ab/key.json") == b"first"
    assert gcs_bucket.blob("llm-cache/ab/key.json").download_as_bytes() == b"first"
    assert store.list() == ["ab/key.json"]
    with pytest.raises(StageError, match="gs://"):
        open_store("s3://bucket/x")


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.fixture
def stage_log():
    """What the stage logs (its logger writes to stderr in KFP; here into a buffer as well)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    logger = logging.getLogger("generate_queries")
    logger.addHandler(handler)
    yield buffer
    logger.removeHandler(handler)


def test_third_of_requests_failing_run_completes_and_reports(tmp_path, chunks_40, openai_server, stage_log):
    """Done when: a server failing a third of requests (429/500/hang/malformed/dropped) -> >= 95% valid rows."""
    server = openai_server(script=every_third_fails(), retry_after="1", hang_seconds=2.0)
    stats = generate(chunks_40, tmp_path / "out", fast_settings(tmp_path))
    faults = server.faults()
    transport_faults = sum(faults[name] for name in ("429", "500", "hang", "malformed", "drop"))
    assert transport_faults >= len(server.log) // 3 and all(faults[name] for name in ("429", "500", "hang",
                                                                                    "malformed", "drop"))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 40 and stats["rows"] == 40
    assert (rows["generation_status"] == "generated").mean() >= 0.95
    # Every request beyond a row's one valid attempt is a reported retry: each scripted fault the server saw, plus
    # any slow answer the client gave up on (a loaded machine) or a reused connection the server had dropped.
    assert stats["llm_retries"] == rows["llm_retries"].sum() == stats["llm_requests"] - 40
    assert stats["llm_requests"] >= len(server.log) and stats["llm_retries"] >= transport_faults
    assert stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    assert stats["estimated_cost_usd"] == pytest.approx(
        (stats["prompt_tokens"] * 1.0 + stats["completion_tokens"] * 2.0) / 1e6)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["llm_retries"] == stats["llm_retries"]
    log = stage_log.getvalue()
    assert f"({stats['llm_retries']} retries)" in log and "estimated cost $" in log and "40 generated" in log
    # JSON constraint for a non-OpenAI base URL: json_object with the schema attached.
    assert server.log[0]["response_format"] == {"type": "json_object", "schema": OUTPUT_SCHEMA}


def test_several_queries_per_chunk_one_per_style_each_cached_apart(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("ok"))
    settings = fast_settings(tmp_path, queries_per_chunk=3, query_styles="question,keywords,statement")
    stats = generate(chunks_6, tmp_path / "out", settings)
    rows = read_rows(tmp_path / "out")
    assert stats["rows"] == 18 and stats["generated"] == 18 and len(server.log) == 18
    assert list(rows["query_style"][:3]) == ["question", "keywords", "statement"]
    assert (rows.groupby("chunk_id")["query_style"].nunique() == 3).all()
    assert rows.loc[rows["query_style"] == "question", "positive"].str.endswith("?").all()
    assert not rows.loc[rows["query_style"] == "keywords", "positive"].str.contains("?", regex=False).any()
    # Each style is its own cache entry: a re-run asks for nothing, and one style more asks only for that style.
    assert generate(chunks_6, tmp_path / "again", settings)["cached"] == 18 and len(server.log) == 18
    four = fast_settings(tmp_path, queries_per_chunk=4, query_styles="question,keywords,statement")
    assert generate(chunks_6, tmp_path / "four", four)["generated"] == 6 and len(server.log) == 24


def test_answers_missing_the_negative_are_regenerated(tmp_path, chunks_6, openai_server):
    seen = set()

    def first_answer_lacks_negative(number, body):
        from tests.support.servers import anchor_of
        key = anchor_of(body)
        if key in seen:
            return "ok"
        seen.add(key)
        return "missing_negative"

    server = openai_server(script=first_answer_lacks_negative)
    stats = generate(chunks_6, tmp_path / "out", fast_settings(tmp_path))
    rows = read_rows(tmp_path / "out")
    assert stats["generated"] == 6 and (rows["generation_attempts"] == 2).all()
    assert server.faults() == {"missing_negative": 6, "ok": 6} and stats["llm_retries"] == 0


def test_invalid_answers_past_the_threshold_fail_the_run_and_keep_partial_results(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("missing_negative"))
    with pytest.raises(StageError) as error:
        generate(chunks_6, tmp_path / "out", fast_settings(tmp_path), max_attempts=2)
    message = str(error.value)
    assert "6 of 6 rows (100.0%) failed" in message and "negative missing" in message
    assert str(tmp_path / "out") in message
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6 and set(rows["generation_status"]) == {"failed"}
    assert (rows["generation_error"] == "negative missing").all()
    assert len(server.log) == 12  # two attempts per row, bounded
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_batches_with_and_without_failures_are_read_back_together(tmp_path, chunks_6, openai_server):
    # distilabel stores each batch as its own parquet file: a text column that is empty in one batch and filled in
    # another must still read back as one dataset (it once failed with "Unsupported cast from string to null").
    last = read_rows(chunks_6)["anchor"].iloc[-1]
    server = openai_server(script=lambda number, body: "missing_negative" if anchor_of(body) == " ".join(last.split())
                           else "ok")
    settings = fast_settings(tmp_path, llm_concurrency=1, generation_batch_size=2, max_failure_rate=1.0)
    stats = generate(chunks_6, tmp_path / "out", settings, max_attempts=2)
    rows = read_rows(tmp_path / "out")
    assert (stats["generated"], stats["failed"]) == (5, 1) and len(server.log) == 7
    assert rows["generation_error"].iloc[:5].isna().all() and rows["generation_error"].iloc[5] == "negative missing"
    assert rows["positive"].iloc[:5].notna().all() and pd.isna(rows["positive"].iloc[5])


def test_a_rejected_key_is_not_retried(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("401"))
    with pytest.raises(StageError, match="AuthenticationError"):
        generate(chunks_6, tmp_path / "out", fast_settings(tmp_path), max_attempts=1)
    assert len(server.log) == 6  # one request per row: retrying a bad key cannot help


def test_failure_rate_under_the_threshold_passes(tmp_path, chunks_40, openai_server):
    """One row in 40 never gets a valid answer: 2.5% < 5%, the run succeeds and records the reason."""
    bad = {}

    def one_row_always_invalid(number, body):
        from tests.support.servers import anchor_of
        bad.setdefault("anchor", anchor_of(body))
        return "missing_negative" if anchor_of(body) == bad["anchor"] else "ok"

    openai_server(script=one_row_always_invalid)
    stats = generate(chunks_40, tmp_path / "out", fast_settings(tmp_path))
    assert stats["failed"] == 1 and stats["generated"] == 39
    rows = read_rows(tmp_path / "out")
    assert rows.loc[rows["generation_status"] == "failed", "generation_error"].tolist() == ["negative missing"]


# ---------------------------------------------------------------------------------------------
# Cache: object storage, and a killed run


def test_second_run_on_a_clean_disk_with_the_same_gcs_cache_sends_no_request(tmp_path, chunks_40, openai_server,
                                                                          gcs_bucket):
    server = openai_server(script=every_third_fails(("429", "500")))
    uri = f"gs://{gcs_bucket.name}/llm-cache"
    first = generate(chunks_40, tmp_path / "pod1" / "out", fast_settings(tmp_path / "pod1", llm_cache_uri=uri))
    requests_after_first = len(server.log)
    assert first["generated"] == 40 and requests_after_first >= 40
    assert len(list(gcs_bucket.list_blobs(prefix="llm-cache/"))) == 40

    second = generate(chunks_40, tmp_path / "pod2" / "out", fast_settings(tmp_path / "pod2", llm_cache_uri=uri))
    assert len(server.log) == requests_after_first  # zero generation requests
    assert second["cached"] == 40 and second["llm_requests"] == 0 and second["estimated_cost_usd"] == 0
    assert not (tmp_path / "pod2" / "cache").exists()
    before, after = read_rows(tmp_path / "pod1" / "out"), read_rows(tmp_path / "pod2" / "out")
    assert list(after["positive"]) == list(before["positive"])


KILLED_RUN = """
import sys
from components.generate_queries import GenerationSettings, generate_queries
settings = GenerationSettings(llm="openai:test-model", llm_cache_uri=sys.argv[2], queries_per_chunk=1,
                              llm_concurrency=2,
                              generation_batch_size=4, llm_request_timeout=5.0, max_failure_rate=0.0)
generate_queries(sys.argv[1], sys.argv[3], settings)
"""


def test_killed_run_resumes_without_generating_a_finished_row_twice(tmp_path, chunks_40, openai_server):
    server = openai_server(script=always("ok"), delay=0.4)  # slow answers, so the kill lands mid-run
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OPENAI_BASE_URL": server.base_url}
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(chunks_40), str(cache), str(tmp_path / "out")],
                               cwd=PROJECT_ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(cache.rglob("*.json"))) < 6 and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
    finally:
        # Like a node loss: every process of the run (distilabel's workers too) dies at once.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished = {json.loads(path.read_text())["negative"].rsplit(" ", 1)[-1].rstrip("?")
                for path in cache.rglob("*.json")}
    assert 6 <= len(finished) < 40, "the kill must land part way"
    assert not (tmp_path / "out").exists()
    answered_before = dict(server.answered)

    stats = generate(chunks_40, tmp_path / "out", fast_settings(tmp_path, llm_cache_uri=str(cache)))
    answered_in_rerun = {anchor: count - answered_before.get(anchor, 0)
                         for anchor, count in server.answered.items() if count - answered_before.get(anchor, 0)}
    assert not finished & set(answered_in_rerun)  # no finished row was generated again
    assert stats["cached"] == len(finished) and stats["generated"] == 40 - len(finished)
    rows = read_rows(tmp_path / "out")
    source = read_rows(chunks_40)
    assert list(rows["chunk_id"]) == list(source["chunk_id"])  # none lost, none duplicated, same order
    assert rows["positive"].notna().all()


# ---------------------------------------------------------------------------------------------
# OpenAI Batch API (its outermost calls answered by the local server: OpenAI is unreachable from here)


def test_batch_api_job_is_resumed_by_a_rerun_not_submitted_twice(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("ok"))
    server.batches_finish = False  # the job outlives the first run
    settings = fast_settings(tmp_path, llm="openai:gpt-4o", llm_use_batch_api=True, llm_batch_max_wait=0.5,
                             llm_prices="")
    with pytest.raises(StageError, match="still in_progress") as error:
        generate(chunks_6, tmp_path / "first", settings)
    assert "re-run to collect it" in str(error.value)
    assert server.batch_calls["batches.create"] == 1 and server.batch_calls["files.create"] == 1
    assert len(list((tmp_path / "cache" / "batches").glob("*.json"))) == 1  # the job id, kept with the cache
    lines = server.files["file0"].decode().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["body"]["model"] == "gpt-4o"

    server.batches_finish = True
    stats = generate(chunks_6, tmp_path / "second", settings)
    assert server.batch_calls["batches.create"] == 1 and server.batch_calls["files.create"] == 1  # resumed
    assert stats["generated"] == 6 and not server.answered.keys() - {anchor_id(a) for a in
                                                                      read_rows(chunks_6)["anchor"]}
    # Half the synchronous price.
    assert stats["estimated_cost_usd"] == pytest.approx(
        (stats["prompt_tokens"] * 2.5 + stats["completion_tokens"] * 10.0) / 2 / 1e6)
    third = generate(chunks_6, tmp_path / "third", settings)
    assert third["cached"] == 6 and server.batch_calls["batches.create"] == 1


def test_batch_api_regenerates_invalid_rows_in_a_second_job(tmp_path, chunks_6, openai_server):
    server = openai_server(script=lambda number, body: "missing_negative" if number < 2 else "ok")
    settings = fast_settings(tmp_path, llm="openai:gpt-4o", llm_use_batch_api=True)
    stats = generate(chunks_6, tmp_path / "out", settings)
    assert stats["generated"] == 6 and server.batch_calls["batches.create"] == 2
    assert len(server.files["file2"].decode().splitlines()) == 2  # only the two invalid rows again


def test_batch_api_needs_a_cache_for_its_job_ids(tmp_path, chunks_6, openai_server):
    openai_server()
    with pytest.raises(StageError, match="needs --llm openai:MODEL and an LLM cache"):
        generate(chunks_6, tmp_path / "out", fast_settings(tmp_path, llm_use_batch_api=True, llm_cache_uri=""))


# ---------------------------------------------------------------------------------------------
# Secrets


SECRET_RUN = """
import sys
from components.generate_queries import GenerationSettings, GenerationTuning, generate_queries
settings = GenerationSettings(llm="openai:test-model", llm_cache_uri=sys.argv[2], queries_per_chunk=1,
                              llm_concurrency=4,
                              llm_request_timeout=1.0, max_failure_rate=0.0)
stats = generate_queries(sys.argv[1], sys.argv[3], settings, GenerationTuning(retry_base_delay=0.1))
print("retries", stats["llm_retries"])
"""


def test_api_key_never_reaches_logs_outputs_cache_or_compiled_yaml(tmp_path, chunks_6, openai_server):
    server = openai_server(script=every_third_fails(("500", "429", "malformed")))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OPENAI_BASE_URL": server.base_url,
           "OPENAI_API_KEY": FAKE_KEY}
    # A real process, so everything the stage prints (distilabel's workers and the HTTP client included) is seen.
    result = subprocess.run([sys.executable, "-c", SECRET_RUN, str(chunks_6), str(tmp_path / "cache"),
                             str(tmp_path / "out")], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Bearer {FAKE_KEY}" in server.authorizations  # the key was really used
    assert "HTTP Request: POST" in result.stdout + result.stderr  # the client's own log lines are in there
    assert int(result.stdout.split("retries")[-1]) > 0  # error paths ran and logged
    assert FAKE_KEY not in result.stdout + result.stderr
    for folder in (tmp_path / "out", tmp_path / "cache"):
        files = [path for path in folder.rglob("*") if path.is_file()]
        assert files
        for path in files:
            assert FAKE_KEY.encode() not in path.read_bytes(), path

    compiled = subprocess.run([sys.executable, "pipeline.py", "compile", "--output", str(tmp_path / "p.yaml")],
                              cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    text = (tmp_path / "p.yaml").read_text()
    assert FAKE_KEY not in text + compiled.stdout + compiled.stderr
    assert "OPENAI_API_KEY" in text  # referenced by name, from the Kubernetes secret


def test_on_vertex_the_key_is_read_from_secret_manager_by_name(tmp_path, chunks_6, openai_server,
                                                              fake_secret_manager, capfd):
    from kfp import dsl

    from components.generate_queries import generate_queries_component
    from components.settings import as_dict

    server = openai_server()
    fake_secret_manager["projects/p/secrets/openai-api-key"] = FAKE_KEY
    triplets = dsl.Dataset(uri=str(tmp_path / "triplets"))
    # The component's own body, as the Vertex task runs it: no OPENAI_API_KEY in the environment, only the name.
    generate_queries_component.python_func(docs=dsl.Dataset(uri=str(chunks_6)), triplets=triplets,
                                           openai_secret_resource="projects/p/secrets/openai-api-key",
                                           **as_dict(fast_settings(tmp_path)))
    assert fake_secret_manager.requested == ["projects/p/secrets/openai-api-key/versions/latest"]
    assert server.authorizations == {f"Bearer {FAKE_KEY}"}  # every request carried the key from Secret Manager
    assert triplets.metadata["rows"] == 6 and triplets.metadata["failed"] == 0
    output = capfd.readouterr()
    assert FAKE_KEY not in output.out + output.err + json.dumps(triplets.metadata)


# ---------------------------------------------------------------------------------------------
# Estimate


def test_estimate_counts_prompts_and_skips_cached_rows(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("ok"))
    settings = fast_settings(tmp_path, llm="openai:gpt-4o", llm_prices="")
    before = estimate_generation(chunks_6, settings, expected_completion_tokens=50)
    assert before["rows"] == 6 and before["cached_rows"] == 0 and before["rows_to_generate"] == 6
    assert before["estimated_completion_tokens"] == 300
    assert before["estimated_cost_usd"] == pytest.approx(
        (before["estimated_prompt_tokens"] * 2.5 + 300 * 10.0) / 1e6)
    assert before["estimated_batch_api_cost_usd"] == pytest.approx(before["estimated_cost_usd"] / 2)
    assert not server.log  # estimating sends nothing
    generated = generate(chunks_6, tmp_path / "out", settings)
    # The estimate's prompt tokens are a chars/4 estimate; the server counts chars/4 of the same prompts.
    assert before["estimated_prompt_tokens"] == pytest.approx(generated["prompt_tokens"], rel=0.1)
    after = estimate_generation(chunks_6, settings)
    assert after["cached_rows"] == 6 and after["estimated_cost_usd"] == 0


def test_estimate_command_line(tmp_path):
    result = subprocess.run([sys.executable, "pipeline.py", "estimate", "--dataset", str(PROJECT_ROOT / "docs"),
                             "--limit", "2", "--llm", "openai:gpt-4o", "--no-llm-cache", "--json"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Estimate for gpt-4o over" in result.stdout and "estimated cost:    $" in result.stdout
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["rows"] > 0 and payload["estimated_prompt_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# The OpenAI code path against llama.cpp's own OpenAI-compatible server


@pytest.mark.slow
def test_openai_path_against_llama_cpp_server(tmp_path, chunks_6, llama_cpp_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", llama_cpp_server.base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = GenerationSettings(llm="openai:smollm2", llm_cache_uri=str(tmp_path / "cache"), queries_per_chunk=1,
                                  llm_concurrency=2, max_failure_rate=1.0)
    stats = generate_queries(chunks_6, tmp_path / "out", settings)
    rows = read_rows(tmp_path / "out")
    assert stats["llm_requests"] >= 6 and stats["prompt_tokens"] > 0 and stats["completion_tokens"] > 0
    # The schema reaches llama.cpp's grammar: with a 135M model most rows still come back valid.
    assert stats["generated"] >= 4, rows[["generation_status", "generation_error"]]
    assert set(rows["model_name"]) == {"smollm2"}
    assert stats["estimated_cost_usd"] is None  # no price known for a self-hosted model: reported as unknown
    second = generate_queries(chunks_6, tmp_path / "again", settings)
    # Valid rows come from the cache at no request; rows that failed are not cached, so they are asked again.
    again = read_rows(tmp_path / "again")
    assert second["cached"] == stats["generated"]
    assert (again.loc[again["generation_status"] == "cached", "generation_requests"] == 0).all()
    assert second["generated"] + second["failed"] == stats["failed"]
    assert (second["llm_requests"] == 0) == (stats["failed"] == 0)
