"""Run by `accelerate launch --num_processes 2 --cpu` from test_multi_rank.py, and in-process for the
single-process reference. Each phase writes what the test checks to `--out`, one JSON file per rank.

- `loss`: one off-policy step (lmbda=0, SGD) on the whole train set as the global batch: the loss and the updated
  weights must equal a single process's on the same global batch.
- `on_policy`: a few on-policy steps with per-rank (or, with --shared, one shared) generators: prompts, weight
  syncs, staleness and the logged metrics of every rank.
- `fail`: rank 1's generator fails mid-training; the launch must end, with the reason, and leave nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `helpers`, also in the spawned generators

import torch
from helpers import FailsOnRank1

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
from trl_npd.metrics import NPDMetrics
from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer

MICRO_BATCH = 4
GLOBAL_BATCH = 8


class LossRecordingTrainer(NearPolicyDistillTrainer):
    """Records the loss of every training micro-batch, as this rank computed it."""

    losses: list[float]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.losses.append(loss.item())
        return loss


def config(out: str, **overrides) -> NearPolicyDistillConfig:
    values = dict(
        output_dir=out,
        per_device_train_batch_size=MICRO_BATCH,
        max_new_tokens=8,
        max_length=96,
        report_to="none",
        save_strategy="no",
        bf16=False,
        seed=0,
        disable_tqdm=True,
        ifd_filter=False,
        # these runs are a few steps long: with the bootstrap the trainers would sample them all inline, before the
        # generator processes whose streams, syncs and failures are under test have started
        generator_bootstrap=False,
        max_policy_kl=None,  # syncs at the scheduled steps only, which the tests compare across ranks
        generator_mode="process",  # the generator processes are under test (pinned, whatever the default)
        dataloader_num_workers=0,
        use_cpu=True,  # with torchrun's variables set, this makes accelerate take the multi-CPU (gloo) path
    )
    values.update(overrides)
    return NearPolicyDistillConfig(**values)


def finish(trainer: NearPolicyDistillTrainer) -> None:
    """End as a script should (the `trl-npd` CLI does too): `Trainer.end` destroys the process group. Left to
    interpreter exit, gloo's teardown can abort a rank ("terminate called without an active exception")."""
    if trainer.args.world_size > 1:
        trainer.end()


def run_loss_step(out: str, world_size: int) -> dict:
    """One SGD step on a global batch of `GLOBAL_BATCH` rows, the whole train set, split over `world_size` processes;
    returns this rank's loss (as DDP scales it), the logged loss and a checksum of every updated weight."""
    tokenizer = build_tokenizer()
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)
    dataset = arithmetic_dataset(GLOBAL_BATCH, seed=0)
    args = config(
        out,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        max_steps=1,
        lmbda=0.0,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    trainer = LossRecordingTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.losses = []
    trainer.train()
    finish(trainer)
    weights = {name: p.detach().double().sum().item() for name, p in student.named_parameters()}
    return {"loss": trainer.losses[0], "weights": weights, "logged_loss": trainer.state.log_history[0]["loss"]}


def run_on_policy(out: str, shared: bool, lmbda: float) -> dict:
    tokenizer = build_tokenizer()
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    teacher = build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)
    dataset = arithmetic_dataset(64, seed=0)
    args = config(
        out,
        max_steps=6,
        lmbda=lmbda,
        weight_sync_steps=2,
        max_staleness=2,
        logging_steps=2,
        shared_generator=shared,
        generation_batch_size=8,
    )
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    consumed, takes, local_logs = [], [], []
    record_take, flush = NPDMetrics.record_take, NPDMetrics.flush

    def recording_take(self, result, current_step):
        consumed.extend(s.prompt_index for s in result.samples)
        takes.append({"step": current_step, "policy_steps": [s.policy_step for s in result.samples]})
        record_take(self, result, current_step)

    def recording_flush(self, version, buffer_size):
        logs = flush(self, version, buffer_size)
        local_logs.append(logs)
        return logs

    NPDMetrics.record_take, NPDMetrics.flush = recording_take, recording_flush
    if os.environ.get("RANK") == "1":  # something on one rank only draws from Python's RNG (a callback, a logger)
        random.random()
    trainer.train()
    finish(trainer)
    totals = trainer.npd_metrics.totals
    return {
        "consumed_prompts": consumed,
        "takes": takes,
        "sync_steps": totals.sync_steps,
        "max_staleness_seen": totals.max_staleness_seen,
        "local_logs": local_logs,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
    }


def run_resume(out: str) -> dict:
    """Train 4 steps with checkpoints every 2, then resume from the last one to step 6 with fresh models."""
    tokenizer = build_tokenizer()
    dataset = arithmetic_dataset(64, seed=0)
    positions, first_resumed = {}, []
    record_take = NPDMetrics.record_take

    def recording_take(self, result, current_step):
        # the main stream's samples; those the trainer sampled inline while the generator started (the bootstrap)
        # come from a side stream of their own, at position -1
        streamed = [s.stream_position for s in result.samples if s.stream_position >= 0]
        if resumed and streamed and not first_resumed:
            first_resumed.append(min(streamed))
        record_take(self, result, current_step)

    NPDMetrics.record_take = recording_take
    for max_steps, resumed in ((4, False), (6, True)):
        args = config(
            out,
            max_steps=max_steps,
            lmbda=1.0,
            weight_sync_steps=2,
            max_staleness=2,
            save_strategy="steps",
            save_steps=2,
        )
        trainer = NearPolicyDistillTrainer(
            model=build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
            teacher_model=build_model(tokenizer, hidden_size=64, num_layers=2, seed=2),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train(resume_from_checkpoint=resumed or None)
        positions[max_steps] = trainer._generation.next_stream_position
    finish(trainer)
    return {
        "position_at": positions,
        "first_position_resumed": first_resumed[0],
        "global_step": trainer.state.global_step,
    }


def run_failing(out: str) -> dict:
    tokenizer = build_tokenizer()
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    student.__class__ = FailsOnRank1  # same weights; its generate fails on rank 1 at the second batch
    teacher = build_model(tokenizer, hidden_size=64, num_layers=2, seed=2)
    args = config(out, max_steps=200, lmbda=1.0, weight_sync_steps=2, max_staleness=2, generation_batch_size=4)
    trainer = NearPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=arithmetic_dataset(64),
        processing_class=tokenizer,
    )
    trainer.train()
    return {"global_step": trainer.state.global_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["loss", "on_policy", "resume", "fail"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", action="store_true")
    parser.add_argument("--lmbda", type=float, default=1.0)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cli.phase == "loss":
        result = run_loss_step(os.path.join(cli.out, "run"), world_size)
    elif cli.phase == "on_policy":
        result = run_on_policy(os.path.join(cli.out, "run"), cli.shared, cli.lmbda)
    elif cli.phase == "resume":
        result = run_resume(os.path.join(cli.out, "run"))
    else:
        result = run_failing(os.path.join(cli.out, "run"))
    with open(os.path.join(cli.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Results are written and the process group is destroyed (`finish`). The interpreter's teardown of a gloo
        # rank still aborts now and then in torch's C++ destructors ("terminate called without an active
        # exception", exit -6; 2 tests in 1 of 4 clean CI rehearsals): end here so that cannot fail a finished rank.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
