"""flwr_hyperprism.setup.settings: typed settings and the algorithms' settings registry."""

from __future__ import annotations

import dataclasses

import pytest

from flwr_hyperprism.setup.config import RunConfig
from flwr_hyperprism.setup.settings import (
    AlgorithmSettings,
    Settings,
    owned_by,
    owners,
    register_settings,
    settings_type,
)
from strategies.hyperprism import HyperPrismSettings
from strategies.mudag import MudagSettings


@dataclasses.dataclass(frozen=True)
class Example(Settings):
    rate: float = 0.5
    mode: str = "a"
    count: int = 2

    def validate(self) -> None:
        self.require_choices({"mode": ("a", "b")})
        self.require_ranges([("rate", 0.0, 1.0, "in [0, 1]")])
        self.require_positive(["count"])


def test_an_int_becomes_a_float_and_the_keys_are_kebab_case():
    example = Example(rate=1)
    assert isinstance(example.rate, float)
    assert example.to_run_config() == {"rate": 1.0, "mode": "a", "count": 2}


@pytest.mark.parametrize(("changes", "message"), [
    ({"count": 2.0}, "config key 'count' must be a int, got 2.0"),
    ({"count": True}, "config key 'count' must be a int, got True"),
    ({"mode": "c"}, "config key 'mode' = 'c' is not one of: a, b"),
    ({"rate": float("nan")}, "config key 'rate' must be in \\[0, 1\\], got nan"),
    ({"count": 0}, "config key 'count' must be > 0, got 0"),
])
def test_a_bad_value_names_the_key_the_value_and_what_is_valid(changes, message):
    with pytest.raises(ValueError, match=message):
        Example(**changes)


def test_of_gives_the_typed_section_and_refuses_another_algorithm_s():
    assert HyperPrismSettings.of(RunConfig()) == HyperPrismSettings()
    with pytest.raises(TypeError, match="algorithm 'mudag' has MudagSettings, not "
                                        "HyperPrismSettings"):
        HyperPrismSettings.of(RunConfig(algorithm="mudag"))


def test_every_algorithm_has_its_settings_and_keys_name_their_owners():
    assert settings_type("mudag") is MudagSettings
    assert settings_type("dpsgd") is AlgorithmSettings
    assert owners("smoothness") == ["adom", "mudag"]
    assert owned_by("p_max") == "p_max is a setting of hyperprism"
    assert owned_by("no_such_key") == "no_such_key is unknown"
    with pytest.raises(ValueError, match="'nope' is not one of: adom, dpsgd"):
        settings_type("nope")


def test_an_algorithm_has_one_settings_type():
    with pytest.raises(ValueError, match="algorithm 'mudag' already has settings MudagSettings"):
        register_settings("mudag", HyperPrismSettings)


def test_a_key_two_algorithms_share_has_one_default():
    @dataclasses.dataclass(frozen=True)
    class Clashing(AlgorithmSettings):
        smoothness: float = 1.0

    with pytest.raises(ValueError, match=r"Clashing.smoothness .*differs from adom's"):
        register_settings("clashing", Clashing)


def test_a_settings_class_from_a_module_without_postponed_annotations_has_its_fields():
    namespace: dict = {}
    exec("import dataclasses\n"  # a module without `from __future__ import annotations`
         "from flwr_hyperprism.setup.settings import AlgorithmSettings\n"
         "@dataclasses.dataclass(frozen=True)\n"
         "class Plain(AlgorithmSettings):\n"
         "    steps: int = 3\n", namespace)
    plain = namespace["Plain"]
    assert [f.name for f in plain.setting_fields()] == ["steps"]
    assert plain().to_run_config() == {"steps": 3}
    with pytest.raises(ValueError, match="config key 'steps' must be a int, got 'x'"):
        plain(steps="x")


def test_a_new_algorithm_keeps_the_settings_it_shares_with_the_old_one():
    mudag = RunConfig.build("mudag", smoothness=50.0, mudag_max_gossip=3)
    adom = mudag.replace(algorithm="adom")
    assert adom.algorithm_settings.to_run_config() == {"smoothness": 50.0,
                                                      "strong-convexity": 10.0}
    assert mudag.replace(algorithm="dpsgd").algorithm_settings == AlgorithmSettings()
