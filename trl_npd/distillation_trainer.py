"""`NPDDistillationTrainer`: a drop-in for TRL's `DistillationTrainer`, run by the near-policy core.

It takes `DistillationTrainer`'s arguments (no data collator: a `prompt` column, plain or conversational) and an
[`NPDDistillationConfig`], and trains with `NearPolicyDistillTrainer` unchanged: the background generator, the
staleness bound, packing, the fused loss and the `npd/` metrics. What it adds is the translation:

- the models and the teacher may be names or paths, the tokenizer is loaded from the student's when none is given,
  and a tokenizer without a pad token pads with its EOS token, as `DistillationTrainer` does;
- prompts are rendered as `DistillationTrainer` renders them (`chat_template_kwargs`; plain text with the
  tokenizer's special tokens), and a completion ends at any EOS the student's generation config declares;
- the divergence is taken at `temperature` (`_divergence_temperature`);
- evaluation samples a completion per eval prompt with the student's current weights and reports the divergence
  on them (`prediction_step`), as `DistillationTrainer.prediction_step` does;
- what NPD cannot do (tools, a quantized student, streamed datasets) is refused when the trainer is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object, set_seed
from torch import nn
from transformers import AutoProcessor, PreTrainedTokenizerBase, TrainerCallback
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import get_config_model_id

from .batching import IGNORE_INDEX, Sequence, pad_sequences
from .distillation_config import NPDDistillationConfig
from .engine import EngineConfig, TransformersEngine
from .prompts import PromptOnlyCollator, prompt_ids_of
from .trainer import NearPolicyDistillTrainer

logger = logging.getLogger(__name__)

EVAL_LENGTH_METRIC = "eval_completions/mean_length"


class NPDDistillationTrainer(NearPolicyDistillTrainer):
    """TRL's `DistillationTrainer`, with near-policy generation. `args` must be an [`NPDDistillationConfig`].

    Takes exactly `DistillationTrainer`'s arguments. `teacher_model` may be left out when
    `args.teacher_model_name_or_path` names the teacher.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "trl-npd"]
    _name = "NPD"

    def __init__(
        self,
        model: str | nn.Module,
        teacher_model: str | nn.Module | None = None,
        args: NPDDistillationConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
    ) -> None:
        args = _config_for(args, model)
        set_seed(args.seed)  # before a PEFT adapter is initialized, as DistillationTrainer does
        _refuse_tools(tools)
        _check_quantization(model, quantization_config)
        _check_prompt_datasets(train_dataset, eval_dataset)
        teacher_model = _teacher_for(teacher_model, args)
        if processing_class is None:
            processing_class = _load_tokenizer(model, args)
        if processing_class.pad_token is None:  # as DistillationTrainer: pad with the EOS token
            processing_class.pad_token = processing_class.eos_token
        collator = PromptOnlyCollator(
            processing_class, add_special_tokens=True, chat_template_kwargs=args.chat_template_kwargs
        )
        user_teacher_kwargs = args.teacher_model_init_kwargs
        args.teacher_model_init_kwargs = _teacher_init_kwargs(teacher_model, args)
        try:
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                data_collator=collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
            )
        finally:  # GKD converts the dtype in place; the caller's config keeps what the caller wrote
            args.teacher_model_init_kwargs = user_teacher_kwargs
        self._end_at_every_eos()
        self._eval_completion_lengths: list[int] = []

    def _end_at_every_eos(self) -> None:
        """A completion ends at the tokenizer's EOS and at every EOS the student's generation config declares (an
        end-of-turn token), as in `DistillationTrainer`."""
        declared = self.accelerator.unwrap_model(self.model).generation_config.eos_token_id
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        eos = self.processing_class.eos_token_id
        ids = declared if eos in declared or eos is None else [eos, *declared]
        self.generation_config.eos_token_id = ids or None  # none at all: the engine falls back to the tokenizer's

    def _divergence_temperature(self) -> float:
        return self.temperature  # DistillationTrainer divides both models' logits by it before the divergence

    # ---- evaluation -----------------------------------------------------------------------------------------------
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """As `DistillationTrainer` evaluates: the student samples a completion for each eval prompt with its current
        weights, at `temperature`, and the loss is the divergence on those completions, averaged over their tokens.
        The background generator is not involved."""
        batch = self._prepare_inputs(self._eval_completions(model, inputs))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def _eval_completions(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The eval prompts with a completion each, as a padded batch trained on the completions."""
        args = self.args
        prompts = prompt_ids_of(inputs)
        if (keep := args.max_prompt_tokens) is not None:  # cut as the generator cuts train prompts
            prompts = [p[-keep:] for p in prompts]
        if empty := sum(not p for p in prompts):  # generate() cannot start from zero tokens
            logger.warning("%d eval prompts have no token to condition on and are left out of eval_loss.", empty)
            prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError("An evaluation batch has no prompt with a token to condition on: check its 'prompt's.")
        # as DistillationTrainer samples: ZeRO-3 weights gathered as configured, and gradient checkpointing restored
        # afterwards with the run's own settings (unset, it would come back with the defaults, e.g. non-reentrant)
        with unwrap_model_for_generation(
            model,
            self.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            sampling = EngineConfig.from_config(args, self.processing_class, self.generation_config, str(args.device))
            engine = TransformersEngine(unwrapped, sampling)
            completions = engine.generate(prompts)
        lengths = [len(c.ids) for c in completions]
        self._eval_completion_lengths += gather_object(lengths) if args.world_size > 1 else lengths
        sequences = [
            Sequence(input_ids=p + c.ids, labels=[IGNORE_INDEX] * len(p) + c.ids)
            for p, c in zip(prompts, completions, strict=True)
        ]
        return pad_sequences(sequences, self.processing_class.pad_token_id)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training and self._eval_completion_lengths:
            lengths, self._eval_completion_lengths = self._eval_completion_lengths, []
            logs[EVAL_LENGTH_METRIC] = sum(lengths) / len(lengths)
        super().log(logs, start_time)


def _config_for(args: Any, model: Any) -> NPDDistillationConfig:
    if args is None:  # as DistillationTrainer: a default config named after the student
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return NPDDistillationConfig(output_dir=f"{name.split('/')[-1]}-Distillation")
    if not isinstance(args, NPDDistillationConfig):
        raise TypeError(
            f"args must be an NPDDistillationConfig (the drop-in for TRL's DistillationConfig), got "
            f"{type(args).__name__}. Import both: `from trl_npd import NPDDistillationConfig as DistillationConfig, "
            "NPDDistillationTrainer as DistillationTrainer`."
        )
    return args


def _refuse_tools(tools: list[Callable] | None) -> None:
    if tools:
        raise ValueError(
            f"tools={[getattr(t, '__name__', t) for t in tools]} is not supported: NPD's generator samples "
            "single-turn completions and runs no tool-calling loop. Leave tools unset, or use TRL's "
            "DistillationTrainer for agent training."
        )


def _check_quantization(model: Any, quantization_config: Any) -> None:
    if quantization_config is None:
        return
    if isinstance(model, str):
        raise ValueError(
            "quantization_config is not supported: NPD's generator samples from a plain copy of the student's "
            "weights, which cannot be made from quantized ones. Load the student unquantized (LoRA on an unquantized "
            "base works with peft_config)."
        )
    logger.warning(  # as DistillationTrainer: the config only applies to a model loaded by name
        "You passed `quantization_config` to the trainer, but your model is already instantiated. The "
        "`quantization_config` will be ignored."
    )


def _check_prompt_datasets(train_dataset: Any, eval_dataset: Any) -> None:
    """Every dataset needs a `prompt` column (that the train set is map-style, the base class checks)."""
    evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    for name, dataset in {"train": train_dataset, **evals}.items():
        columns = getattr(dataset, "column_names", None)
        if dataset is not None and columns is not None and "prompt" not in columns:
            raise ValueError(
                f"The {name} dataset has no 'prompt' column (it has {columns}). NPDDistillationTrainer, like TRL's "
                "DistillationTrainer, samples completions for prompts: give it a 'prompt' column, plain text or "
                "a conversation."
            )


def _teacher_for(teacher_model: Any, args: NPDDistillationConfig) -> Any:
    if teacher_model is not None:
        return teacher_model
    if args.teacher_model_name_or_path is not None:
        return args.teacher_model_name_or_path
    raise ValueError(
        "A teacher is required: pass teacher_model (a model, a name or a path), or set "
        "args.teacher_model_name_or_path."
    )


def _teacher_init_kwargs(teacher_model: Any, args: NPDDistillationConfig) -> dict[str, Any] | None:
    """The keyword arguments GKD's loader gets for a teacher given by name: the caller's, copied, with
    `teacher_model_revision` and the `dtype` key GKD reads (`None`, i.e. the checkpoint's, as DistillationTrainer
    loads it)."""
    if not isinstance(teacher_model, str):
        return args.teacher_model_init_kwargs  # GKD refuses kwargs for a model it does not load, as TRL does
    kwargs = dict(args.teacher_model_init_kwargs or {})
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if kwargs:
        kwargs.setdefault("dtype", None)
    return kwargs or None


def _load_tokenizer(model: Any, args: NPDDistillationConfig) -> PreTrainedTokenizerBase:
    """The student's tokenizer, loaded as DistillationTrainer loads it."""
    name = model if isinstance(model, str) else get_config_model_id(model.config)
    revision = (args.model_init_kwargs or {}).get("revision") if isinstance(model, str) else None
    processor = AutoProcessor.from_pretrained(
        name,
        revision=revision,
        truncation_side="left",
        padding_side="left",
        trust_remote_code=args.trust_remote_code,
    )
    if not isinstance(processor, PreTrainedTokenizerBase):
        raise ValueError(
            f"{name} loads a {type(processor).__name__}, a multimodal processor: NPDDistillationTrainer distils "
            "text-only models. Pass a tokenizer as processing_class, or use TRL's DistillationTrainer for "
            "vision-language models."
        )
    return processor
