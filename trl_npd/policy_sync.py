"""When the generator's weights are refreshed: the one owner of the policy version and of the step it was taken at.

The generator samples with a snapshot of the student, version `version`, published at optimizer step
`synced_step`. A sample it makes at that version is `step - synced_step` steps stale by the time the trainer is at
`step`. After every optimizer step the drift between the sampling policy and the student (the k3 estimate of
KL(behaviour ‖ current), per trained token) decides, with the schedule, whether to publish the student's weights:

- every `weight_sync_steps` steps (`"schedule"`);
- at once when the step's drift exceeds `max_policy_kl` (`"drift"`);
- before taking samples when no sample the snapshot can make would be fresh enough (`"stale_snapshot"`): the
  schedule keeps this from happening, this keeps a bypassed schedule from turning into a hang.

Every rank holds the same `PolicySync` and takes the same decisions at the same steps (their collectives must line
up), including ranks that host no generator.
"""

from __future__ import annotations

from typing import Any

import torch


class PolicySync:
    def __init__(self, args: Any) -> None:
        # the config is read at each decision, not copied: a hyperparameter search or a caller may change it in place
        self.args = args
        self.version = -1  # the policy version of the weights last published; -1 before the first
        self.synced_step = 0  # the optimizer step they were published at
        self._kl_sum = torch.zeros((), dtype=torch.float64)
        self._kl_tokens = 0

    def begin(self, last_version: int, step: int) -> None:
        """Training (re)starts at optimizer step `step`: the generator's first snapshot is the student as it is now,
        the version after `last_version` (a resumed run's checkpoint recorded it; -1 on a fresh run)."""
        self.version = last_version + 1
        self.synced_step = step

    def lag(self, step: int) -> int:
        """How many optimizer steps the generator's weights are behind the trainer's at `step`."""
        return step - self.synced_step

    def snapshot_too_stale(self, step: int) -> bool:
        """Whether every sample the current snapshot could make would exceed the staleness bound at `step`."""
        return self.lag(step) > self.args.max_staleness

    def add_drift(self, k3: torch.Tensor) -> None:
        """This micro-batch's per-token drift estimates, added to the optimizer step's."""
        self._kl_sum = self._kl_sum.to(k3.device) + k3.sum().double()
        self._kl_tokens += k3.numel()

    def take_step_drift(self, accelerator: Any | None = None) -> tuple[float, int]:
        """The optimizer step's drift sum and token count, reset for the next step: summed over the ranks through
        `accelerator` when given (every rank must take the same sync decision), this rank's own otherwise."""
        kl_sum, kl_tokens = self._kl_sum, self._kl_tokens
        self._kl_sum, self._kl_tokens = torch.zeros((), dtype=torch.float64), 0
        if accelerator is not None:
            device = accelerator.device
            totals = torch.stack([kl_sum.to(device), torch.tensor(kl_tokens, device=device, dtype=torch.float64)])
            kl_sum, tokens = accelerator.reduce(totals, reduction="sum").unbind()
            kl_tokens = int(tokens.item())
        return float(kl_sum), kl_tokens

    def reason_to_publish(self, step: int, kl: float) -> str | None:
        """After optimizer step `step`, whose mean drift per token was `kl`: why to publish now, or None."""
        if step % self.args.weight_sync_steps == 0:
            return "schedule"
        if (bound := self.args.max_policy_kl) is not None and kl > bound:
            return "drift"
        return None

    def published(self, step: int) -> None:
        self.version += 1
        self.synced_step = step


def drift_of_samples(
    policy_step: torch.Tensor, sample_index: torch.Tensor, k3: torch.Tensor, mask: torch.Tensor, step: int
) -> tuple[list[int], list[float], list[int]]:
    """Each trained sample's staleness at optimizer step `step`, mean drift over its trained tokens, and token count:
    the distribution behind the step's `npd/policy_kl`, which shows how drift grows with staleness.

    `k3` holds the drift of each trained token (`mask` selects them from the shifted positions); `sample_index`
    (per position) and `policy_step` (per sample) come from the micro-batch."""
    samples = policy_step.numel()
    index = sample_index[:, 1:][mask].to(k3.device)
    drift_sum = torch.zeros(samples, dtype=torch.float64, device=k3.device).index_add_(0, index, k3.double())
    tokens = torch.bincount(index, minlength=samples)
    trained = tokens > 0
    staleness = step - policy_step.to(k3.device)
    return staleness[trained].tolist(), (drift_sum[trained] / tokens[trained]).tolist(), tokens[trained].tolist()
