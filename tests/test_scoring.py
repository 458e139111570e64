import pytest
import torch
from tiny_models import build as build_tiny

from trl_npd.batching import pad_sequences, sequences_from_samples
from trl_npd.losses import distillation_loss
from trl_npd.packing import pack_sequences
from trl_npd.samples import Sample
from trl_npd.scoring import SampleScorer
from trl_npd.selection import delta_ifd
from trl_npd.toy import build_model


def make_samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (prompt_len, completion_len) in enumerate(lengths):
        ids = torch.randint(3, 500, (prompt_len + completion_len,), generator=g).tolist()
        samples.append(
            Sample(
                prompt_ids=ids[:prompt_len],
                completion_ids=ids[prompt_len:],
                behaviour_logprobs=[-1.0] * completion_len,
                policy_version=0,
                policy_step=0,
                prompt_index=i,
                stream_position=i,
            )
        )
    return samples


def test_stored_topk_is_the_teachers_topk_at_each_completion_token(tokenizer):
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=5).eval()
    samples = make_samples([(4, 6), (7, 3), (2, 9)])
    SampleScorer(teacher, top_k=5).score(samples)
    for s in samples:
        with torch.no_grad():
            logits = teacher(torch.tensor([s.prompt_ids + s.completion_ids]), use_cache=False).logits[0]
        # the distribution over completion token j comes from the position before it
        expected = torch.log_softmax(logits[len(s.prompt_ids) - 1 : -1], -1).topk(5, dim=-1)
        assert torch.equal(torch.tensor(s.teacher_topk_ids), expected.indices)
        torch.testing.assert_close(torch.tensor(s.teacher_topk_logprobs), expected.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_loss_from_stored_topk_equals_the_loss_from_a_teacher_forward(tokenizer, packed, fused):
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=4).train()
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=5).eval()
    samples = make_samples([(4, 6), (7, 3), (2, 9), (5, 5)])
    SampleScorer(teacher, top_k=4).score(samples)
    sequences = sequences_from_samples(samples)
    if packed:
        batch, _ = pack_sequences(sequences, max_tokens_per_row=20, pad_token_id=tokenizer.pad_token_id)
    else:
        batch = pad_sequences(sequences, tokenizer.pad_token_id)
    without = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}
    assert "teacher_topk_ids" in batch

    def run(inputs):
        student.zero_grad()
        result = distillation_loss(student, teacher, inputs, 0.5, fused=fused, teacher_top_k=4, ce_weight=0.1)
        result.loss_sum.backward()
        return result.loss_sum.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}

    stored_loss, stored_grads = run(batch)
    inline_loss, inline_grads = run(without)
    torch.testing.assert_close(stored_loss, inline_loss, atol=1e-5, rtol=1e-5)
    for name, grad in inline_grads.items():
        torch.testing.assert_close(stored_grads[name], grad, atol=1e-5, rtol=1e-4)


def _full_logprobs(model, ids):
    """Log-softmax of the model's own logits (its forward applies its soft-cap or scale) at each position."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), -1)


def _mean_nll(logprobs, ids, first):
    """Mean NLL of ids[first:] under the positions before them."""
    return -logprobs[first - 1 : -1].gather(-1, torch.tensor(ids[first:])[:, None]).mean().item()


@pytest.mark.parametrize(
    ("teacher_name", "student_name"),
    [("Gemma 2", "Granite"), ("Cohere", "Gemma 2")],
    ids=["softcapped-teacher", "scaled-teacher"],
)
def test_topk_and_delta_ifd_of_transformed_models_equal_their_full_logits(tokenizer, teacher_name, student_name):
    # soft-cap 1.0: these random models' logits are small, and the checkpoints' 30 would change nothing visible
    softcap = {"final_logit_softcapping": 1.0}
    teacher = build_tiny(teacher_name, tokenizer, seed=5, **(softcap if teacher_name == "Gemma 2" else {})).eval()
    student = build_tiny(student_name, tokenizer, seed=6, **(softcap if student_name == "Gemma 2" else {})).eval()
    samples = make_samples([(4, 6), (7, 3), (2, 9)])
    for s in samples:  # what the sampler records: the student's temperature-1 log-probs of its completion
        logprobs = _full_logprobs(student, s.prompt_ids + s.completion_ids)
        positions = range(len(s.prompt_ids) - 1, len(s.prompt_ids) + len(s.completion_ids) - 1)
        s.behaviour_logprobs_t1 = [logprobs[p, t].item() for p, t in zip(positions, s.completion_ids, strict=True)]
    bos = tokenizer.bos_token_id
    SampleScorer(teacher, top_k=5, student=student, ifd=True, bos_token_id=bos).score(samples)

    for s in samples:
        sequence, first = s.prompt_ids + s.completion_ids, len(s.prompt_ids)
        teacher_logprobs = _full_logprobs(teacher, sequence)
        expected = teacher_logprobs[first - 1 : -1].topk(5, dim=-1)
        assert torch.equal(torch.tensor(s.teacher_topk_ids), expected.indices)
        torch.testing.assert_close(torch.tensor(s.teacher_topk_logprobs), expected.values, atol=1e-5, rtol=1e-5)
        unconditional = [bos, *s.completion_ids]
        nlls = (
            _mean_nll(teacher_logprobs, sequence, first),
            _mean_nll(_full_logprobs(teacher, unconditional), unconditional, 1),
            -sum(s.behaviour_logprobs_t1) / len(s.completion_ids),
            _mean_nll(_full_logprobs(student, unconditional), unconditional, 1),
        )
        assert s.ifd_delta == pytest.approx(delta_ifd(*nlls), rel=1e-4, abs=1e-5)


def test_live_models_in_training_mode_are_scored_without_dropout_and_left_as_they_were(tokenizer):
    """The trainer scores with its live models in inline mode and during the start-up bootstrap; they are in train
    mode, with dropout on unless disable_dropout. Scores must be those of eval mode, and the modes restored."""
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=5)
    student = build_model(tokenizer, hidden_size=32, num_layers=2, seed=6)
    for model in (teacher, student):
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5  # heavy dropout: a train-mode score would differ every time
    reference = make_samples([(4, 6), (7, 3)])
    for s in reference:
        s.behaviour_logprobs_t1 = [-1.0] * len(s.completion_ids)
    scored = [make_samples([(4, 6), (7, 3)]) for _ in range(2)]
    for samples in scored:
        for s in samples:
            s.behaviour_logprobs_t1 = [-1.0] * len(s.completion_ids)
    teacher.eval(), student.eval()
    SampleScorer(teacher, top_k=5, student=student, ifd=True).score(reference)
    teacher.train(), student.train()
    for samples in scored:
        SampleScorer(teacher, top_k=5, student=student, ifd=True).score(samples)
        assert [s.ifd_delta for s in samples] == pytest.approx([s.ifd_delta for s in reference], abs=1e-5)
        assert [s.teacher_topk_ids for s in samples] == [s.teacher_topk_ids for s in reference]
    assert teacher.training and student.training
