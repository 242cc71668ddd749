"""The frozen core's cached merge (``set_merged_training(cache_core=True)``, stage 2 of the paper).

Each case compares stage-2 steps with the cache against the routed path (``"never"``) on a twin of the
model: outputs, dL/dx and the router's gradients in float64 (to 1e-9), and checks when the merge is built,
reused and rebuilt: once for several steps, again after an in-place change of the core or the base weight,
never for a trainable core or a batch across several core intervals, and never stored in a state dict.
"""

import copy

import pytest
import torch

from tests.test_merged_path import (
    MIXED,
    SHARED,
    _flat,
    attach_twin,
    base_weights,
    build,
    compare,
    step,
    x_for,
)
from tsm_core import layers as layers_mod


class MergeCount:
    """Counts merged_weight calls made for the core cache (the layer module's name of the function)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = layers_mod.merged_weight

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(layers_mod, "merged_weight", counted)


def run(net, tsm, x, t, **kw):
    """One stage-2 step; the policy is set by the caller and kept across steps, so the cache survives."""
    return step(net, tsm, x, t, None, **kw)


def pair(router_input="both", policy="auto"):
    net, tsm = build(mode="mixture", router_input=router_input)
    twin = copy.deepcopy(net)
    twin_tsm = attach_twin(tsm, twin)
    tsm.set_merged_training(policy, cache_core=True)
    twin_tsm.set_merged_training("never")
    return net, tsm, twin, twin_tsm


def cached(net):
    return [m for m in net.modules() if getattr(m, "_core_cache", None)]


@pytest.mark.parametrize("router_input", ["both", "timestep"])
@pytest.mark.parametrize("policy", ["auto", "always"])
def test_cached_core_equals_routed_path(router_input, policy, monkeypatch):
    """Three steps with the router updated between them: the core is merged once per layer, and every
    step equals the routed path (per-token gates stay unmerged beside the cached core; a timestep-only
    gate merges onto it)."""
    count = MergeCount(monkeypatch)
    net, tsm, twin, twin_tsm = pair(router_input, policy)
    before = base_weights(net)
    x = x_for(2)
    for _ in range(3):
        got, want = run(net, tsm, x, SHARED), run(twin, twin_tsm, x, SHARED)
        compare(got, want, 1e-9)
        assert any("router" in k for k in got[2]) and not any("lora" in k for k in got[2])
        with torch.no_grad():  # a router update, as the optimizer would make (in place on both twins)
            for (_, p), (_, q) in zip(tsm.named_adapter_parameters(), twin_tsm.named_adapter_parameters()):
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
                    q.sub_(0.1 * p.grad)
    assert count.n == 3  # conv1, conv2, proj: once each, on the first step
    assert len(cached(net)) == 3
    after = base_weights(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cache_is_rebuilt_after_an_in_place_change(monkeypatch):
    """Loading other core weights (or base weights) in place must not leave a stale merge behind."""
    count = MergeCount(monkeypatch)
    net, tsm, twin, twin_tsm = pair()
    x = x_for(2)
    compare(run(net, tsm, x, SHARED), run(twin, twin_tsm, x, SHARED), 1e-9)
    assert count.n == 3
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        delta = torch.randn(net.conv2.lora_B["s4_e2"].shape, generator=g, dtype=torch.float64)  # t = 600's core
        net.conv2.lora_B["s4_e2"].add_(delta)
        twin.conv2.lora_B["s4_e2"].add_(delta)
        net.proj.base_layer.weight.mul_(1.5)
        twin.proj.base_layer.weight.mul_(1.5)
    compare(run(net, tsm, x, SHARED), run(twin, twin_tsm, x, SHARED), 1e-9)
    assert count.n == 5  # conv2 and proj rebuilt; conv1 reused


def test_other_core_interval_and_mixed_batches(monkeypatch):
    """Each shared core interval gets its own cached merge, kept while others are used (a 4-step student
    visits its four core experts in turn); a batch across core intervals has no one weight and takes the
    routed path, still equal."""
    count = MergeCount(monkeypatch)
    net, tsm, twin, twin_tsm = pair()
    x = x_for(2)
    for t in (SHARED, torch.tensor([100, 100, 100]), MIXED, SHARED, torch.tensor([100, 100, 100])):
        compare(run(net, tsm, x, t), run(twin, twin_tsm, x, t), 1e-9)
    assert count.n == 6  # three layers for t = 600, three for t = 100, none for the mixed batch or the returns
    assert all(sorted(m._core_cache) == ["s4_e0", "s4_e2"] for m in cached(net))


def test_cache_with_gradient_checkpointing():
    net, tsm, twin, twin_tsm = pair()
    x = x_for(2)
    for _ in range(2):
        compare(run(net, tsm, x, SHARED, ckpt=True), run(twin, twin_tsm, x, SHARED, ckpt=True), 1e-9)


def test_cache_under_bf16_autocast():
    """The merge is kept in the compute dtype; compared with the float32 step as accurately as the routed
    bf16 step is (the same bound as tests/test_merged_path.py's autocast case)."""
    from tests.numerics import rel_error

    net, tsm = build(mode="mixture", router_input="both", dtype=torch.float32)
    routed, ref = copy.deepcopy(net), copy.deepcopy(net)
    routed_tsm, ref_tsm = attach_twin(tsm, routed), attach_twin(tsm, ref)
    tsm.set_merged_training("auto", cache_core=True)
    routed_tsm.set_merged_training("never")
    ref_tsm.set_merged_training("never")
    x = x_for(2, dtype=torch.float32)
    want = run(ref, ref_tsm, x, SHARED)
    for _ in range(2):
        got, other = run(net, tsm, x, SHARED, autocast=True), run(routed, routed_tsm, x, SHARED, autocast=True)
        assert got[0].dtype == torch.bfloat16
        for a, b, r in zip(_flat(got), _flat(other), _flat(want)):
            assert rel_error(a, r) <= max(2 * rel_error(b, r), 2e-2)
    assert all(w.dtype == torch.bfloat16 for m in cached(net) for _, w in m._core_cache.values())


def test_trainable_core_is_never_cached(monkeypatch):
    """A core that trains changes every step: it takes the merged-function path, with its own gradients."""
    count = MergeCount(monkeypatch)
    net, tsm, twin, twin_tsm = pair()
    for h in (tsm, twin_tsm):
        for layer in h.layers.values():
            layer.lora_A["s4_e2"].requires_grad_(True)
    got, want = run(net, tsm, x_for(2), SHARED), run(twin, twin_tsm, x_for(2), SHARED)
    compare(got, want, 1e-9)
    assert any("lora_A.s4_e2" in k for k in got[2])
    assert count.n == 0 and not cached(net)


def test_cache_is_dropped_by_mode_and_setting_and_never_saved():
    net, tsm, _, _ = pair()
    run(net, tsm, x_for(2), SHARED)
    assert len(cached(net)) == 3
    assert not any("cache" in k for k in net.state_dict())
    tsm.set_merged_training("auto")  # cache_core off
    assert not cached(net)
    tsm.set_merged_training("auto", cache_core=True)
    run(net, tsm, x_for(2), SHARED)
    tsm.set_mode("expert", scale=4)
    assert not cached(net)
    with tsm.timesteps(SHARED):
        net(x_for(2)).sum().backward()
    assert not cached(net)  # stage 1 trains its expert: nothing to cache
    tsm.set_mode("mixture", core_scale=4, context_scales=(1,))
    tsm.set_merged_training("never", cache_core=True)  # "never" means the routed path everywhere
    run(net, tsm, x_for(2), SHARED)
    assert not cached(net)
