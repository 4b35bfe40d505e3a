"""`pipeline.py estimate`: the expected generation tokens and cost over a dataset, without calling the LLM."""

import argparse
import json
import os
import tempfile

from components.generate_queries import GenerationSettings, estimate_generation
from components.load_docs import load_docs
from components.settings import from_arguments
from d2e.local_run import PROJECT_ROOT, llm_cache_uri


def estimate(values: dict, given: set, args: argparse.Namespace) -> int:
    """Load the chunks as a run would, then print the estimate (and, with --json, the estimate as JSON)."""
    if values["llm_base_url"]:
        os.environ["OPENAI_BASE_URL"] = values["llm_base_url"]
    values = dict(values, llm_cache_uri=llm_cache_uri(values, args.no_llm_cache))
    with tempfile.TemporaryDirectory(prefix="estimate-") as chunks:
        load_docs(values["dataset"] or str(PROJECT_ROOT), chunks, limit=values["limit"],
                  text_column=values["text_column"], docs_base_url=values["docs_base_url"])
        settings = from_arguments(GenerationSettings, values)
        result = estimate_generation(chunks, settings, args.expected_completion_tokens)
    cost, batch_cost = result["estimated_cost_usd"], result["estimated_batch_api_cost_usd"]
    per_row = args.expected_completion_tokens
    print(f"Estimate for {result['llm']} over {result['rows']} chunks ({result['cached_rows']} already cached):\n"
          f"  prompt tokens:     ~{result['estimated_prompt_tokens']:,} ({result['token_count_method']})\n"
          f"  completion tokens: ~{result['estimated_completion_tokens']:,} ({per_row} per row)\n"
          "  estimated cost:    " + (f"${cost:.4f}" if cost is not None else "unknown: no price for this model, "
                                     "pass --llm-prices '{\"MODEL\": [prompt, completion]}' (US$ per 1M tokens)")
          + (f" (Batch API: ${batch_cost:.4f})" if batch_cost is not None else "")
          + "\n  One attempt per row; retries and regenerations add to this.")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0
