"""generate_queries when the endpoint is not there, and the Batch API when a job submission's answer is lost.

A refused connection costs a bounded number of requests per run (not per row); a Batch API job is created at most
once, even when the answer to its creation never arrives. OpenAI's Batch API is unreachable from here: the local
fault server in tests/support/servers.py answers its outermost calls.
"""

import dataclasses
import io
import logging
import socket

import pandas as pd
import pytest

from components.common import StageError
from components.generate_queries import GenerationSettings, GenerationTuning, generate_queries
from components.generate_queries.breaker import CONNECT_FAILURE_LIMIT, ConnectionBreaker, shown_url
from components.load_docs import load_docs
from tests.support.servers import always, free_port

FAST = GenerationTuning(retry_base_delay=0.05, retry_max_delay=0.2, batch_poll_interval=0.05)


def real_chunks(tmp_path_factory, kubeflow_docs, per_split: int):
    """`per_split` real Kubeflow doc chunks in each split, as load_docs writes them."""
    folder = tmp_path_factory.mktemp(f"chunks{2 * per_split}")
    load_docs(str(kubeflow_docs), folder, limit=per_split)
    return folder


@pytest.fixture(scope="module")
def chunks_20(tmp_path_factory, kubeflow_docs):
    return real_chunks(tmp_path_factory, kubeflow_docs, 10)


@pytest.fixture(scope="module")
def chunks_6(tmp_path_factory, kubeflow_docs):
    return real_chunks(tmp_path_factory, kubeflow_docs, 3)


def settings_for(tmp_path, **overrides) -> GenerationSettings:
    values = dict(llm="openai:test-model", llm_cache_uri=str(tmp_path / "cache"), llm_concurrency=4,
                  generation_batch_size=4, llm_request_timeout=2.0, llm_max_retries=6, queries_per_chunk=1,
                  max_failure_rate=0.05, llm_prices='{"test-model": [1, 2]}')
    values.update(overrides)
    return GenerationSettings(**values)


def closed_port_url() -> str:
    """A base URL on loopback where nothing listens: every connection is refused."""
    port = free_port()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return f"http://127.0.0.1:{port}/v1"


def rows_of(folder) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(folder / f"{split}.parquet") for split in ("train", "test")])


# ---------------------------------------------------------------------------------------------
# Connection refused: a budget per run


def test_a_refused_connection_is_tried_a_bounded_number_of_times_per_run_then_the_stage_names_the_url(
        tmp_path, chunks_20, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base_url = closed_port_url()
    settings = settings_for(tmp_path, llm_base_url=base_url)
    with pytest.raises(StageError) as error:
        generate_queries(chunks_20, tmp_path / "out", settings, FAST)
    message = str(error.value)
    assert base_url in message and "could not connect" in message and "--llm-base-url" in message
    rows = rows_of(tmp_path / "out")  # written before the stage stopped
    assert len(rows) == 20 and (rows["generation_status"] == "failed").all()
    # Before: 20 rows x 3 attempts x 7 requests = 420 refused connections. Now the run stops after the limit, plus
    # at most the requests already in flight or waiting out a backoff when the breaker opened.
    sent = int(rows["generation_requests"].sum())
    assert CONNECT_FAILURE_LIMIT <= sent <= CONNECT_FAILURE_LIMIT + 2 * settings.llm_concurrency, sent
    assert rows["generation_error"].str.startswith("could not connect to").sum() >= 10


def test_the_breaker_counts_only_connections_in_a_row_and_hides_credentials_in_the_url():
    import openai

    with pytest.raises(openai.APIConnectionError) as caught:  # a real refusal, as the SDK's transport raises it
        openai.OpenAI(base_url=closed_port_url(), api_key="unused", max_retries=0).models.list()
    refused = caught.value
    timeout = openai.APITimeoutError(request=refused.request)
    breaker = ConnectionBreaker("http://user:pa55word@llm.internal:8000/v1", limit=3)
    for error in (refused, refused, None, refused, timeout, refused, refused):
        breaker.record(error)
    assert not breaker.open  # an answer or a timeout (a server was there) starts the count again
    breaker.record(refused)
    assert breaker.open and "pa55word" not in breaker.reason and "http://llm.internal:8000/v1" in breaker.reason
    assert shown_url("http://host/v1") == "http://host/v1"


# ---------------------------------------------------------------------------------------------
# Batch API: one job per client-side id


def test_a_batch_job_whose_creation_answer_was_lost_is_found_by_its_id_not_created_again(
        tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("ok"))
    server.drop_batch_create_answers = 1  # the job is created, the answer never arrives
    settings = settings_for(tmp_path, llm="openai:gpt-4o", llm_use_batch_api=True, llm_prices="",
                            generation_batch_size=8)  # the 6 rows in one job
    generate_queries(chunks_6, tmp_path / "first", settings, FAST)
    # Before: the SDK retried the lost create and paid for a second job. Now: one create, and the job is found.
    assert server.batch_calls["batches.create"] == 1
    assert len(server.batches) == 1
    (job,) = server.batches.values()
    assert job["metadata"]["d2e_client_id"]
    second = generate_queries(chunks_6, tmp_path / "second", settings, FAST)
    assert second["generated"] + second["cached"] == 6
    assert server.batch_calls["batches.create"] == 1 and len(server.batches) == 1
    assert server.batch_calls["batches.list"] >= 1  # looked up by its client-side id


def test_the_client_side_id_is_stored_before_the_job_is_created(tmp_path, chunks_6, openai_server):
    server = openai_server(script=always("ok"))
    seen = []
    server.on_batch_create = lambda: seen.extend(
        path.read_text() for path in (tmp_path / "cache" / "batches").glob("*.json"))
    settings = settings_for(tmp_path, llm="openai:gpt-4o", llm_use_batch_api=True, llm_prices="",
                            generation_batch_size=8)  # the 6 rows in one job
    stats = generate_queries(chunks_6, tmp_path / "out", settings, FAST)
    assert stats["generated"] == 6
    (record,) = seen
    (job,) = server.batches.values()
    assert job["metadata"]["d2e_client_id"] in record


# ---------------------------------------------------------------------------------------------
# No LLM cache with an API model: a loud warning


def test_an_api_run_without_llm_cache_warns_that_a_rerun_pays_again(tmp_path, chunks_6, openai_server):
    openai_server(script=always("ok"))
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("generate_queries").addHandler(handler)
    try:
        generate_queries(chunks_6, tmp_path / "out", dataclasses.replace(settings_for(tmp_path), llm_cache_uri=""),
                         FAST)
    finally:
        logging.getLogger("generate_queries").removeHandler(handler)
    assert "WARNING: no LLM cache" in log.getvalue() and "llm_cache_uri" in log.getvalue()
