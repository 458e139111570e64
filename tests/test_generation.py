import multiprocessing as mp
import os
import threading

import pytest
import torch
from trl.experimental.utils import DataCollatorForChatML

from trl_npd.engine import EngineConfig, TransformersEngine
from trl_npd.pipeline import GenerationPipeline, PipelineSettings
from trl_npd.prompts import PromptStream
from trl_npd.snapshot import PolicySnapshot
from trl_npd.toy import build_model


def forward_logprobs(model, prompt_ids, completion_ids, temperature):
    """Reference: log-probs of the completion tokens from one plain forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def engine_config(tokenizer, **kwargs):
    values = dict(
        max_new_tokens=12, temperature=0.7, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    values.update(kwargs)
    return EngineConfig(**values)


def test_behaviour_logprobs_are_those_of_the_sampling_distribution(tokenizer, student):
    torch.manual_seed(0)
    engine = TransformersEngine(student.eval(), engine_config(tokenizer))
    prompts = [tokenizer("What is 1+2?")["input_ids"], tokenizer("What is 12+30?")["input_ids"]]
    completions = engine.generate(prompts)
    for prompt, completion in zip(prompts, completions, strict=True):
        assert len(completion.ids) == len(completion.logprobs) >= 1
        expected = forward_logprobs(student, prompt, completion.ids, temperature=0.7)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_completions_stop_after_the_first_eos(tokenizer, student):
    with torch.no_grad():  # make EOS overwhelmingly likely so every completion ends early
        student.lm_head.weight[tokenizer.eos_token_id] += 50 * student.model.norm.weight.sign()
    engine = TransformersEngine(student.eval(), engine_config(tokenizer, max_new_tokens=20))
    completions = engine.generate([tokenizer("What is 1+2?")["input_ids"]] * 4)
    for completion in completions:
        assert completion.ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in completion.ids[:-1]


def test_publish_bumps_version_and_step_and_reaches_the_generator(tokenizer, student):
    snapshot = PolicySnapshot(student, mp.get_context("spawn"), version=0, step=0)
    other = build_model(tokenizer, hidden_size=32, num_layers=2, seed=7)
    assert snapshot.publish(other, step=4) == 1 and snapshot.step == 4
    target = build_model(tokenizer, hidden_size=32, num_layers=2, seed=9)
    assert snapshot.load_into(target, loaded_version=0) == (1, 4)
    for a, b in zip(target.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert snapshot.load_into(target, loaded_version=1) is None  # already current: no copy


def test_after_a_sync_samples_follow_the_new_weights_and_no_sample_mixes_versions(tokenizer, dataset):
    """Publish two different students alternately while a generator thread samples: each sample's log-probs must
    match exactly the weights of the version it is tagged with (a torn snapshot would match neither)."""
    model_a = build_model(tokenizer, hidden_size=32, num_layers=2, seed=11)
    model_b = build_model(tokenizer, hidden_size=32, num_layers=2, seed=12)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=96)
    settings = PipelineSettings(
        mode="thread",
        engine=engine_config(tokenizer, max_new_tokens=6, temperature=1.0),
        generation_batch_size=2,
        buffer_size=2,
        max_staleness=10**6,
        version=0,
        step=0,
        num_threads=None,
        seed=0,
    )
    pipeline = GenerationPipeline(settings, student=model_a, prompts=PromptStream(dataset, collator, seed=0))
    weights = {0: model_a}
    stop_publishing = threading.Event()

    def publisher():
        step = 0
        while not stop_publishing.is_set():
            step += 1
            source = model_b if step % 2 else model_a
            weights[pipeline.publish(source, step)] = source
            stop_publishing.wait(0.01)

    pipeline.start()
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        samples = []
        while len({s.policy_version for s in samples}) < 4 or len(samples) < 24:
            samples += pipeline.take(2, current_step=0).samples
    finally:
        stop_publishing.set()
        thread.join()
        pipeline.stop()
    for sample in samples:
        own = weights[sample.policy_version]
        other = model_a if own is model_b else model_b
        expected = forward_logprobs(own, sample.prompt_ids, sample.completion_ids, 1.0)
        torch.testing.assert_close(torch.tensor(sample.behaviour_logprobs), expected, atol=1e-4, rtol=1e-4)
        wrong = forward_logprobs(other, sample.prompt_ids, sample.completion_ids, 1.0)
        assert (torch.tensor(sample.behaviour_logprobs) - wrong).abs().max() > 1e-2


def test_the_models_own_generation_config_does_not_change_what_is_sampled(tokenizer, student):
    """Checkpoints ship generation settings (repetition_penalty, min_p, ...). transformers would merge them into
    sampling, and the recorded log-probs would no longer be those of the sampling distribution."""
    student.generation_config.repetition_penalty = 1.3
    student.generation_config.min_p = 0.5
    student.generation_config.no_repeat_ngram_size = 2
    torch.manual_seed(0)
    engine = TransformersEngine(student.eval(), engine_config(tokenizer, temperature=1.0, max_new_tokens=16))
    prompt = tokenizer("What is 11+11?")["input_ids"]
    for completion in engine.generate([prompt] * 3):
        expected = forward_logprobs(student, prompt, completion.ids, temperature=1.0)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert student.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was


def _hold_lock_and_die(lock):
    lock.acquire()
    os._exit(0)


def process_pipeline(tokenizer, student, dataset, remote_engine=None, **settings):
    collator = DataCollatorForChatML(tokenizer, max_length=64)
    values = dict(
        mode="process",
        engine=EngineConfig(max_new_tokens=4, temperature=1.0, pad_token_id=0, eos_token_id=2),
        generation_batch_size=4,
        buffer_size=4,
        max_staleness=4,
        version=0,
        step=0,
        num_threads=1,
        seed=0,
    )
    values.update(settings)
    return GenerationPipeline(
        PipelineSettings(**values),
        student=student,
        prompts=PromptStream(dataset, collator, seed=0),
        remote_engine=remote_engine,
    )


def test_a_remote_engine_is_not_run_from_a_process_and_the_mode_is_not_changed_behind_the_callers_back(
    tokenizer, student, dataset
):
    """The config turns vLLM's "process" into "thread" with a warning; the pipeline itself only refuses it."""
    with pytest.raises(ValueError, match="mode='process' cannot drive a remote engine"):
        process_pipeline(tokenizer, student, dataset, remote_engine=object())


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_mode_the_config_did_not_resolve_is_refused_not_run_as_a_thread(tokenizer, student, dataset, mode):
    """The config maps "sync" to "inline"; a mode set after it was built (or an older pickle) reaches the pipeline
    unmapped, and an unknown mode must not fall through to the background thread."""
    with pytest.raises(ValueError, match=f"generator mode '{mode}' is not one of"):
        process_pipeline(tokenizer, student, dataset, mode=mode)


