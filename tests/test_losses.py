import math

import pytest
import torch
from trl.experimental.gkd import GKDTrainer

from trl_npd.losses import generalized_jsd_sum, k3_policy_kl, token_logprobs


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
