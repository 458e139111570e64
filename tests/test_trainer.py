"""End-to-end behaviour of NearPolicyDistillTrainer on tiny local models."""

import json
import logging
import math
import os
import time
from collections import Counter

import pytest
import torch
from datasets import Dataset
from helpers import ExplodingGenerateModel, live_workers
from transformers import TrainerCallback

from trl_npd import GeneratorError, NearPolicyDistillTrainer
from trl_npd.divergences import generalized_jsd_sum
from trl_npd.toy import build_model

NPD_METRICS = {
    "npd/staleness_mean",
    "npd/staleness_max",
    "npd/dropped_stale",
    "npd/buffer_size",
    "npd/wait_s",
    "npd/gen_samples_per_s",
    "npd/gen_tokens_per_s",
    "npd/policy_kl",
    "npd/version",
    "npd/weight_sync_s",
}


class RecordingTrainer(NearPolicyDistillTrainer):
    """Records, for every training micro-batch that reaches compute_loss, the step and its rows' policy steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            policy_steps = inputs["policy_step"].tolist() if "policy_step" in inputs else None
            self.seen.append(
                {
                    "step": self.state.global_step,
                    "policy_steps": policy_steps,
                    "inputs": inputs,
                    "num_items_in_batch": num_items_in_batch,
                }
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def trainer_for(student, teacher, tokenizer, dataset, args, cls=RecordingTrainer, **kwargs):
    return cls(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs
    )


def test_fused_loss_compile_is_resolved_when_the_trainer_is_built(
    student, teacher, tokenizer, dataset, make_config, monkeypatch
):
    """`None` (compile on CUDA only) is decided once, from the device, and every loss call is given that bool."""
    from trl_npd import trainer as trainer_module

    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(max_steps=2, generator_mode="inline"))
    resolved = trainer._compile_fused_loss
    assert resolved is (trainer.args.device.type == "cuda")
    given = []
    loss = trainer_module.distillation_loss

    def recording(*args, **kwargs):
        given.append(kwargs["compiled"])
        return loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "distillation_loss", recording)
    # the config is not read again while training: were it, the loss would now be compiled (or not) the other way
    trainer.args.fused_loss_compile = not resolved
    trainer.train()
    assert given and all(compiled is resolved for compiled in given), given


def test_trains_in_a_background_process_within_the_staleness_bound_and_logs_npd_metrics(
    student, teacher, tokenizer, dataset, make_config
):
    threads_before, children_before = live_workers()
    # generation batches of 8 against micro-batches of 4: leftovers exercise the accounting at shutdown
    args = make_config(max_steps=12, weight_sync_steps=2, max_staleness=2, generation_batch_size=8, buffer_size=16)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.train()

    assert trainer.state.global_step == 12
    staleness = [step - p for record in trainer.seen for p in record["policy_steps"] for step in [record["step"]]]
    assert len(staleness) == 12 * 4  # every micro-batch was on-policy (lmbda=1)
    assert max(staleness) <= 2  # the bound holds on every consumed sample
    totals = trainer.npd_metrics.totals
    assert totals.consumed_samples == 48
    assert totals.weight_syncs == {"schedule": 6}  # every weight_sync_steps=2 of 12 steps
    # nothing silently lost: every sample the generator set out to make was trained on, dropped, or unused at the end
    assert totals.generated_samples == totals.accounted() > totals.consumed_samples
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert NPD_METRICS <= logged
    versions = [entry["npd/version"] for entry in trainer.state.log_history if "npd/version" in entry]
    assert versions == sorted(versions) and versions[-1] == 6
    assert live_workers() == (threads_before, children_before)  # no thread or process outlives train()


def test_while_the_generator_process_starts_the_trainer_samples_its_own_batches_and_then_only_trains(
    student, teacher, tokenizer, dataset, make_config
):
    class SlowOptimizer(TrainerCallback):
        """Steps slow enough that the generator process starts, seconds in, long before training ends."""

        def on_step_end(self, *args, **kwargs):
            time.sleep(0.4)

    threads_before, children_before = live_workers()
    args = make_config(max_steps=24, generator_bootstrap=True, log_samples=True)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.add_callback(SlowOptimizer())
    trainer.train()

    totals = trainer.npd_metrics.totals
    assert totals.consumed_samples == 24 * 4
    assert 0 < totals.bootstrap_samples < totals.received_samples  # the trainer started, then the process took over
    assert totals.generated_samples == totals.accounted()  # the trainer's own samples are accounted for too
    with open(os.path.join(args.output_dir, "npd_samples.jsonl")) as f:
        trained = [json.loads(line) for line in f if '"trained"' in line]
    # the trainer's own samples come from a side stream of the prompts (position -1), with its live weights...
    from_trainer = [i for i, x in enumerate(trained) if x["stream_position"] == -1]
    assert len(from_trainer) == totals.bootstrap_samples
    assert all(trained[i]["staleness"] <= 1 for i in from_trainer)  # sampled at the step they trained (or the next)
    # ...and once the generator's first batch arrived, the trainer sampled nothing more
    assert max(from_trainer) < min(i for i, x in enumerate(trained) if x["stream_position"] >= 0)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"npd/bootstrap_samples", "npd/bootstrap_s"} <= logged
    assert live_workers() == (threads_before, children_before)


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_generator_crash_surfaces_in_the_trainer_with_its_cause(tokenizer, teacher, dataset, make_config, mode):
    threads_before, children_before = live_workers()
    student = ExplodingGenerateModel(build_model(tokenizer, hidden_size=32, num_layers=2).config)
    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(generator_mode=mode))
    start = time.monotonic()
    with pytest.raises(GeneratorError, match="boom: the generator's model failed while sampling"):
        trainer.train()
    assert time.monotonic() - start < 60  # spawn start-up plus one poll, not a hang
    assert live_workers() == (threads_before, children_before)


class InterruptAt(TrainerCallback):
    def __init__(self, step, exception):
        self.step, self.exception = step, exception

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise self.exception


@pytest.mark.parametrize("exception", [KeyboardInterrupt(), RuntimeError("user callback failed")])
def test_interrupt_or_error_mid_training_stops_the_generator(
    student, teacher, tokenizer, dataset, make_config, exception
):
    threads_before, children_before = live_workers()
    trainer = trainer_for(
        student, teacher, tokenizer, dataset, make_config(max_steps=50), callbacks=[InterruptAt(2, exception)]
    )
    with pytest.raises(type(exception)):
        trainer.train()
    assert trainer._generation.pipeline is None
    assert live_workers() == (threads_before, children_before)


def test_loss_is_normalized_by_completion_tokens_across_gradient_accumulation(
    student, teacher, tokenizer, dataset, make_config
):
    """One optimizer step over 2 micro-batches: the gradient must be that of (sum of per-token JSD over both) /
    (completion tokens of both), recomputed here from the exact batches that were trained on."""
    reference_student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    reference_student.load_state_dict(student.state_dict())
    grads = {}

    class CaptureGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    args = make_config(
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        generator_mode="inline",
        max_grad_norm=0.0,
        max_new_tokens=12,
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args, callbacks=[CaptureGradients()])
    trainer.train()

    batches = [record["inputs"] for record in trainer.seen]
    assert len(batches) == 2
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert all(int(record["num_items_in_batch"]) == total for record in trainer.seen)
    teacher.eval()
    loss = 0.0
    for b in batches:
        layout = {k: b[k] for k in ("attention_mask", "position_ids") if k in b}  # padded or packed rows
        s = reference_student(input_ids=b["input_ids"], use_cache=False, **layout).logits
        with torch.no_grad():
            t = teacher(input_ids=b["input_ids"], use_cache=False, **layout).logits
        labels = b["labels"][:, 1:]
        loss = loss + generalized_jsd_sum(s[:, :-1], t[:, :-1], labels != -100, beta=args.beta)
    (loss / total).backward()
    assert grads.keys() == {name for name, _ in reference_student.named_parameters()}
    for name, param in reference_student.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)


def test_gkd_script_flow_train_evaluate_checkpoint_and_resume(
    student, teacher, tokenizer, dataset, make_config, tmp_path
):
    """What TRL's gkd.py does, with lmbda=0.5: train, evaluate, save checkpoints, resume from the last one. On
    resume the generator starts from the restored weights, versions continue, and the prompt stream goes on."""
    args = make_config(
        lmbda=0.5,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        weight_sync_steps=2,
        max_staleness=4,
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args, eval_dataset=dataset.select(range(8)))
    trainer.train()
    on_policy = [r for r in trainer.seen if r["policy_steps"] is not None]
    off_policy = [r for r in trainer.seen if r["policy_steps"] is None]
    assert on_policy and off_policy  # lmbda=0.5 mixes student samples and dataset completions
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    with open(os.path.join(args.output_dir, "checkpoint-8", "npd_state.json")) as f:
        saved = json.load(f)
    assert saved["policy_version"] == trainer.npd_metrics.totals.weight_syncs["schedule"] == 4  # 8 / 2
    assert saved["stream_positions"][0] > 0

    resumed_student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=99)  # weights come from the checkpoint
    args = make_config(
        lmbda=1.0,
        max_steps=10,
        save_strategy="steps",
        save_steps=4,
        weight_sync_steps=2,
        max_staleness=4,
        output_dir=args.output_dir,
    )
    resumed = trainer_for(resumed_student, teacher, tokenizer, dataset, args)
    resumed.train(resume_from_checkpoint=True)
    first = resumed.seen[0]
    assert first["step"] == 8 and set(first["policy_steps"]) == {8}
    # the generator sampled with the restored weights: its behaviour log-probs are the current student's
    history = [e for e in resumed.state.log_history if "npd/policy_kl" in e and e["step"] == 10]
    assert history and history[0]["npd/policy_kl"] < 1e-3
    assert resumed.state.log_history[-2]["npd/version"] >= saved["policy_version"] + 1
    with open(os.path.join(args.output_dir, "checkpoint-10", "npd_state.json")) as f:
        assert json.load(f)["stream_positions"][0] > saved["stream_positions"][0]


def test_prompts_too_long_for_max_length_are_truncated_and_counted(student, teacher, tokenizer, make_config):
    long_question = " ".join(f"{i}+{i}" for i in range(60))
    rows = [{"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "0"}]}] * 4
    args = make_config(max_steps=2, max_length=40, max_new_tokens=8, generator_mode="inline")
    trainer = trainer_for(student, teacher, tokenizer, Dataset.from_list(rows), args)
    trainer.train()
    assert trainer.npd_metrics.totals.truncated_prompts > 0
    for record in trainer.seen:
        assert record["inputs"]["input_ids"].shape[1] <= 40


def test_prompt_only_dataset_trains_fully_on_policy_in_a_thread(student, teacher, tokenizer, make_config):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(16)]
    threads_before, children_before = live_workers()
    trainer = trainer_for(student, teacher, tokenizer, Dataset.from_list(rows), make_config(generator_mode="thread"))
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(record["policy_steps"] is not None for record in trainer.seen)
    assert live_workers() == (threads_before, children_before)


def test_policy_drift_above_max_policy_kl_refreshes_the_snapshot_early(
    student, teacher, tokenizer, dataset, make_config
):
    args = make_config(
        generator_mode="thread", weight_sync_steps=100, max_staleness=100, max_policy_kl=1e-12, learning_rate=1e-2
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.train()
    totals = trainer.npd_metrics.totals
    # the scheduled sync (every 100 steps) never comes in 6 steps: every refresh is a drift refresh
    assert set(totals.weight_syncs) == {"drift"} and totals.weight_syncs["drift"] >= 5
    logged = [entry["npd/drift_refreshes"] for entry in trainer.state.log_history if "npd/drift_refreshes" in entry]
    assert sum(logged) == totals.weight_syncs["drift"]  # each logging window counts its own


def test_without_max_policy_kl_only_the_schedule_refreshes(student, teacher, tokenizer, dataset, make_config):
    args = make_config(generator_mode="inline", weight_sync_steps=3, max_staleness=3)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.train()
    assert trainer.npd_metrics.totals.weight_syncs == {"schedule": 2}


def test_the_on_policy_draw_depends_on_seed_step_and_micro_batch_only(
    student, teacher, tokenizer, dataset, make_config
):
    """Every rank must draw alike (their collectives line up on it), whatever else consumed Python's RNG."""
    import random

    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(lmbda=0.5))

    def draws():
        return [(trainer._is_on_policy(0), trainer._is_on_policy(1)) for trainer.state.global_step in range(40)]

    random.seed(1)
    first = draws()
    random.seed(2)
    random.random()
    assert draws() == first
    assert 0.3 < sum(a + b for a, b in first) / 80 < 0.7  # still a fair coin with lmbda = 0.5
    assert [a for a, _ in first] != [b for _, b in first]  # micro-batches of one step draw independently


