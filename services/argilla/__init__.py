"""A real argilla-server on this machine, without Elasticsearch: start it, find it, stop it.

The control code (`local_server`) uses the standard library only, so the project's Python imports it; the server
itself runs from its own virtualenv, `.venv-argilla` (see `local_server` for the processes it starts).

    from services.argilla import ensure_venv, start_local_argilla
    with start_local_argilla(data_dir, venv=ensure_venv()) as server:
        client = argilla.Argilla(api_url=server.url, api_key=server.api_key)
"""

from services.argilla.local_server import (
    DEFAULT_API_KEY,
    DEFAULT_PASSWORD,
    DEFAULT_PORT,
    DEFAULT_USERNAME,
    LocalArgilla,
    LocalArgillaError,
    ensure_venv,
    port_in_use,
    process_alive,
    read_running,
    start_local_argilla,
    stop_local_argilla,
    venv_python,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_PASSWORD",
    "DEFAULT_PORT",
    "DEFAULT_USERNAME",
    "LocalArgilla",
    "LocalArgillaError",
    "ensure_venv",
    "port_in_use",
    "process_alive",
    "read_running",
    "start_local_argilla",
    "stop_local_argilla",
    "venv_python",
]
