"""The generator's life within one `train()`: built by a factory when training begins, fed weights after optimizer
steps, asked for samples, and stopped (with its report) when training ends.

`GenerationSession` is what the trainer talks to. It owns the rank's pipeline (where the rank hosts a generator),
the vLLM connection, the sample log and the completion log, and records every take in the metrics. The policy
version and its step belong to `PolicySync`, which it shares with the trainer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from trl.distributed import DistributedBackend

from .checkpoint import NPDState
from .completion_log import CompletionLog
from .config import NearPolicyDistillConfig
from .metrics import NPDMetrics
from .pipeline import GenerationPipeline, GeneratorError, PipelineSettings
from .policy_sync import PolicySync
from .prompts import PromptStream
from .sample_log import SampleLog, sample_log_path
from .samples import TakeResult

logger = logging.getLogger(__name__)


class GenerationSession:
    """One rank's side of generation. `accelerator` is the trainer's; `metrics` and `policy` are shared with it."""

    def __init__(
        self, args: NearPolicyDistillConfig, accelerator: Any, metrics: NPDMetrics, policy: PolicySync
    ) -> None:
        self.args = args
        self.accelerator = accelerator
        self.metrics = metrics
        self.policy = policy
        self.completion_log = CompletionLog(args.num_completions_to_print) if args.log_completions else None
        self.pipeline: GenerationPipeline | None = None
        self.active = False  # between start() and stop(): the same on every rank
        self.resume = NPDState()  # what a resumed run's checkpoint recorded
        self.next_stream_position = 0  # where this rank's prompt stream resumes after what was taken
        self.vllm: Any = None  # TRL's VLLMGeneration, on every rank, with generation_backend="vllm"
        self._sample_log: SampleLog | None = None

    @property
    def hosts_generator(self) -> bool:
        return not self.args.uses_shared_generator or self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return torch.device(self.args.generator_device or self.args.device)

    @property
    def num_threads(self) -> int | None:
        # Only a generator process has threads of its own. (vLLM's generator is never a process, which the config
        # resolves: it waits on the engine, which sets its own threads when colocated or runs elsewhere.)
        if self.args.generator_mode != "process":
            return None
        if self.device.type == "cpu":
            return self.args.resolved_generator_num_threads()
        return self.args.generator_num_threads or 1

    def share_cpu(self) -> Callable[[], None]:
        """A CPU generator process gets its own cores; the trainer keeps the rest until the returned undo runs."""
        threads = self.num_threads
        if threads is None or self.device.type != "cpu" or self.args.lmbda == 0:
            return lambda: None
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before - threads))
        return lambda: torch.set_num_threads(before)

    # ---- life cycle -------------------------------------------------------------------------------------------------
    def start(self, trainer: Any, step: int) -> None:
        """Called on every rank when training begins at optimizer step `step`, weights restored: connect the engine
        and start the generator where this rank hosts one. Every collective in here (vLLM's set-up, gathering
        ZeRO-3 weights) is entered by every rank. `trainer` gives the models, the tokenizer and the prompts."""
        self.active = True
        self.policy.begin(self.resume.policy_version, step)
        if self.args.generation_backend == "vllm" and self.vllm is None:
            from .vllm_engine import connect_vllm  # imported here only: the core never imports vLLM

            self.vllm = connect_vllm(trainer.model, self.accelerator, trainer.processing_class, self.args)
        if self.vllm is not None:
            self.vllm.sync_weights()  # the server starts from its checkpoint; version 0 is the student as it is now
        # every rank gathers (a collective under ZeRO-3), also one that hosts no generator or already has one
        with self.full_weights([trainer.model, trainer.teacher_model]):  # the snapshots copy them at start
            if not self.hosts_generator or self.pipeline is not None:
                return
            self.pipeline = build_pipeline(self, trainer)
            self.pipeline.start()
        if self.args.log_samples:
            args = self.args
            self._sample_log = SampleLog(sample_log_path(args.output_dir, args.process_index, args.world_size))

    def stop(self, raise_failure: bool) -> None:
        """Stop the generator, count what it leaves unused, and raise (or log) a failure nobody had raised yet."""
        self.active = False
        pipeline, self.pipeline = self.pipeline, None
        sample_log, self._sample_log = self._sample_log, None
        try:
            if pipeline is None:
                return
            report = pipeline.stop()
            if sample_log is not None:  # the generator's drops in the batches the stop drained
                sample_log.record_rejected(report.rejected_in_transport)
        finally:
            if sample_log is not None:
                sample_log.close()
        totals = self.metrics.totals
        totals.unused_at_shutdown += report.unused
        totals.undelivered_at_shutdown += report.undelivered
        totals.unfinished_at_shutdown += report.unfinished
        totals.dropped.update(report.dropped_in_transport or {})
        totals.generated_samples = report.generated
        logger.info(
            "NPD generator stopped: %d samples generated, %d trained on, dropped %s; unused when training ended: %d "
            "received, %d on their way, %d in the generator's hands.",
            totals.generated_samples,
            totals.consumed_samples,
            dict(totals.dropped) or "none",
            report.unused,
            report.undelivered,
            report.unfinished,
        )
        if report.failure is not None:
            if raise_failure:
                raise GeneratorError(f"The background generator failed during training.\n{report.failure}")
            logger.error("The background generator had also failed:\n%s", report.failure)

    # ---- samples and weights ----------------------------------------------------------------------------------------
    def take(self, n: int, step: int) -> TakeResult:
        """`n` samples from this rank's generator, recorded in the metrics, the sample log and the completion log."""
        result = self.pipeline.take(n, step)
        self.metrics.record_take(result, step)
        self.metrics.totals.generated_samples = self.pipeline.generated
        if self._sample_log is not None:
            self._sample_log.record(result, step)
        if self.completion_log is not None:
            self.completion_log.record(result.samples, step)
        for batch in result.received:
            for warning in batch.warnings:
                logger.warning(warning)
        self.next_stream_position = max(self.next_stream_position, *(s.stream_position + 1 for s in result.samples))
        return result

    def publish(self, student: nn.Module, step: int, reason: str) -> None:
        """The student's weights to the generator, on every rank at the same steps; ranks without a generator only
        take part in the collectives."""
        start = time.perf_counter()
        with self.full_weights([student]):
            if self.pipeline is not None:
                self.pipeline.publish(self.accelerator.unwrap_model(student), step)
            elif self.vllm is not None:
                self.vllm.sync_weights()  # gathering sharded weights is a collective
        self.policy.published(step)
        self.metrics.record_sync(time.perf_counter() - start, reason, step)

    def check_alive(self) -> None:
        """A generator failure surfaces at the next optimizer step, even if the buffer never runs dry."""
        if self.pipeline is not None:
            self.pipeline.check_alive()

    def progress(self, step: int) -> dict[str, int] | None:
        """For the progress bar at optimizer step `step`: the snapshot's policy version, the samples waiting in the
        buffer, and how many steps the generator's weights lag behind the trainer's; None without a pipeline."""
        if self.pipeline is None:
            return None
        return {"version": self.pipeline.version, "buffer": len(self.pipeline.buffer), "lag": self.policy.lag(step)}

    @property
    def buffered(self) -> int | None:
        return len(self.pipeline.buffer) if self.pipeline is not None else None

    def checkpoint_state(self) -> NPDState:
        """What a checkpoint records: the version of the weights last published (before training began, the
        resumed checkpoint's own) and every rank's prompt-stream position. Called on every rank (a gather)."""
        positions = [self.next_stream_position]
        if self.args.world_size > 1 and not self.args.uses_shared_generator:
            positions = gather_object(positions)
        version = self.policy.version if self.active else self.resume.policy_version
        return NPDState(policy_version=version, stream_positions=positions)

    @contextlib.contextmanager
    def full_weights(self, models: list[nn.Module]) -> Iterator[None]:
        """Full weights of `models` while the embedded engine copies them.

        DeepSpeed ZeRO-3 shards the weights across ranks; gathering them is a collective that every rank enters, at
        the same steps, whether it hosts a generator or not. A no-op without ZeRO-3, and for vLLM, whose TRL sync
        gathers by itself.
        """
        backend = DistributedBackend(self.accelerator)
        if self.args.generation_backend != "transformers" or not backend.is_zero3:
            yield
            return
        params = [p for m in models for p in self.accelerator.unwrap_model(m).parameters()]
        with backend.gather_params(params):
            yield


