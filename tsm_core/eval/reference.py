"""Reference statistics cached as .npz with the metadata needed to refuse a wrong comparison.

A file holds ``mu``, ``sigma``, optionally the raw ``features`` (for KID) and a JSON ``meta`` record:
source, n_images, resolution (the pre-resize side, or None for native size), image_size, mode,
network and a content hash of mu/sigma that is checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import stats as compute_stats

FORMAT_VERSION = 1


def stats_hash(mu: np.ndarray, sigma: np.ndarray) -> str:
    """Short sha256 of mu and sigma (dtype, shape and bytes): identifies a reference in results."""
    digest = hashlib.sha256()
    for array in (mu, sigma):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ReferenceStats:
    """FID statistics of a reference image set, with where they came from.

    mu / sigma: clean-fid statistics; features: N x 2048 (kept for KID, may be None); source: folder,
    shards or dataset name; resolution: pre-resize side (e.g. 256 for DMD2's COCO protocol) or None;
    image_size: "HxW" or "mixed"; mode: clean-fid mode; network: feature network name.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n_images: int
    source: str
    mode: str
    resolution: int | None
    network: str
    image_size: str = "unknown"
    features: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: np.ndarray, *, source: str, mode: str, resolution: int | None,
                      network: str, image_size: str = "unknown", keep_features: bool = True,
                      extra: dict | None = None) -> ReferenceStats:
        """Statistics of ``features`` plus metadata (``keep_features`` stores them for KID)."""
        mu, sigma = compute_stats(features)
        return cls(mu, sigma, int(features.shape[0]), str(source), mode, resolution, network, image_size,
                   features if keep_features else None, dict(extra or {}))

    @property
    def hash(self) -> str:
        """Content hash of mu and sigma."""
        return stats_hash(self.mu, self.sigma)

    def meta(self) -> dict:
        """The JSON metadata record stored next to the arrays."""
        return {"format_version": FORMAT_VERSION, "source": self.source, "n_images": self.n_images,
                "mode": self.mode, "resolution": self.resolution, "network": self.network,
                "image_size": self.image_size, "hash": self.hash, "has_features": self.features is not None,
                "extra": self.extra}

    def save(self, path: str | os.PathLike) -> Path:
        """Write a .npz (written to a temporary name, then renamed, so a crash leaves no half file)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"Reference statistics are saved as .npz; got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta()))}
        if self.features is not None:
            arrays["features"] = self.features
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Read a file written by :meth:`save`, checking its format and hash."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference statistics {path} do not exist. Make them with `tools/fid.py stats`.")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as err:
            raise ValueError(f"{path} is not a readable .npz file ({err}). Recompute it with `tools/fid.py stats`.") from err
        missing = {"mu", "sigma", "meta"} - set(arrays)
        if missing:
            raise ValueError(
                f"{path} lacks {sorted(missing)}; it was not written by tools/fid.py stats "
                "(a bare clean-fid file has no metadata). Recompute it with `tools/fid.py stats`."
            )
        meta = json.loads(str(arrays["meta"]))
        ref = cls(arrays["mu"], arrays["sigma"], int(meta["n_images"]), meta["source"], meta["mode"],
                  meta["resolution"], meta["network"], meta.get("image_size", "unknown"),
                  arrays.get("features"), meta.get("extra", {}))
        if ref.hash != meta["hash"]:
            raise ValueError(f"{path} is corrupt: its mu/sigma hash {ref.hash} differs from the recorded {meta['hash']}.")
        return ref

    def check_compatible(self, *, mode: str, resolution: int | None, network: str | None = None) -> None:
        """Raise ValueError unless these statistics were made with the same mode, resolution and network."""
        problems = []
        if self.mode != mode:
            problems.append(f"mode {self.mode!r} (requested {mode!r})")
        if self.resolution != resolution:
            problems.append(f"resolution {self.resolution!r} (requested {resolution!r})")
        if network is not None and self.network != network:
            problems.append(f"network {self.network!r} (requested {network!r})")
        if problems:
            raise ValueError(
                f"Reference statistics from {self.source} were computed with " + ", ".join(problems)
                + ". FID across different preprocessing is meaningless: recompute the statistics with "
                "`tools/fid.py stats --mode ... --resolution ...` or request the settings they were made with."
            )

    def summary(self) -> dict:
        """The metadata as a plain dict (no arrays)."""
        return self.meta()
