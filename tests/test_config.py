import contextlib
import logging
import warnings

import pytest
import torch

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


def test_generation_batch_defaults_to_the_staleness_budget_and_the_buffer_to_one_batch(tmp_path):
    args = config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, lmbda=1.0)
    # 6 on-policy samples per optimizer step, (max_staleness 8 - weight_sync_steps 4 + 2) / 3 = 2 steps' worth
    assert args.generation_sizes(world_size=1) == (12, 12)
    looser = config(
        tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, lmbda=1.0, max_staleness=12
    )
    assert looser.generation_sizes(world_size=1) == (18, 18)  # (12 - 4 + 2) / 3 = 3 steps' worth, rounded down
    assert args.generation_sizes(world_size=2) == (24, 24)  # a shared generator samples for both ranks
    half = config(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=2, lmbda=0.5)
    assert half.generation_sizes(world_size=1) == (6, 6)  # half the samples are on-policy, so half the batch
    tight = config(tmp_path, per_device_train_batch_size=3, lmbda=1.0, weight_sync_steps=4, max_staleness=3)
    assert tight.generation_sizes(world_size=1) == (3, 3)  # never less than one step's worth
    explicit = config(tmp_path, generation_batch_size=5, buffer_size=7, per_device_train_batch_size=2)
    assert explicit.generation_sizes(world_size=1) == (5, 7)
    # a batch smaller than a micro-batch: the default buffer still holds the micro-batch an on-policy draw takes
    small = config(tmp_path, generation_batch_size=2, per_device_train_batch_size=4)
    assert small.generation_sizes(world_size=1) == (2, 4)


def test_the_defaults_leave_delta_ifd_off_and_weight_syncs_on_their_schedule(tmp_path):
    """Decided on the arenas (docs/design.md §25, §31): Δ-IFD off; drift measured, not a cause of early syncs."""
    args = NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none")
    assert args.ifd_filter is False and args.ifd_band == "tails"
    assert args.max_policy_kl is None


def test_gkd_fields_keep_their_meaning(tmp_path):
    args = config(tmp_path, lmbda=0.3, beta=0.1, seq_kd=True, temperature=0.7, max_new_tokens=17)
    assert (args.lmbda, args.beta, args.seq_kd, args.temperature, args.max_new_tokens) == (0.3, 0.1, True, 0.7, 17)


def test_bf16_left_unset_is_resolved_from_the_hardware_and_logged(tmp_path, caplog):
    """TRL's configs turn an unset bf16 into True, which a CPU-only machine refuses: here it resolves to float32."""
    with caplog.at_level(logging.INFO, logger="trl_npd.config"):
        args = NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none")
    assert torch.cuda.is_available() or (args.bf16, args.fp16) == (False, False)
    chosen = "bf16 mixed precision" if args.bf16 else "float32"
    assert any(f"bf16 was not set: training in {chosen}" in r.getMessage() for r in caplog.records)


def test_bf16_left_unset_is_true_on_a_bf16_accelerator(tmp_path, monkeypatch, caplog):
    import transformers.training_args

    from trl_npd import config as config_module

    for module in (config_module, transformers.training_args):  # a machine with an Ampere-class GPU, as both see it
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="trl_npd.config"):
        assert NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none").bf16 is True
    assert any("training in bf16 mixed precision" in r.getMessage() for r in caplog.records)
    assert NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is False
    assert NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none", bf16=False).bf16 is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a bf16-capable accelerator")
def test_an_explicit_bf16_on_a_cpu_only_machine_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="bf16=True, but this machine has no accelerator that trains in bf16"):
        NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none", bf16=True)
    # CPU bf16 autocast stays available on request
    assert NearPolicyDistillConfig(output_dir=str(tmp_path), report_to="none", bf16=True, use_cpu=True).bf16


def test_generator_mode_left_unset_is_a_process_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="trl_npd.config"):
        # a CPU-only machine too: the real-model arena decided it (docs/design.md)
        assert config(tmp_path).generator_mode == "process"
    assert "generator_mode was not set: 'process'" in caplog.text
    assert config(tmp_path, use_cpu=True, generator_device="cpu").generator_mode == "process"
    assert config(tmp_path, generator_device="cuda:1").generator_mode == "process"
    assert config(tmp_path, fsdp="full_shard").generator_mode == "process"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config(tmp_path, use_cpu=True).generator_mode == "process"


