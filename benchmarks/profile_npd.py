"""Where the time goes in both of NPD's processes: the trainer and its generator process, sampled with py-spy.

    pip install py-spy
    python benchmarks/profile_npd.py --trainer npd-process --out results/profile-npd.json

Runs one trainer of `throughput.py` (the same preset, models and work, in its `--run-one` mode) under
`py-spy record --subprocesses --idle`, which samples the stack of every thread of both processes at a fixed rate,
waiting included. Each sample of the trainer's main thread and of the generator's loop is sorted into a stage by
the functions on its stack (the first matching rule below wins), and the table gives each stage's share of its
process's wall time. py-spy reads the processes from outside, so nothing in trl_npd is instrumented.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import sys
import tempfile
from typing import Any

from kit.child import run_child
from kit.cli import preset_parser
from kit.report import print_table, stamp, write_report
from throughput import PRESETS, one_trainer_command

HERE = os.path.dirname(os.path.abspath(__file__))

# (stage, pattern matched against the whole stack); the first match wins. Frames look like "function (file:line)".
TRAINER_STAGES = [
    # first: inline sampling also runs under _next_batch, and it is work, not waiting
    ("sample inline (start-up)", r"_generate_inline \("),
    ("wait for samples", r"_next_batch \(.*buffer\.py"),
    ("weight sync", r"publish \([^)]*generation_session\.py"),
    ("teacher forward", r"TEACHER_FORWARD"),
    ("loss (divergence)", r"fused_jsd_sum \(|chunked_sum \(|generalized_jsd_sum \(|topk_loss \(|token_logprobs \("),
    ("student forward", r"distillation_loss \("),
    ("backward", r"backward \(|run_backward"),
    ("optimizer step", r"optimizer_step|_fused_adamw|adamw|clip_grad_norm"),
    ("batches (packing, collation)", r"get_batch_samples \(|build \([^)]*step_batches\.py|collat"),
    ("other", r""),
]
GENERATOR_STAGES = [
    ("waiting for room in the buffer", r"put \(.*buffer\.py"),
    ("loading new weights", r"load_into \("),
    ("scoring (teacher top-k, Δ-IFD)", r"score \(.*scoring\.py"),
    ("sampling: model forward", r"generate \(.*forward \("),
    ("sampling: the rest of generate", r"generate \("),
    ("start-up (imports, copying models) and other", r""),
]


def teacher_forward_lines() -> set[int]:
    """Lines of `losses.distillation_loss` that pass the teacher to a forward, so its forward is told from the
    student's."""
    path = os.path.join(HERE, "..", "trl_npd", "losses.py")
    with open(path) as f:
        return {i for i, line in enumerate(f, 1) if re.search(r"\(teacher\b", line)}


def classify(stacks: collections.Counter, rules: list[tuple[str, str]]) -> dict[str, int]:
    counts = dict.fromkeys((name for name, _ in rules), 0)
    compiled = [(name, re.compile(pattern)) for name, pattern in rules]
    for stack, n in stacks.items():
        for name, pattern in compiled:
            if pattern.search(stack):
                counts[name] += n
                break
    return counts


def parse(raw_path: str) -> tuple[collections.Counter, collections.Counter]:
    """The trainer's main-thread stacks and the generator loop's stacks, from py-spy's raw (collapsed) output."""
    teacher_lines = teacher_forward_lines()
    trainer: collections.Counter = collections.Counter()
    generator: collections.Counter = collections.Counter()
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            # the generator process's main thread, start-up included (its other threads, the queue's feeder and
            # the heartbeat, idle most of the time and would count as "other")
            if "spawn_main" in stack and "resource_tracker" not in stack and "MainThread" in stack:
                generator[stack] += int(count)
            elif "train (" in stack and "MainThread" in stack:
                # mark the teacher's forward inside distillation_loss by its line
                for match in re.finditer(r"distillation_loss \([^:]*losses\.py:(\d+)\)", stack):
                    if int(match.group(1)) in teacher_lines:
                        stack += ";TEACHER_FORWARD"
                trainer[stack] += int(count)
    return trainer, generator


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu-tiny")
    # npd-process: the generator process by name, whatever the default is
    parser.add_argument("--trainer", default="npd-process", help="one of throughput.py's trainers (an NPD one)")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="no inline sampling while the generator process starts: every sample comes from that process",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--out", default="results/profile-npd.json")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "profile.txt")
        spy = [py_spy, "record", "--subprocesses", "--idle", "--threads", "--rate", str(args.rate)]
        spy += ["--format", "raw", "--output", raw, "--"]
        # throughput.py's own result is not used: the profile is the measurement
        done = run_child(spy + one_trainer_command(args.trainer, args))
        if done.returncode != 0:
            raise SystemExit(f"the profiled run failed:\n{done.stderr[-4000:]}")
        trainer, generator = parse(raw)
    report: dict[str, Any] = {
        "trainer": args.trainer,
        "preset": args.preset,
        "steps": args.steps,
        **stamp(),
        "rate_per_s": args.rate,
        "bootstrap": not args.no_bootstrap,
        "processes": {
            "trainer": classify(trainer, TRAINER_STAGES),
            "generator": classify(generator, GENERATOR_STAGES),
        },
    }
    write_report(report, args.out)
    for process, stages in report["processes"].items():
        total = sum(stages.values())
        print(f"\n{process}: {total / args.rate:.1f} s sampled")
        shares = [{"stage": stage, "share": n / max(total, 1), "s": n / args.rate} for stage, n in stages.items()]
        print_table(shares, [("stage", "stage", ""), ("share", "share", ".1%"), ("s", "s", ".1f")])


if __name__ == "__main__":
    main()
