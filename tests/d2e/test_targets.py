"""What differs per target (Kubeflow, Vertex AI), checked on the real compiler output; Vertex's secrets."""

import re

import pytest
import yaml

from components.common import (
    GPU_STAGES,
    STAGE_IMAGES,
    STAGES,
    StageError,
    load_secret_into_env,
    stage_resources,
)
from components.load_docs import LoadDocsSettings
from d2e import targets
from tests.conftest import PROJECT_ROOT
from tests.support.compiled import dag_tasks, parameter_source

PIPELINE_STAGES = STAGES
# Shapes of real credentials: OpenAI keys, Google OAuth tokens and API keys, private keys, bearer headers.
SECRET_PATTERNS = (r"sk-[A-Za-z0-9_-]{10,}", r"ya29\.", r"AIza[0-9A-Za-z_-]{20,}", r"-----BEGIN", r"Bearer [A-Za-z0-9]")
# The GPU's (type, count) parameters of each target.
GPU_PARAMETERS = {"kfp": ("gpu_accelerator_type", "gpu_count"),
                  "vertex": ("vertex_accelerator_type", "vertex_accelerator_count")}
# Every credential: (env variable, Kubernetes secret on Kubeflow, Secret Manager parameter on Vertex, tasks reading it).
# Spelled out, not read from d2e.targets: these names are what the README tells a platform team to create.
SECRET_PATHS = (
    ("OPENAI_API_KEY", "openai-api-key", "openai_secret_resource", ("generate-queries",)),
    ("ARGILLA_API_KEY", "argilla-api-key", "argilla_secret_resource", ("publish",)),
    ("HF_TOKEN", "hf-token", "hf_secret_resource", ("publish", "export-model")),
)


@pytest.fixture(scope="module", params=targets.TARGETS)
def compiled(request, compiled_yaml):
    text = compiled_yaml(request.param)
    documents = list(yaml.safe_load_all(text))
    return request.param, text, documents[0], (documents[1] if len(documents) > 1 else {})


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
            continue
        # Pipeline parameters on both targets, so a run picks its GPU: the YAML holds only references to them.
        kind, count = GPU_PARAMETERS[target]
        assert accelerator == {"resourceType": f"{{{{$.inputs.parameters['pipelinechannel--{kind}']}}}}",
                               "resourceCount": f"{{{{$.inputs.parameters['pipelinechannel--{count}']}}}}"}, stage
        # Inside the shards' ParallelFor (embed_score) the reference passes through the loop's own inputs.
        inputs = dag_tasks(spec)[f"{stage.replace('_', '-')}-component"]["inputs"]["parameters"]
        assert parameter_source(inputs[f"pipelinechannel--{kind}"]) == kind, stage
        assert parameter_source(inputs[f"pipelinechannel--{count}"]) == count, stage
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    kind, count = GPU_PARAMETERS[target]
    assert parameters[kind] == {"defaultValue": "NVIDIA_L4" if target == "vertex" else "nvidia.com/gpu",
                                "isOptional": True, "parameterType": "STRING"}
    assert parameters[count] == {"defaultValue": 1.0, "isOptional": True, "parameterType": "NUMBER_INTEGER"}
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
        # A task retry would re-run a StageError (the same on every try) and pay for generation again.
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


def test_every_secret_has_a_path_on_each_target(compiled):
    """Kubeflow mounts each key from its optional Kubernetes secret into the tasks that read it; on Vertex the
    same tasks get the Secret Manager name of each key as a parameter (default empty: no key)."""
    target, _, spec, platform = compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    if target == "kfp":
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        mounted = {(name.removeprefix("exec-").removesuffix("-component"), secret["secretName"],
                    tuple(sorted(tuple(sorted(pair.items())) for pair in secret["keyToEnv"])), secret["optional"])
                   for name, executor in executors.items() for secret in executor.get("secretAsEnv", [])}
        assert mounted == {(task, name, ((("envVar", env), ("secretKey", env)),), True)
                           for env, name, _, tasks in SECRET_PATHS for task in tasks}
        assert not [name for name in parameters if name.endswith("_secret_resource")]
        return
    assert platform == {}
    # generate_queries sits in the shards' ParallelFor: its reference passes through the loop's inputs.
    wired = {(task.removesuffix("-component"), name, parameter_source(value))
             for task, body in dag_tasks(spec).items()
             for name, value in body.get("inputs", {}).get("parameters", {}).items()
             if name.endswith("_secret_resource")}
    assert wired == {(task, parameter, parameter) for _, _, parameter, tasks in SECRET_PATHS for task in tasks}
    for _, _, parameter, _ in SECRET_PATHS:
        assert parameters[parameter]["defaultValue"] == ""


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


def test_secret_manager_value_goes_to_env_only(fake_secret_manager, monkeypatch):
    import os

    fake_secret_manager["projects/p/secrets/openai-api-key"] = "value-from-secret-manager"
    monkeypatch.delenv("D2E_TEST_KEY", raising=False)
    assert load_secret_into_env("projects/p/secrets/openai-api-key", "D2E_TEST_KEY") is True
    assert fake_secret_manager.requested == ["projects/p/secrets/openai-api-key/versions/latest"]
    assert os.environ.pop("D2E_TEST_KEY") == "value-from-secret-manager"
    assert load_secret_into_env("", "D2E_TEST_KEY") is False and "D2E_TEST_KEY" not in os.environ
    with pytest.raises(StageError, match="not a Secret Manager name"):
        load_secret_into_env("sk-abc", "D2E_TEST_KEY")


def test_an_unknown_target_names_the_known_ones():
    from pipeline import build_pipeline

    with pytest.raises(StageError, match="Unknown target 'azure'; use one of kfp, vertex"):
        build_pipeline("azure")
