"""The fault matrix: a fault injected into a running training, the time until the trainer reports it, and nothing
left running afterwards. Each test prints its `fault -> error` time (`pytest -s`); docs/benchmarks.md records them.

Other faults have their tests elsewhere: a generator whose sampling raises (test_trainer.py, both host modes), a
failure on one rank of two (test_multi_rank.py), an interrupt or a failing callback (test_trainer.py)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import psutil
import pytest
import torch
from datasets import Dataset
from helpers import ScoringFailsInTheGenerator, live_workers, processes_with_marker
from transformers import TrainerCallback
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from trl_npd import GeneratorError, NearPolicyDistillTrainer
from trl_npd.nonfinite import NonFiniteLossError
from trl_npd.toy import arithmetic_dataset, build_model

HERE = os.path.dirname(os.path.abspath(__file__))


def trainer_for(student, teacher, tokenizer, dataset, args, cls=NearPolicyDistillTrainer, **kwargs):
    return cls(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs
    )


def report(fault: str, seconds: float) -> None:
    print(f"\nfault -> error [{fault}]: {seconds:.2f} s")


class AtStep(TrainerCallback):
    """Calls `action()` once, at the end of optimizer step `step`, and notes the wall-clock time it did."""

    def __init__(self, step):
        self.step, self.action, self.at = step, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.at is None:
            self.at = time.monotonic()
            self.action()


def test_a_generator_killed_with_sigkill_stops_training_at_once(student, teacher, tokenizer, dataset, make_config):
    before = live_workers()
    fault = AtStep(3)
    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(max_steps=200), callbacks=[fault])
    fault.action = lambda: os.kill(trainer._generation.pipeline._worker.pid, signal.SIGKILL)
    with pytest.raises(GeneratorError, match=r"exited unexpectedly \(exit code -9\)"):
        trainer.train()
    elapsed = time.monotonic() - fault.at
    report("generator SIGKILL", elapsed)
    assert elapsed < 10
    assert live_workers() == before


def test_a_frozen_generator_is_reported_as_hung_with_its_last_activity_and_killed(
    student, teacher, tokenizer, dataset, make_config
):
    """SIGSTOP freezes the generator process, the way a deadlock or a wedged driver would stall it. Its batches are
    larger than a pipe holds (teacher top-k scores), so the freeze leaves a batch half-written in the queue: the
    trainer, once it reads that batch, waits inside the queue's read, where only the watchdog thread can act."""
    before = live_workers()
    timeout_s = 2.0
    fault = AtStep(3)

    class SlowFirstSteps(TrainerCallback):  # the generator fills the queue meanwhile: it then writes in a full pipe
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < 3:
                time.sleep(1.5)

    args = make_config(max_steps=200, teacher_top_k=64, max_new_tokens=48, generation_batch_size=8)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args, callbacks=[SlowFirstSteps(), fault])

    def freeze():
        pipeline = trainer._generation.pipeline
        assert pipeline.generator_timeout_s == args.generator_timeout_s == 300  # the default reaches the pipeline
        # Lowered only now: on a loaded 2-core machine the generator's start-up alone can outlast 2 s.
        pipeline.generator_timeout_s = timeout_s
        os.kill(pipeline._worker.pid, signal.SIGSTOP)

    fault.action = freeze
    with pytest.raises(GeneratorError) as raised:
        trainer.train()
    elapsed = time.monotonic() - fault.at
    report("generator SIGSTOP (generator_timeout_s=2)", elapsed)
    message = str(raised.value)
    assert re.search(r"The generator process 'npd-generator' \(pid \d+\) has made no progress for [\d.]+ s", message)
    assert "more than generator_timeout_s=2." in message
    assert "Its last activity: " in message and "It has been killed (SIGKILL)" in message
    assert timeout_s <= elapsed < timeout_s + 15
    assert live_workers() == before  # the stopped process was killed and reaped, the watchdog thread joined


