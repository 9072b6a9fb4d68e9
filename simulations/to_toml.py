"""Merge YAML configs and overrides into the flat TOML that ``flwr run --run-config`` takes.

    python -m simulations.to_toml simulations/base.yaml dataset=mnist --toml run.toml
    flwr run . --run-config run.toml
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from flwr_hyperprism.setup.config import RunConfig, load_config


def to_toml(config: RunConfig) -> str:
    """The config as flat TOML for ``flwr run . --run-config FILE.toml``."""
    lines = []
    for key, value in config.to_run_config().items():
        text = ("true" if value else "false") if isinstance(value, bool) else (
            json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value))
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Merge YAML configs and overrides into the "
                                     "flat TOML run config that `flwr run --run-config` takes.")
    parser.add_argument("items", nargs="*", help="YAML files, then key=value overrides")
    parser.add_argument("--toml", type=Path, help="write here instead of printing")
    args = parser.parse_args(argv)
    paths = [i for i in args.items if "=" not in i]
    config = load_config(paths, [i for i in args.items if "=" in i])
    text = to_toml(config)
    if args.toml:
        args.toml.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
