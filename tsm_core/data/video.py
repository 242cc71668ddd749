"""Video clips with captions for the video backbones (diffusers' UNet3DConditionModel, AnimateDiff).

Clips are H.264 mp4 files written and decoded with PyAV (it bundles FFmpeg, so nothing else is needed).
Every video source yields ``{"pixel_values": (3, F, R, R) float tensor in [-1, 1], "text": str}``:
channels first, then frames, the per-sample layout diffusers' video UNets take. A batch from
`collate_video_text` is ``(B, 3, F, R, R)``.

Like `ImageTextFolder` (see ``data.py``), unreadable clips are skipped and counted, never fatal: missing
files when the folder is built, clips that fail to decode or are too short when they are loaded. With
``DataLoader(num_workers > 0)`` each worker counts its own load-time skips.

`moving_fmnist_clips` writes a small real video data set for CPU experiments: Fashion-MNIST items
sliding across a black canvas, captioned with the class and the direction of motion.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..serialization import atomic_write_text
from .fmnist import load_fashion_mnist, prompt_for
from .fmnist import prompt_words as _fmnist_prompt_words
from .images import CaptionedFolder, SkipCounter, collate_image_text, shard_field, webdataset_image_text

# Directions of motion in moving Fashion-MNIST captions ("up" is towards row 0 of the frame).
MOTIONS = ("left", "right", "up", "down")


# --------------------------------------------------------------------------- clip files


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def write_clip(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``frames`` (uint8, shape (F, H, W, 3), RGB) as an H.264 mp4 (yuv420p) at ``fps``.

    The file appears atomically: it is written under a temporary name in the same folder and then
    renamed, so a reader never sees half a clip. H.264 (libx264, crf 18) is lossy: decoded frames are
    close to, not equal to, ``frames``. The same frames always give the same file (one encoder thread,
    no macroblock tree).

    Raises:
        ValueError: ``frames`` is not a uint8 (F, H, W, 3) array with F >= 1, or H or W is odd (yuv420p
            stores colour at half resolution, so both must be even), or ``fps`` < 1.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be a uint8 array of shape (F, H, W, 3) with F >= 1, got "
                         f"{frames.dtype} {frames.shape}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs an even height and width, got {height}x{width} (H x W); "
                         f"crop or pad the frames by one pixel")
    fps = _check_count("fps", fps, 1)
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name that FFmpeg creates itself (so the file gets the usual permissions, unlike mkstemp's).
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            # crf 18 instead of x264's default 23: nearly transparent, which tiny training clips need.
            # Macroblock tree off: with it on, x264 wrote different bits for the same 32x32 frames from run
            # to run. One thread: threaded output depends on the core count. Data sets built from a seed
            # must be reproducible.
            stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "mbtree": "0"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                                                       format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):  # flush the frames the encoder still holds
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_clip(path: str | os.PathLike | bytes, num_frames: int | None, frame_stride: int = 1) -> np.ndarray:
    """Decode frames 0, s, 2s, ... (s = ``frame_stride``) of a clip until ``num_frames`` are taken
    (``None``: to the end of the clip, as per-frame FID reads them). ``path`` may also be the clip's
    bytes (an mp4 read from a webdataset shard).

    Returns a uint8 array (num_frames, H, W, 3), RGB. Decoding stops as soon as the last wanted frame
    is read, so a long clip costs only its first ``(num_frames - 1) * frame_stride + 1`` frames.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the clip has fewer than ``(num_frames - 1) * frame_stride + 1`` frames, has no video
            stream, or cannot be decoded (the message names the file); ``num_frames`` or
            ``frame_stride`` < 1.
    """
    import io

    import av

    everything = num_frames is None
    num_frames = _check_count("num_frames", 1 if everything else num_frames, 1)
    frame_stride = _check_count("frame_stride", frame_stride, 1)
    if isinstance(path, bytes):
        source, path = io.BytesIO(path), "the clip's bytes"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"video clip not found: {path}")
        source = str(path)
    need = (num_frames - 1) * frame_stride + 1
    taken: list[np.ndarray] = []
    seen = 0
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                if seen % frame_stride == 0:
                    taken.append(frame.to_ndarray(format="rgb24"))
                    if len(taken) == num_frames and not everything:
                        break
                seen += 1
    except (av.error.FFmpegError, OSError) as e:
        # PyAV's errors for a corrupt or non-video file are FFmpeg's terse messages: name the file.
        raise ValueError(f"cannot decode video clip {path}: {type(e).__name__}: {e}") from e
    if len(taken) < num_frames:
        raise ValueError(f"{path} has {seen} frames, but num_frames={num_frames} with frame_stride={frame_stride} "
                         f"needs {need}; lower num_frames or frame_stride, or drop the clip")
    return np.stack(taken)


# --------------------------------------------------------------------------- transform


def video_transform(frames: np.ndarray, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) -> float (3, F, R, R) in [-1, 1].

    Every frame gets the image pipeline's preprocessing (`data.image_transform`): the short side is
    resized to R (bilinear, antialiased), then a center crop, or a random crop (``torch`` RNG, so
    DataLoader workers draw different crops) that is the same for every frame of the clip.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    x = TF.resize(x, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    height, width = x.shape[-2:]
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, ()))
        left = int(torch.randint(0, width - resolution + 1, ()))
    x = x[..., top: top + resolution, left: left + resolution]
    # (F, 3, R, R) -> (3, F, R, R); clamp because bilinear resampling can round a hair past 0..255.
    return x.permute(1, 0, 2, 3).div(127.5).sub(1.0).clamp(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------- clip folder


class VideoTextFolder(CaptionedFolder):
    """Video clips with captions in the diffusers imagefolder layout (`CaptionedFolder`).

    Items are ``{"pixel_values": (3, F, R, R) in [-1, 1], "text": str}`` with F = ``num_frames``, taken
    every ``frame_stride`` frames from the start of the clip (see `read_clip` and `video_transform`).
    Only existence is checked at build time, so building a large folder stays cheap; a clip that fails
    to decode or is too short is found when it is loaded, counted once and replaced by the next good one.
    """

    kind = "clip"
    example = '{"file_name": "clip_0001.mp4", "text": "a dog running on a beach"}'

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        num_frames: int,
        frame_stride: int = 1,
        caption_column: str = "text",
        center_crop: bool = True,
    ):
        self.resolution = _check_count("resolution", resolution, 8)
        self.num_frames = _check_count("num_frames", num_frames, 1)
        self.frame_stride = _check_count("frame_stride", frame_stride, 1)
        self.center_crop = center_crop
        super().__init__(root, caption_column)

    def load(self, file: Path) -> torch.Tensor:
        frames = read_clip(file, self.num_frames, self.frame_stride)
        return video_transform(frames, self.resolution, self.center_crop)

    def load_settings(self) -> str:
        return f" with num_frames={self.num_frames} and frame_stride={self.frame_stride}"


VIDEO_KEYS = ("mp4", "webm", "mkv", "mov", "avi")


def webdataset_video_text(urls, resolution: int, num_frames: int, frame_stride: int = 1, center_crop: bool = True,
                          shuffle: int = 1000, resampled: bool = False, counter: SkipCounter | None = None,
                          seed: int | None = None):
    """An iterable dataset of ``{"pixel_values": (3, F, R, R), "text"}`` from webdataset shards of clips.

    Each sample has a clip (``mp4``, ``webm``, ``mkv``, ``mov`` or ``avi`` bytes) and a caption (``txt``,
    or ``json`` with "text"/"prompt"/"caption"). Frames as `VideoTextFolder` takes them (`read_clip`,
    `video_transform`); clips that fail to decode or are too short are skipped and counted, like every
    other unreadable sample of `webdataset_image_text` (sharding, shuffling and the counter are its own).
    """
    resolution = _check_count("resolution", resolution, 8)
    num_frames = _check_count("num_frames", num_frames, 1)
    frame_stride = _check_count("frame_stride", frame_stride, 1)

    def decode(sample: dict) -> torch.Tensor:
        frames = read_clip(shard_field(sample, VIDEO_KEYS, "clip"), num_frames, frame_stride)
        return video_transform(frames, resolution, center_crop)

    return webdataset_image_text(urls, resolution, center_crop=center_crop, shuffle=shuffle, resampled=resampled,
                                 counter=counter, seed=seed, decode=decode)


def write_clip_shards(folder: str | os.PathLike, out: str | os.PathLike, maxcount: int = 1000) -> list[Path]:
    """Pack a clip folder (clips + ``metadata.jsonl``, as `VideoTextFolder` reads it) into webdataset shards
    ``out-000000.tar``, ... of (``mp4``, ``txt``) samples, in the metadata's order; returns the shard paths.
    The clip bytes are copied, not re-encoded, so the shards decode to the folder's frames exactly."""
    import webdataset as wds

    out = Path(out)
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    # The folder's own reader parses and checks metadata.jsonl (missing clips are skipped and counted);
    # resolution and num_frames only matter when it decodes, which packing does not do.
    items = VideoTextFolder(folder, resolution=8, num_frames=1).items
    out.parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(f"{out}-%06d.tar", maxcount=maxcount, verbose=0) as sink:
        for i, (file, text) in enumerate(items):
            sink.write({"__key__": f"{i:08d}", "mp4": file.read_bytes(), "txt": text})
    return sorted(out.parent.glob(f"{out.name}-*.tar"))


