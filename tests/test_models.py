"""The model matrix: tiny models of many architectures train a few steps at the defaults, save and reload; and what
a model cannot do with a config is refused when the trainer is built.

Each matrix row records the paths the trainer took, observed while it trained: whether the batches that reached
`compute_loss` were packed (`position_ids`, no attention mask) or padded, and which loss kernel ran. docs/index.md's
architecture table must hold exactly these rows; rewrite it from a run with

    NPD_WRITE_MODEL_TABLE=1 pytest tests/test_models.py -k matrix

Only sizes are scaled down (steps, batch, completion length); every path-deciding setting is the config default
(`padding_free`, `use_fused_loss`, `ifd_filter`, `lmbda`, bf16 resolved from the hardware). Three rows use the
default process generator, which costs a process start each, without the start-up bootstrap: a three-step run
would otherwise be sampled inline before the process (pickling, sampling and scoring the architecture there) has
served anything. The others use a thread, which runs the same stages.
"""

import logging
import math
import os
import re

import pytest
import torch
from datasets import Dataset
from tiny_models import build as build_tiny
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
from trl_npd import fused_jsd as fused_jsd_module
from trl_npd import losses as losses_module
from trl_npd.heads import logit_transform

DOCS_INDEX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "index.md")
TABLE_START, TABLE_END = "<!-- model-matrix:start -->", "<!-- model-matrix:end -->"
TABLE_HEADER = (
    "| Student | Teacher | Logit transform (student / teacher) | Training batches | Loss kernel | Generator |\n"
    "|---|---|---|---|---|---|"
)

# (student, teacher, generator_mode)
MATRIX = [
    ("Llama", "Llama", "process"),
    ("Qwen3", "Qwen3", "thread"),
    ("Qwen3-MoE", "Qwen3-MoE", "thread"),
    ("Gemma 2", "Gemma 2", "process"),
    ("Gemma 3", "Gemma 3", "thread"),
    ("GPT-2", "GPT-2", "thread"),
    ("GPT-NeoX", "GPT-NeoX", "thread"),
    ("OPT", "OPT", "thread"),
    ("Phi-3", "Phi-3", "thread"),
    ("Falcon", "Falcon", "thread"),
    ("Bloom", "Bloom", "process"),
    ("MPT", "MPT", "thread"),
    ("Cohere", "Cohere", "thread"),
    ("Granite", "Granite", "thread"),
    ("Qwen3", "Gemma 2", "thread"),  # across architectures: a plain student, a soft-capped teacher
]


