"""The memory planner against an independent ruler (issue 27): the CPU allocator's own record of every
allocation and free, read from ``torch.profiler`` with ``profile_memory=True``. It shares no code with the
planner's `LiveBytes` (a dispatch mode that sums the storages ops create): the profiler is fed by c10's CPU
allocator, so it also sees kernels' internal buffers, and it runs on the trainer's real step, not on the
planner's meta passes."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.test_distill import phase
from tests.test_distill_backbones import SIZE, recipe, teachers  # noqa: F401 (a fixture)
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer
from tsm_distill.teacher import encode

# Measured here (AMD EPYC, torch 2.14): generator -4.9% (SDXL) / -0.9% (SD3), critic -0.1% / -1.1%, the
# reals' encoding +3.5% / -31% (planned - allocator, over allocator). Why these bounds:
# - a training step's peak is its saved activations and gradients, which the planner counts tensor by tensor;
#   the rest (the trainer's float64 x0s and noise draws, the CPU kernels' transient workspaces) is a few
#   percent. 10% leaves room for another CPU's kernels, and still fails on a missed or doubled tensor of the
#   step's size (a held copy of the activations, a gradient list, the reals encoded whole instead of chunked);
# - a no-grad VAE encode peaks at one convolution's transients, and there the CPU's convolution workspace
#   (im2col columns: a 3x3 conv at 32 px allocates twice its output on top of it; a GPU's cuDNN picks its own)
#   is a large share that the planner does not model. The tiny SD3's encode is VAE-bound, hence -31%. At
#   this size 40% catches gross errors only (the encoding left out, pixels at the wrong size); the chunking's
#   effect shows at full size (test_plan_cli_prints_the_shipped_sdxl_recipe_from_the_shipped_configs).
STEP_BOUND, ENCODING_BOUND = 0.10, 0.40


def allocator_peak(fn) -> int:
    """The most bytes the CPU allocator holds at once while ``fn`` runs, above what it held at its start:
    the running sum of the profiler's memory events (+ bytes on every allocation, - on every free)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def image_folder(folder, side: int, n: int = 8):
    """``n`` random RGB images of ``side`` px with captions: a real source the critic VAE-encodes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["a cat", "a dog"][i % 2]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_planned_step_peaks_match_the_cpu_allocators_record(teachers, kind, tmp_path):  # noqa: F811
    import shutil

    from tsm_distill.plan import plan_recipe

    side = 2 * SIZE[kind]  # the tiny VAEs halve each side
    reals = image_folder(tmp_path / "reals", side)
    phases = [phase("e3", scale=4, experts=[3], gan=True, batch_size=4)]
    r = recipe(teachers, kind, phases)
    # An image folder, so the critic update VAE-encodes its reals, one image per call (data.encode_batch).
    r["data"].update(real_images=str(reals), resolution=side, encode_batch=1)
    config_only = tmp_path / "configs"
    shutil.copytree(teachers[1][kind], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    planned = load_recipe(yaml.safe_load(yaml.safe_dump(r)), DistillRecipe)
    planned.model.path = str(config_only)
    (plan,) = plan_recipe(planned)

    tr = DMD2Trainer(load_recipe(r, DistillRecipe), tmp_path / "run")
    # The images decoded beforehand: on a GPU, decoding and transforms are host memory; what the planner counts
    # on the device is the stacked pixel batch, which the source still makes (collate) inside the step.
    tr.real.dataset = [tr.real.dataset[i] for i in range(len(tr.real.dataset))]
    tr.enter_phase(0)
    for opt in (tr.gen_opt, tr.critic_opt):  # AdamW's foreach path, as on a GPU (what the planner models)
        for group in opt.param_groups:
            group["foreach"] = True
    x_in = torch.randn(4, 4, SIZE[kind], SIZE[kind], generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), tr.timesteps[0], dtype=tr.teacher.timestep_dtype)
    cond = encode(tr.teacher, ["a cat", "a dog"] * 2)
    x0 = tr.generator_step(x_in, t, cond)["x0"]  # the first iteration creates the AdamW moments
    tr.critic_step(x0, cond, torch.Generator().manual_seed(0))
    out = {}
    measured = {
        "generator": allocator_peak(lambda: out.update(tr.generator_step(x_in, t, cond))),
        "critic": allocator_peak(lambda: tr.critic_step(out["x0"], cond, torch.Generator().manual_seed(0))),
        # The critic update's first part alone: RealSource's chunked VAE encode and the captions' encoding.
        "real encoding": allocator_peak(
            lambda: encode(tr.teacher, tr.real.sample(4, torch.Generator().manual_seed(0), "cpu")[1])),
    }
    got = {"generator": plan.generator_step, "critic": plan.critic_step, "real encoding": plan.real_encoding}
    for name, want in measured.items():
        bound = ENCODING_BOUND if name == "real encoding" else STEP_BOUND
        assert abs(got[name] - want) <= bound * want, (name, got[name], want, f"{got[name] / want - 1:+.3f}")
