import math
from functools import partial

import pytest
import torch
from tiny_models import build as build_tiny
from torch import nn
from trl.experimental.gkd import GKDTrainer

from trl_npd import fused_jsd as fused_jsd_module
from trl_npd.chunked import chunked_sum
from trl_npd.divergences import (
    generalized_jsd_per_token,
    generalized_jsd_sum,
    k3_policy_kl,
    topk_bucket_jsd,
    topk_token_loss,
)
from trl_npd.fused_jsd import fused_jsd_sum
from trl_npd.heads import (
    LogitTransform,
    backbone,
    chunked_logits_error,
    chunked_token_logprobs,
    lm_head,
    logit_transform,
    project,
    teacher_topk,
    token_logprobs,
)
from trl_npd.losses import distillation_loss, topk_loss


def chunked_topk_sum(hidden, head, targets, ids, logprobs, ce_weight, chunk_size, transform=None, jsd_beta=None):
    """The chunked top-k objective, as distillation_loss's chunked path runs it."""
    loss = partial(topk_loss, ce_weight=ce_weight, jsd_beta=jsd_beta)
    return chunked_sum(loss, hidden, head, targets, ids, logprobs, transform=transform, chunk_size=chunk_size)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_equals_gkd_loss_and_gradients(beta, temperature):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    labels[2, 4] = -100
    ours = generalized_jsd_sum(student, teacher, labels != -100, beta, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)
    theirs = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="sum"
    )
    (theirs_grad,) = torch.autograd.grad(theirs, student)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-10, atol=1e-12)
    assert ours.item() > 0


def test_k3_is_zero_only_on_agreement_and_never_negative():
    behaviour = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    assert torch.equal(k3_policy_kl(behaviour, behaviour), torch.zeros(3))
    moved = torch.log(torch.tensor([0.3, 0.1, 0.95]))
    assert (k3_policy_kl(moved, behaviour) > 0).all()


def test_k3_estimates_kl_from_behaviour_samples():
    torch.manual_seed(0)
    behaviour = torch.softmax(torch.randn(6), 0)
    current = torch.softmax(torch.randn(6), 0)
    tokens = torch.multinomial(behaviour, 400_000, replacement=True)
    estimate = k3_policy_kl(current.log()[tokens], behaviour.log()[tokens]).mean()
    exact = (behaviour * (behaviour.log() - current.log())).sum()  # KL(behaviour || current)
    assert math.isclose(estimate.item(), exact.item(), rel_tol=0.03)


