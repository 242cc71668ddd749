"""Training batches for the fine-tuner: a resumable, step-indexed stream over an image-text source.

``cfg`` below is a fine-tuning recipe's ``data`` section (`tsm_core.finetune.recipe.DataSection`: ``source``,
``path``, ``resolution``, ``crop``, ...); this module reads its fields and imports no recipe code, so the
data layer stays below the trainers.

Folders are read in an order fixed by (seed, epoch), and the items of global batch b are a pure
function of b, so a resumed run sees exactly the batches an uninterrupted one would. Webdataset
shards are streamed (resume continues with a fresh shuffle, not the same samples).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .images import (
    ImageTextFolder,
    SkipCounter,
    collate_image_text,
    describe_shards,
    image_transform,
    infinite,
    webdataset_image_text,
)


class _Indexed(Dataset):
    """Adds each item's dataset index (the key of the latent cache)."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[i], "index": i}


def _collate(items: list[dict]) -> dict:
    out = collate_image_text(items)
    if "index" in items[0]:
        out["index"] = [it["index"] for it in items]
    return out


class StepSampler(Sampler):
    """Infinite index stream: global batch b holds positions ``b*B .. b*B+B-1`` of the sequence
    ``perm_0 + perm_1 + ...`` (perm_e a permutation seeded by (seed, e)); process ``rank`` of ``world``
    takes batches ``rank, rank + world, ...`` starting at its batch ``start_batch``."""

    def __init__(self, size: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1):
        self.size, self.batch, self.seed = size, batch_size, seed
        self.start, self.rank, self.world = start_batch, rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _at(self, pos: int) -> int:
        epoch, i = divmod(pos, self.size)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(
                self.seed * 100_003 + epoch))}
        return int(self._perms[epoch][i])

    def __iter__(self) -> Iterator[int]:
        for b in itertools.count(self.start):
            g = b * self.world + self.rank
            for j in range(self.batch):
                yield self._at(g * self.batch + j)


def build_dataset(cfg):
    """The image-text (or video-text) source of a recipe, with a ``skip_counter`` (a `SkipCounter`).

    Raises:
        FileNotFoundError: the folder or shards do not exist.
        ValueError: ``crop: resize`` or ``cache_latents`` with webdataset shards.
    """
    if cfg.source == "video_folder":
        from .video import VideoTextFolder

        return VideoTextFolder(cfg.path, cfg.resolution, cfg.num_frames, cfg.frame_stride,
                               caption_column=cfg.caption_column, center_crop=cfg.crop != "random")
    if cfg.source == "video_webdataset":
        from .video import webdataset_video_text

        return webdataset_video_text(cfg.path, cfg.resolution, cfg.num_frames, cfg.frame_stride,
                                     center_crop=cfg.crop != "random", shuffle=cfg.shuffle_buffer,
                                     counter=SkipCounter())
    if cfg.source == "folder":
        ds = ImageTextFolder(cfg.path, cfg.resolution, center_crop=cfg.crop != "random",
                             random_flip=cfg.random_flip, caption_column=cfg.caption_column)
        if cfg.crop == "resize":
            ds.transform = _resize_transform(cfg.resolution, cfg.random_flip)
        return ds
    if cfg.crop == "resize" or cfg.cache_latents:
        raise ValueError("data.crop 'resize' and data.cache_latents are supported for image folders only; "
                         "use crop 'center' or 'random' and cache_latents false with webdataset shards")
    return webdataset_image_text(cfg.path, cfg.resolution, center_crop=cfg.crop == "center",
                                 random_flip=cfg.random_flip, shuffle=cfg.shuffle_buffer, counter=SkipCounter())


def _resize_transform(resolution: int, flip: bool):
    from torchvision import transforms

    base = image_transform(resolution, True, flip)  # to RGB, resize, crop (a no-op after the square resize)
    square = transforms.Resize((resolution, resolution), antialias=True)
    return transforms.Compose([square, base])


def read_ahead(stream: Iterator[dict], cfg) -> Iterator[dict]:
    """``stream`` with its first batch read now: a data set that cannot give one batch (shards whose
    samples lack an image or a caption, a folder none of whose images decode) is then a ValueError at
    start-up, naming ``data.path``, not a traceback inside the first training step. The batches and
    their order are those of ``stream``."""
    try:
        first = next(stream)
    except (ValueError, RuntimeError) as e:  # RuntimeError: a folder whose every image fails to decode
        raise ValueError(f"data.path {cfg.path} (data.source {cfg.source}): could not read a first batch: {e}") from e
    return itertools.chain([first], stream)


def batch_stream(ds, cfg, batch_size: int, seed: int, start_batch: int, rank: int = 0,
                 world: int = 1) -> Iterator[dict]:
    """Infinite batches ``{"pixel_values", "text"[, "index"]}``; see the module docstring for resume."""
    if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__len__"):
        loader = DataLoader(ds, batch_size=batch_size, num_workers=cfg.num_workers, collate_fn=_collate)
        return infinite(loader, (lambda: describe_shards(ds)) if hasattr(ds, "shards") else None)
    sampler = StepSampler(len(ds), batch_size, seed, start_batch, rank, world)
    loader = DataLoader(_Indexed(ds), batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=_collate)
    return iter(loader)
