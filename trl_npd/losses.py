"""Distillation losses. This module holds the plain reference path, which materializes full logits.

The fast paths (Liger's fused-linear JSD, the teacher top-k objective) must equal these functions, loss and
gradients; the tests compare against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum over the `mask`ed positions of the generalized JSD(beta) between teacher and student.

    Same convention as TRL's GKD: `beta=0` is KL(teacher || student) (forward KL), `beta=1` is KL(student || teacher)
    (reverse KL), and in between the two are measured against the mixture `beta * teacher + (1 - beta) * student`.
    Returns a sum so the caller can normalize by the tokens trained on across gradient accumulation.
    """
    student = F.log_softmax(student_logits[mask] / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[mask] / temperature, dim=-1)
    if beta == 0:
        per_token = _kl(teacher, student)
    elif beta == 1:
        per_token = _kl(student, teacher)
    else:
        mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
        per_token = beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)
    return per_token.sum()


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token under `softmax(logits / temperature)`."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def k3_policy_kl(current_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(behaviour || current) from tokens sampled by the behaviour policy.

    With ratio = p_current / p_behaviour, k3 = ratio - 1 - log(ratio): unbiased for the KL under behaviour samples
    (E[ratio] = 1), never negative, and zero exactly when the two log-probs agree.
    """
    log_ratio = current_logprobs - behaviour_logprobs
    return torch.expm1(log_ratio) - log_ratio