def test_token_logprobs_uses_the_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = torch.log_softmax(logits / 0.5, -1)[0, 0]
    assert torch.isclose(token_logprobs(logits, torch.tensor([0]), temperature=0.5)[0], expected)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_jsd_equals_the_reference_loss_and_gradients(beta, temperature, masked):
    torch.manual_seed(0)
    n, h_student, h_teacher, vocab = 37, 16, 24, 101
    student_hidden = torch.randn(n, h_student, requires_grad=True)
    student_head = nn.Linear(h_student, vocab, bias=True)
    teacher_hidden = torch.randn(n, h_teacher)
    teacher_head = nn.Linear(h_teacher, vocab, bias=True)
    targets = torch.randint(0, vocab, (n,))
    if masked:
        targets[::3] = -100
    mask = targets != -100

    fused = fused_jsd_sum(
        student_hidden, student_head, teacher_hidden, teacher_head, targets, beta, temperature, chunk_size=8
    )
    fused_grads = torch.autograd.grad(fused, [student_hidden, student_head.weight, student_head.bias])
    reference = generalized_jsd_sum(
        student_head(student_hidden)[None], teacher_head(teacher_hidden)[None].detach(), mask[None], beta, temperature
    )
    reference_grads = torch.autograd.grad(reference, [student_hidden, student_head.weight, student_head.bias])
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_chunked_token_logprobs_equal_full_logits():
    torch.manual_seed(0)
    hidden, head = torch.randn(50, 8), nn.Linear(8, 33)
    tokens = torch.randint(0, 33, (50,))
    expected = token_logprobs(head(hidden), tokens, 0.7)
    torch.testing.assert_close(chunked_token_logprobs(hidden, head, tokens, 0.7, chunk_size=7), expected)


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # the divergence's (DistillationTrainer's), on both paths
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_fused_path_through_models_equals_reference_including_tied_embeddings(tokenizer, tied, temperature):
    from transformers import Qwen3ForCausalLM

    from trl_npd.toy import build_model

    config = build_model(tokenizer, hidden_size=32, num_layers=2).config
    config.tie_word_embeddings = tied
    torch.manual_seed(6)
    student = Qwen3ForCausalLM(config).train()
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=7).eval()
    ids = torch.randint(3, 500, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def run(fused):
        student.zero_grad()
        result = distillation_loss(
            student, teacher, batch, 0.5, fused=fused, temperature=temperature, logprob_temperature=0.9
        )
        result.loss_sum.backward()
        return result, {n: p.grad.clone() for n, p in student.named_parameters()}

    (fused, fused_grads), (reference, reference_grads) = run(True), run(False)
    torch.testing.assert_close(fused.loss_sum, reference.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.current_logprobs, reference.current_logprobs, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_path_refuses_an_adapter_on_the_lm_head(tokenizer):
    from peft import LoraConfig, get_peft_model

    from trl_npd.toy import build_model

    student = get_peft_model(build_model(tokenizer, hidden_size=32), LoraConfig(r=2, target_modules=["lm_head"]))
    teacher = build_model(tokenizer, hidden_size=48)
    ids = torch.randint(3, 500, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with pytest.raises(ValueError, match="target_modules"):
        distillation_loss(student, teacher, batch, 0.5, fused=True)
    distillation_loss(student, teacher, batch, 0.5, fused=False)  # the reference path handles it


def _random_topk(n, vocab, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher_logprobs = torch.log_softmax(torch.randn(n, vocab, generator=g) * 2, -1)
    values, ids = teacher_logprobs.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("k", [1, 5, 31])
@pytest.mark.parametrize("ce_weight", [0.0, 0.1, 1.0])
def test_chunked_topk_objective_equals_the_reference_loss_and_gradients(k, ce_weight):
    torch.manual_seed(0)
    n, hidden_size, vocab = 29, 12, 31
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    head = nn.Linear(hidden_size, vocab)
    targets = torch.randint(0, vocab, (n,))
    ids, logprobs = _random_topk(n, vocab, k)

    chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, ce_weight, chunk_size=8)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    student = torch.log_softmax(head(hidden), -1)
    reference = topk_token_loss(student, targets, ids, logprobs, ce_weight).sum()
    reference_grads = torch.autograd.grad(reference, [hidden, head.weight, head.bias])
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_bucket_jsd_is_the_full_jsd_at_k_equal_v_and_never_above_it(beta):
    torch.manual_seed(0)
    vocab = 23
    student_logits = torch.randn(9, vocab, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(9, vocab) * 2, -1)
    student = torch.log_softmax(student_logits, -1)
    full = generalized_jsd_per_token(student, teacher, beta)
    whole = teacher.topk(vocab, dim=-1)
    buckets = topk_bucket_jsd(student, whole.indices, whole.values, beta)
    torch.testing.assert_close(buckets, full, rtol=1e-4, atol=1e-5)
    grads = [torch.autograd.grad(loss.sum(), student_logits, retain_graph=True)[0] for loss in (buckets, full)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    for k in (1, 5, 12):
        top = teacher.topk(k, dim=-1)
        approx = topk_bucket_jsd(student, top.indices, top.values, beta)
        assert torch.isfinite(approx).all() and (approx <= full + 1e-5).all()  # coarse-graining never raises it


def test_topk_bucket_jsd_at_beta_0_is_npds_forward_kl_over_the_same_buckets():
    torch.manual_seed(1)
    student_logits = torch.randn(7, 40, requires_grad=True)
    top = torch.log_softmax(torch.randn(7, 40) * 3, -1).topk(6, dim=-1)
    student = torch.log_softmax(student_logits, -1)
    buckets = topk_bucket_jsd(student, top.indices, top.values, 0.0)
    npd = topk_token_loss(student, torch.zeros(7, dtype=torch.long), top.indices, top.values, ce_weight=0.0)
    torch.testing.assert_close(buckets, npd, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(loss.sum(), student_logits, retain_graph=True)[0] for loss in (buckets, npd)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_topk_jsd_equals_the_reference_loss_and_gradients(beta):
    torch.manual_seed(2)
    n, hidden_size, vocab = 29, 12, 31
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    head = nn.Linear(hidden_size, vocab)
    targets = torch.randint(0, vocab, (n,))
    ids, logprobs = _random_topk(n, vocab, 5)
    chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, chunk_size=8, jsd_beta=beta)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    reference = topk_bucket_jsd(torch.log_softmax(head(hidden), -1), ids, logprobs, beta).sum()
    reference_grads = torch.autograd.grad(reference, [hidden, head.weight, head.bias])
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_topk_objective_math_matches_the_bucketed_kl_and_ce_by_hand():
    student = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    teacher = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 0.5]]), -1)
    ids = torch.tensor([[1, 2]])  # the teacher's top-2
    got = topk_token_loss(student, torch.tensor([0]), ids, teacher.gather(-1, ids), ce_weight=0.25)
    p = teacher.exp()[0]
    q = student.exp()[0]
    p_buckets = torch.stack([p[1], p[2], p[0] + p[3]])
    q_buckets = torch.stack([q[1], q[2], q[0] + q[3]])
    kl = (p_buckets * (p_buckets / q_buckets).log()).sum()
    expected = 0.25 * -student[0, 0] + 0.75 * kl
    torch.testing.assert_close(got[0], expected)


