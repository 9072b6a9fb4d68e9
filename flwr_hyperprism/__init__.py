"""flwr-hyperprism: HyperPrism (NeurIPS 2024) decentralized learning as a Flower extension.

The core (this package) is pure PyTorch/NetworkX; Flower appears only in ``server_app`` and
``client_app`` and in the ``strategies`` package.
"""

from .config import RunConfig, load_config
from .graphs import TimeVaryingGraph, metropolis_hastings_weights
from .hypernetwork import HyperNetwork
from .mirror import inverse_sign_power, power_mean, sign_power

__all__ = [
    "HyperNetwork", "RunConfig", "TimeVaryingGraph", "inverse_sign_power", "load_config",
    "metropolis_hastings_weights", "power_mean", "sign_power",
]
__version__ = "0.1.0"
