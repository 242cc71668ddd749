"""Run-folder logging: tensorboard scalars and images, ``stats.jsonl``, image grids and progress bars.

A run folder gets::

    stats.jsonl      one JSON object per `RunLogger.log` call: {"step": ..., "time": ..., name: value}
    tb/              tensorboard event files (when tensorboard is enabled)
    images/{tag}/    PNG grids passed to `RunLogger.log_image` as tensors
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


def _scalar(name: str, value: Any) -> float:
    # The one place tensors become Python numbers: trainers keep returning tensors so no step syncs early.
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"logged value {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"logged value {name!r} must be a number or a one-element tensor, got {value!r}")
    return float(value)


class RunLogger:
    """Log scalars to tensorboard and ``run_dir/stats.jsonl``, and images to tensorboard / PNG files.

    Args:
        run_dir: the run folder (created if needed).
        enabled: False on non-main processes: every method is then a no-op and nothing is created.
        use_tensorboard: also write tensorboard events under ``run_dir/tb``.

    Non-finite values (NaN, inf) are written to ``stats.jsonl`` as ``null`` so the file stays strict
    JSON; tensorboard receives the real value. The file is appended to, so a resumed run continues it.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, use_tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        self._stats = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a killed run keeps every line logged so far.
        self._stats = open(self.run_dir / "stats.jsonl", "a", buffering=1, encoding="utf-8")
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, step: int, scalars: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
        """Record ``scalars`` at ``step``; returns them as floats ({} when disabled)."""
        if not self.enabled:
            return {}
        values = {k: _scalar(k, v) for k, v in scalars.items()}
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._stats.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, global_step=step)
        return values

    def log_image(self, step: int, tag: str, path_or_grid: str | os.PathLike | torch.Tensor) -> Path | None:
        """Log an image: a PNG/JPEG path, or a tensor grid (C,H,W) in [0,1] or a batch (N,C,H,W) in [-1,1].

        Tensors are also written to ``run_dir/images/{tag}/{step:08d}.png`` (returned), so they survive
        without tensorboard. Returns None for a path or when disabled.
        """
        if not self.enabled:
            return None
        if isinstance(path_or_grid, torch.Tensor):
            x = path_or_grid.detach().float().cpu()
            out = self.run_dir / "images" / tag.replace("/", "_") / f"{step:08d}.png"
            if x.ndim == 3 and x.shape[0] in (1, 3):  # one image or a ready grid, already in [0, 1]
                grid = x.clamp(0, 1).expand(3, -1, -1)
            elif x.ndim == 4:  # a batch of model outputs in [-1, 1]
                grid = make_image_grid(x)
            else:
                raise ValueError(f"image for {tag!r} must be (C,H,W) or (N,C,H,W) with C in (1, 3), got shape {tuple(x.shape)}")
            out.parent.mkdir(parents=True, exist_ok=True)
            from torchvision.utils import save_image

            save_image(grid, out)
            if self._writer is not None:
                self._writer.add_image(tag, grid, global_step=step)
            return out
        path = Path(path_or_grid)
        if not path.is_file():
            raise FileNotFoundError(f"image to log not found: {path}")
        if self._writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            self._writer.add_image(tag, arr, global_step=step, dataformats="HWC")
        return None

    def flush(self) -> None:
        """Push pending tensorboard events to disk (stats.jsonl is flushed on every line)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the files; further calls become no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        self.enabled = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_stats(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/stats.jsonl`` in order (for tests, plots and reports)."""
    path = Path(run_dir) / "stats.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no stats.jsonl in {run_dir}; was the run logged with RunLogger?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _default_nrow(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


def make_image_grid(
    images: torch.Tensor, nrow: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0)
) -> torch.Tensor:
    """A (3,H',W') grid in [0,1] from a batch (N,C,H,W) (or one (C,H,W) image) with values in ``value_range``.

    Values outside ``value_range`` are clamped; C is 1 or 3; ``nrow`` defaults to about sqrt(N).
    """
    from torchvision.utils import make_grid

    x = images.detach().float().cpu()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N,C,H,W) with C in (1, 3), got shape {tuple(images.shape)}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = (x.clamp(lo, hi) - lo) / (hi - lo)  # -> [0, 1]
    return make_grid(x, nrow=nrow or _default_nrow(len(x)), padding=2, pad_value=1.0)


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write a batch (N,C,H,W) (or one (C,H,W) image) as a PNG grid and return the path.

    Args:
        images: pixel values in ``value_range``; values outside are clamped. C is 1 or 3.
        path: the PNG file (parent folders are created).
        nrow: images per row; default about sqrt(N), giving a square-ish grid.
        value_range: (-1, 1) for model outputs, (0, 1) for images already in display range.
    """
    from torchvision.utils import save_image

    grid = make_image_grid(images, nrow=nrow, value_range=value_range)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def progress(total: int | None, desc: str | None = None, disable: bool = False) -> tqdm:
    """A tqdm progress bar (pass ``disable=not accelerator.is_main_process`` so only one process draws)."""
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True)
