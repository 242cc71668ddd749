"""The COCO-2014 30K FID protocol (paper sec. 4.3 / DMD2), for users who have the data.

Protocol, as DMD2's ``main/coco_eval/coco_evaluator.py`` runs it:

1. Prompts: 30,000 captions of COCO-2014 val (``annotations/captions_val2014.json``). DMD2 ships its
   own fixed list; pass it as a prompt file to reproduce it exactly. Without one we take one caption
   per image (the lowest annotation id), images ordered by id, and draw 30,000 with ``random.Random(seed)``.
2. Reference: all 40,504 images of ``val2014/``.
3. Both sides are center-cropped to the short edge and resized to 256 x 256 with PIL Lanczos, then
   measured with clean-fid's 'clean' mode (bicubic float resize to 299) and the Inception network.

The reference statistics are cached as .npz (about 40K x 2048 features, for KID) and reused when
their mode/resolution/network match.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .evaluate import compute_reference
from .features import FeatureExtractor
from .reference import ReferenceStats

COCO_RESOLUTION = 256
COCO_N_PROMPTS = 30_000
COCO_VAL_IMAGES = 40_504


def select_coco_captions(captions_json: str | os.PathLike, n: int = COCO_N_PROMPTS, seed: int = 2014) -> list[str]:
    """``n`` captions from a COCO captions file: one per image, a seeded random draw of images."""
    path = Path(captions_json)
    if not path.is_file():
        raise FileNotFoundError(f"COCO captions file {path} does not exist (expected annotations/captions_val2014.json).")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions file (no 'annotations' list).")
    first: dict[int, tuple[int, str]] = {}
    for ann in data["annotations"]:
        key = int(ann["image_id"])
        if key not in first or int(ann["id"]) < first[key][0]:
            first[key] = (int(ann["id"]), ann["caption"].strip())
    captions = [first[k][1] for k in sorted(first)]
    if n > len(captions):
        raise ValueError(f"Asked for {n} captions but {path} covers only {len(captions)} images.")
    picked = random.Random(seed).sample(range(len(captions)), n)
    return [captions[i] for i in picked]


def coco_reference(val_dir: str | os.PathLike, extractor: FeatureExtractor, cache: str | os.PathLike | None = None,
                   on_error: str = "skip") -> ReferenceStats:
    """Statistics of the val2014 folder at the protocol's resolution, loaded from ``cache`` when valid."""
    if extractor.pre_resize != COCO_RESOLUTION:
        raise ValueError(f"The COCO protocol resizes to {COCO_RESOLUTION}; build the extractor with "
                         f"pre_resize={COCO_RESOLUTION} (got {extractor.pre_resize}).")
    if cache is not None and Path(cache).is_file():
        ref = ReferenceStats.load(cache)
        ref.check_compatible(mode=extractor.mode, resolution=extractor.pre_resize, network=extractor.network)
        return ref
    ref = compute_reference(val_dir, extractor, on_error=on_error, extra={"protocol": "coco2014-val-dmd2"})
    if ref.n_images != COCO_VAL_IMAGES:
        ref.extra["warning"] = f"expected {COCO_VAL_IMAGES} val2014 images, found {ref.n_images}"
    if cache is not None:
        ref.save(cache)
    return ref
