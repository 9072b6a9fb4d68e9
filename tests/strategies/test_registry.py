"""The algorithm registry: every module's SPEC, found without a list to maintain."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import strategies
from flwr_hyperprism.setup.config import RunConfig
from strategies import ALGORITHMS, AlgorithmSpec, algorithm_spec


def test_every_module_that_declares_a_spec_is_registered_under_its_plans_name():
    declared = {}
    for module in pkgutil.iter_modules(strategies.__path__):
        spec = getattr(importlib.import_module(f"strategies.{module.name}"), "SPEC", None)
        if spec is not None:
            declared[module.name] = spec
    assert declared  # every module of the package but strategies/base is an algorithm
    assert {m.name for m in pkgutil.iter_modules(strategies.__path__) if not m.ispkg} \
        == set(declared)
    assert ALGORITHMS == {spec.name: spec for spec in declared.values()}
    assert all(isinstance(spec, AlgorithmSpec) for spec in ALGORITHMS.values())
    assert {spec.name for spec in ALGORITHMS.values()} == set(declared)  # module = name


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_spec_builds_its_plan_and_node_rules(name, tmp_path):
    config = RunConfig(algorithm=name, num_nodes=3, eval_size=100, output_dir=str(tmp_path))
    spec = algorithm_spec(name)
    plan = spec.plan(config)
    assert plan.algorithm == name and spec.display_name == plan.description
    rule = spec.make_rule(config, 2)
    assert rule.init_state().round == 0
    assert type(config.algorithm_settings) is spec.settings


def test_an_unknown_algorithm_is_an_error_listing_the_registered_ones():
    with pytest.raises(ValueError) as raised:
        algorithm_spec("fedavg")
    assert str(raised.value) == (f"config key 'algorithm' = 'fedavg' is not one of: "
                                 f"{', '.join(sorted(ALGORITHMS))}")


def test_an_algorithm_s_config_holds_its_own_settings_and_no_others():
    run_keys = {f.name for f in RunConfig.setting_fields()}
    for name, spec in ALGORITHMS.items():
        own = {f.name for f in spec.settings.setting_fields()}
        flat = {key.replace("-", "_") for key in RunConfig(algorithm=name).to_run_config()}
        assert flat == run_keys | own and not own & run_keys, name
    assert {f.name for f in ALGORITHMS["mudag"].settings.setting_fields()} >= {
        f.name for f in ALGORITHMS["adom"].settings.setting_fields()}  # L and mu, shared
