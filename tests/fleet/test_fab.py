"""The FAB that ``flwr build`` makes holds the app without its tests and installs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.fleet import BuiltApp, fab_short_hash
from tests.local_flower import offline_env, processes_with_home, run_flwr

APP_FILES = {"flwr_hyperprism/server/app.py", "flwr_hyperprism/client/app.py",
             "flwr_hyperprism/server/strategy.py"}


@pytest.mark.slow
def test_fab_leaves_out_tests_and_installs(tmp_path: Path, built_app: BuiltApp) -> None:
    """`flwr build` (on a copy: nothing is written into the repo), then `flwr install`."""
    home = tmp_path / "cli-home"
    env = offline_env(home)
    fab = built_app.fab
    names = set(zipfile.ZipFile(fab).namelist())
    assert {"pyproject.toml", ".info/CONTENT", *APP_FILES} <= names
    assert not [name for name in names if name.startswith("tests/")], sorted(names)

    run_flwr(["install", str(fab)], env, cwd=tmp_path, timeout=120)
    (installed,) = (home / "apps").iterdir()
    assert installed.name.endswith(f".{fab_short_hash(fab)}")
    assert not (installed / "tests").exists()
    # Flower's own loader finds both components in the installed copy.
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys; from flwr.supercore.object_ref import load_app\n"
         "for ref in sys.argv[2:]:\n"
         "    load_app(ref, RuntimeError, sys.argv[1])\n"
         "    print(sys.modules[ref.split(':')[0]].__file__)",
         str(installed), "flwr_hyperprism.server.app:app", "flwr_hyperprism.client.app:app"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert all(Path(line).is_relative_to(installed) for line in loaded.stdout.split()), \
        loaded.stdout
    assert processes_with_home(home) == []
