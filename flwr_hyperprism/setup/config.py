"""Run configuration: one typed, validated record shared by Flower, YAML and the CLI.

``RunConfig`` field ``num_rounds`` is the Flower run-config key ``num-rounds`` (``_`` <-> ``-``).
Defaults are the paper's base setting (50 nodes, Dirichlet alpha 0.1, link density 0.5,
lr 0.01, batch 128, 100 rounds) on the offline ``synthetic`` dataset.

    python -m simulations.to_toml simulations/base.yaml dataset=mnist --toml run.toml
    flwr run . --run-config run.toml

writes the flat TOML that ``flwr run --run-config`` takes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flwr_hyperprism.math.graphs import TOPOLOGIES
from flwr_hyperprism.math.models import MODELS

from .data import DATASETS
from .settings import (
    SCALAR_TYPES,
    AlgorithmSettings,
    Scalar,
    Settings,
    config_key,
    owned_by,
    owners,
    registered_settings,
    settings_type,
    type_name,
)

ORDERS = ("atc", "cta")


@dataclass(frozen=True)
class RunConfig(Settings):
    """Every setting of a run: those all algorithms share, and ``algorithm_settings``, the
    algorithm's own. Units: seconds for timeouts, fractions for accuracies."""

    algorithm: str = "hyperprism"  # a module of strategies/: dpsgd, hyperprism, mudag, ...
    seed: int = 0  # seeds the data split, the graphs, the models and every node's batches
    num_nodes: int = 50  # partitions = SuperNodes expected before round 1
    num_rounds: int = 100  # communication rounds (T + 1 round-trips: the last only merges)
    # data and model
    dataset: str = "synthetic"  # synthetic (offline), mnist, fashion-mnist, cifar10
    data_dir: str = ""  # absolute path with torchvision's layout; unused by 'synthetic'
    download: bool = False  # let torchvision download the dataset into data-dir
    alpha: float = 0.1  # Dirichlet concentration of the label skew
    min_partition_size: int = 10  # Dirichlet draws are repeated until every node has this many
    model: str = "logreg"  # logreg, lenet, cnn
    eval_size: int = 0  # test samples each node is evaluated on per round; 0 = the whole test set
    # > 0: hold this share of the training set out (before partitioning) and evaluate the nodes
    # on it instead of the test set: for choosing settings without looking at test data
    validation_fraction: float = 0.0
    # where a node's model, batches, merges and hypernetwork live: 'auto' (CUDA when present),
    # 'cpu', 'cuda' or 'cuda:N'; node state and messages stay on the CPU
    device: str = "auto"
    # true: the partitions one process hosts (in-process: all) train and are evaluated as one
    # batch over their stacked parameters; false: node after node, each single-threaded (same
    # metrics up to float rounding; exactly the same across engines and group layouts)
    node_batching: bool = True
    # torch intra-op threads of a batched node group; 0: torch's default (the machine's cores
    # in-process, the actor's CPU share under Ray); metrics may differ in rounding with it
    node_threads: int = 0
    # local training (plain SGD, as in the paper)
    lr: float = 0.01  # local SGD step size
    batch_size: int = 128  # local minibatch size
    local_epochs: int = 1  # the paper does not say; one pass over the node's data per round
    local_steps: int = 0  # > 0: exactly this many minibatch steps per round instead of epochs
    momentum: float = 0.0  # local SGD momentum
    order: str = "atc"  # adapt then combine (Algorithm 1); 'cta': combine then adapt (Lian)
    # personal layers: comma-separated name patterns (fnmatch, e.g. 'classifier.*' or 'fc2.*')
    # of tensors a node keeps as its own: never merged, not in the (pseudo-)gradients
    local_layers: str = ""
    # communication graph
    topology: str = "erdos-renyi"  # erdos-renyi, mobility, ring or complete
    density: float = 0.5  # expected share of node pairs linked in a round's graph
    exact_edges: bool = False  # erdos-renyi: exactly round(density * m(m-1)/2) edges
    mobility_speed: float = 0.05  # unit-square lengths per round ('mobility' topology)
    # faults: a neighbour with a |value| above this ratio times the reference scale (the larger of
    # the node's own largest |value| and the lower median over the node and its neighbours) is
    # dropped for the round (large p makes the power mean follow the largest magnitude)
    max_neighbour_ratio: float = 1000.0
    # a native node's training has diverged (and is rolled back) when its mean training loss
    # exceeds this ratio times the larger of its first minibatch's loss and ln(classes), the
    # cross-entropy of a uniform guess (a train handler's loss has no known scale: unchecked)
    max_train_loss_ratio: float = 10.0
    # orchestration and outputs
    round_timeout: float = 600.0  # seconds a round-trip waits for replies (docs/fleet.md)
    node_wait_timeout: float = 300.0
    # a partition's model is no longer routed to its neighbours once it has missed more than
    # this many rounds (its node failed, was silent or left)
    max_staleness: int = 5
    # a Strategy.start evaluate_fn scores the nodes' models every this many rounds (and the
    # final ones), each of them or a fixed seeded sample of this many (0: all)
    server_eval_every: int = 1
    server_eval_nodes: int = 0
    output_dir: str = "runs"  # relative paths resolve against the ServerApp's working dir
    run_name: str = ""  # default: <algorithm>-<dataset>-seed<seed>-<UTC time>
    resume: bool = False  # continue the run <output-dir>/<run-name> from its last round-trip
    # where nodes checkpoint their state (absolute; shared by all nodes, e.g. in simulation);
    # a SuperNode's node config 'state-dir' takes precedence; '' and no node config: none
    state_dir: str = ""
    target_accuracy: float = 0.85  # summary.json reports the first round reaching it
    # the algorithm's own settings (``<algorithm>`` section of docs/configuration.md); not
    # given: the algorithm's defaults
    algorithm_settings: AlgorithmSettings = AlgorithmSettings()

    def __post_init__(self) -> None:
        if not isinstance(self.algorithm, str):
            raise ValueError(f"config key 'algorithm' must be a str, got {self.algorithm!r}")
        expected = settings_type(self.algorithm)
        given = self.algorithm_settings
        if type(given) is AlgorithmSettings:  # not given: the algorithm's defaults
            object.__setattr__(self, "algorithm_settings", expected())
        elif type(given) is not expected:
            raise ValueError(f"algorithm {self.algorithm!r} takes {expected.__name__}, not "
                             f"{type(given).__name__}")
        super().__post_init__()
        self.algorithm_settings.check(self)

    def validate(self) -> None:
        self.require_choices({"dataset": DATASETS, "model": MODELS, "topology": TOPOLOGIES,
                              "order": ORDERS})
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"config key 'device' = {self.device!r} is not one of: auto, cpu, "
                             f"cuda, cuda:N (N a GPU index)")
        self.require_ranges([
            ("num_nodes", 2, None, "an integer >= 2"), ("num_rounds", 1, None, "an integer >= 1"),
            ("min_partition_size", 1, None, "an integer >= 1"), ("eval_size", 0, None, ">= 0"),
            ("node_threads", 0, None, "an integer >= 0 (0: torch's default)"),
            ("batch_size", 1, None, "an integer >= 1"), ("local_epochs", 1, None, ">= 1"),
            ("local_steps", 0, None, ">= 0"), ("mobility_speed", 0.0, None, ">= 0"),
            ("target_accuracy", 0.0, 1.0, "in [0, 1]"),
            ("max_neighbour_ratio", 1.0, None, ">= 1 (and finite)"),
            ("max_train_loss_ratio", 1.0, None, ">= 1 (and finite)"),
            ("max_staleness", 0, None, "an integer >= 0"),
            ("server_eval_every", 1, None, "an integer >= 1"),
            ("server_eval_nodes", 0, None, "an integer >= 0 (0: every node)"),
            ("validation_fraction", 0.0, 0.5, "in [0, 0.5]"),
        ])
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"config key 'momentum' must be in [0, 1), got {self.momentum!r}")
        self.require_positive(("alpha", "lr", "round_timeout", "node_wait_timeout"))
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"config key 'density' must be in (0, 1], got {self.density!r}")

    @property
    def local_patterns(self) -> tuple[str, ...]:
        """The ``local-layers`` name patterns."""
        return tuple(p.strip() for p in self.local_layers.split(",") if p.strip())

    def is_local(self, name: str) -> bool:
        """Whether tensor ``name`` is a personal layer (``local-layers``)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.local_patterns)

    # --- conversions -------------------------------------------------------------------------

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Build from Flower's flat run config (kebab-case keys).

        Keys of the run and of ``algorithm``'s settings are used; another algorithm's key is
        taken at its default (``pyproject.toml`` lists every key) and warned about otherwise;
        an unknown key is an error.
        """
        algorithm = run_config.get("algorithm", cls.algorithm)
        if not isinstance(algorithm, str):
            raise ValueError(f"config key 'algorithm' must be a str, got {algorithm!r}")
        own_type = settings_type(algorithm)
        common = {config_key(f.name): f.name for f in cls.setting_fields()}
        own = {config_key(f.name): f.name for f in own_type.setting_fields()}
        defaults = flat_defaults()
        unknown = sorted(set(run_config) - set(defaults))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(defaults)}")
        for key in sorted(set(run_config) - set(common) - set(own)):
            if run_config[key] != defaults[key]:
                warnings.warn(f"config key {key!r} = {run_config[key]!r} is a setting of "
                              f"{', '.join(owners(key.replace('-', '_')))}, which "
                              f"algorithm={algorithm!r} does not read: it has no effect",
                              stacklevel=2)
        section = own_type(**{own[k]: v for k, v in run_config.items() if k in own})
        settings: dict[str, Any] = {common[k]: v for k, v in run_config.items() if k in common}
        return cls(**settings, algorithm_settings=section)

    def to_run_config(self) -> dict[str, Scalar]:
        """Flat kebab-case mapping of the run's and the algorithm's settings."""
        return {**super().to_run_config(), **self.algorithm_settings.to_run_config()}

    @classmethod
    def build(cls, algorithm: str = "hyperprism", **settings: Any) -> RunConfig:
        """A config of ``algorithm`` from field names: the run's and the algorithm's settings'
        (``RunConfig.build(num_nodes=4, p_mode="fixed")``); another algorithm's is an error."""
        common, own = _split(algorithm, settings)
        return cls(algorithm=algorithm, **common,
                   algorithm_settings=settings_type(algorithm)(**own))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes``: fields of the run or of its algorithm's settings. When
        ``algorithm`` changes, the new algorithm's settings keep the values of the keys it
        shares with the old one's (Mudag's and ADOM+'s ``smoothness``), defaults otherwise."""
        algorithm = changes.get("algorithm", self.algorithm)
        common, own = _split(algorithm, changes)
        section_type, kept = settings_type(algorithm), self.algorithm_settings
        shared = {f.name: getattr(kept, f.name) for f in section_type.setting_fields()
                  if f.name in {g.name for g in kept.setting_fields()}}
        return dataclasses.replace(self, **common,
                                   algorithm_settings=section_type(**{**shared, **own}))


