"""The library's layers are folders, lowest first: a module's layer is read from its path
(``test_layers`` checks the imports against it, ``test_types`` type-checks the lower three
strictly)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATH, SETUP, ALGORITHMS, MESSAGES, NODE_SIDE, SERVER_SIDE, CLI = range(7)
FOLDERS = {
    "flwr_hyperprism/math": MATH,  # pure math: no Flower, no files
    "flwr_hyperprism/setup": SETUP,  # what a run is given: its settings and data
    "strategies": ALGORITHMS,  # one module per algorithm; strategies/base: what they share
    "flwr_hyperprism/messages": MESSAGES,  # the wire format both sides speak (first Flower)
    "flwr_hyperprism/client": NODE_SIDE,  # the ClientApp, the mod, the handler learner
    "flwr_hyperprism/orchestration": NODE_SIDE,  # the orchestrator's parts, one per concern
    "flwr_hyperprism/server": SERVER_SIDE,  # the Flower Strategy adapter, ServerApp, plug-in
    "simulations": CLI,  # experiments: runs, sweeps, benchmarks, plots
}
# The package's own __init__ is its public face: the math and settings (the Flower glue it
# names is imported on first use, by name, not by an import statement).
FACADE = "flwr_hyperprism"
# Folders of one layer that must not import each other: a node runs the client side only.
APART = ("flwr_hyperprism/client", "flwr_hyperprism/orchestration")


def modules() -> dict[str, Path]:
    """Every module of the library and the CLI: dotted name -> file."""
    found = {}
    for package in ("flwr_hyperprism", "strategies", "simulations"):
        for path in sorted((REPO / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found[dotted.removesuffix(".__init__")] = path
    return found


def folder_of(module: str) -> str | None:
    """The layer folder holding ``module`` (the deepest that matches), None for the facade."""
    path = module.replace(".", "/")
    matches = [f for f in FOLDERS if path == f or path.startswith(f + "/")]
    return max(matches, key=len) if matches else None


def layer(module: str) -> int | None:
    """The layer of a module of ours (None: not ours, or not in a layer folder)."""
    if module == FACADE:
        return SETUP
    folder = folder_of(module)
    return FOLDERS[folder] if folder is not None else None
