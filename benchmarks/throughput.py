"""Training throughput of NPD against TRL's on-policy distillation trainers, on the same work.

    python benchmarks/throughput.py --preset cpu-tiny --out results/throughput-cpu-tiny.json

Every trainer gets the same student and teacher (same seeds), the same pool of prompts, `max_new_tokens`,
effective batch and optimizer steps, the same divergence (generalized JSD, beta 0.5) at sampling temperature 1, and
trains on each generated sample once:

- `gkd`: TRL's `GKDTrainer` with `lmbda=1` (samples with the student before every step);
- `distillation`: `trl.DistillationTrainer` with transformers' `generate` (no vLLM);
- `npd-distillation`: `NPDDistillationTrainer`, the one-line swap for `DistillationTrainer`, at its defaults and
  the same settings as `distillation`;
- `npd`: `NearPolicyDistillTrainer` with its defaults (background process, the start-up bootstrap, Δ-IFD off, the
  KL-bounded refresh);
- `npd-ifd`: the same with Δ-IFD selection on, to show what selection costs;
- `npd-topk`: the defaults with the NPD paper's objective (`teacher_top_k=10`): the generator scores each sample's
  teacher top-k, so the training step runs no teacher forward;
- `npd-process`: the generator in its own process (`generator_mode="process"`), by name: today the same as `npd`,
  but a CPU-only machine's default was inline until after commit 57fb8aa, and reports of both periods compare;
- `npd-padded`: the defaults on right-padded rows (`padding_free=False`): with `pad_frac`, what packing saves;
- `npd-sync`: the generator forced inline (`generator_mode="inline"`): what asynchrony alone buys;
- `npd-vllm` (CUDA and vLLM only, so not in the default list): the defaults with a colocated vLLM engine generating
  (`generation_backend="vllm"`, `vllm_mode="colocate"`, 30% of the GPU's memory); vLLM builds the student from a
  checkpoint, so the student is saved and loaded back before the clock starts;
- `ceiling`: NPD's training loop fed from a buffer filled before the clock starts (generation removed): the rate
  the optimizer alone sustains.

Each trainer runs in a fresh Python process, one after the other, so that memory peaks and thread pools are its
own; on CUDA its models are initialized on the GPU. The report is rewritten after every trainer, so a run stopped
part-way (a time limit) keeps the trainers it finished. The clock runs from the `on_train_begin` callback until
`train()` returns, so it includes NPD's generator start-up and shutdown but not model loading. Reported per
trainer:

- `samples_per_s`: samples trained on per second of that wall time;
- `completion_tokens_per_s`: completion tokens trained on (counted in the loss inputs) per second;
- `steady_samples_per_s`, `steady_completion_tokens_per_s`: the same rates after the first optimizer step, which
  holds every trainer's start-up (NPD's generator process start, everyone's first generation): the rate a long
  run tends to;
- `startup_wait_s` (NPD): seconds the optimizer sat idle waiting for its first samples (with the start-up bootstrap
  it samples them itself instead, which is work: `bootstrap_s`, counted as inline generation); `steady_wait_frac`:
  the share of the wall time after the first optimizer step it spent waiting for samples;
- `pad_frac`: the share of the training forward's positions that were padding, in each trainer's own layout
  (right-padded rows, NPD's packed rows); `mean_completion_tokens`: completion tokens trained on per sample. What
  packing saves is `npd` against `npd-padded`, the same trainer on right-padded rows;
- `setup_s`: seconds to construct the trainer (model loading excluded), reported apart since NPD runs its
  construction-time probes there;
- `peak_mem_mb`: CPU: peak resident memory of the trainer process plus that of its largest child (the generator);
  CUDA: `torch.cuda.max_memory_allocated` of the trainer process (a generator process's own GPU memory is not in it;
  a colocated vLLM engine's weights and KV cache are);
- `wait_frac`: fraction of the wall time the optimizer was blocked waiting for samples (NPD only: for `npd-sync`
  that is its inline generation; for TRL's trainers, which generate inline by design, null).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import resource
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline, huggingface_hub sends no telemetry either

from kit.child import child_result, hand_back
from kit.cli import preset_parser
from kit.provenance import LOADED_COMMIT
from kit.registry import PAIRS, PrunedSmolLM2, presets
from kit.report import keyed, print_table, save_figure, stamp, subplots, write_report
from kit.training import TrainingClock, quiet_args, train_timed

# NPD's variants, each with the settings it changes from the defaults (`NearPolicyDistillConfig`'s)
NPD_VARIANTS: dict[str, dict[str, Any]] = {
    "npd": {},
    "npd-process": {"generator_mode": "process"},
    "npd-padded": {"padding_free": False},  # what packing saves: the same trainer on right-padded rows
    "npd-ifd": {"ifd_filter": True},
    "npd-topk": {"teacher_top_k": 10},
    "npd-sync": {"generator_mode": "inline"},
    # generation is done before the clock starts, so nothing in it should be selected or timed
    "ceiling": {"generator_mode": "inline", "ifd_filter": False},
    "npd-vllm": {"generation_backend": "vllm", "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3},
}
TRAINERS = ["gkd", "distillation", "npd-distillation", *NPD_VARIANTS]
# trainers that generate with a colocated vLLM engine: they need a CUDA device and vLLM, and a student on disk
VLLM_TRAINERS = ("npd-vllm",)
DEFAULT_TRAINERS = [name for name in TRAINERS if name not in VLLM_TRAINERS]

PRESETS = presets("throughput")  # kit/registry.py: the pair, new tokens, effective batch, steps


# ---- one trainer, in its own process -----------------------------------------------------------------------------
def build_models(preset: dict[str, Any], device: str | None = None) -> tuple[Any, Any, Any]:
    """Tokenizer, student and teacher, initialized on `device` (default: the GPU where there is one, else the CPU:
    random initialization of GPU-sized models costs seconds of CPU time per process)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else None)
    tokenizer, student, teacher = PAIRS[preset["pair"]].build(device)
    if preset.get("bf16"):
        teacher = teacher.to(torch.bfloat16)  # the teacher only runs forward: keep it in bf16, as users would
    return tokenizer, student, teacher


