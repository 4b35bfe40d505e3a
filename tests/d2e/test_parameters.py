"""The pipeline parameters derived from the stages' settings classes."""

import dataclasses

import pytest

from components.settings import setting, specs
from d2e import parameters
from d2e.targets import KFP_ONLY_PARAMETERS, VERTEX_ONLY_PARAMETERS


def test_groups_follow_the_data_and_every_stage_with_settings_is_listed():
    assert [group for group, _ in parameters.SETTINGS] == [
        "load_docs", "generate_queries", "embed_score", "mine_negatives", "target", "export", "publish", "finetune",
        "evaluate", "export_model"]
    assert [s.name for s in parameters.group_specs("finetune")] == [
        "finetune_epochs", "finetune_batch_size", "finetune_learning_rate", "finetune_warmup_ratio",
        "finetune_negatives", "finetune_hard_negatives", "finetune_mini_batch_size", "finetune_seed"]


def test_each_target_shows_only_its_own_cluster_settings():
    kfp = {s.name for s in parameters.pipeline_specs("kfp")}
    vertex = {s.name for s in parameters.pipeline_specs("vertex")}
    assert set(KFP_ONLY_PARAMETERS) <= kfp and not set(KFP_ONLY_PARAMETERS) & vertex
    assert set(VERTEX_ONLY_PARAMETERS) <= vertex and not set(VERTEX_ONLY_PARAMETERS) & kfp
    assert kfp - set(KFP_ONLY_PARAMETERS) == vertex - set(VERTEX_ONLY_PARAMETERS)


def test_signature_has_cluster_defaults_and_kfp_types():
    signature = parameters.pipeline_signature("kfp")
    assert signature.parameters["finetune_batch_size"].default == 32  # the local run's 16 is a flag default only
    assert signature.parameters["finetune_batch_size"].annotation is int
    assert signature.parameters["gpu_node_selector"].default == {"nvidia.com/gpu.present": "true"}
    # A dict default is a fresh copy per signature: the compiler may not mutate the class's default.
    assert signature.parameters["gpu_node_selector"].default is not parameters.pipeline_signature("kfp").parameters[
        "gpu_node_selector"].default


def test_stage_arguments_are_that_stages_settings_by_name():
    values = {s.name: f"value-{s.name}" for s in parameters.group_specs()}
    assert parameters.stage_arguments("evaluate", values) == {
        "min_improvement": "value-min_improvement", "min_eval_queries": "value-min_eval_queries",
        "force_export": "value-force_export"}
    assert parameters.stage_arguments("export_model", values) == {
        "model_export_uri": "value-model_export_uri", "hub_model_repo": "value-hub_model_repo"}


def test_a_name_declared_twice_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Clash:
        limit: int = setting(1, "the same name as load_docs' limit")

    with pytest.raises(TypeError, match="'limit' is declared by both load_docs and clash"):
        parameters.check_unique_names((*parameters.SETTINGS, ("clash", Clash)))
    assert len({s.name for s in parameters.group_specs()}) == sum(len(specs(c)) for _, c in parameters.SETTINGS)
