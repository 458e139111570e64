"""What the LM head makes of hidden states: the student's log-probs and the teacher's top-k, chunk by chunk
(`chunked.chunked_map`) so the `(tokens x vocab)` logits never exist.

The chunked paths (the fused loss, the top-k objective, the scoring stage) take the backbone's last hidden states
and project them through the head themselves. Some models transform their logits after the head (Gemma 2/3
soft-cap them, Cohere and Granite scale them): `logit_transform` reads that from the config and every projection
here applies it, and `chunked_logits_error` checks, on each model before training, that the projection equals the
model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .chunked import chunked_map, linear_logits


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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token under `softmax(logits / temperature)`."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


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
    logprobs = partial(token_logprobs, temperature=temperature)
    return chunked_map(logprobs, hidden, head, tokens, transform=transform, chunk_size=chunk_size)


def teacher_topk(
    hidden: torch.Tensor,
    head: nn.Linear,
    k: int,
    chunk_size: int | None = None,
    transform: LogitTransform | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`k` (ids, log-probs) of `log_softmax(transform(head(hidden)))` for `(N, H)` hidden states, chunk by
    chunk; `transform` is the teacher's `LogitTransform`."""

    def topk(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        return top.indices, top.values

    return chunked_map(topk, hidden, head, transform=transform, chunk_size=chunk_size)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer stack below the LM head (inside a PEFT wrapper, the adapted one)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model.base_model


def project(hidden: torch.Tensor, head: nn.Linear, transform: LogitTransform | None = None) -> torch.Tensor:
    """The model's logits, `transform(head(hidden))`, in float32 whatever the model's dtype."""
    return linear_logits(hidden, head.weight, head.bias, transform)


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
        full = own_forward(model)(input_ids=ids, use_cache=False).logits[0].float()
        hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
    finally:
        model.train(was_training)
    chunked = project(hidden, head, transform)
    return float((full - chunked).abs().max() / full.abs().max().clamp_min(1e-6))


def rounding_tolerance(model: nn.Module) -> float:
    """The largest relative difference between two computations of `model`'s logits that is only rounding, for the
    construction probes (`chunked_logits_error`, packing's leak probe): float32 agrees to ~1e-6, bf16/fp16 to ~1e-2."""
    return 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2


def own_forward(model: nn.Module) -> Any:
    """The model's forward as it computes in its weights' dtype. Under bf16/fp16 mixed precision, accelerate wraps
    a prepared model's forward in autocast (the teacher's, at construction) and keeps the unwrapped one as
    `_original_forward`. The probes measure the model, not the run's precision, so they call that one: otherwise
    a float32 model's autocast logits would be compared with float32 ones at the float32 tolerance."""
    return getattr(model, "_original_forward", model.forward)
