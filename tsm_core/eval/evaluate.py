"""Score a set of images against a reference: the glue the CLI and trainers' validation call.

A *source* is an image folder, webdataset shards (``.tar`` path, glob or brace pattern) or, for
references only, a ``.npz`` written by :meth:`ReferenceStats.save`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from .features import FeatureExtractor, FeatureSet, OnError
from .metrics import fid_from_stats, kid_from_features, stats
from .reference import ReferenceStats
from .sources import folder_items, is_video_folder, shard_items, video_frame_items

KID_SKIPPED_NO_FEATURES = "skipped: reference statistics were saved without features"


def is_shard_source(source) -> bool:
    """True for webdataset shard specs: a list, a brace pattern, a glob of .tar files or a .tar path."""
    if isinstance(source, (list, tuple)):
        return True
    text = str(source)
    return "{" in text or text.endswith(".tar") or (any(c in text for c in "*?[") and ".tar" in text)


BUILTIN_DATASETS = ("fashion-mnist",)


def builtin_images(source: str):
    """uint8 images of a built-in dataset named ``fashion-mnist[:train|test]``, or None for other sources."""
    name, _, split = str(source).partition(":")
    if name not in BUILTIN_DATASETS:
        return None
    from tsm_core.data.fmnist import load_fashion_mnist

    images, _labels = load_fashion_mnist(split or "test")
    return images  # N x 28 x 28 uint8; grayscale becomes RGB like PIL's convert('RGB')


def features_from_source(source, extractor: FeatureExtractor, on_error: OnError = "skip",
                         limit: int | None = None) -> FeatureSet:
    """Features of a folder, webdataset shards, a folder of video clips (every frame: per-frame FID) or a
    built-in dataset (``fashion-mnist:test``).

    limit: use only the first ``limit`` images (in clean-fid's sorted order for folders; frames in clip order).
    """
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be at least 2 images, got {limit}.")
    builtin = builtin_images(source) if isinstance(source, str) else None
    if builtin is not None:
        return extractor.features_from_images(builtin[:limit], on_error=on_error)
    video = is_video_folder(source)  # globs the folder: once
    if video or is_shard_source(source):
        errors: list[tuple[str, str]] | None = [] if on_error == "skip" else None
        items = video_frame_items(source, errors) if video else shard_items(source, errors)
        fs = extractor.features_from_items(islice(items, limit), on_error=on_error,
                                           desc="features video frames" if video else "features shards")
        fs.skipped = (errors or []) + fs.skipped
        return fs
    items = folder_items(source)[:limit]
    return extractor.features_from_items(items, total=len(items), on_error=on_error, desc=f"features {source}")


def source_name(source) -> str:
    """A readable, stable name for a source (absolute path for files and folders)."""
    if isinstance(source, (list, tuple)):
        return ",".join(str(s) for s in source)
    text = str(source)
    return str(Path(text).resolve()) if os.path.exists(text) else text


def compute_reference(source, extractor: FeatureExtractor, on_error: OnError = "skip",
                      keep_features: bool = True, extra: dict | None = None,
                      limit: int | None = None) -> ReferenceStats:
    """Reference statistics of a folder, shards or built-in dataset, labelled with the extractor's settings."""
    fs = features_from_source(source, extractor, on_error=on_error, limit=limit)
    extra = dict(extra or {}, n_skipped=len(fs.skipped))
    return ReferenceStats.from_features(
        fs.features, source=source_name(source), mode=extractor.mode, resolution=extractor.pre_resize,
        network=extractor.network, image_size=fs.image_size, keep_features=keep_features, extra=extra,
    )


def load_reference(source, extractor: FeatureExtractor, on_error: OnError = "skip") -> ReferenceStats:
    """A reference from a .npz (checked against the extractor's mode/resolution/network) or computed."""
    if str(source).endswith(".npz"):
        ref = ReferenceStats.load(source)
        ref.check_compatible(mode=extractor.mode, resolution=extractor.pre_resize, network=extractor.network)
        return ref
    return compute_reference(source, extractor, on_error=on_error)


@dataclass
class ScoreResult:
    """FID/KID of evaluated images against a reference, as written to JSON."""

    fid: float
    kid_mean: float | None
    kid_std: float | None
    n_images: int
    n_skipped: int
    n_reference: int
    feature_network: str
    mode: str
    resolution: int | None
    reference_hash: str
    reference_source: str
    clip_score: float | str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict of every field."""
        return asdict(self)

    def to_json(self) -> str:
        """The JSON result (one object)."""
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """One readable line."""
        kid = f"KID {self.kid_mean:.6f} +- {self.kid_std:.6f}" if self.kid_mean is not None else "KID n/a"
        clip = f", CLIP {self.clip_score:.4f}" if isinstance(self.clip_score, float) else (
            f", CLIP {self.clip_score}" if self.clip_score else "")
        res = f"{self.resolution}px" if self.resolution else "native size"
        return (f"FID {self.fid:.4f}, {kid}{clip} | {self.n_images} images ({self.n_skipped} skipped) vs "
                f"{self.n_reference} reference [{self.reference_hash}], {self.mode} mode, {res}, {self.feature_network}")


def score_features(fs: FeatureSet | object, reference: ReferenceStats, kid_seed: int = 0) -> ScoreResult:
    """FID and KID of a FeatureSet (or an N x 2048 array) against reference statistics."""
    features = fs.features if isinstance(fs, FeatureSet) else fs
    skipped = len(fs.skipped) if isinstance(fs, FeatureSet) else 0
    mu, sigma = stats(features)
    fid = fid_from_stats(mu, sigma, reference.mu, reference.sigma)
    notes = []
    if reference.features is not None:
        # Same argument order as clean-fid's compute_kid(fdir1=generated, fdir2=reference).
        kid_mean, kid_std = kid_from_features(features, reference.features, seed=kid_seed)
    else:
        kid_mean = kid_std = None
        notes.append(KID_SKIPPED_NO_FEATURES)
    return ScoreResult(
        fid=fid, kid_mean=kid_mean, kid_std=kid_std, n_images=int(features.shape[0]), n_skipped=skipped,
        n_reference=reference.n_images, feature_network=reference.network, mode=reference.mode,
        resolution=reference.resolution, reference_hash=reference.hash, reference_source=reference.source,
        notes=notes,
    )


def score(source, reference, extractor: FeatureExtractor | None = None, on_error: OnError = "skip",
          kid_seed: int = 0, limit: int | None = None) -> ScoreResult:
    """FID/KID of a folder or shards against a folder, shards or a .npz, with one extractor."""
    extractor = extractor or FeatureExtractor()
    ref = reference if isinstance(reference, ReferenceStats) else load_reference(reference, extractor, on_error)
    if isinstance(reference, ReferenceStats):
        ref.check_compatible(mode=extractor.mode, resolution=extractor.pre_resize, network=extractor.network)
    fs = features_from_source(source, extractor, on_error=on_error, limit=limit)
    return score_features(fs, ref, kid_seed=kid_seed)
