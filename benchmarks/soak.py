"""A long run: does memory grow with steps, does the staleness bound hold over every sync, is every sample counted?

    python benchmarks/soak.py --steps 1000 --out results/soak.json

Micro models (a Qwen3-shaped student and teacher of a few hundred thousand parameters) train at the NPD defaults:
the generator in its own process, a weight sync every `weight_sync_steps` (and early on drift, `max_policy_kl`),
the staleness bound, Δ-IFD as the defaults set it (off), packing and the fused loss, `lmbda` 0.5. Only what a CPU
machine needs differs (fp32, no checkpoints, no reports), and `max_new_tokens` is shorter so a thousand steps fit
in minutes. Every `--record-every` steps it records:
  - the resident memory (RSS, psutil) of the trainer process and of the generator process;
  - the samples waiting in the buffer;
and it records the staleness of every sample trained on. At the end it checks:
  - RSS growth after warm-up (`--warmup-steps`): (RSS at the last record - RSS at the end of warm-up) / the latter,
    for each process; target < 5%;
  - `stale_trained`: samples trained on with staleness > `max_staleness`; target 0;
  - the accounting, counted on both sides: the generator's own count of samples it set out to make must equal
    trained + dropped (by reason) + unused at shutdown (received, on the way, or in the generator's hands).
It writes the JSON report, a plot next to it (`.png`), and prints a table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline, huggingface_hub sends no telemetry either

import psutil
from kit.provenance import LOADED_COMMIT
from kit.report import save_figure, stamp, subplots, write_report
from kit.training import toy_npd_trainer
from transformers import TrainerCallback

from trl_npd.metrics import SAMPLE_DRIFT_KEPT

MB = 2**20
RSS_GROWTH_TARGET = 0.05
PROCESSES = ("trainer", "generator")  # whose RSS is recorded, as `rss_<process>_mb`


class Recorder(TrainerCallback):
    """At every log (every `record_every` steps): both processes' RSS, and from the logged `npd/` metrics the
    buffer's length, the policy version, and whether the generator process serves the buffer yet (the trainer
    samples inline until its first batch arrives, and only the process's batches count generator time)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.generator_serves = False
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()  # records time training, not building the models and the trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.generator_serves |= "npd/gen_samples_per_s" in logs
        # the buffer is logged while the generator runs; train()'s closing log (its runtime) is no record
        if "npd/buffer_size" not in logs or "train_runtime" in logs:
            return
        self.records.append(
            {
                "step": state.global_step,
                "wall_s": time.perf_counter() - self.start,
                "rss_trainer_mb": psutil.Process().memory_info().rss / MB,
                "rss_generator_mb": generator_process().memory_info().rss / MB,
                "buffer": int(logs["npd/buffer_size"]),
                "version": int(logs["npd/version"]),
                "bootstrapping": not self.generator_serves,
            }
        )


def generator_process() -> psutil.Process:
    """The trainer's generator process: its one child started by multiprocessing's spawn (Python's resource
    tracker, its other child, is started otherwise)."""
    spawned = [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]
    if len(spawned) != 1:
        raise RuntimeError(f"expected one generator process among the trainer's children, found {spawned}")
    return spawned[0]


def trained_staleness(totals: Any) -> Counter:
    """How many samples were trained on at each staleness: every trained sample's record in the totals
    (`sample_drift`: staleness when trained, drift, tokens), which keeps the last `SAMPLE_DRIFT_KEPT` of them."""
    if len(totals.sample_drift) != totals.consumed_samples:
        raise SystemExit(
            f"{totals.consumed_samples} samples trained, {len(totals.sample_drift)} with their staleness recorded: "
            "a run this long outgrows the totals' per-sample record"
        )
    return Counter(staleness for staleness, _, _ in totals.sample_drift)


def warmed_up(records: list[dict], warmup_steps: int) -> list[dict]:
    """The records after warm-up: at or after `warmup_steps`, and once the generator process serves the buffer.
    Until its first batch the trainer samples inline (the bootstrap) while the process is still loading, so its
    RSS then is a process half started, not a baseline."""
    return [r for r in records if r["step"] >= warmup_steps and not r["bootstrapping"]]


def growth(after: list[dict], key: str) -> float:
    """(value at the last record - value at the first record after warm-up) / the latter."""
    return (after[-1][key] - after[0][key]) / after[0][key]


def slope_per_1k_steps(after: list[dict], key: str) -> float:
    """Least-squares slope of `key` over the records after warm-up, per 1,000 steps: a leak shows as a steady
    climb, while RSS also swings by a few MiB from one record to the next with whatever a step had allocated."""
    points = [(r["step"], r[key]) for r in after]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    variance = sum((x - mean_x) ** 2 for x, _ in points)
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in points) / variance if variance else 0.0


