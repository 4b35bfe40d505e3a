"""How a command that failed ends: one line on stderr that says what failed and what to do, and an exit status.

The full traceback only with `--debug`, and even then without local variables (tracebacks that show locals print
whatever a frame holds, API keys included) and with every secret environment variable's value redacted.
"""

import sys

from components.common import StageError
from components.settings import SettingError
from components.tracebacks import format_traceback, redact

# Exit statuses: a problem with the inputs or settings (the message says what to fix), anything else, Ctrl-C.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(text.split())


def failure_message(error: BaseException, command: str) -> str:
    """What the user reads: a StageError's or SettingError's own message; else what failed, and how to see more."""
    if isinstance(error, (StageError, SettingError)):
        return f"error: {error}"
    detail = one_line(str(error)) or "(no message)"
    return (f"error: `{command}` failed with {type(error).__name__}: {detail} "
            "-- run again with --debug for the traceback.")


def report_failure(error: BaseException, command: str, debug: bool = False) -> int:
    """Print how `command` ended with `error` (with `debug`, its traceback first); return the exit status."""
    if isinstance(error, KeyboardInterrupt):
        print(f"\ninterrupted: `{command}` stopped before it finished.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if debug:
        print(format_traceback(error), file=sys.stderr, end="")
    print(redact(failure_message(error, command)), file=sys.stderr)
    return EXIT_BAD_INPUT if isinstance(error, (StageError, SettingError)) else EXIT_FAILED
