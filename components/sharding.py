"""Which shard a chunk belongs to: plain functions, no KFP, so that generate_queries' distilabel workers (which
import the stage's package) do not pay for importing kfp (components/shards.py holds the fan-out's KFP tasks)."""

import hashlib
from typing import Any

from components.common import CHUNK_ID


def shard_of(chunk_id: str, shards: int) -> int:
    """The shard a chunk belongs to: a stable hash of its id (the same on every machine and run), modulo `shards`."""
    digest = hashlib.sha256(str(chunk_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % max(1, shards)


def shard_rows(frame: Any, shard: int, shards: int) -> Any:
    """The rows of a chunk frame that belong to `shard` (all of them when there is one shard)."""
    if shards <= 1:
        return frame
    keep = [shard_of(chunk_id, shards) == shard for chunk_id in frame[CHUNK_ID]]
    return frame[keep].reset_index(drop=True)