def common_args(preset: dict[str, Any], output_dir: str, config_cls: type, **settings: Any) -> Any:
    """`config_cls` with what every trainer shares: the same steps, batch, divergence and sampling temperature."""
    return quiet_args(
        config_cls,
        output_dir,
        max_steps=preset["steps"],
        per_device_train_batch_size=preset["batch"],
        gradient_accumulation_steps=1,
        learning_rate=1e-5,
        beta=0.5,
        temperature=1.0,
        gradient_checkpointing=False,
        bf16=bool(preset.get("bf16")),
        **settings,
    )


# where each trainer generates inline, inside its training step (NPD generates outside it, in the background)
INLINE_GENERATION = ("generate_on_policy_outputs", "_generate_and_score_completions")


def counting(trainer_cls: type) -> type:
    """`trainer_cls` that counts the completion tokens it trains on and times its training steps.

    `step_s` is the time inside `training_step` (forward, backward and, for TRL's trainers, inline generation);
    `inline_generation_s` the part of it spent generating.
    """

    class Counting(trainer_cls):
        bench_tokens = 0
        bench_positions = 0  # token positions the forward ran on, padding included
        bench_padding = 0
        step_s = 0.0
        inline_generation_s = 0.0

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                type(self).bench_tokens += completion_tokens(inputs)
                positions, padding = padded_positions(inputs, self.processing_class.pad_token_id)
                type(self).bench_positions += positions
                type(self).bench_padding += padding
            return super().compute_loss(model, inputs, *args, **kwargs)

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return super().training_step(*args, **kwargs)
            finally:
                type(self).step_s += time.perf_counter() - start

    for name in INLINE_GENERATION:
        raw = inspect.getattr_static(trainer_cls, name, None)
        if isinstance(raw, staticmethod):  # GKD's generate_on_policy_outputs
            setattr(Counting, name, staticmethod(_timed(raw.__func__, Counting)))
        elif raw is not None:
            setattr(Counting, name, _timed(raw, Counting))
    return Counting


