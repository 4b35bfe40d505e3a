"""Run a real argilla-server 2.8 locally, without Elasticsearch.

Runs with the project's MAIN Python (standard library only, no argilla_server
import).  The server itself lives in its own virtualenv, ``.venv-argilla`` in
the repository root (``services/argilla/venv.py``).

Processes started (each in its own process group, bound to 127.0.0.1):

* ``fake_redis.py``  - fakeredis TCP server (argilla needs Redis for its job queue);
* ``uvicorn app:app`` - argilla-server with the in-memory search engine
  (``inmemory_search_engine.py``), SQLite database in ``data_dir``.  At start-up
  it migrates the database, creates/updates the owner user and re-indexes the
  stored datasets.

Python API (``services.argilla``)::

    ensure_venv(repo_root)                       # idempotent, ~1 ms when up to date
    with start_local_argilla(tmp_path / "argilla") as server:
        client = argilla.Argilla(api_url=server.url, api_key=server.api_key)

Command line: ``python -m services.argilla serve|start|stop|status|ensure-venv`` (``services/argilla/cli.py``).

The login (user ``argilla``, a random password and API key) is made once per data folder and kept in
``<data_dir>/credentials.json`` (0600, folder 0700; ``credentials.py``). The server answers only loopback,
its own Host names and its own browser origin (``exposure.py``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

from services.argilla.credentials import (
    PRIVATE_FILE_MODE,
    USERNAME,
    credentials_path,
    load_or_create_credentials,
    secure_data_dir,
)
from services.argilla.exposure import (
    WILDCARD_ADDRESSES,
    check_bind_address,
    exposure_environment,
    inherited_environment,
)
from services.argilla.processes import (
    LocalArgillaError,
    free_port,
    is_ours,
    log_tail,
    port_in_use,
    process_alive,
    read_pid_file,
    terminate_group,
)
from services.argilla.venv import REPO_ROOT, ensure_venv, venv_python

SERVICE_DIR = Path(__file__).resolve().parent

DEFAULT_USERNAME = USERNAME
DEFAULT_HOST = "127.0.0.1"
REDIS_HOST = "127.0.0.1"
DEFAULT_PORT = 6900
DEFAULT_START_TIMEOUT_S = 90.0

PID_FILE_NAME = "local-argilla.json"
STOP_COMMAND = "python -m services.argilla stop"


@dataclasses.dataclass
class LocalArgilla:
    """A running local Argilla server. ``stop()`` ends it (also via ``with``)."""

    url: str
    api_key: str
    username: str
    password: str
    data_dir: Path
    port: int
    redis_url: str
    server_pid: int
    redis_pid: int
    log_file: Path
    procs: List[subprocess.Popen] = dataclasses.field(default_factory=list, repr=False)

    def is_running(self) -> bool:
        """Whether both the server and its Redis are still up."""
        return process_alive(self.server_pid) and process_alive(self.redis_pid)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server log."""
        return log_tail(self.log_file, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop uvicorn (graceful, then SIGKILL) and fake redis; idempotent."""
        terminate_group(self.server_pid, timeout)
        terminate_group(self.redis_pid, timeout)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self.procs.clear()
        pid_file = Path(self.data_dir) / PID_FILE_NAME
        info = read_pid_file(pid_file)
        if info and info.get("server_pid") == self.server_pid:
            pid_file.unlink(missing_ok=True)
        shutil.rmtree(Path(self.data_dir) / "tmp", ignore_errors=True)

    def __enter__(self) -> "LocalArgilla":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_running(data_dir: Path) -> Optional[dict]:
    """Info of the server started on ``data_dir`` if it is still running (from its pid file), else None.

    The login (``username``, ``password``, ``api_key``) comes from the data folder's credentials file, which
    ``credentials_file`` names; the pid file itself holds no secret.
    """
    info = read_pid_file(Path(data_dir) / PID_FILE_NAME)
    if not (info and process_alive(info.get("server_pid", 0)) and is_ours(info["server_pid"])):
        return None
    if info.get("credentials_file"):  # a server started before logins were per folder has them in its pid file
        login = load_or_create_credentials(data_dir)
        info.update(username=login.username, password=login.password, api_key=login.api_key)
    return info


def stop_local_argilla(data_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the (detached) server recorded in ``data_dir``'s pid file. True if one was running."""
    pid_file = Path(data_dir) / PID_FILE_NAME
    info = read_pid_file(pid_file)
    if not info:
        return False
    was_running = False
    for key in ("server_pid", "redis_pid"):
        pid = int(info.get(key) or 0)
        if pid and process_alive(pid) and is_ours(pid):
            was_running = True
            terminate_group(pid, timeout)
    pid_file.unlink(missing_ok=True)
    shutil.rmtree(Path(data_dir) / "tmp", ignore_errors=True)
    return was_running


def _server_env(data_dir: Path, redis_url: str, host: str, port: int, parent_pid: Optional[int]) -> Dict[str, str]:
    """The server's whole environment: no inherited keys; the login is read from the credentials file."""
    env = inherited_environment()
    env.update(
        {
            "ARGILLA_HOME_PATH": str(data_dir),
            "ARGILLA_DATABASE_URL": f"sqlite+aiosqlite:///{data_dir / 'argilla.db'}?check_same_thread=False",
            "ARGILLA_REDIS_URL": redis_url,
            "ARGILLA_SEARCH_ENGINE": "inmemory",
            "HF_HUB_DISABLE_TELEMETRY": "1",  # = ARGILLA_ENABLE_TELEMETRY=0 without its deprecation warning
            "HF_HUB_OFFLINE": "1",
            "TMPDIR": str(data_dir / "tmp"),  # argilla copies its 14 MB web UI to a temp dir at each start
            "PYTHONUNBUFFERED": "1",
            "LOCAL_ARGILLA_CREDENTIALS": str(credentials_path(data_dir)),
            **exposure_environment(host, port),
        }
    )
    if parent_pid:
        env["LOCAL_ARGILLA_PARENT_PID"] = str(parent_pid)
    return env


def _http_status(url: str, api_key: str) -> Optional[int]:
    request = urllib.request.Request(url, headers={"X-Argilla-Api-Key": api_key})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


@dataclasses.dataclass
class _Startup:
    """One start-up in progress: the processes spawned so far, ended together if any step fails."""

    data_dir: Path
    python: Path
    host: str
    timeout: float
    parent_pid: Optional[int]
    started: float = dataclasses.field(default_factory=time.monotonic)
    stamp: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    procs: List[subprocess.Popen] = dataclasses.field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    def overdue(self) -> bool:
        return time.monotonic() - self.started > self.timeout

    def spawn(self, cmd: List[str], log: Path, env: Dict[str, str]) -> subprocess.Popen:
        """Start one process, its output appended to a log only the user reads; what it creates is private too."""
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE), "ab") as out:
            out.write(f"\n===== {self.stamp} $ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(self.data_dir), start_new_session=True, umask=0o077)
        self.procs.append(proc)
        return proc

    def fail(self, message: str, log: Path) -> LocalArgillaError:
        for proc in self.procs:
            terminate_group(proc.pid, 5.0)
        return LocalArgillaError(f"{message}\n--- last lines of {log} ---\n{log_tail(log)}")

    def start_redis(self) -> tuple[subprocess.Popen, str]:
        """Fake Redis (no password) on a free loopback port, whatever the server binds; its process and URL."""
        port_file, log = self.data_dir / "tmp" / "redis.port", self.logs / "redis.log"
        cmd = [str(self.python), str(SERVICE_DIR / "fake_redis.py"), "--host", REDIS_HOST, "--port", "0"]
        cmd += ["--port-file", str(port_file)] + (["--parent-pid", str(self.parent_pid)] if self.parent_pid else [])
        proc = self.spawn(cmd, log, {**inherited_environment(), "PYTHONUNBUFFERED": "1"})
        while not port_file.exists():
            if proc.poll() is not None:
                raise self.fail(f"fake redis exited with code {proc.returncode}", log)
            if self.overdue():
                raise self.fail("fake redis did not start", log)
            time.sleep(0.05)
        return proc, f"redis://{REDIS_HOST}:{int(port_file.read_text())}/0"

    def start_server(self, port: int, env: Dict[str, str]) -> subprocess.Popen:
        """uvicorn serving app:app, one worker (the search index lives in its memory)."""
        cmd = [str(self.python), "-m", "uvicorn", "app:app", "--app-dir", str(SERVICE_DIR), "--host", self.host]
        cmd += ["--port", str(port), "--workers", "1", "--no-access-log", "--timeout-graceful-shutdown", "5"]
        return self.spawn(cmd, self.logs / "server.log", env)

    def wait_until_ready(self, server: subprocess.Popen, redis: subprocess.Popen, url: str, api_key: str) -> None:
        """Until ``GET /api/v1/me`` answers 200: server up, database migrated, user present."""
        while True:
            if server.poll() is not None:
                raise self.fail(f"argilla server exited with code {server.returncode} during start-up",
                                self.logs / "server.log")
            if redis.poll() is not None:
                raise self.fail(f"fake redis exited with code {redis.returncode}", self.logs / "redis.log")
            code = _http_status(f"{url}/api/v1/me", api_key)
            if code == 200:
                return
            if self.overdue():
                raise self.fail(f"argilla server not ready at {url} after {self.timeout:.0f}s (last HTTP status: "
                                f"{code})", self.logs / "server.log")
            time.sleep(0.25)


def _check_can_start(data_dir: Path, host: str, port: int) -> None:
    running = read_running(data_dir)
    if running:
        raise LocalArgillaError(f"an argilla server is already running on {data_dir} ({running.get('url')}); "
                                f"stop it with: {STOP_COMMAND} --data-dir {data_dir}")
    if port and port_in_use(host, port):
        raise LocalArgillaError(f"port {host}:{port} is already in use")


def _write_private_json(path: Path, payload: dict) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE), "w") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")


