"""The generator loop: prompts -> engine -> scoring -> selection -> buffer.

`generate_batch` is one turn of it, shared by every host (a generator process, a thread, the trainer in `inline`
mode). `generator_loop` is the loop of a background generator, written once; a host supplies what differs:

- `SnapshotHost`: its own copy of the student, refreshed from a `PolicySnapshot` between batches (in a generator
  process or a thread; `run_generator` starts it there);
- `RemoteHost`: an engine that holds its own weights (vLLM), driven from a thread of the trainer process
  (`serve` runs the loop on it there).
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .buffer import SampleBuffer
from .engine import EngineConfig, RemoteEngine, TransformersEngine
from .progress import Activity, GeneratorProgress
from .prompts import PromptStream
from .samples import GeneratedBatch, Rejected, Sample
from .scoring import SampleScorer
from .selection import DeltaIFDFilter, DeltaIFDSettings
from .snapshot import PolicySnapshot, held_while_alive


def generate_batch(
    engine: TransformersEngine | RemoteEngine,
    prompts: PromptStream,
    batch_size: int,
    version: int,
    step: int,
    scorer: SampleScorer | None = None,
    selector: DeltaIFDFilter | None = None,
    progress: GeneratorProgress | None = None,
) -> GeneratedBatch | None:
    """Sample one generation batch with the engine's current weights, tagged with their version and step; score
    it (teacher top-k, Δ-IFD) and keep the samples in the Δ-IFD band, when a scorer and a selector are given.
    `progress`, when given, counts the prompts taken and reports what the batch is doing."""
    start = time.perf_counter()
    batch_prompts = prompts.take(batch_size)
    if progress is not None:
        progress.took_prompts(len(batch_prompts), version)
    rejected = [
        Rejected(p.index, p.position, version, step, "empty_prompt") for p in batch_prompts if not p.ids
    ]  # nothing to condition on; generate() cannot start from zero tokens
    usable = [p for p in batch_prompts if p.ids]
    completions = engine.generate([p.ids for p in usable]) if usable else []
    if completions is None:
        return None
    samples = [
        Sample(
            prompt_ids=p.ids,
            completion_ids=c.ids,
            behaviour_logprobs=c.logprobs,
            policy_version=version,
            policy_step=step,
            prompt_index=p.index,
            stream_position=p.position,
            prompt_truncated=p.truncated,
            behaviour_logprobs_t1=c.logprobs_t1,
        )
        for p, c in zip(usable, completions, strict=True)
    ]
    if scorer is not None:
        if progress is not None:
            progress.doing(Activity.SCORING)
        scorer.score(samples)
    deltas, warnings = [], []
    if selector is not None:
        deltas = [s.ifd_delta for s in samples]
        selected = selector.select(deltas)
        for i, reason in selected.rejected:
            s = samples[i]
            rejected.append(
                Rejected(s.prompt_index, s.stream_position, version, step, reason, s.ifd_delta, len(s.completion_ids))
            )
        samples = [samples[i] for i in selected.kept]
        warnings = selected.warnings
    return GeneratedBatch(
        samples=samples,
        busy_s=time.perf_counter() - start,
        completion_tokens=sum(len(s.completion_ids) for s in samples),
        truncated_prompts=sum(p.truncated for p in usable),
        ifd_deltas=deltas,
        warnings=warnings,
        rejected=rejected,
    )


def scoring_stage(
    teacher: nn.Module | None,
    student: nn.Module,
    top_k: int | None,
    delta_ifd: DeltaIFDSettings | None,
    bos_token_id: int | None,
    engine: EngineConfig,
) -> tuple[SampleScorer | None, DeltaIFDFilter | None]:
    """The scorer and selector a generator needs, or None for each it does not."""
    if teacher is None or (top_k is None and delta_ifd is None):
        return None, None
    scorer = SampleScorer(
        teacher,
        top_k=top_k,
        student=student,
        ifd=delta_ifd is not None,
        bos_token_id=bos_token_id,
        device=engine.device,
    )
    selector = None if delta_ifd is None else DeltaIFDFilter(delta_ifd)
    return scorer, selector


@dataclass
class GeneratorSpec:
    """Everything the background generator needs; picklable so a spawned process can receive it."""

    snapshot: PolicySnapshot
    prompts: PromptStream
    engine: EngineConfig
    generation_batch_size: int
    seed: int
    progress: GeneratorProgress  # the heartbeat and counts the trainer reads
    num_threads: int | None = None
    teacher: nn.Module | None = None  # an inference copy, for the scoring stage
    teacher_top_k: int | None = None
    delta_ifd: DeltaIFDSettings | None = None
    bos_token_id: int | None = None


class GeneratorHost(Protocol):
    """What the generator loop needs from where it runs: the stages, a stop check, and the policy to sample with."""

    engine: TransformersEngine | RemoteEngine
    scorer: SampleScorer | None
    selector: DeltaIFDFilter | None
    should_stop: Callable[[], bool]  # every call is also a heartbeat

    def policy(self) -> contextlib.AbstractContextManager[tuple[int, int]]:
        """The (version, step) to sample the next batch with, held for as long as the batch is sampled."""


def generator_loop(
    host: GeneratorHost,
    prompts: PromptStream,
    generation_batch_size: int,
    buffer: SampleBuffer,
    progress: GeneratorProgress,
) -> None:
    """The generator loop: take the policy (the host refreshes or locks it), sample a batch with it, hand the batch
    to the buffer; until the host says stop. Every stop check is also a heartbeat: the engine checks at each
    decoding step, the buffer at each poll while it is full."""
    while not host.should_stop():
        with host.policy() as (version, step):
            batch = generate_batch(
                host.engine, prompts, generation_batch_size, version, step, host.scorer, host.selector, progress
            )
        progress.doing(Activity.WAITING_FOR_ROOM)
        if batch is None or not buffer.put(batch, host.should_stop):
            progress.left_unfinished(generation_batch_size)
            break


class _Stopped(Exception):
    """Asked to stop while waiting for the snapshot's lock."""


