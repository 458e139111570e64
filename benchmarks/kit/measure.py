"""What the reports and tables of several benchmarks share beyond `report`: the fields that name the machine and
the day, and table columns headed by the report keys they print."""

from __future__ import annotations

import datetime

from .report import device_name


def stamp() -> dict[str, str]:
    """A report's `device` (`report.device_name`) and `date` (today): older than the `provenance` that
    `report.write_report` adds, and kept because the plots' titles and the docs read them."""
    return {"device": device_name(), "date": datetime.date.today().isoformat()}


def keyed(fmt: str, *keys: str) -> list[tuple[str, str, str]]:
    """`report.print_table`'s columns for `keys`, each headed by its report key and printed in format `fmt`."""
    return [(key, key, fmt) for key in keys]
