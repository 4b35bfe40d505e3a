"""KFP copies each component function's source, alone, into the compiled YAML: it must name nothing from its module."""

import ast
import builtins
import inspect
import textwrap

import pytest

from d2e.parameters import SETTINGS  # noqa: F401 - imports every stage module
from pipeline import build_pipeline  # noqa: F401

COMPONENTS = {
    "load_docs": "components.load_docs:load_docs_component",
    "generate_queries": "components.generate_queries:generate_queries_component",
    "embed_score": "components.embed_score:embed_score_component",
    "mine_negatives": "components.mine_negatives:mine_negatives_component",
    "report": "components.report:report_component",
    "export": "components.export:export_component",
    "publish": "components.publish:publish_component",
    "finetune": "components.finetune:finetune_component",
    "evaluate": "components.evaluate:evaluate_component",
    "export_model": "components.evaluate:export_model_component",
}


def free_names(source: str) -> set[str]:
    """Names a function reads that it neither takes, assigns, imports, nor gets from builtins or kfp.dsl's `*`."""
    function = ast.parse(textwrap.dedent(source)).body[0]
    bound = {arg.arg for arg in ast.walk(function.args) if isinstance(arg, ast.arg)}
    for node in ast.walk(function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    read = {node.id for node in ast.walk(function) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    # The executor's module header: `import kfp; from kfp import dsl; from kfp.dsl import *; from typing import *`.
    header = {"kfp", "dsl", "Input", "Output", "Dataset", "Artifact", "Model", "Metrics", "HTML", "Markdown",
              "Optional", "Any"}
    return read - bound - set(dir(builtins)) - header


@pytest.mark.parametrize("stage", COMPONENTS)
def test_component_body_is_self_contained(stage):
    import importlib

    module_name, name = COMPONENTS[stage].split(":")
    component = getattr(importlib.import_module(module_name), name)
    function = getattr(component, "python_func", component)
    source = inspect.getsource(function)
    source = source[source.index("def "):]  # without the decorator
    assert free_names(source) == set(), f"{name} reads module-level names the compiled component will not have"


def test_the_check_finds_a_module_level_name():
    assert free_names("def f(x):\n    return shutil.copy(x)\n") == {"shutil"}
    assert free_names("def f(x):\n    import shutil\n    return shutil.copy(x)\n") == set()
