"""The `npd/` metrics: accumulated between two `Trainer.log` calls, plus run totals for tests and benchmarks."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .packing import PackingStats
from .samples import TakeResult

SAMPLE_DRIFT_KEPT = 100_000


@dataclass
class NPDTotals:
    """Counters over a whole `train()` call.

    Every prompt the generator takes becomes a sample that is trained on, dropped for a reason, or unused when
    training ends, wherever it then is. `generated_samples` is the generator's own count, the rest are counted where
    each sample ends up, so after `train()` returns the accounting is exact: `generated_samples == accounted()`.

    - `dropped`, by reason: "stale" and "empty_completion" in the trainer's buffer; "empty_prompt", "ifd_low" and
      "ifd_high" in the generator (also for batches that were still on their way at shutdown).
    - Unused at shutdown: received by the trainer (`unused_at_shutdown`), in the transport between the two
      (`undelivered_at_shutdown`), or in a batch still in the generator's hands (`unfinished_at_shutdown`).
    """

    generated_samples: int = 0  # prompts the generator took, each to become one sample (its own count)
    received_samples: int = 0  # handed to the trainer, after the generator's own drops
    generated_tokens: int = 0
    generator_busy_s: float = 0.0
    consumed_samples: int = 0  # trained on
    dropped: Counter = field(default_factory=Counter)  # by reason: "stale", "ifd_low", "empty_prompt", ...
    unused_at_shutdown: int = 0
    undelivered_at_shutdown: int = 0
    unfinished_at_shutdown: int = 0
    truncated_prompts: int = 0
    wait_s: float = 0.0  # blocked on the buffer
    bootstrap_s: float = 0.0  # sampling inline while the generator process was starting
    bootstrap_samples: int = 0  # of received_samples, those the trainer sampled itself while bootstrapping
    first_sample_wait_s: float = 0.0  # until the first samples: waiting, or sampling them inline at start-up
    first_sample_idle_s: float = 0.0  # of that, waiting with nothing to do
    weight_syncs: Counter = field(default_factory=Counter)  # by reason: "schedule", "drift", "stale_snapshot"
    sync_steps: list[int] = field(default_factory=list)  # the optimizer step of every weight sync, in order
    max_staleness_seen: int = 0
    # the on-policy samples trained on, the most recent SAMPLE_DRIFT_KEPT of them: (staleness when trained, mean k3
    # drift per token, trained tokens); bounded, since a run can train on millions
    sample_drift: deque = field(default_factory=lambda: deque(maxlen=SAMPLE_DRIFT_KEPT))

    def unused(self) -> int:
        """Samples unused at shutdown, wherever they were."""
        return self.unused_at_shutdown + self.undelivered_at_shutdown + self.unfinished_at_shutdown

    def accounted(self) -> int:
        """Samples whose fate is known: trained on, dropped (every reason), or unused at shutdown."""
        return self.consumed_samples + sum(self.dropped.values()) + self.unused()


class NPDMetrics:
    """Collects what the pipeline and the loss observe; `flush` returns one log window's `npd/` values."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: the run totals and the window (a new `train()` call)."""
        self.totals = NPDTotals()
        self._reset_window()

    def start_window(self) -> None:
        """Start the current logging window's clock (`npd/wait_frac` is measured against it)."""
        self._window_start = time.perf_counter()

    def _reset_window(self) -> None:
        self.start_window()
        self._staleness: list[int] = []
        self._dropped: Counter = Counter()
        self._wait_s = 0.0
        self._bootstrap_s = 0.0
        self._bootstrap_samples = 0
        self._gen_samples = self._gen_tokens = 0
        self._gen_busy_s = 0.0
        self._kl_sum, self._kl_tokens = 0.0, 0
        self._sample_drift_max = -math.inf
        self._sync_s: list[float] = []
        self._drift_refreshes = 0
        self._truncated = 0
        self._packing: list[PackingStats] = []
        self._ifd_deltas: list[float] = []

    def record_take(self, result: TakeResult, current_step: int) -> None:
        staleness = [current_step - s.policy_step for s in result.samples]
        self._staleness += staleness
        self._dropped["stale"] += result.dropped_stale
        self._wait_s += result.wait_s
        self._bootstrap_s += result.bootstrap_s
        t = self.totals
        if t.consumed_samples == 0:
            t.first_sample_wait_s = result.wait_s + result.bootstrap_s
            t.first_sample_idle_s = result.wait_s
        t.consumed_samples += len(result.samples)
        t.dropped["stale"] += result.dropped_stale
        if result.dropped_empty_completion:
            self._dropped["empty_completion"] += result.dropped_empty_completion
            t.dropped["empty_completion"] += result.dropped_empty_completion
        t.wait_s += result.wait_s
        t.bootstrap_s += result.bootstrap_s
        t.max_staleness_seen = max([t.max_staleness_seen, *staleness])
        for batch in result.received:
            if batch.bootstrap:  # the trainer sampled these itself: bootstrap_s, not the generator's rate
                self._bootstrap_samples += len(batch.samples)
                t.bootstrap_samples += len(batch.samples)
            else:
                self._gen_samples += len(batch.samples)
                self._gen_tokens += batch.completion_tokens
                self._gen_busy_s += batch.busy_s
                t.generator_busy_s += batch.busy_s
            self._dropped.update(batch.dropped)
            self._truncated += batch.truncated_prompts
            self._ifd_deltas += batch.ifd_deltas
            t.received_samples += len(batch.samples)
            t.generated_tokens += batch.completion_tokens
            t.dropped.update(batch.dropped)
            t.truncated_prompts += batch.truncated_prompts

    def record_sample_drift(self, staleness: list[int], drift: list[float], tokens: list[int]) -> None:
        """Each trained sample's staleness and drift (mean k3 between its behaviour policy and the current student);
        the window's largest is logged as `npd/policy_kl_sample_max`."""
        self.totals.sample_drift.extend(zip(staleness, drift, tokens, strict=True))
        self._sample_drift_max = max([self._sample_drift_max, *drift])

    def record_packing(self, stats: PackingStats) -> None:
        self._packing.append(stats)

    def record_policy_kl(self, kl_sum: float, tokens: int) -> None:
        self._kl_sum += kl_sum
        self._kl_tokens += tokens

    def record_sync(self, seconds: float, reason: str, step: int) -> None:
        self._sync_s.append(seconds)
        self._drift_refreshes += reason == "drift"
        self.totals.weight_syncs[reason] += 1
        self.totals.sync_steps.append(step)

    def flush(self, version: int, buffer_size: int | None) -> dict[str, float]:
        """This window's values. `buffer_size` is None on a rank without a generator (`shared_generator`): it has
        no buffer, and its waits happen in the scatter, where they are not measured.

        A mean or rate over something this window may not have (syncs, packed batches, generator time) is left
        out when it has none, rather than logged as 0.
        """
        logs: dict[str, float] = {"npd/version": float(version)}
        if buffer_size is not None:
            logs.update(self._buffer_logs(buffer_size))
        logs.update(self._drop_logs())
        logs.update(self._sample_logs())
        logs.update(self._policy_logs())
        logs.update(self._batch_logs())
        logs.update(self._bootstrap_logs())
        self._reset_window()
        return logs

    def _buffer_logs(self, buffer_size: int) -> dict[str, float]:
        """How full the buffer is, and how long the optimizer waited on it."""
        return {
            "npd/buffer_size": float(buffer_size),
            "npd/wait_s": self._wait_s,
            # share of the window's wall time the optimizer spent blocked on the buffer: ~0 when generation keeps up
            "npd/wait_frac": self._wait_s / max(time.perf_counter() - self._window_start, 1e-9),
        }

    def _drop_logs(self) -> dict[str, float]:
        """Samples dropped, by reason; the Δ-IFD filter's drops are logged with its own values."""
        logs = {"npd/dropped_stale": float(self._dropped["stale"])}
        for reason, count in self._dropped.items():
            if reason not in ("stale", "ifd_low", "ifd_high"):
                logs[f"npd/dropped_{reason}"] = float(count)
        if self._ifd_deltas:
            defined = [d for d in self._ifd_deltas if not math.isnan(d)]
            if defined:
                logs["npd/ifd_delta_mean"] = sum(defined) / len(defined)
            low, high = self._dropped["ifd_low"], self._dropped["ifd_high"]
            logs["npd/ifd_kept_frac"] = 1.0 - (low + high) / len(self._ifd_deltas)
            logs["npd/ifd_dropped_low"], logs["npd/ifd_dropped_high"] = float(low), float(high)
        return logs

    def _sample_logs(self) -> dict[str, float]:
        """How stale the trained samples were, and how fast the generator made them."""
        logs: dict[str, float] = {}
        if self._staleness:
            logs["npd/staleness_mean"] = sum(self._staleness) / len(self._staleness)
            logs["npd/staleness_max"] = float(max(self._staleness))
        if self._gen_busy_s > 0:
            logs["npd/gen_samples_per_s"] = self._gen_samples / self._gen_busy_s
            logs["npd/gen_tokens_per_s"] = self._gen_tokens / self._gen_busy_s
        return logs

    def _policy_logs(self) -> dict[str, float]:
        """How far the samples' behaviour policy was from the student, and the weight syncs that narrow it."""
        logs: dict[str, float] = {}
        if self._kl_tokens:
            logs["npd/policy_kl"] = self._kl_sum / self._kl_tokens
            logs["npd/policy_kl_sample_max"] = self._sample_drift_max
        if self._sync_s:
            logs["npd/weight_sync_s"] = sum(self._sync_s) / len(self._sync_s)
            logs["npd/drift_refreshes"] = float(self._drift_refreshes)  # syncs brought forward by max_policy_kl
        return logs

    def _batch_logs(self) -> dict[str, float]:
        """How well packing filled the trained rows, and how many prompts were truncated."""
        logs: dict[str, float] = {}
        if self._packing:
            logs["npd/row_fill"] = sum(p.row_fill for p in self._packing) / len(self._packing)
            logs["npd/pad_frac"] = sum(p.pad_frac for p in self._packing) / len(self._packing)
        if self._truncated:
            logs["npd/truncated_prompts"] = float(self._truncated)
        return logs

    def _bootstrap_logs(self) -> dict[str, float]:
        if not self._bootstrap_samples:
            return {}
        # the trainer sampled these itself while the generator process started
        return {"npd/bootstrap_samples": float(self._bootstrap_samples), "npd/bootstrap_s": self._bootstrap_s}


