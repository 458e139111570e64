"""Checks that turn a bad input into a clear message before it costs a training run: the inputs (`check_inputs`,
before TRL's trainer is built) and the models (`check_models`, once it has loaded them). The full list of bad inputs
and their messages is in docs/usage.md (each one is tested)."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from datasets import IterableDataset
from torch import nn
from trl.distributed import DistributedBackend

from .heads import chunked_logits_error, logit_transform, rounding_tolerance
from .packing import packing_leaks

logger = logging.getLogger(__name__)


def check_context_fits(max_new_tokens: int, student: nn.Module, teacher: nn.Module) -> None:
    """`max_new_tokens` must leave room for at least one prompt token in both models' context windows."""
    for role, model in (("student", student), ("teacher", teacher)):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        context = getattr(config, "max_position_embeddings", None)
        if isinstance(context, int) and max_new_tokens >= context:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} does not fit the {role}'s context of {context} positions "
                "(max_position_embeddings) together with a prompt. Lower max_new_tokens below "
                f"{context}, and max_length to at most {context}."
            )


def learned_position_limit(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned absolute position table can run (GPT-2, OPT, GPTBigCode), or
    None for models without one (rotary, ALiBi), whose `max_position_embeddings` is no hard limit."""
    embeddings = model.get_input_embeddings()
    learned = any(
        isinstance(module, nn.Embedding) and module is not embeddings and ("position" in name or name.endswith("wpe"))
        for name, module in model.named_modules()
    )
    if not learned:
        return None
    config = model.config.get_text_config()
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_max_length_to_positions(max_length: int | None, models: dict[str, nn.Module]) -> int | None:
    """`max_length`, lowered (with a warning) to the fewest positions among `models` ({role: model}) that have a
    learned position table, since no sequence can run past that table; unchanged otherwise.

    GKD runs such a model with any `max_length` and fails only once a sequence outgrows the table (an index error,
    or a device-side assert on a GPU). Lowering `max_length` instead keeps that from happening anywhere: prompts are
    cut from the left to `max_length - max_new_tokens` and off-policy samples to their last `max_length` tokens, as
    with any `max_length`. `max_new_tokens` itself must fit the context (`check_context_fits`, called first).
    """
    limits = {role: limit for role, model in models.items() if (limit := learned_position_limit(model)) is not None}
    if not limits:
        return max_length
    fitted = min(limits.values())
    if max_length is not None and max_length <= fitted:
        return max_length
    limiting = [role for role, limit in limits.items() if limit == fitted]
    logger.warning(
        "max_length=%s is longer than the %s learned position embeddings (%s: %d positions), past which no sequence "
        "can run: max_length is lowered to %d. As with any max_length, prompts are cut from the left to "
        "max_length - max_new_tokens and off-policy samples (whichever collator made them) to their last max_length "
        "tokens. Set max_length <= %d "
        "to choose this yourself.",
        "None (no limit)" if max_length is None else max_length,
        " and the ".join(f"{role}'s" for role in limiting),
        ", ".join(type(models[role]).__name__ for role in limiting),
        fitted,
        fitted,
        fitted,
    )
    return fitted


def fit_max_length(args: Any, models: dict[str, nn.Module], own_collator: Any | None) -> None:
    """Lower `args.max_length` to a learned position table's size (`fit_max_length_to_positions`) where the trainer
    reads it: `args` (prompt truncation for the generator, packing, vLLM's context, the cut of off-policy rows) and
    `own_collator`, the collator made for it (None for a collator the caller passed, which keeps its own settings;
    `StepBatches.within_max_length` cuts what it hands over)."""
    fitted = fit_max_length_to_positions(args.max_length, models)
    if fitted == args.max_length:
        return
    args.max_length = fitted
    if own_collator is not None and hasattr(own_collator, "max_length"):
        # lowered, never raised: GKD's collator may have chosen a shorter limit of its own
        own_collator.max_length = min(own_collator.max_length or fitted, fitted)


def check_teacher_tokenizer(teacher_name: str, student_tokenizer: Any, init_kwargs: dict[str, Any]) -> None:
    """When the teacher is given by name, compare its own tokenizer with the student's.

    GKD gives the teacher the student's token ids and the student's rendering of every conversation. Another
    vocabulary means the teacher reads other tokens than the student wrote: refused. Another chat template means
    the teacher scores text in a format it was not trained on: a warning, since the run works and GKD accepts it.
    A teacher passed as a model object brings no tokenizer, and nothing is compared.
    """
    from transformers import AutoTokenizer

    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(
            teacher_name,
            revision=init_kwargs.get("revision"),
            trust_remote_code=bool(init_kwargs.get("trust_remote_code", False)),
        )
    except (OSError, ValueError, KeyError, ImportError) as error:  # a checkpoint without tokenizer files
        logger.info("The teacher %s has no tokenizer to compare with the student's (%s).", teacher_name, error)
        return
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)  # a processor's tokenizer
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    differing = sorted(
        t for t in student_vocab.keys() | teacher_vocab.keys() if student_vocab.get(t) != teacher_vocab.get(t)
    )
    if differing:
        examples = ", ".join(repr(t) for t in differing[:3])
        raise ValueError(
            f"The teacher's tokenizer ({teacher_name}) does not match the student's: {len(differing)} tokens have "
            f"other ids or exist in one only, e.g. {examples}. GKD feeds the teacher the student's token ids, so "
            "the two must share one vocabulary. Use a teacher from the student's model family (the same tokenizer), "
            "or TRL's GOLD trainer for cross-tokenizer distillation."
        )
    student_template = getattr(student_tokenizer, "chat_template", None)
    teacher_template = getattr(teacher_tokenizer, "chat_template", None)
    if student_template and teacher_template and student_template != teacher_template:
        logger.warning(
            "The teacher's chat template (%s) differs from the student's (processing_class). Every conversation is "
            "rendered with the student's template, so the teacher scores text in a format it was not trained on, "
            "which weakens its signal. Use a teacher and a student that share a chat template, or set "
            "processing_class.chat_template to the teacher's so that the student learns the teacher's format.",
            teacher_name,
        )


def check_output_dir_writable(args: Any) -> None:
    """A run that saves checkpoints must be able to write them: find out before training, not at the first save
    (transformers makes the folder when the trainer is built, but does not try to write in it)."""
    strategy = getattr(args.save_strategy, "value", args.save_strategy)  # an enum in TrainingArguments
    if strategy == "no" or not args.should_save:
        return
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output_dir):
            pass
    except OSError as error:
        raise OSError(
            f"output_dir={args.output_dir!r} cannot be written ({type(error).__name__}: {error}), so every "
            f"checkpoint that save_strategy={strategy!r} asks for would fail once training is under way. Choose a "
            "writable output_dir, or set save_strategy='no'."
        ) from error


# ---- the trainer's inputs, before TRL's trainer is built ------------------------------------------------------------
def check_inputs(args: Any, train_dataset: Any, eval_dataset: Any, tokenizer: Any, data_collator: Any) -> None:
    """The datasets, the tokenizer and the output folder, checked before transformers builds anything."""
    check_train_dataset(train_dataset)
    check_output_dir_writable(args)  # before transformers makes the folder, with a plainer error
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", 0) is None:
        raise ValueError(
            "The tokenizer has no pad token, which batching needs. Set one before building the trainer, e.g. "
            "`tokenizer.pad_token = tokenizer.eos_token`."
        )
    if data_collator is None and is_prompt_only(train_dataset):
        if args.lmbda < 1.0:
            raise ValueError(
                f"The train dataset has prompts but no completions ('messages'), so the off-policy fraction "
                f"1 - lmbda = {1 - args.lmbda:g} has nothing to train on. Set lmbda=1.0 for pure on-policy "
                "distillation, or provide 'messages' with completions."
            )
        if eval_dataset is not None:
            raise ValueError("Evaluation needs completions: give the eval dataset a 'messages' column.")


def check_train_dataset(dataset: Any) -> None:
    if dataset is None:
        raise ValueError("NearPolicyDistillTrainer needs a train_dataset: the generator samples its prompts.")
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            "The train dataset must be map-style (with a length), not an IterableDataset (streamed): the generator "
            "indexes its prompts, in a fresh seeded permutation every pass. Load it without streaming=True."
        )
    if len(dataset) == 0:
        raise ValueError("The train dataset is empty: there are no prompts to distil on.")


def is_prompt_only(dataset: Any) -> bool:
    columns = getattr(dataset, "column_names", None) or []
    return "prompt" in columns and "messages" not in columns


# ---- the models, once TRL's trainer has loaded them -----------------------------------------------------------------
def check_models(
    args: Any, student: nn.Module, teacher: nn.Module, tokenizer: Any, accelerator: Any, teacher_given: Any
) -> None:
    """What the generator or the loss would otherwise find out mid-run, refused here (`check_chunked_projections`
    comes once the models are set up for training). `teacher` is unwrapped;
    `teacher_given` is the teacher as the caller passed it (a name or path, or a model)."""
    check_tokenizer_fits(tokenizer, student, teacher)
    generating = args.lmbda > 0
    if generating or args.seq_kd:  # the models generate max_new_tokens after a prompt
        check_context_fits(args.max_new_tokens, student, teacher)
    if isinstance(teacher_given, str):  # loaded by name: its own tokenizer can be compared with the student's
        check_teacher_tokenizer(teacher_given, tokenizer, args.teacher_model_init_kwargs or {})
    if generating:
        check_sharding_support(args, DistributedBackend(accelerator))
        if is_quantized(student):
            raise ValueError(
                "The student is quantized (bitsandbytes or another quantizer). The generator samples from a plain "
                "copy of the student's weights, which cannot be made from quantized ones yet. Load the student "
                "unquantized (LoRA on an unquantized base works), or use lmbda=0."
            )
    check_topk_fits_vocabulary(args.teacher_top_k, teacher)


def check_tokenizer_fits(tokenizer: Any, student: nn.Module, teacher: nn.Module) -> None:
    """Every token id the tokenizer can produce must index both models' embeddings."""
    n_tokens = len(tokenizer)
    for role, model in (("student", student), ("teacher", teacher)):
        vocab = model.get_input_embeddings().num_embeddings
        if n_tokens > vocab:
            raise ValueError(
                f"The tokenizer has {n_tokens} tokens but the {role}'s embedding has only {vocab} rows: the two were "
                "not made for each other. Use the tokenizer the student and teacher share."
            )


def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded `model` (or the base under a PEFT wrapper) through a quantizer."""
    flags = ("is_loaded_in_4bit", "is_loaded_in_8bit")
    return getattr(model, "hf_quantizer", None) is not None or any(getattr(model, f, False) is True for f in flags)


def check_sharding_support(args: Any, backend: Any) -> None:
    """Refuse, before training, the sharded set-ups whose generation would hang or copy empty weights."""
    if not (backend.is_zero3 or backend.is_fsdp):
        return
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


def check_topk_fits_vocabulary(k: int | None, teacher: nn.Module) -> None:
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k is not None and k > vocab:
        raise ValueError(
            f"teacher_top_k={k} is larger than the teacher's vocabulary ({vocab} tokens). Use teacher_top_k <= "
            f"{vocab} (the NPD paper uses 10), or None for the full-vocabulary JSD."
        )


def check_chunked_projections(args: Any, student: nn.Module, teacher: nn.Module, vocab: int) -> None:
    """Refuse a model whose logits the chunked LM-head projections would not reproduce.

    The fused loss, the top-k objective and the scoring stage project hidden states through the LM head
    themselves, applying the model's logit transform (soft-cap, scale). A probe checks, on each model those paths
    use, that this equals the model's own forward; the settings that use it are named, with the fix.
    """
    scoring = args.ifd_filter and args.lmbda > 0  # the scoring stage runs only with on-policy sampling
    users = {
        "student": {"use_fused_loss=True": args.use_fused_loss, "ifd_filter=True": scoring},
        "teacher": {
            "use_fused_loss=True": args.use_fused_loss,
            f"teacher_top_k={args.teacher_top_k}": args.teacher_top_k is not None,
            "ifd_filter=True": scoring,
        },
    }
    for role, model in (("student", student), ("teacher", teacher)):
        settings = [name for name, used in users[role].items() if used]
        if not settings:
            continue
        try:
            error = chunked_logits_error(model, min(vocab, model.get_input_embeddings().num_embeddings))
        except ValueError as reason:  # a head the projections cannot read (a PEFT adapter on lm_head)
            raise ValueError(f"The {role} cannot run {', '.join(settings)}: {reason}") from None
        if error > rounding_tolerance(model):
            raise ValueError(
                f"The {role} ({type(model).__name__}) cannot run {', '.join(settings)}: these project its hidden "
                f"states through its LM head chunk by chunk, with the logit transform its config names "
                f"({logit_transform(model)}), and the result differs from the logits of its own forward by "
                f"{error:.1%} of the largest logit. The model does something else between its backbone and its "
                "logits. Set use_fused_loss=False, teacher_top_k=None and ifd_filter=False to train it on the "
                "plain path, which uses the model's own logits."
            )


def train_without_router_logits(student: nn.Module, args: Any) -> bool:
    """MoE students: the distillation objective has no router load-balancing term (GKD's has none either), so the
    router logits SFTTrainer switches on are never used. They are switched off, which also keeps them out of the
    generator's `generate`, where transformers' load-balancing loss fails on cached steps. Returns whether they
    were on."""
    text_config = student.config.get_text_config()
    if not getattr(text_config, "output_router_logits", False):
        return False
    if args.router_aux_loss_coef:
        raise ValueError(
            f"router_aux_loss_coef={args.router_aux_loss_coef}: NPD's objective, like GKD's, is the "
            "distillation divergence only and has no router load-balancing term to weight. Leave "
            "router_aux_loss_coef unset (or 0.0)."
        )
    text_config.output_router_logits = False
    logger.info("The student is a Mixture-of-Experts model: its router logits are not part of the NPD objective.")
    return True


def packs_safely(models: dict[str, nn.Module], vocab: int) -> bool:
    """Probe each model ({role: model}) once: packing is only used if it keeps samples apart in each of them."""
    for role, model in models.items():
        if packing_leaks(model, vocab):
            logger.warning(
                "The %s (%s) lets packed samples attend to each other: it ignores position_ids when it builds "
                "its attention mask (ALiBi models do). Training batches are padded instead of packed.",
                role,
                type(model).__name__,
            )
            return False
    return True
