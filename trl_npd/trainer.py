"""`NearPolicyDistillTrainer`: TRL's `GKDTrainer` with near-policy generation. Wiring only: the mechanics live in
their own modules (`checks`, `generation_session` with the pipeline factory, `policy_sync`, `step_batches`,
`losses`, `metrics`, `checkpoint`), and this file connects them to the training loop, in the order of a step:

1. Construction: the inputs and the models are checked (`checks`), `max_length` is fitted to learned positions.
2. `train` begins: the checkpoint's generator state is read, and when weights are in place (`on_train_begin`) the
   generation session starts (connects vLLM, builds and starts the pipeline).
3. `get_batch_samples` pulls the step's micro-batches from the dataloader. Each is replaced, with probability
   `lmbda`, by samples from the buffer (`_on_policy_batch`), or by teacher generations when `seq_kd`, and packed.
   The loss normalizer is the number of completion tokens these batches actually train on.
4. `compute_loss` runs the student and the teacher and takes the generalized JSD (`losses`), and records the drift
   between the behaviour policy and the current student.
5. After the optimizer step (`on_step_end`), `PolicySync` decides whether to publish the weights to the generator:
   every `weight_sync_steps` steps, or at once when the drift exceeds `max_policy_kl`.
6. `log` adds the `npd/` metrics; `_save_checkpoint` writes the generator's state next to the weights.
7. `train` returns or raises: the generator stops, and a failure of its own is raised.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from .batching import count_trained_tokens, sequences_from_padded, sequences_from_samples
from .checkpoint import (
    checkpoint_failed_message,
    last_complete_checkpoint,
    read_npd_state,
    write_npd_state,
)
from .checks import (
    check_chunked_projections,
    check_inputs,
    check_models,
    fit_max_length,
    is_prompt_only,
    packs_safely,
    train_without_router_logits,
)
from .config import NearPolicyDistillConfig
from .divergences import k3_policy_kl
from .generation_session import GenerationSession
from .losses import distillation_loss
from .metrics import NPDMetrics, aggregate_across_ranks
from .model_card import append_npd_section, document_save
from .nonfinite import NonFiniteLossError
from .notices import GKDMigrationNoticeFilter
from .packing import attends_per_sample
from .policy_sync import PolicySync, drift_of_samples
from .prompts import PromptOnlyCollator
from .samples import Sample
from .step_batches import OnceWarnings, StepBatches, warn_about_inputs


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
        check_inputs(args, train_dataset, eval_dataset, processing_class, data_collator)
        own_collator = data_collator is None  # made here or by GKD from args.max_length
        if own_collator and is_prompt_only(train_dataset):
            data_collator = PromptOnlyCollator(processing_class, args.max_length)
        # SFTTrainer's padding-free mode needs its own collator, which GKD's batches cannot use; packing is our stage.
        padding_free, args.padding_free = args.padding_free, False
        notice_filter = GKDMigrationNoticeFilter.install()  # a user who chose NPD is not told to migrate elsewhere
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
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        check_models(args, self.model, teacher, self.processing_class, self.accelerator, teacher_given=teacher_model)
        models = {"student": self.model, "teacher": teacher}
        fit_max_length(args, models, self.data_collator if own_collator else None)
        if train_without_router_logits(self.model, args):
            self.aux_loss_enabled = False
        check_chunked_projections(args, self.model, teacher, len(self.processing_class))
        # resolved once, here, and passed to every loss call: the device does not change during training
        self._compile_fused_loss = args.resolved_fused_loss_compile()
        # compute_loss divides by the tokens trained on across the whole accumulation group
        self.loss_is_scaled_for_ga = True
        self.npd_metrics = NPDMetrics()
        self._warn_once = OnceWarnings()
        self._batches = StepBatches(
            args,
            self.processing_class.pad_token_id,
            pack=args.padding_free and packs_safely(models, len(self.processing_class)),
            per_sample_attention=all(attends_per_sample(m) for m in models.values()),
            metrics=self.npd_metrics,
            warn_once=self._warn_once,
        )
        self._policy = PolicySync(args)
        self._generation = GenerationSession(args, self.accelerator, self.npd_metrics, self._policy)
        self._forward_redirection = _ForwardRedirection()
        self.add_callback(_PipelineHooks(self))

    # ---- life cycle -------------------------------------------------------------------------------------------------
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        if resume_from_checkpoint is True:  # the last checkpoint saved to the end, not one a killed run left half
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        self._generation.resume = read_npd_state(resume_from_checkpoint, self.args.output_dir)
        self.npd_metrics.reset()
        self._warn_once.reset()
        restore_threads = self._generation.share_cpu()
        try:
            output = super().train(
                resume_from_checkpoint=resume_from_checkpoint,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        except BaseException:  # KeyboardInterrupt included: nothing of the pipeline outlives train()
            self._generation.stop(raise_failure=False)
            raise
        finally:
            restore_threads()
        self._generation.stop(raise_failure=True)  # a generator that failed late must not go unreported
        return output

    def _start_generation(self) -> None:
        self._generation.start(self, self.state.global_step)

    # ---- the step's batches -----------------------------------------------------------------------------------------
    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        batches = []
        self._batches.begin_step()
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
        return self._batches.build(self._batches.within_max_length(sequences_from_padded(batch)))

    def _on_policy_batch(self) -> dict[str, torch.Tensor]:
        if not self._generation.active:  # a training loop that skipped on_train_begin
            self._start_generation()
        step = self.state.global_step
        if self._policy.snapshot_too_stale(step):
            # Everything the generator could make would be evicted, and no scheduled sync can come before the next
            # optimizer step: publish now rather than starve. Every rank decides alike (the policy is shared).
            self._generation.publish(self.model, step, reason="stale_snapshot")
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
        return self._batches.build(sequences_from_samples(samples), samples)

    def _take(self, n: int, step: int) -> list[Sample]:
        result = self._generation.take(n, step)
        warn_about_inputs(result, self.args.max_prompt_tokens, self._warn_once)
        return result.samples

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        # Skip GKDTrainer.training_step: its synchronous sampling is what the background generator replaces.
        return super(GKDTrainer, self).training_step(model, inputs, num_items_in_batch)

    # ---- the loss ---------------------------------------------------------------------------------------------------
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
        loss_kwargs = {
            "beta": self.beta,
            "fused": self.args.use_fused_loss,
            "temperature": self._divergence_temperature(),
            # drift is measured against the sampling distribution, i.e. at the sampling temperature
            "logprob_temperature": self.temperature if on_policy else None,
            "compiled": self._compile_fused_loss,
            "teacher_top_k": self.args.teacher_top_k,
            "ce_weight": self.args.ce_weight,
            "topk_jsd": self.args.topk_objective == "jsd",
        }
        if self.args.use_fused_loss:  # through the wrapper's forward, so DDP/FSDP see the backbone call they wrap
            unwrapped = self.accelerator.unwrap_model(model)
            result = self._forward_redirection(
                model, unwrapped, distillation_loss, unwrapped, self.teacher_model, inputs, **loss_kwargs
            )
        else:
            result = distillation_loss(model, self.teacher_model, inputs, **loss_kwargs)
        if model.training:
            micro_batch = self._batches.next_in_loss()
            if not torch.isfinite(result.loss_sum):  # the one check on the hot path; the diagnosis only on failure
                raise NonFiniteLossError(self._nonfinite_loss_report(model, result.loss_sum, micro_batch))
        if num_items_in_batch is None:  # evaluation, or a direct call: mean over this batch's tokens
            loss = result.loss_sum / result.num_tokens.clamp_min(1)
        else:
            loss = result.loss_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        if on_policy:
            behaviour = inputs["behaviour_logprobs"][:, 1:][result.mask]
            k3 = k3_policy_kl(result.current_logprobs, behaviour.to(result.current_logprobs.dtype))
            self._policy.add_drift(k3)
            drift = drift_of_samples(
                inputs["policy_step"], inputs["sample_index"], k3, result.mask, self.state.global_step
            )
            self.npd_metrics.record_sample_drift(*drift)
        return loss

    def _divergence_temperature(self) -> float:
        """The temperature both models' logits are divided by before the divergence. `temperature` is GKD's sampling
        temperature, and GKD takes the divergence at temperature 1, as this trainer does; the `DistillationTrainer`
        drop-in takes it at `temperature`, as TRL's `DistillationTrainer` does."""
        return 1.0

    def _nonfinite_loss_report(self, model: nn.Module, loss_sum: torch.Tensor, micro_batch: int) -> str:
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled  # a lone forward would wait on the other ranks
        unwrap = self.accelerator.unwrap_model
        models = None if sharded else (unwrap(model), unwrap(self.teacher_model))
        step = self.state.global_step + 1
        return self._batches.nonfinite_report(float(loss_sum.detach()), step, micro_batch, models, self.args.device)

    # ---- after each optimizer step ----------------------------------------------------------------------------------
    def _after_optimizer_step(self) -> None:
        kl_sum, kl_tokens = self._policy.take_step_drift(self.accelerator if self.args.world_size > 1 else None)
        self.npd_metrics.record_policy_kl(kl_sum, kl_tokens)
        if not self._generation.active:
            return
        self._generation.check_alive()
        step = self.state.global_step
        if (reason := self._policy.reason_to_publish(step, kl_sum / kl_tokens if kl_tokens else 0.0)) is not None:
            self._generation.publish(self.model, step, reason)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._generation.active:  # the same on every rank: the gather is a collective
            npd_logs = self.npd_metrics.flush(self._policy.version, self._generation.buffered)
            if self.args.world_size > 1:
                npd_logs = aggregate_across_ranks(gather_object([npd_logs]))
            logs.update(npd_logs)
            completion_log = self._generation.completion_log
            if completion_log is not None and self.is_world_process_zero():
                completion_log.emit(self.processing_class, self.args.report_to)
        super().log(logs, start_time)

    def _show_buffer_state(self) -> None:
        """The progress bar's postfix: the generator's policy version, the samples waiting in the buffer, and how
        many optimizer steps the generator's weights lag behind the trainer's."""
        bar = next((c.training_bar for c in self.callback_handler.callbacks if isinstance(c, ProgressCallback)), None)
        if bar is not None and (state := self._generation.progress(self.state.global_step)) is not None:
            bar.set_postfix(**state)

    # ---- saving -----------------------------------------------------------------------------------------------------
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
        if not _internal_call and self.is_world_process_zero():
            document_save(self, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        state = self._generation.checkpoint_state()  # on every rank: every rank saves (a collective when sharded)
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            if self.args.should_save:  # first, so a checkpoint pushed to the Hub by the parent's save contains it
                write_npd_state(folder, state)
            super()._save_checkpoint(model, trial)
        except OSError as error:
            raise OSError(checkpoint_failed_message(folder, self.state.global_step, error, run_dir)) from error


class _PipelineHooks(TrainerCallback):
    """Ties the generation session to the training loop: start once weights are in place, sync after steps."""

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
