"""One definition per setting: each stage declares its settings once, as a frozen dataclass built with `setting()`.

Everything else derives from that class, with the field name unchanged everywhere:
- the pipeline parameter (`name`, cluster default),
- the stage's KFP component argument (`name`),
- the CLI flag of `pipeline.py run` (`--name-with-dashes`, local default),
- range checks, run at the CLI and again at the stage boundary (the KFP UI bypasses the CLI).

Adding a setting is one `setting(...)` line in the stage's settings class plus its test.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional, get_type_hints

_UNSET = object()
KFP_TYPES = (str, int, float, bool, dict, list)


class SettingError(ValueError):
    """A setting's value is out of range or of the wrong type; the message names the setting and what to use."""


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """What one setting is, read from its dataclass field."""

    name: str
    type: type
    default: Any  # the cluster (pipeline) default
    local_default: Any  # the default of `pipeline.py run`
    help: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: Optional[tuple] = None
    cli: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(default: Any, help: str, *, local: Any = _UNSET, minimum: Optional[float] = None,
            maximum: Optional[float] = None, choices: Optional[Iterable] = None, cli: bool = True) -> Any:
    """A settings field: `default` is the cluster default, `local` (if given) the default of a local run."""
    metadata = {"help": help, "local": local, "minimum": minimum, "maximum": maximum,
                "choices": tuple(choices) if choices is not None else None, "cli": cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def specs(settings_class: type) -> list[SettingSpec]:
    """The settings of a class, in declaration order."""
    hints = get_type_hints(settings_class)
    result = []
    for field in dataclasses.fields(settings_class):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{settings_class.__name__}.{field.name} is not declared with setting()")
        kind = hints[field.name]
        if kind not in KFP_TYPES:
            raise TypeError(f"{settings_class.__name__}.{field.name}: {kind} is not a KFP parameter type")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        local = default if meta["local"] is _UNSET else meta["local"]
        result.append(SettingSpec(field.name, kind, default, local, meta["help"], meta["minimum"],
                                  meta["maximum"], meta["choices"], meta["cli"]))
    return result


def check_value(spec: SettingSpec, value: Any) -> Any:
    """The value, converted to the setting's type where that is lossless (KFP hands ints back as floats)."""
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
        raise SettingError(f"{spec.name} must be {spec.type.__name__}, not {type(value).__name__} {value!r}.")
    if spec.type is float and not math.isfinite(value):
        raise SettingError(f"{spec.name} must be a finite number, not {value!r}.")
    if spec.minimum is not None and value < spec.minimum:
        raise SettingError(f"{spec.name} must be at least {spec.minimum:g}, not {value!r}.")
    if spec.maximum is not None and value > spec.maximum:
        raise SettingError(f"{spec.name} must be at most {spec.maximum:g}, not {value!r}.")
    if spec.choices is not None and value not in spec.choices:
        raise SettingError(f"{spec.name} must be one of {', '.join(map(str, spec.choices))}, not {value!r}.")
    return value


def build(settings_class: type, values: dict[str, Any], *, local: bool = False):
    """An instance from a mapping of some settings (others take their cluster or local default), range-checked."""
    known = {spec.name: spec for spec in specs(settings_class)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingError(f"{settings_class.__name__} has no setting {', '.join(unknown)}.")
    checked = {}
    for name, spec in known.items():
        value = values[name] if name in values else (spec.local_default if local else spec.default)
        checked[name] = check_value(spec, value)
    return settings_class(**checked)


def as_dict(settings: Any) -> dict[str, Any]:
    """Field name -> value, the form the pipeline and the KFP component take."""
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}


def from_arguments(settings_class: type, arguments: dict[str, Any]):
    """The settings among a KFP component's arguments (pass its `locals()`), range-checked at the stage boundary.

    Every setting must be among the arguments: a component that lacks one fails here instead of silently running
    on the default.
    """
    names = [spec.name for spec in specs(settings_class)]
    missing = [name for name in names if name not in arguments]
    if missing:
        raise TypeError(f"The component of {settings_class.__name__} lacks the arguments {', '.join(missing)}.")
    return build(settings_class, {name: arguments[name] for name in names})
