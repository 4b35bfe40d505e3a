"""The real Argilla 2.x SDK against the local argilla-server (in-memory search engine).

Covers what the pipeline needs from Argilla: dataset settings, logging records
with suggestions/metadata/vectors, reading them back, upsert by record id,
vector similarity, metadata filters, text search, progress and metadata
metrics (UI), and persistence across a restart (re-index from SQLite).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import uuid
from pathlib import Path

import argilla as rg
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

AGENT = "doc2emb-generator/test"
N_RECORDS = 12
SECTIONS = ["install", "configure", "deploy"]
DIMS = 8


def dataset_settings() -> "rg.Settings":
    return rg.Settings(
        fields=[rg.TextField(name="anchor")],
        questions=[rg.TextQuestion(name="positive"), rg.TextQuestion(name="negative")],
        metadata=[
            rg.TermsMetadataProperty(name="parent_section"),
            rg.TermsMetadataProperty(name="split"),
            rg.IntegerMetadataProperty(name="token_count"),
            rg.FloatMetadataProperty(name="similarity-positive-negative"),
            rg.FloatMetadataProperty(name="similarity-anchor-positive"),
            rg.FloatMetadataProperty(name="similarity-anchor-negative"),
        ],
        vectors=[rg.VectorField(name="anchor-vector", dimensions=DIMS)],
    )


def vector_for(i: int) -> list:
    """Distinct unit-ish vectors: a main axis plus a small, index-dependent second component."""
    v = [0.0] * DIMS
    v[i % DIMS] = 1.0
    v[(i + 3) % DIMS] = 0.05 * (i + 1)
    return v


def expected_metadata(i: int) -> dict:
    return {
        "parent_section": SECTIONS[i % 3],
        "split": "test" if i % 4 == 0 else "train",
        "token_count": 20 + 5 * i,
        "similarity-positive-negative": round(0.05 * i, 2),
        "similarity-anchor-positive": round(0.5 + 0.02 * i, 2),
        "similarity-anchor-negative": round(0.3 - 0.01 * i, 2),
    }


def make_record(i: int, version: int = 1) -> "rg.Record":
    return rg.Record(
        id=f"rec-{i:02d}",
        fields={"anchor": f"How do I {SECTIONS[i % 3]} component{i} of the toolkit?"},
        metadata=expected_metadata(i),
        vectors={"anchor-vector": vector_for(i)},
        suggestions=[
            rg.Suggestion(question_name="positive", value=f"positive answer {i} v{version}", agent=AGENT),
            rg.Suggestion(question_name="negative", value=f"negative answer {i} v{version}", agent=AGENT),
        ],
    )


def ids(records) -> list:
    return [r.id for r in records]


@pytest.fixture(scope="module")
def dataset(argilla_client):
    ds = rg.Dataset(
        name=f"doc2emb-{uuid.uuid4().hex[:8]}",
        workspace="argilla",
        settings=dataset_settings(),
        client=argilla_client,
    )
    ds.create()
    ds.records.log([make_record(i) for i in range(N_RECORDS)])
    return ds


def test_server_reports_inmemory_engine(argilla_client, argilla_server):
    status = argilla_client.http_client.get("/api/v1/status")
    assert status.status_code == 200
    body = status.json()
    assert body["version"] == "2.8.0"
    assert body["search_engine"]["name"] == "inmemory"
    assert argilla_client.me.username == argilla_server.username
    assert argilla_server.url.startswith("http://127.0.0.1:")


def test_web_ui_is_served(argilla_client):
    page = argilla_client.http_client.get("/")
    assert page.status_code == 200
    assert "<html" in page.text.lower()


def test_records_round_trip(dataset):
    records = list(dataset.records(with_suggestions=True, with_vectors=True))
    assert sorted(ids(records)) == [f"rec-{i:02d}" for i in range(N_RECORDS)]
    for record in records:
        i = int(record.id.split("-")[1])
        assert record.fields["anchor"] == f"How do I {SECTIONS[i % 3]} component{i} of the toolkit?"
        assert record.suggestions["positive"].value == f"positive answer {i} v1"
        assert record.suggestions["negative"].value == f"negative answer {i} v1"
        assert record.suggestions["positive"].agent == AGENT
        assert record.suggestions["negative"].agent == AGENT
        for key, value in expected_metadata(i).items():
            assert record.metadata[key] == pytest.approx(value), key
        assert record.vectors["anchor-vector"] == pytest.approx(vector_for(i))


def test_log_same_ids_upserts(dataset):
    before = len(list(dataset.records))
    changed = make_record(1, version=2)
    changed.metadata["split"] = "holdout"
    dataset.records.log([make_record(0, version=2), changed])
    after = list(dataset.records(with_suggestions=True))
    assert len(after) == before == N_RECORDS
    by_id = {r.id: r for r in after}
    assert by_id["rec-01"].suggestions["positive"].value == "positive answer 1 v2"
    assert by_id["rec-00"].suggestions["negative"].value == "negative answer 0 v2"
    # the search index follows the update too
    holdout = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.split", "==", "holdout")))))
    assert ids(holdout) == ["rec-01"]
    dataset.records.log([make_record(1)])  # restore for the other tests
    assert len(list(dataset.records)) == N_RECORDS


def test_vector_similarity_returns_nearest_first(dataset):
    target = 5
    query = [x + (0.01 if k == 2 else 0.0) for k, x in enumerate(vector_for(target))]
    results = list(dataset.records(query=rg.Query(similar=rg.Similar(name="anchor-vector", value=query)), limit=5))
    assert results, "similarity search returned nothing"
    first, first_score = results[0]
    assert first.id == f"rec-{target:02d}"
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))

    assert first_score == pytest.approx((1 + cosine(query, vector_for(target))) / 2, abs=1e-6)


def test_metadata_filters_select_subset(dataset):
    test_split = list(dataset.records(query=rg.Query(filter=rg.Filter(("metadata.split", "==", "test")))))
    assert sorted(ids(test_split)) == [f"rec-{i:02d}" for i in range(N_RECORDS) if i % 4 == 0]

    combined = rg.Filter(
        [
            ("metadata.parent_section", "in", ["install", "deploy"]),
            ("metadata.token_count", ">=", 40),
            ("metadata.similarity-positive-negative", "<=", 0.4),
        ]
    )
    got = sorted(ids(dataset.records(query=rg.Query(filter=combined))))
    expected = [
        f"rec-{i:02d}"
        for i in range(N_RECORDS)
        if SECTIONS[i % 3] in ("install", "deploy") and 20 + 5 * i >= 40 and 0.05 * i <= 0.4 + 1e-9
    ]
    assert got == expected and expected


def test_text_search(dataset):
    only_seven = list(dataset.records(query=rg.Query(query="component7")))
    assert ids(only_seven) == ["rec-07"]
    # default operator AND: every term has to match
    configure = list(dataset.records(query=rg.Query(query="configure toolkit")))
    assert sorted(ids(configure)) == [f"rec-{i:02d}" for i in range(N_RECORDS) if SECTIONS[i % 3] == "configure"]
    assert list(dataset.records(query=rg.Query(query="configure component0"))) == []
    # text query combined with a metadata filter
    combined = rg.Query(query="deploy", filter=rg.Filter(("metadata.split", "==", "train")))
    assert sorted(ids(dataset.records(query=combined))) == [
        f"rec-{i:02d}" for i in range(N_RECORDS) if SECTIONS[i % 3] == "deploy" and i % 4 != 0
    ]


def test_progress_and_metadata_metrics(dataset, argilla_client):
    progress = dataset.progress()
    assert progress["total"] == N_RECORDS
    assert progress["pending"] == N_RECORDS

    http = argilla_client.http_client
    properties = http.get(f"/api/v1/me/datasets/{dataset.id}/metadata-properties").json()["items"]
    metrics = {p["name"]: http.get(f"/api/v1/metadata-properties/{p['id']}/metrics").json() for p in properties}
    assert metrics["token_count"]["min"] == 20
    assert metrics["token_count"]["max"] == 20 + 5 * (N_RECORDS - 1)
    assert metrics["split"]["total"] == N_RECORDS
    assert {v["term"]: v["count"] for v in metrics["split"]["values"]} == {"test": 3, "train": 9}
    assert metrics["similarity-anchor-negative"]["min"] == pytest.approx(0.3 - 0.01 * (N_RECORDS - 1))

    user_metrics = http.get(f"/api/v1/me/datasets/{dataset.id}/metrics").json()
    assert user_metrics["responses"]["pending"] == N_RECORDS


def test_responses_feed_progress_and_status_filters(argilla_client):
    ds = rg.Dataset(name=f"responses-{uuid.uuid4().hex[:8]}", workspace="argilla", settings=dataset_settings(),
                    client=argilla_client)
    ds.create()
    records = [make_record(i) for i in range(3)]
    me = argilla_client.me
    records[0].responses.add(rg.Response("positive", "human positive", user_id=me.id, status="submitted"))
    records[0].responses.add(rg.Response("negative", "human negative", user_id=me.id, status="submitted"))
    ds.records.log(records)
    assert ds.progress()["completed"] == 1
    submitted = rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))
    assert ids(ds.records(query=submitted)) == ["rec-00"]
    pending = rg.Query(filter=rg.Filter(("response.status", "==", "pending")))
    assert sorted(ids(ds.records(query=pending))) == ["rec-01", "rec-02"]


def test_restart_keeps_data_and_cli_start_stop(local_server, argilla_venv, tmp_path):
    """`start`/`stop` CLI (detached, as `make argilla-ui` uses it), then a restart re-indexes from SQLite."""
    data_dir = tmp_path / "argilla"
    cli = [sys.executable, "-m", "services.argilla"]
    started = subprocess.run(cli + ["start", "--data-dir", str(data_dir), "--port", "0"], capture_output=True,
                             text=True, timeout=150, cwd=REPO_ROOT)
    assert "Warning" not in started.stderr, started.stderr
    assert started.returncode == 0, started.stdout + started.stderr
    info = local_server.read_running(data_dir)
    assert info is not None and info["url"] in started.stdout
    # where the login is, not the login: the output may be kept in a log
    assert info["credentials_file"] in started.stdout
    assert info["password"] not in started.stdout + started.stderr
    assert info["api_key"] not in started.stdout + started.stderr
    status = subprocess.run(cli + ["status", "--data-dir", str(data_dir)], capture_output=True, cwd=REPO_ROOT)
    assert status.returncode == 0

    client = rg.Argilla(api_url=info["url"], api_key=info["api_key"])
    ds = rg.Dataset(name="persisted", workspace="argilla", settings=dataset_settings(), client=client)
    ds.create()
    ds.records.log([make_record(i) for i in range(4)])

    stopped = subprocess.run(cli + ["stop", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=60,
                             cwd=REPO_ROOT)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert local_server.read_running(data_dir) is None
    for pid in (info["server_pid"], info["redis_pid"]):
        assert not local_server.process_alive(pid)

    with local_server.start_local_argilla(data_dir, venv=argilla_venv) as server:
        client = rg.Argilla(api_url=server.url, api_key=server.api_key)
        ds = client.datasets(name="persisted", workspace="argilla")
        assert len(list(ds.records)) == 4
        found = list(ds.records(query=rg.Query(query="component2")))
        assert ids(found) == ["rec-02"]
        nearest = list(ds.records(query=rg.Query(similar=rg.Similar(name="anchor-vector", value=vector_for(3)))))
        assert nearest[0][0].id == "rec-03"
    assert not local_server.process_alive(server.server_pid)


def test_ensure_venv_is_idempotent_and_fast(local_server, argilla_venv):
    started = time.monotonic()
    assert local_server.ensure_venv(REPO_ROOT) == argilla_venv
    assert time.monotonic() - started < 1.0
    assert local_server.venv_python(argilla_venv).exists()

