"""tsm_core: intervals, config validation, routing, modes, merge, checkpointing, save/load, export."""

import pytest
import torch
from torch import nn

from tests.numerics import assert_close, close
from tsm_core import TimestepContextError, TimestepIntervals, TSMConfig, attach, load_adapter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut",
                "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj", "proj_in", "proj_out"]


def perturb(tsm, seed=0, std=0.2, router=False, router_std=0.05):
    """Zero-initialised B makes every expert identical; give each a distinct random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tsm.layers.values():
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if router:
                for p in (layer.router_fc, layer.router_emb):
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=g) * router_std)


def unet_inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 6, 32, generator=g)


def run(unet, tsm, x, c, t):
    with tsm.timesteps(t):
        return unet(x, t, encoder_hidden_states=c).sample


# ---------------------------------------------------------------------------- intervals / config
def test_intervals_paper_mapping():
    iv = TimestepIntervals(1000, (1, 2, 4, 8))
    assert iv.index(torch.tensor([999, 749, 499, 249]), 4).tolist() == [3, 2, 1, 0]
    assert iv.index(torch.tensor([0, 250, 500, 750]), 4).tolist() == [0, 1, 2, 3]
    assert iv.index(999, 1).tolist() == [0]
    assert iv.index(torch.tensor([1000.0, 999.5, 0.0]), 8).tolist() == [7, 7, 0]  # float t in [0, T]
    assert iv.index(iv.from_sigmas(torch.tensor([1.0, 0.5, 0.0])), 4).tolist() == [3, 2, 0]
    for scale in (2, 4, 8):
        for k in range(scale):
            lo, hi = iv.bounds(scale, k)
            assert iv.index(torch.arange(lo, hi), scale).eq(k).all()
    with pytest.raises(ValueError, match="timesteps must lie"):
        iv.index(torch.tensor([1000]), 4)
    with pytest.raises(ValueError, match="timesteps must lie"):
        iv.index(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="sigmas"):
        iv.from_sigmas(torch.tensor([1.5]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(scales=(0, 4)), "positive integer"),
    (dict(scales=(1.5,)), "positive integer"),
    (dict(scales=(1, 4), core_scale=1), "finest scale"),
    (dict(scales=(1, 4), context_scales=(2,)), "not one of the fostered"),
    (dict(rank=0), "rank"),
    (dict(router_activation="relu"), "router_activation"),
    (dict(target_modules="(["), "regex"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TSMConfig(**kwargs)


def test_target_matching_no_layer(unet):
    with pytest.raises(ValueError, match="matched no layer"):
        attach(unet, TSMConfig(target_modules=["not_a_layer"]))


def test_config_json_round_trip():
    cfg = TSMConfig(rank=8, alpha=2, scales=(1, 2, 4), target_modules=".*to_q", router_activation="sigmoid")
    assert TSMConfig.from_json(cfg.to_json()) == cfg
    assert cfg.core_scale == 4 and cfg.context_scales == (1, 2)


# ---------------------------------------------------------------------------- modes
def test_off_and_zero_init_equal_base(unet):
    x, c = unet_inputs()
    t = torch.tensor([999, 749, 499, 249])
    base = unet(x, t, encoder_hidden_states=c).sample
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=UNET_TARGETS))
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, base)  # mode off, no context needed
    tsm.set_mode("expert", scale=4)
    assert_close(run(unet, tsm, x, c, t), base, rel=1e-5)  # B = 0
    perturb(tsm)
    assert not close(run(unet, tsm, x, c, t), base, rel=1e-3)
    tsm.set_mode("off")
    assert torch.equal(unet(x, t, encoder_hidden_states=c).sample, base)


def assert_batch_routes_per_sample(model, tsm, x, c, t, rel, run=run) -> dict:
    """In every routed mode (expert at scale 4; mixture and symmetric with a random router) a
    mixed-timestep batch equals each sample run alone, and differs from routing every sample to expert 0;
    returns each mode's batched output."""
    out = {}
    for mode, kw in (("expert", dict(scale=4)), ("mixture", {}), ("symmetric", {})):
        tsm.set_mode(mode, **kw)
        if mode != "expert":
            perturb(tsm, seed=1, router=True)
        batched = run(model, tsm, x, c, t)
        alone = torch.cat([run(model, tsm, x[i:i + 1], c[i:i + 1], t[i:i + 1]) for i in range(len(t))])
        assert_close(batched, alone, rel=rel, msg=mode)
        # and the experts really differ: routing everyone to expert 0 gives another answer
        assert not close(batched, run(model, tsm, x, c, torch.zeros_like(t)), rel=1e-3), mode
        out[mode] = batched
    return out


