"""Small video post-pretraining experiment: moving Fashion-MNIST clips, LoRA vs TSM, on the CPU.

The "pretrained" video model is the embedded Fashion-MNIST teacher inflated into a 3D UNet
(``tsm_core.testing.tiny_video.inflate_unet2d``): its spatial layers are the image teacher's and its
temporal layers start as the identity, so before post-pretraining it draws every frame on its own.
Post-pretraining on clips of one item sliding across a 32x32 frame (8 frames) has to teach it to move
items coherently and off-centre. Runs, from the same start and data, each of S optimizer steps:

- ``base``: the inflated model, not trained (the floor of what post-pretraining must improve);
- ``lora``: vanilla LoRA (n = 1) for S steps;
- ``tsm_stage1``: TSM fostering at n = 4 for S steps;
- ``tsm_stage2``: TSM fostering at n = 4 (0.6 S), then n = 1 (0.2 S), then the router (0.2 S), core 4,
  context 1 (the split of tools/exp_mnist.py).

Targets: k and v of the spatial and temporal attentions (A.2.2), plus every attention's output
projection ``proj_out`` and the temporal convolutions' last layer ``conv4.3`` (Conv3d). Deviation from
A.2.2, kept because the start differs: VideoCrafter2's temporal layers are pretrained, ours are new and
zero at the output, so LoRA on k and v alone would get no gradient through them.

Scored by per-frame Inception FID/KID (``tsm_core.eval``, clean-fid's numbers) of the generated
frames against the frames of held-out clips made from Fashion-MNIST *test* items. Captions are
"a photo of a <item> moving <direction>"; the teacher's 16-token tokenizer spells unknown words by
letters, so the direction falls past its window: the models learn motion, not which way.

    python tools/exp_video.py --out /tmp/exp_video --steps 200 --n-eval 48 --n-ref 48

Writes ``results.json``, a strip (``<run>.png``: four clips, frames side by side) and one GIF per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from experiments import equal_step_recipes, record_run, trained_model  # tools/experiments.py

TEACHER = Path(__file__).resolve().parents[1] / "tsm_distill" / "assets" / "fmnist_teacher"
# k and v of every attention (spatial and temporal), attention output projections, temporal conv outputs.
TARGETS = ["to_k", "to_v", "proj_out", "conv4.3"]


def inflated_pipeline(teacher: Path, dest: Path) -> Path:
    """The teacher pipeline folder with its UNet inflated to a UNet3DConditionModel (written once)."""
    from diffusers import UNet2DConditionModel

    from tsm_core.testing.tiny_video import inflate_unet2d

    if (dest / "unet" / "config.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher, tmp, ignore=shutil.ignore_patterns("unet", "*.npz", "reference.json"))
    inflate_unet2d(UNet2DConditionModel.from_pretrained(teacher / "unet")).save_pretrained(tmp / "unet")
    tmp.rename(dest)
    return dest


def recipes(model: Path, data: Path, out: Path, steps: int, batch: int, lr: float, frames: int) -> dict[str, dict]:
    common = {
        "model": {"kind": "unet3d", "path": str(model)},
        "data": {"source": "video_folder", "path": str(data), "resolution": 32, "num_frames": frames,
                 "frame_stride": 1, "cache_text": True},
        "experts": {"rank": 4, "alpha": 4, "target_modules": TARGETS},
        "train": {"batch_size": batch, "checkpoint_every": steps, "keep_last": 1, "log_every": 20,
                  "tensorboard": False, "seed": 0},
    }
    return equal_step_recipes(common, out, steps, lr)


def captions(metadata: Path) -> list[str]:
    return [json.loads(line)["text"] for line in metadata.read_text().splitlines() if line.strip()]


def generate(bb, tsm, prompts: list[str], steps: int, seed: int, guidance: float, batch: int = 16) -> torch.Tensor:
    """Videos (N, 3, F, H, W) in [-1, 1] for the prompts."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([bb.sample(prompts[i:i + batch], tsm=tsm, steps=steps, guidance_scale=guidance, generator=g)
                      for i in range(0, len(prompts), batch)])


def frames_uint8(videos: torch.Tensor) -> list[np.ndarray]:
    """Every frame of (N, 3, F, H, W) videos in [-1, 1] as an (H, W, 3) uint8 image."""
    x = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 4, 1).flatten(0, 1).numpy())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/exp_video"))
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps of every trained run")
    p.add_argument("--clips", type=int, default=2000, help="training clips (Fashion-MNIST train items)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-eval", type=int, default=48, help="generated clips per run (x frames for the FID)")
    p.add_argument("--n-ref", type=int, default=48, help="held-out clips of test items (x frames: the reference)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.75, help="CFG scale (the demo teacher's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", nargs="*", default=["base", "lora", "tsm_stage1", "tsm_stage2"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tsm_core.data.video import moving_fmnist_clips, read_clip, save_gif
    from tsm_core.eval import FeatureExtractor
    from tsm_core.models import video_strip
    from tsm_core.train.logging import save_image_grid

    if not (args.teacher / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher pipeline not found at {args.teacher}; train it with tools/train_teacher.py")
    args.out.mkdir(parents=True, exist_ok=True)
    model = inflated_pipeline(args.teacher, args.out / "video_teacher")
    train_clips, ref_clips = args.out / "clips_train", args.out / "clips_ref"
    if not (train_clips / "metadata.jsonl").is_file():
        moving_fmnist_clips(train_clips, args.clips, num_frames=args.frames, seed=0, split="train")
    if not (ref_clips / "metadata.jsonl").is_file():
        moving_fmnist_clips(ref_clips, args.n_ref, num_frames=args.frames, seed=1, split="test")
    ref_frames = [f for i in range(args.n_ref) for f in read_clip(ref_clips / f"clip_{i:05d}.mp4", args.frames)]
    prompts = captions(ref_clips / "metadata.jsonl")
    prompts = [prompts[i % len(prompts)] for i in range(args.n_eval)]  # the held-out clips' captions

    ext = FeatureExtractor(device="cpu", batch_size=50, workers=0, progress=False)
    ref = ext.features_from_images(ref_frames).features
    results: dict = {"steps": args.steps, "clips": args.clips, "frames": args.frames, "batch": args.batch,
                     "lr": args.lr, "n_eval_clips": args.n_eval, "n_eval_frames": args.n_eval * args.frames,
                     "n_ref_frames": len(ref), "sample_steps": args.sample_steps, "guidance": args.guidance,
                     "targets": TARGETS, "runs": {}}
    all_recipes = recipes(model, train_clips, args.out, args.steps, args.batch, args.lr, args.frames)
    for name in args.runs:
        t0 = time.time()
        bb, tsm = trained_model("unet3d", model, None if name == "base" else all_recipes[name])
        bb.num_frames = args.frames
        t_train = time.time() - t0
        videos = generate(bb, tsm, prompts, args.sample_steps, seed=1, guidance=args.guidance)
        save_image_grid(video_strip(videos[:4]), args.out / f"{name}.png", nrow=1)
        save_gif(torch.cat(list(videos[:4]), dim=-1), args.out / f"{name}.gif")  # four clips side by side
        record_run(results, name, ext.features_from_images(frames_uint8(videos)).features, ref, t0, t_train, args.out)
    return results


if __name__ == "__main__":
    main()
