"""A benchmark's command line: its module docstring as the help, and `--preset`, one of its registry presets."""

from __future__ import annotations

import argparse
from typing import Any


def preset_parser(doc: str | None, presets: dict[str, Any], default: str) -> argparse.ArgumentParser:
    """The parser every preset benchmark starts from; the script adds its own options after `--preset`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default=default)
    return parser
