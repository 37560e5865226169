"""script/config_reference.py: docs/configuration.md is the generated text, names every key and explains each."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from config import flatten_keys, default_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "script" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(reference) -> str:
    return reference.reference_markdown()


def table_rows(text: str, section: str) -> dict[str, str]:
    """``{key: meaning}`` of the table under the heading ``section`` (first and last columns)."""
    lines = text.splitlines()
    start = lines.index(section)
    rows = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[-1]
    return rows


def test_committed_reference_is_the_generated_text(reference, generated):
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generated, "docs/configuration.md is out of date: run python script/config_reference.py"


def test_reference_names_exactly_the_config_keys(generated):
    documented = set(table_rows(generated, "## Keys"))
    keys = set(flatten_keys(default_config()))
    assert sorted(keys - documented) == [], "keys of default_config() missing from the reference"
    assert sorted(documented - keys) == [], "keys in the reference that default_config() does not have"


def test_every_key_and_named_config_is_described(reference, generated):
    empty = [key for key, _, text in reference.key_descriptions() if not text.strip()]
    assert empty == [], f"add a comment to these keys in config.py: {empty}"
    assert all(meaning for meaning in table_rows(generated, "## Keys").values())
    named = reference.named_config_descriptions()
    assert named["registry"][0] and named["registry"][1]
    assert [name for name, description, _ in named["named"] if not description.strip()] == []


def test_defaults_are_shown_as_python_literals(reference):
    rows = {key: value for key, value, _ in reference.key_descriptions()}
    assert rows == flatten_keys(default_config())
    for key, value in rows.items():
        assert ast.literal_eval(repr(value)) == value, key


SOURCE = '''
def default_config():
    return dict(
        a=1,  # trailing
        # above b,
        # on two lines
        b=2,
        c=None,  # starts here
        #          and goes on
        d={"e": 1,  # e's own
           # above f
           "f": [1,
                 2],  # after f's value
           "g": 3},
        # a note for a group of keys

        h=4,
        i=5,  # i, whose # lines up
              # with this one
        # above j, not i's
        j="#",
    )


NAMED = {
    # about x
    "x": {"y": 1},  # about y
}
'''


def test_comment_extraction_patterns(reference):
    comments = reference.config_comments(SOURCE, "default_config")
    assert comments == {
        "a": "trailing",
        "b": "above b, on two lines",
        "c": "starts here and goes on",
        "d": "",
        "d.e": "e's own",
        "d.f": "above f after f's value",
        "d.g": "",
        "h": "",  # a comment block followed by a blank line describes no key
        "i": "i, whose # lines up with this one",
        "j": "above j, not i's",
    }
    assert reference.config_comments(SOURCE, "NAMED") == {"x": "about x", "x.y": "about y"}
    with pytest.raises(ValueError, match="nothing"):
        reference.config_comments(SOURCE, "nothing")


def test_check_reports_an_outdated_file_in_one_line(reference, generated, tmp_path, monkeypatch, capsys):
    target = tmp_path / "configuration.md"
    monkeypatch.setattr(reference, "OUTPUT", target)
    monkeypatch.setattr(reference, "REPO_ROOT", tmp_path)
    assert reference.main(["--check"]) == 1  # missing
    target.write_text(generated.replace("`2025`", "`2026`"))
    assert reference.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "configuration.md is out of date: run python script/config_reference.py" in err
    assert reference.main([]) == 0 and target.read_text() == generated
    assert reference.main(["--check"]) == 0
