"""The sampling engine: completions for a batch of prompts, with the behaviour log-prob of every sampled token.

`TransformersEngine` samples with the model's own `generate`, in whichever process holds the model (a generator
process, a thread, or the trainer itself in `inline` mode). A `RemoteEngine` holds its own copy of the weights (vLLM,
in `vllm_engine.py`) and receives them from the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria


class _BehaviourPolicy(LogitsProcessor):
    """Applies the sampling temperature and records the log-prob of each sampled token.

    It is the last processor `generate` runs (generate is called with temperature 1, top-k and top-p off, and a
    neutral model config, so no warper follows it), so what it returns is exactly the distribution tokens are
    sampled from: the behaviour policy. The sampled token of step t is only
    known at step t + 1, so each step gathers the previous step's log-probs; `finish` gathers the last one.
    """

    def __init__(self, temperature: float, record_t1: bool = False) -> None:
        self.temperature = temperature
        self.record_t1 = record_t1
        self.logprobs: list[torch.Tensor] = []
        self.logprobs_t1: list[torch.Tensor] = []  # at temperature 1, for Δ-IFD
        self._previous: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous is not None:
            self._gather(input_ids[:, -1])
        raw = torch.log_softmax(scores.float(), dim=-1) if self.record_t1 and self.temperature != 1.0 else None
        scores = scores / self.temperature
        tempered = torch.log_softmax(scores.float(), dim=-1)
        self._previous = (tempered, tempered if raw is None and self.record_t1 else raw)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        tempered, raw = self._previous
        self.logprobs.append(tempered.gather(1, tokens[:, None]).squeeze(1))
        if raw is not None:
            self.logprobs_t1.append(raw.gather(1, tokens[:, None]).squeeze(1))
        self._previous = None

    def finish(self, sequences: torch.Tensor, num_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if num_new_tokens > len(self.logprobs) and self._previous is not None:
            self._gather(sequences[:, -1])
        t1 = torch.stack(self.logprobs_t1, dim=1) if self.logprobs_t1 else None
        return torch.stack(self.logprobs, dim=1), t1


class _StopWhen(StoppingCriteria):
    """Ends a generation early when the pipeline shuts down, so shutdown never waits on a long batch."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)


@dataclass
class EngineConfig:
    max_new_tokens: int
    temperature: float
    pad_token_id: int
    eos_token_id: int | list[int] | None
    device: str = "cpu"

    @classmethod
    def from_config(cls, args: Any, tokenizer: Any, generation_config: Any, device: str) -> EngineConfig:
        """How a trainer's completions are sampled: `max_new_tokens` at `temperature`, ending at the generation
        config's EOS (several, for chat models that end a turn with their own token) or else the tokenizer's."""
        eos = generation_config.eos_token_id
        return cls(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id if eos is None else eos,
            device=device,
        )


@dataclass
class Completion:
    ids: list[int]
    logprobs: list[float]
    logprobs_t1: list[float] | None = None


class TransformersEngine:
    """Samples completions with the model's own `generate` and records the behaviour log-probs."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        should_stop: Callable[[], bool] = lambda: False,
        record_t1: bool = False,
    ) -> None:
        self.model = model
        self.record_t1 = record_t1
        self.config = config
        self.should_stop = should_stop
        # the module whose generation_config `generate` reads (inside a PEFT wrapper, the wrapped model)
        self._generating = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers fills every field we leave unset from the model's own generation_config (a checkpoint's
        # repetition_penalty, min_p, ...), which would sample from something other than the recorded policy.
        # While sampling, the model sees a neutral config instead.
        self._neutral_model_config = GenerationConfig(
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        eos = config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=True,
            temperature=1.0,  # applied by _BehaviourPolicy, so the recorded log-probs are the sampled ones
            top_k=0,
            top_p=1.0,
            use_cache=True,
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
        )

    @torch.no_grad()
    def generate(self, prompts: list[list[int]]) -> list[Completion] | None:
        """One completion per prompt, cut after its first EOS. None if asked to stop midway."""
        device = torch.device(self.config.device)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        policy = _BehaviourPolicy(self.config.temperature, record_t1=self.record_t1)
        was_training, model_config = self.model.training, self._generating.generation_config
        self.model.eval()
        self._generating.generation_config = self._neutral_model_config
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=self._generation_config,
                logits_processor=LogitsProcessorList([policy]),
                stopping_criteria=[_StopWhen(self.should_stop)],
            )
        finally:
            self.model.train(was_training)
            self._generating.generation_config = model_config
        if self.should_stop():
            return None
        completions = sequences[:, width:].cpu()
        logprobs, logprobs_t1 = policy.finish(sequences, completions.shape[1])
        rows = logprobs_t1.cpu().tolist() if logprobs_t1 is not None else [None] * len(prompts)
        return [
            self._cut(ids.tolist(), lps.tolist(), t1)
            for ids, lps, t1 in zip(completions, logprobs.cpu(), rows, strict=True)
        ]

    def _cut(self, ids: list[int], logprobs: list[float], logprobs_t1: list[float] | None) -> Completion:
        end = next((i + 1 for i, token in enumerate(ids) if token in self._eos), len(ids))
        return Completion(ids[:end], logprobs[:end], None if logprobs_t1 is None else logprobs_t1[:end])


class RemoteEngine(Protocol):
    """An engine that holds its own copy of the weights (vLLM): the trainer pushes weights into it."""

    def generate(self, prompts: list[list[int]]) -> list[Completion] | None: ...

    def sync_weights(self) -> None: ...