# How one log window's values from several ranks combine into the one logged value. Counts and throughputs add up
# (every rank has its own generator and buffer). Times take the largest: ranks step together, so the slowest rank's
# wait or sync is everyone's. The worst staleness is the largest. Anything else (means, fractions) is averaged over
# the ranks that reported it in this window.
_SUMMED_PREFIXES = ("npd/dropped_", "npd/ifd_dropped_")
_SUMMED = {
    "npd/buffer_size",
    "npd/truncated_prompts",
    "npd/gen_samples_per_s",
    "npd/gen_tokens_per_s",
    "npd/bootstrap_samples",
}
# drift refreshes are decided together (on the KL summed over ranks), so every rank counts the same ones
_MAXED = {
    "npd/staleness_max",
    "npd/policy_kl_sample_max",
    "npd/version",
    "npd/wait_s",
    "npd/wait_frac",
    "npd/weight_sync_s",
    "npd/bootstrap_s",
    "npd/drift_refreshes",
}


def aggregate_across_ranks(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One `npd/` log entry from every rank's entry for the same window (see the rules above)."""
    keys = dict.fromkeys(key for logs in per_rank for key in logs)
    merged: dict[str, float] = {}
    for key in keys:
        values = [logs[key] for logs in per_rank if key in logs]
        if key in _SUMMED or key.startswith(_SUMMED_PREFIXES):
            merged[key] = float(sum(values))
        elif key in _MAXED:
            merged[key] = float(max(values))
        else:
            merged[key] = sum(values) / len(values)
    return merged
