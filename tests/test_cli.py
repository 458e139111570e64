"""The `trl-npd` command line, end to end on locally saved tiny models and data."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import DatasetDict
from safetensors.torch import load_file
from tiny_models import save_student_and_teacher

from trl_npd.cli import load_datasets, main, make_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def saved(tmp_path, tokenizer, dataset):
    """A student, a teacher (each with the tokenizer) and the dataset, on disk."""
    paths = save_student_and_teacher(tmp_path, tokenizer)
    dataset.save_to_disk(str(tmp_path / "data"))
    paths["data"] = str(tmp_path / "data")
    paths["out"] = str(tmp_path / "out")
    return paths


def cli_args(saved, *extra):
    """No --bf16: on a CPU-only machine it resolves to float32 by itself."""
    return [
        "--model_name_or_path", saved["student"],
        "--teacher_model_name_or_path", saved["teacher"],
        "--dataset_name", saved["data"],
        "--output_dir", saved["out"],
        "--max_steps", "2",
        "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2",
        "--lmbda", "1.0",
        "--max_new_tokens", "4",
        "--max_length", "64",
        "--generator_mode", "inline",
        "--ifd_filter", "false",
        "--report_to", "none",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_local_datasets_load_from_disk_json_and_parquet(tmp_path, dataset):
    dataset.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": dataset, "test": dataset.select(range(4))}).save_to_disk(str(tmp_path / "dict"))
    dataset.to_json(str(tmp_path / "rows.jsonl"))
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    for path, splits in [("single", {"train"}), ("dict", {"train", "test"}), ("rows.jsonl", {"train"})]:
        loaded = load_datasets(str(tmp_path / path))
        assert set(loaded) == splits, path
        assert loaded["train"][0]["messages"] == dataset[0]["messages"], path
    assert load_datasets(str(tmp_path / "rows.parquet"))["train"].num_rows == len(dataset)
    (tmp_path / "rows.txt").write_text("not a dataset")
    with pytest.raises(ValueError, match="save_to_disk folder"):
        load_datasets(str(tmp_path / "rows.txt"))


def test_the_cli_trains_and_saves_the_student(saved):
    before = load_file(os.path.join(saved["student"], "model.safetensors"))
    main(cli_args(saved))
    after = load_file(os.path.join(saved["out"], "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert os.path.isfile(os.path.join(saved["out"], "tokenizer_config.json"))


def test_the_cli_trains_only_lora_adapters_with_use_peft(saved):
    main(
        cli_args(
            saved, "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"
        )
    )
    with open(os.path.join(saved["out"], "adapter_config.json")) as f:
        adapter = json.load(f)
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert not os.path.isfile(os.path.join(saved["out"], "model.safetensors"))  # only the adapter is saved


def test_a_yaml_config_sets_npd_and_trl_fields(tmp_path, saved):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {saved['student']}\n"
        f"teacher_model_name_or_path: {saved['teacher']}\n"
        f"dataset_name: {saved['data']}\n"
        f"output_dir: {saved['out']}\n"
        "max_policy_kl: 0.25\nweight_sync_steps: 2\nmax_staleness: 3\nlmbda: 1.0\nbeta: 0.2\nbf16: false\n"
    )
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=["--config", str(recipe)])
    assert (training_args.max_policy_kl, training_args.weight_sync_steps, training_args.max_staleness) == (0.25, 2, 3)
    assert training_args.beta == 0.2 and script_args.dataset_name == saved["data"]
    assert model_args.model_name_or_path == saved["student"]


def test_the_cli_takes_generator_mode_inline_and_the_old_name_sync_with_a_warning(tmp_path):
    paths = {role: str(tmp_path / role) for role in ("student", "teacher", "data", "out")}  # parsing reads no file
    _, training_args, _ = make_parser().parse_args_and_config(args=cli_args(paths))
    assert training_args.generator_mode == "inline" and training_args.ifd_filter is False
    old = cli_args(paths)
    old[old.index("inline")] = "sync"
    with pytest.warns(FutureWarning, match="generator_mode='sync' is deprecated: use generator_mode='inline'"):
        _, training_args, _ = make_parser().parse_args_and_config(args=old)
    assert training_args.generator_mode == "inline"
    _, training_args, _ = make_parser().parse_args_and_config(args=[*cli_args(paths), "--ifd_filter"])
    assert training_args.ifd_filter is True  # a plain bool flag: given alone, it turns Δ-IFD on


def test_the_cli_requires_a_teacher(saved):
    args = cli_args(saved)
    index = args.index("--teacher_model_name_or_path")
    del args[index : index + 2]
    with pytest.raises(ValueError, match="teacher_model_name_or_path"):
        main(args)


def test_examples_npd_py_shows_the_npd_flags():
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "npd.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--teacher_model_name_or_path", "--use_peft", "--lora_r", "--max_staleness", "--ifd_band"):
        assert flag in done.stdout, flag
    assert "chosen from the hardware" in " ".join(done.stdout.split())  # --bf16's help says what unset means


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_examples_npd_py_runs_on_a_cpu_with_only_the_required_flags(saved):
    """A fresh process, as a user types it: model, teacher, data, output folder, and sizes; no --bf16."""
    required = [
        "--model_name_or_path", saved["student"],
        "--teacher_model_name_or_path", saved["teacher"],
        "--dataset_name", saved["data"],
        "--output_dir", saved["out"],
    ]  # fmt: skip
    # sizes, and a thread generator to save a process start; nothing that touches precision
    small = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--max_new_tokens", "4", "--report_to", "none"]
    small += ["--generator_mode", "thread", "--log_level", "info"]
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "npd.py"), *required, *small],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16 was not set: training in float32" in done.stderr
    assert os.path.isfile(os.path.join(saved["out"], "model.safetensors"))
