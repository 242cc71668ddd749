"""Merged-weight training (tsm_core/merged.py): merged == unmerged, in values and every gradient.

Each case runs one training step twice on identical copies, once with ``set_merged_training("always")``
(merge wherever exact) and once with ``"never"`` (the routed path), and compares the output, dL/dx and
the gradient of every trainable parameter (experts, router). Experts and routers are perturbed first:
zero-initialised B would make the expert terms vanish and hide a wrong gradient. The small nets run in
float64, so the two paths must agree to 1e-9 whatever the conditioning of a gradient (a gate's gradient
is a sum over every position and partly cancels); the tiny UNet runs in float32, the autocast case in bf16.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.numerics import assert_close, rel_error
from tsm_core import TSMConfig, attach
from tsm_core import layers as layers_mod
from tsm_core import merged as merged_mod

SHARED = torch.tensor([600, 600, 600])
MIXED = torch.tensor([100, 600, 900])


class Net(nn.Module):
    """A convolution (padding, stride, dilation as given), a pointwise conv and a Linear over pixels."""

    def __init__(self, conv: dict, dims: int = 2, c: int = 6):
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = Conv(3, c, **conv)
        self.conv2 = Conv(c, c, 1)
        self.proj = nn.Linear(c, 5)
        self.dims = dims

    def forward(self, x):
        h = torch.nn.functional.silu(self.conv2(torch.nn.functional.silu(self.conv1(x))))
        return self.proj(h.movedim(1, -1))


def perturb(tsm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tsm.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def build(conv=None, dims=2, mode="expert", router_input="both", activation="none", dropout=0.0, rank=3,
          dtype=torch.float64):
    torch.manual_seed(0)
    net = Net(conv or dict(kernel_size=3, padding=1), dims).to(dtype)
    cfg = TSMConfig(rank=rank, alpha=2 * rank, scales=(1, 4), target_modules=["conv1", "conv2", "proj"],
                    router_input=router_input, router_activation=activation, dropout=dropout)
    tsm = attach(net, cfg)
    if mode == "expert":
        tsm.set_mode("expert", scale=4)
    else:
        tsm.set_mode(mode, core_scale=4, context_scales=(1,))
    perturb(tsm)
    return net, tsm


def step(net, tsm, x, t, policy, ckpt=False, autocast=False):
    """One forward + backward from cleared grads; returns (output, dL/dx, {param: grad}). ``policy`` None keeps
    the model's merged-training setting (and so a cached core, tests/test_core_cache.py) across steps."""
    if policy is not None:
        tsm.set_merged_training(policy)
    for p in tsm.adapter_parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    with tsm.timesteps(t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = checkpoint(net, x, use_reentrant=False) if ckpt else net(x)
        # a regression loss: grad_y = 2 (y - target) / n is as well conditioned as y itself
        target = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (y.double() - target).square().mean().backward()
    # the experts of other intervals get no grad on either path; compare() checks the same keys have one
    grads = {k: p.grad.clone() for k, p in tsm.named_adapter_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def base_weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items() if "base_layer" in k}


def compare(a, b, rel):
    assert_close(a[0], b[0], rel=rel)
    assert_close(a[1], b[1], rel=rel)
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        assert_close(a[2][k], b[2][k], rel=rel)


def merged_vs_unmerged(net, tsm, x, t, rel=1e-9, **kw):
    twin, twin_tsm = copy.deepcopy(net), None
    twin_tsm = attach_twin(tsm, twin)
    before = base_weights(net)
    got = step(net, tsm, x, t, "always", **kw)
    want = step(twin, twin_tsm, x, t, "never", **kw)
    compare(got, want, rel)
    after = base_weights(net)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit: never modified in place
    assert all(p.grad is None for n, p in net.named_parameters() if "base_layer" in n)
    return got


def attach_twin(tsm, twin):
    """A TSMAdapter handle over a deep copy of the model (same layers, same experts and routers)."""
    from tsm_core.adapter import TSMAdapter
    from tsm_core.layers import TSMLayer

    layers = {n: m for n, m in twin.named_modules() if isinstance(m, TSMLayer)}
    ctx = next(iter(layers.values())).context  # deepcopy copied the shared context once
    out = TSMAdapter(twin, tsm.config, layers, ctx)
    out.mode, out.mode_args = tsm.mode, tsm.mode_args
    return out


class Spy:
    """Counts merged-op calls (and which backward route each chose)."""

    def __init__(self, monkeypatch):
        self.ops = []
        real = merged_mod.MergedFunction.apply

        def apply(*args):
            self.ops.append(args[3])
            return real(*args)
        monkeypatch.setattr(merged_mod.MergedFunction, "apply", apply)


def x_for(dims, batch=3, size=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *([size] * dims), generator=g, dtype=dtype)


# ---------------------------------------------------------------------------- equality
@pytest.mark.parametrize("conv, dims", [
    (dict(kernel_size=3, padding=1), 2),
    (dict(kernel_size=3, stride=2, padding=1), 2),
    (dict(kernel_size=(3, 1), padding=(2, 0), dilation=2), 2),
    (dict(kernel_size=3), 1),
    (dict(kernel_size=2, padding=1), 3),
])
def test_stage1_merged_equals_unmerged_linear_and_conv(conv, dims, monkeypatch):
    spy = Spy(monkeypatch)
    net, tsm = build(conv, dims)
    merged_vs_unmerged(net, tsm, x_for(dims), SHARED)
    assert len(spy.ops) == 3  # conv1, conv2 and proj all ran merged


@pytest.mark.parametrize("router_input, activation", [("both", "none"), ("timestep", "none"),
                                                      ("timestep", "sigmoid"), ("timestep", "softmax")])
def test_stage2_merged_equals_unmerged(router_input, activation):
    """The core merges always; a timestep-only gate is one number per batch, so the context merges too and
    the router embedding's gradient comes from the merged op."""
    net, tsm = build(mode="mixture", router_input=router_input, activation=activation)
    merged_vs_unmerged(net, tsm, x_for(2), SHARED)


def test_symmetric_and_mixed_expert_subsets():
    """Symmetric mode (every scale gated) and a stage 1 that trains only some experts of the shared scale."""
    net, tsm = build(mode="symmetric", router_input="timestep")
    merged_vs_unmerged(net, tsm, x_for(2), SHARED)
    net, tsm = build()
    tsm.set_mode("expert", scale=4, experts=[2])  # t = 600 -> expert 2: the only one with grads
    merged_vs_unmerged(net, tsm, x_for(2), SHARED)


def test_merged_with_gradient_checkpointing():
    net, tsm = build(mode="mixture", router_input="timestep")
    plain = merged_vs_unmerged(net, tsm, x_for(2), SHARED)
    net, tsm = build(mode="mixture", router_input="timestep")
    compare(merged_vs_unmerged(net, tsm, x_for(2), SHARED, ckpt=True), plain, 1e-9)
    net, tsm = build()
    merged_vs_unmerged(net, tsm, x_for(2), SHARED, ckpt=True)


@pytest.mark.parametrize("mode", ["expert", "mixture"])
def test_merged_under_bf16_autocast(mode):
    """bf16 rounds W + sBA once where the routed path rounds W, A and B apiece, so the two differ at bf16
    precision: each is compared with the float32 step, and the merged one must be as accurate as the routed
    one (within 2x, or 2e-2: about five bf16 epsilons; a wrong expert or scale is off by O(1))."""
    net, tsm = build(mode=mode, router_input="timestep", dtype=torch.float32)
    x = x_for(2, dtype=torch.float32)
    twin = copy.deepcopy(net)
    twin_tsm = attach_twin(tsm, twin)
    ref_net = copy.deepcopy(net)
    ref = step(ref_net, attach_twin(tsm, ref_net), x, SHARED, "never")
    got = step(net, tsm, x, SHARED, "always", autocast=True)
    routed = step(twin, twin_tsm, x, SHARED, "never", autocast=True)
    assert got[0].dtype == routed[0].dtype == torch.bfloat16
    for a, b, r in zip(_flat(got), _flat(routed), _flat(ref)):
        assert rel_error(a, r) <= max(2 * rel_error(b, r), 2e-2)


def _flat(result):
    y, gx, grads = result
    return [y.double(), gx, *[grads[k] for k in sorted(grads)]]


@pytest.mark.parametrize("full", [False, True])
def test_both_gradient_routes(full, monkeypatch):
    """The experts' grads through the activations or through the full weight gradient G = grad_y^T x (the
    cost model picks one per layer; here each is forced on every layer), in both stages."""
    monkeypatch.setattr(layers_mod, "merge_pays", lambda *a, **k: (True, full))
    spy = Spy(monkeypatch)
    for mode in ("expert", "mixture"):
        net, tsm = build(mode=mode, router_input="timestep")
        merged_vs_unmerged(net, tsm, x_for(2), SHARED)
    assert spy.ops and all(op.full_weight_grad == full for op in spy.ops)


def test_cost_model_takes_the_full_weight_gradient_when_rank_exceeds_channels(monkeypatch):
    spy = Spy(monkeypatch)
    net, tsm = build(rank=8)
    merged_vs_unmerged(net, tsm, x_for(2), SHARED)
    assert any(op.full_weight_grad for op in spy.ops)


def test_unet_merged_equals_unmerged(unet):
    """A tiny SD UNet with gradient checkpointing: stage 1 and stage 2, every layer type the recipes target."""
    from tests.test_core import UNET_TARGETS, unet_inputs
    from tests.test_core import perturb as perturb_b

    unet.enable_gradient_checkpointing()
    unet.train()
    x, c = unet_inputs(batch=2)
    for mode in ("expert", "mixture"):
        m = copy.deepcopy(unet)
        tsm = attach(m, TSMConfig(rank=4, alpha=4, scales=(1, 4), target_modules=UNET_TARGETS))
        tsm.set_mode(mode, scale=4) if mode == "expert" else tsm.set_mode(mode, core_scale=4, context_scales=(1,))
        perturb_b(tsm, router=True)
        twin = copy.deepcopy(m)
        twin_tsm = attach_twin(tsm, twin)
        t = torch.tensor([700, 700])
        out = []
        for model, handle, policy in ((m, tsm, "always"), (twin, twin_tsm, "never")):
            handle.set_merged_training(policy)
            xi = x.clone().requires_grad_(True)
            with handle.timesteps(t):
                y = model(xi, t, encoder_hidden_states=c).sample
                y.square().mean().backward()
            out.append((y.detach(), xi.grad, {k: p.grad for k, p in handle.named_adapter_parameters()
                                              if p.grad is not None}))
        compare(out[0], out[1], 1e-4)


# ---------------------------------------------------------------------------- the automatic choice
def test_auto_merges_exactly_when_the_batch_shares_an_expert(monkeypatch):
    """With large activations (cheap merges) ``auto`` merges every layer for a shared expert and none for
    a mixed batch; in stage 2 with a per-token gate only the core merges. (This net is tiny: its layers
    would stay unmerged for the merged call's fixed overhead, which is set aside here.)"""
    monkeypatch.setattr(merged_mod, "CALL_OVERHEAD", 0)
    monkeypatch.setattr(layers_mod, "CALL_OVERHEAD", 0)
    spy = Spy(monkeypatch)
    net, tsm = build()
    tsm.set_merged_training("auto")
    x = x_for(2, size=32)
    for t, expect in ((SHARED, 3), (MIXED, 0), (torch.tensor([500, 700, 740]), 3)):  # 500..749: one expert
        spy.ops.clear()
        with tsm.timesteps(t):
            net(x.requires_grad_(True)).sum().backward()
        assert len(spy.ops) == expect, t
    net, tsm = build(mode="mixture")
    spy.ops.clear()
    with tsm.timesteps(SHARED):
        net(x).sum().backward()
    assert len(spy.ops) == 3


def test_auto_keeps_small_activations_unmerged(monkeypatch):
    """A Linear over two rows (a time-embedding projection): merging costs out*in*r, far more than the
    experts' r*(in+out) per row, so ``auto`` stays unmerged and ``always`` still merges."""
    spy = Spy(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64))
    tsm = attach(net, TSMConfig(rank=8, alpha=8, scales=(1, 4), target_modules=["0"]))
    tsm.set_mode("expert", scale=4)
    x = torch.randn(2, 64)
    for policy, expect in (("auto", 0), ("always", 1), ("never", 0)):
        spy.ops.clear()
        tsm.set_merged_training(policy)
        with tsm.timesteps(torch.tensor([600, 600])):
            net(x).sum().backward()
        assert len(spy.ops) == expect, policy


