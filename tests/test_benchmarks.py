"""The benchmark scripts are not run by CI, but each runs here on a micro preset so it cannot rot."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_overlap_benchmark_micro(tmp_path):
    out = tmp_path / "overlap.json"
    table = run("overlap.py", "--preset", "micro", "--modes", "thread,sync", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["runs"]] == ["thread", "sync"]
    assert all(r["samples_per_s"] > 0 for r in report["runs"])
    assert "overlap" in table


def test_loss_memory_benchmark_micro(tmp_path):
    out = tmp_path / "loss_memory.json"
    run(
        "loss_memory.py",
        "--tokens",
        "64",
        "--vocab",
        "500",
        "--hidden",
        "32",
        "--impls",
        "unfused,fused",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["runs"]
    assert {(r["impl"], r["tokens"]) for r in rows} == {("unfused", 64), ("fused", 64)}
    assert all(r["status"] == "ok" and r["peak_mb"] > 0 and r["ms_per_call"] > 0 for r in rows)


def test_ifd_cost_benchmark_micro(tmp_path):
    out = tmp_path / "ifd.json"
    run("ifd_cost.py", "--preset", "micro", "--out", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["generate", "generate+ifd"]
    assert all(r["ms_per_sample"] > 0 for r in runs)
