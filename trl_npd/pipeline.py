"""Lifecycle of the background generator: start it, feed the trainer from it, publish weights, stop it.

Three hosts run the same generator loop (`generator.run_generator` / `generator.generate_batch`):

- `process`: a spawned process. The only host with real overlap on a CPU machine (see docs/design.md): the
  generator gets its own interpreter and its own torch threads, so it neither holds the trainer's GIL nor competes
  for its thread pool.
- `thread`: a thread of the trainer process. Same code, no pickling; generation and Python-heavy training steps
  serialize on the GIL, so it overlaps far less.
- `sync`: no background work. When the trainer needs samples it generates them with its live weights.

A remote engine (vLLM) replaces the snapshot: the engine holds its own copy of the weights and `publish` pushes the
student's into it. Its generator is a thread of the trainer process (`process` runs as `thread`), which mostly waits
on the engine; the policy lock keeps every generation batch sampled by one version.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .buffer import GeneratedBatch, SampleBuffer, TakeResult
from .engine import EngineConfig, RemoteEngine, TransformersEngine
from .generator import (
    GeneratorSpec,
    IFDSettings,
    generate_batch,
    run_generator,
    run_remote_generator,
    scoring_stage,
)
from .prompts import PromptStream
from .scoring import SampleScorer
from .selection import DeltaIFDFilter
from .snapshot import PolicySnapshot, held_while_alive, inference_copy


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned process without re-running the user's `__main__` script in it.

    `spawn` re-imports the parent's main module in the child, which runs an unguarded training script a second
    time (loading its models, recursing into `train`). The generator needs nothing from that script: its target and
    arguments live in importable modules. Hiding the main module's path and spec while the process starts keeps it
    out of the child's preparation data.
    """
    main = sys.modules["__main__"]
    saved = {name: getattr(main, name) for name in ("__file__", "__spec__") if hasattr(main, name)}
    main.__spec__ = None
    if "__file__" in saved:
        del main.__file__
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)


class GeneratorError(RuntimeError):
    """The background generator failed; the message carries its original traceback."""


@dataclass
class StopReport:
    unused: int  # samples the trainer had received but not trained on
    undelivered: int  # samples generated but still on their way
    failure: str | None  # a generator traceback nobody had raised yet