def test_an_exception_while_scoring_surfaces_with_its_traceback(tokenizer, student, dataset, make_config):
    before = live_workers()
    teacher = ScoringFailsInTheGenerator(build_model(tokenizer, hidden_size=64, num_layers=2, seed=2).config)
    trainer = trainer_for(student, teacher, tokenizer, dataset, make_config(max_steps=50, ifd_filter=True))
    with pytest.raises(GeneratorError, match="boom while scoring") as raised:
        trainer.train()
    failed_at = float(re.search(r"boom while scoring at ([\d.]+)", str(raised.value)).group(1))
    elapsed = time.time() - failed_at
    report("exception while scoring", elapsed)
    assert "scoring.py" in str(raised.value)  # the generator's own traceback, down to the scoring stage
    assert elapsed < 10
    assert live_workers() == before


def _make_logits(value: float, trigger: int, seen: list, training_only: bool):
    """A forward hook for a backbone: `value` in every hidden state at and after `trigger` in a row, so the logits
    of the completion that follows a prompt holding `trigger` are not finite. `training_only` spares the student's
    sampling (in eval mode), which would otherwise fail first, in the generator."""

    def hook(module, args, kwargs, output):
        if training_only and not module.training:
            return output
        ids = kwargs.get("input_ids", args[0] if args else None)
        after = (ids == trigger).cumsum(dim=1) > 0
        if after.any():
            seen.append(time.monotonic())
            output.last_hidden_state[after] = value
        return output

    return hook


@pytest.mark.parametrize(("role", "value"), [("teacher", math.nan), ("student", math.inf)])
def test_non_finite_logits_stop_training_naming_the_step_and_the_sample(tokenizer, make_config, role, value):
    """One prompt of eight holds a character nothing else has; the model under test turns every hidden state from
    it on into NaN or inf. Training must stop at that sample's step, name it and the model, and not apply it."""
    rows = [r for r in arithmetic_dataset(8, seed=0)]
    rows[5] = {"messages": [{"role": "user", "content": "What is 3+4?!"}, {"role": "assistant", "content": "7"}]}
    (trigger,) = tokenizer("!", add_special_tokens=False)["input_ids"]
    assert all(trigger not in tokenizer.apply_chat_template(r["messages"]) for i, r in enumerate(rows) if i != 5)
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)
    faulty = {"teacher": teacher, "student": student}[role]
    seen = []
    hook = _make_logits(value, trigger, seen, training_only=role == "student")
    faulty.model.register_forward_hook(hook, with_kwargs=True)
    weights = {n: p.detach().clone() for n, p in student.named_parameters()}
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)
            weights.update({n: p.detach().clone() for n, p in student.named_parameters()})

    before = live_workers()
    args = make_config(generator_mode="inline", max_steps=8, max_grad_norm=0.0)
    trainer = trainer_for(student, teacher, tokenizer, Dataset.from_list(rows), args, callbacks=[Steps()])
    seen.clear()  # construction probes the models once (packing check)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    elapsed = time.monotonic() - seen[0]
    report(f"{'nan' if math.isnan(value) else 'inf'} in the {role}'s logits", elapsed)
    message = str(raised.value)
    failing_step = (steps[-1] if steps else 0) + 1
    assert f"at training step {failing_step} (micro-batch 1 of 1)" in message, message
    named = re.search(
        rf"sample \d of the micro-batch \(train dataset row 5, [^)]*\): the {role}'s logits hold (.+?) at", message
    )
    assert named and named.group(1) in ("nan", "inf", "nan and inf"), message  # inf times a weight is inf or nan
    assert message.count("train dataset row") == 1  # only the faulty sample is named
    # the step that met the fault was not applied: the weights are those after the last completed step
    for name, param in student.named_parameters():
        assert torch.isfinite(param).all() and torch.equal(param.detach(), weights[name]), name
    assert live_workers() == before


