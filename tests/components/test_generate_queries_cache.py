"""The LLM row cache trusts nothing it reads: keys hold the endpoint and the GGUF's content hash; damaged entries
(0 bytes, malformed JSON, wrong schema, a folder in place of the file) are misses that are replaced and counted;
an I/O fault on one row's look-up or write costs that row its cache access, never the batch. Real files, the real
fake-gcs-server and a real OpenAI-compatible server; nothing of ours is mocked."""

import json
import logging
import os
import tempfile

import pytest

from components.generate_queries import RowCache, llm_identity, parse_llm_spec
from components.generate_queries.cache import CACHE_FAULTS, row_cache_key
from components.generate_queries.llm import endpoint_identity, legacy_llm_identity
from components.settings import build
from tests.components.test_generate_queries_endpoints import chunks_6, fast_settings, generate  # noqa: F401

ENTRY = {"positive": "How do I install the SDK?", "negative": "How do I delete a cluster?", "model": "m",
         "created": 1.0}
KEY = "ab" * 32
DAMAGED = {"0 bytes": b"", "malformed JSON": b'{"positive": "trunc', "not UTF-8": b"\xff\xfe",
           "wrong schema": json.dumps({"positive": "p", "model": "m", "created": 1.0}).encode(),
           "wrong type": json.dumps({**ENTRY, "created": "yesterday"}).encode(),
           "not an object": b"[1, 2]", "an empty query": json.dumps({**ENTRY, "negative": " "}).encode()}


@pytest.fixture(params=["local", "gcs"])
def cache_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "cache")
    return f"gs://{request.getfixturevalue('gcs_bucket').name}/llm-cache"


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_entry_is_a_counted_miss_then_replaced(cache_uri, kind, caplog):
    cache = RowCache(cache_uri)
    cache.store.put(f"ab/{KEY}.json", DAMAGED[kind])
    with caplog.at_level(logging.WARNING):
        found = cache.read(KEY)
    assert found.entry is None and found.fault == "cache_corrupt"
    assert f"ab/{KEY}.json is damaged" in caplog.text
    assert cache.put(KEY, ENTRY) == ""  # counted once, at the read; the known-bad object is overwritten
    assert cache.read(KEY) == (ENTRY, "")


