"""`trl-npd`: the command line, shaped like TRL's GKD and distillation scripts (`trl-npd distillation ...`, in
`distillation_cli`, takes the flags of TRL's `scripts/distillation.py`).

    trl-npd --model_name_or_path Qwen/Qwen3-0.6B --teacher_model_name_or_path Qwen/Qwen3-4B \\
        --dataset_name trl-lib/chatbot_arena_completions --output_dir Qwen3-0.6B-NPD

It parses `(ScriptArguments, NearPolicyDistillConfig, ModelConfig)` with TRL's `TrlParser`, so every flag of TRL's
GKD example (`--use_peft`, `--lora_r`, `--push_to_hub`, ...) and every NPD field works, as does `--config
recipe.yaml`. `--dataset_name` also takes a local path: a folder written by `save_to_disk`, or a `.json`, `.jsonl`,
`.csv` or `.parquet` file.

Only the models, the data and `--output_dir` are required: `--bf16` left out is chosen from the hardware (float32
on a CPU-only machine), and `--log_level info` shows the choice with trl_npd's other info lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from datasets import DatasetDict, load_dataset, load_from_disk

from .config import NearPolicyDistillConfig

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes


def load_datasets(name_or_path: str, config: str | None = None, streaming: bool = False) -> DatasetDict:
    """A Hub dataset by name, or a local one: a `save_to_disk` folder, or a json/jsonl/csv/parquet file."""
    if os.path.isdir(name_or_path) and any(
        os.path.isfile(os.path.join(name_or_path, marker)) for marker in SAVED_DATASET_MARKERS
    ):
        loaded = load_from_disk(name_or_path)
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if os.path.isfile(name_or_path):
        extension = os.path.splitext(name_or_path)[1].lower()
        if extension not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"Cannot read {name_or_path!r}: a local --dataset_name must be a save_to_disk folder or a "
                f"{', '.join(DATA_FILE_BUILDERS)} file."
            )
        return load_dataset(DATA_FILE_BUILDERS[extension], data_files=name_or_path, streaming=streaming)
    # a Hub name, or a folder of data files that `load_dataset` understands
    return load_dataset(name_or_path, name=config, streaming=streaming)


def model_loading_kwargs(model_args: Any, training_args: Any) -> dict[str, Any]:
    """What loading the student and the teacher by name shares, from the model flags; both must be named."""
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the student to distil into.")
    if training_args.teacher_model_name_or_path is None:
        raise ValueError("--teacher_model_name_or_path is required: the teacher to distil from.")
    return dict(
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )


def make_parser() -> Any:
    from trl import ModelConfig, ScriptArguments, TrlParser

    return TrlParser((ScriptArguments, NearPolicyDistillConfig, ModelConfig), prog="trl-npd")


def run(script_args: Any, training_args: NearPolicyDistillConfig, model_args: Any) -> Any:
    """Train, save and (with `--push_to_hub`) push; returns the trainer."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .trainer import NearPolicyDistillTrainer

    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required: a Hub dataset, a save_to_disk folder or a data file.")
    common = model_loading_kwargs(model_args, training_args)
    # --model_revision names a revision of the student's repository only; the teacher's, if any, goes in
    # --teacher_model_init_kwargs '{"revision": ...}'
    student_kwargs = {**common, "revision": model_args.model_revision}
    quantization_config = get_quantization_config(model_args)  # --load_in_4bit / --load_in_8bit
    if quantization_config is not None:
        student_kwargs["quantization_config"] = quantization_config  # the trainer refuses it, with the reason
    training_args.model_init_kwargs = {**student_kwargs, **(training_args.model_init_kwargs or {})}
    # the teacher is never quantized by the student's flags: it defines the distribution the student learns
    training_args.teacher_model_init_kwargs = {**common, **(training_args.teacher_model_init_kwargs or {})}

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    datasets = load_datasets(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = datasets[script_args.dataset_test_split]
    trainer = NearPolicyDistillTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=datasets[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    return train_and_save(trainer, training_args, script_args.dataset_name)


def train_and_save(trainer: Any, training_args: Any, dataset_name: str | None) -> Any:
    """Train, save and (with `--push_to_hub`) push, as TRL's scripts do; returns the trainer."""
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()
    return trainer


def main(argv: list[str] | None = None) -> None:
    """`trl-npd FLAGS` runs the GKD drop-in; `trl-npd distillation FLAGS` the `DistillationTrainer` drop-in, with
    the flags of TRL's `scripts/distillation.py` (`distillation_cli`)."""
    argv = sys.argv[1:] if argv is None else argv
    parser, runner = make_parser(), run
    if argv[:1] == ["distillation"]:
        from .distillation_cli import make_distillation_parser, run_distillation

        parser, runner, argv = make_distillation_parser(), run_distillation, argv[1:]
    with _records_kept() as kept:  # the config logs its choices while parsing, before the log level is known
        parsed = parser.parse_args_and_config(args=argv)
    with _package_logging(parsed[1].get_process_log_level()):  # the config is the second dataclass of both
        package = logging.getLogger(PACKAGE_LOGGER)
        for record in kept:
            if package.isEnabledFor(record.levelno):
                logging.getLogger(record.name).handle(record)
        runner(*parsed)


PACKAGE_LOGGER = "trl_npd"


class _KeepRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _records_kept() -> Iterator[list[logging.LogRecord]]:
    """Every record trl_npd logs meanwhile, kept rather than shown."""
    package, keeper = logging.getLogger(PACKAGE_LOGGER), _KeepRecords()
    level, propagate = package.level, package.propagate
    package.addHandler(keeper)
    package.setLevel(logging.DEBUG)
    package.propagate = False
    try:
        yield keeper.records
    finally:
        package.removeHandler(keeper)
        package.setLevel(level)
        package.propagate = propagate


@contextlib.contextmanager
def _package_logging(level: int) -> Iterator[None]:
    """trl_npd's loggers follow `--log_level`, as transformers' do, on stderr; restored afterwards for callers that
    run `main` in their own process."""
    package = logging.getLogger(PACKAGE_LOGGER)
    previous = package.level
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
    package.setLevel(level)
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


if __name__ == "__main__":
    main()
