"""The generator's progress report: a heartbeat the trainer watches, what the generator is doing, and its counts.

A generator can be alive and still make no progress: deadlocked, stuck in a device call, or frozen (SIGSTOP, a
cgroup freezer). Liveness alone cannot tell that apart from a long batch, so the generator beats while it works:
after every layer of a forward (`generator.beat_after_every_layer`: a prefill or a scoring pass over a whole
generation batch can be long by itself), at every decoding step (the engine's stop check), at every poll while the
buffer is full, at every poll while it waits for the weight snapshot's lock. The trainer treats a generator whose
last beat is older than `generator_timeout_s` as hung. The values live in shared memory, so the same object works
for a spawned process, a thread, and the trainer itself (`inline` mode, where only the counts are used).

The counts make the accounting exact from the generator's side: every prompt it takes becomes a sample that is
trained on, dropped (with its reason), or unused when training ends, wherever it then sits.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any


class Activity(IntEnum):
    STARTING = 0
    LOADING_WEIGHTS = 1
    GENERATING = 2
    SCORING = 3
    WAITING_FOR_ROOM = 4
    WAITING_FOR_SNAPSHOT_LOCK = 5


_DESCRIPTIONS = {
    Activity.STARTING: "starting up (loading its copies of the models)",
    Activity.LOADING_WEIGHTS: "loading a new policy version's weights from the snapshot",
    Activity.GENERATING: "sampling generation batch {batch} with policy version {version}",
    Activity.SCORING: "scoring generation batch {batch} (teacher top-k / Δ-IFD)",
    Activity.WAITING_FOR_ROOM: "waiting for room in the full buffer to hand over generation batch {batch}",
    Activity.WAITING_FOR_SNAPSHOT_LOCK: "waiting for the weight snapshot's lock (held by a publish)",
}


class GeneratorProgress:
    """Heartbeat, current activity and sample counts of one generator, readable from the trainer.

    Args:
        ctx: a `multiprocessing` context; its shared values also work between threads. Only the generator writes.
    """

    def __init__(self, ctx: Any) -> None:
        now = time.monotonic()  # system-wide on Linux and macOS: comparable between the two processes
        self._beat_at = ctx.Value("d", now, lock=False)
        self._activity = ctx.Value("i", int(Activity.STARTING), lock=False)
        self._activity_since = ctx.Value("d", now, lock=False)
        self._batch = ctx.Value("q", 0, lock=False)  # generation batches started
        self._version = ctx.Value("q", -1, lock=False)
        self._taken = ctx.Value("q", 0, lock=False)  # prompts taken from the stream: samples set out to make
        self._unfinished = ctx.Value("q", 0, lock=False)  # of those, still in the generator's hands when it stopped

    # ---- generator side -------------------------------------------------------------------------------------------
    def beat(self) -> None:
        """Still working (or healthily waiting) on the current activity."""
        self._beat_at.value = time.monotonic()

    def doing(self, activity: Activity) -> None:
        """Now doing `activity` (a beat too); repeating the current activity only beats."""
        now = time.monotonic()
        if self._activity.value != int(activity):
            self._activity.value = int(activity)
            self._activity_since.value = now
        self._beat_at.value = now

    def took_prompts(self, n: int, version: int) -> None:
        """A generation batch starts: `n` prompts taken, sampled with policy `version`."""
        self._taken.value += n
        self._batch.value += 1
        self._version.value = version
        now = time.monotonic()
        self._activity.value = int(Activity.GENERATING)
        self._activity_since.value = now
        self._beat_at.value = now

    def left_unfinished(self, n: int) -> None:
        """The generator stopped with `n` taken prompts that never reached the buffer."""
        self._unfinished.value += n

    # ---- trainer side ---------------------------------------------------------------------------------------------
    @property
    def activity(self) -> Activity:
        return Activity(self._activity.value)

    @property
    def taken(self) -> int:
        return int(self._taken.value)

    @property
    def unfinished(self) -> int:
        return int(self._unfinished.value)

    def silent_s(self) -> float:
        """Seconds since the generator last showed progress."""
        return time.monotonic() - self._beat_at.value

    def describe(self) -> str:
        """What the generator was last doing, and since when."""
        text = _DESCRIPTIONS[Activity(self._activity.value)].format(
            batch=self._batch.value, version=self._version.value
        )
        return f"{text}, begun {time.monotonic() - self._activity_since.value:.1f} s ago"
