"""Which request errors are retried, after how long, and the tenacity policy that applies it per request."""

import email.utils
import time
from typing import Any, Callable, Optional

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from components.generate_queries.settings import RETRY_BASE_DELAY, RETRY_MAX_DELAY


def retry_delay(error: BaseException, retries_so_far: int, base: float = RETRY_BASE_DELAY,
                cap: float = RETRY_MAX_DELAY) -> Optional[float]:
    """Seconds to wait before retrying a failed request, or None when retrying cannot help.

    Retried: 429 (after the server's Retry-After when it sends one), 408/409/5xx, timeouts, dropped connections and
    unparseable bodies. Not retried: other 4xx (a bad key or request stays bad).
    """
    import openai

    backoff = min(cap, base * 2 ** retries_so_far)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        if status not in (408, 409, 429) and status < 500:
            return None
        server_says = _retry_after_seconds(error.response.headers if error.response is not None else {})
        return min(cap, server_says) if server_says is not None else backoff
    if isinstance(error, (openai.APIConnectionError, openai.APIResponseValidationError, ValueError)):
        return backoff  # APIConnectionError covers timeouts; ValueError covers a malformed JSON body
    return None


def is_rate_limited(error: BaseException) -> bool:
    """Whether the endpoint answered 429 (too many requests): the signal that lowers the in-flight limit."""
    return getattr(error, "status_code", None) == 429


def _retry_after_seconds(headers: Any) -> Optional[float]:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def describe_error(error: BaseException) -> str:
    """A short reason for a failed request, for the row's `generation_error` (never includes request headers)."""
    status = getattr(error, "status_code", None)
    name = type(error).__name__
    return (f"{name} (HTTP {status})" if status else f"{name}: {error}")[:300]


def request_retrying(max_retries: int, base: float, cap: float,
                     on_retry: Callable[[BaseException, int, float], None],
                     give_up: Callable[[], bool] = lambda: False) -> AsyncRetrying:
    """A fresh tenacity policy for one request: at most `max_retries` retries, each after `retry_delay`.

    `on_retry(error, retry_number, seconds)` runs before each wait; once `give_up()` is true nothing is retried.
    Give every request its own policy object: tenacity keeps the attempt count on it, and that count is the row's
    retry count.
    """

    def wait(state: RetryCallState) -> float:
        return retry_delay(state.outcome.exception(), state.attempt_number - 1, base, cap) or 0.0

    def before_sleep(state: RetryCallState) -> None:
        on_retry(state.outcome.exception(), state.attempt_number, state.next_action.sleep)

    return AsyncRetrying(
        retry=retry_if_exception(lambda error: not give_up() and retry_delay(error, 0, base, cap) is not None),
        wait=wait,
        stop=stop_after_attempt(max_retries + 1),
        before_sleep=before_sleep,
        reraise=True,
    )
