"""Offline NPD quickstart: distil a tiny teacher into a tinier student on CPU, with no model hub.

    python examples/quickstart.py

It builds a byte-level BPE tokenizer, a teacher and a student (random Qwen3-shaped models) and an arithmetic chat
dataset locally, runs near-policy distillation for a few dozen steps with the generator in its own process, and
prints the loss and the `npd/` metrics. A real run loads models with `from_pretrained` instead; the rest is the same.
The generator process is the default (`generator_mode=None`); the example sets it to show where it is chosen.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from trl_npd import NearPolicyDistillConfig, NearPolicyDistillTrainer
from trl_npd.toy import arithmetic_dataset, build_model, build_tokenizer


def main() -> None:
    tokenizer = build_tokenizer()
    teacher = build_model(tokenizer, hidden_size=128, num_layers=4, seed=2)
    student = build_model(tokenizer, hidden_size=64, num_layers=2, seed=1)
    args = NearPolicyDistillConfig(
        output_dir="outputs/quickstart",
        max_steps=120,  # long enough for the generator process to take over from the trainer's own sampling
        generator_mode="process",  # the default: a background generator that samples while the optimizer trains
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        lmbda=1.0,  # every batch is answered by the student (pure on-policy)
        beta=0.0,  # forward KL, which tolerates slightly stale samples best
        max_new_tokens=24,
        max_length=128,
        weight_sync_steps=4,
        max_staleness=8,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = NearPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=arithmetic_dataset(512),
        processing_class=tokenizer,
    )
    trainer.train()

    print("\nstep  loss      " + "  ".join(f"{k.removeprefix('npd/'):>16}" for k in SHOWN))
    for entry in trainer.state.log_history:
        if "loss" in entry:
            values = "  ".join(f"{entry.get(k, float('nan')):>16.4g}" for k in SHOWN)
            print(f"{entry['step']:>4}  {entry['loss']:<8.4f}  {values}")
    totals = trainer.npd_metrics.totals
    print(
        f"\n{totals.generated_samples} samples generated, {totals.consumed_samples} trained on, "
        f"{totals.dropped['stale']} dropped as stale, "
        f"{totals.unused()} unused at the end; {totals.weight_syncs['drift']} weight syncs brought forward by "
        f"max_policy_kl on top of {totals.weight_syncs['schedule']} scheduled; "
        f"{totals.bootstrap_samples} sampled by the trainer itself in "
        f"{totals.bootstrap_s:.1f} s while the generator process started, after which it waited {totals.wait_s:.1f} s "
        "on the buffer."
    )


SHOWN = [
    "npd/version",
    "npd/staleness_mean",
    "npd/staleness_max",
    "npd/policy_kl",
    "npd/drift_refreshes",
    "npd/wait_s",
    "npd/gen_samples_per_s",
]

if __name__ == "__main__":
    main()
