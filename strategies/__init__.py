"""Decentralized strategies: one module per algorithm (orchestration + node rule + ``SPEC``).

``ALGORITHMS`` is the registry: every module of this package that declares ``SPEC`` (an
``AlgorithmSpec``) is an algorithm, under its plan's name. Adding an algorithm is adding
a module; the apps, plug-in mode, the sweeps and the test battery read the registry. Importing
the package and its algorithms needs no Flower: the Flower strategy is
``flwr_hyperprism.server.strategy``.
"""

import importlib
import pkgutil

from flwr_hyperprism.setup.settings import register_settings

from .base.rule import NodeRule, NodeState, NodeTask
from .base.spec import AlgorithmSpec


def _discover() -> dict[str, AlgorithmSpec]:
    specs = {}
    # the machinery the algorithms share is the subpackage ``base``; every module is an algorithm
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg):
        spec = getattr(importlib.import_module(f"{__name__}.{module}"), "SPEC", None)
        if not isinstance(spec, AlgorithmSpec):
            raise TypeError(f"strategies/{module}.py is neither shared machinery nor an "
                            f"algorithm: it declares no SPEC = AlgorithmSpec(...)")
        specs[spec.name] = spec
        register_settings(spec.name, spec.settings)
    return specs


ALGORITHMS: dict[str, AlgorithmSpec] = _discover()


def register(spec: AlgorithmSpec) -> None:
    """Add an algorithm declared outside this package (e.g. in the user's own project) to
    ``ALGORITHMS``; a ValueError if its name is taken."""
    if spec.name in ALGORITHMS and ALGORITHMS[spec.name] is not spec:
        raise ValueError(f"an algorithm named {spec.name!r} is already registered "
                         f"({ALGORITHMS[spec.name].plan.__module__}); rename yours")
    register_settings(spec.name, spec.settings)
    ALGORITHMS[spec.name] = spec


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The registered algorithm ``name``; a ValueError lists the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"config key 'algorithm' = {name!r} is not one of: "
                         f"{', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


__all__ = [
    "ALGORITHMS", "AlgorithmSpec", "NodeRule", "NodeState", "NodeTask", "algorithm_spec",
    "register",
]
