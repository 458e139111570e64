"""What flows from the generator to the trainer: samples, the batches they travel in, and the accounts of what was
taken, rejected or left behind.

These are plain data, shared by every stage (generation, scoring, selection, the buffer, batching, logging), so they
live apart from any of them: a stage that only reads samples need not import the queue that carries them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Sample:
    """One prompt and the completion the generator sampled for it, tagged with the policy that sampled it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    # log-prob of each completion token under the behaviour policy (the snapshot, at the sampling temperature)
    behaviour_logprobs: list[float]
    policy_version: int
    # optimizer step at which the generating weights were taken; staleness = current step - policy_step
    policy_step: int
    prompt_index: int
    # position of the prompt in the generator's prompt stream, so a resumed run continues after it
    stream_position: int
    prompt_truncated: bool = False
    # the teacher's top-k at each completion token, when the scoring stage ran (`teacher_top_k`)
    teacher_topk_ids: list[list[int]] | None = None
    teacher_topk_logprobs: list[list[float]] | None = None
    # log-probs of the completion tokens under the snapshot at temperature 1 (Δ-IFD's student conditional NLL)
    behaviour_logprobs_t1: list[float] | None = None
    ifd_delta: float | None = None  # NaN when undefined (nothing scored without the prompt)


@dataclass
class Rejected:
    """A sample (or a prompt) the generator discarded before the buffer, and why: enough to trace it, not its
    tokens."""

    prompt_index: int
    stream_position: int
    policy_version: int
    policy_step: int
    reason: str  # "ifd_low", "ifd_high", "empty_prompt"
    ifd_delta: float | None = None
    completion_tokens: int = 0


@dataclass
class GeneratedBatch:
    """What the generator hands over at once: samples of one policy version and what they cost."""

    samples: list[Sample]
    busy_s: float
    completion_tokens: int
    truncated_prompts: int = 0
    ifd_deltas: list[float] = field(default_factory=list)  # of every scored sample, kept or not
    warnings: list[str] = field(default_factory=list)  # for the trainer to log
    rejected: list[Rejected] = field(default_factory=list)  # what the generator could not produce or discarded
    bootstrap: bool = False  # sampled by the trainer itself while the generator process was starting

    @property
    def dropped(self) -> Counter:
        """The rejected samples counted by reason."""
        return Counter(r.reason for r in self.rejected)


@dataclass
class TakeResult:
    """What one `take` returned and what it observed on the way."""

    samples: list[Sample]
    stale: list[Sample] = field(default_factory=list)  # evicted past the staleness bound, oldest first
    empty: list[Sample] = field(default_factory=list)  # completions without a single token: nothing to train on
    wait_s: float = 0.0  # blocked on the transport (or generating, in `inline` mode)
    bootstrap_s: float = 0.0  # generating inline while the generator process was starting
    received: list[GeneratedBatch] = field(default_factory=list)

    @property
    def dropped_stale(self) -> int:
        return len(self.stale)

    @property
    def dropped_empty_completion(self) -> int:
        return len(self.empty)


@dataclass
class Drained:
    """What was still held between generator and trainer when the buffer was emptied at shutdown."""

    held: int = 0  # samples the trainer had received but not used
    in_transport: int = 0  # samples generated but never delivered
    dropped_in_transport: Counter = field(default_factory=Counter)  # the generator's drops in those batches
    rejected_in_transport: list[Rejected] = field(default_factory=list)  # and each of them, for the sample log

    def add(self, other: Drained) -> None:
        self.held += other.held
        self.in_transport += other.in_transport
        self.dropped_in_transport.update(other.dropped_in_transport)
        self.rejected_in_transport.extend(other.rejected_in_transport)
