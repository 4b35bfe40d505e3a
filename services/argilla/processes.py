"""The processes of the local Argilla: is one alive and ours, end it with its group, free and busy ports, pid files.

Also the one error every part of `services.argilla` raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Optional

# What the command line of each process we start contains (see local_server.start_local_argilla).
OUR_COMMAND_MARKERS = (b"app:app", b"fake_redis.py")


class LocalArgillaError(RuntimeError):
    """The local Argilla server (or its virtualenv) could not be set up."""


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists and has not exited (a zombie counts as gone)."""
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


def is_ours(pid: int) -> bool:
    """Guard against pid reuse before signalling a pid read from a pid file."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return any(marker in cmdline for marker in OUR_COMMAND_MARKERS)


def terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left after `timeout` seconds."""
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


def free_port(host: str) -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def read_pid_file(pid_file: Path) -> Optional[dict]:
    """The JSON a started server left in its pid file, or None."""
    try:
        return json.loads(pid_file.read_text())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 60) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
