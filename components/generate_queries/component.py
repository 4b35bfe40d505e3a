"""The thin KFP component of the generate_queries stage.

Its arguments are the fields of GenerationSettings, by the same names, plus the artifacts and the Vertex secret's
name. KFP copies the function's source into the compiled YAML, so everything it uses is imported in its body.
"""

from kfp.dsl import Dataset, Input, Output

from components.common import stage_component


@stage_component("generate_queries")
def generate_queries_component(
    docs: Input[Dataset],
    llm: str,
    llm_base_url: str,
    context: str,
    llm_cache_uri: str,
    queries_per_chunk: int,
    query_styles: str,
    prompt_excerpt_chars: int,
    temperature: float,
    max_new_tokens: int,
    generation_batch_size: int,
    llm_concurrency: int,
    llm_request_timeout: float,
    llm_max_retries: int,
    llm_json_mode: str,
    llm_prices: str,
    llm_use_batch_api: bool,
    llm_batch_max_wait: float,
    shards: int,
    max_failure_rate: float,
    triplets: Output[Dataset],
    openai_secret_resource: str = "",
    shard: int = 0,
):
    """Generate `queries_per_chunk` (positive, negative) pairs per chunk with distilabel's GenerateSentencePair.

    With `shards` > 1 this task is shard number `shard` of a ParallelFor: it reads only that shard's chunks.
    """
    arguments = dict(locals())  # first, while the arguments are the only locals
    from components.common import load_secret_into_env
    from components.generate_queries import GenerationSettings, generate_queries
    from components.settings import from_arguments

    # Vertex: the key comes from Secret Manager by name at run time (Kubeflow injects it as env instead).
    load_secret_into_env(openai_secret_resource, "OPENAI_API_KEY")
    # The range checks run here too: a run started from the KFP UI never went through the CLI's checks.
    settings = from_arguments(GenerationSettings, arguments)
    stats = generate_queries(docs.path, triplets.path, settings, shard=shard)
    triplets.metadata.update({"rows": stats["rows"], "failed": stats["failed"], "llm": stats["llm"],
                              "llm_retries": stats["llm_retries"], "prompt_tokens": stats["prompt_tokens"],
                              "completion_tokens": stats["completion_tokens"],
                              "estimated_cost_usd": stats["estimated_cost_usd"]})
