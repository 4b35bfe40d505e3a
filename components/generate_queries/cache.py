"""The row cache: one finished pair per JSON object, named by a hash of everything that changes the output."""

import hashlib
import json
from typing import Any, Optional

from components.common import StageError
from components.storage import open_store

# Bump when the prompt, the output schema or the validation rules change: old cache entries then stop matching.
CACHE_SCHEMA_VERSION = 2  # 2: styled prompts and stricter validation


class RowCache:
    """One JSON object per generated row, addressed by its cache key, in a local folder or under a gs:// prefix.

    Entries are content-addressed and written create-only (a local hard link of a finished temporary file, or a
    GCS upload with `if_generation_match=0`): two runs writing at once at worst both generate a row, the first
    write wins, and no reader ever sees half an entry. The API key is never part of an entry or its name.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.store = open_store(uri) if uri else None

    @staticmethod
    def _name(key: str) -> str:
        return f"{key[:2]}/{key}.json"

    def get(self, key: str) -> Optional[dict[str, Any]]:
        """The entry stored under `key`, or None (no cache, no entry, or a damaged one)."""
        if self.store is None:
            return None
        data = self.store.get(self._name(key))
        if data is None:
            return None
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a damaged entry is a miss, not a crash
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store an entry unless one is already there (the first writer wins)."""
        if self.store is not None:
            self.store.put(self._name(key), json.dumps(value).encode(), create_only=True)


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
