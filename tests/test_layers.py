"""Imports run one way, and a module's path names its layer (``tests/layers.py``):
math -> setup -> algorithms -> messages -> node side | orchestration -> server side -> CLI.

Every module's own import statements (read from its source) may name only its layer or those
below it, so no chain of imports can go upward; Flower appears from the messages on, file I/O
not in the math, and the node side (what a SuperNode runs) imports nothing of the server side.
"""

from __future__ import annotations

import ast

import pytest

from tests.layers import APART, FACADE, MATH, MESSAGES, folder_of, layer, modules

MODULES = modules()
IO_MODULES = {"os", "pathlib", "io", "json", "yaml", "omegaconf", "shutil", "logging"}


def imported(module: str) -> set[str]:
    """The modules ``module``'s import statements name (relative ones resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def ours(name: str) -> str | None:
    """The module of ours an imported name belongs to (None: a third-party name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_lives_in_a_layer_folder():
    homeless = [m for m in MODULES if m != FACADE and folder_of(m) is None]
    assert not homeless, f"put {homeless} in one of the layer folders of tests/layers.py"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_nothing_from_a_layer_above_it(module):
    upward = {name for name in imported(module)
              if (target := ours(name)) is not None and layer(target) > layer(module)}
    assert not upward, f"{module} (layer {layer(module)}) imports {sorted(upward)}"
    if layer(module) < MESSAGES:
        assert not {n for n in imported(module) if n == "flwr" or n.startswith("flwr.")}
    if layer(module) == MATH:
        assert not {n.split(".")[0] for n in imported(module)} & IO_MODULES


@pytest.mark.parametrize("module", sorted(m for m in MODULES if folder_of(m) in APART))
def test_the_node_side_and_the_orchestrator_do_not_import_each_other(module):
    others = {ours(n) for n in imported(module) if ours(n) is not None} - {None}
    crossing = {m for m in others if folder_of(m) in APART and folder_of(m) != folder_of(module)}
    assert not crossing, f"{module} imports {sorted(crossing)}"
    if folder_of(module) == "flwr_hyperprism/client":
        assert not {n for n in imported(module) if n.startswith("flwr.serverapp")}
