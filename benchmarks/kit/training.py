"""How a benchmark configures and times its trainers: quiet training arguments, and a clock around `train()`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from transformers import TrainerCallback

# A benchmark's trainers report nothing, save nothing, show no progress bar and log nothing (a step's logging is work
# on the clock); they train in float32, from seed 0. The caller's settings come on top and may change any of these.
QUIET = dict(report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6, bf16=False, seed=0)


def quiet_args(config_cls: type, output_dir: str, **settings: Any) -> Any:
    """`config_cls` (transformers' `TrainingArguments`, or a TRL or NPD config built on it) with `QUIET`'s settings
    under `settings`."""
    return config_cls(output_dir=output_dir, **{**QUIET, **settings})


class TrainingClock(TrainerCallback):
    """Training wall time: from `on_train_begin` until `stop`, which the caller calls when `train()` returns (NPD
    stops its generator process after `on_train_end`, and that is training's time too), less what `paused`
    excluded, plus `offset_s` (work before `train()` that belongs to the run, such as SFT's teacher samples)."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s
        self.start_s: float | None = None  # perf_counter at on_train_begin
        self.end_s: float | None = None  # perf_counter at stop
        self.wall_s: float | None = None
        self._paused_s = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_s = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_s - self._paused_s + self.offset_s

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Keep what runs inside off the clock (copying a checkpoint to evaluate it later)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused_s += time.perf_counter() - start

    def stop(self) -> float:
        self.end_s = time.perf_counter()
        self.wall_s = self.end_s - self.start_s - self._paused_s + self.offset_s
        return self.wall_s


def train_timed(trainer: Any, clock: TrainingClock) -> float:
    """`trainer.train()` on `clock`, which goes first among the callbacks so that NPD's generator start-up (in its
    own `on_train_begin`) is on it; returns the wall time."""
    trainer.callback_handler.callbacks.insert(0, clock)
    trainer.train()
    return clock.stop()


def toy_npd_trainer(pair: str, output_dir: str, prompts: int, callbacks: list | None = None, **settings: Any) -> Any:
    """`NearPolicyDistillTrainer` on a toy pair of the registry (`registry.PAIRS`) and `prompts` arithmetic
    conversations (`trl_npd.toy`), with quiet arguments under `settings`."""
    from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
    from trl_npd.toy import arithmetic_dataset

    from .registry import PAIRS

    tokenizer, student, teacher = PAIRS[pair].build()
    args = quiet_args(NearPolicyDistillConfig, output_dir, **settings)
    return NearPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=arithmetic_dataset(prompts),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def preset_npd_trainer(preset: dict[str, Any], output_dir: str, **settings: Any) -> Any:
    """`toy_npd_trainer` on 512 prompts with a preset's `pair`, `steps`, `batch` and `new_tokens`: the shape the
    NPD-only benchmarks share; `settings` add to or override it."""
    shape = {
        "max_steps": preset["steps"],
        "per_device_train_batch_size": preset["batch"],
        "max_new_tokens": preset["new_tokens"],
    }
    return toy_npd_trainer(preset["pair"], output_dir, prompts=512, **{**shape, **settings})
