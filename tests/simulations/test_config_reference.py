"""simulations.config_reference: docs/configuration.md is RunConfig's comments, up to date."""

from __future__ import annotations

from dataclasses import dataclass

from flwr_hyperprism.setup.settings import Settings
from simulations import config_reference


@dataclass(frozen=True)
class Example(Settings):
    """A config with every kind of comment the generator reads."""

    name: str = "x"  # what it is called
    # data
    # where the files are: an absolute path that every node can read, and when it is missing,
    # a clear error
    path: str = ""
    size: int = 3
    # faults: a value above | this ratio is dropped
    ratio: float = 10.0  # per round


@dataclass(frozen=True)
class Extended(Example):
    """A subclass: its own field and the inherited ones, each with its declaring class's
    comments."""

    extra: int = 1  # one more


def row_of(page: str, key: str) -> str:
    return next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))


def test_the_committed_reference_is_up_to_date():
    assert config_reference.REFERENCE.read_text() == config_reference.reference(), (
        "docs/configuration.md is out of date: run `python -m simulations.config_reference`")
    assert config_reference.main(["--check"]) == 0


def test_a_fields_comments_appear_in_its_row_under_its_section():
    sections = config_reference.config_sections(Example)
    assert [(s.title, [row.key for row in s.rows]) for s in sections] == [
        ("run", ["name"]), ("data", ["path", "size"]), ("faults", ["ratio"])]
    page = config_reference.render(sections, "Example.")
    assert row_of(page, "name") == "| `name` | str | `\"x\"` | what it is called |"
    assert ("where the files are: an absolute path that every node can read, and when it is "
            "missing, a clear error") in row_of(page, "path")
    assert row_of(page, "ratio").endswith("| a value above \\| this ratio is dropped; per round |")
    assert "\n## Data\n" in page and "\n## Faults\n" in page


def test_a_titled_section_holds_inherited_fields_with_their_own_comments():
    [section] = config_reference.config_sections(Extended, title="extended")
    assert section.title == "extended"
    described = {row.key: row.description for row in section.rows}
    assert list(described) == ["name", "path", "size", "ratio", "extra"]
    assert described["extra"] == "one more"
    assert described["path"].startswith("data where the files are")  # a heading is text here


def test_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n")
    monkeypatch.setattr(config_reference, "REFERENCE", stale)
    assert config_reference.main(["--check"]) == 1
    assert "is out of date" in capsys.readouterr().err
    assert stale.read_text() == "# Configuration reference\n"  # --check writes nothing
