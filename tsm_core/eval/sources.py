"""Where images come from: folders, webdataset shards, video clips (every frame), in-memory iterables
and generator callables.

Every source yields :class:`ImageItem` objects whose ``load()`` returns an H x W x 3 uint8 array, so
decoding happens in the feature extractor's worker threads and a corrupt file fails in ``load()``,
where the extractor can count it (or stop, as the caller chose).
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.images import IMAGE_KEYS, expand_shards
from .preprocess import images_from_batch, to_rgb_uint8

# The extensions clean-fid collects from a folder (cleanfid/utils.py), so both see the same files.
EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy", "JPEG", "JPG", "PNG")


@dataclass
class ImageItem:
    """One image to evaluate: a display ``name`` and a ``load`` callable returning H x W x 3 uint8."""

    name: str
    load: Callable[[], np.ndarray]


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """The image files under ``folder`` (recursive), sorted, exactly as clean-fid lists them.

    Raises FileNotFoundError for a missing folder or one with no image files.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder {folder} does not exist (or is not a folder).")
    files = sorted(
        file for ext in EXTENSIONS for file in glob.glob(os.path.join(folder, f"**/*.{ext}"), recursive=True)
    )
    if not files:
        raise FileNotFoundError(
            f"No images found under {folder}: looked for files ending in {', '.join(sorted(set(EXTENSIONS)))} "
            "(recursively). Point to the folder that holds the images."
        )
    return files


def load_image_file(path: str) -> np.ndarray:
    """Read one file the way clean-fid does: ``.npy`` with numpy, anything else via PIL ``convert('RGB')``."""
    if ".npy" in path:
        return to_rgb_uint8(np.load(path))
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def folder_items(folder: str | os.PathLike) -> list[ImageItem]:
    """Items for every image file under ``folder``."""
    return [ImageItem(path, lambda p=path: load_image_file(p)) for path in list_image_files(folder)]


VIDEO_EXTENSIONS = ("mp4", "webm", "mov", "mkv", "avi", "gif")


def list_video_files(folder: str | os.PathLike) -> list[str]:
    """The video clips under ``folder`` (recursive), sorted; empty when there are none."""
    folder = str(folder)
    return sorted(file for ext in VIDEO_EXTENSIONS
                  for file in glob.glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def is_video_folder(source) -> bool:
    """A folder of video clips and no images: per-frame FID reads every frame of every clip."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
        return False
    try:
        list_image_files(source)
    except FileNotFoundError:
        return bool(list_video_files(source))
    return False


def video_frame_items(folder: str | os.PathLike, errors: list[tuple[str, str]] | None = None) -> Iterator[ImageItem]:
    """Items for every frame of every clip under ``folder`` (``clip.mp4#3`` is frame 3), for per-frame FID.

    A clip that cannot be decoded is recorded in ``errors`` (name, reason) when a list is given, else
    raised as a ValueError. Clips decode one at a time, in the caller's thread.
    """
    from ..data.video import read_clip

    for path in list_video_files(folder):
        try:
            frames = read_clip(path, None)
        except (ValueError, FileNotFoundError) as e:
            if errors is None:
                raise ValueError(f"{path}: {e}") from e
            errors.append((path, str(e)))
            continue
        for i, frame in enumerate(frames):
            yield ImageItem(f"{path}#{i}", lambda f=frame: f)


def iterable_items(images: Iterable, name: str = "image") -> Iterator[ImageItem]:
    """Items for an iterable of PIL images or uint8 arrays (for example a built-in dataset)."""
    for index, image in enumerate(images):
        # (image, label) pairs from torchvision-style datasets: keep the image.
        if isinstance(image, tuple) and len(image) >= 1 and not isinstance(image[0], (int, float)):
            image = image[0]
        yield ImageItem(f"{name}[{index}]", lambda im=image: to_rgb_uint8(im))


def generator_items(generate: Callable[[int], object], n_images: int, batch_size: int) -> Iterator[ImageItem]:
    """Items from ``generate(n)``, called with batch sizes that add up to ``n_images``.

    ``generate(n)`` returns n images: uint8 N x H x W x 3, float N x 3 x H x W in [0, 1], or a list of
    PIL images. It runs in the caller's thread (a model on the GPU should not be called from workers).
    """
    if n_images <= 0:
        raise ValueError(f"n_images must be positive, got {n_images}.")
    made = 0
    while made < n_images:
        want = min(batch_size, n_images - made)
        images = images_from_batch(generate(want))
        if len(images) != want:
            raise ValueError(f"The generator returned {len(images)} images when asked for {want}.")
        for image in images:
            yield ImageItem(f"generated[{made}]", lambda im=image: im)
            made += 1


def _decode_bytes(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def shard_items(urls, errors: list[tuple[str, str]] | None = None) -> Iterator[ImageItem]:
    """Items for the images in webdataset shards (first image key of each sample).

    A broken tar member or a sample with no image is recorded in ``errors`` (name, reason) when a list
    is given, else raised as a ValueError.
    """
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        if errors is None:
            raise ValueError(f"Could not read shard data: {exn}") from exn
        errors.append(("shard", repr(exn)))
        return True  # continue with the next sample

    dataset = wds.WebDataset(expand_shards(urls), shardshuffle=False, handler=handler, empty_check=False)
    for sample in dataset:
        key = sample.get("__key__", "?")
        name = f"{sample.get('__url__', 'shard')}:{key}"
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            reason = f"no image in sample (keys: {sorted(k for k in sample if not k.startswith('__'))})"
            if errors is None:
                raise ValueError(f"{name}: {reason}. Shards need a png/jpg/webp entry per sample.")
            errors.append((name, reason))
            continue
        yield ImageItem(name, lambda d=data: _decode_bytes(d))