def test_topk_objective_with_the_whole_vocabulary_is_forward_kl_and_finite():
    torch.manual_seed(0)
    student_logits = torch.randn(6, 9, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(6, 9), -1)
    values, ids = teacher.topk(9, dim=-1)  # k = V: the teacher's tail holds no mass
    loss = topk_token_loss(torch.log_softmax(student_logits, -1), torch.zeros(6, dtype=torch.long), ids, values, 0.0)
    forward_kl = (teacher.exp() * (teacher - torch.log_softmax(student_logits, -1))).sum(-1)
    torch.testing.assert_close(loss, forward_kl, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(student_logits.grad).all()


def test_a_confident_student_gets_the_exact_tail_term_and_its_gradient():
    """The student puts all but ~4e-7 of its mass on the teacher's top-2, while the teacher keeps a real tail:
    the tail term and the gradient that moves mass back to the tail must be exact."""
    student_logits = torch.tensor([[20.0, 20.0, 5.0, 5.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.tensor([[1.0, 1.2, 0.5, 0.3]], dtype=torch.float64), -1)
    ids = torch.tensor([[0, 1]])
    loss = topk_token_loss(torch.log_softmax(student_logits, -1), torch.tensor([0]), ids, teacher.gather(-1, ids), 0.0)
    (grad,) = torch.autograd.grad(loss.sum(), student_logits)

    reference_logits = student_logits.detach().clone().requires_grad_(True)
    q = torch.softmax(reference_logits, -1)[0]
    p = teacher.exp()[0]
    p_b, q_b = torch.stack([p[0], p[1], p[2] + p[3]]), torch.stack([q[0], q[1], q[2] + q[3]])
    exact = (p_b * (p_b / q_b).log()).sum()
    (exact_grad,) = torch.autograd.grad(exact, reference_logits)
    torch.testing.assert_close(loss[0], exact, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-6, atol=1e-9)
    assert grad[0, 2] < -0.1  # mass is pushed back to the tail tokens


def test_chunked_projections_accept_a_bf16_head_with_a_bias():
    head = nn.Linear(8, 17).to(torch.bfloat16)
    hidden = torch.randn(5, 8, dtype=torch.bfloat16)
    tokens = torch.randint(0, 17, (5,))
    got = chunked_token_logprobs(hidden, head, tokens, 1.0)
    expected = token_logprobs(hidden.float() @ head.weight.float().T + head.bias.float(), tokens)
    torch.testing.assert_close(got, expected)


# Transforms that change these tiny random models' logits visibly: Gemma's soft-cap at 1.0 (its checkpoints use 30,
# which random logits never reach), Cohere's multiplier and Granite's divisor as ARCHITECTURES sets them.
TRANSFORMED = {"Gemma 2": {"final_logit_softcapping": 1.0}, "Cohere": {}, "Granite": {}}
TRANSFORMS = [LogitTransform(softcap=1.5), LogitTransform(scale=0.25), LogitTransform(scale=3.0, softcap=2.0)]


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("Gemma 2", {"final_logit_softcapping": 1.0}, LogitTransform(softcap=1.0)),
        ("Gemma 3", {"final_logit_softcapping": 1.0}, LogitTransform(softcap=1.0)),
        ("Cohere", {}, LogitTransform(scale=0.25)),
        ("Granite", {}, LogitTransform(scale=0.25)),  # logits_scaling=4.0 divides
        ("VaultGemma", {"final_logit_softcapping": 1.0}, LogitTransform(softcap=1.0)),
        ("RecurrentGemma", {"logits_soft_cap": 1.0}, LogitTransform(softcap=1.0)),
        ("Cohere2", {}, LogitTransform(scale=0.25)),
        ("Falcon-H1", {}, LogitTransform(scale=0.5)),  # lm_head_multiplier multiplies
        ("HyperCLOVA X", {}, LogitTransform(scale=0.5)),  # logits_scaling=0.5 multiplies here, unlike Granite's
        ("MiniCPM3", {}, LogitTransform(scale=0.25)),
        ("Llama", {}, LogitTransform()),
        # MPT's config has a logit_scale field, which its transformers code does not apply
        ("MPT", {"logit_scale": 2.0}, LogitTransform()),
    ],
)
def test_the_chunked_projection_reproduces_each_models_own_logits(tokenizer, name, overrides, expected):
    model = build_tiny(name, tokenizer, seed=3, **overrides)
    assert logit_transform(model) == expected
    assert chunked_logits_error(model, len(tokenizer)) < 1e-5
    if not expected.is_identity:  # the transform matters on this model: skipping it would be seen
        ids = torch.randint(3, 500, (1, 8))
        with torch.no_grad():
            full = model(input_ids=ids).logits[0]
            raw = project(backbone(model)(input_ids=ids).last_hidden_state[0], lm_head(model))
        assert (full - raw).abs().max() > 0.05 * full.abs().max()


@pytest.mark.parametrize("transforms", [(TRANSFORMS[0], TRANSFORMS[1]), (LogitTransform(), TRANSFORMS[2])])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_jsd_with_logit_transforms_equals_the_reference_loss_and_gradients(transforms, beta, temperature):
    student_transform, teacher_transform = transforms
    torch.manual_seed(0)
    n, h_student, h_teacher, vocab = 37, 16, 24, 101
    student_hidden = (3 * torch.randn(n, h_student)).requires_grad_(True)  # logits large enough to be capped
    student_head = nn.Linear(h_student, vocab, bias=True)
    teacher_hidden = 3 * torch.randn(n, h_teacher)
    teacher_head = nn.Linear(h_teacher, vocab, bias=False)
    targets = torch.randint(0, vocab, (n,))
    targets[::3] = -100
    params = [student_hidden, student_head.weight, student_head.bias]

    fused = fused_jsd_sum(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        targets,
        beta,
        temperature,
        chunk_size=8,
        student_transform=student_transform,
        teacher_transform=teacher_transform,
    )
    fused_grads = torch.autograd.grad(fused, params)
    student_logits = student_transform(student_head(student_hidden))
    teacher_logits = teacher_transform(teacher_head(teacher_hidden)).detach()
    reference = generalized_jsd_sum(
        student_logits[None], teacher_logits[None], (targets != -100)[None], beta, temperature
    )
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, expected in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_chunked_topk_and_logprobs_with_a_logit_transform_equal_the_reference(transform):
    torch.manual_seed(0)
    n, hidden_size, vocab = 29, 12, 31
    hidden = (3 * torch.randn(n, hidden_size)).requires_grad_(True)
    head = nn.Linear(hidden_size, vocab)
    targets = torch.randint(0, vocab, (n,))
    ids, logprobs = _random_topk(n, vocab, 5)
    params = [hidden, head.weight, head.bias]

    chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, chunk_size=8, transform=transform)
    chunked_grads = torch.autograd.grad(chunked, params)
    logits = transform(head(hidden))
    reference = topk_token_loss(torch.log_softmax(logits, -1), targets, ids, logprobs, 0.1).sum()
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    top_ids, top_values = teacher_topk(hidden.detach(), head, 4, chunk_size=8, transform=transform)
    expected_top = torch.log_softmax(logits.detach(), -1).topk(4, dim=-1)
    assert torch.equal(top_ids, expected_top.indices)
    torch.testing.assert_close(top_values, expected_top.values)
    torch.testing.assert_close(
        chunked_token_logprobs(hidden.detach(), head, targets, 0.7, chunk_size=8, transform=transform),
        token_logprobs(logits.detach(), targets, 0.7),
    )


