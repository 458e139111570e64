import queue
import threading
import time

import pytest

from trl_npd.buffer import SampleBuffer
from trl_npd.samples import GeneratedBatch, Sample


def batch_of(n, policy_step, start=0):
    samples = [
        Sample(
            prompt_ids=[1],
            completion_ids=[2, 3],
            behaviour_logprobs=[-0.1, -0.2],
            policy_version=policy_step,
            policy_step=policy_step,
            prompt_index=i,
            stream_position=start + i,
        )
        for i in range(n)
    ]
    return GeneratedBatch(samples=samples, busy_s=0.0, completion_tokens=2 * n)


class FakeGenerator(threading.Thread):
    """Produces batches tagged with the latest published step, at a given pace, until stopped."""

    def __init__(self, buffer, batch_size, delay_s):
        super().__init__(daemon=True)
        self.buffer, self.batch_size, self.delay_s = buffer, batch_size, delay_s
        self.published_step = 0
        self.produced = 0
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            time.sleep(self.delay_s)
            batch = batch_of(self.batch_size, self.published_step, start=self.produced)
            if not self.buffer.put(batch, self.stop_event.is_set):
                return
            self.produced += self.batch_size


@pytest.mark.parametrize(
    ("generator_delay_s", "trainer_delay_s"),
    [(0.0, 0.01), (0.01, 0.0)],
    ids=["fast-generator-slow-trainer", "slow-generator-fast-trainer"],
)
def test_staleness_bound_holds_on_every_consumed_sample(generator_delay_s, trainer_delay_s):
    max_staleness, sync_every, micro_batch = 3, 2, 4
    buffer = SampleBuffer(queue.Queue(maxsize=4), generation_batch_size=4, poll_s=0.01)
    generator = FakeGenerator(buffer, batch_size=4, delay_s=generator_delay_s)
    generator.start()
    consumed, dropped = 0, 0
    try:
        for step in range(40):
            result = buffer.take(micro_batch, step, max_staleness, check_producer=lambda: None)
            assert len(result.samples) == micro_batch
            for sample in result.samples:
                assert step - sample.policy_step <= max_staleness
            consumed += len(result.samples)
            dropped += result.dropped_stale
            time.sleep(trainer_delay_s)
            if (step + 1) % sync_every == 0:
                generator.published_step = step + 1
    finally:
        generator.stop_event.set()
        generator.join(timeout=5)
    # nothing vanished: every produced sample was trained on, dropped as stale, or is still held
    drained = buffer.drain()
    assert generator.produced == consumed + dropped + drained.held + drained.in_transport
    if generator_delay_s == 0.0:  # a generator running far ahead must have produced stale samples that were evicted
        assert dropped > 0


def test_full_buffer_pauses_the_generator_without_losing_samples():
    buffer = SampleBuffer(queue.Queue(maxsize=2), generation_batch_size=4, poll_s=0.01)
    generator = FakeGenerator(buffer, batch_size=4, delay_s=0.0)
    generator.start()
    time.sleep(0.3)
    assert generator.produced == 8  # two batches fit; the third put is blocked, not dropped or queued elsewhere
    assert len(buffer) == 8
    assert generator.is_alive()
    result = buffer.take(4, current_step=0, max_staleness=0, check_producer=lambda: None)
    assert [s.stream_position for s in result.samples] == [0, 1, 2, 3]
    time.sleep(0.2)
    assert generator.produced == 12  # one batch taken, exactly one more admitted
    generator.stop_event.set()
    generator.join(timeout=5)
    assert not generator.is_alive()


def test_put_gives_up_when_asked_to_stop():
    buffer = SampleBuffer(queue.Queue(maxsize=1), generation_batch_size=1, poll_s=0.01)
    assert buffer.put(batch_of(1, 0), lambda: False)
    stop_at = time.monotonic() + 0.1
    assert not buffer.put(batch_of(1, 0), lambda: time.monotonic() > stop_at)


def test_a_failed_producer_surfaces_in_take_instead_of_hanging():
    buffer = SampleBuffer(queue.Queue(maxsize=1), generation_batch_size=1, poll_s=0.01)
    deadline = time.monotonic() + 0.2

    def check():
        if time.monotonic() > deadline:
            raise RuntimeError("generator died")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="generator died"):
        buffer.take(1, current_step=0, max_staleness=0, check_producer=check)
    assert time.monotonic() - start < 2.0


def test_take_reports_wait_time_and_received_batches():
    buffer = SampleBuffer(queue.Queue(maxsize=4), generation_batch_size=2, poll_s=0.01)
    threading.Timer(0.2, lambda: buffer.transport.put(batch_of(2, 0))).start()
    result = buffer.take(2, current_step=0, max_staleness=0, check_producer=lambda: None)
    assert result.wait_s >= 0.15
    assert len(result.received) == 1 and result.dropped_stale == 0


def test_a_transport_that_breaks_during_the_bootstrap_reports_the_generators_failure():
    """A generator process killed while writing its first batch: the trainer, still bootstrapping, must get the
    reason (the producer check), not a bare EOFError from the pipe."""

    class BrokenTransport:
        def get_nowait(self):
            raise EOFError

    def check_producer():
        raise RuntimeError("The background generator process died (exit code -9)")

    buffer = SampleBuffer(BrokenTransport(), generation_batch_size=4)
    with pytest.raises(RuntimeError, match="exit code -9"):
        buffer.take(4, 0, 8, check_producer, bootstrap=lambda: batch_of(4, 0))