class ObservingTrainer(NearPolicyDistillTrainer):
    """Records how each training batch reached the loss: packed or padded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_kinds = set()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            packed = inputs.get("position_ids") is not None and inputs.get("attention_mask") is None
            self.batch_kinds.add("packed" if packed else "padded")
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def spy_on_loss_kernels(monkeypatch):
    """Names of the loss kernels that run, in this process: Liger's, NPD's chunked one, or the plain path."""
    ran = set()

    class LigerSpy(fused_jsd_module.LigerFusedLinearJSDLoss):
        def forward(self, *args):
            ran.add("Liger fused-linear JSD")
            return super().forward(*args)

    chunked = fused_jsd_module.chunked_sum
    plain = losses_module.generalized_jsd_sum

    def transformed_spy(*args, **kwargs):
        ran.add("NPD chunked JSD (transformed logits)")
        return chunked(*args, **kwargs)

    def plain_spy(*args, **kwargs):
        ran.add("plain JSD (full logits)")
        return plain(*args, **kwargs)

    monkeypatch.setattr(fused_jsd_module, "LigerFusedLinearJSDLoss", LigerSpy)
    monkeypatch.setattr(fused_jsd_module, "chunked_sum", transformed_spy)
    monkeypatch.setattr(losses_module, "generalized_jsd_sum", plain_spy)
    return ran


def documented_rows():
    with open(DOCS_INDEX) as f:
        text = f.read()
    match = re.search(re.escape(TABLE_START) + r"(.*?)" + re.escape(TABLE_END), text, re.S)
    assert match, f"docs/index.md has no {TABLE_START} ... {TABLE_END} table"
    return [line for line in match.group(1).strip().splitlines()[2:] if line.startswith("|")]


@pytest.fixture(scope="module")
def observed_rows():
    rows = {}
    yield rows
    if os.environ.get("NPD_WRITE_MODEL_TABLE") and len(rows) == len(MATRIX):
        ordered = [rows[entry] for entry in MATRIX]
        with open(DOCS_INDEX) as f:
            text = f.read()
        table = "\n".join([TABLE_START, TABLE_HEADER, *ordered, TABLE_END])
        pattern = re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END)
        with open(DOCS_INDEX, "w") as f:
            f.write(re.sub(pattern, lambda _: table, text, flags=re.S))


@pytest.mark.parametrize(
    ("student_name", "teacher_name", "mode"),
    MATRIX,
    ids=[f"matrix-{s}-{t}".replace(" ", "") for s, t, _ in MATRIX],
)
def test_matrix_trains_at_the_defaults_and_reloads(
    tmp_path, tokenizer, dataset, monkeypatch, observed_rows, student_name, teacher_name, mode
):
    student = build_tiny(student_name, tokenizer, seed=1)
    teacher = build_tiny(teacher_name, tokenizer, seed=2)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    kernels = spy_on_loss_kernels(monkeypatch)
    args = NearPolicyDistillConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=2,
        max_new_tokens=8,
        generator_mode=mode,
        generator_bootstrap=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    assert args.bf16 is False  # resolved from this CPU-only machine, not passed
    trainer = ObservingTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    assert trainer.state.global_step == 3
    if trainer.npd_metrics.totals.consumed_samples:  # lmbda 0.5: on-policy steps are drawn at random
        assert trainer.npd_metrics.totals.generator_busy_s > 0  # and the generator (not the trainer) sampled them
    assert any(not torch.equal(before[name], p) for name, p in student.named_parameters()), "nothing trained"
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    assert type(reloaded) is type(student)
    ids = tokenizer("<|im_start|>user\nWhat is 2+2?<|im_end|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
        generated = reloaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > ids.shape[1]

    transforms = f"{logit_transform(student)} / {logit_transform(teacher)}"
    row = (
        f"| {student_name} ({type(student).__name__}) | {teacher_name} | {transforms} | "
        f"{', '.join(sorted(trainer.batch_kinds))} | {', '.join(sorted(kernels))} | {mode} |"
    )
    observed_rows[(student_name, teacher_name, mode)] = row
    if not os.environ.get("NPD_WRITE_MODEL_TABLE"):
        assert row in documented_rows(), (
            f"docs/index.md's architecture table does not show what this run observed:\n{row}\n"
            "Rewrite it with NPD_WRITE_MODEL_TABLE=1 pytest tests/test_models.py -k matrix"
        )


# ---- refused when the trainer is built, never mid-run ----------------------------------------------------------
def npd_config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", max_new_tokens=8)
    return NearPolicyDistillConfig(**{**values, **overrides})


def build_trainer(student, teacher, tokenizer, dataset, args, **kwargs):
    return NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs
    )


class DoubledLogits(Qwen3ForCausalLM):
    """A model whose forward changes its logits in a way no config field names."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({}, "use_fused_loss=True"), ({"use_fused_loss": False, "ifd_filter": True}, "ifd_filter=True")],
    ids=["fused-loss", "ifd-scoring-only"],
)
def test_a_trained_copy_of_the_lm_head_is_refused_at_construction(
    tmp_path, student, teacher, tokenizer, dataset, overrides, named
):
    from peft import LoraConfig

    def adapter():  # TRL itself refuses lm_head in target_modules; a trained copy of it gets this far
        return LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])

    with pytest.raises(ValueError, match="modules_to_save") as refused:
        build_trainer(student, teacher, tokenizer, dataset, npd_config(tmp_path, **overrides), peft_config=adapter())
    assert f"The student cannot run {named}:" in str(refused.value)
    # the plain path reads the adapted head through the model's own forward
    plain = npd_config(tmp_path, use_fused_loss=False, ifd_filter=False)
    build_trainer(student, teacher, tokenizer, dataset, plain, peft_config=adapter())


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_logit_change_the_config_does_not_name_is_refused_at_construction(
    tmp_path, student, teacher, tokenizer, dataset, role
):
    doubled = DoubledLogits(student.config if role == "student" else teacher.config)
    models = (doubled, teacher) if role == "student" else (student, doubled)
    with pytest.raises(ValueError, match=f"The {role} .*differs from the logits of its own forward by 50.0%"):
        build_trainer(*models, tokenizer, dataset, npd_config(tmp_path))
    build_trainer(*models, tokenizer, dataset, npd_config(tmp_path, use_fused_loss=False, ifd_filter=False))
    if role == "teacher":  # the top-k objective projects the teacher too
        with pytest.raises(ValueError, match="cannot run teacher_top_k=4"):
            build_trainer(*models, tokenizer, dataset, npd_config(tmp_path, use_fused_loss=False, teacher_top_k=4))


