"""Distillation losses: a plain reference path that materializes full logits, and the fused path.

The fused path projects hidden states to the vocabulary chunk by chunk inside Liger's
`LigerFusedLinearJSDLoss`, so the `(tokens x vocab)` logits never exist at once. Only the positions that are
trained on are projected at all. It must equal the reference, loss and gradients; the tests compare the two on
random inputs and through whole models.

Some models transform their logits after the head (Gemma 2/3 soft-cap them, Cohere and Granite scale them). Every
chunked projection here applies the model's `LogitTransform`; Liger's kernel cannot express a soft-cap, so a
transformed model's fused JSD runs `TransformedLogitsJSDFunction`, a chunked loss of ours on Liger's base class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from liger_kernel.chunked_loss.fused_linear_distillation import LigerFusedLinearDistillationBase
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import IGNORE_INDEX

# Rows per chunk of the chunked projections: about 2**25 logits (128 MB in float32) per chunk; Liger rounds the
# number of chunks down, so its chunks can hold up to twice that. Liger's fixed 1024 rows meant 622 MB per
# temporary at Qwen's vocabulary and a 12.6 GB peak in eager mode; 220 rows gave 5.0 GB at the same speed.
LOGITS_PER_CHUNK = 2**25


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits stay near LOGITS_PER_CHUNK."""
    return max(16, min(1024, LOGITS_PER_CHUNK // vocab_size))


TAIL_MASS_EPS = 1e-6  # tail buckets with less probability mass than this are treated as empty


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output `x` before returning logits: `scale * x`, then, with a `softcap`,
    `softcap * tanh(x / softcap)`. Identity (scale 1, no cap) for most models; see `logit_transform`."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __str__(self) -> str:
        parts = ([f"scale {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"soft-cap {self.softcap:g}"] if self.softcap is not None else []
        )
        return ", then ".join(parts) or "none"


IDENTITY = LogitTransform()


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
    return _generalized_jsd_per_token(student, teacher, beta).sum()


def _generalized_jsd_per_token(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
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
        _float(student_head.bias),
        _float(teacher_head.bias),
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
        per_token = _generalized_jsd_per_token(student, teacher, beta)
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


@torch.no_grad()
def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: nn.Linear,
    tokens: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """`token_logprobs(head(hidden), tokens)` for `(N, H)` hidden states, without materializing `(N, V)` logits.
    `transform` is the model's `LogitTransform`, applied before the temperature as the model's forward does."""
    chunk_size = chunk_size or chunk_rows(head.weight.shape[0])
    out = [
        token_logprobs(project(h, head, transform), t, temperature)
        for h, t in zip(hidden.split(chunk_size), tokens.split(chunk_size), strict=True)
    ]
    return torch.cat(out) if out else hidden.new_zeros(0)


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


def topk_distill_sum(
    student_hidden: torch.Tensor,
    student_head: nn.Linear,
    targets: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    ce_weight: float,
    chunk_size: int | None = None,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """Sum of `topk_token_loss` over `(N, H)` hidden states, projected chunk by chunk in float32.

    Each chunk's `(chunk, V)` logits are recomputed in the backward pass instead of being kept, so peak memory
    holds one chunk's logits, never `(N, V)`. `transform` is the student's `LogitTransform`.
    """

    def chunk_loss(hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(project(hidden, student_head, transform), dim=-1)
        return topk_token_loss(logprobs, *tensors, ce_weight=ce_weight).sum()

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


@torch.no_grad()
def teacher_topk(
    hidden: torch.Tensor,
    head: nn.Linear,
    k: int,
    chunk_size: int | None = None,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`k` (ids, log-probs) of `log_softmax(transform(head(hidden)))` for `(N, H)` hidden states, chunk by
    chunk; `transform` is the teacher's `LogitTransform`."""
    chunk_size = chunk_size or chunk_rows(head.weight.shape[0])
    ids, values = [], []
    for chunk in hidden.split(chunk_size):
        top = torch.log_softmax(project(chunk, head, transform), dim=-1).topk(k, dim=-1)
        ids.append(top.indices)
        values.append(top.values)
    if not ids:
        return hidden.new_zeros((0, k), dtype=torch.long), hidden.new_zeros((0, k), dtype=torch.float32)
    return torch.cat(ids), torch.cat(values)


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
) -> LossResult:
    """The distillation loss on a padded or packed batch, summed over trained tokens.

    The objective is the generalized JSD(beta) over the full vocabulary or, with `teacher_top_k`, NPD's top-k
    objective (`topk_token_loss`, weighted by `ce_weight`). The top-k objective uses the teacher top-k stored in the
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
            )
            if logprob_temperature is not None:
                current = chunked_token_logprobs(
                    student_hidden, student_head, targets, logprob_temperature, chunk_size, student_transform
                )
        else:
            student_logits = student(**forward).logits[:, :-1][mask]
            logprobs = torch.log_softmax(student_logits.float(), dim=-1)
            loss_sum = topk_token_loss(logprobs, targets, topk_ids, topk_logprobs, ce_weight).sum()
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


def backbone(model: nn.Module) -> nn.Module:
    """The transformer stack below the LM head (inside a PEFT wrapper, the adapted one)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.base_model


def _float(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def project(hidden: torch.Tensor, head: nn.Linear, transform: LogitTransform | None = None) -> torch.Tensor:
    """The model's logits, `transform(head(hidden))`, in float32 whatever the model's dtype: bf16 projections put
    gradients about 10% off."""
    logits = F.linear(hidden.float(), head.weight.float(), _float(head.bias))
    return logits if transform is None else transform(logits)


# Config fields through which transformers' causal LMs transform `lm_head(hidden)` into their logits, as their
# modeling code reads them (transformers 5.x). Any other transform is caught by `chunked_logits_error`, which the
# trainer runs on each model before training.
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")  # Gemma 2/3/3n/4, VaultGemma...; RecurrentGemma
MULTIPLIER_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")  # Cohere 1/2; Muse; Falcon-H1
# Granite (and MiniCPM3, on the hidden states of a bias-free head) divide by `logits_scaling`; HyperCLOVA X multiplies
LOGITS_SCALING_MULTIPLIES = ("hyperclovax",)
# model types whose config carries one of the fields above but whose transformers code does not apply it
FIELD_NOT_APPLIED = {"mpt": ("logit_scale",)}


def logit_transform(model: nn.Module) -> LogitTransform:
    """What `model`'s forward does to `lm_head(hidden)` before returning logits, read from its config."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: the config is the base model's
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if config is None:
        return IDENTITY
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    ignored = FIELD_NOT_APPLIED.get(model_type, ())

    def number(name: str) -> float | None:
        value = None if name in ignored else getattr(text_config, name, None)
        return None if value is None else float(value)

    softcap = next((v for v in map(number, SOFTCAP_FIELDS) if v is not None), None)
    scale = 1.0
    for name in MULTIPLIER_FIELDS:
        value = number(name)
        if value is not None:
            scale *= value
    logits_scaling = number("logits_scaling")
    if logits_scaling is not None:
        scale *= logits_scaling if model_type in LOGITS_SCALING_MULTIPLIES else 1.0 / logits_scaling
    return LogitTransform(scale=scale, softcap=softcap)


def lm_head(model: nn.Module) -> nn.Linear:
    """The LM head, if it is a plain linear projection; raises otherwise. `logit_transform` says what the model
    does to the head's output."""
    head = model.get_output_embeddings()
    # Only a plain linear projection is exactly `hidden @ weight.T + bias`, which is all the fused kernel computes.
    if not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        raise ValueError(
            f"The chunked projections (the fused loss, the top-k objective and the scoring stage) read the LM head's "
            f"weight directly, but this model's head is a {type(head).__name__} (for example a PEFT adapter on "
            "`lm_head`, or `lm_head` in modules_to_save), whose own parameters they would silently ignore. Remove "
            "'lm_head' from the adapter's target_modules and modules_to_save, or set use_fused_loss=False (and "
            "teacher_top_k=None, ifd_filter=False) to use the plain path."
        )
    return head


@torch.no_grad()
def chunked_logits_error(model: nn.Module, vocab_size: int) -> float:
    """How far the chunked projection, `logit_transform(model)(lm_head(model)(backbone hidden states))`, is from
    the logits of the model's own forward, on a tiny probe, relative to the largest logit.

    Near 0 (the dtype's rounding) when the chunked paths compute what the model computes. A model that does
    something else between its backbone and its logits (a transform the config does not name, a norm applied
    outside the backbone) shows here, before training, instead of as a silently wrong loss.
    """
    head, transform = lm_head(model), logit_transform(model)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    finally:
        model.train(was_training)
    chunked = project(hidden, head, transform)
    return float((full - chunked).abs().max() / full.abs().max().clamp_min(1e-6))


def chunked_logits_tolerance(model: nn.Module) -> float:
    """The largest `chunked_logits_error` that is only rounding: float32 agrees to ~1e-6, bf16/fp16 to ~1e-2."""
    return 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
