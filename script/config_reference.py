"""Write ``docs/configuration.md`` from ``config.py``: every key, its default and the comments beside it.

    python script/config_reference.py            # writes docs/configuration.md
    python script/config_reference.py --check    # exit 1 when docs/configuration.md is out of date

The values come from ``config.default_config()`` and ``config.NAMED_CONFIGS``; the meaning of each key
comes from the comments in ``config.py``'s source, read with :mod:`ast` (where each key is) and
:mod:`tokenize` (where each comment is):

- the trailing comment on the line where the key's value ends, e.g. ``seed=2025,  # fixes ...``;
- the comment lines directly above the key (no blank line between), for the first key that starts on
  that line (``"setting2": {"setting": 2}`` below a comment: ``setting2``, not ``setting2.setting``);
- comment-only lines right after a trailing comment whose ``#`` or text starts in the same column as the
  trailing comment's, which continue it::

      image_size=None,  # None -> the data's slice size; ...
      #                   (episodes and EP1 inputs resized; ...)

A comment block followed by a blank line belongs to no key. The output depends on ``config.py`` alone, so
``--check`` (and ``tests/test_config_reference.py``) fail when a key, a default or a comment changes without
the reference being written again.
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from pathlib import Path
from typing import Any, Mapping, NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import config  # noqa: E402

CONFIG_SOURCE = REPO_ROOT / "config.py"
OUTPUT = REPO_ROOT / "docs" / "configuration.md"
COMMAND = "python script/config_reference.py"
#: the dotted key given to a ``**mapping`` entry of a dict literal (the registry's named configs)
UNPACKED = "**"


class _Comment(NamedTuple):
    """One ``#`` comment of the source: where its ``#`` and its text start, and whether code precedes it."""

    row: int
    col: int
    text_col: int
    text: str
    standalone: bool


class _Entry(NamedTuple):
    """One key of a dict literal or ``dict(...)`` call: dotted name, the lines of key and value, leaf or not."""

    key: str
    key_line: int
    end_line: int
    is_leaf: bool


