"""The pipeline definition (pipeline.py): its tasks and wiring, parameters derived from the stages' settings, and the
committed YAML of both targets kept fresh. The local run and the targets have their own tests under tests/d2e/."""

import pytest
import yaml

from components.common import STAGE_IMAGES
from d2e.targets import ARGILLA_SECRET_NAME, HF_SECRET_NAME, OPENAI_SECRET_NAME, TARGETS, VERTEX_ONLY_PARAMETERS
from tests.conftest import PROJECT_ROOT
from tests.support.compiled import dag_tasks, parameter_source

STAGES = ("load-docs", "generate-queries", "embed-score", "mine-negatives", "report", "export", "publish", "finetune",
          "evaluate", "export-model")
GPU_TASKS = ["exec-embed-score-component", "exec-evaluate-component", "exec-finetune-component",
             "exec-mine-negatives-component"]
# The shards' fan-out (d2e/fanout.py): the list of shards and the two merges, around a ParallelFor.
FAN_OUT_TASKS = {"shard-list-component", "merge-triplets-component", "merge-scored-component"}



@pytest.fixture(scope="module")
def compiled(compiled_yaml):
    text = compiled_yaml("kfp")
    documents = list(yaml.safe_load_all(text))
    return text, documents[0], (documents[1] if len(documents) > 1 else {})


