"""The micro-batches of one optimizer step, in the form the loss reads: cut to `max_length`, then packed (or
padded), and kept until the step ends so that a non-finite loss can name the samples behind it."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .batching import Sequence, keep_last_tokens, pad_sequences
from .metrics import NPDMetrics
from .nonfinite import find_nonfinite_samples, nonfinite_loss_message
from .packing import pack_sequences, row_token_budget
from .samples import Sample, TakeResult

logger = logging.getLogger(__name__)


class OnceWarnings:
    """Warnings given once per `train()` call: what they report is counted in the metrics every time."""

    def __init__(self) -> None:
        self._given: set[str] = set()

    def reset(self) -> None:
        self._given = set()

    def __call__(self, key: str, message: str, *args: Any) -> None:
        if key not in self._given:
            self._given.add(key)
            logger.warning(message, *args)


class StepBatches:
    """Builds the step's micro-batches and remembers them until the next step begins.

    Args:
        args: the config, whose `max_length` (read at each batch: a caller may change it in place) cuts off-policy
            rows longer than it to their last `max_length` tokens (None: no cut), and bounds the packing budget.
        pad_token_id: fills padded rows.
        pack: pack the samples of a micro-batch into rows (padding-free) instead of padding one sample per row.
        per_sample_attention: both models attend per sample in a packed row (flash-attention's varlen path), so that
            rows can be as long as the packing budget allows.
    """

    def __init__(
        self,
        args: Any,
        pad_token_id: int,
        pack: bool,
        per_sample_attention: bool,
        metrics: NPDMetrics,
        warn_once: OnceWarnings,
    ) -> None:
        self.args = args
        self.pad_token_id = pad_token_id
        self.pack = pack
        self.per_sample_attention = per_sample_attention
        self.metrics = metrics
        self.warn_once = warn_once
        # this optimizer step's micro-batches as built (sequences, and samples when generated), and how many have
        # reached the loss: only read to name the culprits of a non-finite loss
        self.built: list[tuple[list[Sequence], list[Sample] | None]] = []
        self.in_loss = 0

    def begin_step(self) -> None:
        self.built, self.in_loss = [], 0

    def build(self, sequences: list[Sequence], samples: list[Sample] | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch of `sequences` (with the `samples` they came from, when generated)."""
        self.built.append((sequences, samples))
        if not self.pack:
            return pad_sequences(sequences, self.pad_token_id)
        budget = row_token_budget(
            [len(s.input_ids) for s in sequences], self.args.max_length, self.per_sample_attention
        )
        batch, stats = pack_sequences(sequences, budget, self.pad_token_id)
        self.metrics.record_packing(stats)
        return batch

    def within_max_length(self, sequences: list[Sequence]) -> list[Sequence]:
        """Off-policy rows cut to their last `max_length` tokens: a collator the caller passed (or pre-tokenized
        rows) can hand over longer ones, which would outgrow a learned position table that `max_length` was fitted
        to, or the packing budget."""
        if self.args.max_length is None:
            return sequences
        sequences, cut = keep_last_tokens(sequences, self.args.max_length)
        if cut:
            self.warn_once(
                "off_policy_cut",
                "%d off-policy samples of this batch were longer than max_length=%d tokens (the data collator let "
                "them through) and were cut to their last max_length tokens. Raise max_length, or have the collator "
                "cut them as you prefer. Shown once per train().",
                cut,
                self.args.max_length,
            )
        return sequences

    def next_in_loss(self) -> int:
        """The index of the micro-batch the loss is computing now."""
        index, self.in_loss = self.in_loss, self.in_loss + 1
        return index

    def nonfinite_report(
        self, loss: float, step: int, micro_batch: int, models: tuple[nn.Module, nn.Module] | None, device: Any
    ) -> str:
        """Name the samples of the failing micro-batch whose logits are not finite, and in which model. `models`
        (student, teacher; unwrapped) is None where a lone forward would wait on the other ranks (sharded)."""
        findings = None
        if micro_batch < len(self.built) and models is not None:
            sequences, samples = self.built[micro_batch]
            findings = find_nonfinite_samples(*models, sequences, samples, device)
        return nonfinite_loss_message(loss, step, micro_batch, max(len(self.built), 1), findings)


def warn_about_inputs(result: TakeResult, max_prompt_tokens: int | None, warn_once: OnceWarnings) -> None:
    """Say once per `train()` that prompts were cut or completions came back empty; both are counted always."""
    truncated = sum(batch.truncated_prompts for batch in result.received)
    if truncated:
        warn_once(
            "truncated",
            "%d prompts of this generation were longer than max_length - max_new_tokens = %d tokens and were cut "
            "from the left (oldest context first). Every cut prompt is counted in npd/truncated_prompts; raise "
            "max_length or lower max_new_tokens to keep prompts whole.",
            truncated,
            max_prompt_tokens,
        )
    if result.dropped_empty_completion:
        warn_once(
            "empty_completion",
            "The generator returned %d completions without a single token; they are dropped and counted in "
            "npd/dropped_empty_completion. An engine returns an empty completion when a prompt fills its "
            "context or its token limit is 0: check max_length, max_new_tokens and the engine's own limits.",
            result.dropped_empty_completion,
        )
