"""Benchmarks of what the pipeline's data does to a model; `python -m benchmarks.quality` is `make quality`."""
