"""What generation costs: list prices, the cost of counted tokens, and an estimate made before any LLM call."""

import json
import os
import tempfile
from typing import Any, Optional

from components.common import StageError, read_splits
from components.generate_queries.llm import LLMSpec, parse_llm_spec
from components.generate_queries.prompts import STYLE_COLUMN, VARIANT_COLUMN, parse_styles, query_rows
from components.generate_queries.settings import GenerationSettings

# What a reply costs in tokens, for the estimate mode: two short questions in a JSON object.
DEFAULT_EXPECTED_COMPLETION_TOKENS = 60
BATCH_DISCOUNT = 0.5  # the Batch API bills half the synchronous price
# A placeholder key for building the task in an estimate: it needs the prompts, never the key, and sends nothing.
ESTIMATE_ONLY_KEY = "estimate-only-no-requests"

# US$ per 1M tokens (prompt, completion), OpenAI list prices for standard (synchronous) requests. Prices change:
# override or extend with --llm-prices / the `llm_prices` parameter, e.g. '{"gpt-4o": [2.5, 10]}'.
# Local models are free.
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


def price_table(overrides: Optional[dict[str, Any]] = None) -> dict[str, tuple[float, float]]:
    """The list prices with `overrides` applied.

    An override is {"model": [prompt, completion]} or {"model": {"prompt": .., "completion": ..}}.
    """
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


def run_price(spec: LLMSpec, llm_prices: str, batch_api: bool) -> Optional[tuple[float, float]]:
    """The price this run pays per 1M tokens: the `llm_prices` overrides applied, halved for the Batch API."""
    price = price_for(spec, parse_prices(llm_prices))
    if price is not None and batch_api:
        price = (price[0] * BATCH_DISCOUNT, price[1] * BATCH_DISCOUNT)
    return price


def estimated_cost(prompt_tokens: int, completion_tokens: int, price: Optional[tuple[float, float]]) -> Optional[float]:
    """US$ for the tokens at `price`; None when the price is unknown."""
    if price is None:
        return None
    return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000, 8)


def price_fields(price: Optional[tuple[float, float]]) -> Optional[dict[str, float]]:
    """A price as it appears in stats and estimates."""
    return {"prompt": price[0], "completion": price[1]} if price else None


def parse_prices(text: str) -> dict[str, Any]:
    """The `llm_prices` JSON: {"model": [prompt, completion]} in US$ per 1M tokens."""
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


def chars_to_tokens(text: str) -> int:
    """Tokens in a text, estimated.

    No OpenAI tokenizer is available offline (tiktoken downloads its encodings), so this is the usual rule of thumb
    for English text: about four characters per token. Labelled an estimate wherever it is shown.
    """
    return max(1, round(len(text) / 4))


def _estimate_task(spec: LLMSpec, settings: GenerationSettings):
    from distilabel.pipeline import Pipeline

    from components.generate_queries.task import make_task

    # Whether a key is set, never the key itself: a traceback must have no local variable that holds it.
    borrowed = spec.provider == "openai" and not os.environ.get("OPENAI_API_KEY")
    if borrowed:
        os.environ["OPENAI_API_KEY"] = ESTIMATE_ONLY_KEY
    try:
        with tempfile.TemporaryDirectory(prefix="distilabel-") as work_dir:
            with Pipeline(name="generate-queries-estimate", cache_dir=work_dir):
                task = make_task(spec, settings, input_batch_size=1)
    finally:
        if borrowed:
            os.environ.pop("OPENAI_API_KEY", None)
    task.load()
    return task


def estimate_generation(
    input_dir: str | os.PathLike,
    settings: GenerationSettings,
    expected_completion_tokens: int = DEFAULT_EXPECTED_COMPLETION_TOKENS,
) -> dict[str, Any]:
    """What a generation run over `input_dir` would cost, before spending anything: no LLM call is made.

    Prompt tokens: the exact prompts the run would send, counted at ~4 characters per token (plus a few tokens of
    chat framing per message). Completion tokens: `expected_completion_tokens` per row. Rows already in the LLM
    cache are counted apart: they cost nothing. One attempt per row; retries and regenerations add to it.
    """
    from components.generate_queries.run import remove_closed_queue_handlers

    spec = parse_llm_spec(settings.llm)
    price = price_for(spec, parse_prices(settings.llm_prices))
    frames = read_splits(input_dir)
    task = _estimate_task(spec, settings)
    rows = cached = prompt_tokens = 0
    styles = parse_styles(settings.query_styles)
    for frame in frames.values():
        for row in query_rows(frame.to_dict("records"), styles, settings.queries_per_chunk):
            rows += 1
            messages = task.format_input(row)
            if task.cached_pair(messages, row[STYLE_COLUMN], row[VARIANT_COLUMN]) is not None:
                cached += 1
                continue
            prompt_tokens += sum(chars_to_tokens(message["content"]) + 4 for message in messages)
    remove_closed_queue_handlers()
    to_generate = rows - cached
    completion_tokens = to_generate * expected_completion_tokens
    cost = estimated_cost(prompt_tokens, completion_tokens, price)
    return {
        "llm": spec.label,
        "rows": rows,
        "cached_rows": cached,
        "rows_to_generate": to_generate,
        "estimated_prompt_tokens": prompt_tokens,
        "estimated_completion_tokens": completion_tokens,
        "token_count_method": "about 4 characters per token (no offline tokenizer for API models)",
        "price_per_million_tokens": price_fields(price),
        "estimated_cost_usd": cost,
        "estimated_batch_api_cost_usd": (round(cost * BATCH_DISCOUNT, 8)
                                         if cost is not None and spec.provider == "openai" else None),
    }
