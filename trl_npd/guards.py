"""Checks that turn a bad input into a clear message before it costs a training run, and the checkpoint choices a
killed run needs. The full list of bad inputs and their messages is in docs/usage.md (each one is tested)."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


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


def last_complete_checkpoint(output_dir: str, warn: bool = True) -> str | None:
    """The newest checkpoint saved to the end (transformers writes `trainer_state.json` last). A run killed while
    saving leaves a newer, incomplete one behind, which would fail to load; it is skipped, with a warning."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)) for name in os.listdir(output_dir) if (match := _CHECKPOINT.fullmatch(name))),
        reverse=True,
    )
    for step in steps:
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        if not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            return path
        if warn:
            logger.warning(
                "%s is incomplete (it has no %s: the run was stopped while saving it); resuming from an earlier "
                "checkpoint instead.",
                path,
                TRAINER_STATE_NAME,
            )
    return None


def checkpoint_failed_message(folder: str, step: int, error: OSError, output_dir: str) -> str:
    """Why training stops when a checkpoint cannot be written, and where to resume from."""
    last = last_complete_checkpoint(output_dir, warn=False)
    return (
        f"Saving the checkpoint of step {step} to {folder} failed ({type(error).__name__}: {error}), so training "
        f"stops here rather than go on without it. The last complete checkpoint is {last or 'none'}. Make output_dir "
        "writable (permissions, free space), then resume with train(resume_from_checkpoint=True)."
    )