def test_a_snapshot_older_than_the_bound_is_refreshed_instead_of_starving(
    student, teacher, tokenizer, dataset, make_config
):
    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(generator_mode="thread"))
    try:
        trainer._start_generation()
        trainer.state.global_step = 50  # as if the sync schedule had been bypassed: every sample would be stale
        batch = trainer._on_policy_batch()
        assert set(batch["policy_step"].tolist()) == {50}
        assert trainer.npd_metrics.totals.weight_syncs == {"stale_snapshot": 1}
    finally:
        trainer._generation.stop(raise_failure=True)


@pytest.mark.parametrize("max_staleness", [8, 12])
def test_at_the_default_sizes_a_generator_far_ahead_of_the_trainer_loses_nothing_to_staleness(
    student, teacher, tokenizer, dataset, make_config, max_staleness
):
    class SlowOptimizer(TrainerCallback):
        """A slow optimizer step, so the generator always runs ahead and the buffer stays full."""

        def on_step_end(self, *args, **kwargs):
            time.sleep(0.15)

    # weight_sync_steps=4; sizes left to NPD: at max_staleness 12 the batch is 3 steps' worth (the former rule's 4
    # went stale)
    args = make_config(max_steps=24, max_new_tokens=4, max_staleness=max_staleness)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.add_callback(SlowOptimizer())
    trainer.train()
    totals = trainer.npd_metrics.totals
    assert totals.dropped["stale"] == 0
    # the generator really was ahead: samples waited in the buffer almost as long as the bound allows
    assert args.weight_sync_steps <= totals.max_staleness_seen <= args.max_staleness


