"""`log_completions`: a few recently trained samples, shown as TRL's online trainers show theirs.

The trainer remembers the last `num_completions_to_print` samples it trained on (token ids, Δ-IFD, staleness at
the step it used them) and, at each logging step, prints them as a table and hands them to wandb when it is a
`report_to` backend. Decoding waits until then, so steps that do not log pay nothing for it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .samples import Sample

COLUMNS = ("step", "prompt", "completion", "Δ-IFD", "staleness")


@dataclass
class _Row:
    step: int
    prompt_ids: list[int]
    completion_ids: list[int]
    ifd_delta: float | None
    staleness: int


class CompletionLog:
    """The most recent trained samples, ready to print or log."""

    def __init__(self, size: int) -> None:
        self._rows: deque[_Row] = deque(maxlen=size)

    def record(self, samples: list[Sample], step: int) -> None:
        for s in samples[-self._rows.maxlen :]:
            self._rows.append(_Row(step, s.prompt_ids, s.completion_ids, s.ifd_delta, step - s.policy_step))

    def rows(self, tokenizer: Any) -> list[tuple[int, str, str, str, int]]:
        return [
            (
                row.step,
                tokenizer.decode(row.prompt_ids, skip_special_tokens=True),
                tokenizer.decode(row.completion_ids, skip_special_tokens=True),
                "-" if row.ifd_delta is None or math.isnan(row.ifd_delta) else f"{row.ifd_delta:.3f}",
                row.staleness,
            )
            for row in self._rows
        ]

    def emit(self, tokenizer: Any, report_to: list[str]) -> str:
        """Print the table (with rich when it is installed) and log it to wandb; returns the plain-text table."""
        rows = self.rows(tokenizer)
        text = plain_table(rows)
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(text)
        else:
            table = Table(*COLUMNS, title="NPD: recent completions", show_lines=True)
            for row in rows:
                table.add_row(*(str(value) for value in row))
            Console().print(table)
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"npd/completions": wandb.Table(columns=list(COLUMNS), data=[list(r) for r in rows])})
        return text


def plain_table(rows: list[tuple[Any, ...]]) -> str:
    lines = [" | ".join(COLUMNS)]
    lines += [" | ".join(str(value).replace("\n", "\\n") for value in row) for row in rows]
    return "\n".join(lines)