def _source_comments(source: str) -> dict[int, _Comment]:
    """The comments of ``source`` by line number (1-based)."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row, col = token.start
        body = token.string[1:]
        text_col = col + 1 + len(body) - len(body.lstrip())
        comments[row] = _Comment(row, col, text_col, body.strip(), token.line[:col].strip() == "")
    return comments


def _items(node: ast.AST) -> list[tuple[str, ast.AST, ast.AST]] | None:
    """``(name, node that starts the entry, value)`` of a dict literal or ``dict(...)`` call, else None."""
    if isinstance(node, ast.Dict):
        items = []
        for key, value in zip(node.keys, node.values):
            if key is None:
                items.append((UNPACKED, value, value))
            elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                items.append((key.value, key, value))
        return items
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return [(kw.arg if kw.arg is not None else UNPACKED, kw if kw.arg is not None else kw.value, kw.value)
                for kw in node.keywords]
    return None


def _entries(node: ast.AST, prefix: str = "") -> list[_Entry]:
    """Every key of a (nested) dict literal, parents before their keys; an empty dict is a leaf."""
    entries = []
    for name, start, value in _items(node) or []:
        children = _items(value)
        entries.append(_Entry(prefix + name, start.lineno, value.end_lineno, not children))
        if children:
            entries += _entries(value, f"{prefix}{name}.")
    return entries


def _trailing_owner(entries: list[_Entry], row: int) -> _Entry | None:
    """The key a comment at the end of line ``row`` describes: the last leaf whose value ends there, else
    the last leaf whose key is there, else the last sub-dict whose key is there."""
    for candidates in ([e for e in entries if e.is_leaf and e.end_line == row],
                       [e for e in entries if e.is_leaf and e.key_line == row],
                       [e for e in entries if e.key_line == row]):
        if candidates:
            return candidates[-1]
    return None


def dict_comments(source: str, node: ast.AST) -> dict[str, str]:
    """The comments of each key of the dict literal (or ``dict(...)`` call) ``node`` of ``source``.

    Args:
        source: the module's source text.
        node: the dict literal or ``dict(...)`` call, parsed from ``source``.

    Returns:
        ``{dotted key: text}`` for every key, sub-dict keys included (``""`` when a key has no comment): the
        comment lines above the key, then its trailing comment and the lines that continue it, joined by
        spaces. ``**mapping`` entries are named :data:`UNPACKED` (with their parent's prefix).
    """
    comments = _source_comments(source)
    entries = _entries(node)
    above: dict[str, list[str]] = {e.key: [] for e in entries}
    trailing: dict[str, list[str]] = {e.key: [] for e in entries}
    continued: set[int] = set()
    for row, comment in sorted(comments.items()):
        owner = None if comment.standalone else _trailing_owner(entries, row)
        if owner is None:
            continue
        trailing[owner.key].append(comment.text)
        nxt = row + 1
        while nxt in comments and comments[nxt].standalone and (
                comments[nxt].col == comment.col or comments[nxt].text_col == comment.text_col):
            trailing[owner.key].append(comments[nxt].text)
            continued.add(nxt)
            nxt += 1
    first_on_line = {}
    for entry in entries:  # parents come first: `"a": {"b": 1}` after a comment line is described as "a"
        first_on_line.setdefault(entry.key_line, entry)
    for entry in first_on_line.values():
        row = entry.key_line - 1
        while row in comments and comments[row].standalone and row not in continued:
            above[entry.key].insert(0, comments[row].text)
            row -= 1
    return {e.key: " ".join(text for text in above[e.key] + trailing[e.key] if text) for e in entries}


def _returned_dict(function: ast.FunctionDef) -> ast.AST:
    for node in ast.walk(function):
        if isinstance(node, ast.Return) and _items(node.value) is not None:
            return node.value
    raise ValueError(f"{function.name} returns no dict literal or dict(...) call")


def config_comments(source: str, name: str) -> dict[str, str]:
    """:func:`dict_comments` of the dict that function ``name`` returns, or that variable ``name`` is assigned.

    Raises:
        ValueError: ``source`` defines no such function or module-level dict.
    """
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return dict_comments(source, _returned_dict(node))
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and _items(node.value) is not None:
            return dict_comments(source, node.value)
    raise ValueError(f"no function or dict named {name!r} in the source")


def key_descriptions(source: str | None = None) -> list[tuple[str, Any, str]]:
    """``(dotted key, default, description)`` for every key of ``config.default_config()``, in source order.

    Raises:
        ValueError: a sub-dict key carries a comment (it would not be shown: comment its keys instead).
    """
    source = CONFIG_SOURCE.read_text() if source is None else source
    comments = config_comments(source, "default_config")
    defaults = config.flatten_keys(config.default_config())
    groups = [key for key, text in comments.items() if text and key not in defaults]
    if groups:
        raise ValueError(f"config.py: the comment on the sub-dict key(s) {', '.join(groups)} is not shown in the "
                         "reference; put it on the keys inside")
    return [(key, value, comments.get(key, "")) for key, value in defaults.items()]


def named_config_descriptions(source: str | None = None) -> dict[str, Any]:
    """The named configs with their comments.

    Returns:
        ``{"registry": (comment, {name: settings})`` for the configs generated from the data-set registry,
        ``"named": [(name, description, [(dotted key, value, note)])]}`` for the others, in source order.
    """
    source = CONFIG_SOURCE.read_text() if source is None else source
    comments = config_comments(source, "NAMED_CONFIGS")
    literal = [key for key in comments if "." not in key and key != UNPACKED]
    registry = {name: values for name, values in config.NAMED_CONFIGS.items() if name not in literal}
    named = [(name, comments[name], [(key, value, comments.get(f"{name}.{key}", ""))
                                     for key, value in config.flatten_keys(config.NAMED_CONFIGS[name]).items()])
             for name in literal]
    return {"registry": (comments.get(UNPACKED, ""), registry), "named": named}


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``|`` escaped, and ``<`` before a letter so ``<dataset>`` is no tag."""
    out = []
    for i, char in enumerate(text):
        if char == "|":
            out.append("\\|")
        elif char == "<" and text[i + 1:i + 2].isalpha():
            out.append("\\<")
        else:
            out.append(char)
    return "".join(out)


def _value(value: Any) -> str:
    return f"`{_cell(repr(value))}`"


def _flat_settings(values: Mapping[str, Any]) -> str:
    return ", ".join(f"`{key}={_cell(repr(value))}`" for key, value in config.flatten_keys(values).items())


def reference_markdown() -> str:
    """The text of ``docs/configuration.md``, made from ``config.py`` alone (the same text on every machine)."""
    source = CONFIG_SOURCE.read_text()
    lines = [
        "# Configuration reference",
        "",
        f"Generated by `{COMMAND}` from `config.py` (its values and the comments beside each key); do not edit "
        "this file by hand: change `config.py` and run the command again. "
        f"`{COMMAND} --check` exits 1 when this file is out of date.",
        "",
        "Every key below can be set on the command line of `training.py` and `test.py` after `with`, sub-dict "
        "keys with a dot, values as Python literals: `python training.py with dataset=SABS "
        "model.dmap_mode=fixed optim.lr=0.01`. `script/evaluate_snapshots.py` takes the same words after `--`.",
        "",
        "## Keys",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{key}` | {_value(value)} | {_cell(text)} |" for key, value, text in key_descriptions(source)]
    named = named_config_descriptions(source)
    registry_comment, registry = named["registry"]
    lines += [
        "",
        "## Named configs",
        "",
        "A named config sets several keys at once: `python training.py with cpu dataset=SABS`. Named configs "
        "apply in the order given, then the `key=value` words, so a later word wins.",
        "",
        f"**{', '.join(f'`{name}`' for name in registry)}**: {_cell(registry_comment)}. Each sets the data set: "
        + "; ".join(f"`{name}`: {_flat_settings(values)}" for name, values in registry.items()) + ".",
    ]
    for name, description, settings in named["named"]:
        lines += ["", f"### `{name}`", "", _cell(description), "", "| key | value | note |", "|---|---|---|"]
        lines += [f"| `{key}` | {_value(value)} | {_cell(note)} |" for key, value, note in settings]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when {OUTPUT.relative_to(REPO_ROOT)} differs from the generated text")
    args = parser.parse_args(argv)
    text = reference_markdown()
    target = OUTPUT.relative_to(REPO_ROOT)
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{target} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
