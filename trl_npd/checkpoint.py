"""The generator's part of a checkpoint, and the checkpoint choices a killed run needs.

A checkpoint holds, next to the weights and the optimizer that transformers saves, the policy version of the weights
last published to the generator and where each prompt stream stood (`npd_state.json`). A resumed run continues both:
its generator starts from the next version and skips the prompts already sampled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger(__name__)

NPD_STATE_NAME = "npd_state.json"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


@dataclass
class NPDState:
    """What `npd_state.json` records. `policy_version` is -1 before any publish; `stream_positions` holds one
    position per prompt stream (one per rank, or one for a shared generator)."""

    policy_version: int = -1
    stream_positions: list[int] = field(default_factory=list)
    single_stream_position: int | None = None  # older checkpoints kept one position, which every stream resumes at

    def stream_position(self, stream: int, streams: int) -> int:
        """Where prompt stream `stream` of `streams` resumes: its own recorded position, or 0 when the checkpoint
        was written by another number of streams (another number of processes, or `shared_generator` changed)."""
        if not self.stream_positions:  # a fresh run, or an older checkpoint's one position
            return self.single_stream_position or 0
        if len(self.stream_positions) != streams:
            logger.warning(
                "The checkpoint has %d prompt streams and this run %d (another number of processes, or "
                "shared_generator changed): the prompt streams restart from the beginning.",
                len(self.stream_positions),
                streams,
            )
            return 0
        return self.stream_positions[stream]


def write_npd_state(folder: str, state: NPDState) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, NPD_STATE_NAME), "w") as f:
        json.dump({"policy_version": state.policy_version, "stream_positions": state.stream_positions}, f, indent=2)


def read_npd_state(resume_from_checkpoint: str | bool | None, output_dir: str) -> NPDState:
    """The state a resumed run continues from (`resume_from_checkpoint` as `Trainer.train` takes it); a fresh
    state when not resuming, or when the checkpoint has none (with a warning)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return NPDState()
    if resume_from_checkpoint is True:
        resume_from_checkpoint = get_last_checkpoint(output_dir)
        if resume_from_checkpoint is None:  # Trainer.train raises the proper error for this
            return NPDState()
    path = os.path.join(resume_from_checkpoint, NPD_STATE_NAME)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: the generator restarts its prompt stream and versions.", path, NPD_STATE_NAME)
        return NPDState()
    with open(path) as f:
        recorded: dict[str, Any] = json.load(f)
    return NPDState(
        policy_version=recorded.get("policy_version", -1),
        stream_positions=list(recorded.get("stream_positions", [])),
        single_stream_position=recorded.get("stream_position"),
    )


def last_complete_checkpoint(output_dir: str, warn: bool = True) -> str | None:
    """The newest checkpoint saved to the end (transformers writes `trainer_state.json` last). A run killed while
    saving leaves a newer, incomplete one behind, which would fail to load; it is skipped, with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)) for name in os.listdir(output_dir) if (match := _CHECKPOINT.fullmatch(name))),
        reverse=True,
    )
    for step in steps:
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        if warn:
            logger.warning(
                "%s is incomplete (it has no %s: the run was stopped while saving it); resuming from an earlier "
                "checkpoint instead.",
                path,
                TRAINER_STATE_NAME,
            )
    return None


def checkpoint_failed_message(folder: str, step: int, error: OSError, output_dir: str) -> str:
    """Why training stops when a checkpoint cannot be written, and where to resume from."""
    last = last_complete_checkpoint(output_dir, warn=False)
    return (
        f"Saving the checkpoint of step {step} to {folder} failed ({type(error).__name__}: {error}), so training "
        f"stops here rather than go on without it. The last complete checkpoint is {last or 'none'}. Make output_dir "
        "writable (permissions, free space), then resume with train(resume_from_checkpoint=True)."
    )
