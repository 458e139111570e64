"""The fused generalized JSD: Liger's fused-linear kernel, which projects hidden states to the vocabulary one chunk
of rows at a time inside the loss, so the `(tokens x vocab)` logits are never materialized.

Plain heads run Liger's `LigerFusedLinearJSDLoss`. Liger's kernel cannot express a soft-cap, so a model that
transforms its logits runs `TransformedLogitsJSDFunction`, a chunked loss of ours on Liger's base class, which owns
the chunking while the loss states only its math. Both equal `divergences.generalized_jsd_sum` on full logits,
loss and gradients (tests/test_losses.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase
from torch import nn

from .batching import IGNORE_INDEX
from .divergences import generalized_jsd_per_token
from .heads import IDENTITY, LogitTransform, chunk_rows, float_or_none


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
    before the temperature; plain heads run Liger's `LigerFusedLinearJSDLoss`, transformed ones
    `TransformedLogitsJSDFunction`, which computes the same chunk by chunk with the transforms applied.
    """
    student_transform = IDENTITY if student_transform is None else student_transform
    teacher_transform = IDENTITY if teacher_transform is None else teacher_transform
    chunk_size = chunk_size or chunk_rows(student_head.weight.shape[0])
    tensors = (
        student_hidden.float(),
        student_head.weight.float(),
        teacher_hidden.float(),
        teacher_head.weight.float(),
        targets,
        float_or_none(student_head.bias),
        float_or_none(teacher_head.bias),
    )
    if student_transform.is_identity and teacher_transform.is_identity:
        loss_fn = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=beta,
            ignore_index=IGNORE_INDEX,
            temperature=temperature,
            compiled=compiled,
            chunk_size=chunk_size,
        )
        mean = loss_fn(*tensors)
    else:
        mean = TransformedLogitsJSDFunction.apply(
            *tensors, beta, temperature, chunk_size, compiled, student_transform, teacher_transform
        )
    return mean * (targets != IGNORE_INDEX).sum().clamp_min(1)  # Liger divides by this call's tokens


class TransformedLogitsJSDFunction(LigerFusedLinearDistillationBase):
    """The fused generalized JSD for models that transform their logits after the head.

    Liger's base class does the chunking: it projects one chunk of rows at a time, takes the chunk's loss and its
    gradients at once (`torch.func.grad_and_value`), and keeps only the gradients, so no `(N, V)` tensor exists.
    Its JSD kernel divides raw logits by the temperature and has no hook for a soft-cap, so this loss function gets
    the raw logits (the base's temperature is 1) and applies each side's transform, then the temperature, itself.
    """

    @staticmethod
    def distillation_loss_fn(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        beta: float,
        logit_temperature: float,
        student_transform: LogitTransform,
        teacher_transform: LogitTransform,
        target: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> torch.Tensor:
        student = F.log_softmax(student_transform(student_logits) / logit_temperature, dim=-1)
        teacher = F.log_softmax(teacher_transform(teacher_logits) / logit_temperature, dim=-1)
        per_token = generalized_jsd_per_token(student, teacher, beta)
        # masked_fill rather than boolean indexing: the chunk keeps a fixed shape (torch.func, torch.compile)
        return per_token.masked_fill(target == ignore_index, 0.0).sum()

    @classmethod
    def forward(
        cls,
        ctx: Any,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_bias: torch.Tensor | None,
        beta: float,
        temperature: float,
        chunk_size: int,
        compiled: bool,
        student_transform: LogitTransform,
        teacher_transform: LogitTransform,
    ) -> torch.Tensor:
        return super().forward(
            cls=cls,
            ctx=ctx,
            student_input=student_input,
            student_weight=student_weight,
            teacher_input=teacher_input,
            teacher_weight=teacher_weight,
            target=target,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            chunk_size=chunk_size,
            ignore_index=IGNORE_INDEX,
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=beta,
            compute_ce_loss=False,
            temperature=1.0,  # applied after the transforms, in distillation_loss_fn
            compiled=compiled,
            logit_temperature=temperature,
            student_transform=student_transform,
            teacher_transform=teacher_transform,
        )

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *args: Any) -> tuple[torch.Tensor | None, ...]:
        grads = LigerFusedLinearDistillationBase.backward(ctx, grad_output, *args)[:6]
        return (*grads, None, None, None, None, None, None, None)  # teacher_bias and the settings have none
