"""OpenAI's Batch API: one job per round of pending rows, at half the price, with results within 24 h.

Each job's id is stored in the row cache's store before any wait, under a name derived from the request file:
a re-run (a retried task, a rescheduled pod) builds the same file, finds the stored id and resumes waiting for
that job instead of paying for a second one.
"""

import hashlib
import json
import logging
import time
from typing import Any, Optional

from components.generate_queries.llm import Attempt, RowRequest

ENDPOINT = "/v1/chat/completions"
FINAL_STATES = ("completed", "failed", "expired", "cancelled")
RESUBMIT_STATES = ("failed", "expired", "cancelled", "cancelling")


def request_lines(pending: list[RowRequest], model: str, body_settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's request file, one chat completion per row; ids carry the row's position and cache key."""
    return [{"custom_id": f"{index}-{request.key[:16]}", "method": "POST", "url": ENDPOINT,
             "body": {"model": model, "messages": request.messages, **body_settings}}
            for index, request in enumerate(pending)]


def attempt_from_result(item: dict[str, Any]) -> Attempt:
    """One line of a job's output or error file as an Attempt."""
    response = item.get("response") or {}
    body = response.get("body") or {}
    if response.get("status_code") != 200 or not body.get("choices"):
        error = item.get("error") or body.get("error") or {}
        message = error.get("code") or error.get("message") if isinstance(error, dict) else error
        return Attempt(error=f"batch request failed (HTTP {response.get('status_code')}): {message}"[:300])
    usage = body.get("usage") or {}
    return Attempt(text=body["choices"][0]["message"].get("content"),
                   prompt_tokens=int(usage.get("prompt_tokens") or 0),
                   completion_tokens=int(usage.get("completion_tokens") or 0))


class BatchJobs:
    """Runs rounds of rows as Batch API jobs through an OpenAI client, keeping job ids in `store`."""

    def __init__(self, client: Any, model: str, store: Any, cache_uri: str, body_settings: dict[str, Any],
                 poll_interval: float, max_wait: float, logger: logging.Logger):
        self.client = client  # the few job-management calls use the SDK's own retries (which honour Retry-After)
        self.model = model
        self.store = store
        self.cache_uri = cache_uri
        self.body_settings = body_settings  # max_tokens, temperature, response_format
        self.poll_interval = poll_interval
        self.max_wait = max_wait
        self.log = logger

    def run(self, pending: list[RowRequest]) -> list[Attempt]:
        """One job for the pending rows; an Attempt per row, in order."""
        lines = request_lines(pending, self.model, self.body_settings)
        jsonl = "\n".join(json.dumps(line, sort_keys=True) for line in lines).encode()
        record_name = f"batches/{hashlib.sha256(jsonl).hexdigest()}.json"
        batch = self._resume(record_name, len(lines)) or self._submit(jsonl, record_name, len(lines))
        batch = self._wait(batch)
        if batch.status not in FINAL_STATES:
            reason = (f"OpenAI batch job {batch.id} still {batch.status} after {self.max_wait:.0f} s; "
                      f"its id is stored at {self.cache_uri}/{record_name}: re-run to collect it")
            return [Attempt(error=reason, job_unfinished=True)] * len(pending)
        results = self._results(batch)
        missing = Attempt(error=f"no result in OpenAI batch job {batch.id} (status {batch.status})")
        return [results.get(line["custom_id"], missing) for line in lines]

    def _resume(self, record_name: str, rows: int) -> Optional[Any]:
        record = json.loads(self.store.get(record_name) or b"null")
        if not record:
            return None
        batch = self.client.batches.retrieve(record["batch_id"])
        if batch.status in RESUBMIT_STATES:
            self.log.info("stored OpenAI batch job %s ended as %s: submitting again", batch.id, batch.status)
            return None
        self.log.info("resuming OpenAI batch job %s (%s) for %d rows", batch.id, batch.status, rows)
        return batch

    def _submit(self, jsonl: bytes, record_name: str, rows: int) -> Any:
        upload = self.client.files.create(file=("generate-queries.jsonl", jsonl), purpose="batch")
        batch = self.client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h",
                                           metadata={"description": "docs-to-embeddings generate_queries"})
        self.store.put(record_name, json.dumps({"batch_id": batch.id, "input_file_id": upload.id, "rows": rows,
                                                "submitted": time.time()}).encode())
        self.log.info("submitted OpenAI batch job %s for %d rows (job id stored at %s/%s)", batch.id, rows,
                      self.cache_uri, record_name)
        return batch

    def _wait(self, batch: Any) -> Any:
        started = time.monotonic()
        while batch.status not in FINAL_STATES and time.monotonic() - started <= self.max_wait:
            time.sleep(self.poll_interval)
            batch = self.client.batches.retrieve(batch.id)
        return batch

    def _results(self, batch: Any) -> dict[str, Attempt]:
        results = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.client.files.content(file_id).text.splitlines():
                if line.strip():
                    item = json.loads(line)
                    results[item["custom_id"]] = attempt_from_result(item)
        return results
