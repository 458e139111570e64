"""What a benchmark writes: its JSON report, stamped with its provenance, and its figures; and how it names the
machine in them."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

from .provenance import provenance


def device_name() -> str:
    """The GPU's name, or the CPU's architecture and core count, with the torch version."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_report(report: dict[str, Any], path: str) -> None:
    """Write a benchmark's `report` to `path` with a `provenance` key added (the code, date, machine and versions
    of the process writing it: `provenance.provenance`). Every benchmark's JSON goes through here. A report that
    merges an earlier one (more methods added to a seed's report) keeps the earlier `provenance`, and this
    process's goes under `provenance_added` (one entry per process that added to it)."""
    own = provenance()
    earlier = report.get("provenance")
    if earlier is None or earlier == own:
        write_json({**report, "provenance": own}, path)
        return
    added = [p for p in report.get("provenance_added", []) if p != own]
    write_json({**report, "provenance": earlier, "provenance_added": [*added, own]}, path)


def write_json(data: dict[str, Any], path: str) -> None:
    """Write `data` to `path`, creating its folder; through a temporary file, so that a run stopped while writing
    leaves the previous file or none, never half of one (caches trust a file that exists). For caches and the
    like; a benchmark's report goes through `write_report`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # one per process: ranks may write side by side
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(temporary, path)


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """matplotlib's `subplots`, (figure, axes), on its file-only backend: benchmarks run without a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: str) -> None:
    """Lay `fig` out, write it at the resolution the docs use, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print `rows` as an aligned table. Each column is `(header, key, format)`: `format` is a format spec such as
    `".2f"` (empty for plain text); a missing or None value prints as `-`, a bool as `yes` or `no`. Every
    benchmark's table goes through here, so that their tables read alike."""
    widths = [max(len(header), 8) for header, _, _ in columns]
    cells = [[_cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    for line in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, line, strict=True)]
    print("  ".join(header.rjust(width) for (header, _, _), width in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else format(value, fmt)


def stamp() -> dict[str, str]:
    """A report's `device` (`device_name`) and `date` (today): older than the `provenance` that `write_report`
    adds, and kept because the plots' titles and the docs read them."""
    return {"device": device_name(), "date": datetime.date.today().isoformat()}


def keyed(fmt: str, *keys: str) -> list[tuple[str, str, str]]:
    """`print_table`'s columns for `keys`, each headed by its report key and printed in format `fmt`."""
    return [(key, key, fmt) for key in keys]
