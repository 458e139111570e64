"""A stand-in for TRL's `VLLMClient` at the network boundary, for CPU tests of the vLLM engine seam.

It speaks the client's interface (`generate`, `update_named_params`, `init_communicator`, `get_server_info`,
`reset_prefix_cache`) and serves it from a local model, as `vllm serve` would from its checkpoint. Everything on
the trainer's side of the boundary is real: TRL's `VLLMGeneration` (connection, weight iteration and naming) and
trl_npd's engine, pipeline and trainer. It is not a replacement for an end-to-end run against vLLM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn


class FakeVLLMClient:
    """Generates with plain ancestral sampling and returns the processed (after temperature) log-probs."""

    model_factory: Callable[[], nn.Module] | None = None  # what the "server" loads at start-up
    logprobs_mode = "processed_logprobs"
    instances: ClassVar[list[FakeVLLMClient]] = []

    def __init__(self, base_url: str | None = None, group_port: int = 51216, connection_timeout: float = 0.0, **_):
        self.base_url = base_url
        self.model = type(self).model_factory().eval()
        self.eos_token_id = self.model.config.eos_token_id
        self.communicator_device: Any = None
        self.weight_updates = 0  # full weight pushes received
        self.generations: list[dict[str, Any]] = []  # every completion, with the weight update it was sampled after
        self._generating = threading.Event()
        type(self).instances.append(self)

    # ---- the server's side of weight sync ---------------------------------------------------------------------------
    def get_server_info(self) -> dict:
        return {"model_config": {"logprobs_mode": self.logprobs_mode}, "weight_transfer_config": {"backend": "nccl"}}

    def init_communicator(self, device: Any = 0) -> None:
        self.communicator_device = device

    def update_named_params(
        self, metadata: list[tuple[str, str, list[int]]], named_params: Iterator[tuple[str, torch.Tensor]]
    ) -> None:
        if self._generating.is_set():
            raise AssertionError("weights were pushed while a generation request was in flight")
        params = dict(self.model.named_parameters())
        received = []
        with torch.no_grad():
            for (name, _dtype, shape), (sent_name, tensor) in zip(metadata, named_params, strict=True):
                assert name == sent_name and list(tensor.shape) == shape, (name, sent_name)
                params[name].copy_(tensor)
                received.append(name)
        if set(received) != set(params):
            raise AssertionError(f"a sync missed weights: {sorted(set(params) - set(received))[:3]}")
        self.weight_updates += 1

    def reset_prefix_cache(self) -> None:
        pass

    # ---- generation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        n: int = 1,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        max_tokens: int = 16,
        logprobs: int | None = 0,
        **_: Any,
    ) -> dict[str, list]:
        # NPD's behaviour log-probs are only right for untruncated sampling at `temperature`
        assert (n, repetition_penalty, top_p, top_k, min_p, logprobs) == (1, 1.0, 1.0, 0, 0.0, 0)
        self._generating.set()
        try:
            completion_ids, completion_logprobs = [], []
            for prompt in prompts:
                ids, lps = self._sample(prompt, temperature, max_tokens)
                completion_ids.append(ids)
                completion_logprobs.append([[lp] for lp in lps])
                self.generations.append(
                    {"prompt": prompt, "completion": ids, "logprobs": lps, "after_update": self.weight_updates}
                )
        finally:
            self._generating.clear()
        return {
            "prompt_ids": prompts,
            "completion_ids": completion_ids,
            "logprobs": completion_logprobs,
            "logprob_token_ids": [[[t] for t in ids] for ids in completion_ids],
        }

    def _sample(self, prompt: list[int], temperature: float, max_tokens: int) -> tuple[list[int], list[float]]:
        sequence = torch.tensor([prompt])
        ids, lps = [], []
        for _ in range(max_tokens):
            logits = self.model(input_ids=sequence).logits[0, -1].float()
            logprobs = torch.log_softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(logprobs.exp(), 1))
            ids.append(token)
            lps.append(float(logprobs[token]))
            if token == self.eos_token_id:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        return ids, lps
