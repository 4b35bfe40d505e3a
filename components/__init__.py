"""Pipeline stages: one module per stage, plus the shared helpers in `common`."""

__version__ = "0.1.0"

from components import tracebacks as _tracebacks  # noqa: E402 - after the version, which common.py reads

# A stage process shows no local variables in a traceback, and a StageError as its message alone.
if _tracebacks.in_stage_process():
    _tracebacks.plain_tracebacks()
