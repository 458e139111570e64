"""One measurement in a fresh child process, and how its result comes back to the benchmark that started it.

A benchmark runs each trainer, engine or loss implementation in a process of its own, so that memory peaks, thread
pools and compiled kernels are its own. The child is the benchmark script itself in an internal mode, alone or under
a launcher (`accelerate launch`) or a profiler (py-spy), possibly with another virtual environment's Python. It
hands its result back with `hand_back`, which writes it to a JSON file the parent named in the child's environment:
a file rather than the child's output, where a launcher's ranks, a profiler and the libraries all print too.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

RESULT_FILE_ENV = "NPD_BENCHMARK_RESULT_FILE"


@dataclass
class ChildRun:
    result: dict[str, Any] | None  # what the child handed back; None if it handed back nothing
    returncode: int
    stderr: str


def run_child(command: list[str], timeout_s: float | None = None, env: dict[str, str] | None = None) -> ChildRun:
    """Run `command` to its end and collect what it handed back. `env`: the child's environment (default: this
    process's). Past `timeout_s` the child is killed and `subprocess.TimeoutExpired` raised."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        environment = {**(os.environ if env is None else env), RESULT_FILE_ENV: path}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=environment)
        result = None
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
    return ChildRun(result, done.returncode, done.stderr)


def child_result(command: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`run_child`'s result; a child that fails, or hands nothing back, stops the benchmark with the end of its
    error output."""
    run = run_child(command, env=env)
    if run.returncode != 0 or run.result is None:
        raise SystemExit(f"{what} failed:\n{run.stderr[-4000:]}")
    return run.result


def hand_back(result: dict[str, Any]) -> None:
    """In the child: give `result` to the parent that runs it; printed as JSON when no parent asked for one (the
    internal mode run by hand)."""
    path = os.environ.get(RESULT_FILE_ENV)
    if path is None:
        print(json.dumps(result))
        return
    with open(path, "w") as f:
        json.dump(result, f)
