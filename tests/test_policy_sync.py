"""The policy version's one owner (`PolicySync`) and the generator's checkpoint state (`NPDState`), on their own.

The trainer tests cover them in training (the sync schedule, a drift refresh, a stale snapshot refreshed, a killed
run resumed); these pin each decision and each file format down without a model."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from trl_npd.checkpoint import NPD_STATE_NAME, NPDState, read_npd_state, write_npd_state
from trl_npd.policy_sync import PolicySync, drift_of_samples


def config(**fields) -> SimpleNamespace:
    return SimpleNamespace(**fields)


def test_the_decisions_follow_the_config_as_it_is_now():
    args = config(weight_sync_steps=4, max_policy_kl=None, max_staleness=8)
    policy = PolicySync(args)
    args.weight_sync_steps, args.max_policy_kl = 3, 0.5  # as a hyperparameter search sets them, in place
    assert policy.reason_to_publish(3, 0.0) == "schedule" and policy.reason_to_publish(4, 0.6) == "drift"


def test_a_file_with_both_position_keys_resumes_each_stream_at_its_own(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / NPD_STATE_NAME).write_text(json.dumps({"stream_position": 9, "stream_positions": [4, 6]}))
    state = read_npd_state(str(folder), str(tmp_path))
    assert [state.stream_position(rank, 2) for rank in (0, 1)] == [4, 6]


def test_a_fresh_run_starts_at_version_0_and_a_resumed_one_after_its_checkpoint():
    policy = PolicySync(config(weight_sync_steps=4, max_policy_kl=None, max_staleness=8))
    assert policy.version == -1  # nothing published yet
    policy.begin(last_version=-1, step=0)
    assert (policy.version, policy.synced_step) == (0, 0)
    policy.begin(last_version=6, step=40)  # resumed from a checkpoint that recorded version 6
    assert (policy.version, policy.synced_step) == (7, 40)
    policy.published(43)
    assert (policy.version, policy.synced_step, policy.lag(45)) == (8, 43, 2)


@pytest.mark.parametrize(
    ("step", "kl", "max_policy_kl", "reason"),
    [
        (4, 0.0, None, "schedule"),  # every weight_sync_steps steps
        (8, 5.0, 0.01, "schedule"),  # the schedule names the sync even when the drift would have
        (5, 0.02, 0.01, "drift"),  # at once when the step's drift exceeds the bound
        (5, 0.01, 0.01, None),  # at the bound: not beyond it
        (5, 9.0, None, None),  # no bound: the schedule only
    ],
)
def test_after_a_step_the_schedule_then_the_drift_decide_whether_to_publish(step, kl, max_policy_kl, reason):
    policy = PolicySync(config(weight_sync_steps=4, max_policy_kl=max_policy_kl, max_staleness=8))
    assert policy.reason_to_publish(step, kl) == reason


def test_a_snapshot_is_too_stale_only_past_the_bound():
    policy = PolicySync(config(weight_sync_steps=4, max_policy_kl=None, max_staleness=3))
    policy.begin(last_version=-1, step=10)
    assert not policy.snapshot_too_stale(13)  # a sample made now is 3 steps old: still within the bound
    assert policy.snapshot_too_stale(14)


def test_the_step_drift_sums_the_micro_batches_and_starts_again_at_each_step():
    policy = PolicySync(config(weight_sync_steps=4, max_policy_kl=None, max_staleness=8))
    policy.add_drift(torch.tensor([0.5, 1.5]))
    policy.add_drift(torch.tensor([1.0]))
    assert policy.take_step_drift() == (3.0, 3)
    assert policy.take_step_drift() == (0.0, 0)


def test_each_sample_gets_its_staleness_and_its_mean_drift_over_its_trained_tokens():
    # two samples in one row (packed): positions 1-3 belong to sample 0, 4-5 to sample 1; position 3 is not trained
    sample_index = torch.tensor([[0, 0, 0, 0, 1, 1]])
    mask = torch.tensor([[True, True, False, True, True]])  # over the shifted positions 1..5
    k3 = torch.tensor([0.2, 0.4, 1.0, 3.0])  # the trained positions' drift, in order
    staleness, drift, tokens = drift_of_samples(torch.tensor([5, 7]), sample_index, k3, mask, step=8)
    assert staleness == [3, 1]
    assert drift == pytest.approx([0.3, 2.0])
    assert tokens == [2, 2]


def test_the_checkpoint_state_round_trips_and_each_stream_resumes_at_its_own_position(tmp_path):
    write_npd_state(str(tmp_path / "checkpoint-4"), NPDState(policy_version=3, stream_positions=[12, 20]))
    state = read_npd_state(str(tmp_path / "checkpoint-4"), str(tmp_path))
    assert state == NPDState(policy_version=3, stream_positions=[12, 20])
    assert [state.stream_position(rank, 2) for rank in (0, 1)] == [12, 20]
    assert read_npd_state(True, str(tmp_path)).policy_version == 3  # the last checkpoint, found by itself


def test_another_number_of_streams_restarts_the_prompts_with_a_warning(caplog):
    state = NPDState(policy_version=3, stream_positions=[12, 20])
    with caplog.at_level(logging.WARNING, logger="trl_npd.checkpoint"):
        assert state.stream_position(0, 1) == 0
    assert "restart from the beginning" in caplog.text


def test_an_older_checkpoint_with_one_position_resumes_every_stream_there(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / NPD_STATE_NAME).write_text(json.dumps({"policy_version": 1, "stream_position": 9}))
    state = read_npd_state(str(folder), str(tmp_path))
    assert state.policy_version == 1 and [state.stream_position(rank, 2) for rank in (0, 1)] == [9, 9]


def test_no_state_file_or_no_resume_gives_a_fresh_state(tmp_path, caplog):
    assert read_npd_state(None, str(tmp_path)) == NPDState()
    assert read_npd_state(True, str(tmp_path)) == NPDState()  # no checkpoint at all: Trainer.train says so
    (tmp_path / "checkpoint-2").mkdir()
    with caplog.at_level(logging.WARNING, logger="trl_npd.checkpoint"):
        assert read_npd_state(str(tmp_path / "checkpoint-2"), str(tmp_path)) == NPDState()
    assert "restarts its prompt stream" in caplog.text