def test_a_folder_in_place_of_an_entry_is_moved_aside_and_replaced(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "ab" / f"{KEY}.json"
    folder.mkdir(parents=True)
    (folder / "something").write_text("not ours to delete")
    assert cache.read(KEY) == (None, "")  # looks like a miss ...
    assert cache.put(KEY, ENTRY) == "cache_corrupt"  # ... and is found out, counted and replaced, at the write
    assert cache.get(KEY) == ENTRY
    [aside] = (tmp_path / "cache" / "ab").glob(f"{KEY}.json.damaged-*")
    assert (aside / "something").read_text() == "not ours to delete"


def test_a_valid_entry_is_never_overwritten(cache_uri):
    cache = RowCache(cache_uri)
    assert cache.put(KEY, ENTRY) == ""
    assert cache.put(KEY, {**ENTRY, "positive": "another"}) == ""  # the first writer wins
    assert cache.get(KEY) == ENTRY


def test_an_unreadable_entry_is_a_counted_miss_and_left_alone(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    entry = tmp_path / "cache" / "ab" / f"{KEY}.json"
    entry.parent.mkdir(parents=True)
    entry.symlink_to(entry.name)  # a link to itself: reading it fails with "too many levels of symbolic links"
    assert cache.read(KEY) == (None, "cache_read_errors")
    assert cache.put(KEY, ENTRY) == "" and entry.is_symlink()  # what cannot be judged is not replaced


def test_a_failed_write_is_counted_and_logged_once(tmp_path, caplog):
    cache = RowCache(str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ab").write_text("a file where the shard folder should be")
    with caplog.at_level(logging.WARNING):
        assert cache.put(KEY, ENTRY) == "cache_write_errors"
        assert cache.put("ab" + "cd" * 31, ENTRY) == "cache_write_errors"
    assert caplog.text.count("cannot write") == 1
    assert cache.put("cd" * 32, ENTRY) == "" and cache.get("cd" * 32) == ENTRY  # other rows still cached


def test_a_failed_write_to_object_storage_is_counted(gcs_bucket):
    cache = RowCache(f"gs://{gcs_bucket.name}-gone/llm-cache")  # no such bucket: every write fails
    assert cache.read(KEY) == (None, "")
    assert cache.put(KEY, ENTRY) == "cache_write_errors"


def test_the_key_holds_the_endpoint_without_credentials(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    spec = parse_llm_spec("openai:gpt-4o")
    assert llm_identity(spec)["endpoint"] == "https://api.openai.com/v1"
    assert endpoint_identity("HTTP://user:secret@Host:8000/v1/?x=1") == "http://host:8000/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9000/v1")
    assert llm_identity(spec)["endpoint"] == "http://127.0.0.1:9000/v1"
    assert llm_identity(spec, "http://other:8000/v1") != llm_identity(spec)


def gguf(folder, data: bytes) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.gguf")
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def test_a_changed_gguf_of_the_same_name_and_size_is_another_model(tmp_path):
    first = gguf(tmp_path / "a", b"GGUF" + b"\x01" * 60)
    other = gguf(tmp_path / "b", b"GGUF" + b"\x02" * 60)  # same name, same size, other bytes
    key = row_cache_key(llm_identity(parse_llm_spec(f"llamacpp:{first}")), [], {})
    assert row_cache_key(llm_identity(parse_llm_spec(f"llamacpp:{other}")), [], {}) != key
    stat = os.stat(first)
    gguf(tmp_path / "a", b"GGUF" + b"\x03" * 60)  # rewritten in place, a moment later
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert row_cache_key(llm_identity(parse_llm_spec(f"llamacpp:{first}")), [], {}) != key
    assert legacy_llm_identity(parse_llm_spec(f"llamacpp:{first}")) is None  # old keys: the embedded file only


def test_two_endpoints_do_not_share_entries(tmp_path, chunks_6, openai_server):  # noqa: F811
    first, second = openai_server(), openai_server()
    settings = fast_settings(tmp_path, llm_base_url=first.base_url)
    assert generate(chunks_6, tmp_path / "a", settings)["generated"] == 6
    other = generate(chunks_6, tmp_path / "b", fast_settings(tmp_path, llm_base_url=second.base_url))
    assert other["generated"] == 6 and other["cached"] == 0 and len(second.log) == 6
    assert generate(chunks_6, tmp_path / "c", settings)["cached"] == 6 and len(first.log) == 6


def test_damaged_entries_and_failed_writes_cost_no_row(tmp_path, chunks_6, openai_server):  # noqa: F811
    server = openai_server()
    settings = fast_settings(tmp_path)
    first = generate(chunks_6, tmp_path / "first", settings)
    assert first["generated"] == 6 and all(first[fault] == 0 for fault in CACHE_FAULTS)
    entries = sorted((tmp_path / "cache").rglob("*.json"))
    entries[0].write_bytes(b"")
    entries[1].write_text('{"positive": "half')
    entries[2].write_text(json.dumps({"positive": "p", "negative": 3, "model": "m", "created": 1}))
    entries[3].unlink()
    entries[3].mkdir()  # a folder in place of the entry
    second = generate(chunks_6, tmp_path / "second", settings)
    assert (second["cached"], second["generated"], second["failed"], second["cache_corrupt"]) == (2, 4, 0, 4)
    assert len(server.log) == 10
    third = generate(chunks_6, tmp_path / "third", settings)
    assert third["cached"] == 6 and third["cache_corrupt"] == 0 and len(server.log) == 10  # all replaced

    blocked = tmp_path / "blocked"
    for entry in entries:  # every shard folder a file: no write can succeed, and no row fails for it
        (blocked / entry.parent.name).parent.mkdir(parents=True, exist_ok=True)
        (blocked / entry.parent.name).write_text("in the way")
    fourth = generate(chunks_6, tmp_path / "fourth", fast_settings(tmp_path, llm_cache_uri=str(blocked)))
    assert (fourth["generated"], fourth["failed"], fourth["cache_write_errors"]) == (6, 0, 6)
    stats = json.loads((tmp_path / "fourth" / "stats.json").read_text())
    assert stats["cache_write_errors"] == 6


def test_the_embedded_models_entries_from_before_content_hash_keys_are_still_served(tmp_path, chunks_6):  # noqa: F811
    import pandas as pd
    from distilabel.pipeline import Pipeline

    from components.generate_queries import GenerationSettings
    from components.generate_queries.prompts import parse_styles, query_rows
    from components.generate_queries.task import make_task

    settings = build(GenerationSettings, {"llm_cache_uri": str(tmp_path / "cache")}, local=True)
    spec = parse_llm_spec("local")
    with tempfile.TemporaryDirectory() as work_dir, Pipeline(name="legacy", cache_dir=work_dir):
        task = make_task(spec, settings, input_batch_size=1)
    task.load()
    chunk = pd.read_parquet(chunks_6 / "train.parquet").to_dict("records")[0]
    row = query_rows([chunk], parse_styles(settings.query_styles), 1)[0]
    messages = task.format_input(row)
    old_key = task.cache_key(messages, row["query_style"], row["query_variant"], legacy_llm_identity(spec))
    new_key = task.cache_key(messages, row["query_style"], row["query_variant"])
    assert old_key != new_key
    cache = RowCache(settings.llm_cache_uri)
    entry = {**ENTRY, "positive": "How do I contribute to the Kubeflow community?"}  # valid for this chunk
    cache.put(old_key, entry)  # as the previous version wrote it
    assert task.cached_pair(messages, row["query_style"], row["query_variant"])["positive"] == entry["positive"]
    assert cache.get(new_key) is None  # an estimate only looks
    [served] = next(task.process([row]))
    assert served["generation_status"] == "cached" and served["positive"] == entry["positive"]
    assert cache.get(new_key) == entry  # copied to the current key


def test_a_cached_pair_that_validation_now_refuses_is_generated_again_and_replaced(tmp_path, chunks_6):  # noqa: F811
    # Validation rules get tighter (a keyword search may no longer be cut off mid-phrase): entries written under the
    # old rules must not keep bad rows in every later run.
    import pandas as pd
    from distilabel.pipeline import Pipeline

    from components.generate_queries import GenerationSettings
    from components.generate_queries.prompts import query_rows
    from components.generate_queries.task import make_task

    settings = build(GenerationSettings, {"llm_cache_uri": str(tmp_path / "cache")}, local=True)
    with tempfile.TemporaryDirectory() as work_dir, Pipeline(name="stale", cache_dir=work_dir):
        task = make_task(parse_llm_spec("local"), settings, input_batch_size=1)
    task.load()
    chunk = pd.read_parquet(chunks_6 / "train.parquet").to_dict("records")[0]
    row = query_rows([chunk], ("keywords",), 1)[0]
    key = task.cache_key(task.format_input(row), "keywords", 0)
    stale = {**ENTRY, "positive": "install the pipeline sdk with", "negative": "delete a pipeline run"}
    cache = RowCache(settings.llm_cache_uri)
    cache.put(key, stale)
    [served] = next(task.process([row]))
    assert served["generation_status"] == "generated" and served["positive"] != stale["positive"]
    assert cache.get(key)["positive"] == served["positive"]  # replaced, so the next run is served the new pair
    [again] = next(task.process([row]))
    assert again["generation_status"] == "cached" and again["positive"] == served["positive"]
