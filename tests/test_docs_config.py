"""docs/configuration.md and `NearPolicyDistillConfig`'s docstring describe the same fields, with the same defaults.

The docstring (TRL's style: `> Parameters that control ...` sections, one `name (`type`, *optional*, defaults to
`value`):` entry per field) is the source of each field's text; docs/configuration.md repeats it in tables, one
`| `field` | default | meaning |` row per field, under the same section headings. These tests fail when the two
drift apart: a field of the config without a docstring entry, a docstring entry missing from the page, a row for a
field that does not exist, a field filed under another section, or a default that is not the dataclass's.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re

import pytest

from trl_npd import NearPolicyDistillConfig

DOCS_CONFIGURATION = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md"
)
SECTION = re.compile(r"^> (Parameters that control .+?)\s*$")
# `name (`type` [or `type`], *optional*, defaults to `value`)`; an entry may list several fields, comma-separated
ENTRY_FIELD_PATTERN = r"(\w+) \(`[^`]+`(?: or `[^`]+`)*, \*optional\*, defaults to `([^`]*)`\)"
ENTRY_FIELD = re.compile(ENTRY_FIELD_PATTERN)
ENTRY_LINE = re.compile(rf"{ENTRY_FIELD_PATTERN}(?:, {ENTRY_FIELD_PATTERN})*:")
GKD_SECTION = "GKD fields"  # the page's table of inherited fields, as NPD reads them


def npd_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(NearPolicyDistillConfig)}


def own_field_names() -> set[str]:
    """Fields `NearPolicyDistillConfig` declares itself: new ones, and GKD's that it redefines (`bf16`, ...)."""
    return set(inspect.get_annotations(NearPolicyDistillConfig))


def default_of(f: dataclasses.Field) -> object:
    assert f.default_factory is dataclasses.MISSING, f"{f.name}: a default_factory default cannot be documented"
    return f.default


def literal(text: str, where: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pytest.fail(f"{where}: the default {text!r} is not a Python literal")


def docstring_entries() -> dict[str, tuple[str, str]]:
    """{field: (section, default as written)} from the docstring's `> Parameters that control ...` sections."""
    entries: dict[str, tuple[str, str]] = {}
    section = None
    for line in inspect.getdoc(NearPolicyDistillConfig).splitlines():
        if match := SECTION.match(line):
            section = match.group(1)
            continue
        if section is None or not line.strip() or line.startswith(" "):  # before the sections, blank, or text
            continue
        assert ENTRY_LINE.fullmatch(line.rstrip()), f"docstring line under '{section}' is no field entry: {line!r}"
        for name, default in ENTRY_FIELD.findall(line):
            assert name not in entries, f"{name} has two docstring entries"
            entries[name] = (section, default)
    return entries


def page_table_rows() -> list[tuple[list[str], str, str]]:
    """(fields, section, default cell) for every table row of docs/configuration.md; a row may name several fields,
    whose defaults its cell then shows in the same order, comma-separated."""
    rows = []
    section = None
    with open(DOCS_CONFIGURATION, encoding="utf-8") as f:
        for line in f:
            if match := SECTION.match(line):
                section = match.group(1)
            elif line.startswith("## "):
                section = GKD_SECTION if line.startswith(f"## {GKD_SECTION}") else None
            elif line.startswith("| `") and section is not None:
                cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
                assert re.fullmatch(r"`\w+`(, `\w+`)*", cells[0]), f"unreadable field cell: {line!r}"
                rows.append((re.findall(r"`(\w+)`", cells[0]), section, cells[1]))
    return rows


def page_rows() -> dict[str, tuple[str, str]]:
    """{field: (section, default cell)}; a field in two rows fails."""
    rows: dict[str, tuple[str, str]] = {}
    for names, section, cell in page_table_rows():
        for name in names:
            assert name not in rows, f"{name} has two rows in docs/configuration.md"
            rows[name] = (section, cell)
    return rows


def page_defaults() -> dict[str, object]:
    """Each field's default as the page shows it: the cell up to any `→ explanation`, backticks dropped."""
    defaults: dict[str, object] = {}
    for names, _, cell in page_table_rows():
        value = literal(cell.split("→")[0].replace("`", "").strip(), f"docs/configuration.md, {', '.join(names)}")
        values = value if len(names) > 1 else (value,)
        assert isinstance(values, tuple) and len(values) == len(names), (
            f"docs/configuration.md: the row of {names} shows {cell!r}, not one default per field"
        )
        defaults.update(zip(names, values, strict=True))
    return defaults


def test_every_field_the_npd_config_declares_has_one_docstring_entry():
    missing = own_field_names() - set(docstring_entries())
    assert not missing, f"fields of NearPolicyDistillConfig without a docstring entry: {sorted(missing)}"


def test_the_docstring_documents_only_fields_that_exist_with_their_real_defaults():
    fields = npd_fields()
    for name, (_, default) in docstring_entries().items():
        assert name in fields, f"the docstring documents {name}, which NearPolicyDistillConfig does not have"
        shown = literal(default, f"docstring, {name}")
        assert shown == default_of(fields[name]), (
            f"docstring: {name} defaults to {shown!r}, the dataclass to {default_of(fields[name])!r}"
        )


def test_docs_configuration_lists_every_docstring_field_under_its_section():
    documented, rows = docstring_entries(), page_rows()
    missing = set(documented) - set(rows)
    assert not missing, f"docstring fields missing from docs/configuration.md: {sorted(missing)}"
    moved = {name: (section, rows[name][0]) for name, (section, _) in documented.items() if rows[name][0] != section}
    assert not moved, f"fields in another section of docs/configuration.md than in the docstring: {moved}"


def test_docs_configuration_lists_no_field_that_does_not_exist():
    fields, rows, documented = npd_fields(), page_rows(), docstring_entries()
    unknown = set(rows) - set(fields)
    assert not unknown, f"docs/configuration.md lists fields NearPolicyDistillConfig does not have: {sorted(unknown)}"
    # NPD's own fields are described from the docstring; the GKD table is for inherited fields only
    undocumented = {name for name, (section, _) in rows.items() if section != GKD_SECTION} - set(documented)
    assert not undocumented, f"docs/configuration.md describes fields without a docstring entry: {undocumented}"
    redefined = {name for name, (section, _) in rows.items() if section == GKD_SECTION} & own_field_names()
    assert not redefined, f"fields NPD redefines belong in its own sections, not the GKD table: {redefined}"


def test_docs_configuration_shows_the_dataclass_defaults():
    fields = npd_fields()
    wrong = {
        name: (shown, default_of(fields[name]))
        for name, shown in page_defaults().items()
        if name in fields and shown != default_of(fields[name])
    }
    assert not wrong, f"docs/configuration.md defaults that are not the dataclass's, as (shown, real): {wrong}"