def completion_tokens(inputs: dict[str, Any]) -> int:
    """Completion tokens in one training batch: DistillationTrainer's completion mask, the others' labelled tokens."""
    if "completion_mask" in inputs:
        return int(inputs["completion_mask"].sum())
    return int((inputs["labels"] != -100).sum())


def padded_positions(inputs: dict[str, Any], pad_token_id: int) -> tuple[int, int]:
    """(positions, padding positions) of one training batch, as each trainer lays it out.

    DistillationTrainer: its prompt and completion masks. GKD and NPD's padded path: the attention mask. NPD's packed
    rows (no attention mask): the tail segment of a row, whose positions restart at 0 and whose ids are all padding
    (a real sequence starts with its prompt, never with the pad token)."""
    if "completion_mask" in inputs:
        positions = inputs["prompt_ids"].numel() + inputs["completion_ids"].numel()
        return positions, positions - int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return ids.numel(), ids.numel() - int(inputs["attention_mask"].sum())
    padding = 0
    for row_ids, row_positions in zip(ids, inputs["position_ids"], strict=True):
        tail = int((row_positions == 0).nonzero()[-1])
        if tail > 0 and bool((row_ids[tail:] == pad_token_id).all()):
            padding += len(row_ids) - tail
    return ids.numel(), padding


def _timed(function: Any, owner: type) -> Any:
    """`function`, adding its run time to `owner.inline_generation_s`."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            owner.inline_generation_s += time.perf_counter() - start

    return timed


def make_trainer(name: str, preset: dict[str, Any], output_dir: str, models: tuple[Any, Any, Any]) -> Any:
    from trl_npd.toy import arithmetic_dataset

    tokenizer, student, teacher = models
    prompts = 4 * preset["steps"] * preset["batch"]  # enough distinct prompts that nobody repeats one
    if isinstance(PAIRS[preset["pair"]], PrunedSmolLM2):
        import smollm2

        dataset = smollm2.question_dataset(prompts, seed=0)
    else:
        dataset = arithmetic_dataset(prompts, seed=0)
    bootstrap = {"generator_bootstrap": preset.get("bootstrap", True)}
    if name == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config_cls, trainer_cls = GKDConfig, GKDTrainer
        settings = {"lmbda": 1.0, "max_new_tokens": preset["new_tokens"]}
    elif name == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        config_cls, trainer_cls = DistillationConfig, DistillationTrainer
        settings = {"max_completion_length": preset["new_tokens"]}
    elif name == "npd-distillation":  # distillation's script after the one-line swap
        from trl_npd import NPDDistillationConfig, NPDDistillationTrainer

        config_cls, trainer_cls = NPDDistillationConfig, NPDDistillationTrainer
        settings = {"max_completion_length": preset["new_tokens"], **bootstrap}
    else:
        from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer

        config_cls = NearPolicyDistillConfig
        trainer_cls = _ceiling_trainer_cls() if name == "ceiling" else NearPolicyDistillTrainer
        settings = {"lmbda": 1.0, "max_new_tokens": preset["new_tokens"], **bootstrap, **NPD_VARIANTS[name]}
    if name in ("distillation", "npd-distillation"):  # DistillationTrainer's dataset: prompts alone
        dataset = dataset.map(lambda row: {"prompt": row["messages"][:1]}, remove_columns=["messages"])
    args = common_args(preset, output_dir, config_cls, **settings)
    return counting(trainer_cls)(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def _ceiling_trainer_cls() -> type:
    from trl_npd import NearPolicyDistillTrainer
    from trl_npd.batching import sequences_from_samples

    class CeilingTrainer(NearPolicyDistillTrainer):
        """NPD fed from samples generated before training starts, each retagged as fresh when taken."""

        def prefill(self) -> None:
            needed = self.args.max_steps * self.args.per_device_train_batch_size
            self._start_generation()
            self._prefilled = list(self._generation.pipeline.take(needed, current_step=0).samples)

        def _on_policy_batch(self) -> dict[str, Any]:
            samples = [self._prefilled.pop() for _ in range(self.args.per_device_train_batch_size)]
            for sample in samples:  # generated "just now": the staleness bound never evicts a prefilled sample
                sample.policy_step = self.state.global_step
            self.npd_metrics.totals.consumed_samples += len(samples)
            return self._batches.build(sequences_from_samples(samples))

    return CeilingTrainer


class FirstStepClock(TrainingClock):
    """The training clock, which also notes, at the end of the first optimizer step, the time, the completion tokens
    trained so far and NPD's wait so far: what start-up cost, apart from the steady rate."""

    def __init__(self, trainer: Any) -> None:
        super().__init__()
        self.trainer = trainer
        self.first_step_end: float | None = None
        self.first_step_tokens = 0
        self.first_step_wait_s = 0.0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()
            self.first_step_tokens = type(self.trainer).bench_tokens
            metrics = getattr(self.trainer, "npd_metrics", None)
            self.first_step_wait_s = 0.0 if metrics is None else metrics.totals.wait_s


