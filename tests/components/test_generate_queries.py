"""generate_queries: parsing and validation rules, and real runs with the embedded llama.cpp model."""

import json
import os

import pandas as pd
import pytest

from components.common import StageError
from components.generate_queries import (
    DEFAULT_CONTEXT,
    GenerationSettings,
    GenerationTuning,
    RowCache,
    build_llm,
    embedded_gguf_path,
    generate_queries,
    parse_generation,
    parse_llm_spec,
    restates_instructions,
    validate_pair,
)
from components.generate_queries.prompts import output_schema, styles
from components.load_docs import load_docs
from components.settings import build

ANCHOR_TEXT = "To install the SDK run pip install kfp. The SDK needs Python 3.9 or later."


@pytest.mark.parametrize("reply, expected", [
    ('{"positive": "How do I install the SDK?", "negative": "How do I delete a run?"}',
     {"positive": "How do I install the SDK?", "negative": "How do I delete a run?"}),
    ('```json\n{"positive": "p?", "negative": "n?"}\n```', {"positive": "p?", "negative": "n?"}),
    ("Sure! Here it is:\n## Positive\nHow to install?\n## Negative\nHow to uninstall?",
     {"positive": "How to install?", "negative": "How to uninstall?"}),
    ('{"positive": "only a positive"}', {"positive": "only a positive", "negative": None}),
])
def test_parse_generation_accepts_json_and_sections(reply, expected):
    pair, reason = parse_generation(reply)
    assert reason is None and pair == expected


@pytest.mark.parametrize("reply", [None, "", "I cannot help with that.", '{"positive": "unterminated'])
def test_parse_generation_rejects_malformed_replies(reply):
    pair, reason = parse_generation(reply)
    assert pair is None and reason


@pytest.mark.parametrize("pair, reason", [
    ({"positive": "How do I install the SDK?", "negative": "How do I delete a run?"}, None),
    ({"positive": "How do I install the SDK?", "negative": None}, "negative missing"),
    ({"positive": "  ", "negative": "How do I delete a run?"}, "positive missing"),
    ({"positive": "How do I install the SDK?", "negative": "how do I  install the SDK?"},
     "positive and negative are the same"),
    ({"positive": ANCHOR_TEXT, "negative": "How do I delete a run?"}, "positive copies the anchor"),
    ({"positive": "Why?", "negative": "How do I delete a run?"}, "positive too short (4 chars)"),
    ({"positive": "How " * 200, "negative": "How do I delete a run?"}, "positive too long (800 chars > 300)"),
])
def test_validate_pair(pair, reason):
    assert validate_pair(pair, ANCHOR_TEXT) == reason


@pytest.mark.parametrize("positive, reason", [
    ("install kfp sdk python", None),
    ("what is kfp python", None),  # a common web search: "is" right after the first word
    ("install the sdk with pip for", "positive: not a keywords query (a sentence or cut off)"),
    ("kfp sdk is a package that", "positive: not a keywords query (a sentence or cut off)"),
    ("kfp sdk needs python 3.9", None),
    ("metadata.labels is a new feature", "positive: not a keywords query (a sentence or cut off)"),
])
def test_a_keyword_search_that_is_cut_off_or_a_sentence_is_rejected(positive, reason):
    # What the embedded model wrote as searches under a grammar that holds them to 2-6 words.
    pair = {"positive": positive, "negative": "delete pipeline run"}
    assert validate_pair(pair, ANCHOR_TEXT, style="keywords") == reason


def test_a_query_that_fills_its_patterns_length_limit_was_cut_off_and_is_rejected():
    # The grammar ends a query when its character run reaches the pattern's bound (110): the embedded model's long
    # statements stopped mid-phrase there ("... at the upcoming [link](https://forms.gle/...) in.").
    run = ("do I install the kfp sdk with pip on a cluster whose notebook image ships an old python while the docs "
           "ask for version nine or later")  # 132 characters, no repeats, no periods
    full_question, short_question = f"How {run[:110]}?", f"How {run[:109]}?"
    full_statement, short_statement = f"I {run[:110]}.", f"I {run[:109]}."
    negative = {"question": "How do I delete a run?", "statement": "I need to delete a run."}
    for style, full, short in (("question", full_question, short_question),
                               ("statement", full_statement, short_statement)):
        assert validate_pair({"positive": short, "negative": negative[style]}, ANCHOR_TEXT, style=style) is None
        reason = validate_pair({"positive": full, "negative": negative[style]}, ANCHOR_TEXT, style=style)
        assert reason == f"positive: not a {style} query (cut off at the length limit)"


def test_restates_instructions_flags_echoes_not_questions():
    instructions = "The positive sentence has to be a query for the anchor sentence. " + DEFAULT_CONTEXT
    assert restates_instructions("The anchor is a chunk of technical documentation", ANCHOR_TEXT, instructions)
    assert not restates_instructions("Which Python version does the SDK need?", ANCHOR_TEXT, instructions)


def test_llm_specs():
    local = parse_llm_spec("local")
    assert local.provider == "llamacpp" and local.model == str(embedded_gguf_path())
    assert parse_llm_spec("openai:gpt-4o").model == "gpt-4o"
    with pytest.raises(StageError, match="Unknown --llm"):
        parse_llm_spec("anthropic:claude")
    with pytest.raises(StageError, match="no GGUF file"):
        parse_llm_spec("llamacpp:/nowhere/model.gguf")


def test_openai_without_key_or_base_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(StageError, match="OPENAI_API_KEY"):
        build_llm(parse_llm_spec("openai:gpt-4o"))


