"""Fixtures: a real local argilla-server 2.8 (in-memory search engine) and an SDK client.

The server runs from ``.venv-argilla`` (created on first use from
``services/argilla/requirements.lock``: ~30-60 s once, then instant); the
server itself is ready in a few seconds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_SERVER_PATH = REPO_ROOT / "services" / "argilla" / "local_server.py"


def load_local_server() -> ModuleType:
    """Import services/argilla/local_server.py by path (``services`` is not a package)."""
    name = "argilla_local_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LOCAL_SERVER_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def local_server() -> ModuleType:
    return load_local_server()


@pytest.fixture(scope="session")
def argilla_venv(local_server) -> Path:
    return local_server.ensure_venv(REPO_ROOT)


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