def peak_mem_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN holds the largest child that has been waited for
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + child) / 1024


def vllm_refusal(names: list[str]) -> str | None:
    """Why the vLLM trainers among `names` cannot run on this machine, or None."""
    wanted = [name for name in names if name in VLLM_TRAINERS]
    if not wanted:
        return None
    import torch

    if not torch.cuda.is_available():
        return (
            f"{', '.join(wanted)} needs a CUDA GPU: a colocated vLLM engine generates on the GPU, and this machine "
            "has none (torch.cuda.is_available() is False). Leave it out of --trainers here."
        )
    if importlib.util.find_spec("vllm") is None:
        return f"{', '.join(wanted)} needs vLLM, which is not installed: pip install -e '.[vllm]'."
    return None


def student_on_disk(models: tuple[Any, Any, Any], folder: str) -> tuple[Any, Any, Any]:
    """The same models, with the student saved to `folder` and loaded back, so that vLLM can build it by name."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, student, teacher = models
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), teacher


def run_one(name: str, preset: dict[str, Any]) -> dict[str, Any]:
    refusal = vllm_refusal([name])
    if refusal:
        raise SystemExit(refusal)
    with tempfile.TemporaryDirectory() as output_dir:
        models = build_models(preset)
        if name in VLLM_TRAINERS:
            models = student_on_disk(models, os.path.join(output_dir, "student"))
        build_start = time.perf_counter()
        trainer = make_trainer(name, preset, output_dir, models)
        setup_s = time.perf_counter() - build_start
        if name == "ceiling":
            trainer.prefill()
        clock = FirstStepClock(trainer)
        wall_s = train_timed(trainer, clock)
    steps = trainer.state.global_step
    samples = steps * preset["batch"]
    cls = type(trainer)
    # after the first optimizer step: start-up (a generator process, the first generation) is behind every trainer
    steady_s = clock.end_s - clock.first_step_end
    wait_frac = steady_wait_frac = startup_wait_s = None
    wait_s = bootstrap_s = 0.0
    extras = {}
    totals = getattr(getattr(trainer, "npd_metrics", None), "totals", None)  # None: one of TRL's trainers
    if totals is not None:
        assert totals.consumed_samples == samples, (totals.consumed_samples, samples)
        extras = {
            "generated_samples": totals.generated_samples,
            "dropped": dict(totals.dropped),
            "first_sample_wait_s": totals.first_sample_wait_s,
            "bootstrap_s": totals.bootstrap_s,
            "bootstrap_samples": totals.bootstrap_samples,
            "weight_syncs": sum(totals.weight_syncs.values()),
        }
    if totals is not None and name != "ceiling":
        wait_s, bootstrap_s = totals.wait_s, totals.bootstrap_s
        wait_frac = wait_s / wall_s
        steady_wait_frac = (wait_s - clock.first_step_wait_s) / steady_s
        startup_wait_s = totals.first_sample_idle_s  # idle; the bootstrap's inline sampling is work
    return {
        "trainer": name,
        "steps": steps,
        "samples": samples,
        "completion_tokens": cls.bench_tokens,
        # completions that end at EOS early make it short of new_tokens, and leave the padding pad_frac counts
        "mean_completion_tokens": cls.bench_tokens / samples,
        "samples_per_s": samples / wall_s,
        "completion_tokens_per_s": cls.bench_tokens / wall_s,
        "wall_s": wall_s,
        "steady_samples_per_s": (samples - preset["batch"]) / steady_s,
        "steady_completion_tokens_per_s": (cls.bench_tokens - clock.first_step_tokens) / steady_s,
        # share of the training forward's positions that were padding: what packing saves
        "pad_frac": cls.bench_padding / cls.bench_positions if cls.bench_positions else None,
        "setup_s": setup_s,
        "startup_wait_s": startup_wait_s,
        "steady_wait_frac": steady_wait_frac,
        "peak_mem_mb": peak_mem_mb(),
        "wait_frac": wait_frac,
        # where the wall time went: generation inside the training step (TRL's trainers; NPD's inline sampling while
        # its generator process starts), waiting for the buffer (NPD; inline generation for npd-sync), forward and
        # backward, and the rest (optimizer, weight syncs, ...)
        "time_s": {
            "inline_generation": cls.inline_generation_s + bootstrap_s,
            "buffer_wait": wait_s,
            "forward_backward": cls.step_s - cls.inline_generation_s,
            "other": wall_s - cls.step_s - wait_s - bootstrap_s,
        },
        **extras,
    }


# ---- the whole comparison ----------------------------------------------------------------------------------------
def parameter_counts(preset: dict[str, Any]) -> dict[str, int]:
    _, student, teacher = build_models(preset, device="meta")  # shapes only: no memory, no initialization
    return {
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
    }


# the rates the table compares with GKD's (as `<rate>_vs_gkd`)
RATES = ("samples_per_s", "completion_tokens_per_s", "steady_samples_per_s", "steady_completion_tokens_per_s")
COLUMNS = [
    ("trainer", "trainer", ""),
    ("samples/s", "samples_per_s", ".2f"),
    ("vs gkd", "samples_per_s_vs_gkd", ".2f"),
    ("tokens/s", "completion_tokens_per_s", ".1f"),
    ("vs gkd", "completion_tokens_per_s_vs_gkd", ".2f"),
    ("steady/s", "steady_samples_per_s", ".2f"),
    ("vs gkd", "steady_samples_per_s_vs_gkd", ".2f"),
    ("steady tok/s", "steady_completion_tokens_per_s", ".1f"),
    ("vs gkd", "steady_completion_tokens_per_s_vs_gkd", ".2f"),
    *keyed(".1f", "wall_s", "setup_s"),
    ("peak_mb", "peak_mem_mb", ".0f"),
    ("wait", "wait_frac", ".0%"),
    ("steady wait", "steady_wait_frac", ".0%"),
    ("startup wait_s", "startup_wait_s", ".2f"),
    ("pad", "pad_frac", ".0%"),
    ("mean len", "mean_completion_tokens", ".1f"),  # None in reports written before the field
]
# where the wall time went (the report's `time_s`), as shares of it
TIME_COLUMNS = [
    ("trainer", "trainer", ""),
    ("generate", "inline_generation", ".0%"),
    ("wait", "buffer_wait", ".0%"),
    ("fwd+bwd", "forward_backward", ".0%"),
    ("other", "other", ".0%"),
]


def print_summary(report: dict[str, Any]) -> None:
    by_name = {r["trainer"]: r for r in report["runs"]}
    gkd = by_name.get("gkd")
    print_table([{**r, **{f"{k}_vs_gkd": r[k] / gkd[k] for k in RATES if gkd}} for r in report["runs"]], COLUMNS)
    print("\nwhere the time goes (share of wall)")
    print_table([{**r, **{k: s / r["wall_s"] for k, s in r["time_s"].items()}} for r in report["runs"]], TIME_COLUMNS)
    npd = by_name.get("npd")
    if npd and report.get("ceiling_samples_per_s"):
        print(f"npd at {npd['samples_per_s'] / report['ceiling_samples_per_s']:.0%} of the ceiling")
    if "npd" in by_name and "npd-padded" in by_name:
        packed, padded = by_name["npd"], by_name["npd-padded"]
        print(
            f"what packing saves: npd {packed['steady_samples_per_s'] / padded['steady_samples_per_s']:.2f}x "
            f"npd-padded in steady state, padding {packed['pad_frac']:.0%} of positions against "
            f"{padded['pad_frac']:.0%}"
        )
    if "distillation" in by_name:
        for name in ("npd-distillation", "npd", "npd-topk"):
            if name in by_name:
                ratio = by_name[name]["steady_samples_per_s"] / by_name["distillation"]["steady_samples_per_s"]
                print(f"{name} vs DistillationTrainer, steady state: {ratio:.2f}x")


def plot(report: dict[str, Any], path: str) -> None:
    runs = report["runs"]
    fig, ax = subplots(figsize=(7, 3.5))
    bars = ax.bar([r["trainer"] for r in runs], [r["samples_per_s"] for r in runs], color="tab:blue")
    for bar, r in zip(bars, runs, strict=True):
        ax.annotate(f"{r['samples_per_s']:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center")
    ax.set_ylabel("samples trained / s")
    ax.set_title(f"Throughput, preset {report['preset']} ({report['device']})", fontsize=9)
    save_figure(fig, path)


def one_trainer_command(name: str, args: argparse.Namespace) -> list[str]:
    """This script, training `name` alone in a fresh process (its `--run-one` mode), at the same settings."""
    command = [sys.executable, __file__, "--preset", args.preset, "--run-one", name]
    command += ["--no-bootstrap"] if args.no_bootstrap else []
    return command + (["--steps", str(args.steps)] if args.steps is not None else [])


def main() -> None:
    parser = preset_parser(__doc__, PRESETS, default="cpu-tiny")
    parser.add_argument(
        "--trainers",
        default=",".join(DEFAULT_TRAINERS),
        help=f"comma-separated subset of {TRAINERS} (default: all but {list(VLLM_TRAINERS)}: CUDA and vLLM only)",
    )
    parser.add_argument("--out", default="results/throughput-cpu-tiny.json")
    parser.add_argument("--plot", default=None, help="PNG path for the bar chart (default: next to --out)")
    parser.add_argument(
        "--no-bootstrap",
        action="store_true",
        help="NPD trainers wait for the generator process to start instead of sampling inline meanwhile",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default: the preset's)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # internal: one trainer, in a child
    args = parser.parse_args()
    preset = {**PRESETS[args.preset], "bootstrap": not args.no_bootstrap}
    if args.steps is not None:
        preset["steps"] = args.steps
    if args.run_one:
        hand_back(run_one(args.run_one, preset))
        return

    names = args.trainers.split(",")
    unknown = [name for name in names if name not in TRAINERS]
    if unknown:
        raise SystemExit(f"unknown trainer {unknown[0]!r}; choose from {TRAINERS}")
    refusal = vllm_refusal(names)
    if refusal:
        raise SystemExit(refusal)

    header = {
        "preset": args.preset,
        **stamp(),
        "commit": LOADED_COMMIT,
        **parameter_counts(preset),
        "new_tokens": preset["new_tokens"],
        "effective_batch": preset["batch"],
        "steps": preset["steps"],
        "trainers": names,
    }
    runs: list[dict[str, Any]] = []
    for name in names:
        runs.append(child_result(one_trainer_command(name, args), name))
        print(f"{name}: {runs[-1]['samples_per_s']:.2f} samples/s", flush=True)
        # after every trainer: a run stopped part-way (a time limit) keeps what it finished
        write_report({**header, "runs": runs, "complete": len(runs) == len(names)}, args.out)
    ceiling = next((r["samples_per_s"] for r in runs if r["trainer"] == "ceiling"), None)
    report = {**header, "runs": runs, "complete": True, "ceiling_samples_per_s": ceiling}
    write_report(report, args.out)
    plot(report, args.plot or os.path.splitext(args.out)[0] + ".png")
    print_summary(report)


if __name__ == "__main__":
    main()