def one_warning(caught, text):
    """The one warning of `caught` whose message contains `text` (others, from transformers or TRL, are not ours)."""
    ours = [w for w in caught if text in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    return ours[0]


@contextlib.contextmanager
def no_warning_about(text):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert not [w for w in caught if text in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", ["process", "thread", "inline"])
def test_a_generator_mode_that_is_set_is_kept_without_a_word(tmp_path, mode):
    with no_warning_about("generator_mode"):
        assert config(tmp_path, generator_mode=mode).generator_mode == mode


def test_the_old_name_sync_warns_that_it_is_deprecated_and_runs_inline(tmp_path):
    with pytest.warns(FutureWarning) as caught:
        args = config(tmp_path, generator_mode="sync")
    warning = one_warning(caught, "generator_mode='sync' is deprecated: use generator_mode='inline'")
    assert args.generator_mode == "inline"  # what the trainer and the pipeline read: inline generation
    assert warning.filename == __file__  # points at the code that built the config


def test_the_generator_mode_default_leaves_vllm_and_sharded_launches_to_a_generator_of_their_own(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="trl_npd.config"), no_warning_about("generator_mode"):
        assert config(tmp_path, generation_backend="vllm").generator_mode == "thread"  # left unset: only logged
    assert "generator_mode was not set: 'thread' (the vLLM client lives in the trainer process" in caplog.text
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP turned on by accelerate's config, not by the args
    assert config(tmp_path).generator_mode == "process"


def test_generator_mode_process_asked_for_with_vllm_runs_as_a_thread_and_says_so(tmp_path):
    """The vLLM client lives in the trainer process; a requested mode is never changed silently."""
    with pytest.warns(UserWarning) as caught:
        args = config(tmp_path, generation_backend="vllm", generator_mode="process")
    warning = one_warning(caught, "generator_mode='process' runs as generator_mode='thread'")
    assert args.generator_mode == "thread"
    assert "the vLLM client lives in the trainer process" in str(warning.message)
    assert "a thread only waits on it" in str(warning.message)
    assert warning.filename == __file__
    with no_warning_about("generator_mode"):  # the modes vLLM runs as asked
        assert config(tmp_path, generation_backend="vllm", generator_mode="thread").generator_mode == "thread"
        assert config(tmp_path, generation_backend="vllm", generator_mode="inline").generator_mode == "inline"


def test_ifd_filter_is_a_bool_and_an_explicit_none_warns_that_it_is_deprecated(tmp_path):
    assert NearPolicyDistillConfig.__dataclass_fields__["ifd_filter"].default is False
    for backend in ("transformers", "vllm"):
        with pytest.warns(FutureWarning) as caught:
            args = config(tmp_path, ifd_filter=None, generation_backend=backend, generator_mode="thread")
        assert args.ifd_filter is False  # None always meant off
        assert one_warning(caught, "ifd_filter=None is deprecated").filename == __file__


def test_fused_loss_compile_resolves_to_a_bool(tmp_path):
    assert config(tmp_path, fused_loss_compile=True).resolved_fused_loss_compile() is True
    assert config(tmp_path, fused_loss_compile=False).resolved_fused_loss_compile() is False
    args = config(tmp_path)
    assert args.fused_loss_compile is None  # the field keeps what was asked: the trainer resolves it, once
    assert args.resolved_fused_loss_compile() is (args.device.type == "cuda")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ifd_band": "quantile"}, "ifd_band='quantile'"),
        ({"ifd_window": 256}, "ifd_window=256"),
        ({"ifd_quantiles": [0.2, 0.8]}, "ifd_quantiles=[0.2, 0.8]"),  # a list, as the command line gives it
        ({"ifd_delta_max": 0.5, "ifd_filter": False}, "ifd_delta_max=0.5"),
        ({"ifd_tail_width": 2.0, "generation_backend": "vllm"}, "ifd_tail_width=2.0"),
    ],
)
def test_a_delta_ifd_setting_without_ifd_filter_warns_that_it_does_nothing(tmp_path, kwargs, named):
    """Δ-IFD is off by default, so `--ifd_band quantile` alone would be ignored: the config says so."""
    with pytest.warns(UserWarning, match="no effect without ifd_filter=True") as caught:
        args = config(tmp_path, **kwargs)
    assert args.ifd_filter is False
    ours = [w for w in caught if "no effect without ifd_filter=True" in str(w.message)]
    assert len(ours) == 1 and named in str(ours[0].message), [str(w.message) for w in ours]
    assert ours[0].filename == __file__  # points at the code that built the config, not into trl_npd


