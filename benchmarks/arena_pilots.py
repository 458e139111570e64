"""Pilots of the arena's task variants: does a variant make TRL's GKD beat SFT on teacher samples at the end?

    python benchmarks/arena_pilots.py --variant reverse-kl --runs gkd@1e-3,gkd@3e-3,sft@1e-2 \
        --out results/arena-pilots/reverse-kl.json
    python benchmarks/arena_pilots.py --variant repair --runs gkd@1e-3,gkd@3e-3,sft@1e-2,sft-truth@3e-3 \
        --out results/arena-pilots/repair.json
    python benchmarks/arena_pilots.py --variant dagger \
        --runs gkd@3e-4,gkd@1e-3,gkd@3e-3,sft@3e-3,sft@1e-2,sft-truth@3e-3 --out results/arena-pilots/dagger.json

A pilot is one seed (the arena's tuning seed by default) and a few (method, learning rate) pairs, with the arena's
`cpu` preset, teacher, warm start, training and evaluation (arena.py). It decides whether a variant is worth five
seeds and a grid (docs/design.md §28; docs/benchmarks.md has every command run). Pilots of one variant on other
seeds, one run per method, are paired as the arena's seeds are:

    python benchmarks/arena.py --summarize results/arena-pilots/repair-seed-*.json \
        --out results/arena-pilots/repair-summary.json

The variants, each a lever the arena's issue named:

- `reverse-kl`: the arena's task, with the JSD's beta at 1 for the distillers: the reverse KL, mode-seeking, which
  only on-policy training can optimize and which in principle ignores the label-smoothed teacher's floor.
- `repair`: a trace with repairs. In the training data a fraction (`--repair-rate`) of the steps is a wrong
  partial, then `<`, then the right one (`07<08`), so the teacher learns to repair a mistake; it is trained without
  label smoothing. The student warms up, and `sft-truth` trains, on the same data.
- `dagger`: as `repair`, but the teacher is not trained on the wrong digits, so it repairs a mistake and almost
  never makes one: its samples are clean and show no repair, while the states a student reaches by its own mistakes
  are where the teacher's distribution teaches one. This is the setting in which on-policy training (DAgger, GKD)
  should beat imitating samples. The student warms up, and `sft-truth` trains, on the clean worked answers.

Greedy and sampled accuracy compare only the answer after `:`, so a repaired trace with the right answer is right.
Each variant is a task object (`variant_task`): arena.py's `Multiplication` with another problem, tokenizer,
generation room and training data, which the arena's machinery runs as it runs its own task.
"""

from __future__ import annotations

import copy
import os
import random
import re
from typing import Any

import arena
import torch
from kit.arena_kit import at_fraction
from kit.cli import preset_parser
from kit.report import write_report

VARIANTS = ("reverse-kl", "repair", "dagger")
REPAIR_ROOM_TOKENS = 9  # generation room beyond the longest repaired answer: three more repairs of 3 characters


def repaired_problem(rng: random.Random, digits: int, repair_rate: float) -> tuple[str, str]:
    """arena.problem's trace in which each step is, with probability `repair_rate`, a wrong partial within 12 of the
    right one, then `<` and the right one."""

    def step(partial: int) -> str:
        if rng.random() < repair_rate:
            wrong = rng.choice([p for p in range(max(0, partial - 12), min(100, partial + 13)) if p != partial])
            return f"{wrong:02d}<{partial:02d}"
        return f"{partial:02d}"

    return arena.problem(rng, digits, step)


def clean(answer: str) -> str:
    """The worked answer without its wrong steps: `07<08 12` becomes `08 12`."""
    return re.sub(r"\d\d<", "", answer)


def wrong_digits(answer: str) -> list[int]:
    """Positions of the two digits before each `<`: the wrong partials, which the `dagger` teacher is not taught."""
    return [position for mark in re.finditer("<", answer) for position in (mark.start() - 2, mark.start() - 1)]


class Repaired(arena.Multiplication):
    """`repair`: the arena's task on traces with repairs (`repaired_problem`); `<` is a token of its own."""

    extra_chars = "<"
    variant = "repair"

    def __init__(self, preset: dict[str, Any], repair_rate: float) -> None:
        self.repair_rate = repair_rate
        super().__init__(preset)
        # one room for every generation (the teacher's samples, the student's rollouts, evaluation), from the
        # repaired data: the `dagger` student trains on clean answers, but its own traces may repair as often
        self.room = super().new_tokens(self.held_out + self.train) + REPAIR_ROOM_TOKENS

    @property
    def name(self) -> str:
        # the task's name keys the teacher's cache, so each variant and rate trains its own teacher
        return f"{super().name}, {self.repair_rate:g} of steps repaired ({self.variant})"

    def problem(self, rng: random.Random) -> tuple[str, str]:
        return repaired_problem(rng, self.digits, self.repair_rate)

    def new_tokens(self, pairs: list[tuple[str, str]]) -> int:
        return self.room


