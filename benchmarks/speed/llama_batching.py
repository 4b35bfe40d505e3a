"""Does decoding several sequences at once raise llama.cpp's throughput on this CPU? (issue 10: "if batching several
sequences in llama.cpp raises throughput on CPU, use it").

The embedded SmolLM2 GGUF through llama-cpp-python's low-level API: N sequences, each its own prompt of the stage's
average length (distinct token ids, so nothing comes from a shared prefix), decoded together, then N tokens a step
(one per sequence) for a fixed number of steps. Tokens/s for the prompts and for generation at N = 1 (what the
stage does: distilabel's LlamaCppLLM asks for one completion at a time) and at 2, 4 and 8.
"""

import os
import time

from benchmarks.speed import Row, benchmark

PROMPT_TOKENS = 360  # the stage's average prompt (embedded_generation: 8,652 prompt tokens for 24 requests)
STEPS = 48  # about a reply's length (38 generated tokens a request)


def decode_rates(model, n_parallel: int, prompt_tokens: int, steps: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) with `n_parallel` sequences in one context."""
    import llama_cpp as L

    params = L.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 512, 512, n_parallel
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    context = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(512, 0, n_parallel)

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        if L.llama_decode(context, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        started = time.perf_counter()
        for sequence in range(n_parallel):
            decode([(100 + (sequence * 7 + position) % 5000, position, sequence, position == prompt_tokens - 1)
                    for position in range(prompt_tokens)])
        prompt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(steps):
            decode([(200 + step, prompt_tokens + step, sequence, True) for sequence in range(n_parallel)])
        generation_seconds = time.perf_counter() - started
    finally:
        L.llama_batch_free(batch)
        L.llama_free(context)
    return n_parallel * prompt_tokens / prompt_seconds, n_parallel * steps / generation_seconds


@benchmark("llama_batching")
def llama_batching(quick: bool) -> list[Row]:
    """Generated and prompt tokens/s at 1, 2, 4 and 8 sequences decoded together."""
    import llama_cpp as L

    from components.generate_queries.llm import parse_llm_spec

    prompt_tokens, steps, counts = (16, 4, (1, 2)) if quick else (PROMPT_TOKENS, STEPS, (1, 2, 4, 8))
    L.llama_backend_init()
    model = L.llama_model_load_from_file(parse_llm_spec("local").model.encode(), L.llama_model_default_params())
    try:
        rates = {count: decode_rates(model, count, prompt_tokens, steps) for count in counts}
    finally:
        L.llama_model_free(model)
    rows = []
    for count in counts[1:]:
        rows.append(Row(f"llama.cpp generation, {count} sequences at once vs 1", rates[count][1], rates[1][1],
                        "tokens/s", note=f"{steps} steps after a {prompt_tokens}-token prompt per sequence"))
        rows.append(Row(f"llama.cpp prompt processing, {count} sequences vs 1", rates[count][0], rates[1][0],
                        "tokens/s", note="distinct prompts: no shared prefix"))
    return rows
