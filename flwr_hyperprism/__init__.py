"""flwr-hyperprism: HyperPrism (NeurIPS 2024) decentralized learning as a Flower extension.

Layers, each importing only the ones before it: the math (``mirror``, ``graphs``, ``degrees``,
``hypernetwork``, ``models``, ``data``, ``config``, ``metrics``: PyTorch/NetworkX, no Flower) →
the node rules and orchestrators in the ``strategies`` package → the Flower glue (``server_app``,
``client_app``, ``plugin``, ``mod``) → the CLI (``simulations``).

For an existing Flower app (plug-in mode)::

    from flwr_hyperprism import decentralized_strategy, hyperprism_mod

The two are imported on first use, so ``import flwr_hyperprism`` stays free of Flower.
"""

from __future__ import annotations

import importlib
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
__version__ = "0.1.0"
