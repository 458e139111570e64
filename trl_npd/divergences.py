"""The divergences, per token, on log-probabilities: what each objective computes, with no chunking or models.

- `generalized_jsd_sum`: GKD's generalized JSD(beta) over the full vocabulary (the reference every fused path is
  tested against);
- `topk_token_loss`: the NPD paper's CE + forward KL over the teacher's top-k tokens and a tail bucket;
- `k3_policy_kl`: the drift between the behaviour policy and the current student.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAIL_MASS_EPS = 1e-6  # tail buckets with less probability mass than this are treated as empty
# topk_bucket_jsd keeps every bucket's log-mass finite: at least this, and the teacher's top-k mass below 1
TAIL_LOG_FLOOR = -60.0
TAIL_LOG_MASS_EPS = 1e-7


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
    return generalized_jsd_per_token(student, teacher, beta).sum()


def generalized_jsd_per_token(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD(beta) per row, from the two sides' log-probabilities."""
    if beta == 0:
        return _kl(teacher, student)
    if beta == 1:
        return _kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1)


def k3_policy_kl(current_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(behaviour || current) from tokens sampled by the behaviour policy.

    With ratio = p_current / p_behaviour, k3 = ratio - 1 - log(ratio): unbiased for the KL under behaviour samples
    (E[ratio] = 1), never negative, and zero exactly when the two log-probs agree.
    """
    log_ratio = current_logprobs - behaviour_logprobs
    return torch.expm1(log_ratio) - log_ratio


def topk_token_loss(
    student_logprobs: torch.Tensor,
    targets: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    ce_weight: float,
) -> torch.Tensor:
    """NPD's per-token objective: `ce_weight * CE + (1 - ce_weight) * KL(teacher || student)` over k + 1 buckets.

    The buckets are the teacher's top-k tokens plus one tail bucket holding the rest of each distribution's mass,
    so both sides are proper distributions and the KL is exact on that partition. `student_logprobs` is `(n, V)`
    log-softmax; the teacher side is `(n, k)` ids and log-probs. CE is on `targets`, the tokens trained on.
    """
    student_topk = student_logprobs.gather(-1, teacher_topk_ids)
    kl = (teacher_topk_logprobs.exp() * (teacher_topk_logprobs - student_topk)).sum(-1)
    # The tail bucket. The teacher's tail is known only through its top-k: 1 - their mass. A teacher tail under
    # TAIL_MASS_EPS (k close to V; float32 sums round by ~1e-7) counts as empty: its term is at most that small.
    # The student's tail is exact, a log-sum-exp over the tokens outside the top-k, so a student that puts almost
    # all its mass on the top-k still gets the gradient that moves mass back to the tail. Inputs of discarded
    # branches are made finite first, because torch.where still carries the NaN gradient of the branch it discards.
    teacher_topk_mass = torch.logsumexp(teacher_topk_logprobs, dim=-1)
    has_tail = teacher_topk_mass < math.log1p(-TAIL_MASS_EPS)
    teacher_tail = _log1mexp(torch.where(has_tail, teacher_topk_mass, -1.0))
    outside_topk = student_logprobs.scatter(-1, teacher_topk_ids, -torch.inf)
    student_tail = torch.logsumexp(torch.where(has_tail[:, None], outside_topk, 0.0), dim=-1)
    kl = kl + torch.where(has_tail, teacher_tail.exp() * (teacher_tail - student_tail), 0.0)
    ce = -student_logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return ce_weight * ce + (1.0 - ce_weight) * kl


def topk_bucket_jsd(
    student_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """GKD's generalized JSD(beta) per token, from the teacher's top-k alone: over k + 1 buckets, the top-k tokens
    and one tail bucket holding the rest of each side's mass.

    This is the exact JSD of the student and a teacher whose tail mass is spread over the tail tokens as the
    student spreads its own; coarse-graining never raises a divergence, so it is at most the full-vocabulary JSD,
    and the gap is the teacher's disagreement with the student inside the tail, weighted by the tail's mass
    (benchmarks/topk_jsd.py measures it). `student_logprobs` is `(n, V)` log-softmax; the teacher side `(n, k)`.
    """
    student_topk = student_logprobs.gather(-1, teacher_topk_ids)
    # Each side's tail as a log-mass, kept finite (floored at TAIL_LOG_FLOOR) so no branch carries a NaN gradient:
    # a floored tail holds about e^-60 of the mass, and its terms vanish in float32.
    teacher_topk_mass = torch.logsumexp(teacher_topk_logprobs, dim=-1).clamp(max=-TAIL_LOG_MASS_EPS)
    teacher_tail = _log1mexp(teacher_topk_mass).clamp_min(TAIL_LOG_FLOOR)
    outside_topk = student_logprobs.scatter(-1, teacher_topk_ids, TAIL_LOG_FLOOR)
    student_tail = torch.logsumexp(outside_topk, dim=-1)
    student = torch.cat([student_topk, student_tail[:, None]], dim=-1)
    teacher = torch.cat([teacher_topk_logprobs, teacher_tail[:, None]], dim=-1)
    return generalized_jsd_per_token(student, teacher, beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler, 2012)."""
    x = x.clamp(max=0.0)
    near_zero = x > -math.log(2)
    # each branch only sees inputs it is accurate (and finite) on, so neither leaks a NaN gradient
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near_zero, -1.0, x))),
    )
