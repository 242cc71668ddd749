"""Few-step sampling with a trained student, and its use in a stock diffusers pipeline.

* :func:`generate` runs the student exactly as it was trained (``rollout.sample``): predict x0 at each
  student timestep through that step's expert (or the mixture), re-noise to the next one.
* :func:`use_student_in_pipeline` plugs the same student into a stock ``StableDiffusionPipeline`` or
  ``StableDiffusionXLPipeline`` (both tested against :func:`generate`'s rollout):
  it swaps in an ``LCMScheduler`` (predict x0, re-noise to the next timestep: the student's
  sampler) and routes every UNet call by the timestep the pipeline passes to it.
* :func:`use_student_in_flux_pipeline` does the same for a stock ``FluxPipeline`` (tested against
  :func:`generate`'s rollout) with ``FlowMatchLCMScheduler``, the flow-matching form of that sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tsm_core.routing import route_by_timestep

from .rollout import sample


@torch.no_grad()
def generate(teacher, tsm, prompts: Sequence[str], seeds: Sequence[int], timesteps: Sequence[int] = (999, 749, 499, 249),
             batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), one per (prompt, seed) pair, with the student's few-step sampler."""
    from .student import Student
    from .teacher import encode

    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    student = Student(teacher, tsm)
    device = teacher.device
    shape = teacher.noise_shape(1, teacher.latent_size)[1:]
    out = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        # One generator per sample: its image depends on its seed only, not on the batch it lands in.
        gens = [torch.Generator().manual_seed(s) for s in ss]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        x0 = sample(student.predict_x0(encode(teacher, ps)), noise, timesteps, teacher, gens)
        out.append(teacher.vae_decode(x0).float().cpu())
    return torch.cat(out)


def use_student_in_pipeline(pipe, tsm, timesteps: Sequence[int] = (999, 749, 499, 249)) -> dict:
    """Make a stock ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) sample with the student.

    Returns the keyword arguments to call the pipeline with (``timesteps`` and ``guidance_scale=1``:
    the student was distilled with the teacher's guidance built in)::

        kwargs = use_student_in_pipeline(pipe, tsm)
        image = pipe("a photo of a cat", **kwargs).images[0]
    """
    from diffusers import LCMScheduler

    # LCM's step is the student's sampler: x0 from the model, then fresh noise to the next timestep.
    # A huge timestep_scaling makes its boundary condition c_skip vanish at every student step.
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=1e6)
    pipe._tsm_routing = route_by_timestep(pipe.unet, tsm)
    return {"timesteps": list(timesteps), "guidance_scale": 1.0}


def use_student_in_flux_pipeline(pipe, tsm, sigmas: Sequence[float] = (1.0, 0.749, 0.499, 0.249),
                                 guidance: float | None = None) -> dict:
    """Make a stock ``FluxPipeline`` sample with a Flux student (``student_sigmas`` of its recipe).

    Returns the keyword arguments to call the pipeline with: the student's ``sigmas`` and ``guidance_scale``,
    the embedded guidance the student and its fake score were distilled at (`FluxBackbone.guidance`, 3.5;
    the real score's ``real_guidance_scale`` is already distilled into the student)::

        kwargs = use_student_in_flux_pipeline(pipe, tsm, recipe.student_sigmas)
        image = pipe("a photo of a cat", **kwargs).images[0]
    """
    from diffusers import FlowMatchLCMScheduler

    from tsm_core.models import FluxBackbone

    # FlowMatchLCMScheduler's step is the student's sampler: x0 = x - sigma v, then fresh noise to the next
    # sigma (none after the last). Shifting off: the pipeline's mu would warp the student's sigmas again.
    pipe.scheduler = FlowMatchLCMScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0)
    # FluxPipeline passes sigma = t / 1000 to the transformer; the experts are routed by t.
    pipe._tsm_routing = route_by_timestep(pipe.transformer, tsm,
                                          timestep_scale=pipe.scheduler.config.num_train_timesteps)
    return {"sigmas": [float(s) for s in sigmas],
            "guidance_scale": FluxBackbone.guidance if guidance is None else float(guidance)}
