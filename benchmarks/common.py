"""What every benchmark script shares: how it names the machine, and how it writes its JSON report."""

from __future__ import annotations

import json
import os
import platform
from typing import Any


def device_name() -> str:
    """The GPU's name, or the CPU's architecture and core count, with the torch version."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def git_commit() -> str | None:
    """The short commit of the checkout the benchmark runs from, with `+dirty` when files differ from it; None
    outside a git checkout."""
    import subprocess

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


def write_json(report: dict[str, Any], path: str) -> None:
    """Write `report` to `path`, creating its folder; through a temporary file, so that a run stopped while writing
    leaves the previous file or none, never half of one (caches trust a file that exists)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # one per process: ranks may write side by side
    with open(temporary, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(temporary, path)


def pyplot() -> Any:
    """matplotlib's pyplot on its file-only backend: benchmarks run without a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str) -> None:
    """Lay `fig` out, write it at the resolution the docs use, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
