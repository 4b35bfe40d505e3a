"""OpenAI's Batch API: one job per round of pending rows, at half the price, with results within 24 h.

Each job gets a client-side id, stored in the row cache's store under a name derived from the request file BEFORE
the job is created, and sent with it as metadata. Creation is never retried by the SDK (a retry after a lost answer
would pay for a second job); when its answer is lost, or the process dies right after, the job is looked up by
that id (`batches.list`). A re-run (a rescheduled pod) builds the same file, finds the stored ids and resumes
waiting for that job instead of paying for a second one.
"""

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Optional

from components.generate_queries.llm import Attempt, RowRequest

ENDPOINT = "/v1/chat/completions"
FINAL_STATES = ("completed", "failed", "expired", "cancelled")
RESUBMIT_STATES = ("failed", "expired", "cancelled", "cancelling")
CLIENT_ID_KEY = "d2e_client_id"  # the job's metadata key that holds our client-side id
MAX_LISTED_JOBS = 1000  # how far back (newest first) a lost job is looked for


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
        self.client = client  # the SDK's own retries (which honour Retry-After), switched off for creation
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
        if record.get("batch_id"):
            batch = self.client.batches.retrieve(record["batch_id"])
        else:  # stored before the creation, whose answer never came back: did the job get created?
            batch = self._find(record["client_id"])
            if batch is None:
                self.log.info("no OpenAI batch job carries the stored id %s: submitting it", record["client_id"])
                return None
            self._record(record_name, record, batch)
        if batch.status in RESUBMIT_STATES:
            self.log.info("stored OpenAI batch job %s ended as %s: submitting again", batch.id, batch.status)
            return None
        self.log.info("resuming OpenAI batch job %s (%s) for %d rows", batch.id, batch.status, rows)
        return batch

    def _submit(self, jsonl: bytes, record_name: str, rows: int) -> Any:
        import openai

        upload = self.client.files.create(file=("generate-queries.jsonl", jsonl), purpose="batch")
        record = {"client_id": uuid.uuid4().hex, "input_file_id": upload.id, "rows": rows, "submitted": time.time()}
        self.store.put(record_name, json.dumps(record).encode())  # before the job exists: a re-run can look it up
        try:
            # No SDK retries: a retried creation after a lost answer would be a second, paid job.
            batch = self.client.with_options(max_retries=0).batches.create(
                input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h",
                metadata={"description": "docs-to-embeddings generate_queries", CLIENT_ID_KEY: record["client_id"]})
        except (openai.APIConnectionError, openai.InternalServerError):
            batch = self._find(record["client_id"])  # created, but the answer was lost?
            if batch is None:
                raise  # not created: this run's rows fail; a re-run looks for it once more, then submits
        self._record(record_name, record, batch)
        self.log.info("submitted OpenAI batch job %s for %d rows (job id stored at %s/%s)", batch.id, rows,
                      self.cache_uri, record_name)
        return batch

    def _record(self, record_name: str, record: dict[str, Any], batch: Any) -> None:
        self.store.put(record_name, json.dumps({**record, "batch_id": batch.id}).encode())

    def _find(self, client_id: str) -> Optional[Any]:
        """The job created with this client-side id, among the most recent ones, or None."""
        for number, batch in enumerate(self.client.batches.list(limit=100)):
            if number >= MAX_LISTED_JOBS:
                break
            if (batch.metadata or {}).get(CLIENT_ID_KEY) == client_id:
                return batch
        return None

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