def serve(
    make_host: Callable[[], GeneratorHost],
    prompts: PromptStream,
    generation_batch_size: int,
    buffer: SampleBuffer,
    errors: Any,
    progress: GeneratorProgress,
) -> None:
    """Set the host up, then run the loop until stopped. Any exception is sent, with its traceback, through
    `errors` for the trainer to raise."""
    try:
        generator_loop(make_host(), prompts, generation_batch_size, buffer, progress)
    except _Stopped:
        pass
    except BaseException:
        errors.put(traceback.format_exc())


class SnapshotHost:
    """A generator with its own copy of the student (and of the teacher, for scoring), loaded from the snapshot
    before each batch when a newer version exists. The snapshot's lock is held only while the weights are copied:
    a batch is sampled by the version loaded before it, while the trainer may already publish the next."""

    def __init__(self, spec: GeneratorSpec, should_stop: Callable[[], bool]) -> None:
        progress = spec.progress
        self.should_stop = should_stop
        self._snapshot, self._progress = spec.snapshot, progress
        self._model = _own_copy(spec.snapshot.model, spec.engine.device, progress)
        self.engine = TransformersEngine(
            self._model, spec.engine, should_stop=should_stop, record_t1=spec.delta_ifd is not None
        )
        teacher = None if spec.teacher is None else _own_copy(spec.teacher, spec.engine.device, progress)
        self.scorer, self.selector = scoring_stage(
            teacher, self._model, spec.teacher_top_k, spec.delta_ifd, spec.bos_token_id, spec.engine
        )
        self._version, self._step = -1, 0

    @contextlib.contextmanager
    def policy(self) -> Iterator[tuple[int, int]]:
        self._progress.doing(Activity.LOADING_WEIGHTS)
        loaded = self._snapshot.load_into(self._model, self._version, waiting=self._wait_for_lock)
        if loaded is not None:
            self._version, self._step = loaded
        yield self._version, self._step

    def _wait_for_lock(self) -> None:
        # a publish holds the lock: healthy, but stop if asked (the trainer may be gone)
        self._progress.doing(Activity.WAITING_FOR_SNAPSHOT_LOCK)
        if self.should_stop():
            raise _Stopped


