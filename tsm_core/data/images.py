"""Data sources shared by the trainers: prompt files, image-text folders, webdataset shards.

Every image source yields ``{"pixel_values": (3, R, R) float tensor in [-1, 1], "text": str}``.
Corrupt images are skipped and counted, never fatal: one bad file in a million must not stop a run.

Where the counts live: a `ImageTextFolder` counts files it cannot open when it is built (``skipped``);
files that open but fail to decode later, and every webdataset skip, are counted by the process that
reads them. With ``DataLoader(num_workers > 0)`` those happen in worker processes, so each worker
counts its own and logs a warning per skip; read the counter after iterating in-process to see totals.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

# Image and caption keys of webdataset samples (and JSON caption objects), for training and FID alike.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm")
CAPTION_KEYS = ("text", "prompt", "caption")


# --------------------------------------------------------------------------- prompts


def _jsonl_rows(path: Path, lines: list[str]):
    """(line number, parsed object) for every non-blank JSON line; ValueError naming the bad line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read prompts: ``.txt`` (one per line), ``.jsonl`` (objects with "text", "prompt" or "caption"),
    or ``.json`` (a list of such strings or objects, or a COCO captions file's ``annotations``).

    Training (``data.prompts``) and ``tools/fid.py generate`` read prompts with this one function.
    Blank lines are ignored and prompts are stripped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file has no prompts, or a JSON line is not an object with a caption key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    prompts: list[str] = []
    if path.suffix.lower() == ".json":
        prompts = [p.strip() for p in _json_prompts(path, text) if p.strip()]
    elif path.suffix.lower() == ".jsonl":
        for n, row in _jsonl_rows(path, lines):
            text = caption_of(row) if isinstance(row, dict) else None
            if text is None:
                raise ValueError(f"{path}:{n}: expected an object with one of the keys {list(CAPTION_KEYS)}")
            if text.strip():
                prompts.append(text.strip())
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (expected one per line, or JSON lines with 'text')")
    return prompts


def _json_prompts(path: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]  # a COCO captions file
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, or a COCO captions file with 'annotations'")
    out = []
    for i, item in enumerate(data):
        found = item if isinstance(item, str) else caption_of(item) if isinstance(item, dict) else None
        if found is None:
            raise ValueError(f"{path}: item {i} is neither a string nor an object with one of {list(CAPTION_KEYS)}")
        out.append(found)
    return out


def caption_of(row: dict) -> str | None:
    """The caption of a JSON object: its first string among ``CAPTION_KEYS`` (None if it has none)."""
    for key in CAPTION_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    return None


def shard_caption(sample: dict) -> str:
    """The caption of a webdataset sample: its ``txt``, or the caption of its ``json``.

    Raises:
        ValueError: neither, or a ``json`` without a caption key.
    """
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        text = caption_of(json.loads(sample["json"]))
        if text is None:
            raise ValueError(f"json has none of the keys {list(CAPTION_KEYS)}")
        return text.strip()
    raise ValueError("no caption (txt or json) in sample")


# --------------------------------------------------------------------------- transforms


def image_transform(resolution: int, center_crop: bool = True, random_flip: bool = False) -> Callable:
    """PIL image -> (3, R, R) tensor in [-1, 1]: resize the short side to R, crop (center or random), flip.

    The same preprocessing as diffusers' text-to-image training scripts.
    """
    from torchvision import transforms

    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    steps = [
        transforms.Lambda(_to_rgb),
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    return transforms.Compose(steps)


def _to_rgb(im: Image.Image) -> Image.Image:
    # A module-level function (not a lambda) so transforms pickle into DataLoader workers.
    return im.convert("RGB")


def _open_rgb(source: str | os.PathLike | bytes) -> Image.Image:
    """Fully decode an image (``Image.open`` is lazy; ``load`` finds truncated data)."""
    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    im.load()
    return im.convert("RGB")


# --------------------------------------------------------------------------- skip counting


def _shard_of(exn: BaseException) -> str | None:
    """The shard a webdataset stream error names (its args hold the url, or the open file's name)."""
    for arg in reversed(exn.args):
        if isinstance(arg, str) and ".tar" in arg and " " not in arg:
            return arg
    found = re.search(r"name='([^']+)'", str(exn))
    return found.group(1) if found else None


def tar_is_complete(path: str | os.PathLike) -> bool:
    """Whether a local tar file ends with its end-of-archive marker (two zero blocks). A shard cut short
    at a member boundary lacks it, and tarfile then stops early without an error."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


@dataclass
class SkipCounter:
    """What could not be read: samples skipped (with the last few reasons) and shards cut short.

    A truncated or unreadable shard is one *lost shard*, not one skipped sample: its remaining samples
    are gone and their number is unknown, so it is reported by name with how many samples it gave.
    """

    count: int = 0
    reasons: list[str] = field(default_factory=list)
    keep: int = 20
    lost_shards: dict[str, str] = field(default_factory=dict)
    """shard -> why the rest of it could not be read."""
    read: dict[str, int] = field(default_factory=dict)
    """shard -> samples decoded from it."""

    def add(self, reason: str) -> None:
        """Count one skipped sample and log why."""
        self.count += 1
        self.reasons = (self.reasons + [reason])[-self.keep:]
        log.warning("skipping sample (%d skipped so far): %s", self.count, reason)

    def shard_lost(self, shard: str, reason: str) -> None:
        """Record that the rest of ``shard`` cannot be read (once per shard)."""
        if shard not in self.lost_shards:
            self.lost_shards[shard] = reason
            log.warning("shard %s: %s; its remaining samples are lost", shard, reason)

    def handler(self, exn: Exception) -> bool:
        """A webdataset error handler: a broken tar stream loses the rest of its shard; anything else
        is one skipped sample. Continue either way."""
        shard = _shard_of(exn)
        if shard is not None and (isinstance(exn, tarfile.TarError) or "unexpected end of data" in str(exn)):
            self.shard_lost(shard, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        else:
            self.add(f"{type(exn).__name__}: {exn}")
        return True

    def summary(self) -> str:
        """One line for logs and the CLIs: skipped samples, and each lost shard with what it gave."""
        out = f"{self.count} unreadable sample(s) skipped"
        if self.lost_shards:
            lost = ", ".join(f"{Path(s).name} (cut short after {self.read.get(s, 0)} samples: {why})"
                             for s, why in self.lost_shards.items())
            out += f"; {len(self.lost_shards)} shard(s) could not be read to the end, their remaining samples " \
                   f"are lost: {lost}"
        return out


# --------------------------------------------------------------------------- image folder


class CaptionedFolder(Dataset):
    """Files with captions in the diffusers imagefolder layout; subclasses say how to check and load one.

    ``root/metadata.jsonl`` has one JSON object per line with ``"file_name"`` (relative to root) and
    ``"text"`` (the caption; ``caption_column`` picks another key). Files that ``check`` refuses are
    dropped when the dataset is built and counted in ``skipped`` (``skip_counter.reasons`` says why). A
    file that fails in ``load`` is counted once, remembered, and replaced by the next good item, so a
    DataLoader never sees an error (and a bad file is not counted again on every pass).
    """

    kind = "file"  # for messages: "image", "clip"
    example = '{"file_name": "0001.png", "text": "a photo of a cat"}'

    def __init__(self, root: str | os.PathLike, caption_column: str = "text"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.folder_name} not found: {self.root}")
        meta = self.root / "metadata.jsonl"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} not found: a {self.folder_name} needs metadata.jsonl with one line "
                                    f"per {self.kind}, like {self.example}")
        self.skip_counter = SkipCounter()
        self.items: list[tuple[Path, str]] = []
        self._bad: set[int] = set()
        for n, row in _jsonl_rows(meta, meta.read_text(encoding="utf-8").splitlines()):
            if (not isinstance(row, dict) or not isinstance(row.get("file_name"), str)
                    or not isinstance(row.get(caption_column), str)):
                raise ValueError(f"{meta}:{n}: each line needs 'file_name' and a string {caption_column!r}")
            file = self.root / row["file_name"]
            why = self.check(file)
            if why is not None:
                self.skip_counter.add(f"{file}: {why}")
                continue
            self.items.append((file, row[caption_column]))
        if not self.items:
            raise ValueError(f"{self.folder_name} {self.root} has no readable {self.kind}s "
                             f"({self.skip_counter.count} skipped: {self.skip_counter.reasons[:3]})")

    @property
    def folder_name(self) -> str:
        return f"{self.kind if self.kind != 'clip' else 'video'} folder"

    def check(self, file: Path) -> str | None:
        """Why ``file`` cannot be used (dropped at build time), or None. Default: it must exist."""
        return None if file.is_file() else "file not found"

    def load(self, file: Path) -> torch.Tensor:
        """``pixel_values`` of one file; raises OSError or ValueError when it cannot be decoded."""
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Files skipped so far (refused at build time, or undecodable when loaded)."""
        return self.skip_counter.count

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(len(self.items)):
            i = (index + k) % len(self.items)
            if i in self._bad:
                continue
            file, text = self.items[i]
            try:
                return {"pixel_values": self.load(file), "text": text}
            except (OSError, ValueError) as e:
                self._bad.add(i)
                self.skip_counter.add(f"{file}: {e}")
        raise RuntimeError(f"no {self.kind} in {self.root} could be decoded{self.load_settings()} "
                           f"({self.skip_counter.summary()}; last reasons {self.skip_counter.reasons[-3:]})")

    def load_settings(self) -> str:
        """What the failing loads were asked for, for the all-failed error (empty by default)."""
        return ""


class ImageTextFolder(CaptionedFolder):
    """Images with captions (`CaptionedFolder`); items are ``{"pixel_values": (3, R, R) in [-1, 1], "text"}``.

    Build time opens each image's header (cheap; catches missing and non-image files); an image that
    opens but fails to decode later is counted then and replaced by the next good item.
    """

    kind = "image"

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_column: str = "text",
    ):
        self.transform = image_transform(resolution, center_crop, random_flip)
        super().__init__(root, caption_column)

    def check(self, file: Path) -> str | None:
        try:
            with Image.open(file) as im:  # header only
                im.size  # noqa: B018
        except (OSError, ValueError) as e:
            return str(e)
        return None

    def load(self, file: Path) -> torch.Tensor:
        return self.transform(_open_rgb(file))


# --------------------------------------------------------------------------- webdataset


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand brace patterns (``shard-{000..009}.tar``) and globs (``*.tar``) into a list of shards.

    Local paths must exist; remote URLs (``http://``, ``pipe:``, ``s3://`` ...) pass through unchecked.

    Raises:
        FileNotFoundError: a local pattern or path matches no file.
    """
    import braceexpand

    if isinstance(urls, (str, os.PathLike)):
        urls = [urls]
    out: list[str] = []
    for pattern in urls:
        pattern = os.fspath(pattern)
        for url in braceexpand.braceexpand(pattern):
            if "://" in url or url.startswith("pipe:"):
                out.append(url)
            elif glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    raise FileNotFoundError(f"no shard matches {url!r} (from {pattern!r})")
                out.extend(found)
            elif not os.path.isfile(url):
                raise FileNotFoundError(f"shard not found: {url!r} (from {pattern!r})")
            else:
                out.append(url)
    if not out:
        raise FileNotFoundError(f"no shards given: {urls!r}")
    return out


def _decode_samples(src: Iterable[dict], decode: Callable[[dict], Any], counter: SkipCounter) -> Iterator[dict]:
    """webdataset stage: raw samples (bytes per extension) -> {"pixel_values", "text"}; bad ones skipped."""
    for sample in src:
        key = sample.get("__key__", "?")
        try:
            text = shard_caption(sample)
            pixels = decode(sample)
        except Exception as e:  # any decoding failure: count it and move on
            counter.add(f"{sample.get('__url__', '?')}:{key}: {type(e).__name__}: {e}")
            continue
        url = sample.get("__url__", "?")
        counter.read[url] = counter.read.get(url, 0) + 1
        yield {"pixel_values": pixels, "text": text}


def shard_field(sample: dict, keys: Sequence[str], what: str) -> bytes:
    """The bytes of the first of ``keys`` (file extensions) a webdataset sample has; ValueError naming them."""
    key = next((k for k in keys if k in sample), None)
    if key is None:
        raise ValueError(f"no {what} ({'/'.join(keys)}) in sample")
    return sample[key]


def _decode_image(sample: dict, transform: Callable) -> torch.Tensor:
    return transform(_open_rgb(shard_field(sample, IMAGE_KEYS, "image")))


def webdataset_image_text(
    urls: str | os.PathLike | Sequence[str | os.PathLike],
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    shuffle: int = 1000,
    resampled: bool = False,
    counter: SkipCounter | None = None,
    seed: int | None = None,
    decode: Callable[[dict], Any] | None = None,
):
    """An iterable dataset of ``{"pixel_values", "text"}`` from webdataset tar shards.

    Each sample has an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``, or ``json``
    with "text"/"prompt"/"caption"). Samples that fail to decode and unreadable shards are skipped and
    counted in ``counter`` (also available as the returned dataset's ``skip_counter`` attribute).

    Args:
        urls: shard paths/URLs; brace patterns and globs are expanded (see `expand_shards`).
        resolution, center_crop, random_flip: see `image_transform`.
        shuffle: sample shuffle buffer size; 0 keeps shard order and sample order (deterministic).
            When > 0, shard order is shuffled too (``shardshuffle`` = number of shards).
        resampled: draw shards with replacement forever (for multi-process training; bound the
            epoch with ``.with_epoch(n)``).
        counter: where skips are counted; a new `SkipCounter` when None.
        seed: seed for shard shuffling (webdataset picks one at random when None).
        decode: raw sample (bytes per extension) -> pixel tensor; default: the image, resized and cropped
            (`image_transform`). The video shards pass their clip decoder (`webdataset_video_text`).

    Shards are split across distributed processes (``split_by_node``) and DataLoader workers, so give
    at least ``world_size * num_workers`` shards unless ``resampled``.
    """
    import webdataset as wds

    if not isinstance(shuffle, int) or shuffle < 0:
        raise ValueError(f"shuffle must be a buffer size >= 0, got {shuffle!r}")
    shards = expand_shards(urls)
    counter = counter if counter is not None else SkipCounter()
    for shard in shards:
        if os.path.isfile(shard) and not tar_is_complete(shard):
            counter.shard_lost(shard, "the file ends without the tar end-of-archive marker (cut short)")
    if decode is None:
        decode = functools.partial(_decode_image, transform=image_transform(resolution, center_crop, random_flip))
    ds = wds.WebDataset(
        shards,
        resampled=resampled,
        # Set explicitly (webdataset warns otherwise); resampling draws shards at random by itself.
        shardshuffle=False if (resampled or shuffle == 0) else len(shards),
        handler=counter.handler,
        nodesplitter=wds.split_by_node,
        empty_check=False,  # all-corrupt shards must not raise: they are counted
        seed=seed,
    )
    if shuffle > 0:
        ds = ds.shuffle(shuffle)
    ds = ds.compose(functools.partial(_decode_samples, decode=decode, counter=counter))
    ds.skip_counter = counter
    ds.shards = shards
    return ds


def describe_shards(ds) -> str:
    """The shards of a `webdataset_image_text` dataset and what could not be read of them, for the error
    of a data set that yields no batch."""
    counter = ds.skip_counter
    return f"shards {', '.join(ds.shards)}: {counter.summary()}; last reasons {counter.reasons[-3:]}"


# --------------------------------------------------------------------------- loaders


def infinite(loader: Iterable, source: Callable[[], str] | None = None) -> Iterator:
    """Yield batches from ``loader`` forever, starting a new epoch each time it is exhausted.

    Calls ``set_epoch(epoch)`` on the loader or its sampler when they have one (DistributedSampler,
    accelerate's prepared loaders), so each epoch gets a new shuffle.

    Raises:
        ValueError: an epoch yielded no batches (an empty dataset would otherwise loop forever); the
            message ends with ``source()`` (e.g. the shards and what could not be read of them).
    """
    epoch = 0
    while True:
        for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                break
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            where = f" ({source()})" if source is not None else ""
            raise ValueError(f"data loader yielded no batches in epoch {epoch}: is the dataset empty, or "
                             f"smaller than one batch with drop_last=True?{where}")
        epoch += 1


def collate_image_text(batch: Sequence[dict]) -> dict[str, Any]:
    """Collate items into ``{"pixel_values": (B, 3, R, R), "text": list[str]}``."""
    return {"pixel_values": torch.stack([b["pixel_values"] for b in batch]), "text": [b["text"] for b in batch]}
