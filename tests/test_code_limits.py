"""The limits that keep the code easy to change (issue 11): small modules and functions in `components/`."""

import ast
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
CHECKED = sorted([*(PROJECT_ROOT / "components").rglob("*.py"), *(PROJECT_ROOT / "d2e").rglob("*.py"),
                  PROJECT_ROOT / "pipeline.py"])


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(PROJECT_ROOT)))
def test_modules_and_functions_stay_small(path):
    source = path.read_text(encoding="utf-8")
    lines = source.count("\n") + 1
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines (at most {MAX_MODULE_LINES}): split it"
    too_long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {', '.join(too_long)}"
