"""What people watch while NPD trains: `npd/` scalars in report_to backends, the progress bar, completion tables."""

import glob
import os
import re

from trl_npd import NearPolicyDistillTrainer

NPD_SCALARS = {
    "npd/version",
    "npd/buffer_size",
    "npd/wait_s",
    "npd/wait_frac",
    "npd/dropped_stale",
    "npd/staleness_mean",
    "npd/staleness_max",
    "npd/policy_kl",
    "npd/ifd_kept_frac",
}


def train(student, teacher, tokenizer, dataset, args):
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    return trainer


def test_npd_scalars_reach_tensorboard(tmp_path, student, teacher, tokenizer, dataset, make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_config(
        generator_mode="inline",
        max_steps=4,
        logging_steps=2,
        report_to=["tensorboard"],
        ifd_filter=True,
        ifd_band="quantile",  # keeps a fixed share, so the run never waits on random models' Δ
    )
    train(student, teacher, tokenizer, dataset, args)
    # transformers writes under output_dir/runs/<date>_<host> unless TENSORBOARD_LOGGING_DIR says otherwise
    events = glob.glob(os.path.join(args.output_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert events, "no tensorboard event file was written"
    accumulator = EventAccumulator(events[0])
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    missing = {f"train/{name}" for name in NPD_SCALARS} - tags
    assert not missing, f"npd scalars missing from tensorboard: {sorted(missing)}"
    steps = [event.step for event in accumulator.Scalars("train/npd/staleness_mean")]
    assert steps == [2, 4]  # one value per logging step


def test_the_progress_bar_shows_version_buffer_and_lag(
    capsys, student, teacher, tokenizer, dataset, make_config, monkeypatch
):
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no monitor thread left behind
    args = make_config(generator_mode="inline", max_steps=3, disable_tqdm=False, logging_steps=100)
    train(student, teacher, tokenizer, dataset, args)
    bar = capsys.readouterr().err
    assert "version=" in bar and "buffer=" in bar and "lag=" in bar, bar[-500:]


def test_log_completions_prints_prompt_completion_delta_ifd_and_staleness(
    capsys, student, teacher, tokenizer, dataset, make_config
):
    args = make_config(
        generator_mode="inline",
        max_steps=2,
        logging_steps=2,
        log_completions=True,
        num_completions_to_print=3,
        ifd_filter=True,
        ifd_band="quantile",
    )
    trainer = train(student, teacher, tokenizer, dataset, args)
    out = capsys.readouterr().out
    for column in ("prompt", "completion", "Δ-IFD", "staleness"):
        assert column in out, column
    rows = trainer._generation.completion_log.rows(tokenizer)
    assert len(rows) == 3
    assert all("What is" in prompt for _, prompt, _, _, _ in rows)  # decoded prompts of the arithmetic data
    assert all(delta != "-" for *_, delta, _ in rows)  # Δ-IFD was scored
    assert re.search(r"What is \d+\+\d+", rows[0][1]).group() in out  # a trained prompt is in the printed table


def test_completions_are_not_kept_unless_asked(student, teacher, tokenizer, dataset, make_config):
    trainer = train(student, teacher, tokenizer, dataset, make_config(generator_mode="inline", max_steps=1))
    assert trainer._generation.completion_log is None