def run_generator(spec: GeneratorSpec, buffer: SampleBuffer, stop: Any, errors: Any, seed_rng: bool) -> None:
    """A generator process's (or thread's) target: set up a `SnapshotHost` and run the generator loop until `stop`
    is set. Any exception is sent, with its traceback, through `errors` for the trainer to raise."""
    progress = spec.progress
    progress.beat()  # started: the process is up, its models are next

    def make_host() -> SnapshotHost:
        should_stop = stop.is_set
        if seed_rng:  # only in a process of its own: a thread would reseed the trainer's RNG
            torch.manual_seed(spec.seed)
            should_stop = _or_orphaned(stop.is_set)
        if spec.num_threads is not None:
            torch.set_num_threads(spec.num_threads)
        return SnapshotHost(spec, _beating(should_stop, progress))

    serve(make_host, spec.prompts, spec.generation_batch_size, buffer, errors, progress)


def _own_copy(model: nn.Module, device: str, progress: GeneratorProgress) -> nn.Module:
    """The generator's own copy of a shared model, on its device, beating after every layer; copying a large model
    is itself progress to report."""
    copied = copy.deepcopy(model).to(device)
    beat_after_every_layer(copied, progress)
    progress.beat()
    return copied


def beat_after_every_layer(model: nn.Module, progress: GeneratorProgress) -> None:
    """Beat after each block of `model`'s layer stack (its largest `nn.ModuleList`).

    A decoding step beats through the stop check, but one forward can be long by itself: the prefill of a whole
    generation batch, or the teacher scoring it, with a large model on a CPU. Beating after every layer bounds the
    silence by one layer's forward instead of the whole model's, so that `generator_timeout_s` need not cover a
    full forward over a generation batch. Only the generator's own copies get the hooks (a model the trainer also
    runs would beat for the trainer's forwards); a model without a `ModuleList` keeps the per-step beats only.
    """
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        return
    layers = max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: progress.beat())


def _beating(should_stop: Callable[[], bool], progress: GeneratorProgress) -> Callable[[], bool]:
    """`should_stop` that also reports progress each time it is asked."""

    def check() -> bool:
        progress.beat()
        return should_stop()

    return check


def _or_orphaned(stop_is_set: Callable[[], bool]) -> Callable[[], bool]:
    """`stop_is_set`, or the trainer process is gone.

    A trainer killed by a signal (a launcher stopping every rank after one failed, an out-of-memory kill) runs no
    cleanup, so it never sets `stop`; without this check its generator would outlive it.
    """
    parent = mp.parent_process()
    if parent is None:
        return stop_is_set
    return lambda: stop_is_set() or not parent.is_alive()


class RemoteHost:
    """An engine that holds its own weights (vLLM), driven from a thread of the trainer process. Each batch is
    tagged with the version the engine holds (`current_policy()` gives it, with its step). The policy lock is held
    for the whole batch, so a weight sync waits for the batch in flight and no batch mixes two versions."""

    selector = None  # Δ-IFD selection is refused with a remote engine (see the config)

    def __init__(
        self,
        engine: RemoteEngine,
        scorer: SampleScorer | None,
        policy_lock: Any,
        current_policy: Callable[[], tuple[int, int]],
        stop: Any,
        progress: GeneratorProgress,
    ) -> None:
        self.engine, self.scorer = engine, scorer
        self._lock, self._current_policy, self._progress = policy_lock, current_policy, progress
        self.should_stop = _beating(stop.is_set, progress)

    @contextlib.contextmanager
    def policy(self) -> Iterator[tuple[int, int]]:
        self._progress.doing(Activity.WAITING_FOR_SNAPSHOT_LOCK)
        with held_while_alive(self._lock, self._progress.beat):
            yield self._current_policy()