def test_a_generator_process_still_starting_is_ended_at_once_by_stop(tokenizer, student, dataset):
    """A train() shorter than the generator's start-up (the bootstrap served it) must not wait for that start-up."""
    pipeline = process_pipeline(tokenizer, student, dataset)
    pipeline.start()
    worker = pipeline._worker
    report = pipeline.stop()  # at once: the new interpreter is still importing torch
    assert worker.exitcode == -15  # ended by SIGTERM, not by seeing the stop after its start-up
    assert report.generated == report.unfinished == 0 and report.failure is None


def test_the_bootstrap_samples_on_the_live_students_device_not_the_generators(tokenizer, student, dataset):
    """The trainer's own models sample and score while the process starts: on their device, whatever device the
    generator process's copies are sent to (a different generator_device failed on the first batch)."""
    engine = EngineConfig(max_new_tokens=4, temperature=1.0, pad_token_id=0, eos_token_id=2, device="meta")
    pipeline = process_pipeline(tokenizer, student, dataset, engine=engine, bootstrap=True)
    pipeline._spec.engine = EngineConfig(max_new_tokens=4, temperature=1.0, pad_token_id=0, eos_token_id=2)
    pipeline.start()
    try:
        assert pipeline._inline_engine.config.device == "cpu"
        result = pipeline.take(4, current_step=0)  # sampled inline by the live student, on its device
        assert len(result.samples) == 4 and all(batch.bootstrap for batch in result.received)
    finally:
        pipeline.stop()


