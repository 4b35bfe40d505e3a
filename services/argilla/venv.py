"""The local Argilla's own virtualenv, `.venv-argilla`, installed from `services/argilla/requirements.lock`.

argilla-server pins typer<0.10 / pydantic~=2.9 / httpx~=0.27, which clash with the project's environment.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from services.argilla.processes import LocalArgillaError, log_tail

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE_RELATIVE = Path("services/argilla/requirements.lock")
VENV_DIRNAME = ".venv-argilla"
STAMP_NAME = ".requirements.lock.sha256"
# Variables of the calling environment that would make the venv's Python import the project's packages.
FOREIGN_PYTHON_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def venv_python(venv_dir: Path) -> Path:
    """The Python interpreter of a virtualenv."""
    return Path(venv_dir) / "bin" / "python"


def clean_environment() -> dict:
    """This process's environment without the variables that point Python at another environment."""
    return {k: v for k, v in os.environ.items() if k not in FOREIGN_PYTHON_VARIABLES}


def ensure_venv(repo_root: Path = REPO_ROOT, *, python: Optional[str] = None, quiet: bool = True) -> Path:
    """Create/update ``<repo_root>/.venv-argilla`` from the lock file; return the venv directory.

    Idempotent: a stamp file holds the hash of the lock (and of the interpreter
    version); when it matches, this returns at once.  Otherwise the venv is
    created (with ``python``, default: the running interpreter's base Python)
    and ``pip install -r requirements.lock`` + ``pip check`` are run.  A file
    lock inside the venv serialises concurrent callers.
    """
    import fcntl

    repo_root = Path(repo_root).resolve()
    lock_file = repo_root / LOCK_FILE_RELATIVE
    venv_dir = repo_root / VENV_DIRNAME
    if not lock_file.is_file():
        raise LocalArgillaError(f"lock file not found: {lock_file}")
    digest = hashlib.sha256(lock_file.read_bytes() + f"\npython={sys.version_info[:2]}".encode()).hexdigest()
    stamp = venv_dir / STAMP_NAME
    py = venv_python(venv_dir)

    def up_to_date() -> bool:
        return py.exists() and stamp.is_file() and stamp.read_text().strip() == digest

    if up_to_date():
        return venv_dir
    venv_dir.mkdir(parents=True, exist_ok=True)
    with open(venv_dir / ".ensure.lock", "w") as lock_handle:
        fcntl.flock(lock_handle, fcntl.LOCK_EX)
        if not up_to_date():
            _install(repo_root, venv_dir, lock_file, python or sys.executable, quiet)
            stamp.write_text(digest + "\n")
    return venv_dir


def _install(repo_root: Path, venv_dir: Path, lock_file: Path, python: str, quiet: bool) -> None:
    """(Re)create the venv if its Python is broken, install the lock, and check it."""
    py = venv_python(venv_dir)
    log = venv_dir / "install.log"

    def run(cmd: List[str], what: str) -> None:
        if not quiet:
            print(f"[argilla venv] {what}", file=sys.stderr, flush=True)
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
            out.flush()
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_environment(), cwd=repo_root)
        if result.returncode != 0:
            raise LocalArgillaError(f"{what} failed (exit {result.returncode}); {log}:\n{log_tail(log, 40)}")

    healthy = py.exists() and subprocess.run([str(py), "-c", "pass"], capture_output=True).returncode == 0
    if not healthy:
        run([python, "-m", "venv", "--clear", str(venv_dir)], f"create {venv_dir}")
    run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(lock_file)],
        f"pip install -r {LOCK_FILE_RELATIVE}")
    run([str(py), "-m", "pip", "check"], "pip check")