def test_float32_models_train_under_bf16_autocast(tmp_path, student, teacher, tokenizer, dataset):
    """With bf16 (here CPU autocast, as on a GPU by default), accelerate runs the prepared teacher's forward under
    autocast from construction on. The probes measure the model's own forward, so a float32 teacher is neither
    refused nor kept from packing for bf16 rounding, and a real logit change is still refused."""
    assert next(teacher.parameters()).dtype == torch.float32
    args = npd_config(tmp_path, use_cpu=True, bf16=True, max_steps=2, per_device_train_batch_size=4, logging_steps=1)
    trainer = build_trainer(student, teacher, tokenizer, dataset, args)
    assert hasattr(trainer.teacher_model, "_original_forward")  # the premise: the teacher's forward is autocast
    with torch.no_grad():
        ids = torch.randint(3, 500, (1, 8))
        autocast = trainer.teacher_model(input_ids=ids).logits.float()
        own = trainer.teacher_model._original_forward(input_ids=ids).logits
    assert (autocast - own).abs().max() > 1e-3 * own.abs().max()  # beyond the float32 tolerance the probes use
    assert trainer._batches.pack  # packing was not switched off for the rounding
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    doubled = DoubledLogits(teacher.config)
    with pytest.raises(ValueError, match=r"The teacher .*differs from the logits of its own forward by"):
        build_trainer(student, doubled, tokenizer, dataset, npd_config(tmp_path, use_cpu=True, bf16=True))


def test_settings_a_model_cannot_run_are_refused_at_construction(tmp_path, student, teacher, tokenizer, dataset):
    vocab = teacher.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=f"teacher_top_k={vocab + 1} is larger than the teacher's vocabulary"):
        build_trainer(student, teacher, tokenizer, dataset, npd_config(tmp_path, teacher_top_k=vocab + 1))

    moe = [build_tiny("Qwen3-MoE", tokenizer, seed=seed) for seed in (1, 2)]
    with pytest.raises(ValueError, match="no router load-balancing term"):
        build_trainer(*moe, tokenizer, dataset, npd_config(tmp_path, router_aux_loss_coef=0.01))
    build_trainer(*moe, tokenizer, dataset, npd_config(tmp_path))
    assert moe[0].config.output_router_logits is False  # SFTTrainer had switched them on; nothing uses them


def _gpt2_pair(tokenizer):
    """A student with 48 learned positions and a teacher with 40: the teacher's table is the limit."""
    student = build_tiny("GPT-2", tokenizer, seed=1, n_positions=48)
    return student, build_tiny("GPT-2", tokenizer, seed=2, n_positions=40)


@pytest.mark.parametrize("max_length", [64, None])
def test_a_max_length_past_learned_positions_is_lowered_to_them_with_a_warning(
    tmp_path, tokenizer, dataset, caplog, max_length
):
    with caplog.at_level(logging.WARNING, logger="trl_npd.checks"):
        args = npd_config(tmp_path, max_length=max_length)
        trainer = build_trainer(*_gpt2_pair(tokenizer), tokenizer, dataset, args)
    assert trainer.args.max_length == 40
    assert trainer.data_collator.max_length == 40  # GKD's collator, made from the value asked for
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "trl_npd.checks"]
    assert "the teacher's learned position embeddings (GPT2LMHeadModel: 40 positions)" in warning
    assert "max_length is lowered to 40" in warning

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_npd.checks"):
        trainer = build_trainer(*_gpt2_pair(tokenizer), tokenizer, dataset, npd_config(tmp_path, max_length=40))
    assert trainer.args.max_length == 40  # a max_length that fits is kept, silently
    assert not [r for r in caplog.records if r.name == "trl_npd.checks"]

    # max_new_tokens that leaves no room for a prompt in the teacher's table is still refused
    args = npd_config(tmp_path, max_length=max_length, max_new_tokens=40)
    with pytest.raises(ValueError, match="max_new_tokens=40 does not fit the teacher's context of 40 positions"):
        build_trainer(*_gpt2_pair(tokenizer), tokenizer, dataset, args)


