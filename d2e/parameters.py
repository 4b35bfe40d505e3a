"""The pipeline's parameters, derived from the stages' settings classes: one list says which classes, in which order.

A field of a settings class is, under the same name, a pipeline parameter (cluster default), an argument of its
stage's KFP component and a `run` flag (local default): adding a field is the whole change outside its stage's code.
"""

import inspect

from components.embed_score import EmbedScoreSettings
from components.evaluate import EvaluateSettings, ExportModelSettings
from components.export import ExportSettings
from components.finetune import FinetuneSettings
from components.generate_queries import GenerationSettings
from components.load_docs import LoadDocsSettings
from components.mine_negatives import MineNegativesSettings
from components.publish import PublishSettings
from components.settings import SettingSpec, specs
from d2e.targets import TargetSettings, hidden_parameters

# (group, settings class) in the order the parameters appear in the KFP UI: what a run reads first comes first.
# A group is the stage whose component takes these settings; "target" holds the cluster-only settings.
SETTINGS: tuple[tuple[str, type], ...] = (
    ("load_docs", LoadDocsSettings),
    ("generate_queries", GenerationSettings),
    ("embed_score", EmbedScoreSettings),
    ("mine_negatives", MineNegativesSettings),
    ("target", TargetSettings),
    ("export", ExportSettings),
    ("publish", PublishSettings),
    ("finetune", FinetuneSettings),
    ("evaluate", EvaluateSettings),
    ("export_model", ExportModelSettings),
)
GROUPS = dict(SETTINGS)


def group_specs(*groups: str) -> list[SettingSpec]:
    """The settings of these groups (all groups when none is named), in the fixed order above."""
    return [spec for group, settings_class in SETTINGS if not groups or group in groups
            for spec in specs(settings_class)]


def pipeline_specs(target: str) -> list[SettingSpec]:
    """The pipeline parameters of a target: every setting but those only the other target has."""
    hidden = hidden_parameters(target)
    return [spec for spec in group_specs() if spec.name not in hidden]


def pipeline_signature(target: str) -> inspect.Signature:
    """The pipeline function's signature for a target: one keyword parameter per setting, cluster defaults."""
    return inspect.Signature([
        inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=spec.default,
                          annotation=spec.type)
        for spec in pipeline_specs(target)
    ])


def stage_arguments(group: str, values: dict) -> dict:
    """The values of a group's settings, by name: the keyword arguments of that stage's component."""
    return {spec.name: values[spec.name] for spec in specs(GROUPS[group])}


def check_unique_names(settings: tuple[tuple[str, type], ...] = SETTINGS) -> None:
    """Raise TypeError when two settings classes declare the same name (it would be two parameters in one)."""
    seen: dict[str, str] = {}
    for group, settings_class in settings:
        for spec in specs(settings_class):
            if spec.name in seen:
                raise TypeError(f"Setting {spec.name!r} is declared by both {seen[spec.name]} and {group}.")
            seen[spec.name] = group


check_unique_names()
