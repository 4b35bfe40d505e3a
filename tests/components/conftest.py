"""Fixtures that start real servers for the generate_queries tests (see tests/support/servers.py)."""

import pytest

from tests.support.servers import FakeGCS, FaultyOpenAIServer, LlamaCppServer


@pytest.fixture
def openai_server(monkeypatch):
    """Start a FaultyOpenAIServer: `openai_server(script=..., ...)`; OPENAI_BASE_URL points at it."""
    started = []

    def start(**kwargs) -> FaultyOpenAIServer:
        server = FaultyOpenAIServer(**kwargs).start()
        started.append(server)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        return server

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def fake_gcs():
    server = FakeGCS().start()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(fake_gcs, monkeypatch, request):
    """A fresh bucket on the fake GCS server; STORAGE_EMULATOR_HOST points the client at it."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs.url)
    client = storage.Client(credentials=AnonymousCredentials(), project="test")
    import uuid

    name = f"cache-{uuid.uuid4().hex[:12]}"
    bucket = client.create_bucket(name)
    return bucket


@pytest.fixture(scope="module")
def llama_cpp_server():
    from components.generate_queries import embedded_gguf_path

    server = LlamaCppServer(str(embedded_gguf_path())).start()
    yield server
    server.stop()
