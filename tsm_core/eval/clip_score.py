"""CLIP score, only when open_clip and CLIP weights are present on this machine.

Nothing is downloaded. Without weights the result is the string ``SKIPPED`` ("skipped: no CLIP
weights found"), never a made-up number. With weights, the score is 100 x the mean cosine similarity
between image and caption embeddings (torchmetrics' convention; DMD2 reports the plain mean cosine).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SKIPPED = "skipped: no CLIP weights found"
ENV_VAR = "TSM_CLIP_WEIGHTS"


def find_clip_weights(path: str | os.PathLike | None = None) -> Path | None:
    """A local open_clip checkpoint: ``path``, else $TSM_CLIP_WEIGHTS, else None (no search online).

    An explicit ``path`` that does not exist raises FileNotFoundError rather than skipping quietly.
    """
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"CLIP weights file {path} does not exist; give an open_clip checkpoint file.")
        return Path(path)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env and Path(env).is_file() else None


def clip_available(path: str | os.PathLike | None = None) -> bool:
    """Whether a CLIP score can be computed here (open_clip importable and weights on disk)."""
    return find_clip_weights(path) is not None and importlib.util.find_spec("open_clip") is not None


def clip_score(images: Sequence[np.ndarray], captions: Sequence[str], weights: str | os.PathLike,
               model_name: str = "ViT-B-32", device: str = "cpu", batch_size: int = 32) -> float:
    """100 x mean cosine similarity of CLIP(image) and CLIP(caption) over pairs (uint8 H x W x 3 images)."""
    import open_clip
    import torch
    from PIL import Image

    if len(images) != len(captions) or not images:
        raise ValueError(f"CLIP score needs one caption per image, got {len(images)} images, {len(captions)} captions.")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    sims = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pix = torch.stack([preprocess(Image.fromarray(im)) for im in images[start:start + batch_size]]).to(device)
            tok = tokenizer(list(captions[start:start + batch_size])).to(device)
            img = torch.nn.functional.normalize(model.encode_image(pix).float(), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tok).float(), dim=-1)
            sims.append((img * txt).sum(-1).cpu())
    return float(100 * torch.cat(sims).mean())


def clip_score_or_skip(images, captions, weights: str | os.PathLike | None = None, **kwargs) -> float | str:
    """:func:`clip_score` when weights and open_clip exist, else the string ``SKIPPED``."""
    found = find_clip_weights(weights)
    if found is None or importlib.util.find_spec("open_clip") is None:
        return SKIPPED
    return clip_score(images, captions, found, **kwargs)


def clip_score_folder(folder: str | os.PathLike, weights: str | os.PathLike | None = None, **kwargs) -> float | str:
    """CLIP score of a folder written by ``generate_to_folder`` (images + prompts.jsonl), or ``SKIPPED``."""
    import json

    from PIL import Image

    folder = Path(folder)
    if find_clip_weights(weights) is None or importlib.util.find_spec("open_clip") is None:
        return SKIPPED
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines() if line.strip()]
    images = [np.array(Image.open(folder / r["file"]).convert("RGB")) for r in rows]
    return clip_score_or_skip(images, [r["prompt"] for r in rows], weights, **kwargs)
