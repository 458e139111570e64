"""Does generation overlap training? The same NPD work through each generator mode, timed.

    python benchmarks/overlap.py --out results/overlap.json

For each mode (`process`, `thread`, `inline`) it trains the same student on the same prompts for the same steps and
reports, after the first sample arrived (so process start-up is reported apart):
  - `steady_wall_s`: wall time of the training loop after the first sample;
  - `gen_busy_s`: time the generator spent sampling (its own clock);
  - `train_busy_s`: `steady_wall_s` minus the time the trainer waited on the buffer;
  - `overlap`: `(gen_busy_s + train_busy_s) / steady_wall_s`. 1.0 means the two ran one after the other; 2.0 means
    perfectly side by side.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline, huggingface_hub sends no telemetry either

from kit.cli import preset_parser
from kit.registry import presets
from kit.report import keyed, print_table, stamp, write_report
from kit.training import preset_npd_trainer

PRESETS = presets("overlap")  # kit/registry.py: the pair, steps, batch, new tokens


def run(mode: str, preset: dict, output_dir: str, generator_threads: int | None = None, ifd: bool = True) -> dict:
    trainer = preset_npd_trainer(
        preset,
        output_dir,
        learning_rate=1e-4,
        lmbda=1.0,
        max_length=256,
        generator_mode=mode,
        generator_num_threads=generator_threads,
        ifd_filter=ifd,
    )
    start = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - start
    totals = trainer.npd_metrics.totals
    steady_wall_s = trainer.state.log_history[-1]["train_runtime"] - totals.first_sample_wait_s
    steady_wait_s = totals.wait_s - totals.first_sample_idle_s  # waiting only: bootstrap sampling is work
    train_busy_s = steady_wall_s - steady_wait_s
    # inline, the trainer's wait is its own generation
    gen_busy_s = steady_wait_s if mode == "inline" else totals.generator_busy_s
    return {
        "mode": mode,
        "wall_s": wall_s,
        "first_sample_wait_s": totals.first_sample_wait_s,
        "steady_wall_s": steady_wall_s,
        "gen_busy_s": gen_busy_s,
        "train_busy_s": train_busy_s,
        "wait_s": steady_wait_s,
        "overlap": (gen_busy_s + train_busy_s) / steady_wall_s,
        "samples_per_s": totals.consumed_samples / steady_wall_s,
        "generated_samples": totals.generated_samples,
        "dropped_stale": totals.dropped["stale"],
        "dropped_ifd": totals.dropped["ifd_low"] + totals.dropped["ifd_high"],
    }


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu")
    parser.add_argument("--modes", default="process,thread,inline")
    parser.add_argument("--out", default="results/overlap.json")
    parser.add_argument("--generator-threads", type=int, default=None, help="generator_num_threads (process mode)")
    parser.add_argument(
        "--no-ifd",
        action="store_true",
        help="turn Δ-IFD selection off (this benchmark turns it on, unlike the trainer's defaults)",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    folder = os.path.dirname(args.out) or "."
    runs = [
        run(mode, preset, os.path.join(folder, f"overlap-{mode}"), args.generator_threads, not args.no_ifd)
        for mode in args.modes.replace("sync", "inline").split(",")  # the old name of inline, as the config takes it
    ]
    report = {
        "preset": args.preset,
        **stamp(),
        "ifd_filter": not args.no_ifd,
        "generator_threads": args.generator_threads,
        "runs": runs,
    }
    write_report(report, args.out)
    steady = keyed(".2f", "steady_wall_s", "gen_busy_s", "train_busy_s", "wait_s", "overlap")
    rates = [("samples/s", "samples_per_s", ".2f"), ("startup_s", "first_sample_wait_s", ".2f")]
    print_table(runs, [("mode", "mode", ""), *steady, *rates])


if __name__ == "__main__":
    main()
