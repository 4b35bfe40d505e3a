"""Run a real argilla-server 2.8 locally, without Elasticsearch.

Runs with the project's MAIN Python (standard library only, no argilla_server
import).  The server itself lives in its own virtualenv, ``.venv-argilla`` in
the repository root, installed from ``services/argilla/requirements.lock``
(argilla-server pins typer<0.10 / pydantic~=2.9 / httpx~=0.27, which clash
with the main environment).

Processes started (each in its own process group, bound to 127.0.0.1):

* ``fake_redis.py``  - fakeredis TCP server (argilla needs Redis for its job queue);
* ``uvicorn app:app`` - argilla-server with the in-memory search engine
  (``inmemory_search_engine.py``), SQLite database in ``data_dir``.  At start-up
  it migrates the database, creates/updates the owner user and re-indexes the
  stored datasets.

Python API::

    # `services` is not a package: import this file by path (see tests/services/conftest.py)
    ensure_venv(repo_root)                       # idempotent, ~1 ms when up to date
    with start_local_argilla(tmp_path / "argilla") as server:
        client = argilla.Argilla(api_url=server.url, api_key=server.api_key)

CLI (``python services/argilla/local_server.py ...``)::

    serve --data-dir DIR [--port 6900]   # foreground until Ctrl-C, prints the UI address + login
    start --data-dir DIR [--port 6900]   # detached; pid file in DIR
    stop  --data-dir DIR
    status --data-dir DIR
    ensure-venv

The default credentials below are for a LOCAL, loopback-only development
server.  Never use them for anything reachable from a network.
"""


import argparse
import atexit
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

SERVICE_DIR = Path(__file__).resolve().parent
REPO_ROOT = SERVICE_DIR.parents[1]
LOCK_FILE_RELATIVE = Path("services/argilla/requirements.lock")
VENV_DIRNAME = ".venv-argilla"

# ---- LOCAL-ONLY default credentials (loopback development server; never use elsewhere) ----
DEFAULT_USERNAME = "argilla"
DEFAULT_PASSWORD = "12345678"
DEFAULT_API_KEY = "argilla.apikey"
# -------------------------------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6900
DEFAULT_START_TIMEOUT_S = 90.0

_STAMP_NAME = ".requirements.lock.sha256"
_PID_FILE_NAME = "local-argilla.json"

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_PASSWORD",
    "DEFAULT_PORT",
    "DEFAULT_USERNAME",
    "LocalArgilla",
    "LocalArgillaError",
    "ensure_venv",
    "read_running",
    "start_local_argilla",
    "stop_local_argilla",
    "venv_python",
]


class LocalArgillaError(RuntimeError):
    """The local Argilla server (or its virtualenv) could not be set up."""


# --------------------------------------------------------------------------- virtualenv


def venv_python(venv_dir: Path) -> Path:
    return Path(venv_dir) / "bin" / "python"


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def ensure_venv(repo_root: Path = REPO_ROOT, *, python: Optional[str] = None, quiet: bool = True) -> Path:
    """Create/update ``<repo_root>/.venv-argilla`` from the lock file; return the venv directory.

    Idempotent: a stamp file holds the hash of the lock (and of the interpreter
    version); when it matches, this returns at once.  Otherwise the venv is
    created (with ``python``, default: the running interpreter's base Python)
    and ``pip install -r requirements.lock`` + ``pip check`` are run.  A file
    lock inside the venv serialises concurrent callers.
    """
    repo_root = Path(repo_root).resolve()
    lock_file = repo_root / LOCK_FILE_RELATIVE
    venv_dir = repo_root / VENV_DIRNAME
    if not lock_file.is_file():
        raise LocalArgillaError(f"lock file not found: {lock_file}")
    python = python or sys.executable
    digest = hashlib.sha256(
        lock_file.read_bytes() + f"\npython={sys.version_info[:2]}".encode()
    ).hexdigest()
    stamp = venv_dir / _STAMP_NAME
    py = venv_python(venv_dir)

    def up_to_date() -> bool:
        return py.exists() and stamp.is_file() and stamp.read_text().strip() == digest

    if up_to_date():
        return venv_dir

    import fcntl

    venv_dir.mkdir(parents=True, exist_ok=True)
    log = venv_dir / "install.log"
    with open(venv_dir / ".ensure.lock", "w") as lock_handle:
        fcntl.flock(lock_handle, fcntl.LOCK_EX)
        if up_to_date():
            return venv_dir

        def run(cmd: List[str], what: str) -> None:
            if not quiet:
                print(f"[argilla venv] {what}", file=sys.stderr, flush=True)
            with open(log, "ab") as out:
                out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
                out.flush()
                env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
                result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo_root)
            if result.returncode != 0:
                raise LocalArgillaError(f"{what} failed (exit {result.returncode}); {log}:\n{_tail(log, 40)}")

        healthy = py.exists() and subprocess.run([str(py), "-c", "pass"], capture_output=True).returncode == 0
        if not healthy:
            run([python, "-m", "venv", "--clear", str(venv_dir)], f"create {venv_dir}")
        run(
            [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(lock_file)],
            f"pip install -r {LOCK_FILE_RELATIVE}",
        )
        run([str(py), "-m", "pip", "check"], "pip check")
        stamp.write_text(digest + "\n")
    return venv_dir