@pytest.mark.parametrize(
    ("top_k", "topk_jsd"), [(None, False), (4, False), (4, True)], ids=["jsd", "topk", "topk-jsd"]
)
@pytest.mark.parametrize(
    ("student_name", "teacher_name"),
    [("Gemma 2", "Gemma 2"), ("Granite", "Cohere"), ("Llama", "Gemma 2")],
    ids=["softcapped", "scaled", "plain-student-softcapped-teacher"],
)
def test_chunked_paths_of_transformed_models_equal_their_own_logits_loss_and_gradients(
    tokenizer, student_name, teacher_name, top_k, topk_jsd
):
    """The fused JSD, the top-k objective and the student log-probs (chunked) against the plain path, which takes
    the full logits from each model's own forward, on real models that soft-cap or scale their logits."""
    student = build_tiny(student_name, tokenizer, seed=1, **TRANSFORMED.get(student_name, {})).train()
    teacher = build_tiny(teacher_name, tokenizer, seed=2, **TRANSFORMED.get(teacher_name, {})).eval()
    assert not (logit_transform(student).is_identity and logit_transform(teacher).is_identity)
    ids = torch.randint(3, 500, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def run(fused):
        student.zero_grad()
        result = distillation_loss(
            student,
            teacher,
            batch,
            0.5,
            fused=fused,
            logprob_temperature=0.9,
            teacher_top_k=top_k,
            ce_weight=0.1,
            topk_jsd=topk_jsd,
        )
        result.loss_sum.backward()
        return result, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    (fused, fused_grads), (plain, plain_grads) = run(True), run(False)
    torch.testing.assert_close(fused.loss_sum, plain.loss_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.current_logprobs, plain.current_logprobs, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


CHUNK_SIZES = pytest.mark.parametrize("chunk_size", [5, 7, 64], ids=["divides", "does-not-divide", "one-chunk"])


@CHUNK_SIZES
@pytest.mark.parametrize("objective", ["jsd-liger", "jsd-transformed", "topk-npd", "topk-jsd"])
def test_chunked_losses_equal_the_reference_at_any_chunk_size(objective, chunk_size):
    """Loss and gradients against divergences.py on full logits, whether the chunks divide the 30 rows or not."""
    torch.manual_seed(3)
    n, hidden_size, vocab = 30, 12, 31
    hidden = (2 * torch.randn(n, hidden_size)).requires_grad_(True)
    head = nn.Linear(hidden_size, vocab)
    targets = torch.randint(0, vocab, (n,))
    params = [hidden, head.weight, head.bias]
    if objective.startswith("jsd"):
        transform = LogitTransform(scale=0.5, softcap=1.5) if objective == "jsd-transformed" else LogitTransform()
        teacher_hidden, teacher_head = 2 * torch.randn(n, 16), nn.Linear(16, vocab)
        targets[::4] = -100
        chunked = fused_jsd_sum(
            hidden,
            head,
            teacher_hidden,
            teacher_head,
            targets,
            0.5,
            chunk_size=chunk_size,
            student_transform=transform,
            teacher_transform=transform,
        )
        teacher_logits = transform(teacher_head(teacher_hidden)).detach()
        reference = generalized_jsd_sum(transform(head(hidden)), teacher_logits, targets != -100, 0.5)
    else:
        ids, logprobs = _random_topk(n, vocab, 5)
        student = torch.log_softmax(head(hidden), -1)
        if objective == "topk-jsd":
            chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, chunk_size, jsd_beta=0.5)
            reference = topk_bucket_jsd(student, ids, logprobs, 0.5).sum()
        else:
            chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, chunk_size)
            reference = topk_token_loss(student, targets, ids, logprobs, 0.1).sum()
    chunked_grads = torch.autograd.grad(chunked, params)
    reference_grads = torch.autograd.grad(reference, params)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-5)
    for got, expected in zip(chunked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@CHUNK_SIZES
def test_chunked_maps_equal_the_full_logits_at_any_chunk_size(chunk_size):
    torch.manual_seed(4)
    hidden, head, transform = torch.randn(30, 8), nn.Linear(8, 33), LogitTransform(softcap=2.0)
    tokens = torch.randint(0, 33, (30,))
    logits = transform(head(hidden)).detach()
    got = chunked_token_logprobs(hidden, head, tokens, 0.7, chunk_size=chunk_size, transform=transform)
    torch.testing.assert_close(got, token_logprobs(logits, tokens, 0.7))
    top_ids, top_values = teacher_topk(hidden, head, 4, chunk_size=chunk_size, transform=transform)
    expected = torch.log_softmax(logits, -1).topk(4, dim=-1)
    assert torch.equal(top_ids, expected.indices)
    torch.testing.assert_close(top_values, expected.values)


def test_chunked_paths_accept_no_rows():
    """A micro-batch with nothing to train on: a zero loss with zero gradients, and empty maps of the right shapes."""
    hidden, head = torch.zeros(0, 8, requires_grad=True), nn.Linear(8, 17)
    ids, logprobs = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    loss = chunked_topk_sum(hidden, head, torch.zeros(0, dtype=torch.long), ids, logprobs, 0.1, None)
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 8) and not head.weight.grad.any()
    assert chunked_token_logprobs(hidden.detach(), head, torch.zeros(0, dtype=torch.long), 1.0).shape == (0,)
    top_ids, top_values = teacher_topk(hidden.detach(), head, 3)
    assert top_ids.shape == top_values.shape == (0, 3) and top_ids.dtype == torch.long


