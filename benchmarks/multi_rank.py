"""One generator per rank, or one shared generator on the main process, under `accelerate launch` with 2 processes.

    python benchmarks/multi_rank.py --preset cpu --repeats 3 --out results/multi_rank.json

Both placements do the same work: the same student and teacher, prompts, sampling settings, global batch
(2 processes x `batch` samples per step) and number of on-policy steps, with Δ-IFD off. Each run is its own
`accelerate launch --multi_gpu --num_processes 2` with `use_cpu=True` (on a CPU machine: 2 gloo processes), and
the placements alternate, round after round, so drift in the machine's speed hits both alike.

Reported per placement (medians over `--repeats` rounds):
- `samples_per_s`: samples trained on by both ranks, divided by the time from `on_train_begin` until `train()`
  returns on rank 0 (generator start-up included);
- `steady_samples_per_s`: the same after the first on-policy samples arrived (start-up excluded);
- `wait_frac`: share of that steady time rank 0's optimizer spent waiting for samples;
and the ratio shared / per-rank of each.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kit.child import child_result, hand_back
from kit.cli import preset_parser
from kit.registry import PAIRS, presets
from kit.report import device_name, print_table, save_figure, subplots, write_report

PRESETS = presets("multi_rank")  # kit/registry.py: the pair, batch per rank, new tokens, steps
PLACEMENTS = ("per_rank", "shared")
COLUMNS = [
    ("placement", "placement", ""),
    ("samples/s", "samples_per_s", ".2f"),
    ("steady samples/s", "steady_samples_per_s", ".2f"),
    ("wait_frac", "wait_frac", ".3f"),
]


def worker(preset: dict[str, Any], placement: str) -> None:
    """One rank of a launched run; rank 0 hands the measurement back."""
    from kit.training import TrainingClock, preset_npd_trainer, train_timed

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = preset_npd_trainer(
            preset,
            output_dir,
            max_length=preset["new_tokens"] + 64,
            lmbda=1.0,
            ifd_filter=False,
            shared_generator=placement == "shared",
            generator_mode="process",  # where the generator processes sit is what is compared
            generator_num_threads=1,
            learning_rate=1e-4,
            use_cpu=True,
        )
        wall_s = train_timed(trainer, TrainingClock())
        trainer.end()  # destroys the process group, as a script should (left to exit, gloo's teardown can abort)
    if trainer.accelerator.is_main_process:
        totals = trainer.npd_metrics.totals
        samples = preset["steps"] * preset["batch"] * trainer.args.world_size
        steady_s = wall_s - totals.first_sample_wait_s
        result = {
            "placement": placement,
            "world_size": trainer.args.world_size,
            "samples": samples,
            "wall_s": wall_s,
            "samples_per_s": samples / wall_s,
            "steady_samples_per_s": samples / steady_s,
            "wait_frac": (totals.wait_s - totals.first_sample_idle_s) / steady_s,  # bootstrap sampling is work
        }
        hand_back(result)


def launch(preset_name: str, placement: str) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    command += [os.path.abspath(__file__), "--preset", preset_name, "--worker", placement]
    return child_result(command, f"the {placement} launch", env={**os.environ, "OMP_NUM_THREADS": "1"})


def settings(preset: dict[str, Any]) -> dict[str, Any]:
    """The preset as the JSON records it: the pair's widths and depth, then the work."""
    pair = PAIRS[preset["pair"]]
    shape = dict(student_hidden=pair.student.hidden, teacher_hidden=pair.teacher.hidden, layers=pair.student.layers)
    return {**shape, **{key: value for key, value in preset.items() if key != "pair"}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("samples_per_s", "steady_samples_per_s", "wait_frac")
    summary: dict[str, Any] = {}
    for placement in PLACEMENTS:
        mine = [r for r in runs if r["placement"] == placement]
        summary[placement] = {key: statistics.median(r[key] for r in mine) for key in keys}
    for key in ("samples_per_s", "steady_samples_per_s"):
        summary[f"shared_vs_per_rank_{key}"] = summary["shared"][key] / summary["per_rank"][key]
    return summary


def print_summary(report: dict[str, Any]) -> None:
    summary = report["summary"]
    print(f"\n{report['device']}, 2 processes, preset {report['preset']}, {report['repeats']} rounds (medians)")
    print_table([{"placement": placement, **summary[placement]} for placement in PLACEMENTS], COLUMNS)
    print(
        f"shared / per-rank: {summary['shared_vs_per_rank_samples_per_s']:.2f}x overall, "
        f"{summary['shared_vs_per_rank_steady_samples_per_s']:.2f}x steady"
    )


def plot(report: dict[str, Any], path: str) -> None:
    """samples/s of every run, round by round, one line per placement."""
    fig, ax = subplots(figsize=(6, 3.2))
    for placement, color in zip(PLACEMENTS, ("tab:blue", "tab:orange"), strict=True):
        runs = [r for r in report["runs"] if r["placement"] == placement]
        ax.plot([r["round"] for r in runs], [r["samples_per_s"] for r in runs], "o-", color=color, label=placement)
        ax.plot([r["round"] for r in runs], [r["steady_samples_per_s"] for r in runs], "o--", color=color, alpha=0.5)
    ax.set_xlabel("round (solid: overall, dashed: after start-up)")
    ax.set_ylabel("samples trained / s")
    ax.set_xticks(range(report["repeats"]))
    ax.legend()
    ax.set_title(f"2 processes, preset {report['preset']} ({report['device']})", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/multi_rank.json")
    parser.add_argument("--worker", choices=PLACEMENTS, default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker is not None:
        worker(PRESETS[cli.preset], cli.worker)
        return
    runs = []
    for round_index in range(cli.repeats):
        order = PLACEMENTS if round_index % 2 == 0 else PLACEMENTS[::-1]
        for placement in order:
            runs.append({"round": round_index, **launch(cli.preset, placement)})
            print(f"round {round_index} {placement}: {runs[-1]['samples_per_s']:.2f} samples/s", flush=True)
    report = {
        "benchmark": "multi_rank",
        "device": device_name(),
        "preset": cli.preset,
        "settings": settings(PRESETS[cli.preset]),
        "repeats": cli.repeats,
        "runs": runs,
        "summary": summarize(runs),
    }
    write_report(report, cli.out)
    plot(report, os.path.splitext(cli.out)[0] + ".png")
    print_summary(report)


if __name__ == "__main__":
    main()
