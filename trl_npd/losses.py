"""The distillation loss of a training batch: which objective, on which path, summed over the trained tokens.

`distillation_loss` runs the student once, and the teacher unless the batch carries the teacher's top-k from the
scoring stage, at the trained positions only; then it takes one objective:
- the generalized JSD (`fused_jsd.fused_jsd_sum` on the chunked path);
- NPD's top-k objective, or the generalized JSD over the top-k buckets (`topk_loss`);
on one of two paths: the plain reference path (`use_fused_loss=False`) on the models' own full logits, or the
chunked path (`chunked`), which never materializes the `(tokens x vocab)` logits. Each chunked path equals the plain
one, loss and gradients (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .batching import IGNORE_INDEX
from .chunked import chunked_sum
from .divergences import generalized_jsd_sum, topk_bucket_jsd, topk_token_loss
from .fused_jsd import fused_jsd_sum
from .heads import (
    LogitTransform,
    backbone,
    chunked_token_logprobs,
    lm_head,
    logit_transform,
    teacher_topk,
    token_logprobs,
)


def topk_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    ce_weight: float,
    jsd_beta: float | None,
) -> torch.Tensor:
    """The top-k objective summed over rows of the student's float32 logits: NPD's CE + forward KL
    (`topk_token_loss`, CE weighted by `ce_weight`), or with `jsd_beta` the generalized JSD over the top-k buckets
    (`topk_bucket_jsd`)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if jsd_beta is None:
        return topk_token_loss(logprobs, targets, teacher_topk_ids, teacher_topk_logprobs, ce_weight).sum()
    return topk_bucket_jsd(logprobs, teacher_topk_ids, teacher_topk_logprobs, jsd_beta).sum()


@dataclass
class Outputs:
    """A model's output at the trained positions, one row per position: `(N, H)` hidden states with the head and
    transform that make them logits (the chunked path), or `(N, V)` logits from the model's own forward (the plain
    path, which handles any head)."""

    states: torch.Tensor
    head: nn.Linear | None = None
    transform: LogitTransform | None = None

    @classmethod
    def of(cls, model: nn.Module, forward: dict[str, Any], mask: torch.Tensor, chunked: bool) -> Outputs:
        if not chunked:
            return cls(model(**forward).logits[:, :-1][mask])
        head, transform = lm_head(model), logit_transform(model)  # a head the chunks cannot read is refused first
        return cls(backbone(model)(**forward).last_hidden_state[:, :-1][mask], head, transform)

    def sum(self, loss: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """`loss(logits, *rows)`, summed over the positions: chunk by chunk, or on the full logits."""
        if self.head is None:
            return loss(self.states.float(), *rows)
        return chunked_sum(loss, self.states, self.head, *rows, transform=self.transform, chunk_size=chunk_size)

    def token_logprobs(self, tokens: torch.Tensor, temperature: float, chunk_size: int | None) -> torch.Tensor:
        """The log-probs of `tokens` at `temperature`, detached."""
        if self.head is None:
            return token_logprobs(self.states.detach(), tokens, temperature)
        return chunked_token_logprobs(self.states, self.head, tokens, temperature, chunk_size, self.transform)


@dataclass
class LossResult:
    loss_sum: torch.Tensor  # summed over trained tokens; the caller normalizes
    num_tokens: torch.Tensor
    mask: torch.Tensor  # (B, L-1) trained positions, after the causal shift
    current_logprobs: torch.Tensor | None  # student log-probs of the trained tokens, detached, when requested


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    inputs: dict[str, Any],
    beta: float,
    *,
    fused: bool,
    temperature: float = 1.0,
    logprob_temperature: float | None = None,
    chunk_size: int | None = None,
    compiled: bool = False,
    teacher_top_k: int | None = None,
    ce_weight: float = 0.0,
    topk_jsd: bool = False,
) -> LossResult:
    """The distillation loss on a padded or packed batch, summed over trained tokens.

    The objective is the generalized JSD(beta) over the full vocabulary or, with `teacher_top_k`, NPD's top-k
    objective (`topk_token_loss`, weighted by `ce_weight`), or with `topk_jsd` the generalized JSD(beta) over the
    top-k buckets (`topk_bucket_jsd`). The top-k objective uses the teacher top-k stored in the
    batch by the scoring stage (no teacher forward); a batch without them (dataset completions) gets them from a
    teacher forward here. `inputs` holds `input_ids`, `labels` and either `attention_mask` (padded rows) or
    `position_ids` (packed rows). `temperature` divides both models' logits before the JSD, as TRL's
    `DistillationTrainer` does (GKD takes it at 1); the top-k objectives take it at 1 only. With
    `logprob_temperature`, also returns the student's log-probs of the trained tokens at that temperature. `fused`
    takes the chunked path; `compiled` runs the fused JSD's chunks through `torch.compile`.
    """
    if teacher_top_k is not None and temperature != 1.0:
        raise ValueError(
            f"The top-k objectives take the divergence at temperature 1 (the scoring stage stores the teacher's "
            f"top-k log-probs at temperature 1), not at {temperature}."
        )
    forward = {"input_ids": inputs["input_ids"], "use_cache": False}  # a cache would drop the packed-sequence mask
    for key in ("attention_mask", "position_ids"):
        if inputs.get(key) is not None:
            forward[key] = inputs[key]
    labels = inputs["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels[mask]
    student_outputs = Outputs.of(student, forward, mask, chunked=fused)
    if teacher_top_k is None:
        with torch.no_grad():
            teacher_outputs = Outputs.of(teacher, forward, mask, chunked=fused)
        loss_sum = _jsd_sum(student_outputs, teacher_outputs, targets, beta, temperature, chunk_size, compiled)
    else:
        topk = _teacher_topk(teacher, inputs, forward, mask, teacher_top_k, chunk_size)
        objective = partial(topk_loss, ce_weight=ce_weight, jsd_beta=beta if topk_jsd else None)
        loss_sum = student_outputs.sum(objective, targets, *topk, chunk_size=chunk_size)
    current = None
    if logprob_temperature is not None:
        current = student_outputs.token_logprobs(targets, logprob_temperature, chunk_size)
    return LossResult(loss_sum=loss_sum, num_tokens=mask.sum(), mask=mask, current_logprobs=current)


def _jsd_sum(
    student: Outputs,
    teacher: Outputs,
    targets: torch.Tensor,
    beta: float,
    temperature: float,
    chunk_size: int | None,
    compiled: bool,
) -> torch.Tensor:
    if student.head is None:  # the reference, on the models' own logits
        return generalized_jsd_sum(student.states, teacher.states, targets != IGNORE_INDEX, beta, temperature)
    return fused_jsd_sum(
        student.states,
        student.head,
        teacher.states,
        teacher.head,
        targets,
        beta,
        temperature=temperature,
        chunk_size=chunk_size,
        compiled=compiled,
        student_transform=student.transform,
        teacher_transform=teacher.transform,
    )


def _teacher_topk(
    teacher: nn.Module,
    inputs: dict[str, Any],
    forward: dict[str, Any],
    mask: torch.Tensor,
    k: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (ids, log-probs) at the trained positions: stored in the batch by the scoring stage, or
    from a teacher forward here (dataset completions)."""
    if "teacher_topk_ids" in inputs:
        return inputs["teacher_topk_ids"][:, 1:][mask], inputs["teacher_topk_logprobs"][:, 1:][mask]
    with torch.no_grad():
        outputs = Outputs.of(teacher, forward, mask, chunked=True)
    return teacher_topk(outputs.states, outputs.head, k, chunk_size, outputs.transform)
