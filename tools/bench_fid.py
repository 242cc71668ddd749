#!/usr/bin/env python
"""Benchmark: our feature extraction vs clean-fid's folder mode, same images, same network, one run.

Writes --n synthetic images (smooth random colour fields, --size px) into two folders, warms both
paths up, then times feature extraction of both folders with

- clean-fid: ``cleanfid.fid.get_folder_features`` (its folder mode) with our network as the extractor
  (clean-fid's own weights need a download), ``num_workers`` = --cleanfid-workers;
- ours: ``FeatureExtractor.features_from_folder`` with --workers decode/resize threads.

Prints JSON: seconds and images/s of each, ratio = our throughput / clean-fid's (target >= 1.0), both
FIDs (folder 1 vs folder 2) and whether the features are identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tsm_core.eval import FeatureExtractor, fid_from_features  # noqa: E402


def write_images(folder: Path, n: int, size: int, seed: int) -> Path:
    """n smooth random RGB PNGs of size x size (cheap to make, image-like to decode and resize)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        small = (rng.rand(8, 8, 3) * 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return folder


def main(argv=None) -> int:
    """Run the benchmark and print its JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images in total (split over two folders)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=None, help="our decode/resize threads (default min(4, cpus))")
    p.add_argument("--cleanfid-workers", type=int, default=0, help="clean-fid DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dir", default=None, help="where to write the images (default: a temp folder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cleanfid import fid as cleanfid

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_fid_"))
    half = args.n // 2
    folders = [write_images(root / "a", half, args.size, 0), write_images(root / "b", args.n - half, args.size, 1)]
    ext = FeatureExtractor(device=args.device, batch_size=args.batch_size, workers=args.workers, progress=False)
    device = torch.device(args.device)

    def run_cleanfid(folder):
        return cleanfid.get_folder_features(str(folder), ext, num_workers=args.cleanfid_workers,
                                            batch_size=args.batch_size, device=device, mode="clean", verbose=False)

    def run_ours(folder):
        return ext.features_from_folder(folder).features

    # Warm-up: TorchScript optimises on its first calls; neither side should pay for that.
    warm = write_images(root / "warm", 2 * args.batch_size, args.size, 2)
    run_cleanfid(warm)
    run_ours(warm)

    t0 = time.perf_counter()
    theirs = [run_cleanfid(f) for f in folders]
    t1 = time.perf_counter()
    ours = [run_ours(f) for f in folders]
    t2 = time.perf_counter()
    cleanfid_s, ours_s = t1 - t0, t2 - t1

    fid_ours = fid_from_features(*ours)
    fid_cleanfid = float(cleanfid.fid_from_feats(*theirs))
    result = {
        "n_images": args.n, "size": args.size, "batch_size": args.batch_size, "device": args.device,
        "torch_threads": torch.get_num_threads(), "our_workers": ext.workers, "cleanfid_workers": args.cleanfid_workers,
        "cleanfid_s": round(cleanfid_s, 3), "ours_s": round(ours_s, 3),
        "cleanfid_img_per_s": round(args.n / cleanfid_s, 3), "ours_img_per_s": round(args.n / ours_s, 3),
        "ratio": round(cleanfid_s / ours_s, 3),
        "fid_ours": fid_ours, "fid_cleanfid": fid_cleanfid, "fid_abs_diff": abs(fid_ours - fid_cleanfid),
        "features_identical": all(np.array_equal(a, b) for a, b in zip(ours, theirs)),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
