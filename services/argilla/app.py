"""ASGI entry point of the local argilla-server (runs inside ``.venv-argilla``).

    uvicorn app:app --app-dir services/argilla --host 127.0.0.1 --port 6900

Normally started by ``services/argilla/local_server.py`` (``python -m services.argilla start``).  Compared with
``argilla_server start`` it:

1. registers the in-memory search engine (``inmemory_search_engine``) and
   selects it (``ARGILLA_SEARCH_ENGINE=inmemory`` unless set otherwise);
2. at start-up, before serving, runs the database migrations and makes sure the
   owner user of the login file ``LOCAL_ARGILLA_CREDENTIALS`` (JSON: username,
   password, api_key; see ``credentials.py``) exists with exactly these credentials
   (idempotent; skipped when the variable is unset; ``LOCAL_ARGILLA_MIGRATE=0`` skips
   the migrations); the login never travels in the environment;
3. re-indexes every dataset from the database into the in-memory engine, so a
   restarted server shows the data it had;
4. exits by itself when the process ``LOCAL_ARGILLA_PARENT_PID`` is gone (so a
   crashed test run leaves no server behind);
5. answers only requests whose Host header names it (``LOCAL_ARGILLA_ALLOWED_HOSTS``, comma-separated, default
   the loopback names), and lets no other browser origin read its answers unless ``ARGILLA_CORS_ORIGINS`` lists
   it (default: none; Argilla's own default is every origin, with credentials).

Must be served by ONE worker process (the index lives in process memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("ARGILLA_SEARCH_ENGINE", "inmemory")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("ARGILLA_CORS_ORIGINS", "[]")  # read by Argilla's settings when _app is imported

import inmemory_search_engine  # noqa: E402  (registers the engine before settings are used)
from argilla_server._app import app  # noqa: E402
from starlette.middleware.trustedhost import TrustedHostMiddleware  # noqa: E402

# Outermost, so a request naming another host (a DNS name pointed at 127.0.0.1 by a web page) gets 400 and no data.
app.add_middleware(TrustedHostMiddleware,
                   allowed_hosts=os.environ.get("LOCAL_ARGILLA_ALLOWED_HOSTS", "127.0.0.1,localhost").split(","))

_LOGGER = logging.getLogger("argilla.local")


def _migrate_database() -> None:
    """``python -m argilla_server database migrate`` without alembic's logging.fileConfig (keeps uvicorn's loggers)."""
    import argilla_server
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(argilla_server.__file__).parent / "alembic"))
    config.set_main_option("version_path_separator", "os")
    command.upgrade(config, "head")


async def _ensure_owner_user(username: str, password: str, api_key: str, workspace: str) -> None:
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole, Workspace
    from sqlalchemy import select

    async with AsyncSessionLocal() as db:
        user = await accounts.get_user_by_username(db, username)
        if user is None:
            ws = (await db.execute(select(Workspace).filter_by(name=workspace))).scalar_one_or_none()
            await User.create(
                db,
                first_name=username,
                username=username,
                role=UserRole.owner,
                api_key=api_key,
                password_hash=accounts.hash_password(password),
                workspaces=[ws or Workspace(name=workspace)],
            )
            _LOGGER.info("created local owner user %r", username)
            return

        changes = {}
        if user.api_key != api_key:
            changes["api_key"] = api_key
        if not accounts.verify_password(password, user.password_hash):
            changes["password_hash"] = accounts.hash_password(password)
        if user.role != UserRole.owner:
            changes["role"] = UserRole.owner
        if changes:
            await user.update(db, **changes)
            _LOGGER.info("updated local user %r: %s", username, ", ".join(sorted(changes)))


async def _reindex_all() -> int:
    from argilla_server.cli.search_engine.reindex import Reindexer
    from argilla_server.database import AsyncSessionLocal

    engine = await inmemory_search_engine.InMemorySearchEngine.new_instance()
    inmemory_search_engine.reset_store()
    count = 0
    async with AsyncSessionLocal() as db:
        async for dataset in Reindexer.reindex_datasets(db, engine):
            async for records in Reindexer.reindex_dataset_records(db, engine, dataset):
                count += len(records)
    return count


def _watch_parent(pid: int) -> None:
    def loop() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    threading.Thread(target=loop, name="parent-watchdog", daemon=True).start()


_argilla_lifespan = app.router.lifespan_context


@contextlib.asynccontextmanager
async def _local_lifespan(asgi_app):
    started = time.monotonic()
    if os.environ.get("LOCAL_ARGILLA_MIGRATE", "1") != "0":
        await asyncio.to_thread(_migrate_database)
    credentials_file = os.environ.get("LOCAL_ARGILLA_CREDENTIALS")
    if credentials_file:
        login = json.loads(Path(credentials_file).read_text())
        await _ensure_owner_user(
            username=login["username"],
            password=login["password"],
            api_key=login["api_key"],
            workspace=os.environ.get("LOCAL_ARGILLA_WORKSPACE", "argilla"),
        )
    async with _argilla_lifespan(asgi_app) as state:
        in_memory = os.environ["ARGILLA_SEARCH_ENGINE"] == inmemory_search_engine.ENGINE_NAME
        records = await _reindex_all() if in_memory else 0
        _LOGGER.warning(
            "local argilla ready (search engine %r, %d records re-indexed, start-up %.1fs)",
            os.environ["ARGILLA_SEARCH_ENGINE"],
            records,
            time.monotonic() - started,
        )
        yield state


app.router.lifespan_context = _local_lifespan

if os.environ.get("LOCAL_ARGILLA_PARENT_PID"):
    _watch_parent(int(os.environ["LOCAL_ARGILLA_PARENT_PID"]))

__all__ = ["app"]
