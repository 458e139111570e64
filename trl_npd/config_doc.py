"""The tables of docs/configuration.md, generated from the configs' docstrings: one source for each field's text.

    python -m trl_npd.config_doc           # rewrite the generated blocks of docs/configuration.md
    python -m trl_npd.config_doc --check   # exit 1 when the page differs from what the docstrings generate

A config's docstring follows TRL's style: `> Parameters that control ...` sections, each a list of entries
`name (`type`, *optional*, defaults to `value`):` followed by their indented description. The page holds one block per
config between `<!-- config-doc:NAME:start -->` and `<!-- config-doc:NAME:end -->`; the text around the blocks is
written by hand. `tests/test_docs_config.py` fails when a block differs from what this module renders.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

CONFIGURATION_PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
DESIGN_PAGE = CONFIGURATION_PAGE.parent / "design.md"
SECTION = re.compile(r"^> (Parameters that control .+?)\s*$")
FIELD_PATTERN = r"(\w+) \((`[^`]+`(?: or `[^`]+`)*), \*optional\*, defaults to `([^`]*)`\)"
FIELD = re.compile(FIELD_PATTERN)
ENTRY_LINE = re.compile(rf"{FIELD_PATTERN}(?:, {FIELD_PATTERN})*:")
# `docs/design.md` §30 (backticks optional): a link to the page, and to the numbered section when one is named
DOC_REFERENCE = re.compile(r"`?docs/(\w+)\.md`?(?: §(\d+))?")


@dataclass(frozen=True)
class Entry:
    """One docstring entry: the fields it documents (several share one description), and that description."""

    section: str
    names: tuple[str, ...]
    types: tuple[str, ...]  # as written, e.g. "`int` or `None`"
    defaults: tuple[str, ...]  # as written: Python literals
    text: str  # the description's lines joined by spaces


def docstring_entries(cls: type) -> list[Entry]:
    """The entries of `cls`'s docstring, in order. A line under a section that is neither an entry nor indented
    description fails, so that a malformed entry cannot drop out of the page silently."""
    entries: list[Entry] = []
    section: str | None = None
    for line in (inspect.getdoc(cls) or "").splitlines():
        if match := SECTION.match(line):
            section = match.group(1)
        elif section is None or not line.strip():  # the docstring's introduction, or a blank line
            continue
        elif line.startswith(" "):
            if not entries:
                raise ValueError(f"{cls.__name__}: description before the first entry: {line!r}")
            last = entries[-1]
            entries[-1] = Entry(last.section, last.names, last.types, last.defaults, f"{last.text} {line.strip()}")
        elif ENTRY_LINE.fullmatch(line.rstrip()):
            found = FIELD.findall(line)
            names, types, defaults = (tuple(column) for column in zip(*found, strict=True))
            entries.append(Entry(section, names, types, defaults, ""))
        else:
            raise ValueError(f"{cls.__name__}: a line under '{section}' is no field entry: {line!r}")
    return [Entry(e.section, e.names, e.types, e.defaults, e.text.strip()) for e in entries]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (before de-duplication): lower case, punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def design_anchors() -> dict[str, str]:
    """{section number: anchor} of docs/design.md's numbered sections (`## 30. ...`)."""
    anchors = {}
    for line in DESIGN_PAGE.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"## (\d+)\. ", line):
            anchors[match.group(1)] = github_anchor(line[3:])
    return anchors


def _as_markdown(text: str, anchors: dict[str, str]) -> str:
    """A description as one table cell: `|` escaped, references to the docs made links relative to docs/."""

    def link(match: re.Match) -> str:
        page, section = match.group(1), match.group(2)
        if section is None:
            return f"[{page}.md]({page}.md)"
        if page != "design" or section not in anchors:
            raise ValueError(f"no section §{section} in docs/{page}.md, referenced as {match.group(0)!r}")
        return f"[{page}.md §{section}]({page}.md#{anchors[section]})"

    return DOC_REFERENCE.sub(link, text).replace("|", "\\|")


def render(cls: type, heading_prefix: str = "") -> str:
    """The block of `cls`: a `###` heading and a table per docstring section, in the docstring's order."""
    anchors = design_anchors()
    lines: list[str] = []
    section = None
    for entry in docstring_entries(cls):
        if entry.section != section:
            section = entry.section
            title = f"{heading_prefix}{section[0].lower()}{section[1:]}" if heading_prefix else section
            lines += ["", f"### {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        names = ", ".join(f"`{name}`" for name in entry.names)
        types = "; ".join(entry.types).replace("|", "\\|")
        defaults = ", ".join(f"`{default}`" for default in entry.defaults)
        lines.append(f"| {names} | {types} | {defaults} | {_as_markdown(entry.text, anchors)} |")
    return "\n".join(lines).strip("\n")


def blocks() -> dict[str, str]:
    """{config name: rendered block} for every config the page documents."""
    from .config import NearPolicyDistillConfig
    from .distillation_config import NPDDistillationConfig

    return {
        "NearPolicyDistillConfig": render(NearPolicyDistillConfig),
        "NPDDistillationConfig": render(NPDDistillationConfig, heading_prefix="`NPDDistillationConfig`: "),
    }


def marker(name: str, end: str) -> str:
    return f"<!-- config-doc:{name}:{end} -->"


def regenerate(page: str) -> str:
    """`page` with every generated block replaced by what the docstrings render now."""
    for name, block in blocks().items():
        start, end = marker(name, "start"), marker(name, "end")
        if page.count(start) != 1 or page.count(end) != 1:
            raise ValueError(f"docs/configuration.md needs exactly one {start} and one {end}")
        before, rest = page.split(start)
        _, after = rest.split(end)
        page = f"{before}{start}\n{block}\n{end}{after}"
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page is not what would be generated")
    args = parser.parse_args(argv)
    page = CONFIGURATION_PAGE.read_text(encoding="utf-8")
    generated = regenerate(page)
    if args.check:
        if generated != page:
            print(f"{CONFIGURATION_PAGE} differs from the docstrings: run `python -m trl_npd.config_doc`.")
            return 1
        return 0
    CONFIGURATION_PAGE.write_text(generated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