def test_the_fused_jsd_without_gradients_skips_liger_and_equals_the_reference(monkeypatch):
    """Evaluation (no_grad) runs the chunking base, which computes no gradients, rather than Liger's kernel, which
    computes them in its forward pass whatever the grad mode; the loss is the same."""
    torch.manual_seed(9)
    hidden, head = torch.randn(20, 12), nn.Linear(12, 31)
    teacher_hidden, teacher_head = torch.randn(20, 16), nn.Linear(16, 31)
    targets = torch.randint(0, 31, (20,))
    targets[:3] = -100
    with torch.no_grad():
        reference = generalized_jsd_sum(
            head(hidden)[None], teacher_head(teacher_hidden)[None], (targets != -100)[None], 0.5, 2.0
        )

    def liger_called(*args, **kwargs):
        raise AssertionError("Liger's kernel ran without gradients")

    monkeypatch.setattr(fused_jsd_module, "LigerFusedLinearJSDLoss", liger_called)
    with torch.no_grad():
        evaluated = fused_jsd_sum(hidden, head, teacher_hidden, teacher_head, targets, 0.5, 2.0, chunk_size=7)
    torch.testing.assert_close(evaluated, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="ran without gradients"):  # with gradients, Liger's kernel runs
        fused_jsd_sum(hidden.requires_grad_(), head, teacher_hidden, teacher_head, targets, 0.5, 2.0)


