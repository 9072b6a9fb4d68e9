"""Tests of the run configuration (RunConfig, load_config, to_toml)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from flwr_hyperprism.setup.config import RunConfig, flat_defaults, load_config
from flwr_hyperprism.setup.settings import AlgorithmSettings, owners
from simulations.to_toml import to_toml

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def flower_table() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def non_default() -> RunConfig:
    """A config that differs from the defaults in every type of field."""
    return RunConfig.build(seed=7, num_nodes=12, dataset="mnist", data_dir="/data/x",
                           download=True, alpha=0.5, lr=0.05, topology="mobility",
                           exact_edges=True, p_candidates="1,9", p_select="st",
                           hn_input="embedding", run_name="r1")


def make(**settings) -> RunConfig:
    """A config with ``settings``: fields of the run or of the algorithm that has them."""
    algorithm = next((owners(key)[0] for key in settings if owners(key)), "hyperprism")
    return RunConfig.build(algorithm, **settings)


# --- defaults and Flower's run config --------------------------------------------------------


def test_defaults_equal_the_pyproject_run_config_table():
    table, defaults = flower_table(), flat_defaults()

    assert defaults == table
    assert {k: type(v) for k, v in defaults.items()} == {k: type(v) for k, v in table.items()}


def test_from_run_config_accepts_the_pyproject_table():
    assert RunConfig.from_run_config(flower_table()) == RunConfig()


@pytest.mark.parametrize("config", (RunConfig(), non_default()), ids=("defaults", "changed"))
def test_run_config_round_trip(config):
    flat = config.to_run_config()

    assert all("_" not in key for key in flat)
    assert flat["num-nodes"] == config.num_nodes
    assert RunConfig.from_run_config(flat) == config


def test_from_run_config_takes_a_partial_mapping():
    config = RunConfig.from_run_config({"num-rounds": 3, "p-mode": "fixed", "fixed-p": 9})

    settings = config.algorithm_settings
    assert (config.num_rounds, settings.p_mode, settings.fixed_p) == (3, "fixed", 9.0)
    assert config.replace(num_rounds=100, p_mode="descent", fixed_p=1.0) == RunConfig()


def test_a_config_carries_only_its_algorithm_s_settings():
    mudag = RunConfig.from_run_config({"algorithm": "mudag", "mudag-max-gossip": 3})

    assert mudag.algorithm_settings.mudag_max_gossip == 3
    assert "mudag-max-gossip" in mudag.to_run_config()
    assert "p-mode" not in mudag.to_run_config() and "p-mode" in RunConfig().to_run_config()
    assert mudag.replace(algorithm="dpsgd").algorithm_settings == AlgorithmSettings()


def test_another_algorithm_s_key_warns_unless_it_has_its_default():
    table = flower_table()  # every algorithm's keys, at their defaults
    assert RunConfig.from_run_config({**table, "algorithm": "dpsgd"}) == RunConfig(
        algorithm="dpsgd")

    with pytest.warns(UserWarning, match=r"'swarm-local-steps' = 4 is a setting of swarmsgd, "
                                         r"which algorithm='dpsgd' does not read"):
        RunConfig.from_run_config({"algorithm": "dpsgd", "swarm-local-steps": 4})


def test_replace_rejects_another_algorithm_s_setting():
    with pytest.raises(ValueError, match=r"p_mode: not settings of the run or of algorithm "
                                         r"'dpsgd' \(p_mode is a setting of hyperprism\)"):
        RunConfig(algorithm="dpsgd").replace(p_mode="fixed")


def test_settings_of_the_wrong_type_for_the_algorithm_are_an_error():
    with pytest.raises(ValueError, match="algorithm 'dpsgd' takes AlgorithmSettings, not "
                                         "HyperPrismSettings"):
        RunConfig(algorithm="dpsgd", algorithm_settings=RunConfig().algorithm_settings)


def test_unknown_run_config_key_lists_the_valid_keys():
    with pytest.raises(ValueError) as info:
        RunConfig.from_run_config({"num-rounds": 3, "num_rounds": 3, "learning-rate": 0.1})

    message = str(info.value)
    assert "learning-rate" in message and "'num_rounds'" in message  # snake case is unknown here
    assert all(key in message for key in flower_table())


# --- types -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ("lr", "alpha", "density", "fixed_p", "round_timeout"))
def test_int_is_accepted_for_a_float_key(key):
    config = make(**{key: 1})
    value = getattr(config.algorithm_settings if owners(key) else config, key)

    assert value == 1.0 and type(value) is float


WRONG_TYPES = {
    "num_nodes": ["5", 5.0, True],
    "seed": [1.5, False],
    "lr": ["0.1", True],
    "download": ["true", 1],
    "dataset": [3],
    "p_candidates": [(1, 3)],
}


@pytest.mark.parametrize(("key", "value"),
                         [(k, v) for k, values in WRONG_TYPES.items() for v in values])
def test_wrong_types_are_rejected(key, value):
    with pytest.raises(ValueError, match=re.escape(key.replace("_", "-"))):
        make(**{key: value})


# --- validation ----------------------------------------------------------------------------

_FLOAT_KEYS = {name.replace("-", "_") for name, value in flat_defaults().items()
               if isinstance(value, float)}

BAD_VALUES = [
    ("density", 0), ("density", 1.5), ("alpha", 0), ("alpha", float("inf")), ("num_nodes", 1),
    ("num_rounds", 0), ("lr", 0), ("hn_lr", -0.1), ("batch_size", 0), ("momentum", 1.0),
    ("fixed_p", 0.5), ("target_accuracy", 1.5), ("local_steps", -1),
    ("dataset", "imagenet"), ("model", "resnet"), ("topology", "star"), ("p_mode", "learned"),
    ("p_select", "argmax"), ("hn_input", "gradients"),
    ("p_candidates", "0.5,3"), ("p_candidates", ""), ("mudag_max_gossip", 0),
    ("mudag_gossip_factor", 0.0), ("strong_convexity", 200.0), ("max_staleness", -1),
    ("p_step", 0.0), ("p_step", float("nan")), ("p_trust", 0.0), ("p_trust", float("inf")),
    ("validation_fraction", -0.1), ("validation_fraction", 0.9),
]


def test_the_learned_degrees_need_the_adapt_then_combine_order():
    with pytest.raises(ValueError,
                       match=r"p-mode='descent' \(the default\) needs order='atc'.*set p-mode"):
        RunConfig(order="cta")
    with pytest.raises(ValueError, match=r"p-mode='tracking' needs order='atc'"):
        RunConfig.build(p_mode="tracking", order="cta")


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_validation_error_names_the_key_and_the_bad_value(key, value):
    with pytest.raises(ValueError) as info:
        make(**{key: value})

    message = str(info.value)
    assert key.replace("_", "-") in message or key in message
    shown = float(value) if isinstance(value, int) and key in _FLOAT_KEYS else value
    assert repr(shown) in message


# --- YAML files and overrides --------------------------------------------------------------


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path: load_config makes relative directories absolute against it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path.resolve()


def test_load_config_without_files_gives_defaults_with_absolute_output_dir(in_tmp_dir):
    assert load_config() == RunConfig(output_dir=str(in_tmp_dir / "runs"))


def test_load_config_resolves_relative_directories(in_tmp_dir):
    config = load_config(overrides=["data-dir=data", "output_dir=out/../results"])

    assert config.data_dir == str(in_tmp_dir / "data")
    assert config.output_dir == str(in_tmp_dir / "results")
    assert load_config(overrides=["data-dir=/abs/path"]).data_dir == "/abs/path"


def test_load_config_from_yaml_with_both_key_spellings(in_tmp_dir):
    path = write_yaml(in_tmp_dir, "num-nodes: 7\nnum_rounds: 3\nlr: 1\ndataset: mnist\n"
                                  "p-candidates: 1,3,5\nexact-edges: true\noutput-dir: /o\n")

    config = load_config([path])

    assert config == RunConfig.build(num_nodes=7, num_rounds=3, lr=1.0, dataset="mnist",
                                     p_candidates="1,3,5", exact_edges=True, output_dir="/o")
    assert type(config.lr) is float


def test_later_files_and_overrides_win(tmp_path):
    first = write_yaml(tmp_path, "num-nodes: 7\nseed: 1\nalpha: 0.2\n", "a.yaml")
    second = write_yaml(tmp_path, "seed: 2\n", "b.yaml")

    config = load_config([first, second], ["alpha=0.3", "p-candidates=1,9", "run_name=x=y"])

    assert (config.num_nodes, config.seed, config.alpha) == (7, 2, 0.3)
    assert config.algorithm_settings.candidates == (1.0, 9.0) and config.run_name == "x=y"


@pytest.mark.parametrize("override", ("num-rounds=5", "num_rounds=5", " num-rounds =5"))
def test_override_key_spellings(override):
    assert load_config(overrides=[override]).num_rounds == 5


@pytest.mark.parametrize(("yaml_text", "overrides", "key"), [
    ("bogus-key: 1\n", [], "bogus_key"),
    ("", ["bogus=1"], "bogus"),
    ("seed: 1.5\n", [], "seed"),
    ("", ["num-nodes=abc"], "num_nodes"),
    ("", ["density=0"], "density"),
    ("", ["dataset=imagenet"], "dataset"),
])
def test_load_config_errors_name_the_key(tmp_path, yaml_text, overrides, key):
    with pytest.raises(ValueError) as info:
        load_config([write_yaml(tmp_path, yaml_text)], overrides)

    assert key in str(info.value) or key.replace("_", "-") in str(info.value)


def test_a_wrong_type_names_the_file_it_comes_from(tmp_path):
    good = write_yaml(tmp_path, "seed: 3\n", "good.yaml")
    bad = write_yaml(tmp_path, "num-rounds: many\n", "bad.yaml")
    with pytest.raises(ValueError, match=rf"in {re.escape(str(bad))}: config key 'num_rounds'"):
        load_config([good, bad])
    with pytest.raises(ValueError, match=r"in the overrides: config key 'lr'"):
        load_config([good], ["lr=fast"])


@pytest.mark.parametrize(("text", "message"), [
    ("lr: [1\n", r"bad.yaml is not valid YAML \(line 2, column 1\): did not find expected"),
    ("lr: 0.1\nlr: 0.2\n", r"bad.yaml is not valid YAML \(line 2, column 1\): found duplicate"),
    ("- 1\n- 2\n", r"bad.yaml must hold a mapping of config keys .*not a list"),
    ("3\n", r"bad.yaml must hold a mapping of config keys .*not a single value"),
])
def test_unreadable_yaml_gets_one_line_naming_the_file(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as info:
        load_config([write_yaml(tmp_path, text, "bad.yaml")])
    assert "\n" not in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize(("yaml_text", "overrides", "source"), [
    ("num-rounds: 3\nbogus-key: 1\n", [], "run.yaml"),
    ("", ["num-rounds=3", "nope=1"], "the overrides"),
])
def test_unknown_keys_name_their_source_and_list_the_valid_keys(tmp_path, yaml_text, overrides,
                                                                 source):
    with pytest.raises(ValueError, match=rf"unknown config keys \['\w+'\] in .*{source}; "
                                         rf"valid keys: algorithm, seed, .*target_accuracy"):
        load_config([write_yaml(tmp_path, yaml_text)], overrides)


def test_override_without_equals_is_rejected():
    with pytest.raises(ValueError, match="key=value"):
        load_config(overrides=["num-rounds"])


# --- TOML output ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", (
    RunConfig(), non_default(), RunConfig(lr=1e-5, round_timeout=1e20, momentum=0.9),
    RunConfig(data_dir='C:\\data\\"quoted"', run_name="tab\tand newline\n"),
    RunConfig(data_dir="/data/é/ü", run_name="run-😀"),
), ids=("defaults", "changed", "float-formats", "escapes", "non-ascii"))
def test_to_toml_parses_back_to_the_run_config(config):
    assert tomllib.loads(to_toml(config)) == config.to_run_config()
