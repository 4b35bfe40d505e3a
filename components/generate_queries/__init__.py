"""The generate_queries stage: a distilabel pipeline that writes a positive and a negative query per chunk.

`GenerateSentencePair(triplet=True, action="query", context=...)` formats the prompt. Around it this package
adds what a production run needs: JSON-constrained output (small models otherwise drop the negative),
validation with bounded regeneration, a per-row cache keyed by everything that changes the output (so a
re-run, a retried pod or an overlapping run never pays twice), and per-row status and token counts, so a
failed row is kept and counted rather than dropped.

Modules: `settings` (GenerationSettings, the user settings; GenerationTuning, internal knobs), `llm` (the LLM spec
and client), `prompts` (query styles and the prompt, from `templates/`), `validation` (parsing and checking
replies), `cache` (the row cache), `retries` (which errors are retried and when), `cost` (prices, cost, estimate),
`batch_api` (OpenAI Batch API jobs), `status` (the per-row status columns), `task` (the distilabel task; imports
distilabel), `run` (a whole run), `component` (KFP).
"""

from components.generate_queries.cache import CACHE_SCHEMA_VERSION, RowCache, open_cache
from components.generate_queries.cost import (
    BATCH_DISCOUNT,
    DEFAULT_EXPECTED_COMPLETION_TOKENS,
    PRICES_PER_MILLION_TOKENS,
    estimate_generation,
    estimated_cost,
    parse_prices,
    price_for,
    price_table,
)
from components.generate_queries.llm import (
    LLMSpec,
    build_llm,
    embedded_gguf_path,
    llm_identity,
    parse_llm_spec,
    response_format_for,
)
from components.generate_queries.retries import describe_error, retry_delay
from components.generate_queries.run import generate_queries, summarise
from components.generate_queries.settings import (
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
    LOCAL_LLM_CACHE,
    LOCAL_MAX_FAILURE_RATE,
    GenerationSettings,
    GenerationTuning,
    default_failure_rate,
)
from components.generate_queries.status import STATUS_COLUMNS
from components.generate_queries.validation import (
    MAX_QUERY_CHARS,
    MIN_QUERY_CHARS,
    OUTPUT_SCHEMA,
    parse_generation,
    restates_instructions,
    validate_pair,
)


def __getattr__(name: str):
    # The KFP component is imported on first use: kfp takes seconds to import, and distilabel's worker processes
    # import this package (to unpickle the task) but never the component.
    if name == "generate_queries_component":
        from components.generate_queries.component import generate_queries_component

        return generate_queries_component
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BATCH_DISCOUNT", "CACHE_SCHEMA_VERSION", "DEFAULT_BATCH_MAX_WAIT", "DEFAULT_CONCURRENCY", "DEFAULT_CONTEXT",
    "DEFAULT_EXPECTED_COMPLETION_TOKENS", "DEFAULT_MAX_FAILURE_RATE", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_RETRIES",
    "DEFAULT_REQUEST_TIMEOUT", "DEFAULT_TEMPERATURE", "JSON_MODES", "LOCAL_LLM", "LOCAL_LLM_CACHE",
    "LOCAL_MAX_FAILURE_RATE", "MAX_QUERY_CHARS", "MIN_QUERY_CHARS", "OUTPUT_SCHEMA", "PRICES_PER_MILLION_TOKENS",
    "STATUS_COLUMNS", "GenerationSettings", "GenerationTuning", "LLMSpec", "RowCache", "build_llm",
    "default_failure_rate", "describe_error", "embedded_gguf_path", "estimate_generation", "estimated_cost",
    "generate_queries", "generate_queries_component", "llm_identity", "open_cache", "parse_generation",
    "parse_llm_spec", "parse_prices", "price_for", "price_table", "response_format_for", "restates_instructions",
    "retry_delay", "summarise", "validate_pair",
]
