"""vLLM end to end on GPUs: colocated on one GPU, and a `trl vllm-serve` server on a second one.

Skipped without a CUDA device and vLLM (`pip install "trl_npd[vllm]"`), so CI never runs them. The CPU tests of the
same seam, against a fake client, are in test_vllm_engine.py.
"""

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from helpers import free_port
from transformers import AutoModelForCausalLM

from trl_npd import NearPolicyDistillTrainer
from trl_npd.toy import build_model

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_vllm_gpu = pytest.mark.skipif(
    not (HAS_VLLM and GPUS >= 1), reason="needs a CUDA GPU and vLLM (pip install 'trl_npd[vllm]')"
)
needs_two_vllm_gpus = pytest.mark.skipif(
    not (HAS_VLLM and GPUS >= 2), reason="needs two CUDA GPUs (server and trainer) and vLLM"
)


def _saved_student(tokenizer, path):
    """vLLM loads the student by name, so it must exist on disk; Qwen3-shaped, random init."""
    build_model(tokenizer, hidden_size=256, num_layers=2, num_heads=4, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def _train(student, tokenizer, dataset, make_config, **vllm_fields):
    """24 steps on the GPU with a bf16 teacher; the staleness bound, the sync schedule and the sample count hold."""
    teacher = build_model(tokenizer, hidden_size=512, num_layers=2, seed=2).to(torch.bfloat16)
    args = make_config(
        bf16=True, max_steps=24, weight_sync_steps=4, max_staleness=8, generation_backend="vllm", **vllm_fields
    )
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    totals = trainer.npd_metrics.totals
    assert trainer.state.global_step == args.max_steps
    assert totals.consumed_samples == args.max_steps * args.per_device_train_batch_size
    assert totals.max_staleness_seen <= args.max_staleness
    assert totals.sync_steps == list(range(args.weight_sync_steps, args.max_steps + 1, args.weight_sync_steps))


@needs_vllm_gpu
def test_colocated_vllm_trains_within_the_staleness_bound(tmp_path, tokenizer, dataset, make_config):
    student = _saved_student(tokenizer, str(tmp_path / "student"))
    _train(student, tokenizer, dataset, make_config, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2)


@needs_two_vllm_gpus
def test_a_vllm_server_on_its_own_gpu_trains_within_the_staleness_bound(tmp_path, tokenizer, dataset, make_config):
    path = str(tmp_path / "student")
    student = _saved_student(tokenizer, path)
    port = free_port()
    trl = os.path.join(os.path.dirname(sys.executable), "trl")
    server = subprocess.Popen(
        [trl, "vllm-serve", "--model", path, "--port", str(port), "--gpu_memory_utilization", "0.3"],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "1"},
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "the vLLM server exited while starting"
                time.sleep(2)
        _train(student, tokenizer, dataset, make_config, vllm_server_base_url=f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=60)
