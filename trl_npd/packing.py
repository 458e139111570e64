"""Padding-free packing: sequences of any length go into rows of at most a token budget, first-fit-decreasing.

Each sequence keeps its own `position_ids` (restarting at 0) and the batch carries no `attention_mask`, so
transformers derives the sample boundaries from `position_ids` and attention stays block-diagonal. It only does so
when no cache exists (the trainer's forwards pass `use_cache=False`) and, under flash attention, only in a batch of
one row (see `row_token_budget`). The tests check in train mode that a packed row gives each sample exactly the
log-probs it gets alone. Labels are -100 on prompt tokens, on padding and at each sample's first position, so no
sample learns to predict another's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import IGNORE_INDEX, Sequence, on_policy_extras
from .heads import own_forward, rounding_tolerance


@dataclass
class PackingStats:
    row_fill: float  # real tokens / (rows x token budget); above 1 only when sequences exceed the budget
    pad_frac: float  # padding tokens / tensor size


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Group item indices into bins of total length <= budget: longest first, each into the first bin it fits.
    An item longer than the budget gets a bin of its own, which nothing else joins."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(max(0, budget - lengths[index]))
    return bins


def pack_sequences(
    sequences: list[Sequence], max_tokens_per_row: int, pad_token_id: int
) -> tuple[dict[str, torch.Tensor], PackingStats]:
    """Rows of packed sequences: `input_ids`, `position_ids`, `labels`, and for generated sequences
    `behaviour_logprobs` and `policy_step` (per sequence). Rows shorter than the longest are padded at the end."""
    lengths = [len(s.input_ids) for s in sequences]
    budget = max_tokens_per_row
    rows = first_fit_decreasing(lengths, budget)  # a sequence longer than the budget gets a row of its own
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    behaviour_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    starts: list[tuple[int, int]] = [(0, 0)] * len(sequences)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            starts[index] = (r, start)
            s, end = sequences[index], start + lengths[index]
            input_ids[r, start:end] = torch.tensor(s.input_ids, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(lengths[index])
            labels[r, start:end] = torch.tensor(s.labels, dtype=torch.long)
            labels[r, start] = IGNORE_INDEX  # predicted from the previous sample's last token: never trained
            if s.behaviour_logprobs is not None:
                behaviour_logprobs[r, start:end] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
            start = end
        # the tail padding forms one more segment with its own positions; no real token attends to it
        position_ids[r, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    batch |= on_policy_extras(sequences, behaviour_logprobs, starts, width)
    real = sum(lengths)
    return batch, PackingStats(row_fill=real / (len(rows) * budget), pad_frac=1.0 - real / (len(rows) * width))


# attention implementations that run a packed row as its separate samples (a varlen kernel, or flex attention's
# block mask); the others (sdpa, eager) attend over the whole row with a dense block-diagonal mask
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def attends_per_sample(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention costs a packed row what its samples would cost one by one."""
    implementation = str(getattr(model.config, "_attn_implementation", None) or "")
    return implementation in VARLEN_ATTENTION or "flash" in implementation  # hub kernels, e.g. kernels-community/...


def row_token_budget(lengths: list[int], max_length: int | None, per_sample_attention: bool) -> int:
    """How many tokens one packed row may hold.

    With per-sample attention the whole micro-batch is one row, whatever `max_length`. It must be: transformers'
    flash-attention path finds the sample boundaries in `position_ids` only when the batch has a single row, and
    runs a batch of several rows as plain causal rows whose samples attend to each other (tests/test_packing.py
    shows it). A long row is free there anyway, and one row has no padding. With dense attention (SDPA, eager), whose
    masks follow each row's `position_ids`, a row of n tokens costs an (n x n) attention, so rows are capped at the
    longest sequence: short sequences still share rows, the padding is still gone, and attention never costs more
    than the padded batch's. On 2 CPU cores with SDPA, uncapped 1024-token rows made the training step 13-15% slower
    than padding (docs/benchmarks.md).
    """
    if per_sample_attention:
        return sum(lengths)
    return max(lengths)


@torch.no_grad()
def packing_leaks(model: torch.nn.Module, vocab_size: int) -> bool:
    """Whether `model` lets packed samples see each other, measured on a tiny probe.

    Models that ignore `position_ids` when building their attention mask (ALiBi models such as Bloom, for one)
    attend across the samples of a packed row. Two short sequences run packed and alone; any difference beyond
    the dtype's rounding is a leak.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab_size, (n,), generator=generator) for n in (3, 4))
    packed_ids = torch.cat([first, second])[None].to(device)
    position_ids = torch.cat([torch.arange(3), torch.arange(4)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        forward = own_forward(model)  # the model's computation, not the run's autocast (heads.own_forward)
        packed = forward(input_ids=packed_ids, position_ids=position_ids, use_cache=False).logits[0, 3:].float()
        alone = forward(input_ids=second[None].to(device), use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return bool((packed - alone).abs().max() > rounding_tolerance(model) * max(1.0, float(alone.abs().max())))
