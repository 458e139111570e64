"""The one-line swap for TRL's `DistillationTrainer`: `NPDDistillationConfig` and `NPDDistillationTrainer`.

TRL's own DistillationTrainer scenarios, rewritten for tiny local models: a plain script with models given by path,
prompt-only datasets (plain and conversational), evaluation, save and reload; the config's fields and defaults
against TRL's `DistillationConfig`; the loss against TRL's own at a temperature; and a test for every refusal.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import re
import typing

import pytest
import torch
from accelerate.utils import ParallelismConfig
from datasets import Dataset, IterableDataset
from tiny_models import save_student_and_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, DistillationTrainer

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer, NPDDistillationConfig, NPDDistillationTrainer
from trl_npd.batching import IGNORE_INDEX, Sequence, pad_sequences
from trl_npd.distillation_trainer import EVAL_LENGTH_METRIC, _teacher_init_kwargs
from trl_npd.engine import EngineConfig
from trl_npd.prompts import PromptOnlyCollator, extract_prompt_ids
from trl_npd.toy import build_model, build_tokenizer

CONVERSATIONAL = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(16)])
PLAIN = Dataset.from_list([{"prompt": f"What is {i}+{7 - i}?"} for i in range(8)])


@pytest.fixture
def paths(tmp_path, tokenizer):
    """A student and a teacher saved with the tokenizer, as a script would name them."""
    return save_student_and_teacher(tmp_path, tokenizer)


def swap_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_completion_length=6,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-2,  # the default 1e-6 would move the tiny student by less than float32 shows
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return NPDDistillationConfig(**{**values, **overrides})


# ---- the config ---------------------------------------------------------------------------------------------------
def test_every_distillation_config_field_exists_with_trls_default():
    ours = {f.name: f for f in dataclasses.fields(NPDDistillationConfig)}
    for theirs in dataclasses.fields(DistillationConfig):
        assert theirs.name in ours, f"DistillationConfig.{theirs.name} is missing"
        mine = ours[theirs.name]
        assert (mine.default, mine.default_factory) == (theirs.default, theirs.default_factory), theirs.name


def test_the_defaults_resolve_to_distillation_trainers_run(tmp_path):
    args = NPDDistillationConfig(output_dir=str(tmp_path), report_to="none")
    assert (args.lmbda, args.seq_kd, args.beta, args.temperature) == (1.0, False, 1.0, 1.0)
    assert (args.max_new_tokens, args.max_length, args.learning_rate, args.disable_dropout) == (512, None, 1e-6, False)
    assert args.generation_backend == "transformers" and args.pad_to_multiple_of is None
    assert args.num_completions_to_print == args.per_device_train_batch_size * args.gradient_accumulation_steps
    vllm = NPDDistillationConfig(output_dir=str(tmp_path), use_vllm=True, vllm_max_model_length=1024)
    assert (vllm.generation_backend, vllm.vllm_mode, vllm.max_length, vllm.generator_mode) == (
        "vllm",
        "colocate",
        1024,
        "thread",
    )


ENTRY = re.compile(r"^(\w+) \(`[^`]+`(?: or `[^`]+`)*, \*optional\*, defaults to `([^`]*)`\):$")


def test_the_docstring_documents_every_field_the_config_declares_with_its_default():
    """TRL's style: `> Parameters that control ...` sections, one entry per field with its real default."""
    entries, section = {}, None
    for line in inspect.getdoc(NPDDistillationConfig).splitlines():
        if line.startswith("> Parameters that control"):
            section = line
        elif section and line and not line.startswith(" "):
            match = ENTRY.match(line)
            assert match, f"not a field entry: {line!r}"
            entries[match.group(1)] = match.group(2)
    hints = typing.get_type_hints(NPDDistillationConfig)
    declared = {
        n for n in inspect.get_annotations(NPDDistillationConfig) if typing.get_origin(hints[n]) is not typing.ClassVar
    }
    assert set(entries) == declared
    fields = {f.name: f.default for f in dataclasses.fields(NPDDistillationConfig)}
    assert {name: ast.literal_eval(default) for name, default in entries.items()} == {
        name: fields[name] for name in entries
    }


