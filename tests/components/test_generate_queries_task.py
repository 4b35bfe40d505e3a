"""The distilabel task on its own, driven by an in-test LLM in distilabel's style that returns scripted replies.

No server and no model: each test scripts what the LLM answers per chunk and checks the row fields the task
writes (status, error, attempts, requests, retries, tokens), the row cache and the cost. The real-server tests
are in test_generate_queries_endpoints.py.
"""

import dataclasses
import json
import pickle
from typing import Any, Union

import httpx
import openai
import pandas as pd
import pytest
from distilabel.models.llms.base import AsyncLLM
from distilabel.pipeline import Pipeline
from pydantic import PrivateAttr

from components.generate_queries import (
    GenerationSettings,
    GenerationTuning,
    LLMSpec,
    default_failure_rate,
    generate_queries_component,
    summarise,
)
from components.generate_queries.status import from_transport
from components.generate_queries.task import QueryTripletTask
from components.settings import SettingError, build, specs

ANCHORS = {
    "install": "To install the SDK run pip install kfp. The SDK needs Python 3.9 or later.",
    "upload": "Upload a compiled pipeline in the UI with the Upload pipeline button, then start a run from it.",
}
GOOD = {"install": '{"positive": "Which Python version does the SDK need?", "negative": "How do I delete an '
                   'experiment in the UI?"}',
        "upload": '{"positive": "How do I upload a pipeline in the UI?", "negative": "Which Python version does the '
                  'SDK need?"}'}
NO_NEGATIVE = '{"positive": "Which Python version does the SDK need?"}'
# A question of the right style, about its chunk ("install"), made mostly of the prompt's own words.
RESTATED = '{"positive": "Which search query about the excerpt topic would a user type to install?", ' \
           '"negative": "How do I delete an experiment in the UI?"}'
PROMPT_TOKENS, COMPLETION_TOKENS = 120, 25
SPEC = LLMSpec(provider="openai", model="scripted-model", label="scripted-model")
FAST = GenerationTuning(retry_base_delay=0.001, retry_max_delay=0.01)


