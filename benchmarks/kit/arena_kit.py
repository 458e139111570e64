"""What the arena scripts (arena.py, arena_pilots.py, arena_real.py) share that needs no model: statistics over a
run's curve of checkpoints and over seeds, and their command line's preset and methods."""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

# the field of a run's time to GKD's final value of a metric; the accuracy reaches it from below, the KL from above
TIME_TO_GKD_FINAL = {"acc": "time_to_gkd_final_s", "kl_teacher": "time_to_gkd_final_kl_s"}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def smoothed(curve: list[dict[str, float]], window: int, metric: str = "acc") -> list[float]:
    """Trailing mean of `metric` (the greedy accuracy) over `window` checkpoints (fewer at the start)."""
    values = [point[metric] for point in curve]
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def at_fraction(curve: list[dict[str, float]], window: int, fraction: float) -> float:
    """The smoothed accuracy at the last checkpoint within `fraction` of the run's steps."""
    last_step = curve[-1]["step"]
    index = max(i for i, point in enumerate(curve) if point["step"] <= fraction * last_step)
    return smoothed(curve, window)[index]


def time_to(curve: list[dict[str, float]], window: int, level: float, metric: str = "acc") -> float | None:
    """Training wall-clock at which the smoothed curve of `metric` first reaches `level` (at or above it; for the
    KL, at or below it); None if it never does."""
    for point, value in zip(curve, smoothed(curve, window, metric), strict=True):
        if (value <= level + 1e-12) if metric == "kl_teacher" else (value >= level - 1e-12):
            return point["wall_s"]
    return None


def add_time_to_gkd_final(runs: list[dict[str, Any]], window: int, metric: str = "acc") -> None:
    """Each run's `time_to_gkd_final_s` (`time_to_gkd_final_kl_s` for the KL to the teacher, `kl_teacher`): when
    its curve of `metric`, averaged over `window` checkpoints as the final values are, first reaches the (first) GKD
    run's final value; None for every run when there is no GKD run."""
    gkd = next((run for run in runs if run["method"] == "gkd"), None)
    level = None if gkd is None else gkd[f"final_{metric}_smoothed"]
    for run in runs:
        run[TIME_TO_GKD_FINAL[metric]] = None if level is None else time_to(run["curve"], window, level, metric)


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and two-sided 95% confidence interval (Student's t over the seeds)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": len(values)}
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(values)}


def ci_text(stat: dict[str, float] | None, fmt: str = "+.1f", scale: float = 100.0) -> str | None:
    """`mean_ci`'s interval as text, `mean [lo, hi]`, each times `scale` (points, by default); None without one."""
    if stat is None:
        return None
    return f"{scale * stat['mean']:{fmt}} [{scale * stat['lo']:{fmt}}, {scale * stat['hi']:{fmt}}]"


def preset_and_methods(
    parser: argparse.ArgumentParser, args: argparse.Namespace, presets: dict[str, Any], methods: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The preset `--preset` names, its grid replaced by `--lr-grid`'s rates (only with `--tune`), and the methods
    of `--methods`, each one of `methods`."""
    if args.lr_grid and not args.tune:
        parser.error("--lr-grid goes with --tune")
    preset = presets[args.preset]
    if args.lr_grid:
        preset = {**preset, "lr_grid": [float(lr) for lr in args.lr_grid.split(",")]}
    chosen = args.methods.split(",")
    if unknown := set(chosen) - set(methods):
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(methods)}")
    return preset, chosen
