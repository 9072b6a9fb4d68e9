"""The library's layers, lowest first: which module belongs to which (``test_layers`` checks
the imports against it, ``test_types`` type-checks the lower two strictly)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATH, RULES, STRATEGY, GLUE, CLI = range(5)
LAYERS = {
    MATH: ["flwr_hyperprism", "flwr_hyperprism.benchmark", "flwr_hyperprism.config",
           "flwr_hyperprism.data", "flwr_hyperprism.degrees", "flwr_hyperprism.graphs",
           "flwr_hyperprism.hypernetwork", "flwr_hyperprism.metrics", "flwr_hyperprism.mirror",
           "flwr_hyperprism.models"],
    RULES: ["strategies", "strategies.checkpoint", "strategies.learner", "strategies.node",
            "strategies.plan", "strategies.rule", "strategies.screening", "strategies.spec",
            "strategies.adom", "strategies.dpsgd", "strategies.hyperprism", "strategies.local",
            "strategies.mudag", "strategies.swarmsgd"],
    STRATEGY: ["strategies.decentralized", "strategies.protocol"],
    GLUE: ["flwr_hyperprism.client_app", "flwr_hyperprism.mod", "flwr_hyperprism.plugin",
           "flwr_hyperprism.server_app"],
}
LAYER = {module: layer for layer, modules in LAYERS.items() for module in modules}


def source(module: str) -> Path:
    path = REPO / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