def test_delta_ifd_settings_warn_about_nothing_at_the_defaults_or_with_ifd_filter_on(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config(tmp_path)
        config(tmp_path, ifd_filter=False, ifd_quantiles=[0.1, 0.9], ifd_window=1024)  # explicit, but the defaults
        config(tmp_path, ifd_filter=True, ifd_band="quantile", ifd_window=256)
    assert not [w for w in caught if "ifd_filter" in str(w.message)], [str(w.message) for w in caught]


def test_every_delta_ifd_setting_is_its_config_field_without_the_prefix(tmp_path):
    """The Δ-IFD settings go by one name from the config to the filter: `ifd_<name>` in the config is `<name>` in
    `DeltaIFDSettings`, which the filter reads. A field added on one side only would be silently ignored."""
    from dataclasses import fields

    from trl_npd.config import IFD_ONLY_FIELDS
    from trl_npd.selection import CONFIG_PREFIX, DeltaIFDSettings

    assert {CONFIG_PREFIX + f.name for f in fields(DeltaIFDSettings)} == set(IFD_ONLY_FIELDS)
    assert DeltaIFDSettings.from_config(config(tmp_path)) is None  # Δ-IFD is off by default
    changed = dict(
        ifd_band="absolute",
        ifd_tail_width=2.0,
        ifd_max_drop_frac=0.1,
        ifd_delta_min=-0.5,
        ifd_delta_max=0.5,
        ifd_quantiles=[0.2, 0.7],  # a list, as the command line parses it
        ifd_window=64,
        ifd_max_rejected_in_a_row=9,
    )
    settings = DeltaIFDSettings.from_config(config(tmp_path, ifd_filter=True, **changed))
    assert settings == DeltaIFDSettings(
        band="absolute",
        delta_min=-0.5,
        delta_max=0.5,
        quantiles=(0.2, 0.7),
        window=64,
        max_rejected_in_a_row=9,
        tail_width=2.0,
        max_drop_frac=0.1,
    )


def test_the_pipeline_settings_come_from_the_config_in_one_place(tmp_path):
    from types import SimpleNamespace

    from trl_npd.pipeline import PipelineSettings

    args = config(tmp_path, generator_mode="thread", max_new_tokens=7, temperature=0.5, seed=3, teacher_top_k=5)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, bos_token_id=1)
    common = dict(tokenizer=tokenizer, device="cpu", num_threads=None, version=4, step=8)
    settings = PipelineSettings.from_config(
        args, generation_config=SimpleNamespace(eos_token_id=None), weights_sharded=False, **common
    )
    assert (settings.mode, settings.version, settings.step, settings.seed) == ("thread", 4, 8, 3)
    assert (settings.generation_batch_size, settings.buffer_size) == args.generation_sizes(1)
    assert (settings.engine.max_new_tokens, settings.engine.temperature) == (7, 0.5)
    assert (settings.engine.pad_token_id, settings.engine.eos_token_id, settings.bos_token_id) == (0, 2, 1)
    assert settings.teacher_top_k == 5 and settings.delta_ifd is None and settings.bootstrap is True
    # the model's generation config names the EOS tokens; sharded weights cannot sample on one rank alone
    sharded = PipelineSettings.from_config(
        args, generation_config=SimpleNamespace(eos_token_id=[2, 9]), weights_sharded=True, **common
    )
    assert sharded.engine.eos_token_id == [2, 9] and sharded.bootstrap is False
