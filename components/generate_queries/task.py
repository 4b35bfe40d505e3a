"""The distilabel task: GenerateSentencePair with JSON output, validation, bounded regeneration, retries and a cache.

Importing this module imports distilabel (over a second), so the package imports it only where a run needs it.
distilabel's worker processes import `QueryTripletTask` from here by its module path (the fork server preloads it).
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from distilabel.models.llms import OpenAILLM
from distilabel.models.llms.base import AsyncLLM
from distilabel.steps import StepInput
from distilabel.steps.tasks import GenerateSentencePair
from pydantic import PrivateAttr

from components.common import ANCHOR, NEGATIVE, POSITIVE, get_logger
from components.generate_queries.batch_api import BatchJobs
from components.generate_queries.breaker import ConnectionBreaker, is_connect_failure
from components.generate_queries.cache import CACHE_FAULTS, open_cache, row_cache_key
from components.generate_queries.concurrency import AdaptiveSlots, AimdLimit
from components.generate_queries.llm import (
    Attempt,
    LLMSpec,
    RowRequest,
    build_llm,
    generation_kwargs,
    legacy_llm_identity,
    llm_identity,
    response_format_for,
)
from components.generate_queries.prompts import STYLE_COLUMN, VARIANT_COLUMN, build_messages, styles
from components.generate_queries.retries import describe_error, is_rate_limited, request_retrying
from components.generate_queries.settings import GenerationSettings, GenerationTuning
from components.generate_queries.status import (
    GENERATED_COLUMNS,
    for_transport,
    new_status,
    record_attempt,
    record_failure,
    record_pair,
    record_review_flag,
)
from components.generate_queries.steering import ExampleWordBias, bias_rule
from components.generate_queries.validation import parse_generation, restates_instructions, row_problem
from components.progress import ProgressReporter
from components.tracebacks import plain_tracebacks

plain_tracebacks()  # importing distilabel installed rich tracebacks that print every local variable (keys too)

# At most this many cache look-ups at once: against object storage each is a round trip.
CACHE_LOOKUP_THREADS = 16
DEFAULT_STYLE = "question"


@dataclass(frozen=True)
class Judgement:
    """What one attempt gave a row: a pair to keep (`final`), a pair to keep only if no better one comes, or none."""

    pair: Optional[dict[str, str]]
    final: bool


def _style(row: dict[str, Any]) -> str:
    return row.get(STYLE_COLUMN) or DEFAULT_STYLE


def _is_pair(entry: Optional[dict[str, Any]]) -> bool:
    return entry is not None and bool(entry.get(POSITIVE)) and bool(entry.get(NEGATIVE))


class QueryTripletTask(GenerateSentencePair):
    """GenerateSentencePair with JSON output, validation, bounded regeneration, retries and a row cache.

    Each row of a batch is its own request, run concurrently with its own retry budget, so one failing request
    never costs the rest of the batch anything. One adaptive limit (concurrency.py) bounds the requests in flight
    across all batches: `llm_concurrency` at most, less while the endpoint answers 429. With
    `concurrency_stats_path` set, the limit's summary is written there after each batch.
    """

    spec: LLMSpec
    settings: GenerationSettings
    tuning: GenerationTuning = GenerationTuning()
    total_rows: int = 0
    concurrency_stats_path: str = ""
    _cache: Any = PrivateAttr(default=None)
    _identity: dict[str, Any] = PrivateAttr(default_factory=dict)
    _legacy_identity: Optional[dict[str, Any]] = PrivateAttr(default=None)
    _output_formats: dict[str, Optional[dict[str, Any]]] = PrivateAttr(default_factory=dict)
    _instructions: str = PrivateAttr(default="")
    _loop: Any = PrivateAttr(default=None)
    _done: int = PrivateAttr(default=0)
    _progress: Any = PrivateAttr(default=None)
    _breaker: Any = PrivateAttr(default=None)
    _limit: Any = PrivateAttr(default=None)
    _slots: Any = PrivateAttr(default=None)
    _word_bias: Any = PrivateAttr(default=None)

    def load(self) -> None:
        """Load the LLM, open the row cache and work out the output constraint and the instruction words."""
        super().load()
        self._cache = open_cache(self.settings.llm_cache_uri)
        self._identity = llm_identity(self.spec, self.settings.llm_base_url)
        self._legacy_identity = legacy_llm_identity(self.spec)
        self._output_formats = {style: response_format_for(self.spec, self.settings.llm_json_mode,
                                                           self.settings.llm_base_url or None, style)
                                for style in styles()}
        self._limit = AimdLimit(self.settings.llm_concurrency, factor=self.tuning.concurrency_decrease,
                                on_change=self._log_limit)
        probe = self.format_input({ANCHOR: ""})
        self._instructions = " ".join(message["content"] for message in probe)
        # Plain lines in the stage's log; in a local run also the live bar's events (components/progress.py).
        self._progress = ProgressReporter("generate_queries", self.total_rows, logger=get_logger("generate_queries"),
                                          tokens=True, failures=True)
        if self.spec.provider == "llamacpp":  # steering.py: keeps the model off the worked examples' words
            self._word_bias = ExampleWordBias(self.llm._model.tokenize)  # noqa: SLF001
        self._breaker = ConnectionBreaker(str(getattr(self.llm, "base_url", "") or ""))
        if isinstance(self.llm, OpenAILLM):
            # The pydantic field takes whole seconds; the client takes any float.
            self.llm._aclient = self.llm._aclient.with_options(timeout=self.settings.llm_request_timeout)  # noqa: SLF001

    @property
    def outputs(self) -> list[str]:
        """The columns this task adds to each row."""
        return [*GENERATED_COLUMNS, *CACHE_FAULTS]

    def format_input(self, input: dict[str, Any], attempt: int = 1) -> list[dict[str, str]]:
        """The prompt for the row's query style (see prompts.py); each regeneration shows another worked example."""
        example = int(input.get(VARIANT_COLUMN) or 0) + attempt - 1
        return build_messages(input, self.context or "", input.get(STYLE_COLUMN) or DEFAULT_STYLE, example,
                              self.settings.prompt_excerpt_chars)

    def format_output(self, output: Optional[str], input: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The pair in a reply (None for both when there is none)."""
        pair, _ = parse_generation(output)
        return pair or {POSITIVE: None, NEGATIVE: None}

    def review_flag(self, row: dict[str, Any]) -> Optional[str]:
        """A hint for human review (Argilla metadata): valid, but probably not a real user question."""
        for key in (POSITIVE, NEGATIVE):
            if row.get(key) and restates_instructions(row[key], row[ANCHOR], self._instructions):
                return f"{key} restates the instructions"
        return None

    def cache_key(self, messages: list[dict[str, str]], style: str = DEFAULT_STYLE, variant: int = 0,
                  identity: Optional[dict[str, Any]] = None) -> str:
        """The row cache key of a prompt with this task's model (or `identity`) and its style's generation arguments.

        A chunk's queries of one style differ by their worked example; past the last example the prompt repeats,
        so from there on the variant itself is part of the key (earlier keys stay as they were).
        """
        generation = self._generation_kwargs(style)
        if self._word_bias is not None:  # the per-prompt bias follows from the messages; its rule is in the key
            generation = {**generation, "example_word_bias": bias_rule()}
        if variant >= len(styles()[style]["examples"]):
            generation = {**generation, "query_variant": variant}
        return row_cache_key(identity or self._identity, messages, generation)

    def cached_pair(self, messages: list[dict[str, str]], style: str = DEFAULT_STYLE,
                    variant: int = 0) -> Optional[dict[str, Any]]:
        """The cached entry for a prompt when it holds a pair, else None (a look-up only: nothing is written)."""
        row = {STYLE_COLUMN: style, VARIANT_COLUMN: variant}
        entry = self._look_up(RowRequest(row, self.cache_key(messages, style, variant), messages), migrate=False)
        return entry if _is_pair(entry) else None

    def process(self, inputs: StepInput):  # type: ignore[override]
        """Serve what the cache has, generate the rest, and yield every row with its status fields."""
        rows = [{**row, **new_status(self.spec.label), **dict.fromkeys(CACHE_FAULTS, 0)} for row in inputs]
        requests = []
        for row in rows:
            messages = self.format_input(row)
            key = self.cache_key(messages, _style(row), int(row.get(VARIANT_COLUMN) or 0))
            requests.append(RowRequest(row, key, messages))
        pending = self._serve_from_cache(requests)
        if pending and self.settings.llm_use_batch_api:
            self._generate_rows_batch_api(pending)
            for request in pending:
                self._count_row(request.row)
        elif pending:
            self._event_loop().run_until_complete(self._generate_rows(pending))
        for row in rows:
            if row["generation_status"] != "failed":
                record_review_flag(row, self.review_flag(row))
        self._done += len(rows)
        failed = sum(row["generation_status"] == "failed" for row in rows)
        retries = sum(row["llm_retries"] for row in rows)
        self._logger.info("generated %d/%d rows (%d failed, %d retried requests in this batch)", self._done,
                          self.total_rows, failed, retries)
        self._write_concurrency_stats()
        yield [for_transport(row) for row in rows]

    # -- one attempt -----------------------------------------------------------------------------------------

    def _generation_kwargs(self, style: str = DEFAULT_STYLE, attempt: int = 1,
                           logit_bias: Optional[dict[str, float]] = None) -> dict[str, Any]:
        return generation_kwargs(self.spec, self.settings, self.tuning, self._output_formats.get(style), attempt,
                                 logit_bias)

    def _judge(self, row: dict[str, Any], number: int, attempt: Attempt) -> Judgement:
        """Record attempt `number` on the row and say what its reply is worth."""
        record_attempt(row, number, attempt)
        pair, reason = (None, attempt.error) if attempt.error else parse_generation(attempt.text)
        reason = reason or row_problem(pair, row, _style(row))
        if reason:
            record_failure(row, reason)
            return Judgement(pair=None, final=False)
        pair = {POSITIVE: pair[POSITIVE].strip(), NEGATIVE: pair[NEGATIVE].strip()}
        # Usable but probably not a real question: try again, keep this one in case nothing better comes.
        flagged = self.review_flag({**row, **pair}) is not None and number < self.tuning.max_attempts
        return Judgement(pair=pair, final=not flagged)

    def _finish(self, request: RowRequest, pair: dict[str, str]) -> None:
        # Cached the moment it is valid: a process killed later in the batch loses nothing finished.
        fault = self._cache.put(request.key, {**pair, "model": self.spec.label, "created": time.time()})
        if fault:
            request.row[fault] = 1
        record_pair(request.row, pair, "generated")

    async def _request(self, messages: list[dict[str, str]], style: str = DEFAULT_STYLE, attempt: int = 1) -> Attempt:
        """One generation, with transport retries for an API endpoint."""
        bias = self._word_bias(messages[-1]["content"]) if self._word_bias is not None else None
        kwargs = self._generation_kwargs(style, attempt, bias)
        if not isinstance(self.llm, AsyncLLM):  # in-process and serial: nothing to retry, nothing to overlap
            try:
                output = self.llm.generate_outputs(inputs=[messages], num_generations=1, **kwargs)[0]
            except Exception as error:  # noqa: BLE001 - recorded on the row
                return Attempt(error=describe_error(error))
            return Attempt.from_output(output)
        if self._slots is None:  # made here, inside the loop the client lives on
            self._slots = AdaptiveSlots(self._limit, is_rate_limited)
        retries = 0
        policy = request_retrying(self.settings.llm_max_retries, self.tuning.retry_base_delay,
                                  self.tuning.retry_max_delay, self._log_retry, give_up=lambda: self._breaker.open)
        try:
            async for attempt in policy:
                with attempt:
                    retries = attempt.retry_state.attempt_number - 1
                    # A slot per HTTP request: a request waiting out its backoff holds none.
                    async with self._slots.slot():
                        if self._breaker.open:  # it opened while this request waited for a slot: send nothing
                            return Attempt(error=self._breaker.reason, retries=retries, sent=False)
                        output = await self._counted(self.llm.agenerate(input=messages, num_generations=1,
                                                                        **kwargs))
        except Exception as error:  # noqa: BLE001 - classified by retry_delay; recorded on the row
            return Attempt(error=describe_error(error), retries=retries)
        return Attempt.from_output(output, retries)

    async def _counted(self, request: Any) -> Any:
        """Await a request, telling the connection breaker whether it reached the server."""
        try:
            output = await request
        except Exception as error:
            self._breaker.record(error)
            raise
        self._breaker.record(None)
        return output

    def _log_retry(self, error: BaseException, retry: int, seconds: float) -> None:
        self._logger.info("request failed (%s); retry %d/%d in %.1f s", describe_error(error), retry,
                          self.settings.llm_max_retries, seconds)

    def _log_limit(self, old: int, new: int, reason: str) -> None:
        self._logger.info("requests in flight: %d -> %d (%s)", old, new, reason)

    def _write_concurrency_stats(self) -> None:
        if self.concurrency_stats_path and self._limit is not None:
            with open(self.concurrency_stats_path, "w") as file:
                json.dump(self._limit.summary(), file)

    # -- rows, concurrently ------------------------------------------------------------------------------------

    def _serve_from_cache(self, requests: list[RowRequest]) -> list[RowRequest]:
        """Fill the rows the cache holds; return the others (a damaged or unreadable entry is a counted miss)."""
        with ThreadPoolExecutor(max_workers=min(CACHE_LOOKUP_THREADS, max(1, len(requests)))) as pool:
            entries = list(pool.map(self._look_up, requests))
        pending = []
        for request, entry in zip(requests, entries):
            if _is_pair(entry) and row_problem(entry, request.row, _style(request.row)) is None:
                record_pair(request.row, entry, "cached")
                continue
            if _is_pair(entry):  # a pair the validation rules, tightened since, refuse: generated again, replaced
                self._cache.expire(request.key)
            pending.append(request)
        if self._progress is not None and len(pending) < len(requests):
            self._progress.advance(len(requests) - len(pending))
        return pending

    def _count_row(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.advance(tokens=row["prompt_tokens"] + row["completion_tokens"],
                                   failed=int(row["generation_status"] == "failed"))

    def _look_up(self, request: RowRequest, migrate: bool = True) -> Optional[dict[str, Any]]:
        found = self._cache.read(request.key)
        if found.fault:
            request.row[found.fault] = 1
        if found.entry is None and not found.fault and self._legacy_identity is not None:
            # The embedded model's entries from before content-hash keys: used, and copied to the current key.
            row = request.row
            legacy = self._cache.read(self.cache_key(request.messages, _style(row),
                                                     int(row.get(VARIANT_COLUMN) or 0), self._legacy_identity))
            if legacy.entry is not None and migrate:
                self._cache.put(request.key, legacy.entry)
            return legacy.entry
        return found.entry

    async def _generate_row(self, request: RowRequest) -> None:
        await self._attempt_row(request)
        self._count_row(request.row)

    async def _attempt_row(self, request: RowRequest) -> None:
        fallback = None  # a valid pair that only carries a review flag
        for number in range(1, self.tuning.max_attempts + 1):
            if self._breaker.open:  # the endpoint is unreachable: no row sends anything more in this run
                record_failure(request.row, self._breaker.reason)
                break
            messages = request.messages if number == 1 else self.format_input(request.row, number)
            attempt = await self._request(messages, _style(request.row), number)
            judgement = self._judge(request.row, number, attempt)
            if judgement.final:
                await asyncio.to_thread(self._finish, request, judgement.pair)
                return
            fallback = fallback or judgement.pair
        if fallback is not None:
            await asyncio.to_thread(self._finish, request, fallback)

    async def _generate_rows(self, pending: list[RowRequest]) -> None:
        await asyncio.gather(*(self._generate_row(request) for request in pending))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if isinstance(self.llm, AsyncLLM):
            return self.llm.event_loop  # the loop the async client lives on
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    # -- OpenAI Batch API: half the price, results within 24 h -------------------------------------------------

    def _batch_jobs(self) -> BatchJobs:
        body: dict[str, Any] = {"max_tokens": self.settings.max_new_tokens, "temperature": self.settings.temperature}
        # One body for the whole job: OpenAI's strict schema is the same for every style.
        if self._output_formats.get(DEFAULT_STYLE) is not None:
            body["response_format"] = self._output_formats[DEFAULT_STYLE]
        # The job-management calls use the SDK's own retries (which honour Retry-After); creation never does.
        client = self.llm._client.with_options(max_retries=self.settings.llm_max_retries)  # noqa: SLF001
        return BatchJobs(client, self.llm.model, self._cache.store, self.settings.llm_cache_uri, body,
                         self.tuning.batch_poll_interval, self.settings.llm_batch_max_wait, self._logger)

    def _run_jobs(self, jobs: BatchJobs, pending: list[RowRequest]) -> list[Attempt]:
        """One job's Attempts; once the API could not be reached (after the SDK's own retries), none for the run."""
        if not self._breaker.open:
            try:
                return jobs.run(pending)
            except Exception as error:
                if not is_connect_failure(error):
                    raise
                self._breaker.trip()
        return [Attempt(error=self._breaker.reason, job_unfinished=True)] * len(pending)

    def _generate_rows_batch_api(self, pending: list[RowRequest]) -> None:
        jobs = self._batch_jobs()
        fallback: dict[int, dict[str, str]] = {}
        for number in range(1, self.tuning.max_attempts + 1):
            if not pending:
                break
            retry = []
            for request, attempt in zip(pending, self._run_jobs(jobs, pending)):
                judgement = self._judge(request.row, number, attempt)
                if judgement.final:
                    self._finish(request, judgement.pair)
                    continue
                if judgement.pair is not None:
                    fallback.setdefault(id(request.row), judgement.pair)
                if not attempt.job_unfinished:  # a running job is collected by the next run, not retried now
                    retry.append(request)
            pending = retry
        for request in pending:
            if id(request.row) in fallback:
                self._finish(request, fallback[id(request.row)])


def make_task(spec: LLMSpec, settings: GenerationSettings, tuning: Optional[GenerationTuning] = None,
              total_rows: int = 0, input_batch_size: int = 8, concurrency_stats_path: str = "") -> QueryTripletTask:
    """The task for a run (inside a distilabel Pipeline context)."""
    return QueryTripletTask(name="generate_sentence_pair", triplet=True, action="query", context=settings.context,
                            llm=build_llm(spec, timeout=settings.llm_request_timeout, base_url=settings.llm_base_url),
                            input_batch_size=input_batch_size, spec=spec, settings=settings,
                            tuning=tuning or GenerationTuning(), total_rows=total_rows,
                            concurrency_stats_path=concurrency_stats_path)