class Dagger(Repaired):
    """`dagger`: the teacher is not trained on the wrong digits, and the student warms up and trains on the clean
    answers (the teacher alone saw the repairs)."""

    untrained = staticmethod(wrong_digits)
    variant = "dagger"

    def student_pairs(self) -> list[tuple[str, str]]:
        return [(q, clean(a)) for q, a in self.train]


def variant_task(variant: str, preset: dict[str, Any], repair_rate: float) -> arena.Multiplication:
    """The task of `variant` on a copy of `preset`, adjusted for it: the reverse KL for `reverse-kl`, a teacher
    trained without label smoothing for the others."""
    preset = copy.deepcopy(preset)
    if variant == "reverse-kl":
        preset["distill"]["beta"] = 1.0
        return arena.Multiplication(preset)
    preset["teacher"]["label_smoothing"] = 0.0
    return Dagger(preset, repair_rate) if variant == "dagger" else Repaired(preset, repair_rate)


def pilot(
    preset_name: str, variant: str, runs: list[tuple[str, float]], seed: int, repair_rate: float, cache_dir: str
) -> dict:
    """A seed's report of `variant` (arena.run_seed's, so that `arena.py --summarize` pairs the pilots of one
    variant over seeds), with the variant's settings, how often the teacher's samples repair a step, and each
    run's smoothed accuracy at half the steps."""
    task = variant_task(variant, arena.PRESETS[preset_name], repair_rate)
    preset, held_out = task.preset, task.held_out

    def teacher_samples(start: arena.Start) -> dict[str, float]:
        questions, temperature = [q for q, _ in held_out], preset["distill"]["temperature"]
        samples = arena.complete(start.teacher, task.tokenizer, questions, task.new_tokens(held_out), temperature)
        repairing = sum("<" in sample for sample in samples) / len(samples)
        print(f"{repairing:.1%} of the teacher's samples repair a step", flush=True)
        return {"teacher_samples_repairing": repairing}

    report = arena.run_seed(task, seed, runs, cache_dir, None, teacher_samples)
    for run in report["runs"]:
        run["half_acc_smoothed"] = at_fraction(run["curve"], preset["final_points"], 0.5)
    return {
        "preset": preset_name,
        "variant": variant,
        "repair_rate": None if variant == "reverse-kl" else repair_rate,
        **report,
        "max_new_tokens": task.new_tokens(task.student_pairs()),  # what the student's rollouts and SFT's samples get
        "teacher": preset["teacher"],
    }


def parse_runs(text: str) -> list[tuple[str, float]]:
    """`gkd@3e-3,sft@1e-2` as [("gkd", 0.003), ("sft", 0.01)]; methods must be arena's."""
    runs = []
    for item in text.split(","):
        method, _, lr = item.strip().partition("@")
        try:
            if method not in arena.METHODS or not float(lr) > 0:  # also refuses nan
                raise ValueError
            runs.append((method, float(lr)))
        except ValueError:
            raise SystemExit(
                f"--runs: {item!r} is not METHOD@LR with METHOD one of {', '.join(arena.METHODS)}"
            ) from None
    return runs


def main() -> None:
    parser = preset_parser(__doc__, arena.PRESETS, default="cpu")  # micro: a smoke test
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--runs", required=True, help="METHOD@LR pairs, comma-separated, e.g. gkd@3e-3,sft@1e-2")
    parser.add_argument("--seed", type=int, default=None, help="default: the preset's tuning seed")
    parser.add_argument("--repair-rate", type=float, default=0.3, help="repair and dagger: fraction of steps")
    parser.add_argument("--cache-dir", default=os.path.join(".cache", "arena"), help="where teachers are cached")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)  # as arena.py's main: its thread count shapes the warm start
    runs = parse_runs(args.runs)
    seed = arena.PRESETS[args.preset]["tuning_seed"] if args.seed is None else args.seed
    report = pilot(args.preset, args.variant, runs, seed, args.repair_rate, args.cache_dir)
    write_report(report, args.out)
    arena.print_seed(report, [*arena.RUN_COLUMNS[:2], ("at half", "half_acc_smoothed", ".1%"), *arena.RUN_COLUMNS[2:]])


if __name__ == "__main__":
    main()