def _split(algorithm: str, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``settings`` by field name: (the run's, ``algorithm``'s settings'); ValueError for any
    other."""
    common = {f.name for f in RunConfig.setting_fields()}
    own = {f.name for f in settings_type(algorithm).setting_fields()} - common
    foreign = sorted(set(settings) - common - own)
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: not settings of the run or of algorithm "
                         f"{algorithm!r} ({'; '.join(owned_by(name) for name in foreign)}); "
                         f"docs/configuration.md lists them all")
    return ({k: v for k, v in settings.items() if k in common},
            {k: v for k, v in settings.items() if k in own})


def flat_defaults() -> dict[str, Scalar]:
    """Every run-config key with its default: the run's, then each registered algorithm's
    (``[tool.flwr.app.config]`` in ``pyproject.toml`` holds exactly these)."""
    return {config_key(name): cast(Scalar, f.default) for name, f in _every_setting_field().items()}


def _every_setting_field() -> dict[str, dataclasses.Field[Any]]:
    found = {f.name: f for f in RunConfig.setting_fields()}
    for settings in registered_settings().values():
        found.update({f.name: f for f in settings.setting_fields()})
    return found


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of YAML files (later wins) and ``key=value`` overrides over the defaults
    (``load_settings``)."""
    return RunConfig.from_run_config({config_key(name): value for name, value
                                      in load_settings(paths, overrides).items()})


def load_settings(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()
                  ) -> dict[str, Any]:
    """Every setting (field name -> value): YAML files (later wins) and ``key=value``
    overrides merged over the defaults.

    YAML and override keys are the field names (``num_rounds``) or the Flower keys
    (``num-rounds``), of the run or of any algorithm's settings (as
    :meth:`RunConfig.from_run_config` takes them). Unknown keys and wrong types raise
    ValueError naming the key and its file; a malformed YAML or one that is not a mapping
    raises a one-line ValueError. Relative ``data_dir``, ``output_dir`` and ``state_dir`` are
    made absolute against the current directory, so the config also works for apps that run
    elsewhere (``flwr run`` installs them under FLWR_HOME).
    """
    layers = [(str(path), _read_yaml(path)) for path in paths]
    layers.append(("the overrides",
                   OmegaConf.from_dotlist([_normalise_override(o) for o in overrides])))
    every = _every_setting_field()
    schema = dataclasses.make_dataclass("EverySetting", [
        (name, SCALAR_TYPES[type_name(f)], dataclasses.field(default=f.default))
        for name, f in every.items()])
    merged = OmegaConf.structured(schema)
    for source, layer in layers:
        unknown = sorted(set(layer) - set(every))
        if unknown:
            raise ValueError(f"unknown config keys {unknown} in {source}; valid keys: "
                             f"{', '.join(every)}")
        try:  # one layer at a time, so that a wrong type names its file
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None)
            raise ValueError(f"invalid configuration in {source}: config key {key!r}: "
                             f"{str(err).splitlines()[0]}") from err
    values = cast(dict[str, Any], OmegaConf.to_container(merged))
    for key in ("data_dir", "output_dir", "state_dir"):
        if values[key]:
            values[key] = str(Path(values[key]).expanduser().resolve())
    return values


def _read_yaml(path: str | Path) -> DictConfig:
    """A YAML file's mapping with snake_case keys; one-line errors for unreadable files."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"{path}: {str(err).splitlines()[0]}") from None
    except OSError as err:  # OmegaConf's answer to a file holding one scalar
        if "Invalid loaded object type" not in str(err):
            raise
        layer = None
    if not isinstance(layer, DictConfig):
        kind = "list" if isinstance(layer, ListConfig) else "single value"
        raise ValueError(f"{path} must hold a mapping of config keys (key: value lines), "
                         f"not a {kind}")
    return OmegaConf.create({str(k).replace("-", "_"): v for k, v in layer.items()})


def _normalise_override(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep:
        raise ValueError(f"override {override!r} must look like key=value")
    return f"{key.strip().replace('-', '_')}={value}"
