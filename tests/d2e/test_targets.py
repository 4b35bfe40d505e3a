"""What differs per target (Kubeflow, Vertex AI), checked on the real compiler output; Vertex's secrets."""

import re

import pytest
import yaml

from components.common import (
    GPU_STAGES,
    NETWORK_STAGES,
    STAGE_IMAGES,
    STAGES,
    StageError,
    load_secret_into_env,
    stage_resources,
)
from components.load_docs import LoadDocsSettings
from d2e import targets
from pipeline import compile_pipeline
from tests.conftest import PROJECT_ROOT
from tests.support.compiled import dag_tasks, parameter_source

PIPELINE_STAGES = STAGES
# Shapes of real credentials: OpenAI keys, Google OAuth tokens and API keys, private keys, bearer headers.
SECRET_PATTERNS = (r"sk-[A-Za-z0-9_-]{10,}", r"ya29\.", r"AIza[0-9A-Za-z_-]{20,}", r"-----BEGIN", r"Bearer [A-Za-z0-9]")


@pytest.fixture(scope="module", params=targets.TARGETS)
def compiled(request, tmp_path_factory):
    path = compile_pipeline(tmp_path_factory.mktemp(request.param) / "p.yaml", request.param)
    documents = list(yaml.safe_load_all(path.read_text()))
    return request.param, path.read_text(), documents[0], (documents[1] if len(documents) > 1 else {})


def executor(spec, stage):
    return spec["deploymentSpec"]["executors"][f"exec-{stage.replace('_', '-')}-component"]["container"]


def test_every_stage_runs_its_own_image(compiled):
    _, _, spec, _ = compiled
    for stage in PIPELINE_STAGES:
        assert executor(spec, stage)["image"] == STAGE_IMAGES[stage]


def test_gpu_only_on_gpu_stages_in_each_targets_form(compiled):
    target, _, spec, platform = compiled
    for stage in PIPELINE_STAGES:
        accelerator = executor(spec, stage).get("resources", {}).get("accelerator")
        if stage not in GPU_STAGES:
            assert accelerator is None, stage
        elif target == "vertex":
            assert accelerator["resourceType"] == targets.VERTEX_ACCELERATOR == "NVIDIA_L4"
            assert accelerator["resourceCount"] == "1"
        else:
            # A pipeline parameter (default nvidia.com/gpu), so a cluster can name its own resource.
            assert "gpu_accelerator_type" in accelerator["resourceType"]
            assert "gpu_count" in accelerator["resourceCount"]
    if target == "vertex":
        assert platform == {}, "Vertex must get no kfp-kubernetes platform config"
    else:
        k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        gpu_executors = {name for name, value in k8s.items() if "nodeSelector" in value or "tolerations" in value}
        assert gpu_executors == {f"exec-{stage.replace('_', '-')}-component" for stage in GPU_STAGES}


