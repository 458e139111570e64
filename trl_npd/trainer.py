"""`NearPolicyDistillTrainer`: TRL's `GKDTrainer` with near-policy generation. Wiring only.

The flow of one optimizer step, top to bottom:

1. `get_batch_samples` pulls the step's micro-batches from the dataloader. Each is replaced, with probability
   `lmbda`, by samples from the buffer (`_on_policy_batch`), or by teacher generations when `seq_kd`. The loss
   normalizer is the number of completion tokens these batches actually train on.
2. `compute_loss` runs the student and the teacher and takes the generalized JSD (losses module), and records the
   drift between the behaviour policy and the current student.
3. After the optimizer step, `_after_optimizer_step` publishes the weights to the generator every
   `weight_sync_steps` steps, or at once when the drift exceeds `max_policy_kl`.

The generator starts when training begins (after checkpoint weights are restored) and stops when `train` returns
or raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from datasets import IterableDataset
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl.distributed import DistributedBackend
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from .batching import (
    Sequence,
    count_trained_tokens,
    keep_last_tokens,
    pad_sequences,
    sequences_from_padded,
    sequences_from_samples,
)
from .completion_log import CompletionLog
from .config import NearPolicyDistillConfig
from .divergences import k3_policy_kl
from .guards import (
    check_context_fits,
    check_output_dir_writable,
    check_teacher_tokenizer,
    checkpoint_failed_message,
    fit_max_length_to_positions,
    last_complete_checkpoint,
)
from .heads import chunked_logits_error, chunked_logits_tolerance, logit_transform
from .losses import distillation_loss
from .metrics import NPDMetrics, aggregate_across_ranks
from .model_card import append_npd_section
from .nonfinite import NonFiniteLossError, find_nonfinite_samples, nonfinite_loss_message
from .packing import attends_per_sample, pack_sequences, packing_leaks, row_token_budget
from .pipeline import GenerationPipeline, GeneratorError, PipelineSettings
from .prompts import PromptOnlyCollator, PromptStream
from .sample_log import SampleLog, sample_log_path
from .samples import Sample, TakeResult

logger = logging.getLogger(__name__)

NPD_STATE_NAME = "npd_state.json"


class NearPolicyDistillTrainer(GKDTrainer):
    """Near-Policy Distillation: GKD whose student samples come from a background generator.

    Takes exactly `GKDTrainer`'s arguments; `args` must be a [`NearPolicyDistillConfig`]. See `docs/index.md`.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "gkd", "trl-npd", "distillation"]
    _name = "NPD"

    def __init__(
        self,
        model: Any = None,
        teacher_model: Any = None,
        args: NearPolicyDistillConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
    ) -> None:
        if not isinstance(args, NearPolicyDistillConfig):
            raise TypeError(
                f"args must be a NearPolicyDistillConfig (a drop-in for GKDConfig), got {type(args).__name__}. "
                "Import it with `from trl_npd import NearPolicyDistillConfig as GKDConfig`."
            )
        _check_train_dataset(train_dataset)
        own_collator = data_collator is None  # made below from args.max_length (ours or GKD's)
        check_output_dir_writable(args)  # before transformers makes the folder, with a plainer error
        if processing_class is not None and getattr(processing_class, "pad_token_id", 0) is None:
            raise ValueError(
                "The tokenizer has no pad token, which batching needs. Set one before building the trainer, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`."
            )
        if data_collator is None and _is_prompt_only(train_dataset):
            if args.lmbda < 1.0:
                raise ValueError(
                    f"The train dataset has prompts but no completions ('messages'), so the off-policy fraction "
                    f"1 - lmbda = {1 - args.lmbda:g} has nothing to train on. Set lmbda=1.0 for pure on-policy "
                    "distillation, or provide 'messages' with completions."
                )
            if eval_dataset is not None:
                raise ValueError("Evaluation needs completions: give the eval dataset a 'messages' column.")
            data_collator = PromptOnlyCollator(processing_class, args.max_length)

        # SFTTrainer's padding-free mode needs its own collator, which GKD's batches cannot use; packing is our stage.
        padding_free, args.padding_free = args.padding_free, False
        notice_filter = _silence_gkd_migration_notice()  # a user who chose NPD is not told to migrate elsewhere
        try:
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        finally:
            args.padding_free = padding_free
            notice_filter.remove()
        _check_tokenizer_fits(self.processing_class, self.model, self.teacher_model)
        if self.lmbda > 0 or self.seq_kd:  # the models generate max_new_tokens after a prompt
            check_context_fits(args.max_new_tokens, self.model, self.accelerator.unwrap_model(self.teacher_model))
        if isinstance(teacher_model, str):  # loaded by name: its own tokenizer can be compared with the student's
            check_teacher_tokenizer(teacher_model, self.processing_class, args.teacher_model_init_kwargs or {})
        self._check_sharding_support()
        if self.lmbda > 0 and _is_quantized(self.model):
            raise ValueError(
                "The student is quantized (bitsandbytes or another quantizer). The generator samples from a plain "
                "copy of the student's weights, which cannot be made from quantized ones yet. Load the student "
                "unquantized (LoRA on an unquantized base works), or use lmbda=0."
            )
        # Everything the generator would otherwise find out mid-run is refused (or set right) here.
        self._check_topk_fits_vocabulary()
        self._fit_max_length_to_positions(own_collator)
        self._train_without_router_logits()
        self._check_chunked_projections()
        self._pack = args.padding_free and not self._packing_leaks()
        # resolved once, here, and passed to every loss call: the device does not change during training
        self._compile_fused_loss = args.resolved_fused_loss_compile()
        self._per_sample_attention = all(
            attends_per_sample(m) for m in (self.model, self.accelerator.unwrap_model(self.teacher_model))
        )
        # compute_loss divides by the tokens trained on across the whole accumulation group
        self.loss_is_scaled_for_ga = True
        self.npd_metrics = NPDMetrics()
        self._completion_log = CompletionLog(args.num_completions_to_print) if args.log_completions else None
        self._sample_log: SampleLog | None = None
        self._pipeline: GenerationPipeline | None = None
        self._vllm: Any = None  # TRL's VLLMGeneration, on every rank, with generation_backend="vllm"
        # Known on every rank, also those that host no generator (shared_generator): the policy version and the
        # optimizer step of the weights last published, which every rank publishes at the same steps.
        self._generating = False
        self._policy_version = -1
        self._synced_step = 0
        self._resume_state: dict[str, Any] = {}
        self._warned: set[str] = set()  # input warnings already given in this train() call
        # this optimizer step's micro-batches as built (sequences, and samples when generated), and how many have
        # reached compute_loss: only read to name the culprits of a non-finite loss
        self._step_micro_batches: list[tuple[list[Sequence], list[Sample] | None]] = []
        self._micro_batches_done = 0
        self._next_stream_position = 0
        self._step_kl_sum = torch.zeros((), dtype=torch.float64)
        self._step_kl_tokens = 0
        self._forward_redirection = _ForwardRedirection()
        self.add_callback(_PipelineHooks(self))

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        if resume_from_checkpoint is True:  # the last checkpoint saved to the end, not one a killed run left half
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        self._resume_state = self._load_npd_state(resume_from_checkpoint)
        self.npd_metrics = NPDMetrics()
        self._warned = set()
        restore_threads = self._share_cpu_with_generator()
        try:
            output = super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        except BaseException:  # KeyboardInterrupt included: nothing of the pipeline outlives train()
            self._stop_pipeline(raise_failure=False)
            raise
        finally:
            restore_threads()
        self._stop_pipeline(raise_failure=True)  # a generator that failed late must not go unreported
        return output

    def _start_generation(self) -> None:
        """Called on every rank when training begins (weights restored): connect the engine and start the generator
        where this rank hosts one. Every collective in here (vLLM's set-up, gathering ZeRO-3 weights) is entered by
        every rank."""
        self._generating = True
        self._policy_version = self._resume_state.get("policy_version", -1) + 1
        self._synced_step = self.state.global_step
        if self.args.generation_backend == "vllm" and self._vllm is None:
            from .vllm_engine import connect_vllm  # imported here only: the core never imports vLLM

            self._vllm = connect_vllm(self.model, self.accelerator, self.processing_class, self.args)
        if self._vllm is not None:
            self._vllm.sync_weights()  # the server starts from its checkpoint; version 0 is the student as it is now
        with self._full_weights(with_teacher=True):
            self._ensure_pipeline()

    def _hosts_generator(self) -> bool:
        return not self.args.uses_shared_generator or self.accelerator.is_main_process

    @contextlib.contextmanager
    def _full_weights(self, with_teacher: bool = False) -> Iterator[None]:
        """Full weights of the student (and the teacher, for the generator's first copy of it) while the embedded
        engine copies them.

        DeepSpeed ZeRO-3 shards the weights across ranks; gathering them is a collective that every rank enters, at
        the same steps, whether it hosts a generator or not. A no-op without ZeRO-3, and for vLLM, whose TRL sync
        gathers by itself.
        """
        backend = DistributedBackend(self.accelerator)
        if self.args.generation_backend != "transformers" or not backend.is_zero3:
            yield
            return
        models = [self.model, self.teacher_model] if with_teacher else [self.model]
        params = [p for m in models for p in self.accelerator.unwrap_model(m).parameters()]
        with backend.gather_params(params):
            yield

    def _check_sharding_support(self) -> None:
        """Refuse, before training, the sharded set-ups whose generation would hang or copy empty weights."""
        backend = DistributedBackend(self.accelerator)
        if not (backend.is_zero3 or backend.is_fsdp) or self.lmbda == 0:
            return
        args = self.args
        if backend.is_fsdp and args.generation_backend == "transformers":
            raise NotImplementedError(
                "FSDP with the embedded generator is not supported: its snapshot copies the student's modules, which "
                "FSDP wraps and shards. Use DeepSpeed ZeRO-3, or generation_backend='vllm' (TRL's weight sync "
                "gathers FSDP weights)."
            )
        if args.generator_mode == "inline" and args.generation_backend == "transformers":
            raise ValueError(
                "generator_mode='inline' samples with the live student, and under ZeRO-3 every forward is a "
                "collective that ranks stopping at different lengths cannot line up. Use generator_mode='process' or "
                "'thread'."
            )
        if args.generation_backend == "vllm" and args.teacher_top_k is not None:
            raise ValueError(
                "With vLLM, the teacher's top-k is scored by the trainer's own teacher in the generation thread, and "
                "a sharded teacher's forwards are collectives that thread cannot take part in. Use "
                "teacher_top_k=None under ZeRO-3/FSDP."
            )

    def _check_topk_fits_vocabulary(self) -> None:
        k = self.args.teacher_top_k
        vocab = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings().weight.shape[0]
        if k is not None and k > vocab:
            raise ValueError(
                f"teacher_top_k={k} is larger than the teacher's vocabulary ({vocab} tokens). Use teacher_top_k <= "
                f"{vocab} (the NPD paper uses 10), or None for the full-vocabulary JSD."
            )

    def _fit_max_length_to_positions(self, own_collator: bool) -> None:
        """Lower `max_length` to a learned position table's size (see `guards.fit_max_length_to_positions`) where
        the trainer reads it: `args` (prompt truncation for the generator, packing, vLLM's context, the cut of
        off-policy rows) and the collator made for it (a collator the caller passed keeps its own settings, and
        `_within_max_length` cuts what it hands over)."""
        models = {"student": self.model, "teacher": self.accelerator.unwrap_model(self.teacher_model)}
        fitted = fit_max_length_to_positions(self.args.max_length, models)
        if fitted == self.args.max_length:
            return
        self.args.max_length = fitted
        if own_collator and hasattr(self.data_collator, "max_length"):
            # lowered, never raised: GKD's collator may have chosen a shorter limit of its own
            self.data_collator.max_length = min(self.data_collator.max_length or fitted, fitted)

    def _train_without_router_logits(self) -> None:
        """MoE students: the distillation objective has no router load-balancing term (GKD's has none either), so
        the router logits SFTTrainer switches on are never used. They are switched off, which also keeps them out
        of the generator's `generate`, where transformers' load-balancing loss fails on cached steps."""
        text_config = self.model.config.get_text_config()
        if not getattr(text_config, "output_router_logits", False):
            return
        if self.args.router_aux_loss_coef:
            raise ValueError(
                f"router_aux_loss_coef={self.args.router_aux_loss_coef}: NPD's objective, like GKD's, is the "
                "distillation divergence only and has no router load-balancing term to weight. Leave "
                "router_aux_loss_coef unset (or 0.0)."
            )
        text_config.output_router_logits = False
        self.aux_loss_enabled = False
        logger.info("The student is a Mixture-of-Experts model: its router logits are not part of the NPD objective.")

    def _check_chunked_projections(self) -> None:
        """Refuse, before training, a model whose logits the chunked LM-head projections would not reproduce.

        The fused loss, the top-k objective and the scoring stage project hidden states through the LM head
        themselves, applying the model's logit transform (soft-cap, scale). A probe checks, on each model those paths
        use, that this equals the model's own forward; the settings that use it are named, with the fix.
        """
        args = self.args
        generating = self.lmbda > 0  # the generator and its scoring stage run only with on-policy sampling
        users = {
            "student": {"use_fused_loss=True": args.use_fused_loss, "ifd_filter=True": args.ifd_filter and generating},
            "teacher": {
                "use_fused_loss=True": args.use_fused_loss,
                f"teacher_top_k={args.teacher_top_k}": args.teacher_top_k is not None,
                "ifd_filter=True": args.ifd_filter and generating,
            },
        }
        vocab = len(self.processing_class)
        for role, model in (("student", self.model), ("teacher", self.accelerator.unwrap_model(self.teacher_model))):
            settings = [name for name, used in users[role].items() if used]
            if not settings:
                continue
            try:
                error = chunked_logits_error(model, min(vocab, model.get_input_embeddings().num_embeddings))
            except ValueError as reason:  # a head the projections cannot read (a PEFT adapter on lm_head)
                raise ValueError(f"The {role} cannot run {', '.join(settings)}: {reason}") from None
            if error > chunked_logits_tolerance(model):
                raise ValueError(
                    f"The {role} ({type(model).__name__}) cannot run {', '.join(settings)}: these project its hidden "
                    f"states through its LM head chunk by chunk, with the logit transform its config names "
                    f"({logit_transform(model)}), and the result differs from the logits of its own forward by "
                    f"{error:.1%} of the largest logit. The model does something else between its backbone and its "
                    "logits. Set use_fused_loss=False, teacher_top_k=None and ifd_filter=False to train it on the "
                    "plain path, which uses the model's own logits."
                )

    def _ensure_pipeline(self) -> GenerationPipeline | None:
        if self._pipeline is not None or not self._hosts_generator():
            return self._pipeline
        args = self.args
        shared = args.uses_shared_generator
        backend = DistributedBackend(self.accelerator)
        self._next_stream_position = self._resume_stream_position()
        prompts = PromptStream(
            self.train_dataset,
            self.data_collator,
            seed=args.seed,
            # a shared generator samples for every rank from the whole train set; a per-rank one from its shard
            rank=0 if shared else args.process_index,
            world_size=1 if shared else args.world_size,
            start_position=self._next_stream_position,
            max_prompt_tokens=args.max_prompt_tokens,
        )
        settings = PipelineSettings.from_config(
            args,
            tokenizer=self.processing_class,
            generation_config=self.generation_config,
            device=str(self._generator_device()),
            num_threads=self._generator_threads(),
            # a resumed run snapshots the restored weights: the next version after the checkpoint's
            version=self._policy_version,
            step=self._synced_step,
            weights_sharded=backend.is_zero3 or backend.is_fsdp,
        )
        remote_engine = None
        if self._vllm is not None:
            from .vllm_engine import VLLMEngine

            remote_engine = VLLMEngine(self._vllm, settings.engine)
        self._pipeline = GenerationPipeline(
            settings,
            student=self.accelerator.unwrap_model(self.model),
            prompts=prompts,
            teacher=self.accelerator.unwrap_model(self.teacher_model),
            remote_engine=remote_engine,
        )
        self._pipeline.start()
        if args.log_samples:
            self._sample_log = SampleLog(sample_log_path(args.output_dir, args.process_index, args.world_size))
        return self._pipeline

    def _packing_leaks(self) -> bool:
        """Probe both models once: packing is only used if it keeps samples apart in each of them."""
        vocab = len(self.processing_class)
        for role, model in (("student", self.model), ("teacher", self.accelerator.unwrap_model(self.teacher_model))):
            if packing_leaks(model, vocab):
                logger.warning(
                    "The %s (%s) lets packed samples attend to each other: it ignores position_ids when it builds "
                    "its attention mask (ALiBi models do). Training batches are padded instead of packed.",
                    role,
                    type(model).__name__,
                )
                return True
        return False

    def _resume_stream_position(self) -> int:
        """Where this rank's prompt stream resumes: its own position as the checkpoint recorded it."""
        state = self._resume_state
        if "stream_positions" not in state:
            return state.get("stream_position", 0)  # older checkpoints kept a single position
        positions = state["stream_positions"]
        streams = 1 if self.args.uses_shared_generator else self.args.world_size
        if len(positions) != streams:
            logger.warning(
                "The checkpoint has %d prompt streams and this run %d (another number of processes, or "
                "shared_generator changed): the prompt streams restart from the beginning.",
                len(positions),
                streams,
            )
            return 0
        return positions[0 if self.args.uses_shared_generator else self.args.process_index]

    def _stop_pipeline(self, raise_failure: bool) -> None:
        self._generating = False
        pipeline, self._pipeline = self._pipeline, None
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
        totals = self.npd_metrics.totals
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

    def _generator_threads(self) -> int | None:
        # Only a generator process has threads of its own. (vLLM's generator is never a process, which the config
        # resolves: it waits on the engine, which sets its own threads when colocated or runs elsewhere.)
        if self.args.generator_mode != "process":
            return None
        if self._generator_device().type == "cpu":
            return self.args.resolved_generator_num_threads()
        return self.args.generator_num_threads or 1

    def _generator_device(self) -> torch.device:
        return torch.device(self.args.generator_device or self.args.device)

    def _share_cpu_with_generator(self) -> Callable[[], None]:
        """A CPU generator process gets its own cores; the trainer keeps the rest while `train` runs."""
        threads = self._generator_threads()
        if threads is None or self._generator_device().type != "cpu" or self.lmbda == 0:
            return lambda: None
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before - threads))
        return lambda: torch.set_num_threads(before)

    # ---- data -----------------------------------------------------------------------------------------------------
    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        batches = []
        self._step_micro_batches, self._micro_batches_done = [], 0
        for micro_batch in range(num_batches):
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                break
            batches.append(self._choose_batch(batch, micro_batch))
        if not batches:
            return batches, None
        # Normalize by what is trained on, counted after generation (GKD counts the dataset's labels instead).
        num_items = count_trained_tokens(batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batches, num_items

    def _is_on_policy(self, micro_batch: int) -> bool:
        """With probability `lmbda`. Drawn from the seed, the step and the micro-batch's index rather than the global
        RNG, so that every rank draws alike (their collectives must line up, whatever else consumed `random` on one
        rank) and a resumed run draws what the original run would have."""
        if self.lmbda <= 0:
            return False
        return random.Random(f"{self.args.seed}:{self.state.global_step}:{micro_batch}").random() < self.lmbda

    def _choose_batch(self, batch: dict[str, Any], micro_batch: int = 0) -> dict[str, Any]:
        if self._is_on_policy(micro_batch):
            return self._on_policy_batch()
        if self.seq_kd:
            if (keep := self.args.max_prompt_tokens) is not None:
                # The teacher's prompts get room for max_new_tokens within max_length, cut from the left, as the
                # generator's do (GKD would let prompt + completion outgrow max_length, and a learned position table)
                batch = {
                    **batch,
                    "prompts": batch["prompts"][:, -keep:],
                    "prompt_attention_mask": batch["prompt_attention_mask"][:, -keep:],
                }
            with unwrap_model_for_generation(
                self.teacher_model, self.accelerator, generation_kwargs=self.generation_kwargs
            ) as teacher:
                input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                    teacher, batch, self.generation_config
                )
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return self._training_batch(self._within_max_length(sequences_from_padded(batch)))

    def _within_max_length(self, sequences: list[Sequence]) -> list[Sequence]:
        """Off-policy rows cut to their last `max_length` tokens: a collator the caller passed (or pre-tokenized
        rows) can hand over longer ones, which would outgrow a learned position table that `max_length` was fitted
        to, or the packing budget."""
        if self.args.max_length is None:
            return sequences
        sequences, cut = keep_last_tokens(sequences, self.args.max_length)
        if cut:
            self._warn_once(
                "off_policy_cut",
                "%d off-policy samples of this batch were longer than max_length=%d tokens (the data collator let "
                "them through) and were cut to their last max_length tokens. Raise max_length, or have the collator "
                "cut them as you prefer. Shown once per train().",
                cut,
                self.args.max_length,
            )
        return sequences

    def _on_policy_batch(self) -> dict[str, torch.Tensor]:
        if not self._generating:  # a training loop that skipped on_train_begin
            self._start_generation()
        step = self.state.global_step
        if step - self._synced_step > self.args.max_staleness:
            # Everything the generator could make would be evicted, and no scheduled sync can come before the next
            # optimizer step: publish now rather than starve. The schedule keeps this from happening; this keeps a
            # bypassed schedule from turning into a hang. Every rank decides alike: `_synced_step` is shared.
            self._publish(step, reason="stale_snapshot")
        n = self.args.per_device_train_batch_size
        if not self.args.uses_shared_generator or self.args.world_size == 1:
            samples = self._take(n, step)
        else:  # the main process takes every rank's micro-batch from its buffer and sends each rank its share
            shares = None
            if self.accelerator.is_main_process:
                taken = self._take(n * self.args.world_size, step)
                shares = [taken[rank * n : (rank + 1) * n] for rank in range(self.args.world_size)]
            received: list[Any] = [None]
            dist.scatter_object_list(received, shares, src=0)
            samples = received[0]
        return self._training_batch(sequences_from_samples(samples), samples)

    def _take(self, n: int, step: int) -> list[Sample]:
        """`n` samples from this rank's generator, recorded in the metrics and the completion log."""
        result = self._pipeline.take(n, step)
        self.npd_metrics.record_take(result, step)
        self.npd_metrics.totals.generated_samples = self._pipeline.generated
        if self._sample_log is not None:
            self._sample_log.record(result, step)
        if self._completion_log is not None:
            self._completion_log.record(result.samples, step)
        for batch in result.received:
            for warning in batch.warnings:
                logger.warning(warning)
        self._warn_about_inputs(result)
        self._next_stream_position = max(self._next_stream_position, *(s.stream_position + 1 for s in result.samples))
        return result.samples

    def _warn_about_inputs(self, result: TakeResult) -> None:
        """Say once per `train()` that prompts were cut or completions came back empty; both are counted always."""
        truncated = sum(batch.truncated_prompts for batch in result.received)
        if truncated:
            self._warn_once(
                "truncated",
                "%d prompts of this generation were longer than max_length - max_new_tokens = %d tokens and were cut "
                "from the left (oldest context first). Every cut prompt is counted in npd/truncated_prompts; raise "
                "max_length or lower max_new_tokens to keep prompts whole.",
                truncated,
                self.args.max_prompt_tokens,
            )
        if result.dropped_empty_completion:
            self._warn_once(
                "empty_completion",
                "The generator returned %d completions without a single token; they are dropped and counted in "
                "npd/dropped_empty_completion. An engine returns an empty completion when a prompt fills its "
                "context or its token limit is 0: check max_length, max_new_tokens and the engine's own limits.",
                result.dropped_empty_completion,
            )

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        """A warning given once per `train()` call: what it reports is counted in the metrics every time."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _training_batch(
        self, sequences: list[Sequence], samples: list[Sample] | None = None
    ) -> dict[str, torch.Tensor]:
        self._step_micro_batches.append((sequences, samples))
        pad = self.processing_class.pad_token_id
        if not self._pack:
            return pad_sequences(sequences, pad)
        budget = row_token_budget(
            [len(s.input_ids) for s in sequences], self.args.max_length, self._per_sample_attention
        )
        batch, stats = pack_sequences(sequences, budget, pad)
        self.npd_metrics.record_packing(stats)
        return batch

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # Skip GKDTrainer.training_step: its synchronous sampling is what the background generator replaces.
        return super(GKDTrainer, self).training_step(model, inputs, num_items_in_batch)

    # ---- loss -----------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if return_outputs:  # evaluation that wants logits: the reference path is the one that has them
            student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss, student_outputs
        on_policy = model.training and "behaviour_logprobs" in inputs
        fused = self.args.use_fused_loss
        loss_kwargs = {
            "beta": self.beta,
            "fused": fused,
            "temperature": self._divergence_temperature(),
            # drift is measured against the sampling distribution, i.e. at the sampling temperature
            "logprob_temperature": self.temperature if on_policy else None,
            "compiled": self._compile_fused_loss,
            "teacher_top_k": self.args.teacher_top_k,
            "ce_weight": self.args.ce_weight,
            "topk_jsd": self.args.topk_objective == "jsd",
        }
        if fused:  # through the wrapper's forward, so DDP/FSDP see the backbone call they wrap
            unwrapped = self.accelerator.unwrap_model(model)
            result = self._forward_redirection(
                model, unwrapped, distillation_loss, unwrapped, self.teacher_model, inputs, **loss_kwargs
            )
        else:
            result = distillation_loss(model, self.teacher_model, inputs, **loss_kwargs)
        if model.training:
            micro_batch, self._micro_batches_done = self._micro_batches_done, self._micro_batches_done + 1
            if not torch.isfinite(result.loss_sum):  # the one check on the hot path; the diagnosis only on failure
                raise NonFiniteLossError(
                    self._nonfinite_loss_report(model, float(result.loss_sum.detach()), micro_batch)
                )
        if num_items_in_batch is None:  # evaluation, or a direct call: mean over this batch's tokens
            loss = result.loss_sum / result.num_tokens.clamp_min(1)
        else:
            loss = result.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        if on_policy:
            behaviour = inputs["behaviour_logprobs"][:, 1:][result.mask]
            k3 = k3_policy_kl(result.current_logprobs, behaviour.to(result.current_logprobs.dtype))
            self._step_kl_sum = self._step_kl_sum.to(k3.device) + k3.sum().double()
            self._step_kl_tokens += k3.numel()
            self._record_sample_drift(inputs, k3, result.mask)
        return loss

    def _divergence_temperature(self) -> float:
        """The temperature both models' logits are divided by before the divergence. `temperature` is GKD's sampling
        temperature, and GKD takes the divergence at temperature 1, as this trainer does; the `DistillationTrainer`
        drop-in takes it at `temperature`, as TRL's `DistillationTrainer` does."""
        return 1.0

    def _record_sample_drift(self, inputs: dict[str, Any], k3: torch.Tensor, mask: torch.Tensor) -> None:
        """Each sample's mean drift over its trained tokens, with its staleness: the distribution behind the step's
        `npd/policy_kl`, which shows how drift grows with staleness (`npd_metrics.totals.sample_drift`)."""
        samples = inputs["policy_step"].numel()
        index = inputs["sample_index"][:, 1:][mask].to(k3.device)
        drift_sum = torch.zeros(samples, dtype=torch.float64, device=k3.device).index_add_(0, index, k3.double())
        tokens = torch.bincount(index, minlength=samples)
        trained = tokens > 0
        staleness = self.state.global_step - inputs["policy_step"].to(k3.device)
        self.npd_metrics.record_sample_drift(
            staleness[trained].tolist(), (drift_sum[trained] / tokens[trained]).tolist(), tokens[trained].tolist()
        )

    def _nonfinite_loss_report(self, model: nn.Module, loss: float, micro_batch: int) -> str:
        """Name the samples of the failing micro-batch whose logits are not finite, and in which model."""
        findings = None
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # a lone forward would wait on the other ranks
        if micro_batch < len(self._step_micro_batches) and not sharded:
            sequences, samples = self._step_micro_batches[micro_batch]
            student = self.accelerator.unwrap_model(model)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            findings = find_nonfinite_samples(student, teacher, sequences, samples, self.args.device)
        return nonfinite_loss_message(
            loss, self.state.global_step + 1, micro_batch, max(len(self._step_micro_batches), 1), findings
        )

    # ---- after each optimizer step ----------------------------------------------------------------------------------
    def _after_optimizer_step(self) -> None:
        kl_sum, kl_tokens = self._step_kl_sum, self._step_kl_tokens
        self._step_kl_sum, self._step_kl_tokens = torch.zeros((), dtype=torch.float64), 0
        if self.args.world_size > 1:  # every rank must take the same sync decision
            totals = torch.stack([kl_sum.to(self.args.device), torch.tensor(kl_tokens, device=self.args.device)])
            kl_sum, kl_tokens = self.accelerator.reduce(totals.double(), reduction="sum").unbind()
            kl_tokens = int(kl_tokens.item())
        kl = float(kl_sum) / kl_tokens if kl_tokens else 0.0
        self.npd_metrics.record_policy_kl(float(kl_sum), kl_tokens)
        if not self._generating:
            return
        if self._pipeline is not None:
            self._pipeline.check_alive()  # a failure surfaces at the next step even if the buffer never runs dry
        step = self.state.global_step
        drifted = self.args.max_policy_kl is not None and kl > self.args.max_policy_kl
        if step % self.args.weight_sync_steps == 0:
            self._publish(step, reason="schedule")
        elif drifted:
            self._publish(step, reason="drift")

    def _publish(self, step: int, reason: str) -> None:
        """Every rank publishes at the same steps; ranks without a generator only take part in the collectives."""
        start = time.perf_counter()
        with self._full_weights():
            if self._pipeline is not None:
                self._pipeline.publish(self.accelerator.unwrap_model(self.model), step)
            elif self._vllm is not None:
                self._vllm.sync_weights()  # gathering sharded weights is a collective
        self._policy_version += 1
        self._synced_step = step
        self.npd_metrics.record_sync(time.perf_counter() - start, reason, step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._generating:  # the same on every rank: the gather below is a collective
            buffered = len(self._pipeline.buffer) if self._pipeline is not None else None
            npd_logs = self.npd_metrics.flush(self._policy_version, buffered)
            if self.args.world_size > 1:
                npd_logs = aggregate_across_ranks(gather_object([npd_logs]))
            logs.update(npd_logs)
            if self._completion_log is not None and self.is_world_process_zero():
                self._completion_log.emit(self.processing_class, self.args.report_to)
        super().log(logs, start_time)

    def _show_buffer_state(self) -> None:
        """The progress bar's postfix: the generator's policy version, the samples waiting in the buffer, and how
        many optimizer steps the generator's weights lag behind the trainer's."""
        bar = next((c.training_bar for c in self.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
        if bar is None or self._pipeline is None:
            return
        pipeline = self._pipeline
        bar.set_postfix(
            version=pipeline.version, buffer=len(pipeline.buffer), lag=self.state.global_step - self._synced_step
        )

    # ---- saving ---------------------------------------------------------------------------------------------------
    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """TRL's card (tags `trl`, `trl-npd`, `distillation`; the GKD citation), then the teacher and NPD settings."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            append_npd_section(self.args.output_dir, self.args, self.accelerator.unwrap_model(self.teacher_model))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        # a final save documents how the model was made (TRL writes cards only at checkpoints and on push)
        if _internal_call or not self.is_world_process_zero():
            return
        target = output_dir or self.args.output_dir
        if os.path.abspath(target) == os.path.abspath(self.args.output_dir):
            self.create_model_card()  # TRL's card, as a push would write it, plus the NPD section
        else:  # elsewhere: add to the card the save wrote there (PEFT's, with its metadata), or start one
            append_npd_section(target, self.args, self.accelerator.unwrap_model(self.teacher_model))

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Every rank saves (a collective under DeepSpeed and FSDP), so every rank's stream position can be gathered.
        positions = [self._next_stream_position]
        if self.args.world_size > 1 and not self.args.uses_shared_generator:
            positions = gather_object(positions)
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            # written first, so a checkpoint pushed to the Hub by the parent's save already contains it
            if self.args.should_save:
                os.makedirs(folder, exist_ok=True)
                if self._generating:
                    version = self._policy_version
                else:
                    version = self._resume_state.get("policy_version", -1)
                state = {"policy_version": version, "stream_positions": positions}
                with open(os.path.join(folder, NPD_STATE_NAME), "w") as f:
                    json.dump(state, f, indent=2)
            super()._save_checkpoint(model, trial)
        except OSError as error:
            raise OSError(checkpoint_failed_message(folder, self.state.global_step, error, run_dir)) from error

    def _load_npd_state(self, resume_from_checkpoint: str | bool | None) -> dict[str, Any]:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return {}
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:  # Trainer.train raises the proper error for this
                return {}
        path = os.path.join(resume_from_checkpoint, NPD_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s: the generator restarts its prompt stream and versions.", path, NPD_STATE_NAME
            )
            return {}
        with open(path) as f:
            return json.load(f)


class _PipelineHooks(TrainerCallback):
    """Ties the pipeline to the training loop: start once weights are in place, sync after optimizer steps."""

    def __init__(self, trainer: NearPolicyDistillTrainer) -> None:
        self._trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer.npd_metrics.start_window()  # setup before training is nobody's wait
        # Checkpoint weights are restored before this event on every path (plain, DeepSpeed, FSDP).
        if self._trainer.lmbda > 0:
            self._trainer._start_generation()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer._after_optimizer_step()
        self._trainer._show_buffer_state()  # after the progress bar's own update, which comes first


def _check_train_dataset(dataset: Any) -> None:
    if dataset is None:
        raise ValueError("NearPolicyDistillTrainer needs a train_dataset: the generator samples its prompts.")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            "The train dataset must be map-style (with a length), not an IterableDataset (streamed): the generator "
            "indexes its prompts, in a fresh seeded permutation every pass. Load it without streaming=True."
        )
    if len(dataset) == 0:
        raise ValueError("The train dataset is empty: there are no prompts to distil on.")


def _is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` (or the base under a PEFT wrapper) through a quantizer."""
    flags = ("is_loaded_in_4bit", "is_loaded_in_8bit")
    return getattr(model, "hf_quantizer", None) is not None or any(getattr(model, f, False) is True for f in flags)


def _is_prompt_only(dataset: Any) -> bool:
    columns = getattr(dataset, "column_names", None) or []
    return "prompt" in columns and "messages" not in columns


def _check_tokenizer_fits(tokenizer: Any, student: nn.Module, teacher: nn.Module) -> None:
    """Every token id the tokenizer can produce must index both models' embeddings."""
    n_tokens = len(tokenizer)
    for role, model in (("student", student), ("teacher", teacher)):
        vocab = model.get_input_embeddings().num_embeddings
        if n_tokens > vocab:
            raise ValueError(
                f"The tokenizer has {n_tokens} tokens but the {role}'s embedding has only {vocab} rows: the two were "
                "not made for each other. Use the tokenizer the student and teacher share."
            )


class _GKDMigrationNoticeFilter(logging.Filter):
    """Drops GKDTrainer's "consider migrating to DistillationTrainer" notice; docs/index.md says how NPD relates to
    TRL's distillation trainers instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Consider migrating" not in record.getMessage()


class _FilterHandle:
    def __init__(self, target: logging.Logger, log_filter: logging.Filter) -> None:
        self._target, self._filter = target, log_filter
        target.addFilter(log_filter)

    def remove(self) -> None:
        self._target.removeFilter(self._filter)


def _silence_gkd_migration_notice() -> _FilterHandle:
    """While NPD's trainer runs GKDTrainer.__init__ only: GKDTrainer used directly still logs its notice."""
    return _FilterHandle(logging.getLogger(GKDTrainer.__module__), _GKDMigrationNoticeFilter())
