"""Chunking over positions, written once: every path that projects hidden states through an LM head (the chunked
losses, the student's log-probs, the teacher's top-k, the scoring stage) does it here, one chunk of rows at a time,
so the `(positions x vocab)` logits never exist beyond one chunk.

- `chunked_sum`: a loss summed over rows, differentiable in the hidden states and the head. As in Liger's
  `chunked_loss` bases, the forward pass takes each chunk's loss and its gradients at once
  (`torch.func.grad_and_value`) and keeps only the gradients, which the backward pass scales.
- `chunked_map`: a per-row function of the logits (log-probs, top-k), without gradients.

The callers state only their math, as a function of one chunk's float32 logits and the matching rows of their other
inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Rows per chunk of the chunked projections: about 2**25 logits (128 MB in float32) per chunk; Liger rounds the
# number of chunks down, so its chunks can hold up to twice that. Liger's fixed 1024 rows meant 622 MB per
# temporary at Qwen's vocabulary and a 12.6 GB peak in eager mode; 220 rows gave 5.0 GB at the same speed.
LOGITS_PER_CHUNK = 2**25

Transform = Callable[[torch.Tensor], torch.Tensor]  # what a model does to its head's output (heads.LogitTransform)


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk's logits stay near LOGITS_PER_CHUNK."""
    return max(16, min(1024, LOGITS_PER_CHUNK // vocab_size))


def resolve_chunk_size(chunk_size: int | None, vocab_size: int) -> int:
    """`chunk_size`, or rows sized to the vocabulary when it is None."""
    if chunk_size is None:
        return chunk_rows(vocab_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows (or None to size it), got {chunk_size}.")
    return chunk_size


def float_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.float()


def linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: Transform | None = None
) -> torch.Tensor:
    """`transform(hidden @ weight.T + bias)` in float32 whatever the model's dtype: bf16 projections put gradients
    about 10% off."""
    logits = F.linear(hidden.float(), weight.float(), float_or_none(bias))
    return logits if transform is None else transform(logits)


def _slices(rows: int, chunk_size: int) -> list[slice]:
    # no rows still makes one (empty) chunk, so the outputs keep their shapes and dtypes
    return [slice(start, start + chunk_size) for start in range(0, max(rows, 1), chunk_size)]


@torch.no_grad()
def chunked_map(
    fn: Callable[..., Any],
    hidden: torch.Tensor,
    head: nn.Linear,
    *rows: torch.Tensor,
    transform: Transform | None = None,
    chunk_size: int | None = None,
) -> Any:
    """`fn(logits, *rows)` over `(N, H)` hidden states chunk by chunk, with `logits = transform(head(hidden))` in
    float32 and `rows` split alongside. `fn` returns a tensor or a tuple of tensors with one row per position; the
    chunks' results are concatenated in the same structure."""
    chunk_size = resolve_chunk_size(chunk_size, head.weight.shape[0])
    out = [
        fn(linear_logits(hidden[s], head.weight, head.bias, transform), *(r[s] for r in rows))
        for s in _slices(len(hidden), chunk_size)
    ]
    if isinstance(out[0], torch.Tensor):
        return torch.cat(out)
    return tuple(torch.cat(parts) for parts in zip(*out, strict=True))


def chunked_sum(
    loss: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    head: nn.Linear,
    *rows: torch.Tensor,
    transform: Transform | None = None,
    chunk_size: int | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """The sum over chunks of `loss(logits, *rows)`, `logits = transform(head(hidden))` in float32 for `(N, H)`
    hidden states, `rows` split alongside; differentiable in `hidden` and the head's weight and bias, not in `rows`.

    `loss` returns the chunk's scalar sum. Each chunk's logits and their gradient exist only while that chunk is
    computed; what is kept until the backward pass is the float32 gradients: `(N, H)` for the hidden states and, when
    the head trains, `(V, H)` for its weight. `compiled` runs each chunk's loss through `torch.compile`.
    """
    chunk_size = resolve_chunk_size(chunk_size, head.weight.shape[0])

    def chunk_loss(raw: torch.Tensor, *r: torch.Tensor) -> torch.Tensor:
        return loss(raw if transform is None else transform(raw), *r)

    weight, bias = head.weight.float(), float_or_none(head.bias)
    # inside `forward` grad mode is always off and `needs_input_grad` still says what the inputs require, so whether
    # the caller wants gradients at all (not under evaluation's no_grad) is read here
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedSum.apply(hidden.float(), weight, bias, chunk_loss, chunk_size, compiled, grad_enabled, *rows)


class _ChunkedSum(torch.autograd.Function):
    """`chunked_sum`'s autograd: the forward pass computes the gradients, the backward pass scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        chunk_loss: Callable[..., torch.Tensor],
        chunk_size: int,
        compiled: bool,
        grad_enabled: bool,
        *rows: torch.Tensor,
    ) -> torch.Tensor:
        # Only what needs a gradient gets one: a frozen head (an adapter-trained student) costs no (V, H) gradient,
        # and under no_grad (evaluation) only the loss is computed.
        needs_hidden, needs_weight, needs_bias = (grad_enabled and needs for needs in ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros_like(weight) if needs_weight else None
        grad_bias = torch.zeros_like(bias) if needs_bias else None
        differentiate = needs_hidden or needs_weight or needs_bias

        def step(*args: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            return torch.func.grad_and_value(chunk_loss)(*args) if differentiate else (None, chunk_loss(*args))

        step = torch.compile(step) if compiled else step
        total = hidden.new_zeros(())
        for s in _slices(len(hidden), chunk_size):
            h = hidden[s]
            # the loss is differentiated in the chunk's logits only; the head's part of the chain rule is two matmuls
            # into the accumulators, so no chunk ever holds a (V, H) gradient of its own
            grad_logits, value = step(F.linear(h, weight, bias), *(r[s] for r in rows))
            total += value
            if grad_hidden is not None:
                grad_hidden[s] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        ctx.num_rows = len(rows)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # in place: the saved gradients have no other use, and a second backward through them fails on their version
        grads = tuple(None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors)
        return grads + (None,) * (4 + ctx.num_rows)  # the settings and the rows have none
