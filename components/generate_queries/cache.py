"""The row cache: one finished pair per JSON object, named by a hash of everything that changes the output.

What it trusts: nothing it reads. An entry is used only when it parses and matches `ENTRY_SCHEMA`; a damaged one
(0 bytes, malformed JSON, wrong fields or types, a folder where the file should be) is a miss, is replaced with the
fresh result and is counted (`cache_corrupt`). Reading and writing are per row: an I/O error (a permission, a full
disk, an object store hiccup) costs that row its cache look-up or its cache write, never the batch; each is counted
(`cache_read_errors`, `cache_write_errors`) and logged once.
"""

import hashlib
import json
import logging
import os
import threading
import uuid
from typing import Any, NamedTuple, Optional

from components.common import StageError
from components.storage import LocalStore, open_store

# Bump when the prompt, the output schema or the validation rules change: old cache entries then stop matching.
CACHE_SCHEMA_VERSION = 2  # 2: styled prompts and stricter validation
# The fields of an entry and their types; an entry missing one, or with another type, is damaged.
ENTRY_SCHEMA: dict[str, tuple[type, ...]] = {"positive": (str,), "negative": (str,), "model": (str,),
                                             "created": (int, float)}
# Per-row counts of cache faults, carried with each row to the run's stats (the task runs in another process).
CACHE_FAULTS = ("cache_corrupt", "cache_read_errors", "cache_write_errors")

log = logging.getLogger("generate_queries.cache")


class CacheRead(NamedTuple):
    """What a look-up found: a valid entry, or None and why (`fault`: "" for a plain miss, else a CACHE_FAULTS name)."""

    entry: Optional[dict[str, Any]]
    fault: str = ""


def entry_problem(value: Any) -> Optional[str]:
    """Why a decoded entry is unusable (None when it is valid)."""
    if not isinstance(value, dict):
        return f"a JSON {type(value).__name__}, not an object"
    for field, types in ENTRY_SCHEMA.items():
        if field not in value:
            return f"no {field!r}"
        if not isinstance(value[field], types) or isinstance(value[field], bool):
            return f"{field!r} is a {type(value[field]).__name__}"
    if not value["positive"].strip() or not value["negative"].strip():
        return "an empty query"
    return None


class RowCache:
    """One JSON object per generated row, addressed by its cache key, in a local folder or under a gs:// prefix.

    Entries are content-addressed and written create-only (a local hard link of a finished temporary file, or a
    GCS upload with `if_generation_match=0`): two runs writing at once at worst both generate a row, the first
    write wins, and no reader ever sees half an entry. The one overwrite is of an object known to be damaged. The API
    key is never part of an entry or its name.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.store = open_store(uri) if uri else None
        self._damaged: set[str] = set()  # keys read as damaged: their next write replaces them
        self._lock = threading.Lock()
        self._logged: set[str] = set()

    @staticmethod
    def _name(key: str) -> str:
        return f"{key[:2]}/{key}.json"

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The valid entry stored under `key`, or None (no cache, no entry, a damaged one, an unreadable one)."""
        return self.read(key).entry

    def read(self, key: str) -> CacheRead:
        """Look `key` up; a damaged or unreadable entry is a miss that says so."""
        if self.store is None:
            return CacheRead(None)
        try:
            data = self.store.get(self._name(key))
        except Exception as error:  # noqa: BLE001 - any store fault costs this row its look-up, nothing more
            self._log_once("read", "LLM cache: cannot read %s (%s); such rows are generated again",
                           self._name(key), error)
            return CacheRead(None, "cache_read_errors")
        if data is None:
            return CacheRead(None)
        try:
            value = json.loads(data) if data else None
            problem = "0 bytes" if not data else entry_problem(value)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problem = f"not JSON ({error.msg if isinstance(error, json.JSONDecodeError) else 'not UTF-8'})"
        if problem is None:
            return CacheRead(value)
        with self._lock:
            self._damaged.add(key)
        log.warning("LLM cache: entry %s is damaged (%s); it is generated again and replaced", self._name(key),
                    problem)
        return CacheRead(None, "cache_corrupt")

    def expire(self, key: str) -> None:
        """Let the next write of `key` replace its entry: a pair today's validation refuses (its rules were tightened
        since it was written), so the row is generated again."""
        with self._lock:
            self._damaged.add(key)

    def put(self, key: str, value: dict[str, Any]) -> str:
        """Store an entry unless a valid one is already there; return "" or the fault met ("cache_corrupt": a damaged
        object was found now and replaced; "cache_write_errors": the write failed)."""
        if self.store is None:
            return ""
        data, name, fault = json.dumps(value).encode(), self._name(key), ""
        try:
            if key in self._damaged:
                self._replace(name, data)  # counted when it was read
            elif self.store.put(name, data, create_only=True):
                return ""
            else:
                found = self.read(key)
                if found.entry is not None or found.fault == "cache_read_errors":
                    return ""  # another run wrote this row first (the first writer wins), or it cannot be judged
                if found.fault != "cache_corrupt":  # not logged by read: a folder in place of the entry
                    log.warning("LLM cache: %s is not a readable entry; it is replaced", name)
                self._replace(name, data)
                fault = "cache_corrupt"
        except Exception as error:  # noqa: BLE001 - a full disk or a store fault costs this row its cache write only
            self._log_once("write", "LLM cache: cannot write %s (%s); the row is kept, only not cached", name, error)
            return "cache_write_errors"
        with self._lock:
            self._damaged.discard(key)
        return fault

    def _replace(self, name: str, data: bytes) -> None:
        if isinstance(self.store, LocalStore) and (self.store.root / name).is_dir():
            # A folder where the entry should be: moved aside, not deleted (it is not ours to delete).
            path = self.store.root / name
            os.rename(path, path.with_name(f"{path.name}.damaged-{uuid.uuid4().hex[:8]}"))
        self.store.put(name, data)

    def _log_once(self, kind: str, message: str, *args: Any) -> None:
        with self._lock:
            if kind in self._logged:
                return
            self._logged.add(kind)
        log.warning(message + " (logged once; the count is in stats.json)", *args)


def open_cache(uri: str) -> RowCache:
    """The row cache at `uri` ("" for none), with errors that say they are about the LLM cache."""
    try:
        return RowCache(uri)
    except StageError as error:
        raise StageError(f"LLM cache: {error}") from error


def row_cache_key(identity: dict[str, Any], messages: list[dict[str, str]], generation: dict[str, Any]) -> str:
    """The key of one row: the model's identity, the full prompt and the generation arguments."""
    payload = {"v": CACHE_SCHEMA_VERSION, "llm": identity, "messages": messages, "generation": generation}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