def collate_video_text(batch: Sequence[dict]) -> dict[str, Any]:
    """Collate video items into ``{"pixel_values": (B, 3, F, R, R), "text": list[str]}``."""
    return collate_image_text(batch)  # it stacks whatever shape the items have


# --------------------------------------------------------------------------- moving Fashion-MNIST


def moving_fmnist_words() -> list[str]:
    """Every word of a moving Fashion-MNIST caption (for an offline tokenizer, see `fmnist.prompt_words`)."""
    return sorted(set(_fmnist_prompt_words()) | {"moving", *MOTIONS})


def _paste(canvas: np.ndarray, item: np.ndarray, top: int, left: int) -> None:
    """Put ``item`` on ``canvas`` with its top-left corner at (top, left), cutting off what falls outside."""
    size_y, size_x = canvas.shape
    h, w = item.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, size_y), min(left + w, size_x)
    if y0 < y1 and x0 < x1:
        canvas[y0:y1, x0:x1] = item[y0 - top: y1 - top, x0 - left: x1 - left]


def _start(rng: np.random.Generator, lo: float, hi: float, travel: float) -> float:
    """A start in [lo, hi] from which moving by ``travel`` also ends in [lo, hi]."""
    return float(rng.uniform(max(lo, lo - travel), min(hi, hi - travel)))