def start_local_argilla(
    data_dir: Path,
    port: int = 0,
    *,
    venv: Optional[Path] = None,
    host: str = DEFAULT_HOST,
    expose_on_network: bool = False,
    timeout: float = DEFAULT_START_TIMEOUT_S,
    detach: bool = False,
) -> LocalArgilla:
    """Start fake Redis + argilla-server (in-memory search) on ``data_dir``; return once it serves.

    ``port=0`` picks a free port.  ``venv`` defaults to ``ensure_venv(REPO_ROOT)``.  The login is the data
    folder's (``credentials.py``: random, made on the first start, kept in a 0600 file).  A ``host`` other than
    loopback is refused unless ``expose_on_network`` (the ``--expose-on-network-insecure`` flag).
    Ready means ``GET /api/v1/me`` answers 200 with the API key (server up, database
    migrated, user present).  Raises ``LocalArgillaError`` with the server log tail if it
    is not ready within ``timeout`` seconds or a process dies.  Unless ``detach``, the
    processes also end when this Python process exits.
    """
    data_dir = Path(data_dir).resolve()
    check_bind_address(host, expose_on_network)  # before anything is created
    secure_data_dir(data_dir)
    _check_can_start(data_dir, host, port)
    login = load_or_create_credentials(data_dir)
    venv_dir = Path(venv) if venv is not None else ensure_venv(REPO_ROOT)
    if not venv_python(venv_dir).exists():
        raise LocalArgillaError(f"no python in {venv_dir}; run ensure_venv first")
    (data_dir / "logs").mkdir(mode=0o700, exist_ok=True)
    shutil.rmtree(data_dir / "tmp", ignore_errors=True)
    (data_dir / "tmp").mkdir(mode=0o700)

    startup = _Startup(data_dir, venv_python(venv_dir), host, timeout, None if detach else os.getpid())
    redis_proc, redis_url = startup.start_redis()
    port = port or free_port(host)
    url = f"http://{DEFAULT_HOST if host in WILDCARD_ADDRESSES else host}:{port}"
    server_proc = startup.start_server(port, _server_env(data_dir, redis_url, host, port, startup.parent_pid))
    startup.wait_until_ready(server_proc, redis_proc, url, login.api_key)

    server = LocalArgilla(url=url, api_key=login.api_key, username=login.username, password=login.password,
                          data_dir=data_dir, port=port, redis_url=redis_url, server_pid=server_proc.pid,
                          redis_pid=redis_proc.pid, log_file=startup.logs / "server.log", procs=startup.procs)
    info = {"url": url, "port": port, "host": host, "credentials_file": str(login.path),
            "server_pid": server_proc.pid, "redis_pid": redis_proc.pid, "redis_url": redis_url,
            "log_file": str(server.log_file), "detached": detach, "started_at": startup.stamp,
            "startup_s": round(time.monotonic() - startup.started, 2)}
    _write_private_json(data_dir / PID_FILE_NAME, info)
    if not detach:
        atexit.register(server.stop)
    return server