@pytest.mark.parametrize(("lmbda", "seq_kd"), [(0.5, False), (0.0, True)], ids=["npd", "seq_kd"])
def test_with_a_lowered_max_length_nothing_runs_past_the_learned_positions(tmp_path, tokenizer, lmbda, seq_kd):
    """Conversations far longer than 40 tokens, on- and off-policy or with the teacher's generations: prompts are
    cut from the left to max_length - max_new_tokens for sampling, off-policy samples to max_length, and no forward
    (sampling, scoring, training, either model) asks for a position past the teacher's 40."""
    # a completion that fills the window alone would leave GKD's collator no prompt: long questions, short answers
    question = " ".join(f"{i}+{i}" for i in range(30))
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "0"}]}] * 16
    student, teacher = _gpt2_pair(tokenizer)
    positions = []  # inline sampling uses the student itself, so the hooks see sampling's positions too
    for model in (student, teacher):
        model.transformer.wpe.register_forward_hook(lambda module, args, output: positions.append(int(args[0].max())))
    args = npd_config(
        tmp_path,
        max_length=64,
        max_new_tokens=8,
        max_steps=6,
        per_device_train_batch_size=2,
        lmbda=lmbda,
        seq_kd=seq_kd,
        generator_mode="inline",
    )
    trainer = build_trainer(student, teacher, tokenizer, Dataset.from_list(rows), args)
    trainer.train()  # a position past a table is an IndexError on a CPU
    assert max(positions) == 39  # the full 40 positions were used, and none past them
    totals = trainer.npd_metrics.totals
    if not seq_kd:
        assert totals.truncated_prompts > 0 and totals.received_samples > 0  # sampled, from prompts cut to 32 tokens


def test_off_policy_rows_from_a_callers_collator_are_cut_to_the_lowered_max_length(tmp_path, tokenizer, caplog):
    """A collator the caller passed keeps its own (longer) limit; the trainer cuts what it hands over to the last
    max_length tokens, with a warning, so no forward runs past the teacher's 40 positions."""
    from trl.experimental.utils import DataCollatorForChatML

    question = " ".join(f"{i}+{i}" for i in range(30))
    rows = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "0 1"}]}] * 8
    student, teacher = _gpt2_pair(tokenizer)
    positions = []
    for model in (student, teacher):
        model.transformer.wpe.register_forward_hook(lambda module, args, output: positions.append(int(args[0].max())))
    collator = DataCollatorForChatML(tokenizer, max_length=200)
    args = npd_config(tmp_path, max_length=64, max_new_tokens=8, max_steps=2, per_device_train_batch_size=2, lmbda=0.0)
    with caplog.at_level(logging.WARNING, logger="trl_npd.step_batches"):
        trainer = build_trainer(student, teacher, tokenizer, Dataset.from_list(rows), args, data_collator=collator)
        assert trainer.data_collator is collator and collator.max_length == 200  # the caller's settings are kept
        trainer.train()  # a position past a table is an IndexError on a CPU
    assert max(positions) == 39
    cut = [r.getMessage() for r in caplog.records if "off-policy samples of this batch" in r.getMessage()]
    assert len(cut) == 1 and "longer than max_length=40 tokens" in cut[0]  # once per train()


def test_gkds_migration_notice_is_not_shown_for_npd(tmp_path, student, teacher, tokenizer, dataset, caplog):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # the setting for which GKDTrainer says DistillationTrainer covers the run
    covered = {"lmbda": 1.0, "temperature": 1.0}
    with caplog.at_level(logging.WARNING):
        build_trainer(student, teacher, tokenizer, dataset, npd_config(tmp_path, **covered))
    assert not [r for r in caplog.records if "Consider migrating" in r.getMessage()]
    caplog.clear()
    gkd_args = GKDConfig(output_dir=str(tmp_path / "gkd"), report_to="none", bf16=False, **covered)
    with caplog.at_level(logging.WARNING):
        GKDTrainer(
            model=student, teacher_model=teacher, args=gkd_args, train_dataset=dataset, processing_class=tokenizer
        )
    assert [r for r in caplog.records if "Consider migrating" in r.getMessage()]  # GKD itself still says it
