"""The scoring stage: what the teacher (and the generating snapshot) think of each sample, computed once, in the
generator, off the training critical path.

- With `teacher_top_k`: the teacher's top-k token ids and log-probs at every completion position, so a training
  step on such samples needs no teacher forward.
- With Δ-IFD: the four mean NLLs of the completion, teacher and student, with and without the prompt, combined into
  `ifd_delta`. The teacher's conditional NLL comes from the same forward as the top-k; the student's comes free from
  the sampler (its temperature-1 log-probs). The two unconditional NLLs cost one forward each over the completion
  alone, preceded by BOS when the tokenizer has one (otherwise the completion's first token is not scored).

Every projection applies the model's own logit transform (Gemma's soft-cap, Cohere's and Granite's scale), so the
scores are those of the model's full forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .chunked import chunked_map
from .heads import backbone, chunked_token_logprobs, lm_head, logit_transform
from .samples import Sample
from .selection import delta_ifd


class SampleScorer:
    """Scores samples in place with the teacher's top-k and/or their Δ-IFD.

    Args:
        teacher: the teacher (an inference copy in the generator).
        top_k: store the teacher's top-k at each completion token (`teacher_topk_ids`, `teacher_topk_logprobs`).
        student: the generating snapshot, needed for Δ-IFD (its unconditional NLL).
        ifd: compute `ifd_delta` for each sample.
        bos_token_id: prepended to the completion for the unconditional NLLs, when not None.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        top_k: int | None = None,
        student: nn.Module | None = None,
        ifd: bool = False,
        bos_token_id: int | None = None,
        device: str = "cpu",
    ) -> None:
        if ifd and student is None:
            raise ValueError("Δ-IFD scoring needs the generating student.")
        self.teacher, self.top_k, self.student, self.ifd = teacher, top_k, student, ifd
        self.bos_token_id = bos_token_id
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> None:
        if not samples or (self.top_k is None and not self.ifd):
            return
        # Scoring in the trainer (inline mode, the start-up bootstrap) uses its live models: the student trains with
        # dropout on unless disable_dropout. Score as the generator's copies do, in eval mode, flipping only a model
        # that is in train mode and used here. (Only Δ-IFD uses the student, and it runs on the trainer's own thread:
        # the vLLM backend's scoring thread, which cannot run Δ-IFD, uses the teacher alone, which TRL keeps in eval
        # mode, so no mode is flipped from another thread while the trainer trains.)
        used = [self.teacher] + ([self.student] if self.ifd else [])
        flipped = [m for m in used if m is not None and m.training]
        for m in flipped:
            m.eval()
        try:
            self._score(samples)
        finally:
            for m in flipped:
                m.train()

    def _score(self, samples: list[Sample]) -> None:
        sequences = [s.prompt_ids + s.completion_ids for s in samples]
        scored = [range(len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids)) for s in samples]
        hidden, tokens = self._hidden_and_tokens(self.teacher, sequences, scored)
        top_k = self.top_k

        def scores(logits: torch.Tensor, chunk_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # one log-softmax per chunk serves both the sampled tokens' log-probs and the top-k
            logprobs = torch.log_softmax(logits, dim=-1)
            token_lps = logprobs.gather(-1, chunk_tokens[:, None]).squeeze(-1)
            if top_k is None:
                return (token_lps,)
            top = logprobs.topk(top_k, dim=-1)
            return token_lps, top.indices, top.values

        head, transform = lm_head(self.teacher), logit_transform(self.teacher)
        token_lps, *top = (t.cpu() for t in chunked_map(scores, hidden, head, tokens, transform=transform))
        start = 0
        teacher_conditional = []
        for s in samples:
            end = start + len(s.completion_ids)
            if top:
                s.teacher_topk_ids, s.teacher_topk_logprobs = (t[start:end].tolist() for t in top)
            teacher_conditional.append(_mean_nll(token_lps[start:end]))
            start = end
        if self.ifd:
            teacher_unconditional = self._unconditional_nll(self.teacher, samples)
            student_unconditional = self._unconditional_nll(self.student, samples)
            for i, s in enumerate(samples):
                student_conditional = _mean_nll(torch.tensor(s.behaviour_logprobs_t1))
                nlls = (
                    teacher_conditional[i],
                    teacher_unconditional[i],
                    student_conditional,
                    student_unconditional[i],
                )
                s.ifd_delta = math.nan if any(math.isnan(x) for x in nlls) else delta_ifd(*nlls)

    def _unconditional_nll(self, model: nn.Module, samples: list[Sample]) -> list[float]:
        bos = [] if self.bos_token_id is None else [self.bos_token_id]
        sequences = [bos + s.completion_ids for s in samples]
        scored = [range(1, len(seq)) for seq in sequences]  # every token that has a predecessor
        hidden, tokens = self._hidden_and_tokens(model, sequences, scored)
        logprobs = chunked_token_logprobs(
            hidden, lm_head(model), tokens, temperature=1.0, transform=logit_transform(model)
        ).cpu()
        out, start = [], 0
        for positions in scored:
            out.append(_mean_nll(logprobs[start : start + len(positions)]))
            start += len(positions)
        return out

    def _hidden_and_tokens(
        self, model: nn.Module, sequences: list[list[int]], scored: list[range]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states predicting each scored token (row-major) and those tokens."""
        width = max(len(seq) for seq in sequences)
        input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        predicting = torch.zeros_like(input_ids, dtype=torch.bool)
        targets = []
        for row, (seq, positions) in enumerate(zip(sequences, scored, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
            for p in positions:
                predicting[row, p - 1] = True  # position p - 1 predicts token p
            targets += [seq[p] for p in positions]
        hidden = backbone(model)(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), use_cache=False
        ).last_hidden_state[predicting.to(self.device)]
        return hidden, torch.tensor(targets, dtype=torch.long, device=self.device)


def _mean_nll(logprobs: torch.Tensor) -> float:
    """Mean negative log-likelihood; NaN when nothing was scored (IFD is then undefined)."""
    return -float(logprobs.mean()) if logprobs.numel() else math.nan
