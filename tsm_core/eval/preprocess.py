"""Image preprocessing for FID, matching clean-fid bit for bit.

clean-fid (``cleanfid/resize.py``, ``cleanfid/utils.py``) defines three modes:

- ``clean``: each channel is resized on its own as a float32 PIL image (mode "F") with bicubic
  filtering to 299 x 299, clipped to [0, 255]; no quantisation.
- ``legacy_tensorflow``: no resize outside the network; the uint8 image goes through torchvision's
  ``ToTensor() * 255`` and the network resizes it with NVIDIA's TF-like bilinear sampling.
- ``legacy_pytorch``: ``F.interpolate(bilinear, align_corners=False)`` to 299 x 299 on float32.

Before that, an optional *pre-resize* mimics evaluation protocols that shrink images first:
DMD2's COCO protocol center-crops to the short edge and resizes to 256 with PIL Lanczos (uint8).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Mode = Literal["clean", "legacy_tensorflow", "legacy_pytorch"]
MODES: tuple[str, ...] = ("clean", "legacy_tensorflow", "legacy_pytorch")
INCEPTION_SIZE = 299


def check_mode(mode: str) -> str:
    """Return ``mode`` if clean-fid defines it, else raise a ValueError listing the valid modes."""
    if mode not in MODES:
        raise ValueError(f"Unknown FID mode {mode!r}; choose one of {', '.join(MODES)}.")
    return mode


def to_rgb_uint8(image) -> np.ndarray:
    """An H x W x 3 uint8 array from a PIL image or a uint8 array (H x W, H x W x 1/3/4).

    PIL images go through ``convert('RGB')`` as clean-fid does for files; arrays are taken as they are
    (grayscale is repeated to 3 channels, alpha is dropped, like ``convert('RGB')``).
    """
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"Image arrays must be uint8 in [0, 255], got dtype {array.dtype}. Convert float images in [0, 1] "
            "with (x * 255).round().clip(0, 255).astype(np.uint8)."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"Expected an H x W, H x W x 1, H x W x 3 or H x W x 4 image array, got shape {array.shape}.")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """DMD2's evaluation transform: center-crop to the short edge, then PIL Lanczos to size x size (uint8).

    torchvision's ``center_crop`` rounds the crop offset as ``int(round((H - s) / 2))``; so do we.
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    cropped = Image.fromarray(image[top:top + side, left:left + side])
    return np.array(cropped.resize((size, size), Image.LANCZOS))


def _resize_channel_bicubic(channel: np.ndarray) -> np.ndarray:
    # One float32 "F" image per channel: PIL filters in float, so nothing is quantised (clean-fid's point).
    resized = Image.fromarray(channel.astype(np.float32)).resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)
    return np.asarray(resized).clip(0, 255).reshape(INCEPTION_SIZE, INCEPTION_SIZE, 1)


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's 'clean' resize: float32 H x W x 3 -> 299 x 299 x 3 float32 in [0, 255]."""
    channels = [_resize_channel_bicubic(image[:, :, c]) for c in range(3)]
    return np.concatenate(channels, axis=2).astype(np.float32)


def legacy_pytorch_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's 'legacy_pytorch' resize: bilinear ``F.interpolate`` on float32, clipped, not quantised."""
    x = torch.Tensor(image.transpose((2, 0, 1)))[None, ...]
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return x[0].numpy().transpose((1, 2, 0)).clip(0, 255)


def preprocess(image: np.ndarray, mode: str, pre_resize: int | None = None) -> torch.Tensor:
    """One H x W x 3 uint8 image -> the float 3 x h x w tensor (0-255) clean-fid feeds its network.

    For 'clean' and 'legacy_pytorch' the output is 299 x 299; for 'legacy_tensorflow' it keeps the input
    size, because that network resizes inside (see :func:`nv_bilinear_resize`).
    """
    if pre_resize is not None:
        image = center_crop_resize(image, pre_resize)
    if mode == "clean":
        out = clean_resize(image)
        return torch.from_numpy(out.transpose((2, 0, 1))).contiguous()
    if mode == "legacy_pytorch":
        out = legacy_pytorch_resize(image)
        return torch.from_numpy(np.ascontiguousarray(out.transpose((2, 0, 1))))
    if mode == "legacy_tensorflow":
        # torchvision ToTensor() divides uint8 by 255 and clean-fid multiplies back by 255; the float
        # round trip is not always exact, so repeat it rather than casting directly.
        x = torch.from_numpy(image).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return x * 255
    raise ValueError(f"Unknown FID mode {mode!r}; choose one of {', '.join(MODES)}.")


def nv_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """The resize inside NVIDIA's TorchScript Inception (clean-fid's 'legacy_tensorflow' mode).

    It emulates TensorFlow 1's ``resize_bilinear`` with an affine grid shifted by half a pixel and
    border padding. x: N x 3 x H x W float -> N x 3 x size x size.
    """
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def images_from_batch(batch) -> list[np.ndarray]:
    """Split a generator's batch into H x W x 3 uint8 arrays.

    Accepts uint8 arrays/tensors N x H x W x 3 (or one H x W x 3 image), and float arrays/tensors
    N x 3 x H x W in [0, 1], which are quantised as ``round(x * 255)`` -- the same bytes a PNG of the
    image would hold, so in-memory and saved-then-read evaluations agree.
    """
    if isinstance(batch, Image.Image):
        return [to_rgb_uint8(batch)]
    if isinstance(batch, (list, tuple)):
        out: list[np.ndarray] = []
        for item in batch:
            out.extend(images_from_batch(item))
        return out
    if isinstance(batch, torch.Tensor):
        if batch.dtype == torch.uint8:
            batch = batch.cpu().numpy()
        else:
            batch = batch.detach().float().cpu().numpy()
    array = np.asarray(batch)
    if array.dtype == np.uint8:
        if array.ndim == 3:
            return [to_rgb_uint8(array)]
        if array.ndim == 4:
            return [to_rgb_uint8(a) for a in array]
        raise ValueError(f"uint8 image batches must be N x H x W x 3 or H x W x 3, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] not in (1, 3):
            raise ValueError(f"float image batches must be N x 3 x H x W in [0, 1], got shape {array.shape}.")
        if not np.isfinite(array).all():
            raise ValueError("float image batch contains NaN or inf values.")
        if array.min() < -1e-3 or array.max() > 1 + 1e-3:
            raise ValueError(
                f"float image batches must lie in [0, 1], got [{array.min():.3f}, {array.max():.3f}]. "
                "Map [-1, 1] outputs with (x + 1) / 2 first."
            )
        quantised = (array * 255).round().clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        return [to_rgb_uint8(a) for a in quantised]
    raise ValueError(f"Unsupported image batch dtype {array.dtype}; give uint8 (0-255) or float (0-1) images.")
