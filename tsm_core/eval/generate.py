"""Images from a diffusers StableDiffusionPipeline folder, deterministic per image.

Image i uses prompt ``prompts[i % len(prompts)]`` and a CPU ``torch.Generator`` seeded with
``seed + i``, so an image does not depend on the batch size or the device that made it.
A pipeline folder without a VAE (a pixel-space UNet, like the embedded teacher) is loaded with
``vae=None`` and decoded as ``clamp((x + 1) / 2)`` of the final sample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.images import read_prompts  # noqa: F401  (tools/fid.py generate reads prompts through here)
from .preprocess import images_from_batch


def pipeline_has_vae(path: str | os.PathLike) -> bool:
    """Whether the pipeline folder declares a VAE component (``"vae": [null, null]`` means none)."""
    from ..models import pipeline_has_component

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json).")
    return pipeline_has_component(path, "vae") and (Path(path) / "vae").is_dir()


def attach_tsm_adapter(pipe, adapter_dir: str | os.PathLike):
    """Load a saved TSM adapter into ``pipe.unet`` and route every UNet call by its timestep."""
    from tsm_core import load_adapter
    from tsm_core.routing import route_by_timestep

    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"TSM adapter folder {adapter_dir} does not exist.")
    tsm = load_adapter(pipe.unet, str(adapter_dir))
    pipe._tsm_routing = route_by_timestep(pipe.unet, tsm)
    return tsm


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  adapter: str | os.PathLike | None = None, lora: str | os.PathLike | None = None):
    """A StableDiffusionPipeline from a local folder (or hub id), optionally with a TSM adapter or LoRA."""
    from diffusers import StableDiffusionPipeline

    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if Path(path).is_dir() and not pipeline_has_vae(path):
        kwargs["vae"] = None  # pixel-space UNet: diffusers needs the missing component named explicitly
    elif not Path(path).exists() and (Path(path).is_absolute() or str(path).startswith(".")):
        raise FileNotFoundError(f"Pipeline folder {path} does not exist.")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    if lora is not None:
        if not Path(lora).exists():
            raise FileNotFoundError(f"LoRA file {lora} does not exist.")
        pipe.load_lora_weights(str(lora))
    if adapter is not None:
        attach_tsm_adapter(pipe, adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_batch(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                   guidance_scale: float = 1.0, size: int | None = None) -> np.ndarray:
    """N x H x W x 3 uint8 images for ``prompts`` with one seeded CPU generator per image."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if pipe.vae is None:
        side = size or pipe.unet.config.sample_size
        # The pipeline divides height by vae_scale_factor to get the sample size; undo that.
        px = side * pipe.vae_scale_factor
        out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   height=px, width=px, output_type="latent")
        images = ((out.images.float() + 1) / 2).clamp(0, 1)  # N x 3 x H x W
    else:
        extra = {"height": size, "width": size} if size else {}
        out = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   output_type="pt", **extra)
        images = out.images.float().clamp(0, 1)
    return np.stack(images_from_batch(images))


def iter_generated(pipe, prompts: Sequence[str], n_images: int, seed: int = 0, steps: int = 4,
                   batch_size: int = 8, guidance_scale: float = 1.0, size: int | None = None,
                   progress: bool = True) -> Iterator[tuple[int, str, int, np.ndarray]]:
    """Yield (index, prompt, seed, uint8 image) for images 0..n_images-1."""
    if n_images < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n_images, steps and batch_size must be positive, got {n_images}, {steps}, {batch_size}.")
    if not prompts:
        raise ValueError("No prompts given.")
    bar = tqdm(total=n_images, desc="generate", unit="img", disable=not progress)
    for start in range(0, n_images, batch_size):
        idx = list(range(start, min(start + batch_size, n_images)))
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        seeds = [seed + i for i in idx]
        images = generate_batch(pipe, batch_prompts, seeds, steps, guidance_scale, size)
        yield from zip(idx, batch_prompts, seeds, images)
        bar.update(len(idx))
    bar.close()


def generate_to_folder(pipe, out_dir: str | os.PathLike, prompts: Sequence[str], n_images: int, **kwargs) -> Path:
    """Write images as ``000000.png`` ... and ``prompts.jsonl`` (index, file, seed, prompt); return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "prompts.jsonl", "w", encoding="utf-8") as log:
        for i, prompt, s, image in iter_generated(pipe, prompts, n_images, **kwargs):
            name = f"{i:06d}.png"
            Image.fromarray(image).save(out_dir / name)
            log.write(json.dumps({"index": i, "file": name, "seed": s, "prompt": prompt}) + "\n")
    return out_dir