class GenerationPipeline:
    """Owns the generator, its snapshot of the student and the buffer between them.

    Args:
        mode: `"process"`, `"thread"` or `"sync"`.
        student: the trainer's (unwrapped) student. The background modes snapshot it; `sync` generates with it.
        prompts: the prompt stream the generator consumes.
        engine: sampling settings and the generator's device.
        generation_batch_size: prompts per generation batch.
        buffer_size: most samples held between generator and trainer.
        max_staleness: samples older than this many optimizer steps are evicted.
        version, step: the first snapshot's policy version and the optimizer step its weights come from.
        num_threads: torch threads of a generator process.
        seed: seed of the generator process's sampling RNG.
        remote_engine: an engine that holds its own weights (vLLM), instead of a snapshot of `student`.
        teacher, teacher_top_k, ifd, bos_token_id: the scoring and selection stages. With `teacher_top_k` the
            generator stores the teacher's top-k with each sample; with `ifd` it keeps only samples in the Δ-IFD
            band. Both run on the generator's own copy of the teacher.
    """

    def __init__(
        self,
        *,
        mode: str,
        student: nn.Module,
        prompts: PromptStream,
        engine: EngineConfig,
        generation_batch_size: int,
        buffer_size: int,
        max_staleness: int,
        version: int,
        step: int,
        num_threads: int | None,
        seed: int,
        teacher: nn.Module | None = None,
        teacher_top_k: int | None = None,
        ifd: IFDSettings | None = None,
        bos_token_id: int | None = None,
        remote_engine: RemoteEngine | None = None,
    ) -> None:
        if remote_engine is not None and mode == "process":
            mode = "thread"  # the engine's client lives in this process; the thread only waits on it
        self.mode = mode
        self.max_staleness = max_staleness
        self._student = student
        self._prompts = prompts
        self._engine_config = engine
        self._generation_batch_size = generation_batch_size
        self._version, self._step = version, step
        self._worker: mp.process.BaseProcess | threading.Thread | None = None
        self._ctx = mp.get_context("spawn")
        batches = max(1, buffer_size // generation_batch_size)
        if mode == "process":
            transport: Any = self._ctx.Queue(maxsize=batches)
            self._stop: Any = self._ctx.Event()
            self._errors: Any = self._ctx.Queue()
        else:
            transport = queue.Queue(maxsize=batches)
            self._stop = threading.Event()
            self._errors = queue.Queue()
        self.buffer = SampleBuffer(transport, generation_batch_size)
        self._snapshot: PolicySnapshot | None = None
        self._remote = remote_engine
        self._policy_lock = threading.Lock()  # a remote engine's weights change only between generation batches
        self._sync_engine: TransformersEngine | RemoteEngine | None = None
        self._teacher, self._teacher_top_k, self._ifd, self._bos_token_id = teacher, teacher_top_k, ifd, bos_token_id
        self._sync_scorer: SampleScorer | None = None
        self._sync_selector: DeltaIFDFilter | None = None
        if mode != "sync" and remote_engine is None:
            teacher_copy = None
            if teacher is not None and (teacher_top_k is not None or ifd is not None):
                teacher_copy = inference_copy(teacher)
                teacher_copy.share_memory()
            self._snapshot = PolicySnapshot(student, self._ctx, version=version, step=step)
            self._spec = GeneratorSpec(
                snapshot=self._snapshot,
                prompts=prompts,
                engine=engine,
                generation_batch_size=generation_batch_size,
                seed=seed,
                num_threads=num_threads if mode == "process" else None,
                teacher=teacher_copy,
                teacher_top_k=teacher_top_k,
                ifd=ifd,
                bos_token_id=bos_token_id,
            )

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.mode == "sync" or self._remote is not None:
            if self._remote is not None:
                self._sync_engine = self._remote
            else:
                self._sync_engine = TransformersEngine(
                    self._student, self._engine_config, record_t1=self._ifd is not None
                )
            # a remote engine's scorer (teacher top-k) runs on the trainer's teacher, in this process
            self._sync_scorer, self._sync_selector = scoring_stage(
                self._teacher, self._student, self._teacher_top_k, self._ifd, self._bos_token_id, self._engine_config
            )
            if self.mode == "thread":
                args = (
                    self._remote,
                    self._policy_lock,
                    lambda: (self._version, self._step),
                    self._prompts,
                    self._generation_batch_size,
                    self._sync_scorer,
                    self.buffer,
                    self._stop,
                    self._errors,
                )
                self._worker = threading.Thread(
                    target=run_remote_generator, args=args, name="npd-generator", daemon=True
                )
                self._worker.start()
            return
        args = (self._spec, self.buffer, self._stop, self._errors, self.mode == "process")
        if self.mode == "process":
            # daemon: if the trainer process dies without cleanup, the generator dies with it
            self._worker = self._ctx.Process(target=run_generator, args=args, name="npd-generator", daemon=True)
            with _main_module_hidden():
                self._worker.start()
        else:
            self._worker = threading.Thread(target=run_generator, args=args, name="npd-generator", daemon=True)
            self._worker.start()

    def stop(self, timeout_s: float = 30.0) -> StopReport:
        """Stop the generator and release everything; reports what was left and any failure not yet raised."""
        self._stop.set()
        unused, undelivered = 0, 0
        worker, self._worker = self._worker, None
        if worker is not None:
            deadline = time.monotonic() + timeout_s
            # Keep draining while the worker winds down: a process cannot exit while its queue still has data
            # that no one reads.
            while worker.is_alive() and time.monotonic() < deadline:
                held, in_transport = self.buffer.drain()
                unused, undelivered = unused + held, undelivered + in_transport
                worker.join(timeout=0.05)
            if isinstance(worker, mp.process.BaseProcess):
                if worker.is_alive():
                    worker.terminate()
                    worker.join(timeout=5)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        held, in_transport = self.buffer.drain()
        unused, undelivered = unused + held, undelivered + in_transport
        failure = None
        if self.mode != "sync":
            try:
                failure = self._errors.get_nowait()
            except queue.Empty:
                pass
        if self.mode == "process":
            for q in (self.buffer.transport, self._errors):
                q.close()
                q.join_thread()
        return StopReport(unused=unused, undelivered=undelivered, failure=failure)

    # ---- trainer side ---------------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._snapshot.version if self._snapshot is not None else self._version

    @property
    def policy_step(self) -> int:
        """Optimizer step of the weights the generator currently samples with (once it has loaded them)."""
        return self._snapshot.step if self._snapshot is not None else self._step

    def publish(self, student: nn.Module, step: int) -> int:
        """Make `student`'s current weights the generator's policy, tagged with `step`; returns the version."""
        if self._remote is not None:  # after the batch in flight, which its version must have sampled entirely
            with held_while_alive(self._policy_lock, self.check_alive):
                self._remote.sync_weights()
                self._version += 1
                self._step = step
                return self._version
        if self._snapshot is None:  # sync mode generates with the live weights: nothing to copy
            self._version += 1
            self._step = step
            return self._version
        return self._snapshot.publish(student, step, self.check_alive)

    def take(self, n: int, current_step: int) -> TakeResult:
        """`n` samples within the staleness bound, blocking until they exist; raises if the generator failed."""
        refill = (lambda: self._generate_inline(current_step)) if self.mode == "sync" else None
        return self.buffer.take(n, current_step, self.max_staleness, self.check_alive, refill)

    def _generate_inline(self, current_step: int) -> GeneratedBatch:
        # The live weights are those after `current_step` optimizer steps: these samples start at staleness 0. A
        # remote engine samples with the weights of the last sync instead.
        batch = generate_batch(
            self._sync_engine,
            self._prompts,
            self._generation_batch_size,
            self._version,
            current_step if self._remote is None else self._step,
            self._sync_scorer,
            self._sync_selector,
        )
        assert batch is not None  # nothing can stop a synchronous generation midway
        return batch

    def check_alive(self) -> None:
        """Raise `GeneratorError` with the original traceback if the generator has failed or died."""
        if self.mode == "sync":
            return
        try:
            failure = self._errors.get_nowait()
        except queue.Empty:
            failure = None
        if failure is None and self._worker is not None and not self._worker.is_alive():
            try:  # it may have died just after reporting; give the report a moment to arrive
                failure = self._errors.get(timeout=1.0)
            except queue.Empty:
                code = getattr(self._worker, "exitcode", None)
                failure = (
                    f"the generator {self.mode} exited unexpectedly (exit code {code}) without an error report. If "
                    "it died while starting, its traceback is on stderr above; a model or collator defined in the "
                    "__main__ script cannot be sent to a process (move it to a module, or use "
                    "generator_mode='thread')."
                )
        if failure is not None:
            raise GeneratorError(f"The background generator failed, so training cannot go on.\n{failure}")
