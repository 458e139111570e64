"""The scoring stage: the teacher's view of each generated sample, computed once, off the training critical path.

It runs in the generator (after sampling, before the buffer) with the generator's own copy of the teacher, and
stores with each sample the teacher's top-k token ids and log-probs at every completion position. A training step
on such samples needs no teacher forward at all.
"""

from __future__ import annotations

import torch
from torch import nn

from .buffer import Sample
from .losses import backbone, lm_head, teacher_topk


class TeacherScorer:
    """Scores samples with `teacher`: top-`k` log-probs (temperature 1) of the teacher at each completion token."""

    def __init__(self, teacher: nn.Module, k: int, device: str = "cpu", chunk_size: int | None = None) -> None:
        self.teacher = teacher
        self.k = k
        self.device = torch.device(device)
        self.chunk_size = chunk_size

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> None:
        """Attach `teacher_topk_ids` and `teacher_topk_logprobs` (one list of k per completion token) in place."""
        if not samples:
            return
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        input_ids = torch.zeros((len(samples), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        # position j predicts token j + 1: the completion's tokens are predicted from [prompt_len - 1, total - 1)
        predicting = torch.zeros_like(input_ids, dtype=torch.bool)
        for row, s in enumerate(samples):
            total = len(s.prompt_ids) + len(s.completion_ids)
            input_ids[row, :total] = torch.tensor(s.prompt_ids + s.completion_ids)
            attention_mask[row, :total] = 1
            predicting[row, len(s.prompt_ids) - 1 : total - 1] = True
        hidden = backbone(self.teacher)(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
        ).last_hidden_state[predicting.to(self.device)]
        ids, values = teacher_topk(hidden, lm_head(self.teacher), self.k, self.chunk_size)
        ids, values = ids.cpu(), values.cpu()
        start = 0
        for s in samples:  # `predicting` is row-major, so each sample's positions are contiguous and in order
            end = start + len(s.completion_ids)
            s.teacher_topk_ids = ids[start:end].tolist()
            s.teacher_topk_logprobs = values[start:end].tolist()
            start = end
