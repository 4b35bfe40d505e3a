"""The local Argilla's login: a random password and API key per data folder, kept in a file only its owner reads.

Created once, on the first start on a data folder, and reused after that, so scripts and the SDK keep working across
restarts. The data folder itself is made private (0700) and the files the server keeps in it 0600.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
from pathlib import Path

from services.argilla.processes import LocalArgillaError

CREDENTIALS_FILE_NAME = "credentials.json"
USERNAME = "argilla"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# What a data folder of ours holds; a non-empty folder with none of these belongs to someone else.
OUR_ENTRIES = (CREDENTIALS_FILE_NAME, "argilla.db", "local-argilla.json", "logs", "server_id.dat")


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The owner login of the local Argilla on one data folder, and the file it lives in."""

    username: str
    password: str
    api_key: str
    path: Path


def credentials_path(data_dir: Path) -> Path:
    """Where a data folder keeps its login."""
    return Path(data_dir) / CREDENTIALS_FILE_NAME


def secure_data_dir(data_dir: Path) -> Path:
    """Create the data folder private (0700), or make an existing one of ours private; refuse someone else's."""
    data_dir = Path(data_dir)
    if data_dir.exists():
        if not data_dir.is_dir():
            raise LocalArgillaError(f"the Argilla data folder {data_dir} is a file; pass a folder")
        entries = {entry.name for entry in data_dir.iterdir()}
        if entries and not entries & set(OUR_ENTRIES):
            raise LocalArgillaError(
                f"{data_dir} is not empty and holds no local Argilla data; it would be made private to you. "
                "Pass a new or empty folder as the data folder.")
    data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    data_dir.chmod(PRIVATE_DIR_MODE)
    for entry in data_dir.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(PRIVATE_FILE_MODE)
        elif entry.is_dir() and not entry.is_symlink():
            entry.chmod(PRIVATE_DIR_MODE)
    return data_dir


def _write_new(path: Path, payload: dict) -> None:
    """Write the file only if it does not exist yet: two starts at once both end up with the first one's login."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.link(temporary, path)  # atomic, and fails if another start created the file first
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)


def _read(path: Path) -> Credentials:
    try:
        payload = json.loads(path.read_text())
        username, password, api_key = payload["username"], payload["password"], payload["api_key"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LocalArgillaError(f"the Argilla login file {path} is unreadable ({error}); delete it to get a new "
                                "login (the data stays)") from error
    if not all(isinstance(value, str) for value in (username, password, api_key)) or len(password) < 8 \
            or not api_key:
        raise LocalArgillaError(f"the Argilla login file {path} needs a username, a password of at least 8 "
                                "characters and an api_key; delete it to get a new login (the data stays)")
    return Credentials(username=username, password=password, api_key=api_key, path=path)


def load_or_create_credentials(data_dir: Path) -> Credentials:
    """The data folder's login, created with random values (`secrets`) the first time; the file is kept 0600."""
    path = credentials_path(data_dir)
    if not path.exists():
        _write_new(path, {"username": USERNAME, "password": secrets.token_urlsafe(18),
                          "api_key": f"argilla.{secrets.token_urlsafe(32)}"})
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_FILE_MODE:
        path.chmod(PRIVATE_FILE_MODE)
    return _read(path)


def login_hint(info: dict) -> str:
    """Where the login is, never the password itself: output can end up in logs and shared terminals."""
    if not info.get("credentials_file"):  # started before logins were per folder
        return (f"{info.get('username')} with the old fixed password; stop and start it again for a private "
                "login")
    return f"{info['username']}, password and API key in {info['credentials_file']} (readable by you only)"
