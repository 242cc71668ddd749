"""``train.cache_core_merge`` in the trainers and the planner: the DMD2 router phase trains the same router
with and without the cached core, and ``tsm-distill --plan`` counts one merged copy of the targeted weights
per core expert of an assembling phase (and none in fostering phases)."""

import shutil

import torch
from safetensors.torch import load_file

from tests.numerics import assert_close
from tests.test_core import perturb
from tests.test_distill import env, phase, recipe  # noqa: F401  (env: the module's tiny pipeline fixture)
from tests.test_finetune import TWO_STAGES, _recipe, folder  # noqa: F401  (folder: an image-folder fixture)
from tsm_core.finetune import FinetuneTrainer
from tsm_distill import DMD2Trainer

# The context (scale 1) must be trained: with its B still zero the gates would get no gradient.
PHASES = [phase("lora", scale=1), phase("e3", scale=4, experts=[3]),
          phase("router", steps=3, type="assemble", gan=True)]


def test_router_phase_trains_the_same_router_with_the_cached_core(env, tmp_path):  # noqa: F811
    """Router-phase generator updates at three student steps (three core experts, then the first again) with
    distinct experts: the routers match the uncached trainer's, one merge is kept per core expert visited,
    and a whole run (train(), with its rollouts, GAN and final samples) also matches."""
    routers, slots = {}, {}
    x_in = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for cache in (False, True):
        tr = DMD2Trainer(recipe(env, [PHASES[-1]], cache_core_merge=cache), tmp_path / f"step{cache}")
        perturb(tr.tsm)  # every expert distinct and non-zero (a wrong core would change the outputs at O(1))
        tr.enter_phase(0)
        cond = tr.teacher.encode_prompts(["a cat", "a dog"])
        for t in (999, 749, 499, 999):
            tr.generator_step(x_in, torch.full((2,), t), cond, torch.Generator().manual_seed(t))
        routers[cache] = {k: v.detach().clone() for k, v in tr.tsm.state_dict().items() if "router" in k}
        slots[cache] = {name: sorted(layer._core_cache) for name, layer in tr.tsm.layers.items()}
    assert routers[True].keys() == routers[False].keys() and routers[True]
    assert any(v.abs().sum() > 0 for v in routers[True].values())  # the router did train
    # Adam's first steps normalise each gradient element, so float32 rounding of the merged vs the routed
    # core (1e-7 relative) can move an element whose gradient is near Adam's eps by ~1e-3 of the tensor;
    # a wrong or stale core merge changes the generator's outputs, and the routers, at O(1).
    for k in routers[False]:
        assert_close(routers[True][k], routers[False][k], rel=1e-2, msg=k)
    assert all(v == ["s4_e1", "s4_e2", "s4_e3"] for v in slots[True].values())  # t 999, 749, 499: experts 3, 2, 1
    assert not any(slots[False].values())

    for cache in (False, True):
        DMD2Trainer(recipe(env, PHASES, cache_core_merge=cache), tmp_path / f"run{cache}").train()
        saved = load_file(tmp_path / f"run{cache}" / "adapter" / "tsm_adapter.safetensors")
        routers[cache] = {k: v for k, v in saved.items() if "router" in k}
    for k in routers[False]:
        assert_close(routers[True][k], routers[False][k], rel=1e-2, msg=k)


def test_plan_counts_the_cached_core_in_assembling_phases_only(env, tmp_path):  # noqa: F811
    from tsm_core import TSMConfig, attach
    from tsm_distill.plan import plan_recipe
    from tsm_distill.teacher import load_teacher

    config_only = tmp_path / "configs"
    shutil.copytree(env[1], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    plans = {}
    for cache in (False, True):
        r = recipe(env, PHASES, cache_core_merge=cache)
        r.model.path = str(config_only)
        plans[cache] = plan_recipe(r)
    (*foster_off, router_off), (*foster_on, router_on) = plans[False], plans[True]
    assert foster_on == foster_off and router_off.core_cache == 0
    # 4 student steps (999/749/499/249) in 4 core intervals: four fp32 copies of every targeted weight
    denoiser = load_teacher(str(env[1])).denoiser
    r = recipe(env, PHASES)
    tsm = attach(denoiser, TSMConfig(rank=2, alpha=2, scales=(1, 4), target_modules=r.experts.target_modules))
    targeted = sum(layer.base_layer.weight.numel() for layer in tsm.layers.values())
    assert router_on.core_cache == 4 * 4 * targeted
    assert router_on.total - router_off.total == router_on.core_cache


def test_finetune_assembling_trains_the_same_router_with_the_cached_core(tmp_path, folder, sd_pipeline_path):  # noqa: F811
    """Fine-tuning draws t per sample, so only batches inside one core interval use the cache (batch 2, 4
    intervals: some steps); the routers match the uncached run's either way."""
    routers = {}
    for cache in (False, True):
        tr = FinetuneTrainer(_recipe("unet", sd_pipeline_path, folder, tmp_path / f"ft{cache}", TWO_STAGES,
                                     cache_core_merge=cache))
        assert all(layer.cache_core == cache for layer in tr.tsm.layers.values())
        tr.train()
        routers[cache] = {k: v.detach().clone() for k, v in tr.tsm.state_dict().items() if "router" in k}
        if not cache:
            assert not any(layer._core_cache for layer in tr.tsm.layers.values())
    assert routers[True].keys() == routers[False].keys() and routers[True]
    for k in routers[False]:
        assert_close(routers[True][k], routers[False][k], rel=1e-4, msg=k)