def moving_fmnist_clips(
    folder: str | os.PathLike,
    n: int,
    num_frames: int = 8,
    size: int = 32,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write ``n`` "moving Fashion-MNIST" clips and their ``metadata.jsonl`` into ``folder``; return it.

    Each clip shows one 28x28 Fashion-MNIST item (grey, replicated to RGB) on a black ``size`` x ``size``
    canvas, moving in a straight line at a constant velocity for ``num_frames`` frames (8 fps):

    - the direction is one of left/right/up/down, drawn uniformly; the speed along it is uniform in
      [2, 4] pixels per frame (less when the canvas is too small for that over ``num_frames``), plus a
      sideways drift of at most half that speed, so the captioned direction always dominates;
    - there is no bouncing: the item's centre stays inside the canvas on the whole path, so at least
      half the item is always visible and it may slide partly out of the frame at the edges. (A 28x28
      item kept wholly inside a 32x32 canvas could move only 4 pixels in all.) Positions are rounded
      to whole pixels.

    Captions are ``prompt_for(label)`` plus " moving <direction>", e.g. "a photo of a sneaker moving
    left"; `moving_fmnist_words` lists their words. Files are ``clip_00000.mp4``, ``clip_00001.mp4``, ...
    Items (distinct images of ``split``), paths and velocities come from ``numpy.random.default_rng(seed)``
    and x264 encodes deterministically, so the same seed writes the same clips.

    Raises:
        ValueError: ``n`` < 1, ``num_frames`` < 2 (motion needs two frames), ``size`` odd or < 8, or
            ``n`` larger than the split.
    """
    n = _check_count("n", n, 1)
    num_frames = _check_count("num_frames", num_frames, 2)
    size = _check_count("size", size, 8)
    if size % 2:
        raise ValueError(f"size must be even (H.264 with yuv420p needs even frames), got {size}")
    images, labels = load_fashion_mnist(split)
    if n > len(images):
        raise ValueError(f"n={n} clips need {n} distinct images, but the {split} split has {len(images)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=n, replace=False)
    steps = num_frames - 1
    lines = []
    for c, idx in enumerate(picks):
        item = images[idx]
        h, w = item.shape
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        fast = min(4.0, size / steps)  # the centre may cross at most the whole canvas
        speed = float(rng.uniform(min(2.0, fast), fast))
        drift = float(rng.uniform(-speed / 2, speed / 2))
        sign = -1.0 if motion in ("left", "up") else 1.0
        vx, vy = (sign * speed, drift) if motion in ("left", "right") else (drift, sign * speed)
        # Top-left corners whose item centre lies inside the canvas: [-w/2, size - w/2].
        x0 = _start(rng, -w / 2, size - w / 2, vx * steps)
        y0 = _start(rng, -h / 2, size - h / 2, vy * steps)
        clip = np.zeros((num_frames, size, size), dtype=np.uint8)
        for t in range(num_frames):
            _paste(clip[t], item, int(np.rint(y0 + vy * t)), int(np.rint(x0 + vx * t)))
        name = f"clip_{c:05d}.mp4"
        write_clip(folder / name, np.repeat(clip[..., None], 3, axis=-1), fps=8)
        lines.append(json.dumps({"file_name": name, "text": f"{prompt_for(int(labels[idx]))} moving {motion}"}))
    # atomic, like the clips: a reader never sees a half-written list
    atomic_write_text(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    return folder


def save_gif(video: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write one video ``(3, F, H, W)`` in [-1, 1] as an animated GIF that loops (atomically)."""
    from PIL import Image

    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"save_gif needs one video (3, F, H, W), got shape {tuple(video.shape)}")
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = [Image.fromarray(f.numpy()) for f in frames.permute(1, 2, 3, 0)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    os.replace(tmp, path)
    return path
