"""generate_queries against a real server that admits N requests a second (token bucket, 429 beyond it).

The stage must finish with every row generated, its in-flight limit lowered by the 429s and raised again when they
stopped, as its stats say; and without 429s the limit stays at `llm_concurrency`, past the batch size.
"""

import pandas as pd
import pytest

from components.generate_queries import GenerationSettings, GenerationTuning, generate_queries
from components.load_docs import load_docs
from tests.support.servers import TokenBucket

PRICES = '{"test-model": [1.0, 2.0]}'
# Backoff only as long as the server's retry-after-ms says (it is short here).
FAST = GenerationTuning(retry_base_delay=0.05, retry_max_delay=1.0)


@pytest.fixture(scope="module")
def chunks(tmp_path_factory, kubeflow_docs):
    """40 real chunks (20 train, 20 test): 80 rows at two queries per chunk."""
    folder = tmp_path_factory.mktemp("chunks")
    load_docs(str(kubeflow_docs), folder, limit=20)
    return folder


def settings(tmp_path, **values) -> GenerationSettings:
    return GenerationSettings(**{"llm": "openai:test-model", "llm_cache_uri": str(tmp_path / "cache"),
                                 "llm_prices": PRICES, "queries_per_chunk": 2, "llm_max_retries": 8, **values})


def test_rate_limited_endpoint_lowers_the_limit_then_raises_it_and_every_row_is_generated(tmp_path, chunks,
                                                                                       openai_server):
    server = openai_server(delay=0.05, bucket=TokenBucket(rate=40, burst=2))
    stats = generate_queries(chunks, tmp_path / "out", settings(tmp_path, llm_concurrency=16), FAST)

    assert stats["generated"] == stats["rows"] == 80 and stats["failed"] == 0
    limit = stats["llm_concurrency_limit"]
    assert server.faults()["rate_limited"] > 0 and limit["rate_limited"] == server.faults()["rate_limited"]
    assert limit["maximum"] == 16 and limit["lowest"] < 16 and limit["decreases"] >= 1
    assert limit["increases"] >= 1  # raised again once the 429s stopped
    rows = pd.concat([pd.read_parquet(tmp_path / "out" / f"{split}.parquet") for split in ("train", "test")])
    assert rows["positive"].notna().all()


def test_without_429s_the_limit_stays_at_llm_concurrency_beyond_the_batch_size(tmp_path, chunks, openai_server):
    server = openai_server(delay=1.0)
    stats = generate_queries(chunks, tmp_path / "out", settings(tmp_path, llm_concurrency=12,
                                                                generation_batch_size=4), FAST)

    assert stats["generated"] == 80
    # A batch holds several times llm_concurrency rows, so more than the batch size of 4 go out at once; never
    # more than the limit.
    assert 4 < server.max_in_flight <= 12
    assert stats["llm_concurrency_limit"] == {"maximum": 12, "final": 12, "lowest": 12, "decreases": 0,
                                              "increases": 0, "rate_limited": 0}
