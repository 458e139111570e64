"""Test helpers that the spawned generator process must be able to import."""

import socket
import threading

import psutil
from transformers import Qwen3ForCausalLM, Qwen3Model


class ExplodingGenerateModel(Qwen3ForCausalLM):
    """A student whose `generate` fails, as a real generator might (CUDA OOM, a bad token id...)."""

    def generate(self, *args, **kwargs):
        raise RuntimeError("boom: the generator's model failed while sampling")


def live_workers() -> tuple[set[str], set[int]]:
    """Names of live threads and pids of live child processes, ignoring Python's own resource tracker.

    The resource tracker is a singleton the standard library starts once per interpreter for any `spawn`
    context's locks and queues; it is not ours to stop and does not belong to one `train()` call.
    """
    from multiprocessing import resource_tracker

    tracker_pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    children = {p.pid for p in psutil.Process().children(recursive=True) if p.pid != tracker_pid}
    return {t.name for t in threading.enumerate()}, children


class FailsOnSecondGenerate(Qwen3ForCausalLM):
    """A student whose sampling works once, then fails: a late failure the trainer may never wait on."""

    calls = 0

    def generate(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls >= 2:
            raise RuntimeError("late boom: the second generation batch failed")
        return super().generate(*args, **kwargs)


class FailsOnRank1(Qwen3ForCausalLM):
    """A student whose generator fails on rank 1 only, at its second batch: one rank of a multi-process run breaks
    mid-training while the others are healthy."""

    calls = 0

    def generate(self, *args, **kwargs):
        import os

        type(self).calls += 1
        if os.environ.get("RANK") == "1" and type(self).calls >= 2:
            raise RuntimeError("late boom on rank 1: its generator failed")
        return super().generate(*args, **kwargs)


def free_port() -> int:
    """A TCP port nothing listens on now, for a launcher or server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _BackboneFailsInAChildProcess(Qwen3Model):
    def forward(self, *args, **kwargs):
        import multiprocessing
        import time

        if multiprocessing.parent_process() is not None:  # the generator process, where samples are scored
            raise RuntimeError(f"boom while scoring at {time.time()!r}")
        return super().forward(*args, **kwargs)


class ScoringFailsInTheGenerator(Qwen3ForCausalLM):
    """A teacher whose forward fails in the generator process, where it scores samples (Δ-IFD, top-k), as a scoring
    stage might (out of memory on the generator's device); the trainer's own teacher works. The message carries the
    wall-clock time of the failure, so a test can measure how long it took to surface."""

    def __init__(self, config):
        super().__init__(config)
        self.model = _BackboneFailsInAChildProcess(config)


def processes_with_marker(marker: str) -> list[psutil.Process]:
    """Live processes whose environment has NPD_TEST_LAUNCH=marker: whatever a launched test run left behind."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("NPD_TEST_LAUNCH") == marker:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
