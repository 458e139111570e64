"""`trl-npd distillation`: TRL's `scripts/distillation.py`, on `NPDDistillationTrainer`.

    trl-npd distillation --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback-prompt --output_dir Qwen2.5-0.5B-Distillation

It parses `(ScriptArguments, NPDDistillationConfig, ModelConfig, DatasetMixtureConfig)` with TRL's `TrlParser`, as
TRL's script parses its own with `DistillationConfig`, so its flags (`--use_peft`, `--lora_r`, `--datasets`,
`--push_to_hub`, `--config recipe.yaml`, ...) and every NPD field work. `--dataset_name` also takes a local path, as
`trl-npd` does.
"""

from __future__ import annotations

from typing import Any

from .cli import load_datasets, model_loading_kwargs, train_and_save
from .distillation_config import NPDDistillationConfig


def make_distillation_parser() -> Any:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    return TrlParser(
        (ScriptArguments, NPDDistillationConfig, ModelConfig, DatasetMixtureConfig), prog="trl-npd distillation"
    )


def run_distillation(
    script_args: Any, training_args: NPDDistillationConfig, model_args: Any, dataset_args: Any
) -> Any:
    """Train, save and (with `--push_to_hub`) push, as TRL's distillation script does; returns the trainer."""
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .distillation_trainer import NPDDistillationTrainer

    common = model_loading_kwargs(model_args, training_args)
    # as TRL's script: the student's revision and quantization come from the model flags (the trainer refuses the
    # quantization, with the reason); the teacher is never quantized by the student's flags
    training_args.model_init_kwargs = {
        **common,
        "revision": model_args.model_revision,
        **(training_args.model_init_kwargs or {}),
    }
    training_args.teacher_model_init_kwargs = {
        **common,
        "revision": training_args.teacher_model_revision,
        **(training_args.teacher_model_init_kwargs or {}),
    }
    if dataset_args.datasets:
        datasets = get_dataset(dataset_args)
    elif script_args.dataset_name is not None:
        datasets = load_datasets(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    else:
        raise ValueError("Either --datasets or --dataset_name is required: a Hub dataset, a folder or a data file.")
    trainer = NPDDistillationTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=datasets[script_args.dataset_train_split],
        eval_dataset=datasets[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    return train_and_save(trainer, training_args, script_args.dataset_name)
