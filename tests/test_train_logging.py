"""Run logging: stats.jsonl lines, tensorboard events, PNG grids, and no-ops when disabled."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tsm_core.train.logging import RunLogger, progress, read_stats, save_image_grid


def test_log_writes_jsonl_and_tensorboard(tmp_path):
    with RunLogger(tmp_path / "run") as log:
        got = log.log(1, {"loss": torch.tensor(0.5), "lr": 1e-4, "bad": float("nan")})
        log.log(2, {"loss": torch.tensor([0.25])})
        assert got == pytest.approx({"loss": 0.5, "lr": 1e-4, "bad": float("nan")}, nan_ok=True)
        with pytest.raises(ValueError, match="must be a scalar"):
            log.log(3, {"loss": torch.ones(2)})
        with pytest.raises(ValueError, match="must be a number"):
            log.log(3, {"name": "x"})
    rows = read_stats(tmp_path / "run")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert rows[0]["lr"] == 1e-4 and rows[0]["bad"] is None  # strict JSON: NaN -> null

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5), (2, 0.25)]

    with RunLogger(tmp_path / "run", use_tensorboard=False) as log:  # a resumed run appends
        log.log(3, {"loss": 0.125})
    assert [r["step"] for r in read_stats(tmp_path / "run")] == [1, 2, 3]


def test_disabled_logger_creates_nothing(tmp_path):
    log = RunLogger(tmp_path / "rank1", enabled=False)
    assert log.log(1, {"loss": 1.0}) == {}
    assert log.log_image(1, "x", torch.zeros(2, 3, 4, 4)) is None
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_save_image_grid_maps_ranges(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])  # black, white
    path = save_image_grid(imgs, tmp_path / "g" / "grid.png", nrow=2)
    arr = np.asarray(Image.open(path))
    assert arr.shape == (8, 14, 3)  # 2px padding around and between two 4x4 images
    assert (arr[2:6, 2:6] == 0).all() and (arr[2:6, 8:12] == 255).all()
    gray = save_image_grid(torch.full((1, 1, 4, 4), 0.5), tmp_path / "gray.png", value_range=(0.0, 1.0))
    assert (np.abs(np.asarray(Image.open(gray).convert("L")).astype(int) - 128) <= 1).all()  # one image: no padding
    with pytest.raises(ValueError, match=r"\(N,C,H,W\)"):
        save_image_grid(torch.zeros(4, 4), tmp_path / "bad.png")


def test_log_image_from_tensor_and_path(tmp_path):
    with RunLogger(tmp_path) as log:
        out = log.log_image(5, "samples/train", torch.zeros(4, 3, 8, 8))
        assert out == tmp_path / "images" / "samples_train" / "00000005.png"
        assert np.asarray(Image.open(out)).shape == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2, 3)
        log.log_image(6, "file", out)
        with pytest.raises(FileNotFoundError):
            log.log_image(7, "file", tmp_path / "missing.png")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {e.step for e in acc.Images("samples/train")} == {5}
    assert {e.step for e in acc.Images("file")} == {6}


def test_progress_counts_and_disables():
    with progress(3, "x") as bar:
        bar.update(2)
        assert bar.n == 2 and bar.total == 3 and bar.desc.startswith("x")
    assert progress(3, "x", disable=True).disable
