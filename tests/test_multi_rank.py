"""Multi-process training as users launch it: `accelerate launch` with 2 CPU processes (gloo), on tiny models.

Each launch runs `multi_rank_worker.py`, which writes one JSON file per rank; the checks are here.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest
from helpers import free_port, processes_with_marker

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multi_rank_worker.py")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def _launch(out, *worker_args, marker="", timeout_s=300):
    """`accelerate launch` on 2 CPU processes; returns (completed process, per-rank results)."""
    # --multi_gpu picks torchrun's launcher; the worker's use_cpu=True then makes every rank a gloo CPU process.
    # (`accelerate launch --cpu --num_processes 2` starts a single process unless given an MPI hostfile.)
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += [WORKER, "--out", str(out), *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPD_TEST_LAUNCH": marker}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    results = []
    for rank in range(2):
        path = os.path.join(out, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    return done, results


def _launched(done) -> str:
    return f"exit code {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def test_two_processes_take_the_same_first_step_as_one_process_on_the_same_global_batch(tmp_path):
    import multi_rank_worker

    done, ranks = _launch(tmp_path / "two", "--phase", "loss")
    assert done.returncode == 0 and len(ranks) == 2, _launched(done)
    one = multi_rank_worker.run_loss_step(str(tmp_path / "one"), world_size=1)

    # DDP averages the ranks' losses (and gradients): their mean is the loss of the global batch
    two_process_loss = sum(r["loss"] for r in ranks) / 2
    assert two_process_loss == pytest.approx(one["loss"], rel=1e-6)
    assert ranks[0]["logged_loss"] == pytest.approx(one["logged_loss"], rel=1e-6)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=1e-3)  # the ranks did train on different rows
    # one SGD step: equal weights afterwards means equal gradients, i.e. the token normalizer is global
    for name, checksum in one["weights"].items():
        assert ranks[0]["weights"][name] == pytest.approx(checksum, abs=1e-6), name
        assert ranks[1]["weights"][name] == ranks[0]["weights"][name], name


def _check_common(ranks, max_staleness=2):
    assert [r["global_step"] for r in ranks] == [6, 6]
    # weight syncs on every rank at the same steps (every weight_sync_steps=2)
    assert ranks[0]["sync_steps"] == ranks[1]["sync_steps"] == [2, 4, 6]
    for rank in ranks:  # the staleness bound holds on every step of every rank
        for take in rank["takes"]:
            assert all(take["step"] - p <= max_staleness for p in take["policy_steps"]), take


def test_per_rank_generators_shard_prompts_sync_together_and_aggregate_metrics(tmp_path):
    done, ranks = _launch(tmp_path, "--phase", "on_policy")
    assert done.returncode == 0 and len(ranks) == 2, _launched(done)
    _check_common(ranks)

    prompts = [set(r["consumed_prompts"]) for r in ranks]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]  # no prompt on two ranks
    assert all(i % 2 == rank for rank in (0, 1) for i in prompts[rank])  # each rank samples from its own shard
    assert all(len(r["consumed_prompts"]) == 6 * 4 for r in ranks)

    logged = [e for e in ranks[0]["log_history"] if "npd/version" in e and "loss" in e]
    local = [r["local_logs"] for r in ranks]
    assert len(logged) == 3 and all(len(windows) >= 3 for windows in local)
    for window, entry in enumerate(logged):  # rank 0 logs what every rank saw, combined
        mine, theirs = local[0][window], local[1][window]
        assert entry["npd/staleness_max"] == max(mine["npd/staleness_max"], theirs["npd/staleness_max"])
        assert entry["npd/staleness_mean"] == pytest.approx(
            (mine["npd/staleness_mean"] + theirs["npd/staleness_mean"]) / 2
        )
        for summed in ("npd/dropped_stale", "npd/buffer_size", "npd/gen_samples_per_s"):
            assert entry[summed] == pytest.approx(mine[summed] + theirs[summed]), summed
        assert entry["npd/policy_kl"] == pytest.approx(mine["npd/policy_kl"]) == pytest.approx(theirs["npd/policy_kl"])


def test_a_shared_generator_on_the_main_process_feeds_every_rank(tmp_path):
    # lmbda=0.5 mixes on- and off-policy micro-batches: every rank must draw alike, or rank 0 would wait in the
    # scatter while rank 1 reduces gradients (the worker also draws from Python's RNG on rank 1 only)
    done, ranks = _launch(tmp_path, "--phase", "on_policy", "--shared", "--lmbda", "0.5")
    assert done.returncode == 0 and len(ranks) == 2, _launched(done)
    _check_common(ranks)
    # the main process took both ranks' micro-batches (2 x 4 per on-policy step) from its one generator
    on_policy_steps = len(ranks[0]["takes"])
    assert 0 < on_policy_steps < 6, on_policy_steps
    assert len(ranks[0]["consumed_prompts"]) == on_policy_steps * 8 and ranks[1]["consumed_prompts"] == []
    assert any(i % 2 == 1 for i in ranks[0]["consumed_prompts"])  # from the whole train set, not a shard
    logged = [e for e in ranks[0]["log_history"] if "npd/version" in e and "loss" in e]
    for window, entry in enumerate(logged):  # rank 1 has no buffer, so it reports no wait of its own
        assert entry["npd/wait_s"] == pytest.approx(ranks[0]["local_logs"][window]["npd/wait_s"])
        assert "npd/wait_s" not in ranks[1]["local_logs"][window]


def test_checkpoints_keep_every_ranks_prompt_stream_and_each_rank_resumes_its_own(tmp_path):
    done, ranks = _launch(tmp_path, "--phase", "resume")
    assert done.returncode == 0 and len(ranks) == 2, _launched(done)
    assert [r["global_step"] for r in ranks] == [6, 6]
    with open(tmp_path / "run" / "checkpoint-4" / "npd_state.json") as f:
        saved = json.load(f)["stream_positions"]
    assert saved == [r["position_at"]["4"] for r in ranks]  # one position per rank, as each rank had it
    # after the resume, each rank's stream continued exactly where its own had stopped
    assert [r["first_position_resumed"] for r in ranks] == saved


def _wait_until_gone(marker: str, timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_a_generator_failure_on_one_rank_stops_every_rank_with_the_reason_and_leaves_nothing(tmp_path):
    marker = uuid.uuid4().hex
    start = time.monotonic()
    done, ranks = _launch(tmp_path, "--phase", "fail", marker=marker, timeout_s=240)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode != 0 and not ranks, _launched(done)  # no rank finished its 200 steps
    assert "The background generator failed" in output and "late boom on rank 1" in output, _launched(done)
    assert elapsed < 120, elapsed  # the healthy rank did not wait on its peer until a timeout
    left = _wait_until_gone(marker, timeout_s=15)
    assert not left, [(p.pid, p.cmdline()) for p in left]  # no trainer or generator process outlived the launch


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import multi_rank_worker as w
    from trl_npd import NearPolicyDistillTrainer
    from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    args = w.config({out!r}, max_steps=100000, lmbda=1.0, use_cpu=False)
    trainer = NearPolicyDistillTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
        teacher_model=build_model(tokenizer, hidden_size=64, num_layers=2, seed=2),
        args=args, train_dataset=arithmetic_dataset(64), processing_class=tokenizer,
    )
    trainer.train()
    """
)


def test_a_generator_process_exits_when_its_trainer_is_killed(tmp_path):
    """A launcher stops the other ranks with a signal, which runs no cleanup: their generators must not outlive it."""
    script = tmp_path / "train.py"
    script.write_text(ORPHAN_SCRIPT.format(tests=HERE, out=str(tmp_path / "out")))
    marker = uuid.uuid4().hex
    trainer = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "NPD_TEST_LAUNCH": marker, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        generators = []
        while not generators and time.monotonic() < deadline and trainer.poll() is None:
            generators = [p for p in psutil.Process(trainer.pid).children() if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.5)
        assert generators, "the generator process never started"
        time.sleep(3)  # let it get to work
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        _, alive = psutil.wait_procs(generators, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for process in processes_with_marker(marker):
            process.kill()
