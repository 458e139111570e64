"""The generator's supply of prompts: an endless, seeded, sharded pass over the train set, resumable by position.

Prompts are extracted with the trainer's own data collator (its `prompts` / `prompt_attention_mask` outputs), so
they are formatted and truncated exactly as GKD formats them. A prompt that leaves no room for `max_new_tokens`
within `max_length` is truncated from the left (the oldest context goes first, as GKD's collator does) and flagged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Prompt:
    ids: list[int]
    index: int  # row of the train dataset
    # position in this rank's stream, which resumes after the last one trained on; -1 for a side stream's prompt
    position: int
    truncated: bool


class PromptStream:
    """Yields this rank's prompts in a fresh seeded permutation every pass, forever.

    Args:
        dataset: a map-style dataset (`len` and integer indexing).
        collator: a callable mapping a list of rows to a dict with `prompts` and `prompt_attention_mask`.
        seed: seed of the permutations; pass `p` of the stream uses `seed + p`.
        rank, world_size: this rank takes rows `rank, rank + world_size, ...` so ranks never share a prompt.
        start_position: position to resume from.
        max_prompt_tokens: prompts longer than this keep only their last `max_prompt_tokens` tokens.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        collator: Callable[[list[Any]], dict[str, torch.Tensor]],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self._dataset = dataset
        self._collator = collator
        self._seed = seed
        self._rows = list(range(rank, len(dataset), world_size))
        if not self._rows:
            raise ValueError(f"Rank {rank} of {world_size} has no prompts: the train dataset has {len(dataset)} rows.")
        self.position = start_position
        self._max_prompt_tokens = max_prompt_tokens
        self._pass = -1
        self._order: list[int] = []
        self._empty_in_a_row = 0
        self._tracks_position = True

    def side_stream(self, seed: int) -> PromptStream:
        """Another endless pass over the same prompts in its own seeded order, whose prompts carry position -1: the
        trainer's bootstrap samples come from it, and a resumed run's main stream does not depend on it."""
        other = PromptStream(
            self._dataset, self._collator, seed, max_prompt_tokens=self._max_prompt_tokens, start_position=0
        )
        other._rows = self._rows
        other._tracks_position = False
        return other

    def _row_at(self, position: int) -> int:
        pass_index, offset = divmod(position, len(self._rows))
        if pass_index != self._pass:
            generator = torch.Generator().manual_seed(self._seed + pass_index)
            self._order = torch.randperm(len(self._rows), generator=generator).tolist()
            self._pass = pass_index
        return self._rows[self._order[offset]]

    def take(self, n: int) -> list[Prompt]:
        """The next `n` prompts of the stream."""
        positions = range(self.position, self.position + n)
        rows = [self._row_at(p) for p in positions]
        self.position += n
        ids = extract_prompt_ids(self._collator, [self._dataset[r] for r in rows])
        prompts = []
        for prompt_ids, row, position in zip(ids, rows, positions, strict=True):
            self._empty_in_a_row = 0 if prompt_ids else self._empty_in_a_row + 1
            if self._empty_in_a_row > len(self._rows):  # a whole pass without one usable prompt: never will be
                raise ValueError(
                    f"None of the {len(self._rows)} prompts of this rank has a token to condition on; the "
                    "generator cannot produce anything. Check the dataset's prompts and the chat template."
                )
            truncated = self._max_prompt_tokens is not None and len(prompt_ids) > self._max_prompt_tokens
            if truncated:
                prompt_ids = prompt_ids[-self._max_prompt_tokens :]
            position = position if self._tracks_position else -1
            prompts.append(Prompt(ids=prompt_ids, index=row, position=position, truncated=truncated))
        return prompts


def extract_prompt_ids(collator: Callable[[list[Any]], dict[str, torch.Tensor]], rows: list[Any]) -> list[list[int]]:
    """Token ids of each row's prompt, without padding, as the collator formats them."""
    batch = collator(rows)
    if "prompts" not in batch or "prompt_attention_mask" not in batch:
        raise ValueError(
            "The data collator must return `prompts` and `prompt_attention_mask` (as TRL's DataCollatorForChatML "
            f"does) so the generator knows what to complete; it returned {sorted(batch)}."
        )
    return prompt_ids_of(batch)


def prompt_ids_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt tokens, read through `prompt_attention_mask` (either padding side)."""
    mask = batch["prompt_attention_mask"].bool()
    return [row[row_mask].tolist() for row, row_mask in zip(batch["prompts"], mask, strict=True)]


class PromptOnlyCollator:
    """Collator for datasets with a `prompt` column and no completions (pure on-policy training, `lmbda=1`).

    `prompt` may be plain text or a conversation (a list of `{"role", "content"}` messages), which is rendered with
    the tokenizer's chat template and a generation prompt (with `chat_template_kwargs`), as TRL does for
    conversational prompts. Plain text is tokenized with the tokenizer's special tokens when `add_special_tokens`
    (TRL's `DistillationTrainer` adds them, e.g. a BOS token; the GKD drop-in does not).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        prompt_key: str = "prompt",
        *,
        add_special_tokens: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token. Set `tokenizer.pad_token` before training.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt_key = prompt_key
        self.add_special_tokens = add_special_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = []
        for row in rows:
            prompt = row[self.prompt_key]
            if isinstance(prompt, str):
                prompt_ids = self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
            else:
                text = self.tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
                )
                prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if self.max_length is not None:
                prompt_ids = prompt_ids[-self.max_length :]
            ids.append(prompt_ids)
        width = max(len(x) for x in ids)
        prompts = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding, as generation expects
            if x:
                prompts[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                mask[i, width - len(x) :] = 1
        return {"prompts": prompts, "prompt_attention_mask": mask}