def test_chunked_sum_computes_only_the_gradients_asked_for(monkeypatch):
    """A frozen head (an adapter-trained student) gets no (V, H) gradient accumulator, and under no_grad (evaluation)
    no chunk is differentiated at all; the hidden states' gradient and the loss are unchanged."""
    torch.manual_seed(5)
    hidden, head = torch.randn(20, 12, requires_grad=True), nn.Linear(12, 31).requires_grad_(False)
    targets = torch.randint(0, 31, (20,))
    ids, logprobs = _random_topk(20, 31, 5)
    reference = topk_token_loss(torch.log_softmax(head(hidden), -1), targets, ids, logprobs, 0.1).sum()
    chunked = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, 7)
    grad_hidden, grad_weight, grad_bias = chunked.grad_fn.saved_tensors  # what the forward pass kept for backward
    assert grad_hidden.shape == hidden.shape and grad_weight is None and grad_bias is None
    torch.testing.assert_close(torch.autograd.grad(chunked, hidden), torch.autograd.grad(reference, hidden))

    differentiated = []
    grad_and_value = torch.func.grad_and_value
    monkeypatch.setattr(torch.func, "grad_and_value", lambda fn: differentiated.append(fn) or grad_and_value(fn))
    head.requires_grad_(True)
    with torch.no_grad():
        evaluated = chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, 7)
    assert not evaluated.requires_grad and differentiated == []
    torch.testing.assert_close(evaluated, reference.detach())
    chunked_topk_sum(hidden, head, targets, ids, logprobs, 0.1, 7)  # with grad mode on, the same call differentiates
    assert len(differentiated) == 3  # one per chunk of 7 rows out of 20


