"""Where a benchmark's numbers come from: the code (its commit), when, on what machine, with which libraries.

`report.write_report` writes it into every benchmark JSON under `provenance`, so that a number quoted later can be
traced to the run that made it, whatever fields that benchmark's own report has.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

LIBRARIES = ("torch", "transformers", "trl")  # what decides the numbers besides this repository's code


def git_commit() -> str | None:
    """The short commit of the checkout the benchmark runs from, with `+dirty` when files differ from it; None
    outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# Taken when the benchmark starts, not when a report is written: a long run outlives edits to the tree, and a report
# rewritten after every trainer or method must name the code that ran. Not in a child that hands its result back to
# the benchmark (kit.child): the parent writes the report, and git run as the child's own child would count in the
# child's peak memory (RUSAGE_CHILDREN).
LOADED_COMMIT = None if os.environ.get("NPD_BENCHMARK_RESULT_FILE") else git_commit()
STARTED_AT = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def provenance() -> dict[str, Any]:
    """The commit and start time of this process, its machine and platform, and the versions that ran. Read from
    package metadata, so that it imports none of them."""
    return {
        "commit": LOADED_COMMIT,
        "date": STARTED_AT,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **{library: _version(library) for library in LIBRARIES},
    }
