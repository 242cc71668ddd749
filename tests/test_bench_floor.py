"""tools/bench_sd15.py's floor candidate computes the expert gradients an exact LoRA step must compute.

Its ratio to the frozen base is reported as the least any exact stage-1 step can cost (issue 29), so the
gradients it computes must be the real ones: compared here with autograd through y = W x + s B A x."""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from tests.numerics import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_sd15 import LoraGradFloor  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.proj = nn.Linear(6, 5)
        self.to_k = nn.Linear(4, 5)  # fed a context that does not depend on the input (cross-attention's case)
        self.other = nn.Linear(5, 5)  # not targeted

    def forward(self, x, c):
        h = self.conv1(x).flatten(2).transpose(1, 2)  # (b, positions, 6)
        return self.other(self.proj(h)).sum(1) + self.to_k(c).sum(1)


def lora_grads(model, floor, x, c, gout):
    """dL/dA, dL/dB by autograd through explicit LoRA branches with the floor's own A and B.

    The floor runs the base's backward, so its dL/dy are the base's: each branch here adds its value and
    takes it away again (``d - d.detach()``) and reads a detached input, which keeps the base's values
    and input gradients and gives A and B their gradients at that point."""

    def delta(d):
        return s * (d - d.detach())

    s = floor.scaling
    leaves = {n: (A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for n, (A, B) in floor.experts.items()}
    (Ac, Bc), (Ap, Bp), (Ak, Bk) = leaves["conv1"], leaves["proj"], leaves["to_k"]
    conv = model.conv1
    h = conv(x) + delta(F.conv2d(F.conv2d(x.detach(), Ac, stride=conv.stride, padding=conv.padding), Bc[:, :, None, None]))
    h = h.flatten(2).transpose(1, 2)
    p = model.proj(h) + delta((h.detach() @ Ap.t()) @ Bp.t())
    k = model.to_k(c) + delta((c @ Ak.t()) @ Bk.t())
    out = model.other(p).sum(1) + k.sum(1)
    out.backward(gout)
    return {n: (A.grad, B.grad) for n, (A, B) in leaves.items()}


def test_floor_gradients_match_autograd():
    torch.manual_seed(0)
    model = Tiny().double().requires_grad_(False)
    floor = LoraGradFloor(model, ["conv1", "proj", "to_k"], rank=2, scaling=0.5, std=1.0, dtype=torch.float64)
    assert set(floor.experts) == {"conv1", "proj", "to_k"}  # "other" is not targeted

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 7, 4, dtype=torch.float64)
    gout = torch.randn(2, 5, dtype=torch.float64)
    y = model(x, c)
    y.backward(gout)
    got = floor.grads
    assert set(got) == {"conv1", "proj", "to_k"}  # to_k's output gets a gradient though c does not need one

    for h in floor.handles:
        h.remove()
    want = lora_grads(model, floor, x.detach(), c, gout)
    for n in want:
        for g, w in zip(got[n], want[n]):
            assert_close(g, w, rel=1e-10, msg=n)  # float64, two orders of the same products


def test_floor_leaves_the_base_step_unchanged():
    """The hooks add work but do not change the base step's output or its gradient with respect to x."""
    torch.manual_seed(1)
    model = Tiny().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    c = torch.randn(2, 7, 4)
    y0 = model(x, c)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    LoraGradFloor(model, ["conv1", "proj", "to_k"], rank=2, scaling=0.5)
    y1 = model(x, c)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert torch.equal(y0, y1)
    assert_close(g1, g0, rel=1e-5)  # the very same arithmetic: the hooks only add a zero to outputs that need no grad


def test_floor_flops_are_the_expert_gradients_multiply_adds():
    """``--flops`` reports the floor's excess over the base as exactly 2 r (in + out) multiply-adds per row
    of a Linear (z = A x, B^T dL/dy and the two weight gradients): the count the issue's target is set against."""
    from bench_sd15 import count_flops, flop_ratios

    torch.manual_seed(2)
    rows, d_in, d_out, r = 10, 6, 5, 2
    base, floor_m = nn.Linear(d_in, d_out).requires_grad_(False), nn.Sequential()
    floor_m.proj = nn.Linear(d_in, d_out).requires_grad_(False)
    LoraGradFloor(floor_m, ["proj"], rank=r, scaling=1.0)
    x = torch.randn(rows, d_in, requires_grad=True)

    def step(m):
        return lambda: m(x).square().sum().backward()

    flops = count_flops({"base": step(base), "peft_lora": step(base), "floor_s1": step(floor_m)})
    assert flops["base"] == 2 * (2 * rows * d_in * d_out)  # forward and grad_x, 2 FLOPs per multiply-add
    assert flops["floor_s1"] - flops["base"] == 2 * (2 * r * rows * (d_in + d_out))
    assert flop_ratios(flops)["floor_s1_vs_base"] == round(flops["floor_s1"] / flops["base"], 4)
