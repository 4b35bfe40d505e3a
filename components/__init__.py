"""Pipeline stages: one module per stage, plus the shared helpers in `common`."""

__version__ = "0.1.0"
