"""How an uncaught exception is shown: never with local variables, never with a secret's value.

distilabel's import installs rich tracebacks that print every local variable of every frame; the OpenAI client's
frames hold the API key in one. `plain_tracebacks()` replaces that hook (call it after importing distilabel). In a
stage process (KFP's executor) it is installed when `components` is imported: a `StageError` there ends the task
with its message alone (it says what to fix; the traceback is noise), anything else with a plain traceback.
`D2E_DEBUG=1` (`pipeline.py run --debug` sets it) shows the traceback of a StageError too.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

# Environment variables whose values are secrets: never printed, even inside an exception's own message.
SECRET_ENV_NAMES: tuple[str, ...] = ("OPENAI_API_KEY", "ARGILLA_API_KEY", "HF_TOKEN", "KFP_TOKEN")
DEBUG_ENV = "D2E_DEBUG"
REDACTED = "<redacted>"
# Shorter values are not secrets worth hiding, and replacing them would garble ordinary words.
MIN_SECRET_LENGTH = 8
KFP_EXECUTOR_MODULE = "kfp.dsl.executor_main"


def redact(text: str) -> str:
    """`text` with the value of every secret environment variable replaced."""
    for name in SECRET_ENV_NAMES:
        if len(os.environ.get(name, "")) >= MIN_SECRET_LENGTH:
            text = text.replace(os.environ[name], REDACTED)
    return text


def debugging() -> bool:
    """Whether full tracebacks were asked for (`--debug`, or D2E_DEBUG=1 in the environment)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def format_traceback(error: BaseException) -> str:
    """The standard traceback of `error` (frames and source lines, never local variables), secrets redacted."""
    return redact("".join(traceback.format_exception(type(error), error, error.__traceback__)))


def stage_excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """Print an uncaught exception: a StageError's message alone, anything else as a plain traceback."""
    from components.common import StageError

    if isinstance(error, StageError) and not debugging():
        text = f"{kind.__name__}: {error}\n"
    else:
        text = "".join(traceback.format_exception(kind, error, tb))
    sys.stderr.write(redact(text))
    sys.stderr.flush()


def plain_tracebacks() -> None:
    """Use `stage_excepthook` for uncaught exceptions (replacing distilabel's rich hook that shows locals)."""
    sys.excepthook = stage_excepthook


def in_stage_process() -> bool:
    """Whether this process is KFP's executor running a stage (in the cluster, or kfp.local's subprocess)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == KFP_EXECUTOR_MODULE