REFUSED = [
    ({"lmbda": 0.5}, "lmbda=0.5"),
    ({"seq_kd": True}, "seq_kd=True"),
    ({"top_p": 0.9}, "top_p=0.9"),
    ({"top_k": 10}, "top_k=10"),
    ({"min_p": 0.05}, "min_p=0.05"),
    ({"repetition_penalty": 1.1}, "repetition_penalty=1.1"),
    ({"generation_kwargs": {"do_sample": True, "num_beams": 2}}, "generation_kwargs {'num_beams': 2}"),
    ({"generation_kwargs": '{"length_penalty": -0.1}'}, "generation_kwargs {'length_penalty': -0.1}"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
    ({"vllm_model_impl": "transformers"}, "vllm_model_impl='transformers'"),
    ({"vllm_enable_sleep_mode": True}, "vllm_enable_sleep_mode=True"),
    ({"vllm_structured_outputs_regex": "[0-9]+"}, "vllm_structured_outputs_regex='\\[0-9\\]\\+'"),
    ({"vllm_tensor_parallel_size": 2}, "vllm_tensor_parallel_size=2"),
    ({"use_vllm": True, "vllm_max_model_length": 1024, "max_length": 800}, "vllm_max_model_length=1024"),
    ({"use_vllm": True, "vllm_max_model_length": 256}, "vllm_max_model_length=256 leaves no room"),
    ({"ds3_gather_for_generation": False}, "ds3_gather_for_generation=False"),
    ({"shuffle_dataset": False}, "shuffle_dataset=False"),
    ({"shuffle_dataset": None}, "shuffle_dataset=None"),
    ({"teacher_top_k": 4, "temperature": 0.5}, "teacher_top_k=4 with temperature=0.5"),
    ({"pad_to_multiple_of": 8}, "pad_to_multiple_of=8"),
    ({"max_completion_length": None}, "max_completion_length=None"),
    ({"max_completion_length": 8, "max_new_tokens": 16}, "max_new_tokens=16 and max_completion_length=8"),
    ({"max_tool_calling_iterations": 3}, "max_tool_calling_iterations=3"),
    ({"log_unique_prompts": True}, "log_unique_prompts=True"),
    ({"log_completions": True, "report_to": ["trackio"]}, "log_completions=True with report_to including 'trackio'"),
    ({"parallelism_config": ParallelismConfig(cp_size=2)}, "cp_size > 1"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"), REFUSED, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(REFUSED)]
)
def test_a_field_npd_cannot_honour_is_refused_by_name_when_the_config_is_built(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        NPDDistillationConfig(**{"output_dir": str(tmp_path), "report_to": "none", **kwargs})
    assert re.search(r"\b(Leave|Set|set|Raise|Report)\b", str(error.value)), "the error says what to do"


def test_the_neutral_values_of_the_sampling_knobs_are_accepted(tmp_path):
    args = NPDDistillationConfig(
        output_dir=str(tmp_path),
        report_to="none",
        top_k=None,
        min_p=0.0,
        generation_kwargs='{"do_sample": true, "top_k": 0, "top_p": 1.0, "num_beams": 1}',
        max_new_tokens=512,
    )
    assert args.generation_kwargs["num_beams"] == 1 and args.max_new_tokens == 512
    # keys that restate the config's own values change nothing either
    args = NPDDistillationConfig(
        output_dir=str(tmp_path), report_to="none", generation_kwargs={"max_new_tokens": 512, "temperature": 1.0}
    )
    assert args.generation_kwargs == {"max_new_tokens": 512, "temperature": 1.0}
    with pytest.raises(ValueError, match=re.escape("generation_kwargs {'max_new_tokens': 64}")):
        NPDDistillationConfig(output_dir=str(tmp_path), report_to="none", generation_kwargs={"max_new_tokens": 64})


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ({"use_vllm": True}, 1024),
        ({"generation_backend": "vllm"}, 1024),  # NPD's own name for the same choice
        ({"use_vllm": True, "vllm_mode": "server"}, None),  # TRL reads it for a colocated engine only
        ({}, None),  # and not at all without vLLM
    ],
)
def test_vllm_max_model_length_sets_max_length_for_a_colocated_engine(tmp_path, backend, expected):
    args = NPDDistillationConfig(output_dir=str(tmp_path), report_to="none", vllm_max_model_length=1024, **backend)
    assert args.max_length == expected


def test_a_teacher_loaded_by_name_gets_its_revision_and_the_dtype_gkd_reads(tmp_path):
    args = NPDDistillationConfig(
        output_dir=str(tmp_path),
        teacher_model_revision="v2",
        teacher_model_init_kwargs={"attn_implementation": "eager"},
    )
    kwargs = _teacher_init_kwargs("org/teacher", args)
    assert kwargs == {"attn_implementation": "eager", "revision": "v2", "dtype": None}
    assert args.teacher_model_init_kwargs == {"attn_implementation": "eager"}  # a copy: the caller's is untouched
    assert _teacher_init_kwargs("org/teacher", NPDDistillationConfig(output_dir=str(tmp_path))) is None


# ---- the trainer: refusals ----------------------------------------------------------------------------------------
def multiply(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


def _rows():
    yield from ({"prompt": f"{i}+{i}="} for i in range(4))


TRAINER_REFUSALS = [
    ({"tools": [multiply]}, "tools=\\['multiply'\\] is not supported"),
    ({"quantization_config": object()}, "quantization_config is not supported"),
    ({"train_dataset": IterableDataset.from_generator(_rows)}, "IterableDataset"),
    ({"train_dataset": Dataset.from_list([{"text": "1+1="}])}, "train dataset has no 'prompt' column"),
    ({"eval_dataset": {"held": Dataset.from_list([{"text": "1+1="}])}}, "held dataset has no 'prompt' column"),
    ({"teacher_model": None}, "A teacher is required"),
]


@pytest.mark.parametrize(("kwargs", "message"), TRAINER_REFUSALS, ids=[next(iter(k)) for k, _ in TRAINER_REFUSALS])
def test_what_npd_cannot_train_is_refused_when_the_trainer_is_built(tmp_path, paths, kwargs, message):
    values = dict(model=paths["student"], teacher_model=paths["teacher"], train_dataset=PLAIN)
    with pytest.raises(ValueError, match=message):
        NPDDistillationTrainer(**{**values, **kwargs}, args=swap_config(tmp_path))


def test_trls_own_config_or_the_gkd_drop_ins_is_refused_with_the_import_to_use(tmp_path, paths):
    for args in (
        DistillationConfig(output_dir=str(tmp_path), bf16=False, report_to="none"),
        NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none"),
    ):
        with pytest.raises(TypeError, match="NPDDistillationConfig as DistillationConfig"):
            NPDDistillationTrainer(
                model=paths["student"], teacher_model=paths["teacher"], args=args, train_dataset=PLAIN
            )


# ---- the trainer: what it does --------------------------------------------------------------------------------------
def test_a_distillation_trainer_script_runs_unchanged_with_models_given_by_path(tmp_path, paths):
    """TRL's train-with-eval scenario, as a user's script: models by path, conversational prompts to train on,
    plain ones to evaluate on (also before the first step); then save, reload, and train LoRA adapters on the reloaded
    student with plain prompts, gradient accumulation and the JSD between the two KLs."""
    from peft import LoraConfig

    from trl_npd import NPDDistillationConfig as DistillationConfig
    from trl_npd import NPDDistillationTrainer as DistillationTrainer

    training_args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_completion_length=6,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        eval_on_start=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        teacher_model_init_kwargs={"dtype": "float32"},
    )
    trainer = DistillationTrainer(
        model=paths["student"],
        teacher_model=paths["teacher"],
        args=training_args,
        train_dataset=CONVERSATIONAL,
        eval_dataset=PLAIN,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert training_args.teacher_model_init_kwargs == {"dtype": "float32"}  # the caller's config is untouched
    history = trainer.state.log_history
    assert trainer.state.global_step == 4 and history[-1]["train_loss"] > 0
    logged = {key for entry in history for key in entry}
    assert {"npd/version", "npd/staleness_mean", "npd/policy_kl", "npd/dropped_stale"} <= logged
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [0, 2, 4]
    assert all(entry["eval_loss"] > 0 and 0 < entry[EVAL_LENGTH_METRIC] <= 6 for entry in evaluations)
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    trainer.save_model()
    reloaded = AutoModelForCausalLM.from_pretrained(training_args.output_dir)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trainer.model.state_dict()[name])
    assert AutoTokenizer.from_pretrained(training_args.output_dir).eos_token == "<|im_end|>"

    again = DistillationTrainer(
        model=training_args.output_dir,
        teacher_model=paths["teacher"],
        args=DistillationConfig(
            output_dir=str(tmp_path / "again"),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_completion_length=4,
            max_steps=2,
            learning_rate=1e-2,
            beta=0.5,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=PLAIN,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in again.model.named_parameters()}
    again.train()
    assert again.state.global_step == 2 and again.npd_metrics.totals.consumed_samples == 8
    for name, param in again.model.named_parameters():
        assert torch.equal(before[name], param) != ("lora_" in name), name  # only the adapters move


def test_evaluation_is_the_divergence_on_completions_the_live_student_samples(tmp_path, paths):
    """A teacher equal to the student gives no divergence on anything the student samples; another teacher does.
    Before training, and for each dataset of a dict, as DistillationTrainer.evaluate reports them."""
    evals = {"plain": PLAIN.select(range(4)), "chat": CONVERSATIONAL.select(range(4))}
    self_distilled = NPDDistillationTrainer(
        model=paths["student"], teacher_model=paths["student"], args=swap_config(tmp_path), train_dataset=PLAIN
    )
    metrics = self_distilled.evaluate(eval_dataset=evals)
    assert metrics["eval_plain_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_chat_loss"] == pytest.approx(0.0, abs=1e-6)
    lengths = [value for key, value in metrics.items() if key.endswith("completions/mean_length")]
    assert lengths and all(length > 0 for length in lengths)  # zero because equal, not because nothing was sampled
    distilled = NPDDistillationTrainer(
        model=paths["student"], teacher_model=paths["teacher"], args=swap_config(tmp_path), train_dataset=PLAIN
    )
    metrics = distilled.evaluate(eval_dataset=evals["plain"])
    assert metrics["eval_loss"] > 1e-3 and 0 < metrics[EVAL_LENGTH_METRIC] <= 6
    assert not distilled._generation.active  # the background generator is not involved


def test_the_minimal_call_takes_the_student_teacher_and_dataset_only(tmp_path, paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = NPDDistillationTrainer(model=paths["student"], teacher_model=paths["teacher"], train_dataset=PLAIN)
    assert trainer.args.output_dir.endswith("student-Distillation") and trainer.args.learning_rate == 1e-6
    assert trainer.processing_class.pad_token == "<pad>" and trainer.processing_class.padding_side == "left"


def test_a_completion_ends_at_every_eos_the_students_generation_config_declares(tmp_path, tokenizer):
    student = build_model(tokenizer, hidden_size=32, num_layers=1, seed=1)
    end_of_text = tokenizer.convert_tokens_to_ids("<|im_start|>")
    student.generation_config.eos_token_id = [end_of_text]
    trainer = NPDDistillationTrainer(
        model=student,
        teacher_model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=2),
        args=swap_config(tmp_path),
        train_dataset=PLAIN,
        processing_class=tokenizer,
    )
    sampling = EngineConfig.from_config(trainer.args, trainer.processing_class, trainer.generation_config, "cpu")
    assert sampling.eos_token_id == [tokenizer.eos_token_id, end_of_text]


def _tokenizer_with_bos_and_thinking_switch():
    """A fresh toy tokenizer (the session's is shared), made to add a BOS to plain text and to render
    `enable_thinking=False` differently, so that a collator that dropped `add_special_tokens` or
    `chat_template_kwargs` would give other ids than TRL's."""
    from tokenizers import processors

    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template += "{% if enable_thinking is defined and not enable_thinking %}<|im_end|>{% endif %}"
    assert tokenizer("1+1")["input_ids"] != tokenizer("1+1", add_special_tokens=False)["input_ids"]
    return tokenizer


def test_prompts_and_the_loss_at_a_temperature_are_trls_own(tmp_path, tokenizer):
    """The same prompts tokenize to the same ids as in TRL's DistillationTrainer, plain and conversational with
    chat_template_kwargs; and on the same completions the loss at temperature 2 (beta 0.5) is TRL's."""
    tokenizer = _tokenizer_with_bos_and_thinking_switch()

    def models():
        return build_model(tokenizer, hidden_size=32, num_layers=1, seed=1), build_model(
            tokenizer, hidden_size=64, num_layers=1, seed=2
        )

    shared = dict(output_dir=str(tmp_path), report_to="none", temperature=2.0, beta=0.5, max_completion_length=6)
    chat_kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    student, teacher = models()
    theirs = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**shared, bf16=False, **chat_kwargs),
        train_dataset=PLAIN,
        processing_class=tokenizer,
    )
    student, teacher = models()
    ours = NPDDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=NPDDistillationConfig(**shared, **chat_kwargs),
        train_dataset=PLAIN,
        processing_class=tokenizer,
    )
    for rows in (PLAIN.select(range(3)), CONVERSATIONAL.select(range(3))):
        prompts = [row["prompt"] for row in rows]
        assert extract_prompt_ids(ours.data_collator, list(rows)) == theirs._tokenize_prompts(prompts)[0]
    # both options matter with this tokenizer: without them the ids differ
    plain_ids = extract_prompt_ids(PromptOnlyCollator(tokenizer), [PLAIN[0]])
    assert plain_ids != theirs._tokenize_prompts([PLAIN[0]["prompt"]])[0]
    chat_ids = extract_prompt_ids(PromptOnlyCollator(tokenizer, add_special_tokens=True), [CONVERSATIONAL[0]])
    assert chat_ids != theirs._tokenize_prompts([CONVERSATIONAL[0]["prompt"]])[0]

    prompt = extract_prompt_ids(ours.data_collator, [PLAIN[0]])[0]
    completions = [[20, 31, 42, tokenizer.eos_token_id], [55, 66]]
    batch = pad_sequences(
        [Sequence(input_ids=prompt + c, labels=[IGNORE_INDEX] * len(prompt) + c) for c in completions],
        tokenizer.pad_token_id,
    )
    ours.model.eval()
    with torch.no_grad():
        our_loss = ours.compute_loss(ours.model, batch)
    completion_ids = torch.tensor([completions[0], completions[1] + [tokenizer.pad_token_id] * 2])
    trl_inputs = {
        "prompt_ids": torch.tensor([prompt, prompt]),
        "prompt_mask": torch.ones(2, len(prompt), dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
    }
    theirs.model.eval()
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, trl_inputs)
    torch.testing.assert_close(our_loss, their_loss, rtol=1e-4, atol=1e-6)
    ours.temperature = 1.0  # the divergence at temperature 1 (GKD's) is another number: the check can fail
    with torch.no_grad():
        at_one = ours.compute_loss(ours.model, batch)
    assert not torch.allclose(at_one, their_loss, rtol=1e-3)

    # the GKD drop-in samples at its temperature and, as GKDTrainer, takes the divergence at 1
    student, teacher = models()
    gkd_args = NearPolicyDistillConfig(
        output_dir=str(tmp_path), report_to="none", temperature=2.0, beta=0.5, max_new_tokens=6, lmbda=1.0, bf16=False
    )
    gkd_dropin = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=gkd_args, train_dataset=PLAIN, processing_class=tokenizer
    )
    gkd_dropin.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gkd_dropin.compute_loss(gkd_dropin.model, batch), at_one, rtol=1e-4, atol=1e-6)