def run(steps: int, record_every: int, warmup_steps: int, new_tokens: int, output_dir: str) -> dict:
    recorder = Recorder()
    trainer = toy_npd_trainer(
        "soak",
        output_dir,
        prompts=1024,
        callbacks=[recorder],
        max_steps=steps,
        max_new_tokens=new_tokens,
        logging_steps=record_every,  # each log is a record: the npd/ metrics say what the pipeline holds
        generator_mode="process",  # the generator process's life over a long run is what a soak watches
    )
    args = trainer.args
    if steps * args.per_device_train_batch_size > SAMPLE_DRIFT_KEPT:  # checked before hours of training, not after
        raise SystemExit(
            f"{steps} steps of {args.per_device_train_batch_size} samples would outgrow the {SAMPLE_DRIFT_KEPT:,} "
            "samples whose staleness the totals keep: run fewer steps"
        )
    start = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - start
    totals = trainer.npd_metrics.totals
    records = recorder.records
    after = warmed_up(records, warmup_steps)
    if not after:
        raise SystemExit(f"no record after warm-up (step {warmup_steps}, and the generator serving): run more steps")
    staleness = trained_staleness(totals)
    stale_trained = sum(n for s, n in staleness.items() if s > args.max_staleness)
    return {
        "steps": trainer.state.global_step,
        "wall_s": wall_s,
        "settings": {
            # the generation batch and buffer as sized when training started (the fields themselves stay None)
            **dict(zip(("generation_batch_size", "buffer_size"), args.generation_sizes(world_size=1), strict=True)),
            **{
                key: getattr(args, key)
                for key in (
                    "lmbda",
                    "per_device_train_batch_size",
                    "weight_sync_steps",
                    "max_staleness",
                    "max_new_tokens",
                    "generator_mode",
                    "ifd_filter",
                    "ifd_band",
                    "max_policy_kl",
                    "padding_free",
                    "use_fused_loss",
                    "generator_bootstrap",
                )
            },
        },
        "warmup_steps": warmup_steps,
        "warmup_end_step": after[0]["step"],
        "records": records,
        "rss_growth_frac": {name: growth(after, f"rss_{name}_mb") for name in PROCESSES},
        "rss_slope_mb_per_1k_steps": {name: slope_per_1k_steps(after, f"rss_{name}_mb") for name in PROCESSES},
        "buffer": {"mean": sum(r["buffer"] for r in records) / len(records), "max": max(r["buffer"] for r in records)},
        "weight_syncs": len(totals.sync_steps),
        "weight_syncs_by_reason": dict(totals.weight_syncs),
        "sync_steps": {"first": totals.sync_steps[0], "last": totals.sync_steps[-1]} if totals.sync_steps else None,
        "staleness": {
            "trained_samples": sum(staleness.values()),
            "histogram": {str(s): n for s, n in sorted(staleness.items())},
            "max": max(staleness),
            "max_staleness": args.max_staleness,
        },
        "stale_trained": stale_trained,
        "accounting": {
            "generated": totals.generated_samples,
            "trained": totals.consumed_samples,
            "dropped": dict(totals.dropped),
            "unused": totals.unused(),
            "unused_by_place": {
                "received": totals.unused_at_shutdown,
                "in_transport": totals.undelivered_at_shutdown,
                "in_generator": totals.unfinished_at_shutdown,
            },
            "exact": totals.generated_samples == totals.accounted(),
        },
    }


def plot(report: dict, path: str) -> None:
    records = report["records"]
    steps = [r["step"] for r in records]
    fig, (memory, buffer, staleness) = subplots(1, 3, figsize=(14, 3.8))
    for name in PROCESSES:
        memory.plot(steps, [r[f"rss_{name}_mb"] for r in records], marker=".", label=name)
    memory.axvline(report["warmup_end_step"], color="grey", linestyle=":", label="end of warm-up")
    memory.set(xlabel="optimizer step", ylabel="RSS (MiB)", title="resident memory")
    memory.legend()
    buffer.plot(steps, [r["buffer"] for r in records], marker=".")
    buffer.set(xlabel="optimizer step", ylabel="samples", title="buffer length")
    histogram = report["staleness"]["histogram"]
    staleness.bar([int(s) for s in histogram], list(histogram.values()))
    staleness.axvline(report["staleness"]["max_staleness"] + 0.5, color="red", linestyle="--", label="max_staleness")
    staleness.set(xlabel="staleness (optimizer steps)", ylabel="samples trained on", title="staleness")
    staleness.legend()
    fig.suptitle(f"soak: {report['steps']} steps, {report['weight_syncs']} weight syncs ({report['device']})")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--record-every", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: a fifth of the steps")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--out", default="results/soak.json")
    args = parser.parse_args()
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else args.steps // 5
    folder = os.path.dirname(args.out) or "."
    soak = run(args.steps, args.record_every, warmup_steps, args.new_tokens, os.path.join(folder, "soak-run"))
    report = {**stamp(), "commit": LOADED_COMMIT, **soak}
    write_report(report, args.out)
    plot(report, os.path.splitext(args.out)[0] + ".png")

    first = next(r for r in report["records"] if r["step"] == report["warmup_end_step"])
    last = report["records"][-1]
    growth_frac, accounting = report["rss_growth_frac"], report["accounting"]
    print(f"{report['steps']} steps in {report['wall_s']:.0f} s, {report['weight_syncs']} weight syncs")
    print(
        f"{'process':10} {'RSS start MiB':>13} {'after warm-up':>13} {'end':>8} {'growth':>8} {'target':>8} "
        f"{'slope MiB/1k steps':>19}"
    )
    for name in PROCESSES:
        key = f"rss_{name}_mb"
        verdict = "ok" if growth_frac[name] < RSS_GROWTH_TARGET else "MISSED"
        print(
            f"{name:10} {report['records'][0][key]:13.1f} {first[key]:13.1f} {last[key]:8.1f} "
            f"{growth_frac[name]:8.2%} {'< 5%':>5} {verdict:>2} {report['rss_slope_mb_per_1k_steps'][name]:19.1f}"
        )
    staleness = report["staleness"]
    print(
        f"buffer: mean {report['buffer']['mean']:.1f}, max {report['buffer']['max']} samples; staleness of "
        f"{staleness['trained_samples']} trained samples: max {staleness['max']} (bound "
        f"{staleness['max_staleness']}), {report['stale_trained']} past the bound"
    )
    print(
        f"accounting: generated {accounting['generated']} = trained {accounting['trained']} + dropped "
        f"{accounting['dropped']} + unused {accounting['unused']} {accounting['unused_by_place']}: "
        f"{'exact' if accounting['exact'] else 'NOT EXACT'}"
    )


if __name__ == "__main__":
    main()
