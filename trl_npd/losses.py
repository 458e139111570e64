"""The distillation loss of a training batch: which objective, on which path, summed over the trained tokens.

`distillation_loss` runs the student (and the teacher, unless the batch carries the teacher's top-k from the
scoring stage) and takes one of:
- the generalized JSD on full logits (the plain reference path, `use_fused_loss=False`);
- the fused JSD (`fused_jsd`), which never materializes the `(tokens x vocab)` logits;
- NPD's top-k objective, plain or chunked (`topk_distill_sum`).
Only the positions trained on are projected on the chunked paths. Each fast path equals the plain one, loss and
gradients (tests/test_losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import IGNORE_INDEX
from .divergences import generalized_jsd_sum, topk_bucket_jsd, topk_token_loss
from .fused_jsd import fused_jsd_sum
from .heads import (
    LogitTransform,
    backbone,
    chunk_rows,
    chunked_token_logprobs,
    lm_head,
    logit_transform,
    project,
    teacher_topk,
    token_logprobs,
)


def topk_objective(
    student_logprobs: torch.Tensor,
    targets: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    ce_weight: float,
    jsd_beta: float | None,
) -> torch.Tensor:
    """The per-token top-k objective: NPD's CE + forward KL, or with `jsd_beta` the bucketed generalized JSD."""
    if jsd_beta is None:
        return topk_token_loss(student_logprobs, targets, teacher_topk_ids, teacher_topk_logprobs, ce_weight)
    return topk_bucket_jsd(student_logprobs, teacher_topk_ids, teacher_topk_logprobs, jsd_beta)


def topk_distill_sum(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    targets: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    ce_weight: float,
    chunk_size: int | None = None,
    transform: LogitTransform | None = None,
    jsd_beta: float | None = None,
) -> torch.Tensor:
    """Sum of the top-k objective over `(N, H)` hidden states, projected chunk by chunk in float32: NPD's
    (`topk_token_loss`), or with `jsd_beta` GKD's generalized JSD over the top-k buckets (`topk_bucket_jsd`).

    Each chunk's `(chunk, V)` logits are recomputed in the backward pass instead of being kept, so peak memory
    holds one chunk's logits, never `(N, V)`. `transform` is the student's `LogitTransform`.
    """

    def chunk_loss(hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(project(hidden, student_head, transform), dim=-1)
        return topk_objective(logprobs, *tensors, ce_weight=ce_weight, jsd_beta=jsd_beta).sum()

    chunk_size = chunk_size or chunk_rows(student_head.weight.shape[0])
    total = student_hidden.new_zeros((), dtype=torch.float32)
    chunks = zip(
        student_hidden.split(chunk_size),
        targets.split(chunk_size),
        teacher_topk_ids.split(chunk_size),
        teacher_topk_logprobs.split(chunk_size),
        strict=True,
    )
    for hidden, *tensors in chunks:
        total = total + checkpoint(chunk_loss, hidden, *tensors, use_reentrant=False)
    return total


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
    `position_ids` (packed rows). With `logprob_temperature`, also returns the student's log-probs of the trained
    tokens at that temperature.
    """
    forward = {"input_ids": inputs["input_ids"], "use_cache": False}  # a cache would drop the packed-sequence mask
    for key in ("attention_mask", "position_ids"):
        if inputs.get(key) is not None:
            forward[key] = inputs[key]
    labels = inputs["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels[mask]
    current = None
    if teacher_top_k is not None:
        if "teacher_topk_ids" in inputs:
            topk_ids = inputs["teacher_topk_ids"][:, 1:][mask]
            topk_logprobs = inputs["teacher_topk_logprobs"][:, 1:][mask]
        else:
            with torch.no_grad():
                hidden = backbone(teacher)(**forward).last_hidden_state[:, :-1][mask]
            topk_ids, topk_logprobs = teacher_topk(
                hidden, lm_head(teacher), teacher_top_k, chunk_size, logit_transform(teacher)
            )
        if fused:
            student_head, student_transform = lm_head(student), logit_transform(student)
            student_hidden = backbone(student)(**forward).last_hidden_state[:, :-1][mask]
            loss_sum = topk_distill_sum(
                student_hidden,
                student_head,
                targets,
                topk_ids,
                topk_logprobs,
                ce_weight,
                chunk_size,
                transform=student_transform,
                jsd_beta=beta if topk_jsd else None,
            )
            if logprob_temperature is not None:
                current = chunked_token_logprobs(
                    student_hidden, student_head, targets, logprob_temperature, chunk_size, student_transform
                )
        else:
            student_logits = student(**forward).logits[:, :-1][mask]
            logprobs = torch.log_softmax(student_logits.float(), dim=-1)
            jsd_beta = beta if topk_jsd else None
            loss_sum = topk_objective(logprobs, targets, topk_ids, topk_logprobs, ce_weight, jsd_beta).sum()
            if logprob_temperature is not None:
                current = token_logprobs(student_logits.detach(), targets, logprob_temperature)
    elif not fused:
        student_logits = student(**forward).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = teacher(**forward).logits[:, :-1]
        loss_sum = generalized_jsd_sum(student_logits, teacher_logits, mask, beta)
        if logprob_temperature is not None:
            current = token_logprobs(student_logits[mask].detach(), targets, logprob_temperature)
    else:
        student_head, student_transform = lm_head(student), logit_transform(student)
        student_hidden = backbone(student)(**forward).last_hidden_state[:, :-1][mask]
        with torch.no_grad():
            teacher_hidden = backbone(teacher)(**forward).last_hidden_state[:, :-1][mask]
        loss_sum = fused_jsd_sum(
            student_hidden,
            student_head,
            teacher_hidden,
            lm_head(teacher),
            targets,
            beta,
            chunk_size=chunk_size,
            compiled=compiled,
            student_transform=student_transform,
            teacher_transform=logit_transform(teacher),
        )
        if logprob_temperature is not None:
            current = chunked_token_logprobs(
                student_hidden, student_head, targets, logprob_temperature, chunk_size, student_transform
            )
    return LossResult(loss_sum=loss_sum, num_tokens=mask.sum(), mask=mask, current_logprobs=current)