# --------------------------------------------------------------------------- server handle


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
    _procs: List[subprocess.Popen] = dataclasses.field(default_factory=list, repr=False)

    def is_running(self) -> bool:
        return process_alive(self.server_pid) and process_alive(self.redis_pid)

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_file, lines)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop uvicorn (graceful, then SIGKILL) and fake redis; idempotent."""
        _terminate_group(self.server_pid, timeout)
        _terminate_group(self.redis_pid, timeout)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._procs.clear()
        pid_file = Path(self.data_dir) / _PID_FILE_NAME
        info = _read_pid_file(pid_file)
        if info and info.get("server_pid") == self.server_pid:
            pid_file.unlink(missing_ok=True)
        shutil.rmtree(Path(self.data_dir) / "tmp", ignore_errors=True)

    def __enter__(self) -> "LocalArgilla":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_alive(pid: int) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited child not yet reaped) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _is_ours(pid: int) -> bool:
    """Guard against pid reuse before signalling a pid read from a pid file."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"app:app" in cmdline or b"fake_redis.py" in cmdline


def _terminate_group(pid: int, timeout: float) -> None:
    if not pid or not process_alive(pid):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # children run as session/group leaders (start_new_session)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            if not process_alive(pid):
                return
            time.sleep(0.1)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _read_pid_file(pid_file: Path) -> Optional[dict]:
    try:
        return json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return None


def read_running(data_dir: Path) -> Optional[dict]:
    """Info of the server started on ``data_dir`` if it is still running (from its pid file), else None."""
    info = _read_pid_file(Path(data_dir) / _PID_FILE_NAME)
    if info and process_alive(info.get("server_pid", 0)) and _is_ours(info["server_pid"]):
        return info
    return None


def stop_local_argilla(data_dir: Path, timeout: float = 15.0) -> bool:
    """Stop the (detached) server recorded in ``data_dir``'s pid file. True if one was running."""
    pid_file = Path(data_dir) / _PID_FILE_NAME
    info = _read_pid_file(pid_file)
    if not info:
        return False
    was_running = False
    for key in ("server_pid", "redis_pid"):
        pid = int(info.get(key) or 0)
        if pid and process_alive(pid) and _is_ours(pid):
            was_running = True
            _terminate_group(pid, timeout)
    pid_file.unlink(missing_ok=True)
    shutil.rmtree(Path(data_dir) / "tmp", ignore_errors=True)
    return was_running


def _server_env(
    data_dir: Path, redis_url: str, username: str, password: str, api_key: str, parent_pid: Optional[int]
) -> Dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ARGILLA_", "LOCAL_ARGILLA_")) and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
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
            "LOCAL_ARGILLA_USERNAME": username,
            "LOCAL_ARGILLA_PASSWORD": password,
            "LOCAL_ARGILLA_API_KEY": api_key,
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