def build_pipeline(session: GenerationSession, trainer: Any) -> GenerationPipeline:
    """The rank's pipeline (not started): its prompt stream, its settings, and the engine it samples with."""
    args = session.args
    shared = args.uses_shared_generator
    session.next_stream_position = session.resume.stream_position(
        0 if shared else args.process_index, 1 if shared else args.world_size
    )
    prompts = PromptStream(
        trainer.train_dataset,
        trainer.data_collator,
        seed=args.seed,
        # a shared generator samples for every rank from the whole train set; a per-rank one from its shard
        rank=0 if shared else args.process_index,
        world_size=1 if shared else args.world_size,
        start_position=session.next_stream_position,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    backend = DistributedBackend(session.accelerator)
    settings = PipelineSettings.from_config(
        args,
        tokenizer=trainer.processing_class,
        generation_config=trainer.generation_config,
        device=str(session.device),
        num_threads=session.num_threads,
        # a resumed run snapshots the restored weights: the next version after the checkpoint's
        version=session.policy.version,
        step=session.policy.synced_step,
        weights_sharded=backend.is_zero3 or backend.is_fsdp,
    )
    remote_engine = None
    if session.vllm is not None:
        from .vllm_engine import VLLMEngine

        remote_engine = VLLMEngine(session.vllm, settings.engine)
    unwrap = session.accelerator.unwrap_model
    return GenerationPipeline(
        settings,
        student=unwrap(trainer.model),
        prompts=prompts,
        teacher=unwrap(trainer.teacher_model),
        remote_engine=remote_engine,
    )
