"""Turns buffer samples into a training batch: right-padded rows with labels on completion tokens only.

This is the seam where the padding-free packing stage plugs in; it returns the same keys.
"""

from __future__ import annotations

import torch

from .buffer import Sample

IGNORE_INDEX = -100


def collate_samples(samples: list[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch `samples` as `[prompt, completion, pad...]` rows.

    Returns `input_ids`, `attention_mask`, `labels` (-100 on prompt and padding), `behaviour_logprobs` (the
    sampling log-prob of each label token, aligned with `labels`, 0 elsewhere) and `policy_step` per row.
    """
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    behaviour_logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, sample in enumerate(samples):
        prompt_len, total = len(sample.prompt_ids), len(sample.prompt_ids) + len(sample.completion_ids)
        input_ids[row, :total] = torch.tensor(sample.prompt_ids + sample.completion_ids, dtype=torch.long)
        attention_mask[row, :total] = 1
        labels[row, prompt_len:total] = torch.tensor(sample.completion_ids, dtype=torch.long)
        behaviour_logprobs[row, prompt_len:total] = torch.tensor(sample.behaviour_logprobs, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "behaviour_logprobs": behaviour_logprobs,
        "policy_step": torch.tensor([s.policy_step for s in samples], dtype=torch.long),
    }


def count_trained_tokens(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Tokens the loss is taken over in these micro-batches: label positions after the causal shift."""
    return sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)