def test_row_cache_round_trip_and_atomic_files(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    assert cache.get("ab" * 32) is None
    entry = {"positive": "p", "negative": "n", "model": "m", "created": 1.0}
    cache.put("ab" * 32, entry)
    assert cache.get("ab" * 32) == entry
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    (tmp_path / "cache" / "cd").mkdir()
    (tmp_path / "cache" / "cd" / f"{'cd' * 32}.json").write_text('{"truncated')
    assert cache.get("cd" * 32) is None  # a damaged entry is a miss, not a crash


@pytest.fixture(scope="module")
def loaded_chunks(tmp_path_factory, kubeflow_docs):
    folder = tmp_path_factory.mktemp("docs")
    load_docs(str(kubeflow_docs), folder, limit=3)
    return folder


def test_embedded_llm_generates_every_row_and_a_second_run_is_served_from_cache(tmp_path, loaded_chunks):
    settings = build(GenerationSettings, {"llm_cache_uri": str(tmp_path / "cache"), "max_failure_rate": 1.0,
                                          "generation_batch_size": 4}, local=True)
    first = generate_queries(loaded_chunks, tmp_path / "first", settings)
    train = pd.read_parquet(tmp_path / "first" / "train.parquet")
    source = pd.read_parquet(loaded_chunks / "train.parquet")
    assert list(train["chunk_id"]) == list(source["chunk_id"])  # every row kept, in order
    assert first["rows"] == 6 and first["llm_requests"] >= 6 - first["failed"]
    assert first["generated"] >= 5  # JSON-constrained output: the negative is no longer dropped
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert set(train["model_name"]) == {"SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf)"}
    ok = train[train["generation_status"] == "generated"]
    assert ok["positive"].str.len().gt(0).all() and ok["negative"].str.len().gt(0).all()

    second = generate_queries(loaded_chunks, tmp_path / "second", settings)
    # Every generated row is served from the cache; only a row that failed (failures are not cached) is tried again.
    assert second["cached"] == first["generated"]
    assert second["llm_requests"] <= GenerationTuning().max_attempts * first["failed"]
    again = pd.read_parquet(tmp_path / "second" / "train.parquet")
    generated = train["generation_status"] == "generated"
    assert list(again["positive"][generated]) == list(train["positive"][generated])
    stats = json.loads((tmp_path / "second" / "stats.json").read_text())
    assert stats["splits"]["test"]["rows"] == 3


def test_failing_rows_are_kept_counted_and_the_threshold_stops_the_run(tmp_path, loaded_chunks):
    # Eight new tokens cannot hold a JSON object with two questions: every attempt fails validation.
    settings = build(GenerationSettings, {"llm_cache_uri": str(tmp_path / "cache"), "max_new_tokens": 8,
                                          "max_failure_rate": 0.05, "generation_batch_size": 6}, local=True)
    with pytest.raises(StageError) as error:
        generate_queries(loaded_chunks, tmp_path / "out", settings, GenerationTuning(max_attempts=2))
    message = str(error.value)
    assert "6 of 6 rows (100.0%) failed" in message and str(tmp_path / "out") in message
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    assert len(train) == 3 and train["positive"].isna().all()
    assert set(train["generation_status"]) == {"failed"}
    assert (train["generation_attempts"] == 2).all() and train["generation_error"].notna().all()
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


@pytest.mark.parametrize("style", sorted(styles()))
def test_every_styles_reply_schema_compiles_to_a_llama_cpp_grammar(style):
    # llama.cpp parses the grammar only when it builds the sampler; an escape its parser lacks (it once was `\.` in
    # the statement pattern) made the embedded model's worker die and the run hang instead of failing.
    import llama_cpp
    from llama_cpp import Llama, LlamaGrammar

    model = Llama(model_path=str(embedded_gguf_path()), vocab_only=True, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(output_schema(style)), verbose=False)
    sampler = llama_cpp.llama_sampler_init_grammar(model._model.vocab, grammar._grammar.encode(), b"root")  # noqa: SLF001
    assert sampler, f"llama.cpp cannot parse the grammar of the {style!r} style's reply schema"
    llama_cpp.llama_sampler_free(sampler)


def worker_view(_):
    """What a distilabel worker process sees (run in the worker)."""
    import sys

    return os.getpid(), os.getppid(), os.environ.get("D2E_WORKER_PROBE"), "tests_parent_only_module" in sys.modules


def run_probe_in_workers():
    from distilabel.pipeline import local as distilabel_local

    pool = distilabel_local._NoDaemonPool(1)  # the pool class distilabel starts its step workers with
    try:
        return pool.map(worker_view, [0])[0]
    finally:
        pool.terminate()


def test_workers_start_clean_from_a_fork_server_with_the_callers_current_environment(monkeypatch):
    import sys
    import types

    from components.generate_queries.run import run_in_clean_workers

    monkeypatch.setitem(sys.modules, "tests_parent_only_module", types.ModuleType("tests_parent_only_module"))
    monkeypatch.setenv("D2E_WORKER_PROBE", "first")
    pid, parent, probe, inherited = run_in_clean_workers(run_probe_in_workers)
    # Not forked from this process (nothing of its state, threads or modules), and not this process either.
    assert pid != os.getpid() and parent != os.getpid() and not inherited and probe == "first"
    again = run_in_clean_workers(run_probe_in_workers)
    assert again[1] == parent  # the same fork server serves the next run
    monkeypatch.setenv("D2E_WORKER_PROBE", "second")  # a key or setting set since the server started
    assert run_in_clean_workers(run_probe_in_workers)[2] == "second"
