"""GENERATION-BRIDGE, temporary: the generation settings in the new style until `components/generate_queries`
declares its own `GenerationSettings` built with `components.settings.setting` (issue 11, item 1).

Everything the rest of `d2e/` and `pipeline.py` needs about generation's settings goes through this module, so that
the switch is: import `GenerationSettings`, `generate_queries_component` and the estimate from
`components.generate_queries` at the lines marked GENERATION-BRIDGE, and delete this file.

Until then, the pipeline parameters and `run` flags already have their derived names; this module translates them
to today's component arguments and today's `components.generate_queries.GenerationSettings`.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from components.common import CLUSTER_LLM
from components.generate_queries import (
    DEFAULT_BATCH_MAX_WAIT,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONTEXT,
    DEFAULT_MAX_FAILURE_RATE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TEMPERATURE,
    JSON_MODES,
    LOCAL_LLM,
)
from components.generate_queries import GenerationSettings as StageGenerationSettings
from components.generate_queries import estimate_generation as stage_estimate_generation
from components.generate_queries import generate_queries_component as stage_component
from components.generate_queries import parse_prices
from components.settings import setting

DEFAULT_LLM_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "docs-to-embeddings" / "llm"
# Tolerated generation failure rate for the embedded model (for any other LLM: the cluster default).
LOCAL_MAX_FAILURE_RATE = 0.25


@dataclass(frozen=True)
class GenerationSettings:
    """The generate_queries stage's settings, as pipeline parameters and `run` flags."""

    llm: str = setting(CLUSTER_LLM, "'local' (embedded SmolLM2 via llama.cpp), 'llamacpp:/path/model.gguf', or "
                       "'openai:MODEL' (OPENAI_API_KEY / OPENAI_BASE_URL from the env)", local=LOCAL_LLM)
    llm_base_url: str = setting("", "OpenAI-compatible base URL (else OPENAI_BASE_URL)")
    context: str = setting(DEFAULT_CONTEXT, "what the documents are, for the query prompt")
    llm_cache_uri: str = setting("", "folder or gs://bucket/prefix of cached LLM results", local=str(DEFAULT_LLM_CACHE))
    temperature: float = setting(DEFAULT_TEMPERATURE, "sampling temperature", minimum=0.0, maximum=2.0)
    max_new_tokens: int = setting(DEFAULT_MAX_NEW_TOKENS, "completion tokens per request", minimum=1)
    generation_batch_size: int = setting(16, "rows per distilabel batch", local=8, minimum=1)
    llm_concurrency: int = setting(DEFAULT_CONCURRENCY, "requests in flight at once for an API endpoint (the "
                                   "in-process model is serial)", minimum=1)
    llm_request_timeout: float = setting(DEFAULT_REQUEST_TIMEOUT, "seconds per request", minimum=0.001)
    llm_max_retries: int = setting(DEFAULT_MAX_RETRIES, "retries per request after 429/5xx/timeouts/dropped "
                                   "connections", minimum=0)
    llm_json_mode: str = setting("auto", "output constraint for OpenAI-compatible endpoints (see "
                                 "docs/configuration.md)", choices=JSON_MODES)
    llm_prices: str = setting("", "price overrides, JSON: '{\"MODEL\": [prompt, completion]}' in US$ per 1M tokens")
    llm_use_batch_api: bool = setting(False, "OpenAI Batch API: half price, results within 24 h; job ids are kept "
                                      "in the LLM cache, so a re-run resumes them")
    llm_batch_max_wait: float = setting(DEFAULT_BATCH_MAX_WAIT, "seconds to wait for a Batch API job before "
                                        "stopping (a re-run resumes it)", minimum=0.0)
    max_failure_rate: float = setting(DEFAULT_MAX_FAILURE_RATE, "fail the run when more than this fraction of rows "
                                      "fail generation (a local run with another LLM than the embedded one: the "
                                      "cluster default)", local=LOCAL_MAX_FAILURE_RATE, minimum=0.0, maximum=1.0)


# Pipeline parameter -> today's argument of generate_queries_component, where they differ.
COMPONENT_ARGUMENT_NAMES = {
    "generation_batch_size": "batch_size", "llm_concurrency": "concurrency", "llm_request_timeout": "request_timeout",
    "llm_max_retries": "max_retries", "llm_json_mode": "json_mode", "llm_use_batch_api": "use_batch_api",
    "llm_batch_max_wait": "batch_max_wait",
}


def generate_queries_component(**arguments):
    """The generation task, called with the settings' names (today's component takes some under older names)."""
    return stage_component(**{COMPONENT_ARGUMENT_NAMES.get(name, name): value for name, value in arguments.items()})


def estimate_generation(chunks: str, values: dict, expected_completion_tokens: int) -> dict:
    """The stage's estimate over a chunk folder, from the settings' values."""
    settings = StageGenerationSettings(
        llm=values["llm"], context=values["context"], cache_uri=values["llm_cache_uri"],
        temperature=values["temperature"], max_new_tokens=values["max_new_tokens"], json_mode=values["llm_json_mode"],
        prices=parse_prices(values["llm_prices"]))
    return stage_estimate_generation(chunks, settings, expected_completion_tokens)