def test_a_checkpoint_that_cannot_be_written_stops_training_with_the_path_and_the_last_good_one(
    student, teacher, tokenizer, dataset, make_config, tmp_path
):
    """The save of step 4 fails (its folder's name is taken by a file, which also stops root); step 2's is fine."""
    before = live_workers()
    out = tmp_path / "out"
    args = make_config(output_dir=str(out), generator_mode="thread", max_steps=8, save_strategy="steps", save_steps=2)
    out.mkdir()
    (out / "checkpoint-4").write_text("not a folder")
    steps = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.monotonic())

    trainer = trainer_for(student, teacher, tokenizer, dataset, args, callbacks=[Steps()])
    with pytest.raises(OSError, match=r"Saving the checkpoint of step 4 to .*checkpoint-4 failed") as raised:
        trainer.train()
    elapsed = time.monotonic() - steps[-1]  # the save runs right after step 4's end
    report("checkpoint not writable", elapsed)
    assert f"The last complete checkpoint is {out / 'checkpoint-2'}." in str(raised.value)
    assert len(steps) == 4 and elapsed < 5
    # a checkpoint save starts tqdm's monitor thread (transformers' weight saving), which is not ours to stop
    after, expected = ((threads - {"tqdm_monitor"}, processes) for threads, processes in (live_workers(), before))
    assert after == expected


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import TrainerCallback
    from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
    from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer

    class KillMe(TrainerCallback):  # kill -9 from inside: no cleanup runs, exactly as with kill -9 from outside
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # checkpoint-4 is complete, checkpoint-6 not begun
                os.kill(os.getpid(), signal.SIGKILL)

    tokenizer = build_tokenizer()
    args = NearPolicyDistillConfig(
        output_dir={out!r}, max_steps=100, per_device_train_batch_size=4, learning_rate=1e-3, lmbda=1.0,
        max_new_tokens=8, max_length=96, report_to="none", save_strategy="steps", save_steps=2, bf16=False, seed=0,
        disable_tqdm=True, ifd_filter=False, weight_sync_steps=2, max_staleness=3, generator_mode="process",
    )
    trainer = NearPolicyDistillTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
        teacher_model=build_model(tokenizer, hidden_size=64, num_layers=2, seed=2),
        args=args, train_dataset=arithmetic_dataset(64), processing_class=tokenizer, callbacks=[KillMe()],
    )
    trainer.train()
    """
)


def test_a_trainer_killed_mid_run_resumes_from_its_last_checkpoint_continuing_versions_and_prompts(
    tokenizer, teacher, make_config, tmp_path, caplog
):
    out = tmp_path / "out"
    script = tmp_path / "train.py"
    script.write_text(KILLED_SCRIPT.format(out=str(out)))
    marker = uuid.uuid4().hex
    run = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "NPD_TEST_LAUNCH": marker, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    killed_at = time.monotonic()
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    _, alive = psutil.wait_procs(processes_with_marker(marker), timeout=20)  # the orphaned generator exits
    for process in alive:
        process.kill()
    report("trainer SIGKILL (until its orphaned generator is gone)", time.monotonic() - killed_at)
    assert not alive, [p.pid for p in alive]
    # A run killed while saving leaves a newer, incomplete checkpoint behind: resume must skip it.
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "npd_state.json").write_text("{}")
    with open(out / "checkpoint-4" / "npd_state.json") as f:
        saved = json.load(f)

    class Recording(NearPolicyDistillTrainer):
        def _take(self, n, step):
            samples = super()._take(n, step)
            self.taken = getattr(self, "taken", []) + [(step, s) for s in samples]
            return samples

    args = make_config(
        output_dir=str(out),
        max_steps=8,
        generator_mode="thread",
        save_strategy="steps",
        save_steps=2,
        weight_sync_steps=2,
        max_staleness=3,
    )
    before = live_workers()
    resumed = trainer_for(
        build_model(tokenizer, hidden_size=32, num_layers=2, seed=99),  # the weights come from the checkpoint
        teacher,
        tokenizer,
        arithmetic_dataset(64),
        args,
        cls=Recording,
    )
    with caplog.at_level("WARNING", logger="trl_npd.checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    assert any("checkpoint-6 is incomplete" in r.message for r in caplog.records)
    assert resumed.state.global_step == 8
    first_step, first = resumed.taken[0]
    assert first_step == 4 and first.policy_step == 4  # resumed at checkpoint-4, from its weights
    assert first.policy_version == saved["policy_version"] + 1  # versions continue
    assert first.stream_position == saved["stream_positions"][0]  # the prompt stream continues where it stopped
    assert all(step - s.policy_step <= 3 for step, s in resumed.taken)  # nothing stale is trained on
    assert all(s.policy_version > saved["policy_version"] for _, s in resumed.taken)
    # a checkpoint save starts tqdm's monitor thread (transformers' weight saving), which is not ours to stop
    after, expected = ((threads - {"tqdm_monitor"}, processes) for threads, processes in (live_workers(), before))
    assert after == expected


def _pipeline(
    tokenizer,
    dataset,
    timeout_s,
    mode="thread",
    student=None,
    max_new_tokens=4,
    teacher=None,
    remote_engine=None,
    **settings,
):
    from trl.experimental.utils import DataCollatorForChatML

    from trl_npd.engine import EngineConfig
    from trl_npd.pipeline import GenerationPipeline, PipelineSettings
    from trl_npd.prompts import PromptStream

    engine = EngineConfig(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings = PipelineSettings(
        mode=mode,
        engine=engine,
        generation_batch_size=2,
        buffer_size=2,
        max_staleness=10**6,
        version=0,
        step=0,
        num_threads=None,
        seed=0,
        generator_timeout_s=timeout_s,
        **settings,
    )
    return GenerationPipeline(
        settings,
        student=student or build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
        prompts=PromptStream(dataset, DataCollatorForChatML(tokenizer=tokenizer, max_length=96), seed=0),
        teacher=teacher,
        remote_engine=remote_engine,
    )


def test_waiting_on_a_full_buffer_or_on_the_snapshot_lock_is_progress_not_a_hang(tokenizer, dataset):
    pipeline = _pipeline(tokenizer, dataset, timeout_s=0.5)
    pipeline.start()
    try:
        time.sleep(1.5)  # nobody takes: the generator waits on the full buffer (backpressure) for 3 timeouts
        pipeline.check_alive()
        assert "waiting for room in the full buffer" in pipeline.progress.describe()
        lock = pipeline._snapshot._lock
        with lock:  # as a publish holds it
            pipeline._snapshot._version.value += 1  # a new version to load, once the generator gets the lock
            pipeline.take(2, current_step=0)  # room again: the generator goes on to its next batch, the lock
            time.sleep(1.5)
            pipeline.check_alive()
            assert "waiting for the weight snapshot's lock" in pipeline.progress.describe()
        assert pipeline.take(4, current_step=0).samples[-1].policy_version == 1
    finally:
        pipeline.stop()


def test_a_stuck_generator_thread_is_reported_and_left_as_a_daemon(tokenizer, dataset, monkeypatch):
    """A thread cannot be killed: the report says so, and the training side stops waiting on it."""
    from trl_npd.engine import TransformersEngine

    release = threading.Event()
    monkeypatch.setattr(TransformersEngine, "generate", lambda self, prompts: release.wait() and None)
    pipeline = _pipeline(tokenizer, dataset, timeout_s=0.5)
    pipeline.start()
    worker = pipeline._worker
    try:
        start = time.monotonic()
        with pytest.raises(GeneratorError, match="thread 'npd-generator' has made no progress") as raised:
            pipeline.take(2, current_step=0)
        report("generator thread stuck (generator_timeout_s=0.5)", time.monotonic() - start)
        assert "sampling generation batch 1 with policy version 0" in str(raised.value)
        assert "left behind as a daemon thread" in str(raised.value)
        stop_started = time.monotonic()
        pipeline.stop()
        assert time.monotonic() - stop_started < 1  # no graceful wait on a hung generator
    finally:
        release.set()
        worker.join(timeout=10)
    assert not worker.is_alive()


@pytest.mark.parametrize("bootstrap", [False, True], ids=["waiting", "bootstrapping"])
def test_a_generator_frozen_while_starting_is_reported_as_hung_and_killed(
    student, teacher, tokenizer, dataset, make_config, monkeypatch, bootstrap
):
    """A hang before the generator has shown any progress (here: frozen while its interpreter starts) surfaces
    after generator_timeout_s like a later one, whether the trainer waits for the first batch or samples its own
    meanwhile (the bootstrap), in which case it surfaces at the next step."""
    from trl_npd.pipeline import GenerationPipeline

    before = live_workers()
    timeout_s = 5.0
    started_at = []
    start = GenerationPipeline.start

    def start_then_freeze(pipeline):
        started_at.append(time.monotonic())  # its silence is timed from start()
        start(pipeline)
        os.kill(pipeline._worker.pid, signal.SIGSTOP)  # still importing torch: it has not beaten once

    monkeypatch.setattr(GenerationPipeline, "start", start_then_freeze)
    args = make_config(max_steps=10**4, generator_timeout_s=timeout_s, generator_bootstrap=bootstrap)
    trainer = trainer_for(student, teacher, tokenizer, dataset, args)
    with pytest.raises(GeneratorError) as raised:
        trainer.train()
    elapsed = time.monotonic() - started_at[0]
    report(f"generator frozen while starting, trainer {'bootstrapping' if bootstrap else 'waiting'}", elapsed)
    message = str(raised.value)
    assert f"more than generator_timeout_s={timeout_s:g}." in message
    assert "Its last activity: starting up (loading its copies of the models)" in message
    assert "It has been killed (SIGKILL)" in message
    assert timeout_s <= elapsed < 20
    trained_meanwhile = trainer.state.global_step > 0
    assert trained_meanwhile == bootstrap
    assert live_workers() == before


def test_the_start_up_is_timed_from_start_not_from_building_the_pipeline(tokenizer, dataset):
    """Building the pipeline copies the models into shared memory (the trainer's work, long for a large model):
    that time is not the generator's silence."""
    pipeline = _pipeline(tokenizer, dataset, timeout_s=2.0, mode="process")
    try:
        time.sleep(2.5)  # as if the copies had taken longer than the timeout
        pipeline.start()
        pipeline.check_alive()  # the process was only just spawned
        assert "starting up" in pipeline.progress.describe()
    finally:
        pipeline.stop()


class SlowLayer(Qwen3DecoderLayer):
    """A decoder layer that takes `seconds` per forward, in every copy the pipeline makes (hooks are not copied)."""

    seconds = 0.0

    def forward(self, *args, **kwargs):
        time.sleep(self.seconds)
        return super().forward(*args, **kwargs)


def _slow_layers(model, seconds):
    """`model`, each of whose decoder layers sleeps `seconds` per forward."""
    slow = type("SlowLayerFor", (SlowLayer,), {"seconds": seconds})
    for layer in model.model.layers:
        layer.__class__ = slow
    return model


def test_one_long_forward_is_progress_not_a_hang(tokenizer, dataset):
    """A forward longer than the timeout (a prefill or the teacher scoring a whole generation batch, with a large
    model on a slow device), whose every layer is shorter, is progress: the generator beats after every layer."""
    layer_s, timeout_s = 0.2, 0.8
    student = _slow_layers(build_model(tokenizer, hidden_size=32, num_layers=5, seed=1), layer_s)
    teacher = _slow_layers(build_model(tokenizer, hidden_size=32, num_layers=5, seed=2), layer_s)
    pipeline = _pipeline(
        tokenizer, dataset, timeout_s, student=student, teacher=teacher, teacher_top_k=4, max_new_tokens=2
    )
    pipeline.start()
    try:
        start = time.monotonic()
        samples = pipeline.take(2, current_step=0).samples  # checks for a hang every 0.1 s while it waits
        assert time.monotonic() - start > 2 * 5 * layer_s  # at least the prefill and the teacher's scoring
        assert all(len(s.teacher_topk_ids) == len(s.completion_ids) for s in samples)  # the teacher scored them
        # only the generator's own copies beat: the models the trainer runs carry no hooks
        assert not any(module._forward_hooks for module in (*student.modules(), *teacher.modules()))
    finally:
        pipeline.stop()


def test_a_stuck_remote_engine_batch_says_progress_comes_once_per_batch(tokenizer, dataset):
    """A remote engine (vLLM) samples a batch in one call the generator cannot see into: the report says that a
    batch legitimately this long needs a larger generator_timeout_s."""
    release = threading.Event()

    class StuckEngine:  # the RemoteEngine protocol
        def generate(self, prompts):
            release.wait()

        def sync_weights(self):
            pass

    pipeline = _pipeline(tokenizer, dataset, timeout_s=0.5, remote_engine=StuckEngine())
    pipeline.start()
    worker = pipeline._worker
    try:
        with pytest.raises(GeneratorError, match="thread 'npd-generator' has made no progress") as raised:
            pipeline.take(2, current_step=0)
        assert "With vLLM the generator shows progress once per generation batch" in str(raised.value)
        pipeline.stop()
    finally:
        release.set()
        worker.join(timeout=10)
