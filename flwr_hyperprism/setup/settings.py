"""Typed settings: the base of the run config and of each algorithm's own section.

A ``Settings`` dataclass's fields are run-config keys (``num_rounds`` is the Flower key
``num-rounds``), type-checked and validated on construction. Each algorithm declares its own
``AlgorithmSettings`` in its module and registers it here under its name (the package
``strategies`` does so for every algorithm it finds); ``RunConfig`` holds the section of its
``algorithm``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from .config import RunConfig

Scalar = bool | int | float | str
SettingsT = TypeVar("SettingsT", bound="AlgorithmSettings")


@dataclass(frozen=True)
class Settings:
    """Typed settings: every field is a run-config key (its name with ``-`` for ``_``).

    Construction checks each value's type (an int is taken for a float) and then
    :meth:`validate`; a bad value is a ValueError naming the key, the value and the range.
    """

    def __post_init__(self) -> None:
        for f in self.setting_fields():
            value = getattr(self, f.name)
            if type_name(f) == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not _has_type(value, type_name(f)):
                raise ValueError(f"config key {config_key(f.name)!r} must be a {type_name(f)}, "
                                 f"got {value!r} ({type(value).__name__})")
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a value out of its range (the fields' types are checked)."""

    @classmethod
    def setting_fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        """The fields that are run-config keys (bool, int, float or str)."""
        return tuple(f for f in fields(cls) if type_name(f) in SCALAR_TYPES)

    def to_run_config(self) -> dict[str, Scalar]:
        """Flat kebab-case mapping, as in ``[tool.flwr.app.config]``."""
        return {config_key(f.name): getattr(self, f.name) for f in self.setting_fields()}

    def require_choices(self, choices: Mapping[str, Sequence[str]]) -> None:
        """Each named field's value is one of its choices."""
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"config key {config_key(name)!r} = {getattr(self, name)!r} "
                                 f"is not one of: {', '.join(valid)}")

    def require_ranges(self, ranges: Iterable[tuple[str, float, float | None, str]]) -> None:
        """Each ``(name, low, high, text)``: low <= value (<= high), finite; ``text`` says so."""
        for name, low, high, text in ranges:
            value = getattr(self, name)
            if not (value >= low and (high is None or value <= high)) or not math.isfinite(value):
                raise ValueError(f"config key {config_key(name)!r} must be {text}, got {value!r}")

    def require_positive(self, names: Iterable[str]) -> None:
        """Each named field's value is finite and > 0."""
        for name in names:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"config key {config_key(name)!r} must be > 0, got {value!r}")


@dataclass(frozen=True)
class AlgorithmSettings(Settings):
    """An algorithm's own settings, declared in its module (``strategies/<algorithm>.py``).

    A subclass adds typed fields (with a comment each: ``docs/configuration.md`` is made from
    them) and overrides :meth:`validate` and :meth:`check`; this base class, without fields, is
    the settings of an algorithm that has none. A key that two algorithms share (Mudag's and
    ADOM+'s ``smoothness``) has one type and one default.
    """

    native_only: ClassVar[tuple[str, ...]] = ()
    """Fields only the native apps read: an error in plug-in mode, whose app trains itself."""

    def check(self, config: RunConfig) -> None:
        """Raise ValueError for run settings these settings cannot work with."""

    @classmethod
    def of(cls: type[SettingsT], config: RunConfig) -> SettingsT:
        """``config``'s algorithm settings, which must be of this type."""
        settings = config.algorithm_settings
        if not isinstance(settings, cls):
            raise TypeError(f"algorithm {config.algorithm!r} has {type(settings).__name__}, "
                            f"not {cls.__name__}")
        return settings


_ALGORITHM_SETTINGS: dict[str, type[AlgorithmSettings]] = {}


def register_settings(algorithm: str, settings: type[AlgorithmSettings]) -> None:
    """Declare ``algorithm``'s settings type (the package ``strategies`` does, per algorithm).

    ValueError if ``algorithm`` has other settings already, or if a key it shares with another
    algorithm's settings has another type or default there.
    """
    known = _ALGORITHM_SETTINGS.get(algorithm, settings)
    if known is not settings:
        raise ValueError(f"algorithm {algorithm!r} already has settings {known.__name__}")
    for other_name, other in _ALGORITHM_SETTINGS.items():
        theirs = {f.name: (type_name(f), f.default) for f in other.setting_fields()}
        for f in settings.setting_fields():
            if theirs.get(f.name, (type_name(f), f.default)) != (type_name(f), f.default):
                raise ValueError(f"{settings.__name__}.{f.name} ({type_name(f)} = {f.default!r}) "
                                 f"differs from {other_name}'s {theirs[f.name]}: a key shared "
                                 f"by algorithms has one type and default; rename yours")
    _ALGORITHM_SETTINGS[algorithm] = settings


def registered_settings() -> Mapping[str, type[AlgorithmSettings]]:
    """Every algorithm's settings type, by algorithm name."""
    # the algorithms live above this layer and register themselves when their package is
    # imported (as plug-ins do through entry points); a config built first imports it
    importlib.import_module("strategies")
    return dict(_ALGORITHM_SETTINGS)


def settings_type(algorithm: str) -> type[AlgorithmSettings]:
    """The settings type of the registered ``algorithm``; ValueError lists the valid names."""
    registered = registered_settings()
    if algorithm not in registered:
        raise ValueError(f"config key 'algorithm' = {algorithm!r} is not one of: "
                         f"{', '.join(sorted(registered))}")
    return registered[algorithm]


def owners(field_name: str) -> list[str]:
    """The algorithms whose settings have the field ``field_name``."""
    return sorted(name for name, settings in registered_settings().items()
                  if field_name in {f.name for f in settings.setting_fields()})


def config_key(field_name: str) -> str:
    """The run-config key of a field: ``num_rounds`` -> ``num-rounds``."""
    return field_name.replace("_", "-")


def owned_by(field_name: str) -> str:
    """Which algorithms have the setting ``field_name`` ("... is unknown" if none)."""
    found = owners(field_name)
    return (f"{field_name} is a setting of {', '.join(found)}" if found
            else f"{field_name} is unknown")


SCALAR_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def type_name(field: dataclasses.Field[Any]) -> str:
    """A field's type as written (``"int"``), with or without ``from __future__ import
    annotations`` in the declaring module."""
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")


def _has_type(value: object, name: str) -> bool:
    return isinstance(value, SCALAR_TYPES[name]) and (name == "bool" or not isinstance(value, bool))
