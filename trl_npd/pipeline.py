"""Lifecycle of the background generator: start it, feed the trainer from it, publish weights, stop it.

Three hosts run the same generator code (`generator.generator_loop` / `generator.generate_batch`):

- `process`: a spawned process. The only host with real overlap on a CPU machine (see docs/design.md): the
  generator gets its own interpreter and its own torch threads, so it neither holds the trainer's GIL nor competes
  for its thread pool.
- `thread`: a thread of the trainer process. Same code, no pickling; generation and Python-heavy training steps
  serialize on the GIL, so it overlaps far less.
- `inline`: no background work. When the trainer needs samples it generates them with its live weights.

A generator process takes seconds to start (a fresh interpreter imports torch and transformers, then copies the
models). With `bootstrap`, the trainer does not sit idle meanwhile: until the process hands over its first batch,
the trainer samples its own on-policy batches with its live weights, as `inline` mode does, from a side stream of the
prompts. That time is reported as `bootstrap_s`, apart from waiting.

A remote engine (vLLM) replaces the snapshot: the engine holds its own copy of the weights and `publish` pushes the
student's into it. Its generator is a thread of the trainer process, which mostly waits on the engine (the config
turns a requested `process` into `thread`, with a warning; here `process` is refused); the policy lock keeps every
generation batch sampled by one version.

`start` starts whichever host the mode and the engine call for: a snapshot-fed loop in a process or a thread, a
remote engine's loop in a thread, or none (`inline`); the engine, scorer and selector that sample in this process
(`inline` mode's, the bootstrap's, a remote engine's scorer) are built first where one is needed.

Liveness is not enough: a generator can be alive and stuck (deadlocked, frozen by SIGSTOP). The generator reports
progress (`progress.GeneratorProgress`), and `check_alive`, which the trainer calls wherever it can block on the
generator (waiting on the buffer, waiting for the snapshot lock to publish) and after every optimizer step, raises
once no progress has come for `generator_timeout_s`. A generator process is also watched from a thread of the
trainer, which kills it when it hangs: a process frozen halfway through writing a batch would otherwise leave the
trainer blocked inside the queue's read, where no check runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from .buffer import SampleBuffer
from .config import GENERATOR_MODES
from .engine import EngineConfig, RemoteEngine, TransformersEngine
from .generator import (
    GeneratorSpec,
    RemoteHost,
    generate_batch,
    run_generator,
    scoring_stage,
    serve,
)
from .progress import Activity, GeneratorProgress
from .prompts import PromptStream
from .samples import Drained, GeneratedBatch, Rejected, TakeResult
from .scoring import SampleScorer
from .selection import DeltaIFDFilter, DeltaIFDSettings
from .snapshot import PolicySnapshot, held_while_alive, inference_copy

if TYPE_CHECKING:
    from .config import NearPolicyDistillConfig


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


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


BOOTSTRAP_SEED_OFFSET = 7919  # the bootstrap's side stream of prompts is ordered by the seed plus this


class GeneratorError(RuntimeError):
    """The background generator failed; the message carries its original traceback."""


@dataclass
class StopReport:
    unused: int  # samples the trainer had received but not trained on
    undelivered: int  # samples generated but still on their way
    failure: str | None  # a generator traceback nobody had raised yet
    generated: int = 0  # the generator's own count: prompts it took, each meant to become one sample
    unfinished: int = 0  # of those, prompts of a batch still in the generator's hands when it stopped
    dropped_in_transport: dict[str, int] | None = None  # the generator's drops in batches never delivered
    rejected_in_transport: list[Rejected] = field(default_factory=list)  # each of those drops, for the sample log


@dataclass(frozen=True)
class PipelineSettings:
    """The pipeline's settings: everything but the live objects (models, prompts, a remote engine).

    Args:
        mode: `"process"`, `"thread"` or `"inline"`.
        engine: sampling settings and the generator's device.
        generation_batch_size: prompts per generation batch.
        buffer_size: most samples held between generator and trainer.
        max_staleness: samples older than this many optimizer steps are evicted.
        version, step: the first snapshot's policy version and the optimizer step its weights come from.
        num_threads: torch threads of a generator process.
        seed: seed of the generator process's sampling RNG.
        teacher_top_k, delta_ifd, bos_token_id: the scoring and selection stages. With `teacher_top_k` the
            generator stores the teacher's top-k with each sample; with `delta_ifd` it keeps only samples in the
            Δ-IFD band. Both run on the generator's own copy of the teacher.
        generator_timeout_s: seconds without progress after which the generator counts as hung.
        bootstrap: with a generator process, sample inline with the live student until its first batch arrives.
    """

    mode: str
    engine: EngineConfig
    generation_batch_size: int
    buffer_size: int
    max_staleness: int
    version: int
    step: int
    num_threads: int | None
    seed: int
    teacher_top_k: int | None = None
    delta_ifd: DeltaIFDSettings | None = None
    bos_token_id: int | None = None
    generator_timeout_s: float = 300.0
    bootstrap: bool = False

    @classmethod
    def from_config(
        cls,
        args: NearPolicyDistillConfig,
        *,
        tokenizer: Any,
        generation_config: Any,
        device: str,
        num_threads: int | None,
        version: int,
        step: int,
        weights_sharded: bool,
    ) -> PipelineSettings:
        """The settings of one rank's pipeline, from the config and what only the trainer knows.

        Args:
            tokenizer: gives the pad and BOS tokens, and the EOS token unless `generation_config` sets one.
            device: the generator's device; num_threads: its torch threads (None but for a generator process).
            version, step: the policy version the first snapshot carries and the optimizer step of its weights.
            weights_sharded: the student is sharded (ZeRO-3, FSDP), so that sampling with the live weights is a
                collective one rank cannot do alone: no bootstrap.
        """
        shared = args.uses_shared_generator
        # a shared generator samples for every rank
        generation_batch_size, buffer_size = args.generation_sizes(args.world_size if shared else 1)
        engine = EngineConfig.from_config(args, tokenizer, generation_config, device)
        return cls(
            mode=args.generator_mode,
            engine=engine,
            generation_batch_size=generation_batch_size,
            buffer_size=buffer_size,
            max_staleness=args.max_staleness,
            version=version,
            step=step,
            num_threads=num_threads,
            seed=args.seed + args.process_index,
            teacher_top_k=args.teacher_top_k,
            delta_ifd=DeltaIFDSettings.from_config(args),
            bos_token_id=tokenizer.bos_token_id,
            generator_timeout_s=args.generator_timeout_s,
            bootstrap=args.generator_bootstrap and not weights_sharded,
        )


class GenerationPipeline:
    """Owns the generator, its snapshot of the student and the buffer between them.

    Args:
        settings: the scalar settings (`PipelineSettings.from_config` builds them from the trainer's config).
        student: the trainer's (unwrapped) student. The background modes snapshot it; `inline` generates with it.
        prompts: the prompt stream the generator consumes.
        teacher: the teacher, for the scoring and selection stages (see `PipelineSettings`).
        remote_engine: an engine that holds its own weights (vLLM), instead of a snapshot of `student`.
    """

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        student: nn.Module,
        prompts: PromptStream,
        teacher: nn.Module | None = None,
        remote_engine: RemoteEngine | None = None,
    ) -> None:
        mode = settings.mode
        if mode not in GENERATOR_MODES:
            # the config maps old names; a mode set on it afterwards (or read from an older pickle) arrives unmapped
            raise ValueError(
                f"generator mode {mode!r} is not one of {GENERATOR_MODES}"
                + (" ('sync' was renamed 'inline')." if mode == "sync" else ".")
            )
        if remote_engine is not None and mode == "process":
            # NearPolicyDistillConfig resolves this, with a warning; a requested mode is never changed silently
            raise ValueError(
                "mode='process' cannot drive a remote engine: its client lives in this process, where a thread "
                "waits on it. Use mode='thread'."
            )
        self.settings = settings
        self.mode = mode
        self.max_staleness = settings.max_staleness
        self.generator_timeout_s = settings.generator_timeout_s
        self._student, self._teacher = student, teacher
        self._prompts = prompts
        self._version, self._step = settings.version, settings.step
        self._worker: mp.process.BaseProcess | threading.Thread | None = None
        self._ctx = mp.get_context("spawn")
        self.progress = GeneratorProgress(self._ctx)
        self._hang: str | None = None  # the hang report, once the generator has stopped making progress
        self._hang_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        batches = max(1, settings.buffer_size // settings.generation_batch_size)
        if mode == "process":
            transport: Any = self._ctx.Queue(maxsize=batches)
            self._stop: Any = self._ctx.Event()
            self._errors: Any = self._ctx.Queue()
        else:
            transport = queue.Queue(maxsize=batches)
            self._stop = threading.Event()
            self._errors = queue.Queue()
        self.buffer = SampleBuffer(transport, settings.generation_batch_size)
        self._snapshot: PolicySnapshot | None = None
        self._remote = remote_engine
        self._policy_lock = threading.Lock()  # a remote engine's weights change only between generation batches
        # the stages that run in this process, on the trainer's own models (see `_build_inline_stage`)
        self._inline_engine: TransformersEngine | RemoteEngine | None = None
        self._inline_scorer: SampleScorer | None = None
        self._inline_selector: DeltaIFDFilter | None = None
        self._bootstrapping = settings.bootstrap and mode == "process" and remote_engine is None
        self._bootstrap_prompts = (
            prompts.side_stream(settings.seed + BOOTSTRAP_SEED_OFFSET) if self._bootstrapping else None
        )
        self._bootstrap_progress = GeneratorProgress(self._ctx)  # counts the trainer's own samples
        if mode != "inline" and remote_engine is None:
            self._snapshot = PolicySnapshot(student, self._ctx, version=settings.version, step=settings.step)
            self._spec = self._generator_spec()

    def _generator_spec(self) -> GeneratorSpec:
        """What a background generator fed by the snapshot receives (pickled, for a process)."""
        settings = self.settings
        teacher_copy = None
        if self._teacher is not None and (settings.teacher_top_k is not None or settings.delta_ifd is not None):
            teacher_copy = inference_copy(self._teacher)
            teacher_copy.share_memory()
        return GeneratorSpec(
            snapshot=self._snapshot,
            prompts=self._prompts,
            engine=settings.engine,
            generation_batch_size=settings.generation_batch_size,
            seed=settings.seed,
            progress=self.progress,
            num_threads=settings.num_threads if self.mode == "process" else None,
            teacher=teacher_copy,
            teacher_top_k=settings.teacher_top_k,
            delta_ifd=settings.delta_ifd,
            bos_token_id=settings.bos_token_id,
        )

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        # The generator's start-up is timed from here: the copies made in __init__ (the snapshot, the teacher's
        # shared copy) are the trainer's work, and a large model's would otherwise count against its silence.
        self.progress.beat()
        if self.mode == "inline" or self._remote is not None or self._bootstrapping:
            self._build_inline_stage()
        if self.mode == "inline":
            return
        if self._remote is not None:
            self._start_remote_thread()
        elif self.mode == "process":
            self._start_snapshot_process()
        else:
            self._start_snapshot_thread()

    def _build_inline_stage(self) -> None:
        """The engine, scorer and selector that run in this process: inline mode's, the bootstrap's, and a remote
        engine's (whose scorer, for teacher top-k, runs on the trainer's teacher here)."""
        settings = self.settings
        # Sampling and scoring in this process use the trainer's own models, on the trainer's device, whatever
        # `generator_device` the background generator's copies go to.
        inline_config = replace(settings.engine, device=str(next(self._student.parameters()).device))
        if self._remote is not None:
            self._inline_engine = self._remote
        else:
            self._inline_engine = TransformersEngine(
                self._student, inline_config, record_t1=settings.delta_ifd is not None
            )
        self._inline_scorer, self._inline_selector = scoring_stage(
            self._teacher,
            self._student,
            settings.teacher_top_k,
            settings.delta_ifd,
            settings.bos_token_id,
            inline_config,
        )

    def _start_remote_thread(self) -> None:
        """The generator loop on a remote engine, in a thread of this process, which mostly waits on the engine."""
        host = RemoteHost(
            self._remote,
            self._inline_scorer,
            self._policy_lock,
            lambda: (self._version, self._step),
            self._stop,
            self.progress,
        )
        args = (
            lambda: host,
            self._prompts,
            self.settings.generation_batch_size,
            self.buffer,
            self._errors,
            self.progress,
        )
        self._worker = threading.Thread(target=serve, args=args, name="npd-generator", daemon=True)
        self._worker.start()

    def _start_snapshot_process(self) -> None:
        """The generator loop on a snapshot, in a spawned process, watched from a thread of this one."""
        args = (self._spec, self.buffer, self._stop, self._errors, True)
        # daemon: if the trainer process dies without cleanup, the generator dies with it
        process = self._ctx.Process(target=run_generator, args=args, name="npd-generator", daemon=True)
        with _main_module_hidden():
            process.start()  # pickles the spec: if that fails, there is no process for stop() to end
        self._worker = process
        # The queues' write ends now live in the generator. Closing this process's copies lets a read see the
        # end of the pipe if the generator is killed halfway through writing a batch, instead of blocking for
        # the rest of it forever (mp.Queue keeps both ends in the process that created it).
        for q in (self.buffer.transport, self._errors):
            q._writer.close()
        self._watchdog = threading.Thread(target=self._watch, name="npd-generator-watchdog", daemon=True)
        self._watchdog.start()

    def _start_snapshot_thread(self) -> None:
        """The generator loop on a snapshot, in a thread of this process (no reseeding: the RNG is the trainer's)."""
        args = (self._spec, self.buffer, self._stop, self._errors, False)
        self._worker = threading.Thread(target=run_generator, args=args, name="npd-generator", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float = 30.0) -> StopReport:
        """Stop the generator and release everything; reports what was left and any failure not yet raised.

        In order: signal the stop, end the watchdog, end the worker (draining the buffer while it winds down), then
        collect what is left and any failure, and close the queues. A generator process, the watchdog and the reaper
        timer are all ended and joined; only a hung generator thread, which nothing can stop, is left as a daemon.
        """
        self._stop.set()
        self._stop_watchdog()
        drained = Drained()
        worker = self._worker
        terminated_while_starting = False
        if worker is not None:
            terminated_while_starting = self._end_worker(worker, timeout_s, drained)
        self._worker = None
        drained.add(self.buffer.drain())

        unused, undelivered = drained.held, drained.in_transport
        failure = None if self.mode == "inline" else self._reported_failure()
        if self.mode == "process":
            for q in (self.buffer.transport, self._errors):
                q.close()
                q.join_thread()
        return StopReport(
            unused=unused,
            undelivered=undelivered,
            failure=failure,
            generated=self.generated,
            # a process ended while starting delivers nothing, so whatever it had taken is unfinished
            unfinished=self.progress.unfinished + (self.progress.taken if terminated_while_starting else 0),
            dropped_in_transport=dict(drained.dropped_in_transport),
            rejected_in_transport=drained.rejected_in_transport,
        )

    def _stop_watchdog(self) -> None:
        # Ended (and joined, leaving no thread behind) before the worker is: until then it may still kill a hung
        # process, and its verdict (`_hang`) decides how stop() ends the worker.
        if self._watchdog is not None:
            self._watchdog_stop.set()
            self._watchdog.join()
            self._watchdog = None

    def _end_worker(
        self, worker: mp.process.BaseProcess | threading.Thread, timeout_s: float, drained: Drained
    ) -> bool:
        """End and reap the worker, draining the buffer into `drained` meanwhile; returns whether it was a process
        ended while still starting."""
        process = isinstance(worker, mp.process.BaseProcess)
        # A process frozen halfway through writing a batch would block a drain below for ever: past the deadline,
        # kill it, which ends the blocked read (this process holds no copy of the write end).
        reaper = self._start_reaper(worker, timeout_s) if process else None
        terminated_while_starting = process and self.progress.activity == Activity.STARTING
        if terminated_while_starting:
            # Still importing or copying its models: it has made nothing and would only see the stop once started,
            # seconds from now (a train() shorter than the start-up, served by the bootstrap). End it now.
            worker.terminate()
        try:
            self._drain_while_winding_down(worker, timeout_s, drained)
        finally:
            # the only reads that can block are over; from here on the worker is ended and reaped here
            if reaper is not None:
                reaper.cancel()
                reaper.join()  # leave no thread behind
        if process:
            self._reap_process(worker)
        return terminated_while_starting

    @staticmethod
    def _start_reaper(worker: mp.process.BaseProcess, timeout_s: float) -> threading.Timer:
        """A daemon timer that kills `worker` (SIGKILL) `timeout_s + 5` seconds from now, unless cancelled."""
        reaper = threading.Timer(timeout_s + 5.0, _signal, args=(worker.pid, signal.SIGKILL))
        reaper.daemon = True
        reaper.start()
        return reaper

    def _drain_while_winding_down(
        self, worker: mp.process.BaseProcess | threading.Thread, timeout_s: float, drained: Drained
    ) -> None:
        # A hung generator will not wind down by itself: a process was killed already, a thread cannot be.
        deadline = time.monotonic() + (0.0 if self._hang is not None else timeout_s)
        # Keep draining while the worker winds down: a process cannot exit while its queue still has data that no
        # one reads.
        while worker.is_alive() and time.monotonic() < deadline:
            drained.add(self.buffer.drain())
            worker.join(timeout=0.05)

    def _reap_process(self, worker: mp.process.BaseProcess) -> None:
        """End a generator process that outlived the deadline, and reap it."""
        if worker.is_alive() and self._hang is None:
            worker.terminate()
            _signal(worker.pid, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
            worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()  # SIGKILL ends a process even while it is stopped
            worker.join()

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
        if self._snapshot is None:  # inline mode generates with the live weights: nothing to copy
            self._version += 1
            self._step = step
            return self._version
        return self._snapshot.publish(student, step, self.check_alive)

    @property
    def generated(self) -> int:
        """Prompts taken to become samples: by the generator, and by the trainer while bootstrapping."""
        return self.progress.taken + self._bootstrap_progress.taken

    def take(self, n: int, current_step: int) -> TakeResult:
        """`n` samples within the staleness bound, blocking until they exist; raises if the generator failed."""
        refill = (lambda: self._generate_inline(current_step)) if self.mode == "inline" else None
        bootstrap = None
        if self._bootstrapping:
            bootstrap = lambda: self._generate_inline(current_step, bootstrap=True)  # noqa: E731
        result = self.buffer.take(n, current_step, self.max_staleness, self.check_alive, refill, bootstrap)
        if self._bootstrapping and any(not batch.bootstrap for batch in result.received):
            self._bootstrapping = False  # the generator process is up: from now on it alone samples
        return result

    def _generate_inline(self, current_step: int, bootstrap: bool = False) -> GeneratedBatch:
        # The live weights are those after `current_step` optimizer steps: these samples start at staleness 0. A
        # remote engine samples with the weights of the last sync instead. They carry the version of the last
        # publish, as inline mode's do.
        batch = generate_batch(
            self._inline_engine,
            self._bootstrap_prompts if bootstrap else self._prompts,
            self.settings.generation_batch_size,
            self.version,
            current_step if self._remote is None else self._step,
            self._inline_scorer,
            self._inline_selector,
            self._bootstrap_progress if bootstrap else self.progress,
        )
        assert batch is not None  # nothing can stop an inline generation midway
        batch.bootstrap = bootstrap
        return batch

    def check_alive(self) -> None:
        """Raise `GeneratorError` with the original traceback if the generator has failed or died, or with what it
        was doing if it has made no progress for `generator_timeout_s`."""
        if self.mode == "inline":
            return
        failure = self._reported_failure() or self._hang  # the watchdog's verdict, once it has killed a hung process
        if failure is None and self._worker is not None and not self._worker.is_alive():
            # it may have died just after reporting; give the report a moment to arrive
            failure = self._reported_failure(timeout_s=1.0)
            if failure is None:
                code = getattr(self._worker, "exitcode", None)
                failure = (
                    f"the generator {self.mode} exited unexpectedly (exit code {code}) without an error report. If "
                    "it died while starting, its traceback is on stderr above; a model or collator defined in the "
                    "__main__ script cannot be sent to a process (move it to a module, or use "
                    "generator_mode='thread')."
                )
        if failure is None:
            failure = self._hang_report()
        if failure is not None:
            raise GeneratorError(f"The background generator failed, so training cannot go on.\n{failure}")

    def _reported_failure(self, timeout_s: float | None = None) -> str | None:
        """A traceback the generator sent, if any. EOF: a generator process that ended without sending one."""
        try:
            return self._errors.get(timeout=timeout_s) if timeout_s else self._errors.get_nowait()
        except (queue.Empty, EOFError, OSError):
            return None

    def _hang_report(self) -> str | None:
        """Why the generator counts as hung, once it has shown no progress for `generator_timeout_s`; a generator
        process is then killed. None while it progresses, and for a generator that is dead (a death, not a hang)."""
        worker = self._worker
        if worker is None:
            return None
        with self._hang_lock:
            if self._hang is None:
                silent_s = self.progress.silent_s()
                if silent_s <= self.generator_timeout_s or not worker.is_alive():
                    return None
                process = isinstance(worker, mp.process.BaseProcess)
                name = f"process {worker.name!r} (pid {worker.pid})" if process else f"thread {worker.name!r}"
                self._hang = (
                    f"The generator {name} has made no progress for {silent_s:.1f} s, more than "
                    f"generator_timeout_s={self.generator_timeout_s:g}. Its last activity: "
                    f"{self.progress.describe()}. "
                    "A generator without progress is deadlocked, stuck in a device call, or frozen (e.g. by "
                    "SIGSTOP). "
                    + (
                        "It has been killed (SIGKILL). "
                        if process
                        else "A thread cannot be stopped from outside; it is left behind as a daemon thread. "
                    )
                    + (
                        "With vLLM the generator shows progress once per generation batch: if one batch "
                        "legitimately takes this long (long completions, a large model), raise generator_timeout_s."
                        if self._remote is not None
                        else "If its work is legitimately this slow (a large model on a slow device), raise "
                        "generator_timeout_s."
                    )
                )
                if process:
                    worker.kill()  # SIGKILL: a stopped process ignores SIGTERM until it is continued
            return self._hang

    def _watch(self) -> None:
        """Thread of the trainer process that kills a generator process once it hangs (see the module docstring)."""
        poll_s = min(1.0, max(0.05, self.generator_timeout_s / 10))
        while not self._watchdog_stop.wait(poll_s):
            if self._hang_report() is not None:
                return
