"""A run-wide budget for requests that cannot connect: after a few in a row, the run stops asking.

Each row retries its own transport faults (`retries.py`), which is right for a rate limit or a 5xx but wrong for an
endpoint that is not there: a refused connection would be tried again for every row, attempt and retry. The breaker
counts connection failures in a row across all rows of the run (any answer from the server resets it); once it
opens, no row sends another request, and the stage ends with a StageError that names the endpoint.
"""

import socket
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from components.common import StageError

# Consecutive requests that could not connect before the run stops asking: a few rounds of concurrent rows, enough
# to ride out a blip (a restarting server), far from the rows x attempts x retries a dead endpoint cost before.
CONNECT_FAILURE_LIMIT = 10
UNREACHABLE = "could not connect to"  # the start of the reason recorded on every row the breaker stopped


def shown_url(url: str) -> str:
    """The URL without any user:password part (a base URL may carry credentials)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def is_connect_failure(error: BaseException) -> bool:
    """Whether the request never reached a server: refused, no route, a name that does not resolve.

    Timeouts and dropped connections are not: a server was there.
    """
    import openai

    if not isinstance(error, openai.APIConnectionError) or isinstance(error, openai.APITimeoutError):
        return False
    cause = error.__cause__ or error.__context__
    # By name: the SDK's HTTP transport (httpx, or its fork httpx2 in openai 3) raises its own ConnectError.
    return any(kind.__name__ == "ConnectError" for kind in type(cause).__mro__) or isinstance(
        cause, (ConnectionRefusedError, socket.gaierror))


class ConnectionBreaker:
    """Counts requests that could not connect, in a row, over a whole run; open once `limit` is reached."""

    def __init__(self, base_url: str, limit: int = CONNECT_FAILURE_LIMIT):
        self.base_url = shown_url(base_url)
        self.limit = limit
        self.failures_in_a_row = 0

    @property
    def open(self) -> bool:
        """Whether the run has stopped sending requests."""
        return self.failures_in_a_row >= self.limit

    @property
    def reason(self) -> str:
        """The row's generation_error once the breaker stopped it."""
        return (f"{UNREACHABLE} {self.base_url} ({self.failures_in_a_row} requests in a row could not connect); "
                "no further requests were sent")

    def record(self, error: Optional[BaseException]) -> None:
        """Count one request's outcome: None (an answer) or the error it raised."""
        if error is not None and is_connect_failure(error):
            self.failures_in_a_row += 1
        else:
            self.failures_in_a_row = 0

    def trip(self) -> None:
        """Open at once (a client that already retried the connection itself gave up)."""
        self.failures_in_a_row = max(self.failures_in_a_row, self.limit)


def raise_if_unreachable(stats: dict[str, Any], output_dir: Any) -> None:
    """After the output is written: a StageError naming the endpoint when the breaker stopped the run."""
    for split_stats in stats["splits"].values():
        for reason in split_stats["failure_reasons"]:
            if reason.startswith(UNREACHABLE):
                raise StageError(
                    f"Generation stopped: {reason}. Check that the server is running and that --llm-base-url "
                    f"(llm_base_url) / OPENAI_BASE_URL points at it. Rows finished before are in {output_dir} "
                    "and in the LLM cache, so a re-run only asks for the rest.")
