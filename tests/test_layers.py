"""Imports run one way: math -> node rules and plans -> Flower strategy -> Flower glue -> CLI.

Every module's own import statements (read from its source) may name only its layer or those
below it, so no chain of imports can go upward; Flower appears from the strategy layer on.
"""

from __future__ import annotations

import ast

import pytest

from tests.layers import CLI, LAYER, MATH, REPO, STRATEGY, source


def imported(module: str) -> set[str]:
    """The modules ``module``'s import statements name (relative ones resolved)."""
    package = module if source(module).name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source(module).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def layer_of(name: str) -> int | None:
    """The layer of an imported name (a module of ours, or something inside one)."""
    while name:
        if name in LAYER:
            return LAYER[name]
        if name.split(".")[0] == "simulations":
            return CLI
        name = name.rpartition(".")[0]
    return None


def test_every_module_of_the_library_has_a_layer():
    modules = {f"{p.parent.name}.{p.stem}".removesuffix(".__init__")
               for package in ("flwr_hyperprism", "strategies")
               for p in (REPO / package).glob("*.py")}
    assert modules == set(LAYER)


@pytest.mark.parametrize("module", sorted(LAYER))
def test_a_module_imports_nothing_from_a_layer_above_it(module):
    upward = {name for name in imported(module)
              if (layer_of(name) or MATH) > LAYER[module]}
    assert not upward, f"{module} (layer {LAYER[module]}) imports {sorted(upward)}"
    if LAYER[module] < STRATEGY:
        assert not {n for n in imported(module) if n == "flwr" or n.startswith("flwr.")}
