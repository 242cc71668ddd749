"""DMD2 loss functions on hand-computed values."""

import math

import torch

from tsm_distill import losses


def test_dmd_gradient_and_loss_by_hand():
    x0 = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    real = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])
    fake = torch.tensor([[[[2.0, 2.0]]], [[[1.0, 1.0]]]])
    # sample 0: weight = mean(|[1, 2]|) = 1.5, grad = [2, 1] / 1.5; sample 1: weight 0 -> inf/nan -> 0
    g = losses.dmd_gradient(x0, real, fake)
    assert torch.allclose(g[0].flatten(), torch.tensor([2 / 1.5, 1 / 1.5]))
    assert torch.equal(g[1].flatten(), torch.zeros(2))  # x/0 -> 0, not the largest float
    x = x0.clone().requires_grad_(True)
    loss = losses.dmd_loss(x, real, fake)
    # 0.5 * mean((x - (x - g))^2) = 0.5 * mean(g^2) over 4 elements
    assert math.isclose(loss.item(), 0.5 * ((2 / 1.5) ** 2 + (1 / 1.5) ** 2) / 4, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(x.grad, g / 4)  # d/dx = g / numel


def test_fake_score_and_gan_losses_by_hand():
    assert math.isclose(losses.fake_score_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])).item(), 2.5)
    logits = torch.tensor([0.0, 2.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert math.isclose(losses.gan_generator_loss(logits).item(), (sp(0.0) + sp(-2.0)) / 2, rel_tol=1e-6)
    d = losses.gan_discriminator_loss(torch.tensor([1.0]), torch.tensor([3.0, -1.0]))
    assert math.isclose(d.item(), sp(1.0) + (sp(-3.0) + sp(1.0)) / 2, rel_tol=1e-6)
    acc = losses.discriminator_accuracy(torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 0.7]))
    assert math.isclose(acc.item(), 0.75)
