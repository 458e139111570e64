"""docs/configuration.md cannot drift from the configs: its tables of NPD's fields are generated from the docstrings.

The docstrings (TRL's style: `> Parameters that control ...` sections, one `name (`type`, *optional*, defaults to
`value`):` entry per field) are the one source of each field's text; `python -m trl_npd.config_doc` renders them into
the page's generated blocks. These tests fail when a field has no docstring entry, when an entry documents a field
that does not exist or shows another default than the dataclass's, when the page's blocks are not what the
docstrings render now (field text included), or when the hand-written table of GKD's fields names a field that does
not exist, that NPD redefines, or a default that is not the dataclass's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import pytest

from trl_npd import NearPolicyDistillConfig, NPDDistillationConfig
from trl_npd.config_doc import CONFIGURATION_PAGE, Entry, docstring_entries, marker, regenerate

CONFIGS = [NearPolicyDistillConfig, NPDDistillationConfig]
GKD_TABLE = "## GKD fields"  # the page's hand-written table of inherited fields, as NPD reads them


def page() -> str:
    return CONFIGURATION_PAGE.read_text(encoding="utf-8")


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field) -> object:
    assert f.default_factory is dataclasses.MISSING, f"{f.name}: a default_factory default cannot be documented"
    return f.default


def literal(text: str, where: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pytest.fail(f"{where}: the default {text!r} is not a Python literal")


def documented(cls: type) -> dict[str, str]:
    """{field: default as written} of `cls`'s docstring; a field with two entries fails."""
    defaults: dict[str, str] = {}
    entry: Entry
    for entry in docstring_entries(cls):
        for name, default in zip(entry.names, entry.defaults, strict=True):
            assert name not in defaults, f"{cls.__name__}: {name} has two docstring entries"
            defaults[name] = default
    return defaults


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_the_config_declares_has_one_docstring_entry(cls):
    declared = set(inspect.get_annotations(cls)) & set(fields_of(cls))  # dataclass fields, not ClassVars
    missing = declared - set(documented(cls))
    assert not missing, f"fields of {cls.__name__} without a docstring entry: {sorted(missing)}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_the_docstring_documents_only_fields_that_exist_with_their_real_defaults(cls):
    fields = fields_of(cls)
    for name, default in documented(cls).items():
        assert name in fields, f"the docstring documents {name}, which {cls.__name__} does not have"
        shown = literal(default, f"{cls.__name__} docstring, {name}")
        assert shown == default_of(fields[name]), (
            f"{cls.__name__} docstring: {name} defaults to {shown!r}, the dataclass to {default_of(fields[name])!r}"
        )


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_entry_has_a_description(cls):
    empty = [entry.names for entry in docstring_entries(cls) if not entry.text]
    assert not empty, f"{cls.__name__} docstring entries without text: {empty}"


def test_docs_configuration_is_what_the_docstrings_generate():
    current = page()
    for cls in CONFIGS:
        assert marker(cls.__name__, "start") in current, f"docs/configuration.md has no block for {cls.__name__}"
    assert regenerate(current) == current, (
        "docs/configuration.md differs from the configs' docstrings: edit the docstring, then run "
        "`python -m trl_npd.config_doc` to regenerate the page"
    )


def test_a_changed_docstring_makes_the_page_stale(monkeypatch):
    """The comparison above sees a field's text, not only its name and default."""
    original = docstring_entries

    def edited(cls: type) -> list[Entry]:
        entries = original(cls)
        first = entries[0]
        return [Entry(first.section, first.names, first.types, first.defaults, first.text + " Edited."), *entries[1:]]

    monkeypatch.setattr("trl_npd.config_doc.docstring_entries", edited)
    assert regenerate(page()) != page()


def gkd_table_rows() -> list[tuple[list[str], str]]:
    """(fields, default cell) of every row of the hand-written GKD table."""
    text = page()
    table = text[text.index(GKD_TABLE) :]
    table = table[: table.index("\n## ", 1)]
    rows = []
    for line in table.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert re.fullmatch(r"`\w+`(, `\w+`)*", cells[0]), f"unreadable field cell: {line!r}"
            rows.append((re.findall(r"`(\w+)`", cells[0]), cells[1]))
    assert rows, "docs/configuration.md has no GKD table"
    return rows


def test_the_gkd_table_names_inherited_fields_with_their_defaults():
    fields, own = fields_of(NearPolicyDistillConfig), set(inspect.get_annotations(NearPolicyDistillConfig))
    for names, cell in gkd_table_rows():
        value = literal(cell.split("→")[0].replace("`", "").strip(), f"GKD table, {names}")
        values = value if len(names) > 1 else (value,)
        for name, shown in zip(names, values, strict=True):
            assert name in fields, f"the GKD table lists {name}, which NearPolicyDistillConfig does not have"
            assert name not in own, f"{name} is redefined by NPD: its text belongs in the docstring, not the table"
            assert shown == default_of(fields[name]), f"GKD table: {name} shows {shown!r}, not its default"