def start_local_argilla(
    data_dir: Path,
    port: int = 0,
    api_key: str = DEFAULT_API_KEY,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    *,
    venv: Optional[Path] = None,
    host: str = DEFAULT_HOST,
    timeout: float = DEFAULT_START_TIMEOUT_S,
    detach: bool = False,
) -> LocalArgilla:
    """Start fake Redis + argilla-server (in-memory search) on ``data_dir``; return once it serves.

    ``port=0`` picks a free port.  ``venv`` defaults to ``ensure_venv(REPO_ROOT)``.
    Ready means ``GET /api/v1/me`` answers 200 with ``api_key`` (server up, database
    migrated, user present).  Raises ``LocalArgillaError`` with the server log tail if it
    is not ready within ``timeout`` seconds or a process dies.  Unless ``detach``, the
    processes also end when this Python process exits.  Password: at least 8 characters.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if len(password) < 8:
        raise LocalArgillaError("argilla requires passwords of at least 8 characters")
    running = read_running(data_dir)
    if running:
        raise LocalArgillaError(
            f"an argilla server is already running on {data_dir} ({running.get('url')}); "
            f"stop it with: python {Path(__file__).relative_to(REPO_ROOT)} stop --data-dir {data_dir}"
        )
    if port and port_in_use(host, port):
        raise LocalArgillaError(f"port {host}:{port} is already in use")

    venv_dir = Path(venv) if venv is not None else ensure_venv(REPO_ROOT)
    py = venv_python(venv_dir)
    if not py.exists():
        raise LocalArgillaError(f"no python in {venv_dir}; run ensure_venv first")

    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(data_dir / "tmp", ignore_errors=True)
    (data_dir / "tmp").mkdir()
    server_log, redis_log = logs / "server.log", logs / "redis.log"
    parent_pid = None if detach else os.getpid()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    procs: List[subprocess.Popen] = []

    def spawn(cmd: List[str], log: Path, env: Dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            out.write(f"\n===== {stamp} $ {' '.join(cmd)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(data_dir),
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    def fail(message: str, log: Path = server_log) -> LocalArgillaError:
        for proc in procs:
            _terminate_group(proc.pid, 5.0)
        return LocalArgillaError(f"{message}\n--- last lines of {log} ---\n{_tail(log)}")

    started = time.monotonic()
    port_file = data_dir / "tmp" / "redis.port"
    base_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    base_env["PYTHONUNBUFFERED"] = "1"
    redis_cmd = [str(py), str(SERVICE_DIR / "fake_redis.py"), "--host", host, "--port", "0"]
    redis_cmd += ["--port-file", str(port_file)] + (["--parent-pid", str(parent_pid)] if parent_pid else [])
    redis_proc = spawn(redis_cmd, redis_log, base_env)
    while not port_file.exists():
        if redis_proc.poll() is not None:
            raise fail(f"fake redis exited with code {redis_proc.returncode}", redis_log)
        if time.monotonic() - started > timeout:
            raise fail("fake redis did not start", redis_log)
        time.sleep(0.05)
    redis_url = f"redis://{host}:{int(port_file.read_text())}/0"

    port = port or _free_port(host)
    url = f"http://{host}:{port}"
    env = _server_env(data_dir, redis_url, username, password, api_key, parent_pid)
    server_cmd = [str(py), "-m", "uvicorn", "app:app", "--app-dir", str(SERVICE_DIR), "--host", host]
    server_cmd += ["--port", str(port), "--workers", "1", "--no-access-log", "--timeout-graceful-shutdown", "5"]
    server_proc = spawn(server_cmd, server_log, env)

    while True:
        if server_proc.poll() is not None:
            raise fail(f"argilla server exited with code {server_proc.returncode} during start-up")
        if redis_proc.poll() is not None:
            raise fail(f"fake redis exited with code {redis_proc.returncode}", redis_log)
        code = _http_status(f"{url}/api/v1/me", api_key)
        if code == 200:
            break
        if time.monotonic() - started > timeout:
            raise fail(f"argilla server not ready at {url} after {timeout:.0f}s (last HTTP status: {code})")
        time.sleep(0.25)

    server = LocalArgilla(
        url=url,
        api_key=api_key,
        username=username,
        password=password,
        data_dir=data_dir,
        port=port,
        redis_url=redis_url,
        server_pid=server_proc.pid,
        redis_pid=redis_proc.pid,
        log_file=server_log,
        _procs=procs,
    )
    info = {
        "url": url,
        "port": port,
        "host": host,
        "username": username,
        "password": password,
        "api_key": api_key,
        "server_pid": server_proc.pid,
        "redis_pid": redis_proc.pid,
        "redis_url": redis_url,
        "log_file": str(server_log),
        "detached": detach,
        "started_at": stamp,
        "startup_s": round(time.monotonic() - started, 2),
    }
    (data_dir / _PID_FILE_NAME).write_text(json.dumps(info, indent=2) + "\n")
    if not detach:
        atexit.register(server.stop)
    return server


# --------------------------------------------------------------------------- CLI


def _describe(info: dict) -> str:
    return (
        f"Argilla UI:  {info['url']}   (local only)\n"
        f"  login:     {info['username']} / {info['password']}\n"
        f"  API key:   {info['api_key']}\n"
        f"  SDK:       argilla.Argilla(api_url={info['url']!r}, api_key={info['api_key']!r})\n"
        f"  server log: {info.get('log_file')}"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="local_server.py", description="Local argilla-server 2.8 with an in-memory search engine."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("serve", "run in the foreground until Ctrl-C"),
        ("start", "start detached (pid file in the data dir)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data-dir", type=Path, required=True)
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (default %(default)s)")
        p.add_argument("--host", default=DEFAULT_HOST)
        p.add_argument("--username", default=DEFAULT_USERNAME)
        p.add_argument("--password", default=DEFAULT_PASSWORD)
        p.add_argument("--api-key", default=DEFAULT_API_KEY)
        p.add_argument("--timeout", type=float, default=DEFAULT_START_TIMEOUT_S)
    for name, helptext in (("stop", "stop a detached server"), ("status", "is a server running on the data dir")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data-dir", type=Path, required=True)
    sub.add_parser("ensure-venv", help=f"create/update {VENV_DIRNAME} from the lock file")
    args = parser.parse_args(argv)

    if args.command == "ensure-venv":
        started = time.monotonic()
        venv_dir = ensure_venv(REPO_ROOT, quiet=False)
        print(f"{venv_dir} ready ({time.monotonic() - started:.1f}s)")
        return 0

    if args.command == "stop":
        stopped = stop_local_argilla(args.data_dir)
        print("argilla stopped" if stopped else f"no argilla server running on {args.data_dir}")
        return 0

    if args.command == "status":
        info = read_running(args.data_dir)
        if info is None:
            print(f"no argilla server running on {args.data_dir}")
            return 1
        print(_describe(info))
        return 0

    if args.command == "start":
        info = read_running(args.data_dir)
        if info is None:
            print("setting up argilla venv ...", flush=True)
            ensure_venv(REPO_ROOT, quiet=False)
            print("starting argilla ...", flush=True)
            start_local_argilla(
                args.data_dir, args.port, args.api_key, args.username, args.password,
                host=args.host, timeout=args.timeout, detach=True,
            )
            info = read_running(args.data_dir)
        else:
            print("already running")
        print(_describe(info))
        print(f"stop with: python {Path(__file__).relative_to(REPO_ROOT)} stop --data-dir {args.data_dir}")
        return 0

    # serve
    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    ensure_venv(REPO_ROOT, quiet=False)
    server = start_local_argilla(
        args.data_dir, args.port, args.api_key, args.username, args.password, host=args.host, timeout=args.timeout
    )
    print(_describe(read_running(args.data_dir) or {"url": server.url, "username": server.username, "password": server.password, "api_key": server.api_key}))
    print("Press Ctrl-C to stop.", flush=True)
    try:
        while server.is_running():
            time.sleep(1.0)
        print(f"argilla exited unexpectedly; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping argilla ...", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