def test_generation_overlaps_training_in_wall_clock(tokenizer, dataset, make_config):
    """With the generator in its own process, the time both sides spent busy must clearly exceed the wall time they
    took together: they ran side by side, not one after the other. Measured after the first sample arrived, so the
    process start-up does not count either way."""
    student = build_model(tokenizer, hidden_size=96, num_layers=2, seed=1)
    teacher = build_model(tokenizer, hidden_size=192, num_layers=2, seed=2)
    args = make_config(max_steps=24, per_device_train_batch_size=8, max_new_tokens=32, logging_steps=10**6)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args, cls=NearPolicyDistillTrainer)
    trainer.train()
    totals = trainer.npd_metrics.totals
    steady_wall_s = trainer.state.log_history[-1]["train_runtime"] - totals.first_sample_wait_s
    train_busy_s = steady_wall_s - (totals.wait_s - totals.first_sample_wait_s)
    assert totals.generator_busy_s + train_busy_s > 1.3 * steady_wall_s, (
        totals.generator_busy_s,
        train_busy_s,
        steady_wall_s,
    )


def test_peft_config_trains_only_the_adapters_and_the_generator_follows(
    student, teacher, tokenizer, dataset, make_config, tmp_path
):
    from peft import LoraConfig

    class CheckSnapshot(RecordingTrainer):
        """After each publish, the generator's snapshot must equal the live adapted student, adapters included."""

        published = 0

        def _start_generation(self):
            super()._start_generation()
            publish = self._generation.publish

            def checked(student, step, reason):  # each publish of the session, then the check
                publish(student, step, reason)
                self.check_snapshot()

            self._generation.publish = checked

        def check_snapshot(self):
            snapshot = self._generation.pipeline._snapshot.model.state_dict()
            live = self.accelerator.unwrap_model(self.model).state_dict()
            assert snapshot.keys() == live.keys() and any("lora_" in k for k in live)
            assert all(torch.equal(snapshot[k], live[k].detach().cpu()) for k in live)
            # and the generator's log-probs are the adapted student's on the same input
            ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
            with torch.no_grad():
                generator_lps = self._generation.pipeline._snapshot.model(input_ids=ids).logits.log_softmax(-1)
                trainer_lps = self.accelerator.unwrap_model(self.model)(input_ids=ids).logits.log_softmax(-1)
            torch.testing.assert_close(generator_lps, trainer_lps, rtol=0, atol=1e-6)
            self.published += 1

    base_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = make_config(generator_mode="thread", learning_rate=1e-2, weight_sync_steps=1, max_staleness=1)
    trainer = trainer_for(
        student,
        teacher,
        tokenizer,
        dataset,
        args,
        cls=CheckSnapshot,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in lora_before.items())
    for name, before in base_before.items():
        peft_name = next(
            n for n in params if n.endswith(name.replace(".weight", ".base_layer.weight")) or n.endswith(name)
        )
        assert torch.equal(params[peft_name].detach(), before), name
    assert trainer.published == 6  # weight_sync_steps=1 over 6 steps, each checked above

    # the saved adapter loads onto a fresh base with PEFT and reproduces the trained student
    from peft import PeftModel

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    fresh_base = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)  # the student fixture's weights
    loaded = PeftModel.from_pretrained(fresh_base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[3, 17, 42, 8, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_seq_kd_without_student_sampling_trains_on_teacher_generations(
    student, teacher, tokenizer, dataset, make_config
):
    threads_before, children_before = live_workers()
    # padded rows, so each row is one sample; the dataset's own completions are longer than the teacher may write
    args = make_config(lmbda=0.0, seq_kd=True, max_steps=2, max_new_tokens=5, padding_free=False)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    dataset_completion_tokens = (trainer.data_collator([dataset[i] for i in range(8)])["labels"] != -100).sum(dim=1)
    assert (dataset_completion_tokens > 5).all()
    trainer.train()
    assert trainer.npd_metrics.totals.generated_samples == 0  # lmbda=0: the student never samples
    assert live_workers() == (threads_before, children_before)  # and no generator was started
    assert len(trainer.seen) == 2
    for record in trainer.seen:
        completion_tokens = (record["inputs"]["labels"] != -100).sum(dim=1)
        assert ((completion_tokens >= 1) & (completion_tokens <= 5)).all()  # the teacher's generations


def test_a_late_generator_failure_is_raised_even_if_the_trainer_never_waits(tokenizer, teacher, dataset, make_config):
    from helpers import FailsOnSecondGenerate

    student = FailsOnSecondGenerate(build_model(tokenizer, hidden_size=32, num_layers=2).config)
    # the first generation batch (16 samples) covers all 4 steps: the trainer never blocks after the failure
    args = make_config(generator_mode="thread", max_steps=4, generation_batch_size=16, buffer_size=32)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    with pytest.raises(GeneratorError, match="late boom"):
        trainer.train()


def test_inline_mode_tags_samples_with_the_live_weights_step(student, teacher, tokenizer, dataset, make_config):
    args = make_config(
        generator_mode="inline", max_steps=8, weight_sync_steps=4, max_staleness=3, generation_batch_size=12
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.train()
    assert trainer.npd_metrics.totals.dropped["stale"] == 0
    # a generation batch serves 3 micro-batches: its samples are 0, 1 and 2 steps old, never more
    staleness = [r["step"] - p for r in trainer.seen for p in r["policy_steps"]]
    assert max(staleness) == 2 and min(staleness) == 0


@pytest.mark.parametrize("objective", ["npd", "jsd"])
def test_topk_objective_trains_on_policy_without_a_teacher_forward_in_the_trainer(
    student, teacher, tokenizer, dataset, make_config, objective
):
    args = make_config(teacher_top_k=4, ce_weight=0.1, max_steps=4, topk_objective=objective)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    teacher_calls = []  # counted from here on: construction probes both models once (packing_leaks)
    # on the backbone: the fused and top-k paths call it directly, without the LM wrapper's forward
    teacher.model.register_forward_hook(lambda module, args, output: teacher_calls.append(1))
    trainer.train()
    assert trainer.state.global_step == 4
    assert all("teacher_topk_ids" in r["inputs"] for r in trainer.seen)  # scored by the generator
    assert teacher_calls == []  # and so the training steps never ran the teacher
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_samples_outside_the_ifd_band_never_reach_compute_loss(student, teacher, tokenizer, dataset, make_config):
    class TraceSamples(RecordingTrainer):
        """Records every sample the pipeline hands over, to compare with what compute_loss receives."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.handed_over = []

        def _start_generation(self):
            super()._start_generation()
            pipeline = self._generation.pipeline
            if not hasattr(pipeline, "_traced"):
                take = pipeline.take

                def traced(n, step):
                    result = take(n, step)
                    self.handed_over += result.samples
                    return result

                pipeline.take, pipeline._traced = traced, True

    # a quantile band always rejects some samples; padded rows make each sample one row of compute_loss input
    args = make_config(
        generator_mode="thread",
        ifd_filter=True,
        ifd_band="quantile",
        ifd_quantiles=(0.25, 0.75),
        padding_free=False,
        log_samples=True,
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args, cls=TraceSamples)
    trainer.train()
    totals = trainer.npd_metrics.totals
    assert totals.dropped["ifd_low"] > 0 and totals.dropped["ifd_high"] > 0  # the filter really filtered
    # log_samples: one line per fate, agreeing with the counters and with what was handed over
    with open(os.path.join(args.output_dir, "npd_samples.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    trained_lines = [line for line in lines if line["fate"] == "trained"]
    assert [(x["prompt_index"], x["stream_position"]) for x in trained_lines] == [
        (s.prompt_index, s.stream_position) for s in trainer.handed_over
    ]
    assert all(x["staleness"] == x["step"] - x["policy_step"] <= args.max_staleness for x in trained_lines)
    dropped = Counter(line["reason"] for line in lines if line["fate"] == "dropped")
    assert dropped == +totals.dropped  # the same reasons and counts as the run's counters
    assert all(line["ifd_delta"] is not None for line in lines if line.get("reason") in ("ifd_low", "ifd_high"))
    assert all(not math.isnan(s.ifd_delta) for s in trainer.handed_over)
    trained = [
        row[mask.bool()].tolist()
        for record in trainer.seen
        for row, mask in zip(record["inputs"]["input_ids"], record["inputs"]["attention_mask"], strict=True)
    ]
    assert sorted(trained) == sorted(s.prompt_ids + s.completion_ids for s in trainer.handed_over)
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"npd/ifd_delta_mean", "npd/ifd_kept_frac", "npd/ifd_dropped_low", "npd/ifd_dropped_high"} <= logged


def test_an_ifd_band_that_rejects_everything_warns_and_widens_instead_of_starving(
    student, teacher, tokenizer, dataset, make_config, caplog
):
    args = make_config(
        generator_mode="thread",
        ifd_filter=True,
        ifd_band="absolute",
        ifd_delta_min=1e6,
        ifd_delta_max=2e6,
        ifd_max_rejected_in_a_row=8,
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    with caplog.at_level(logging.WARNING, logger="trl_npd.generation_session"):
        trainer.train()
    assert trainer.state.global_step == 6
    assert any("[1000000.0, 2000000.0]" in r.message and "quantile" in r.message for r in caplog.records)
    assert trainer.npd_metrics.totals.dropped["ifd_low"] >= 8


@pytest.mark.parametrize(
    "loss_path",
    [
        {},
        {"use_fused_loss": False},
        {"padding_free": False},
        {"teacher_top_k": 4},
        {"teacher_top_k": 4, "use_fused_loss": False},
    ],
    ids=["fused-packed", "reference", "padded", "topk", "topk-reference"],
)
def test_every_trained_sample_records_its_staleness_and_its_drift(
    student, teacher, tokenizer, dataset, make_config, loss_path
):
    """The per-sample distribution behind `npd/policy_kl`, on every loss path and layout: one record per trained
    sample, staleness as trained, no drift for a sample of the current weights, and drift once the student has moved
    past its weights."""
    args = make_config(
        generator_mode="thread", weight_sync_steps=3, max_staleness=3, learning_rate=1e-2, max_steps=8, **loss_path
    )
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    trainer.train()
    records = trainer.npd_metrics.totals.sample_drift
    staleness = [record["step"] - p for record in trainer.seen for p in record["policy_steps"]]
    assert len(records) == trainer.npd_metrics.totals.consumed_samples == len(staleness)
    assert sorted(s for s, _, _ in records) == sorted(staleness)
    fresh = [drift for s, drift, _ in records if s == 0]
    stale = [drift for s, drift, _ in records if s >= 2]
    assert fresh and stale
    assert max(fresh) < 1e-4  # sampled by the weights being trained: behaviour and current agree
    assert min(stale) > 10 * max(fresh)  # two optimizer steps at lr 1e-2 later, every such sample has drifted
    assert all(tokens > 0 for _, _, tokens in records)
    # the largest sample drift of each logging window is logged
    logged = [entry["npd/policy_kl_sample_max"] for entry in trainer.state.log_history if "npd/policy_kl" in entry]
    assert max(logged) == pytest.approx(max(drift for _, drift, _ in records))