def test_neither_trainer_prints_gkds_notice_to_migrate_to_distillation_trainer(tmp_path, tokenizer, caplog):
    """At lmbda=1 and temperature=1, GKDTrainer says DistillationTrainer covers the run; the swap (whose defaults
    are exactly that) and the GKD drop-in say nothing of it, GKDTrainer itself still does."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def student_and_teacher():
        return {
            "model": build_model(tokenizer, hidden_size=32, num_layers=1, seed=1),
            "teacher_model": build_model(tokenizer, hidden_size=32, num_layers=1, seed=2),
            "processing_class": tokenizer,
        }

    covered = {"output_dir": str(tmp_path), "report_to": "none", "lmbda": 1.0, "temperature": 1.0}
    with caplog.at_level(logging.WARNING):
        NPDDistillationTrainer(**student_and_teacher(), args=swap_config(tmp_path), train_dataset=PLAIN)
        NearPolicyDistillTrainer(
            **student_and_teacher(), args=NearPolicyDistillConfig(**covered, bf16=False), train_dataset=PLAIN
        )
    assert not [r for r in caplog.records if "Consider migrating" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        GKDTrainer(**student_and_teacher(), args=GKDConfig(**covered, bf16=False), train_dataset=PLAIN)
    assert [r for r in caplog.records if "Consider migrating" in r.getMessage()]


def test_trl_npd_distillation_takes_the_flags_of_trls_distillation_script(tmp_path, paths):
    from trl_npd.cli import main

    PLAIN.save_to_disk(str(tmp_path / "data"))
    output_dir = tmp_path / "cli"
    main(
        [
            "distillation",
            "--model_name_or_path", paths["student"],
            "--teacher_model_name_or_path", paths["teacher"],
            "--dataset_name", str(tmp_path / "data"),
            "--output_dir", str(output_dir),
            "--max_steps", "2",
            "--per_device_train_batch_size", "2",
            "--max_completion_length", "4",
            "--learning_rate", "1e-2",
            "--chat_template_kwargs", '{"enable_thinking": false}',
            "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
            "--report_to", "none",
            "--save_strategy", "no",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert (output_dir / "adapter_model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "trl-npd" in card and "distillation" in card
    with pytest.raises(ValueError, match=r"top_p=0\.9 is not supported"):
        main(
            [
                "distillation",
                "--model_name_or_path",
                paths["student"],
                "--output_dir",
                str(output_dir),
                "--top_p",
                "0.9",
            ]
        )