def test_resources_retries_and_caching_per_stage(compiled):
    _, _, spec, _ = compiled
    tasks = dag_tasks(spec)
    for stage in PIPELINE_STAGES:
        resources = executor(spec, stage)["resources"]
        expected = stage_resources(stage)
        assert resources["resourceCpuRequest"] == expected["cpu_request"]
        assert resources["resourceCpuLimit"] == expected["cpu_limit"]
        assert resources["resourceMemoryRequest"] == expected["memory_request"]
        assert resources["resourceMemoryLimit"] == expected["memory_limit"]
        task = tasks[f"{stage.replace('_', '-')}-component"]
        if stage in NETWORK_STAGES:
            assert task["retryPolicy"] == {"backoffDuration": "30s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "600s", "maxRetryCount": 3}
        else:
            assert "retryPolicy" not in task
        assert task.get("cachingOptions", {}).get("enableCache", False) == (stage in targets.CACHED_STAGES)
    # Vertex picks g2-standard-8 for one L4 with 8 vCPU / 32 GB; smaller limits would not fit that machine.
    gpu_stage = stage_resources("embed_score")
    assert gpu_stage["cpu_limit"] == "8" and gpu_stage["memory_limit"] == "32G"


def test_parameter_defaults_per_target(compiled):
    target, _, spec, platform = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["llm"]["defaultValue"] == "openai:gpt-4o"
    assert parameters["embedding_model"]["defaultValue"] == "Snowflake/snowflake-arctic-embed-l"
    assert parameters["dataset"]["defaultValue"] == LoadDocsSettings().dataset
    if target == "vertex":
        assert parameters["openai_secret_resource"]["defaultValue"] == ""
        assert not set(targets.KFP_ONLY_PARAMETERS) & set(parameters)
    # Every pipeline parameter reaches the task that uses it (none silently replaced by its default).
    wired = {value.get("componentInputParameter") for task in spec["root"]["dag"]["tasks"].values()
             for value in task.get("inputs", {}).get("parameters", {}).values()}
    if target == "kfp":  # node selector and tolerations reach the task through the Kubernetes platform spec
        gpu = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-embed-score-component"]
        wired |= {gpu["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"],
                  gpu["tolerations"][0]["tolerationJson"]["componentInputParameter"]}
    assert set(parameters) <= wired, set(parameters) - wired
    if target == "vertex":
        generate = dag_tasks(spec)["generate-queries-component"]["inputs"]["parameters"]
        assert parameter_source(generate["openai_secret_resource"]) == "openai_secret_resource"
    else:
        assert parameters["gpu_accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
        assert parameters["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}
        assert "openai_secret_resource" not in parameters


def test_no_secret_value_in_yaml(compiled):
    target, text, spec, platform = compiled
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), pattern
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    # Names that would carry a credential as a parameter (max_new_tokens is a length, not a token).
    assert not [name for name in parameters if re.search(r"api_?key|password|(^|_)token$", name.lower())]
    if target == "kfp":
        secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-generate-queries-component"]
        assert secret["secretAsEnv"][0]["secretName"] == targets.OPENAI_SECRET_NAME
        assert secret["secretAsEnv"][0]["optional"] is True


def test_image_registry_and_version_can_be_overridden_at_compile_time(tmp_path):
    import subprocess
    import sys

    env = {"D2E_IMAGE_REGISTRY": "europe-docker.pkg.dev/p/r/", "D2E_IMAGE_VERSION": "abc1234", "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "pipeline.py", "compile", "--target", "vertex", "--output",
                          str(tmp_path / "v.yaml")], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    spec = yaml.safe_load((tmp_path / "v.yaml").read_text())
    assert executor(spec, "embed_score")["image"] == "europe-docker.pkg.dev/p/r/embed-score:abc1234"


# ---- Secret Manager on Vertex -------------------------------------------------------------------------------


def test_secret_manager_value_goes_to_env_only(monkeypatch):
    from google.cloud import secretmanager
    from google.cloud.secretmanager_v1.types import AccessSecretVersionResponse, SecretPayload

    requested = []

    def fake_access(self, name=None, **kwargs):  # the outermost call: Secret Manager's API
        requested.append(name)
        return AccessSecretVersionResponse(name=name, payload=SecretPayload(data=b"value-from-secret-manager\n"))

    monkeypatch.setattr(secretmanager.SecretManagerServiceClient, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(secretmanager.SecretManagerServiceClient, "access_secret_version", fake_access)
    monkeypatch.delenv("D2E_TEST_KEY", raising=False)
    assert load_secret_into_env("projects/p/secrets/openai-api-key", "D2E_TEST_KEY") is True
    assert requested == ["projects/p/secrets/openai-api-key/versions/latest"]
    import os

    assert os.environ.pop("D2E_TEST_KEY") == "value-from-secret-manager"
    assert load_secret_into_env("", "D2E_TEST_KEY") is False and "D2E_TEST_KEY" not in os.environ
    with pytest.raises(StageError, match="not a Secret Manager name"):
        load_secret_into_env("sk-abc", "D2E_TEST_KEY")


def test_an_unknown_target_names_the_known_ones():
    from pipeline import build_pipeline

    with pytest.raises(StageError, match="Unknown target 'azure'; use one of kfp, vertex"):
        build_pipeline("azure")