@pytest.mark.parametrize("transform", [LogitTransform(), LogitTransform(softcap=1.5)], ids=["liger", "transformed"])
def test_fused_jsd_pads_a_student_vocabulary_smaller_than_the_teachers_head(transform):
    """A teacher head padded past the student's vocabulary: both fused paths give the student's missing logits 0."""
    torch.manual_seed(6)
    hidden, head = torch.randn(10, 8, requires_grad=True), nn.Linear(8, 29)
    teacher_hidden, teacher_head = torch.randn(10, 8), nn.Linear(8, 32)
    targets = torch.randint(0, 29, (10,))
    fused = fused_jsd_sum(
        hidden,
        head,
        teacher_hidden,
        teacher_head,
        targets,
        0.5,
        student_transform=transform,
        teacher_transform=transform,
    )
    student_logits = torch.nn.functional.pad(transform(head(hidden)), (0, 3))
    teacher_logits = transform(teacher_head(teacher_hidden)).detach()
    reference = generalized_jsd_sum(student_logits, teacher_logits, targets != -100, 0.5)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fused, hidden), torch.autograd.grad(reference, hidden))


def test_a_chunk_size_below_one_row_is_refused():
    hidden, head = torch.randn(4, 8), nn.Linear(8, 17)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        chunked_token_logprobs(hidden, head, torch.zeros(4, dtype=torch.long), 1.0, chunk_size=0)