def test_per_sample_routing_equals_per_sample_loop(unet):
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=UNET_TARGETS))
    perturb(tsm)
    x, c = unet_inputs()
    assert_batch_routes_per_sample(unet, tsm, x, c, torch.tensor([999, 749, 499, 249]), rel=1e-4)  # 4 experts


def test_mixture_with_zero_router_equals_core(unet):
    tsm = attach(unet, TSMConfig(scales=(1, 2, 4), target_modules=UNET_TARGETS))
    perturb(tsm)
    x, c = unet_inputs()
    t = torch.tensor([999, 600, 300, 10])
    tsm.set_mode("expert", scale=4)
    core = run(unet, tsm, x, c, t)
    tsm.set_mode("mixture", core_scale=4, context_scales=(1, 2))
    assert_close(run(unet, tsm, x, c, t), core, rel=1e-5)
    perturb(tsm, seed=3, router=True)
    assert not close(run(unet, tsm, x, c, t), core, rel=1e-3)


def test_gate_is_per_token_not_pooled():
    lin = nn.Sequential(nn.Linear(8, 8))
    tsm = attach(lin, TSMConfig(scales=(1, 4), target_modules=["0"]))
    perturb(tsm, router=True)
    tsm.set_mode("mixture")
    perturb(tsm, seed=5, router=True)
    x = torch.randn(2, 3, 8)
    t = torch.tensor([100, 900])
    with tsm.timesteps(t):
        full = lin(x)
    for b in range(2):
        for tok in range(3):
            with tsm.timesteps(t[b:b + 1]):
                one = lin(x[b:b + 1, tok:tok + 1])
            assert_close(full[b, tok], one[0, 0], rel=1e-5)


@pytest.mark.parametrize("mode", ["expert", "mixture"])
def test_optimizer_step_changes_only_trainable(unet, mode):
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=UNET_TARGETS))
    perturb(tsm)
    if mode == "expert":
        tsm.set_mode("expert", scale=4, experts=[3])
    else:
        tsm.set_mode("mixture")
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainable = {id(p) for p in tsm.trainable_parameters()}
    opt = torch.optim.AdamW(tsm.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    x, c = unet_inputs()
    t = torch.tensor([999, 800, 760, 999])  # all in expert 3 at scale 4
    with tsm.timesteps(t):
        unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
    opt.step()
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in unet.named_parameters() if id(p) in trainable}
    assert changed == expected and changed
    if mode == "expert":
        assert all("s4_e3" in n for n in changed)
    else:
        assert all("router" in n for n in changed)


def test_gradient_checkpointing_same_gradients(tiny_dir):
    from tsm_core.testing import tiny

    grads = []
    for ckpt in (False, True):
        unet = tiny.build_unet(tiny_dir / "unet_gc")
        tsm = attach(unet, TSMConfig(scales=(4,), target_modules=UNET_TARGETS))
        perturb(tsm)
        tsm.set_mode("expert", scale=4)
        if ckpt:
            unet.enable_gradient_checkpointing()
        unet.train()
        x, c = unet_inputs()
        t = torch.tensor([999, 749, 499, 249])
        with tsm.timesteps(t):
            unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in tsm.trainable_parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_recompute_after_block_exit_raises(unet):
    tsm = attach(unet, TSMConfig(scales=(4,), target_modules=UNET_TARGETS))
    tsm.set_mode("expert", scale=4)
    unet.enable_gradient_checkpointing()
    unet.train()
    x, c = unet_inputs()
    t = torch.tensor([999, 749, 499, 249])
    with tsm.timesteps(t):
        loss = unet(x, t, encoder_hidden_states=c).sample.square().mean()
    with pytest.raises(TimestepContextError, match="no timestep set"):
        loss.backward()  # the checkpoint recompute runs routed layers outside the block
    with pytest.raises(TimestepContextError):
        unet(x, t, encoder_hidden_states=c)


def test_merged_equals_routed_and_unmerge_is_exact(unet):
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=UNET_TARGETS, router_input="timestep"))
    perturb(tsm)
    x, c = unet_inputs(batch=2)
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    for mode in ("expert", "mixture"):
        tsm.set_mode(mode, **({"scale": 4} if mode == "expert" else {}))
        if mode == "mixture":
            perturb(tsm, seed=7, router=True)
            weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
        for t in (999, 300):
            tt = torch.tensor([t, t])
            routed = run(unet, tsm, x, c, tt)
            with tsm.merged(t), torch.no_grad():
                fused = unet(x, tt, encoder_hidden_states=c).sample
            assert_close(fused, routed, rel=1e-4, msg=f"{mode} t={t}")
            assert all(torch.equal(p, weights[n]) for n, p in unet.named_parameters())  # bit for bit
    with pytest.raises(ValueError, match="one timestep"):
        with tsm.merged(torch.tensor([1, 2])):
            pass


