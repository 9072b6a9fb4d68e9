"""What an install gives users: the library's two packages and nothing of the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_only_the_library(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--quiet",
                    "--wheel-dir", str(tmp_path)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "flwr_hyperprism", "strategies", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "strategies/local.py" in names and "flwr_hyperprism/server/plugin.py" in names
    assert wheel.stat().st_size < 150_000, wheel.stat().st_size


def test_the_install_exposes_its_packages_and_not_the_repository(tmp_path):
    # from outside the repository, as a user's app would run: isolated (-I), because a Ray run
    # earlier in this test process puts the repository on PYTHONPATH
    probe = ("import importlib.util as u; "
             "print(*(u.find_spec(n) is not None for n in "
             "('flwr_hyperprism', 'strategies', 'tests', 'examples', 'simulations')))")
    found = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path,
                           capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert found == ["True", "True", "False", "False", "False"]
