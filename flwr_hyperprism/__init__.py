"""flwr-hyperprism: HyperPrism (NeurIPS 2024) decentralized learning as a Flower extension.

Layers are folders, each importing only the ones before it: ``math/`` (pure math: no Flower,
no files) → ``setup/`` (settings and data) → the algorithms (the ``strategies`` package) →
``messages/`` (the wire format) → ``client/`` (what a node runs) and ``orchestration/`` (the
orchestrator's parts) → ``server/`` (the Flower Strategy, ServerApp, plug-in) → the CLI
(``simulations``).

For an existing Flower app (plug-in mode)::

    from flwr_hyperprism import decentralized_strategy, hyperprism_mod

The two are imported on first use, so ``import flwr_hyperprism`` stays free of Flower.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from .math.graphs import TimeVaryingGraph, metropolis_hastings_weights
from .math.hypernetwork import HyperNetwork
from .math.mirror import inverse_sign_power, power_mean, sign_power
from .setup.config import RunConfig, load_config

_FLOWER_GLUE = {"decentralized_strategy": "server.plugin", "hyperprism_mod": "client.mod"}


def __getattr__(name: str) -> Any:
    if name in _FLOWER_GLUE:
        return getattr(importlib.import_module(f".{_FLOWER_GLUE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HyperNetwork", "RunConfig", "TimeVaryingGraph", "decentralized_strategy", "hyperprism_mod",
    "inverse_sign_power", "load_config", "metropolis_hastings_weights", "power_mean",
    "sign_power",
]
# pyproject.toml holds the one version string (Flower reads it there, so it stays static);
# a source tree on sys.path without the package installed has no metadata to read it from
try:
    __version__ = importlib.metadata.version("flwr-hyperprism")
except importlib.metadata.PackageNotFoundError:
    __version__ = "unknown"
