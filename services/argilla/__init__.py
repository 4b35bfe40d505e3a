"""A real argilla-server on this machine, without Elasticsearch: start it, find it, stop it.

The control code uses the standard library only, so the project's Python imports it: `local_server` starts and
stops the server, `venv` installs its own virtualenv (`.venv-argilla`), `processes` watches and ends its processes,
`cli` is the command line (`python -m services.argilla start|stop|status|serve ...`).

    from services.argilla import ensure_venv, start_local_argilla
    with start_local_argilla(data_dir, venv=ensure_venv()) as server:
        client = argilla.Argilla(api_url=server.url, api_key=server.api_key)

The login is random per data folder (`credentials.py`); the server answers loopback only (`exposure.py`).
"""

from services.argilla.credentials import credentials_path, load_or_create_credentials, login_hint
from services.argilla.exposure import EXPOSE_FLAG
from services.argilla.local_server import (
    DEFAULT_PORT,
    DEFAULT_USERNAME,
    LocalArgilla,
    read_running,
    start_local_argilla,
    stop_local_argilla,
)
from services.argilla.processes import LocalArgillaError, port_in_use, process_alive
from services.argilla.venv import ensure_venv, venv_python

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_USERNAME",
    "EXPOSE_FLAG",
    "LocalArgilla",
    "LocalArgillaError",
    "credentials_path",
    "ensure_venv",
    "load_or_create_credentials",
    "login_hint",
    "port_in_use",
    "process_alive",
    "read_running",
    "start_local_argilla",
    "stop_local_argilla",
    "venv_python",
]
