import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trl_npd.batching import Sequence, pad_sequences
from trl_npd.losses import distillation_loss
from trl_npd.packing import attends_per_sample, first_fit_decreasing, pack_sequences, row_token_budget
from trl_npd.toy import build_model


def random_sequences(lengths, prompt_len=3, seed=0, with_logprobs=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        out.append(
            Sequence(
                input_ids=ids,
                labels=[-100] * prompt_len + ids[prompt_len:],
                behaviour_logprobs=[0.0] * prompt_len + [-1.0] * (n - prompt_len) if with_logprobs else None,
                policy_step=0 if with_logprobs else None,
            )
        )
    return out


def test_first_fit_decreasing_places_everything_once_within_the_budget():
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    bins = first_fit_decreasing(lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens into bins of 10: FFD reaches the lower bound here


def test_packed_layout_restarts_positions_and_masks_each_first_token():
    sequences = random_sequences([6, 4, 9], prompt_len=2, with_logprobs=True)
    batch, stats = pack_sequences(sequences, max_tokens_per_row=10, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 10)  # rows [9] and [6, 4] (FFD), width of the fullest
    assert batch["position_ids"][1].tolist() == list(range(6)) + list(range(4))
    assert batch["position_ids"][0].tolist() == [*range(9), 0]  # tail padding: a segment of its own
    assert batch["labels"][1, 6] == -100 and batch["labels"][1, 0] == -100
    assert batch["labels"][0, 9] == -100
    assert "attention_mask" not in batch
    assert stats.row_fill == pytest.approx(19 / 20) and stats.pad_frac == pytest.approx(1 / 20)
    assert batch["policy_step"].tolist() == [0, 0, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_sample_the_logits_it_gets_alone_in_train_mode(tokenizer, attention):
    model = build_model(tokenizer, hidden_size=32, num_layers=2, seed=3)
    model.config._attn_implementation = attention
    model.train()  # train mode: where a default cache would silently merge the packed samples
    sequences = random_sequences([9, 7, 12, 4])
    batch, _ = pack_sequences(sequences, max_tokens_per_row=16, pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, 16)  # [12, 4] and [9, 7]: each row masked by its own position_ids
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    checked = 0
    for row in range(batch["input_ids"].shape[0]):
        starts = [*(batch["position_ids"][row] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
        for start, end in itertools.pairwise(starts):
            alone = model(input_ids=batch["input_ids"][row : row + 1, start:end], use_cache=False).logits
            torch.testing.assert_close(
                torch.log_softmax(packed[row, start:end], -1), torch.log_softmax(alone[0], -1), atol=1e-5, rtol=1e-5
            )
            checked += 1
    assert checked == 4  # one segment per sample (the rows are full, so no padding segment)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tokenizer, fused, beta):
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=4).train()
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=5).eval()
    sequences = random_sequences([11, 6, 14, 8, 5], seed=1)
    packed, _ = pack_sequences(sequences, max_tokens_per_row=24, pad_token_id=tokenizer.pad_token_id)
    padded = pad_sequences(sequences, tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed

    def loss_and_grads(batch):
        student.zero_grad()
        result = distillation_loss(student, teacher, batch, beta, fused=fused)
        result.loss_sum.backward()
        return result, {n: p.grad.clone() for n, p in student.named_parameters()}

    packed_result, packed_grads = loss_and_grads(packed)
    padded_result, padded_grads = loss_and_grads(padded)
    assert packed_result.num_tokens == padded_result.num_tokens == sum(len(s.input_ids) - 3 for s in sequences)
    torch.testing.assert_close(packed_result.loss_sum, padded_result.loss_sum, atol=1e-5, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_a_sequence_longer_than_the_budget_does_not_stretch_the_other_rows():
    sequences = random_sequences([15, 8, 7], prompt_len=2)
    batch, stats = pack_sequences(sequences, max_tokens_per_row=10, pad_token_id=0)
    assert batch["input_ids"].shape == (3, 15)  # [15] alone; 8 and 7 cannot share a row of 10
    for row, sequence in zip(batch["input_ids"], sequences, strict=True):  # FFD order is the given order here
        n = len(sequence.input_ids)
        assert row[:n].tolist() == sequence.input_ids  # each short row holds one sequence, then padding
    assert batch["position_ids"][1, 8] == 0 and batch["position_ids"][2, 7] == 0  # padding segments start there
    assert stats.row_fill == pytest.approx(30 / (3 * 10))


def test_models_that_ignore_position_ids_are_detected_and_trained_on_padded_rows(tokenizer, dataset, make_config):
    from transformers import BloomConfig, BloomForCausalLM

    from trl_npd import NearPolicyDistillTrainer
    from trl_npd.packing import packing_leaks

    def bloom(seed):
        torch.manual_seed(seed)
        return BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4))

    student, teacher = bloom(0), bloom(1)
    assert packing_leaks(student, len(tokenizer))  # ALiBi: packed samples would see each other
    assert not packing_leaks(build_model(tokenizer), len(tokenizer))
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=make_config(), train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer.args.padding_free and not trainer._batches.pack


def test_dense_attention_caps_rows_at_the_longest_sequence_and_still_drops_padding():
    lengths = [10, 4, 4, 6, 5]
    assert row_token_budget(lengths, 16, per_sample_attention=True) == sum(lengths)  # one row: see the flash test
    assert row_token_budget(lengths, None, per_sample_attention=True) == sum(lengths)
    budget = row_token_budget(lengths, 1024, per_sample_attention=False)
    assert budget == 10
    batch, stats = pack_sequences(random_sequences(lengths), budget, pad_token_id=0)
    padded = pad_sequences(random_sequences(lengths), pad_token_id=0)
    # never wider than the padded batch, so a dense attention never costs more than padding does ...
    assert batch["input_ids"].shape[1] == padded["input_ids"].shape[1] == 10
    # ... while short sequences still share rows: [10], [6, 4], [5, 4]
    assert batch["input_ids"].shape[0] == 3 and stats.pad_frac < 1 - sum(lengths) / padded["input_ids"].numel()


def test_only_varlen_attention_counts_as_per_sample():
    def model(implementation):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation))

    for name in ("flash_attention_2", "flash_attention_3", "flex_attention", "kernels-community/flash-attn3"):
        assert attends_per_sample(model(name)), name
    for name in ("sdpa", "eager", None):
        assert not attends_per_sample(model(name)), name


def test_the_trainer_packs_rows_no_wider_than_the_longest_sample_under_sdpa(tokenizer, dataset, make_config):
    from trl_npd import NearPolicyDistillTrainer

    student, teacher = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    trainer = NearPolicyDistillTrainer(
        model=student, teacher_model=teacher, args=make_config(), train_dataset=dataset, processing_class=tokenizer
    )
    assert trainer._batches.pack and not trainer._batches.per_sample_attention  # toy models run SDPA on CPU
    batch = trainer._batches.build(random_sequences([12, 5, 4, 7, 4]))
    assert batch["input_ids"].shape == (3, 12)  # [12], [7, 5], [4, 4]


def reference_flash_kernels():
    """flash-attn's two entry points, written with SDPA so that they run on CPU: `flash_attn_func` attends within each
    row of a (batch, seq, heads, dim) batch, `flash_attn_varlen_func` within each segment of a flattened batch."""

    def attend(q, k, v, causal, softmax_scale):  # one sequence, (seq, heads, dim)
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=True)
        return out.transpose(0, 1)

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
        return torch.stack([attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, causal=False, softmax_scale=None
    ):
        bounds = itertools.pairwise(cu_seqlens_q.tolist())
        return torch.cat([attend(q[s:e], k[s:e], v[s:e], causal, softmax_scale) for s, e in bounds])

    return flash_attn_func, flash_attn_varlen_func


def test_flash_attention_gets_the_micro_batch_as_one_row_because_it_only_unpacks_a_single_row(tokenizer, monkeypatch):
    """transformers' own flash-attention dispatch, with reference kernels standing in for flash-attn (no GPU here).

    It detects packed samples from `position_ids` only in a batch of one row; a batch of several rows runs each row
    as one causal sequence, so its samples see each other. The packed layout trl_npd trains must therefore be one row.
    """
    import transformers.modeling_flash_attention_utils as flash_utils

    flash_attn_func, flash_attn_varlen_func = reference_flash_kernels()
    kernels = (flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input)
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)  # load the reference kernels, not a cached one
    model = build_model(tokenizer, hidden_size=32, num_layers=2, seed=3).train()
    model.config._attn_implementation = "flash_attention_2"
    assert attends_per_sample(model)
    sequences = random_sequences([7, 12, 5, 9])
    lengths = [len(s.input_ids) for s in sequences]

    def worst_error(batch):  # largest log-prob difference between a packed sample and the same sample alone
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for row in range(batch["input_ids"].shape[0]):
            starts = [*(batch["position_ids"][row] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
            for start, end in itertools.pairwise(starts):
                alone = model(input_ids=batch["input_ids"][row : row + 1, start:end], use_cache=False).logits
                difference = torch.log_softmax(packed[row, start:end], -1) - torch.log_softmax(alone[0], -1)
                worst = max(worst, difference.abs().max().item())
        return worst

    # rows of at most 16 tokens, [12], [9, 7], [5]: the samples sharing the second row see each other
    several_rows, _ = pack_sequences(sequences, max_tokens_per_row=16, pad_token_id=tokenizer.pad_token_id)
    assert several_rows["input_ids"].shape[0] == 3 and worst_error(several_rows) > 1e-2
    # trl_npd's layout under per-sample attention, whatever max_length: one row, which transformers unpacks
    budget = row_token_budget(lengths, 16, per_sample_attention=True)
    batch, _ = pack_sequences(sequences, budget, pad_token_id=tokenizer.pad_token_id)
    assert worst_error(batch) < 1e-5
    assert batch["input_ids"].shape == (1, sum(lengths))
