"""The buffer between the generator and the trainer: bounded, version-tagged, evicting by staleness.

The producer side (`put`) runs in the generator, possibly in another process; the consumer side (`take`) runs in
the trainer. The transport is a bounded queue of whole generation batches, so a full buffer blocks the generator
(backpressure) instead of growing memory or dropping samples. Staleness can only be judged against the trainer's
current step, so eviction happens on the consumer side, and every evicted sample is counted.

This module is the queue and its policies (backpressure, eviction, the guard against empty completions, refilling
inline or bootstrapping while the generator starts); what travels through it is in `samples.py`.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .samples import Drained, GeneratedBatch, Sample, TakeResult


class EmptyCompletionsError(RuntimeError):
    """The generator returns nothing but empty completions: training would starve."""


class SampleBuffer:
    """Bounded buffer of generated samples.

    Args:
        transport: a queue with `put(item, timeout=)` / `get(timeout=)`: a `multiprocessing` queue when the generator
            is a process, a `queue.Queue` when it is a thread. Its `maxsize` bounds the buffer, in generation batches.
        generation_batch_size: samples per generation batch, to report the buffer's size in samples.
        poll_s: how often a blocked side wakes up to check for shutdown or a failed peer.
        max_empty_in_a_row: empty completions in a row after which `take` gives up (`EmptyCompletionsError`)
            instead of waiting forever for a sample it can train on. `None`: four generation batches' worth, and at
            least 64.
    """

    def __init__(
        self,
        transport: Any,
        generation_batch_size: int,
        poll_s: float = 0.1,
        max_empty_in_a_row: int | None = None,
    ) -> None:
        self.transport = transport
        self._generation_batch_size = generation_batch_size
        self._poll_s = poll_s
        self._ready: deque[Sample] = deque()
        self._max_empty_in_a_row = max_empty_in_a_row or max(64, 4 * generation_batch_size)
        self._empty_in_a_row = 0

    # ---- producer side (generator) -------------------------------------------------------------------------------
    def put(self, batch: GeneratedBatch, should_stop: Callable[[], bool]) -> bool:
        """Block until the batch fits (backpressure). Returns False, without enqueuing, if asked to stop first."""
        while not should_stop():
            try:
                self.transport.put(batch, timeout=self._poll_s)
                return True
            except queue.Full:
                continue
        return False

    # ---- consumer side (trainer) ---------------------------------------------------------------------------------
    def take(
        self,
        n: int,
        current_step: int,
        max_staleness: int,
        check_producer: Callable[[], None],
        refill: Callable[[], GeneratedBatch] | None = None,
        bootstrap: Callable[[], GeneratedBatch] | None = None,
    ) -> TakeResult:
        """Return the `n` oldest samples whose staleness is within `max_staleness`, evicting older ones.

        Blocks while fewer than `n` fresh samples are available. `check_producer` is called while waiting and must
        raise if the generator has failed, so a crash surfaces here instead of hanging. `refill`, when given, makes
        the samples synchronously instead of waiting on the transport (the `inline` generator mode). `bootstrap`,
        when given, makes them synchronously only while the transport has nothing to give (a generator that is still
        starting); its time is `bootstrap_s`, not `wait_s`. Samples without a completion token are dropped and
        counted too: they have nothing to train on.
        """
        result = TakeResult(samples=[])
        while len(result.samples) < n:
            while self._ready and len(result.samples) < n:
                sample = self._ready.popleft()
                if current_step - sample.policy_step > max_staleness:
                    result.stale.append(sample)
                elif not sample.completion_ids:
                    result.empty.append(sample)
                    self._empty_in_a_row += 1
                    if self._empty_in_a_row >= self._max_empty_in_a_row:
                        raise EmptyCompletionsError(
                            f"The generator returned {self._empty_in_a_row} empty completions in a row (no token "
                            "after the prompt), so there is nothing to train on. An engine returns an empty "
                            "completion when a prompt fills its context or its token limit is 0: check max_length, "
                            "max_new_tokens and the engine's own limits (e.g. the vLLM server's max_model_len)."
                        )
                else:
                    self._empty_in_a_row = 0
                    result.samples.append(sample)
            if len(result.samples) == n:
                break
            batch = self._next_batch(result, check_producer, refill, bootstrap)
            result.received.append(batch)
            self._ready.extend(batch.samples)
        return result

    def _next_batch(
        self,
        result: TakeResult,
        check_producer: Callable[[], None],
        refill: Callable[[], GeneratedBatch] | None,
        bootstrap: Callable[[], GeneratedBatch] | None,
    ) -> GeneratedBatch:
        if bootstrap is not None:
            try:
                return self.transport.get_nowait()
            except (EOFError, OSError):
                check_producer()  # a generator process killed while writing its first batch: say why
                raise
            except queue.Empty:
                start = time.perf_counter()
                batch = bootstrap()
                result.bootstrap_s += time.perf_counter() - start
                return batch
        # Time spent here is time the optimizer sits idle, whether it waits on the transport or generates inline.
        start = time.perf_counter()
        try:
            if refill is not None:
                return refill()
            while True:
                check_producer()
                try:
                    return self.transport.get(timeout=self._poll_s)
                except queue.Empty:
                    continue
                except (EOFError, OSError):
                    # a generator process killed halfway through writing a batch (e.g. as hung): say why
                    check_producer()
                    raise
        finally:
            result.wait_s += time.perf_counter() - start

    def __len__(self) -> int:
        """Samples held: those already received plus those still in the transport (approximate across processes)."""
        try:
            in_transport = self.transport.qsize()
        except NotImplementedError:  # macOS multiprocessing queues
            in_transport = 0
        return len(self._ready) + in_transport * self._generation_batch_size

    def drain(self) -> Drained:
        """Discard everything still held (at shutdown) and report it: the samples the trainer had received but not
        used, the samples still in the transport, and what the generator dropped in those undelivered batches."""
        drained = Drained(held=len(self._ready))
        self._ready.clear()
        while True:
            try:
                batch = self.transport.get_nowait()
            except (queue.Empty, OSError, EOFError, ValueError):  # EOF: a writer killed mid-batch; the rest is lost
                return drained
            drained.in_transport += len(batch.samples)
            drained.dropped_in_transport.update(batch.dropped)
            drained.rejected_in_transport.extend(batch.rejected)
