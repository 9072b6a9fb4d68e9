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
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flwr_hyperprism.math.degrees import P_SCHEDULES
from flwr_hyperprism.math.graphs import TOPOLOGIES
from flwr_hyperprism.math.hypernetwork import HN_INPUTS, P_SELECT_MODES, parse_candidates
from flwr_hyperprism.math.models import MODELS

from .data import DATASETS

ORDERS = ("atc", "cta")
UNMATCHED_STEPS = ("sgd", "idle")
P_MODES = ("hypernetwork", "fixed", "schedule", "tracking", "descent")
Scalar = bool | int | float | str


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run. Units: seconds for timeouts, fractions for accuracies."""

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
    # HyperPrism
    # how the degrees are chosen: 'descent' (per node, round and layer group: the degree whose
    # merge is predicted to lower the network's loss, estimated with a gradient tracker, most
    # within a trust region; p = 1 unless a larger one is predicted to help; docs/algorithms.md),
    # 'tracking' (per node: p starts at p-max and moves p-step per round against the tracked
    # d loss/d p), 'hypernetwork' (the paper's), 'fixed' (fixed-p for both layer groups) or
    # 'schedule' (p-schedule from p-max to p-min over p-horizon rounds, the same on every node)
    p_mode: str = "descent"
    fixed_p: float = 1.0  # p-mode fixed: the degree of both layer groups
    p_schedule: str = "step"  # step, linear, cosine or exponential (math/degrees.py)
    p_max: float = 15.0  # the largest degree (schedule start, tracking start, grid top)
    p_min: float = 1.0  # the smallest degree (1: plain averaging)
    p_horizon: int = 10  # rounds (the exponential's time constant)
    p_step: float = 1.0  # 'tracking': degrees p moves per round against the tracked d loss/d p
    # 'descent': how far a merge may depart from the linear merge, in local updates: the
    # trust region's radius is p-trust times lr times the tracked gradient
    p_trust: float = 1.0
    p_candidates: str = "1,3,5,7,9,11,13,15"  # the hypernetwork's degrees
    p_select: str = "soft"  # expectation over candidates; 'st' = argmax, straight-through
    hn_input: str = "gradient"  # embedding + gradient summary; 'embedding' = embedding only
    embedding_dim: int = 32  # the hypernetwork's node embedding v_i
    hn_hidden: int = 64  # the hypernetwork's hidden width
    hn_lr: float = 0.01  # the hypernetwork's SGD step size
    hn_p_init: float = 0.0  # 0: heads start near uniform (p ~ 8); else start p near this degree
    # SwarmSGD
    swarm_local_steps: int = 1  # H, local SGD steps before each pairwise average (paper: 1)
    swarm_unmatched: str = "sgd"  # what a node left out of the round's matching does: 'idle'
    # accelerated baselines (Mudag, ADOM+): L and mu of the local losses, kappa = L / mu = 10
    smoothness: float = 100.0  # L = 1 / lr
    strong_convexity: float = 10.0  # mu
    # Mudag's FastMix: K = ceil(factor * ln(kappa) / sqrt(1 - lambda2)) gossip steps, <= cap
    mudag_gossip_factor: float = 1.0  # c_K
    mudag_max_gossip: int = 20
    # faults: a neighbour with a |value| above this ratio times the reference scale (the larger of
    # the node's own largest |value| and the lower median over the node and its neighbours) is
    # dropped for the round (large p makes the power mean follow the largest magnitude)
    max_neighbour_ratio: float = 1000.0
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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not _has_type(value, str(f.type)):
                raise ValueError(f"config key {_key(f.name)!r} must be a {f.type}, "
                                 f"got {value!r} ({type(value).__name__})")
        self._validate()

    def _validate(self) -> None:
        # 'algorithm' is checked against the registry (strategies.algorithm_spec) where it is
        # used: the registered algorithms live above this module
        choices = {"dataset": DATASETS, "model": MODELS,
                   "topology": TOPOLOGIES, "p_mode": P_MODES, "p_select": P_SELECT_MODES,
                   "p_schedule": P_SCHEDULES,
                   "hn_input": HN_INPUTS, "order": ORDERS, "swarm_unmatched": UNMATCHED_STEPS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"config key {_key(name)!r} = {getattr(self, name)!r} is not "
                                 f"one of: {', '.join(valid)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"config key 'device' = {self.device!r} is not one of: auto, cpu, "
                             f"cuda, cuda:N (N a GPU index)")
        ranges = [
            ("num_nodes", 2, None, "an integer >= 2"), ("num_rounds", 1, None, "an integer >= 1"),
            ("min_partition_size", 1, None, "an integer >= 1"), ("eval_size", 0, None, ">= 0"),
            ("batch_size", 1, None, "an integer >= 1"), ("local_epochs", 1, None, ">= 1"),
            ("local_steps", 0, None, ">= 0"), ("momentum", 0.0, 1.0, "in [0, 1)"),
            ("embedding_dim", 1, None, ">= 1"), ("hn_hidden", 1, None, ">= 1"),
            ("fixed_p", 1.0, None, ">= 1"), ("mobility_speed", 0.0, None, ">= 0"),
            ("swarm_local_steps", 1, None, "an integer >= 1"),
            ("mudag_max_gossip", 1, None, "an integer >= 1"),
            ("target_accuracy", 0.0, 1.0, "in [0, 1]"),
            ("max_neighbour_ratio", 1.0, None, ">= 1 (and finite)"),
            ("max_staleness", 0, None, "an integer >= 0"),
            ("server_eval_every", 1, None, "an integer >= 1"),
            ("server_eval_nodes", 0, None, "an integer >= 0 (0: every node)"),
            ("validation_fraction", 0.0, 0.5, "in [0, 0.5]"),
            ("p_min", 1.0, None, ">= 1"), ("p_max", self.p_min, None, ">= p-min"),
            ("p_horizon", 1, None, "an integer >= 1"),
        ]
        for name, low, high, text in ranges:
            value = getattr(self, name)
            if not (value >= low and (high is None or value <= high)) or (
                    name == "momentum" and value == 1.0) or not math.isfinite(value):
                raise ValueError(f"config key {_key(name)!r} must be {text}, got {value!r}")
        for name in ("alpha", "lr", "hn_lr", "p_trust", "round_timeout", "node_wait_timeout",
                     "smoothness", "strong_convexity", "mudag_gossip_factor"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"config key {_key(name)!r} must be > 0, got {value!r}")
        if self.strong_convexity > self.smoothness:
            raise ValueError(f"config key 'strong-convexity' (mu = {self.strong_convexity!r}) "
                             f"must not exceed 'smoothness' (L = {self.smoothness!r}): the "
                             f"condition number L / mu is >= 1")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"config key 'density' must be in (0, 1], got {self.density!r}")
        if self.p_step <= 0 or not math.isfinite(self.p_step):
            raise ValueError(f"config key 'p-step' must be > 0, got {self.p_step!r}")
        if self.algorithm == "hyperprism" and self.p_mode in ("descent", "tracking") and \
                self.order != "atc":
            default = " (the default)" if self.p_mode == RunConfig.p_mode else ""
            raise ValueError(f"p-mode={self.p_mode!r}{default} needs order='atc': its gradient "
                             f"tracker takes the local update of the merged model; for "
                             f"order='cta' set p-mode to 'hypernetwork', 'fixed' or 'schedule'")
        candidates = parse_candidates(self.p_candidates)
        if self.hn_p_init != 0.0 and not min(candidates) <= self.hn_p_init <= max(candidates):
            raise ValueError(f"config key 'hn-p-init' must be 0 or within the p-candidates "
                             f"[{min(candidates)}, {max(candidates)}], got {self.hn_p_init!r}")

    @property
    def candidates(self) -> tuple[float, ...]:
        return parse_candidates(self.p_candidates)

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
        """Build from Flower's flat run config (kebab-case keys); unknown keys are an error."""
        known = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(known)}")
        settings: dict[str, Any] = {known[k]: v for k, v in run_config.items()}
        return cls(**settings)  # __post_init__ checks every value's type

    def to_run_config(self) -> dict[str, Scalar]:
        """Flat kebab-case mapping, as in ``[tool.flwr.app.config]``."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> RunConfig:
    """Merge YAML files (later wins) and ``key=value`` overrides over the defaults.

    YAML and override keys are the field names (``num_rounds``) or the Flower keys
    (``num-rounds``). Unknown keys and wrong types raise ValueError naming the key and its
    file; a malformed YAML or one that is not a mapping raises a one-line ValueError. Relative
    ``data_dir``, ``output_dir`` and ``state_dir`` are made absolute against the current
    directory, so the config also works for apps that run elsewhere (``flwr run`` installs
    them under FLWR_HOME).
    """
    layers = [(str(path), _read_yaml(path)) for path in paths]
    layers.append(("the overrides",
                   OmegaConf.from_dotlist([_normalise_override(o) for o in overrides])))
    valid = [f.name for f in fields(RunConfig)]
    merged = OmegaConf.structured(RunConfig)
    for source, layer in layers:
        unknown = sorted(set(layer) - set(valid))
        if unknown:
            raise ValueError(f"unknown config keys {unknown} in {source}; valid keys: "
                             f"{', '.join(valid)}")
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
    return RunConfig(**values)


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


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _has_type(value: object, type_name: str) -> bool:
    expected = {"bool": (bool,), "int": (int,), "float": (float,), "str": (str,)}[type_name]
    return isinstance(value, expected) and (type_name == "bool" or not isinstance(value, bool))