def test_unsafe_merges_fall_back(monkeypatch):
    """Dropout in training mode, a trainable base weight or hooks on the base layer: always unmerged."""
    spy = Spy(monkeypatch)
    net, tsm = build(dropout=0.1)
    tsm.set_merged_training("always")
    with tsm.timesteps(SHARED):
        net(x_for(2)).sum().backward()
    assert not spy.ops
    net.eval()  # dropout is the identity in eval mode: the merge is exact again
    with torch.no_grad(), tsm.timesteps(SHARED):
        net(x_for(2))
    assert len(spy.ops) == 3
    spy.ops.clear()
    net, tsm = build()
    tsm.set_merged_training("always")
    net.conv1.base_layer.weight.requires_grad_(True)
    net.proj.base_layer.register_forward_pre_hook(lambda m, a: None)
    with tsm.timesteps(SHARED):
        net(x_for(2)).sum().backward()
    assert len(spy.ops) == 1  # conv2 only
    assert net.conv1.base_layer.weight.grad is not None


def test_policy_is_checked():
    _, tsm = build()
    with pytest.raises(ValueError, match="auto"):
        tsm.set_merged_training("sometimes")


@pytest.mark.parametrize("router_input", ["both", "timestep"])
def test_gate_logging_under_checkpointing(router_input):
    """Trainers log gates in the forward only; the checkpoint's recompute (logging off by then) must save
    the same tensors, so logging never steers the merge, and merged gates are logged without a graph."""
    net, tsm = build(mode="mixture", router_input=router_input)
    tsm.set_merged_training("always")
    x = x_for(2).requires_grad_(True)
    with tsm.timesteps(SHARED):
        with tsm.record_gates() as logs:
            y = checkpoint(net, x, use_reentrant=False)
        y.square().mean().backward()
    assert all(len(v) == 1 for v in logs.values())
    assert net.proj.router_emb.grad is not None
