"""The fused generalized JSD: the heads project hidden states to the vocabulary one chunk of rows at a time inside
the loss, so the `(tokens x vocab)` logits are never materialized.

Plain heads run Liger's fused-linear kernel, `LigerFusedLinearJSDLoss`. It cannot express a soft-cap, so a model that
transforms its logits runs `transformed_jsd`, the same divergence with each side's transform applied, on the
chunking base (`chunked.chunked_sum`). So does every call without gradients (evaluation): Liger's kernel computes
the gradients in its forward pass whatever the grad mode, a float32 copy of the head's weight included. Both equal
`divergences.generalized_jsd_sum` on full logits, loss and gradients (tests/test_losses.py).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from torch import nn

from .batching import IGNORE_INDEX
from .chunked import Transform, chunked_sum, float_or_none, linear_logits, resolve_chunk_size
from .divergences import generalized_jsd_per_token
from .heads import IDENTITY, LogitTransform


def fused_jsd_sum(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Linear,
    targets: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    compiled: bool = False,
    *,
    student_transform: LogitTransform | None = None,
    teacher_transform: LogitTransform | None = None,
) -> torch.Tensor:
    """`generalized_jsd_sum` of `student_head(student_hidden)` and `teacher_head(teacher_hidden)`, fused.

    Hidden states are `(N, H)`: flattened, one row per position (a `(1, N, H)` input would be a single chunk and
    save nothing). Rows whose target is -100 are skipped. Projections run in float32: bf16 projections put the
    gradients about 10% off. Each side's logits go through its `LogitTransform` (the model's soft-cap or scale)
    before the temperature.
    """
    student_transform = IDENTITY if student_transform is None else student_transform
    teacher_transform = IDENTITY if teacher_transform is None else teacher_transform
    chunk_size = resolve_chunk_size(chunk_size, student_head.weight.shape[0])
    if not (torch.is_grad_enabled() and student_transform.is_identity and teacher_transform.is_identity):
        loss = partial(
            transformed_jsd,
            teacher_weight=teacher_head.weight.float(),  # cast once, not per chunk
            teacher_bias=float_or_none(teacher_head.bias),
            teacher_transform=teacher_transform,
            beta=beta,
            temperature=temperature,
        )
        return chunked_sum(
            loss,
            student_hidden,
            student_head,
            targets,
            teacher_hidden,
            transform=student_transform,
            chunk_size=chunk_size,
            compiled=compiled,
        )
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=beta,
        ignore_index=IGNORE_INDEX,
        temperature=temperature,
        compiled=compiled,
        chunk_size=chunk_size,
    )
    mean = loss_fn(
        student_hidden.float(),
        student_head.weight.float(),
        teacher_hidden.float(),
        teacher_head.weight.float(),
        targets,
        float_or_none(student_head.bias),
        float_or_none(teacher_head.bias),
    )
    return mean * (targets != IGNORE_INDEX).sum().clamp_min(1)  # Liger divides by this call's tokens


def transformed_jsd(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    teacher_transform: Transform,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """One chunk's generalized JSD, summed over the rows whose target is not -100: the student's logits arrive
    transformed, the teacher's are projected and transformed here, and only then divided by the temperature, as
    each model's forward does (Liger's kernel divides the head's raw output and has no hook for a soft-cap)."""
    teacher_logits = linear_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_transform)
    # a teacher head padded past the student's vocabulary: the student's missing logits are 0, as in Liger's kernel
    student_logits = F.pad(student_logits, (0, max(0, teacher_logits.shape[-1] - student_logits.shape[-1])))
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    per_token = generalized_jsd_per_token(student, teacher, beta)
    # masked_fill rather than boolean indexing: the chunk keeps a fixed shape (torch.func, torch.compile)
    return per_token.masked_fill(targets == IGNORE_INDEX, 0.0).sum()
