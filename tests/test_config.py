import pytest

from trl_npd import NearPolicyDistillConfig


def config(tmp_path, **kwargs):
    return NearPolicyDistillConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_staleness": -1}, "max_staleness must be >= 0"),
        ({"weight_sync_steps": 0}, "weight_sync_steps must be >= 1"),
        ({"generation_batch_size": 0}, "generation_batch_size must be >= 1"),
        ({"per_device_train_batch_size": 8, "generation_batch_size": 4, "buffer_size": 6}, "smaller than one batch"),
        ({"generation_batch_size": 16, "buffer_size": 8}, "smaller than one batch"),
        ({"weight_sync_steps": 10, "max_staleness": 4}, "training would starve"),
        ({"max_length": 64, "max_new_tokens": 64}, "no room for a prompt"),
        ({"generator_mode": "fork"}, "generator_mode must be one of"),
        ({"generation_backend": "sglang"}, "generation_backend must be one of"),
        ({"max_policy_kl": 0.0}, "max_policy_kl must be > 0"),
        ({"generator_num_threads": 0}, "generator_num_threads must be >= 1"),
        ({"lmbda": 1.5}, "lmbda must be in the range"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)


def test_batch_defaults_follow_the_training_batch(tmp_path):
    args = config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2)
    assert args.generation_batch_size == 2 * 3 * 2
    assert args.buffer_size == 2 * args.generation_batch_size
    explicit = config(tmp_path, generation_batch_size=5, buffer_size=7, per_device_train_batch_size=2)
    assert (explicit.generation_batch_size, explicit.buffer_size) == (5, 7)


def test_gkd_fields_keep_their_meaning(tmp_path):
    args = config(tmp_path, lmbda=0.3, beta=0.1, seq_kd=True, temperature=0.7, max_new_tokens=17)
    assert (args.lmbda, args.beta, args.seq_kd, args.temperature, args.max_new_tokens) == (0.3, 0.1, True, 0.7, 17)
