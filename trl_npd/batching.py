"""Training sequences and the padded batch layout (`padding_free=False`); `packing` holds the padding-free one.

Every training micro-batch, on-policy or not, goes through a list of `Sequence`s, so the padded and packed layouts
are built from the same data and can be compared token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .samples import Sample

IGNORE_INDEX = -100


@dataclass
class Sequence:
    """One training sequence: its tokens, its labels (-100 where not trained) and optional per-token extras."""

    input_ids: list[int]
    labels: list[int]
    behaviour_logprobs: list[float] | None = None  # aligned with input_ids; sampled tokens only
    policy_step: int | None = None
    # the teacher's top-k at each sampled token, from the scoring stage: (completion tokens, k)
    teacher_topk_ids: list[list[int]] | None = None
    teacher_topk_logprobs: list[list[float]] | None = None


def sequences_from_samples(samples: list[Sample]) -> list[Sequence]:
    """`[prompt, completion]` sequences, trained on the completion, with its behaviour log-probs."""
    return [
        Sequence(
            input_ids=s.prompt_ids + s.completion_ids,
            labels=[IGNORE_INDEX] * len(s.prompt_ids) + s.completion_ids,
            behaviour_logprobs=[0.0] * len(s.prompt_ids) + s.behaviour_logprobs,
            policy_step=s.policy_step,
            teacher_topk_ids=s.teacher_topk_ids,
            teacher_topk_logprobs=s.teacher_topk_logprobs,
        )
        for s in samples
    ]


def sequences_from_padded(batch: dict[str, torch.Tensor]) -> list[Sequence]:
    """The sequences of a padded batch (either padding side), read through its attention mask."""
    rows = zip(batch["input_ids"], batch["attention_mask"].bool(), batch["labels"], strict=True)
    return [Sequence(input_ids=ids[mask].tolist(), labels=labels[mask].tolist()) for ids, mask, labels in rows]


def keep_last_tokens(sequences: list[Sequence], max_tokens: int) -> tuple[list[Sequence], int]:
    """Each sequence cut to its last `max_tokens` tokens (oldest prompt context first, as TRL's chat collator cuts),
    and how many were cut. For off-policy rows only: they carry no per-token extras to cut alongside."""
    kept = [
        Sequence(input_ids=s.input_ids[-max_tokens:], labels=s.labels[-max_tokens:])
        if len(s.input_ids) > max_tokens
        else s
        for s in sequences
    ]
    return kept, sum(len(s.input_ids) > max_tokens for s in sequences)


def pad_sequences(sequences: list[Sequence], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows: `input_ids`, `attention_mask`, `labels`, and for generated sequences
    `behaviour_logprobs` (0 off the sampled tokens) and `policy_step` per row."""
    width = max(len(s.input_ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    behaviour_logprobs = torch.zeros((len(sequences), width), dtype=torch.float32)
    for row, s in enumerate(sequences):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(s.labels, dtype=torch.long)
        if s.behaviour_logprobs is not None:
            behaviour_logprobs[row, :n] = torch.tensor(s.behaviour_logprobs, dtype=torch.float32)
    starts = [(row, 0) for row in range(len(sequences))]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels} | on_policy_extras(
        sequences, behaviour_logprobs, starts, width
    )


def on_policy_extras(
    sequences: list[Sequence], behaviour_logprobs: torch.Tensor, starts: list[tuple[int, int]], width: int
) -> dict[str, torch.Tensor]:
    """For batches of generated sequences only: `behaviour_logprobs`, per-sequence `policy_step`, `sample_index`
    (the sequence at each position, -1 at padding), and the stored
    teacher top-k (`teacher_topk_ids`, `teacher_topk_logprobs`, shape `(rows, width, k)`) when it was scored.
    `starts[i]` is the (row, column) where sequence i begins."""
    if any(s.policy_step is None for s in sequences):
        return {}
    # which sequence each position belongs to (-1: none), so that the drift can be told per sample
    sample_index = torch.full(behaviour_logprobs.shape, -1, dtype=torch.long)
    for i, (s, (row, col)) in enumerate(zip(sequences, starts, strict=True)):
        sample_index[row, col : col + len(s.input_ids)] = i
    extras = {
        "behaviour_logprobs": behaviour_logprobs,
        "policy_step": torch.tensor([s.policy_step for s in sequences], dtype=torch.long),
        "sample_index": sample_index,
    }
    if all(s.teacher_topk_ids is not None for s in sequences):
        k = len(sequences[0].teacher_topk_ids[0])
        ids = torch.zeros((behaviour_logprobs.shape[0], width, k), dtype=torch.long)
        logprobs = torch.zeros((behaviour_logprobs.shape[0], width, k), dtype=torch.float32)
        for s, (row, col) in zip(sequences, starts, strict=True):
            # the top-k of completion token j sits at that token's position, like its label
            first = col + len(s.input_ids) - len(s.teacher_topk_ids)
            ids[row, first : col + len(s.input_ids)] = torch.tensor(s.teacher_topk_ids, dtype=torch.long)
            logprobs[row, first : col + len(s.input_ids)] = torch.tensor(s.teacher_topk_logprobs)
        extras |= {"teacher_topk_ids": ids, "teacher_topk_logprobs": logprobs}
    return extras


def count_trained_tokens(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Tokens the loss is taken over in these micro-batches: label positions after the causal shift."""
    return sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)
