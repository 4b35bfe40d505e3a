"""The settings framework: one dataclass field per setting, every other form derived from it."""

from dataclasses import dataclass

import pytest

from components.settings import SettingError, as_dict, build, check_value, from_arguments, setting, specs


@dataclass(frozen=True)
class ExampleSettings:
    llm: str = setting("openai:gpt-4o", "which LLM", local="local")
    concurrency: int = setting(16, "requests in flight", local=8, minimum=1, maximum=1024)
    max_failure_rate: float = setting(0.05, "fraction of rows allowed to fail", minimum=0.0, maximum=1.0)
    json_mode: str = setting("auto", "output constraint", choices=("auto", "off"))
    selector: dict = setting({"gpu": "true"}, "node selector", cli=False)


def test_specs_keep_declaration_order_defaults_and_flags():
    found = specs(ExampleSettings)
    assert [s.name for s in found] == ["llm", "concurrency", "max_failure_rate", "json_mode", "selector"]
    assert found[0].default == "openai:gpt-4o" and found[0].local_default == "local"
    assert found[2].local_default == 0.05  # no local override: the cluster default
    assert found[2].flag == "--max-failure-rate"
    assert found[4].cli is False


def test_build_uses_cluster_or_local_defaults_and_overrides():
    assert build(ExampleSettings, {}).llm == "openai:gpt-4o"
    local = build(ExampleSettings, {"concurrency": 3}, local=True)
    assert (local.llm, local.concurrency) == ("local", 3)
    assert as_dict(local)["selector"] == {"gpu": "true"}


def test_mutable_defaults_are_not_shared():
    first, second = ExampleSettings(), ExampleSettings()
    first.selector["x"] = "y"
    assert "x" not in second.selector


@pytest.mark.parametrize("values, message", [
    ({"concurrency": 0}, "concurrency must be at least 1"),
    ({"max_failure_rate": 1.5}, "max_failure_rate must be at most 1"),
    ({"max_failure_rate": float("nan")}, "finite"),
    ({"json_mode": "xml"}, "json_mode must be one of auto, off"),
    ({"concurrency": "8"}, "concurrency must be int"),
    ({"concurrency": True}, "concurrency must be int"),
    ({"nope": 1}, "has no setting nope"),
])
def test_out_of_range_values_name_the_setting(values, message):
    with pytest.raises(SettingError, match=message):
        build(ExampleSettings, values)


def test_kfp_floats_for_ints_and_ints_for_floats_are_converted():
    by_name = {s.name: s for s in specs(ExampleSettings)}
    assert check_value(by_name["concurrency"], 4.0) == 4
    assert isinstance(check_value(by_name["max_failure_rate"], 0), float)
    with pytest.raises(SettingError):
        check_value(by_name["concurrency"], 4.5)


def test_from_arguments_picks_the_settings_and_checks_them():
    arguments = {"llm": "x", "concurrency": 2.0, "max_failure_rate": 0, "json_mode": "off", "selector": {},
                 "docs": "/an/artifact/path"}
    found = from_arguments(ExampleSettings, arguments)
    assert (found.llm, found.concurrency, found.max_failure_rate) == ("x", 2, 0.0)
    with pytest.raises(SettingError, match="concurrency must be at least 1"):
        from_arguments(ExampleSettings, {**arguments, "concurrency": 0})
    with pytest.raises(TypeError, match="lacks the arguments selector"):
        from_arguments(ExampleSettings, {k: v for k, v in arguments.items() if k != "selector"})


def _numeric_settings():
    from d2e.parameters import SETTINGS

    return [pytest.param(settings_class, spec, id=spec.name) for _, settings_class in SETTINGS
            for spec in specs(settings_class) if spec.type in (int, float)]


@pytest.mark.parametrize("settings_class, spec", _numeric_settings())
def test_every_numeric_setting_of_every_stage_has_a_range(settings_class, spec):
    assert spec.minimum is not None and spec.maximum is not None, f"{spec.name} needs minimum= and maximum="
    assert spec.minimum <= spec.default <= spec.maximum and spec.minimum <= spec.local_default <= spec.maximum


@pytest.mark.parametrize("settings_class, spec", _numeric_settings())
def test_the_stage_boundary_refuses_nan_inf_and_values_out_of_range(settings_class, spec):
    """What the KFP UI passes reaches the component unchecked by the CLI: from_arguments checks it again."""
    arguments = as_dict(build(settings_class, {}))
    step = 1 if spec.type is int else 1e-6
    bad = [float("nan"), float("inf"), float("-inf")]
    bad += [spec.minimum - max(step, abs(spec.minimum) * 1e-6), spec.maximum + max(step, abs(spec.maximum) * 1e-6)]
    for value in bad:
        with pytest.raises(SettingError, match=spec.name):
            from_arguments(settings_class, {**arguments, spec.name: value})