def test_compiled_pipeline_has_every_stage_with_its_own_image(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    images = {name: executor["container"]["image"] for name, executor in executors.items()}
    for stage in STAGES:
        underscored = stage.replace("-", "_")
        assert images[f"exec-{stage}-component"] == STAGE_IMAGES[underscored]
    assert len(set(images.values())) == len(STAGES)
    tasks = dag_tasks(spec)
    assert set(tasks) == {f"{stage}-component" for stage in STAGES} | FAN_OUT_TASKS
    # Every stage after mining reads the mined (filtered, with hard negatives) dataset; the report also reads
    # embed_score's statistics. Both read the shards' merged outputs.
    assert tasks["mine-negatives-component"]["dependentTasks"] == ["merge-scored-component"]
    assert tasks["report-component"]["dependentTasks"] == ["load-docs-component", "merge-scored-component",
                                                           "merge-triplets-component", "mine-negatives-component"]
    assert tasks["export-component"]["dependentTasks"] == ["mine-negatives-component", "report-component"]
    assert tasks["publish-component"]["dependentTasks"] == ["mine-negatives-component", "report-component"]
    assert tasks["finetune-component"]["dependentTasks"] == ["mine-negatives-component"]
    assert tasks["evaluate-component"]["dependentTasks"] == ["finetune-component", "mine-negatives-component"]
    for task in ("export", "publish", "finetune", "evaluate"):
        scored = tasks[f"{task}-component"]["inputs"]["artifacts"]["scored"]["taskOutputArtifact"]
        assert scored == {"outputArtifactKey": "mined", "producerTask": "mine-negatives-component"}, task
    mined = tasks["report-component"]["inputs"]["artifacts"]["mined"]["taskOutputArtifact"]
    assert mined == {"outputArtifactKey": "mined", "producerTask": "mine-negatives-component"}
    mine_inputs = tasks["mine-negatives-component"]["inputs"]
    assert mine_inputs["artifacts"]["scored"]["taskOutputArtifact"] == {
        "outputArtifactKey": "scored", "producerTask": "merge-scored-component"}
    assert mine_inputs["parameters"]["embedding_model"]["componentInputParameter"] == "embedding_model"
    model_input = tasks["evaluate-component"]["inputs"]["artifacts"]["finetuned_model"]["taskOutputArtifact"]
    assert model_input == {"outputArtifactKey": "model", "producerTask": "finetune-component"}
    # evaluate decides (artifacts only); export_model carries the decision out, into output_uri and the model target.
    assert tasks["export-model-component"]["dependentTasks"] == ["evaluate-component", "finetune-component"]
    export_inputs = tasks["export-model-component"]["inputs"]
    assert export_inputs["artifacts"]["evaluation"]["taskOutputArtifact"] == {
        "outputArtifactKey": "evaluation", "producerTask": "evaluate-component"}
    assert export_inputs["parameters"]["output_uri"]["componentInputParameter"] == "output_uri"
    assert "output_uri" not in tasks["evaluate-component"]["inputs"]["parameters"]


def test_gpu_request_is_on_embed_score_mine_negatives_finetune_and_evaluate_only(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = sorted(name for name, executor in executors.items()
                      if "accelerator" in executor["container"].get("resources", {}))
    assert with_gpu == GPU_TASKS
    # One set of GPU parameters serves every GPU task.
    tasks = dag_tasks(spec)
    for task in ("embed-score-component", "mine-negatives-component", "finetune-component", "evaluate-component"):
        parameters = tasks[task]["inputs"]["parameters"]
        assert parameter_source(parameters["pipelinechannel--gpu_accelerator_type"]) == "gpu_accelerator_type"
        assert parameter_source(parameters["pipelinechannel--gpu_count"]) == "gpu_count"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in GPU_TASKS:
        assert "nodeSelector" in k8s[name] and "tolerations" in k8s[name]
    assert not any("nodeSelector" in value for name, value in k8s.items() if name not in GPU_TASKS)
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["gpu_accelerator_type"]["defaultValue"] == "nvidia.com/gpu"
    assert defaults["gpu_node_selector"]["defaultValue"] == {"nvidia.com/gpu.present": "true"}


def test_cluster_defaults_and_secret_reference_only(compiled):
    text, spec, platform = compiled
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["llm"]["defaultValue"] == "openai:gpt-4o"
    assert defaults["embedding_model"]["defaultValue"] == "Snowflake/snowflake-arctic-embed-l"
    assert defaults["dataset"]["defaultValue"] == "zenml/rag_qa_embedding_questions_0_60_0"
    assert not any("key" in name.lower() and "api" in name.lower() for name in defaults)
    secret = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-generate-queries-component"]
    assert secret["secretAsEnv"][0]["secretName"] == OPENAI_SECRET_NAME
    assert "ZenML" not in defaults["context"]["defaultValue"]
    assert "sk-" not in text
    publish = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-publish-component"]
    assert {(s["secretName"], s["keyToEnv"][0]["envVar"], s["optional"]) for s in publish["secretAsEnv"]} == {
        (ARGILLA_SECRET_NAME, "ARGILLA_API_KEY", True), (HF_SECRET_NAME, "HF_TOKEN", True)}
    # Publishing targets are off unless configured; the run id comes from KFP, not from a person.
    for name in ("argilla_url", "hub_repo", "export_uri"):
        assert defaults[name]["defaultValue"] == ""
    run_id = spec["root"]["dag"]["tasks"]["publish-component"]["inputs"]["parameters"]["run_id"]
    assert run_id["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    hub = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-export-model-component"]
    assert hub["secretAsEnv"][0]["secretName"] == HF_SECRET_NAME
    assert not any("token" in name.lower() and ("hf" in name.lower() or "hub" in name.lower()) for name in defaults)
    # Cluster finetuning defaults: ~100 optimizer steps on a thousand rows, mined hard negatives (issue 9).
    assert defaults["finetune_epochs"]["defaultValue"] == 3.0
    assert defaults["finetune_batch_size"]["defaultValue"] == 32
    assert defaults["finetune_negatives"]["defaultValue"] == "mined"
    assert defaults["finetune_mini_batch_size"]["defaultValue"] == 32
    assert defaults["finetune_hard_negatives"]["defaultValue"] is False
    # The gate: an interval above zero, a gain of at least min_improvement, on at least 50 queries unless forced.
    assert defaults["min_improvement"]["defaultValue"] == 0.01
    assert defaults["min_eval_queries"]["defaultValue"] == 50
    assert defaults["force_export"]["defaultValue"] is False


@pytest.mark.parametrize("target,committed", [("kfp", "pipeline.yaml"), ("vertex", "pipeline-vertex.yaml")])
def test_committed_yaml_is_fresh(target, committed, compiled_yaml):
    """Like ilab-on-ocp: the committed YAML of each target must equal a fresh compile (run `make compile`)."""
    fresh = compiled_yaml(target)
    # Compared parsed: the compiler's comment header prints dict defaults in no fixed key order.
    assert list(yaml.safe_load_all((PROJECT_ROOT / committed).read_text())) == list(yaml.safe_load_all(fresh)), (
        f"{committed} is stale: run `make compile` and commit it")


# ---- One setting, one name: parameters, flags and component arguments all derive from the settings classes ----


def component_inputs(spec: dict, stage: str) -> set:
    return set(spec["components"][f"comp-{stage.replace('_', '-')}-component"]["inputDefinitions"]["parameters"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_setting_is_a_pipeline_parameter_wired_to_its_stage(target, compiled_yaml):
    from components.settings import specs
    from d2e.parameters import SETTINGS, pipeline_specs

    spec = next(yaml.safe_load_all(compiled_yaml(target)))
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    # Exactly the target's settings, with their cluster defaults.
    assert set(parameters) == {s.name for s in pipeline_specs(target)}
    for setting in pipeline_specs(target):
        assert parameters[setting.name].get("defaultValue") == setting.default, setting.name
    # Each stage's component takes its settings under the same names, wired straight from the parameters.
    for group, settings_class in SETTINGS:
        if group == "target":
            continue
        task = dag_tasks(spec)[f"{group.replace('_', '-')}-component"]["inputs"]["parameters"]
        for setting in specs(settings_class):
            argument = setting.name
            assert argument in component_inputs(spec, group), (group, setting.name)
            assert parameter_source(task[argument]) == setting.name, (group, setting.name)


def test_pipeline_signature_follows_the_settings_order():
    import inspect

    from components.settings import specs
    from d2e.parameters import SETTINGS
    from pipeline import docs_to_embedding_data

    declared = [s.name for _, settings_class in SETTINGS for s in specs(settings_class)]
    shown = list(inspect.signature(docs_to_embedding_data.pipeline_func).parameters)
    assert shown == [name for name in declared if name not in VERTEX_ONLY_PARAMETERS]
    assert shown[:4] == ["dataset", "limit", "text_column", "docs_base_url"]  # what a run reads first comes first


def test_a_new_setting_becomes_a_parameter_and_a_flag(monkeypatch):
    """Adding a field to a stage's settings class is all it takes for the pipeline parameter and the `run` flag."""
    import dataclasses

    import d2e.parameters as parameters
    from components.finetune import FinetuneSettings
    from components.settings import setting
    from d2e.cli import build_parser

    extended = dataclasses.make_dataclass(
        "ExtendedFinetuneSettings", [("finetune_max_steps", int, setting(0, "stop after N steps (0: no limit)",
                                                                         minimum=0))],
        bases=(FinetuneSettings,), frozen=True)
    settings = tuple((group, extended if cls is FinetuneSettings else cls) for group, cls in parameters.SETTINGS)
    monkeypatch.setattr(parameters, "SETTINGS", settings)
    monkeypatch.setattr(parameters, "GROUPS", dict(settings))
    assert parameters.pipeline_signature("kfp").parameters["finetune_max_steps"].default == 0
    assert parameters.stage_arguments("finetune", {s.name: 1 for s in parameters.group_specs()})["finetune_max_steps"]
    assert build_parser().parse_args(["run", "--finetune-max-steps", "7"]).finetune_max_steps == 7