def rate_limited() -> openai.RateLimitError:
    response = httpx.Response(429, headers={"retry-after-ms": "1"},
                              request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    return openai.RateLimitError("slow down", response=response, body=None)


def rejected_key() -> openai.AuthenticationError:
    response = httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1/v1/chat/completions"))
    return openai.AuthenticationError("bad key", response=response, body=None)


class ScriptedLLM(AsyncLLM):
    """An AsyncLLM whose replies a test scripts per chunk: the next item of `replies[name]` for each request.

    An item is the reply's text, or an exception to raise (a transport fault). Requests are logged by chunk name.
    """

    replies: dict[str, list[Any]]
    _requests: list[str] = PrivateAttr(default_factory=list)
    _kwargs: list[dict[str, Any]] = PrivateAttr(default_factory=list)

    def load(self) -> None:
        super().load()

    @property
    def model_name(self) -> str:
        return SPEC.model

    async def agenerate(self, input: list[dict[str, str]], num_generations: int = 1, **kwargs: Any) -> dict:
        name = next(name for name, anchor in ANCHORS.items() if anchor in input[-1]["content"])
        self._requests.append(name)
        self._kwargs.append(kwargs)
        reply: Union[str, BaseException] = self.replies[name].pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return {"generations": [reply] * num_generations,
                "statistics": {"input_tokens": [PROMPT_TOKENS], "output_tokens": [COMPLETION_TOKENS]}}


@pytest.fixture
def make_task(tmp_path, monkeypatch):
    """A task around a ScriptedLLM, loaded: `make_task(replies, **settings)`; the row cache is under tmp_path."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)

    def make(replies: dict[str, list[Any]], tuning: GenerationTuning = FAST, load: bool = True,
             **values) -> QueryTripletTask:
        settings = GenerationSettings(**{"llm": "openai:scripted-model", "llm_cache_uri": str(tmp_path / "cache"),
                                         **values})
        with Pipeline(name="unit-test", cache_dir=tmp_path / "distilabel"):
            task = QueryTripletTask(name="generate_sentence_pair", triplet=True, action="query",
                                    context=settings.context, llm=ScriptedLLM(replies=replies), spec=SPEC,
                                    settings=settings, tuning=tuning)
        if load:
            task.load()
        return task

    return make


def run(task: QueryTripletTask, *names: str) -> dict[str, dict[str, Any]]:
    """One batch through the task; its output rows by chunk name."""
    rows = next(task.process([{"anchor": ANCHORS[name], "chunk_id": name} for name in names]))
    return {row["chunk_id"]: from_transport(row) for row in rows}


def test_json_and_section_replies_become_pairs(make_task):
    sections = "## Positive\n  How do I upload a pipeline in the UI?\n## Negative\nHow do I rotate the logs?  "
    task = make_task({"install": [GOOD["install"]], "upload": [sections]})
    rows = run(task, "install", "upload")
    assert rows["install"]["positive"] == "Which Python version does the SDK need?"
    assert (rows["upload"]["positive"], rows["upload"]["negative"]) == ("How do I upload a pipeline in the UI?",
                                                                        "How do I rotate the logs?")
    assert {row["generation_status"] for row in rows.values()} == {"generated"}
    assert {row["model_name"] for row in rows.values()} == {"scripted-model"}
    # The JSON constraint reaches the LLM with every request.
    assert all(kwargs["extra_body"]["response_format"]["type"] == "json_schema" for kwargs in task.llm._kwargs)


def test_an_invalid_reply_is_regenerated(make_task):
    task = make_task({"install": [NO_NEGATIVE, GOOD["install"]]})
    row = run(task, "install")["install"]
    assert row["generation_status"] == "generated" and row["generation_error"] is None
    assert (row["generation_attempts"], row["generation_requests"], row["llm_retries"]) == (2, 2, 0)
    assert task.llm._requests == ["install", "install"]


def test_a_reply_restating_the_prompt_is_regenerated_then_kept_with_a_review_flag(make_task):
    better = make_task({"install": [RESTATED, GOOD["install"]]})
    row = run(better, "install")["install"]
    assert row["positive"] == "Which Python version does the SDK need?" and row["review_flag"] is None

    task = make_task({"install": [RESTATED] * 3}, tuning=dataclasses.replace(FAST, max_attempts=3),
                     llm_cache_uri="")  # not the pair cached just above
    row = run(task, "install")["install"]
    assert row["generation_status"] == "generated" and row["generation_attempts"] == 3
    assert row["review_flag"] == "positive restates the instructions"


def test_a_second_call_is_served_from_the_cache(make_task, tmp_path):
    first = run(make_task({"install": [GOOD["install"]], "upload": [GOOD["upload"]]}), "install", "upload")
    task = make_task({"install": [], "upload": []})  # any request would fail: nothing is scripted
    second = run(task, "install", "upload")
    assert task.llm._requests == []
    for name in ANCHORS:
        assert second[name]["generation_status"] == "cached"
        assert second[name]["positive"] == first[name]["positive"]
        assert (second[name]["generation_requests"], second[name]["prompt_tokens"]) == (0, 0)
    entries = [json.loads(path.read_text()) for path in (tmp_path / "cache").rglob("*.json")]
    assert len(entries) == 2 and {entry["model"] for entry in entries} == {"scripted-model"}


def test_a_row_that_never_gets_a_valid_reply_is_kept_as_failed(make_task, tmp_path):
    task = make_task({"install": [NO_NEGATIVE] * 2, "upload": [rejected_key()] * 2},
                     tuning=dataclasses.replace(FAST, max_attempts=2))
    rows = run(task, "install", "upload")
    invalid, rejected = rows["install"], rows["upload"]
    assert invalid["generation_status"] == "failed" and invalid["generation_error"] == "negative missing"
    assert (invalid["positive"], invalid["negative"], invalid["review_flag"]) == (None, None, None)
    assert (invalid["generation_attempts"], invalid["generation_requests"]) == (2, 2)
    assert invalid["prompt_tokens"] == 2 * PROMPT_TOKENS  # paid for, even though unusable
    # A rejected key is not retried; the row says why, and costs no tokens.
    assert rejected["generation_error"] == "AuthenticationError (HTTP 401)"
    assert (rejected["generation_requests"], rejected["llm_retries"], rejected["prompt_tokens"]) == (2, 0, 0)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are never cached


def test_transport_faults_are_retried_and_counted_on_their_row(make_task):
    task = make_task({"install": [rate_limited(), rate_limited(), GOOD["install"]], "upload": [GOOD["upload"]]})
    rows = run(task, "install", "upload")
    assert rows["install"]["generation_status"] == "generated"
    assert (rows["install"]["generation_attempts"], rows["install"]["generation_requests"],
            rows["install"]["llm_retries"]) == (1, 3, 2)
    assert (rows["upload"]["generation_requests"], rows["upload"]["llm_retries"]) == (1, 0)

    exhausted = make_task({"install": [rate_limited()] * 3}, tuning=dataclasses.replace(FAST, max_attempts=1),
                          llm_max_retries=2, llm_cache_uri="")
    row = run(exhausted, "install")["install"]
    assert row["generation_status"] == "failed" and row["generation_error"] == "RateLimitError (HTTP 429)"
    assert (row["generation_requests"], row["llm_retries"]) == (3, 2)


def test_tokens_are_counted_per_row_and_priced_in_the_summary(make_task):
    task = make_task({"install": [NO_NEGATIVE, GOOD["install"]], "upload": [GOOD["upload"]]})
    rows = list(run(task, "install", "upload").values())
    assert [row["completion_tokens"] for row in rows] == [2 * COMPLETION_TOKENS, COMPLETION_TOKENS]
    frame = pd.DataFrame(rows)
    stats = summarise({"train": frame, "test": frame.iloc[0:0]}, SPEC, llm_prices='{"scripted-model": [1.0, 4.0]}')
    assert (stats["rows"], stats["generated"], stats["llm_requests"]) == (2, 2, 3)
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (3 * PROMPT_TOKENS, 3 * COMPLETION_TOKENS)
    assert stats["estimated_cost_usd"] == pytest.approx((3 * PROMPT_TOKENS * 1.0 + 3 * COMPLETION_TOKENS * 4.0) / 1e6)
    batch = summarise({"train": frame}, SPEC, llm_prices='{"scripted-model": [1.0, 4.0]}', batch_api=True)
    assert batch["estimated_cost_usd"] == pytest.approx(stats["estimated_cost_usd"] / 2)
    assert summarise({"train": frame}, SPEC)["estimated_cost_usd"] is None  # no price known


def test_the_task_pickles_by_its_module_path_for_worker_processes(make_task):
    task = make_task({"install": [GOOD["install"]]}, load=False)  # distilabel sends it to a worker unloaded
    assert (QueryTripletTask.__module__, QueryTripletTask.__qualname__) == ("components.generate_queries.task",
                                                                            "QueryTripletTask")
    task.pipeline = None  # as distilabel does before it hands a step to a worker
    copy = pickle.loads(pickle.dumps(task))
    assert copy.settings == task.settings and copy.spec == SPEC
    copy.load()
    assert run(copy, "install")["install"]["generation_status"] == "generated"


# ---------------------------------------------------------------------------------------------
# The settings: one definition, cluster and local defaults, range checks, the component's arguments


def test_settings_defaults_for_the_cluster_and_a_local_run():
    cluster, local = build(GenerationSettings, {}), build(GenerationSettings, {}, local=True)
    assert (cluster.llm, cluster.generation_batch_size, cluster.max_failure_rate) == ("openai:gpt-4o", 16, 0.05)
    assert (local.llm, local.generation_batch_size, local.max_failure_rate) == ("local", 8, 0.4)
    assert cluster.llm_cache_uri == "" and local.llm_cache_uri.endswith("docs-to-embeddings/llm")
    assert default_failure_rate("local") == 0.4 and default_failure_rate("openai:gpt-4o-mini") == 0.05


@pytest.mark.parametrize("values, message", [
    ({"llm_json_mode": "xml"}, "llm_json_mode must be one of auto"),
    ({"llm_concurrency": 0}, "llm_concurrency must be at least 1"),
    ({"max_failure_rate": 2.0}, "max_failure_rate must be at most 1"),
    ({"llm_max_retries": -1}, "llm_max_retries must be at least 0"),
])
def test_settings_out_of_range_are_refused(values, message):
    with pytest.raises(SettingError, match=message):
        build(GenerationSettings, values)


def test_component_arguments_are_the_settings_by_the_same_names():
    import inspect

    parameters = list(inspect.signature(generate_queries_component.python_func).parameters)
    assert parameters == ["docs", *[spec.name for spec in specs(GenerationSettings)], "triplets",
                          "openai_secret_resource", "shard"]