def test_merge_refuses_feature_dependent_gate(unet):
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=["to_q"]))
    tsm.set_mode("mixture")
    perturb(tsm, router=True)
    with pytest.raises(ValueError, match="cannot be fused"):
        with tsm.merged(10):
            pass


def test_save_load_same_outputs(unet, tiny_dir, tmp_path):
    from tsm_core.testing import tiny

    tsm = attach(unet, TSMConfig(rank=3, alpha=6, scales=(1, 4), target_modules=UNET_TARGETS))
    perturb(tsm)
    tsm.set_mode("mixture")
    perturb(tsm, seed=2, router=True)
    x, c = unet_inputs()
    t = torch.tensor([999, 749, 499, 249])
    ref = run(unet, tsm, x, c, t)
    tsm.save(tmp_path / "adapter")
    fresh = tiny.build_unet(tiny_dir / "unet_fresh")
    tsm2 = load_adapter(fresh, tmp_path / "adapter")
    assert tsm2.mode == "mixture" and tsm2.config == tsm.config
    assert torch.equal(run(fresh, tsm2, x, c, t), ref)
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny.build_unet(tiny_dir / "unet_x"), tmp_path / "missing")


def test_linear_and_conv_layers_route_per_sample():
    conv = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(5, 4, 1))
    tsm = attach(conv, TSMConfig(rank=2, scales=(1, 4), target_modules=["0", "1"]))
    perturb(tsm)
    x = torch.randn(3, 3, 9, 9)
    t = torch.tensor([10, 500, 990])
    for mode in ("expert", "mixture"):
        tsm.set_mode(mode, **({"scale": 4} if mode == "expert" else {}))
        if mode == "mixture":
            perturb(tsm, seed=4, router=True)
        with tsm.timesteps(t):
            y = conv(x)
        for i in range(3):
            with tsm.timesteps(t[i:i + 1]):
                assert_close(y[i:i + 1], conv(x[i:i + 1]), rel=1e-5)


def test_batch_timestep_mismatch_is_clear(unet):
    tsm = attach(unet, TSMConfig(scales=(4,), target_modules=["to_q"]))
    tsm.set_mode("expert", scale=4)
    x, c = unet_inputs(batch=4)
    with pytest.raises(ValueError, match="4 but 2 timesteps"):
        with tsm.timesteps(torch.tensor([1, 2])):
            unet(x, 5, encoder_hidden_states=c)


# ---------------------------------------------------------------------------- other backbones
def test_text_encoder_experts_share_the_unet_context(unet, text_encoder, tokenizer):
    tsm = attach(unet, TSMConfig(scales=(4,), target_modules=["to_q", "to_v"]))
    tsm_te = attach(text_encoder, TSMConfig(scales=(4,), target_modules=["q_proj", "v_proj"]), context=tsm.context)
    perturb(tsm_te)
    tsm.set_mode("expert", scale=4)
    tsm_te.set_mode("expert", scale=4)
    ids = tokenizer(["a cat", "a dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with tsm.timesteps(torch.tensor([999, 10])):
        both = text_encoder(ids)[0]
    with tsm.timesteps(torch.tensor([999])):
        first = text_encoder(ids[:1])[0]
    with tsm.timesteps(torch.tensor([10])):
        second = text_encoder(ids[1:])[0]
    assert_close(both, torch.cat([first, second]), rel=1e-4)
    tsm_te.set_mode("off")
    assert not close(first, text_encoder(ids[:1])[0], rel=1e-3)  # the experts did something


@pytest.mark.parametrize("which", ["pixart", "sd3"])
def test_transformer_backbones(which, request):
    model = request.getfixturevalue(which)
    tsm = attach(model, TSMConfig(scales=(1, 4), target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    perturb(tsm)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 100]) if which == "pixart" else torch.tensor([1000.0, 100.0])
    if which == "pixart":
        kw = dict(encoder_hidden_states=torch.randn(2, 5, 32), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        kw = dict(encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16))
    base = model(x, timestep=t, **kw).sample
    for mode in ("expert", "mixture"):
        tsm.set_mode(mode, **({"scale": 4} if mode == "expert" else {}))
        if mode == "mixture":
            perturb(tsm, seed=9, router=True)
        with tsm.timesteps(t):
            y = model(x, timestep=t, **kw).sample
        assert not close(y, base, rel=1e-3)
        # per-sample routing matches one-sample batches routed one at a time
        outs = []
        for i in range(2):
            with tsm.timesteps(t[i:i + 1]):
                outs.append(model(x[i:i + 1], timestep=t[i:i + 1], **{k: (v[i:i + 1] if torch.is_tensor(v) else v)
                                                                      for k, v in kw.items()}).sample)
        assert_close(y, torch.cat(outs), rel=1e-4)