def test_stop_after_a_generator_process_failed_to_start_keeps_the_real_error(tokenizer, student, dataset, monkeypatch):
    """Starting a spawned process pickles its spec; if that fails there is no process, and stop() must not fail on
    it (an AttributeError from stop() used to replace the user's error)."""
    pipeline = process_pipeline(tokenizer, student, dataset)

    def unpicklable(self):
        raise TypeError("cannot pickle 'function' object")

    monkeypatch.setattr(mp.get_context("spawn").Process, "start", unpicklable)
    with pytest.raises(TypeError, match="cannot pickle"):
        pipeline.start()
    report = pipeline.stop()
    assert report.generated == 0 and report.failure is None


def test_stop_kills_a_generator_process_that_blocks_the_drain(tokenizer, student, dataset, monkeypatch):
    """A process frozen halfway through writing a batch leaves a drain blocked reading the rest: past the stop
    deadline it is killed, which ends the read. Simulated: the process is stopped (SIGSTOP) and the drain blocks
    for as long as it lives."""
    import signal
    import time

    pipeline = process_pipeline(tokenizer, student, dataset)
    pipeline.start()
    pipeline.take(4, current_step=0)  # the process has started and delivered
    worker = pipeline._worker
    os.kill(worker.pid, signal.SIGSTOP)

    def blocked_drain():
        while worker.is_alive():
            time.sleep(0.05)
        return type(pipeline.buffer).drain(pipeline.buffer)

    monkeypatch.setattr(pipeline.buffer, "drain", blocked_drain)
    start = time.monotonic()
    pipeline.stop(timeout_s=0.5)
    assert time.monotonic() - start < 15
    assert not worker.is_alive() and worker.exitcode == -9
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]  # the reaper is gone too


def test_publish_does_not_hang_when_the_generator_died_holding_the_snapshot_lock(student):
    snapshot = PolicySnapshot(student, mp.get_context("spawn"))
    holder = mp.get_context("fork").Process(target=_hold_lock_and_die, args=(snapshot._lock,))
    holder.start()
    holder.join()

    def check_alive():
        if not holder.is_alive():
            raise RuntimeError("generator is gone")

    with pytest.raises(RuntimeError, match="generator is gone"):
        snapshot.publish(student, step=1, check_alive=check_alive)


def test_publish_sends_trainable_tensors_and_frozen_ones_only_when_they_changed(student):
    """A LoRA student's frozen base goes in with the first snapshot; a publish then moves what training changed."""
    frozen = student.model.embed_tokens.weight
    frozen.requires_grad_(False)
    snapshot = PolicySnapshot(student, mp.get_context("spawn"))
    state = student.state_dict()
    every_byte = sum(t.numel() * t.element_size() for t in state.values())
    frozen_bytes = frozen.numel() * frozen.element_size()

    with torch.no_grad():
        student.lm_head.weight.add_(1.0)  # what an optimizer step does to a trainable weight
    snapshot.publish(student, step=1)
    assert snapshot.last_publish_bytes == every_byte - frozen_bytes  # the unchanged frozen weight stayed put
    assert torch.equal(snapshot.model.lm_head.weight, student.lm_head.weight)

    with torch.no_grad():
        frozen.add_(1.0)  # changed outside the optimizer (a balancing bias, load_state_dict): it must follow
    snapshot.publish(student, step=2)
    assert snapshot.last_publish_bytes == every_byte
    assert torch.equal(snapshot.model.model.embed_tokens.weight, frozen)

    with torch.no_grad():
        student.lm_head.weight.add_(1.0)  # a last update, then the layer is frozen before the next sync
    student.lm_head.weight.requires_grad_(False)
    snapshot.publish(student, step=3)
    assert torch.equal(snapshot.model.lm_head.weight, student.lm_head.weight)  # the update was not lost
    snapshot.publish(student, step=4)
    assert snapshot.last_publish_bytes == every_byte - frozen_bytes - student.lm_head.weight.numel() * 4
