"""`log_samples`: the fate of every generated sample, one JSON line each, so a result can be traced to its data.

A line is written when the trainer learns a sample's fate: trained on at an optimizer step (with its staleness
then), evicted past the staleness bound or for an empty completion, or discarded by the generator before the buffer
(Δ-IFD, an empty prompt), including those in batches still on their way when training ends. Samples still unused
when training ends are counted in `npd_metrics.totals`, not listed.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

from .samples import Rejected, Sample, TakeResult

FILE_NAME = "npd_samples.jsonl"


def sample_log_path(output_dir: str, process_index: int, world_size: int) -> str:
    """`<output_dir>/npd_samples.jsonl`, or one file per rank (`npd_samples.rank<r>.jsonl`) with several."""
    if world_size == 1:
        return os.path.join(output_dir, FILE_NAME)
    stem, ext = os.path.splitext(FILE_NAME)
    return os.path.join(output_dir, f"{stem}.rank{process_index}{ext}")


class SampleLog:
    """Appends one JSON object per sample fate to `path` (created, with its folder, on first use)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def record(self, result: TakeResult, step: int) -> None:
        """Everything one `take` at optimizer step `step` decided: trained, evicted as stale, rejected upstream."""
        lines = [_line(s, step, "trained") for s in result.samples]
        lines += [_line(s, step, "dropped", "stale") for s in result.stale]
        lines += [_line(s, step, "dropped", "empty_completion") for s in result.empty]
        for batch in result.received:
            lines += [_rejected_line(r) for r in batch.rejected]
        self._write(lines)

    def record_rejected(self, rejected: list[Rejected]) -> None:
        """The generator's drops in batches that were still on their way when training ended."""
        self._write([_rejected_line(r) for r in rejected])

    def _write(self, lines: list[dict[str, Any]]) -> None:
        if not lines:
            return
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a")  # held open across steps; close() closes it
        self._file.writelines(json.dumps(line) + "\n" for line in lines)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _rejected_line(r: Rejected) -> dict[str, Any]:
    return {
        "prompt_index": r.prompt_index,
        "stream_position": r.stream_position,
        "policy_version": r.policy_version,
        "policy_step": r.policy_step,
        "ifd_delta": _finite(r.ifd_delta),
        "completion_tokens": r.completion_tokens,
        "fate": "dropped",
        "reason": r.reason,
    }


def _line(sample: Sample, step: int, fate: str, reason: str | None = None) -> dict[str, Any]:
    line = {
        "prompt_index": sample.prompt_index,
        "stream_position": sample.stream_position,
        "policy_version": sample.policy_version,
        "policy_step": sample.policy_step,
        "ifd_delta": _finite(sample.ifd_delta),
        "completion_tokens": len(sample.completion_ids),
        "fate": fate,
        "step": step,
        "staleness": step - sample.policy_step,
    }
    if reason is not None:
        line["reason"] = reason
    return line


def _finite(value: float | None) -> float | None:
    """JSON has no NaN: an undefined Δ-IFD is written as null."""
    return None if value is None or math.isnan(value) else value
