"""Video clips: H.264 write/read round trips, the clip folder with skips counted, moving Fashion-MNIST."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_tensor

from tsm_core.data.fmnist import PROMPT_NAMES, prompt_for
from tsm_core.data.images import image_transform
from tsm_core.data.video import (
    MOTIONS,
    VideoTextFolder,
    collate_video_text,
    moving_fmnist_clips,
    moving_fmnist_words,
    read_clip,
    write_clip,
)


def ramp_clip(frames=6, height=16, width=16, step=30) -> np.ndarray:
    """Smooth frames (a gentle horizontal ramp) whose brightness rises by ``step`` per frame."""
    ramp = np.linspace(0, 40, width)[None, :, None]
    out = [np.broadcast_to(20 + step * i + ramp, (height, width, 3)) for i in range(frames)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def make_folder(root, clips: dict[str, np.ndarray | bytes | None], captions: dict[str, str] | None = None):
    """A clip folder: arrays are written as clips, bytes as raw files, None is listed but never written."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, clip in clips.items():
        if isinstance(clip, bytes):
            (root / name).write_bytes(clip)
        elif clip is not None:
            write_clip(root / name, clip)
        text = (captions or {}).get(name, f"caption of {name}")
        lines.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------- write_clip / read_clip


def test_round_trip_keeps_shape_order_and_content_and_the_stride_picks_every_sth_frame(tmp_path):
    frames = ramp_clip(frames=7, height=16, width=24)
    path = write_clip(tmp_path / "a.mp4", frames)
    assert path == tmp_path / "a.mp4" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # the temporary file was renamed, not left
    got = read_clip(path, num_frames=7)
    assert got.shape == (7, 16, 24, 3) and got.dtype == np.uint8
    assert mae(got, frames) < 8  # H.264 is lossy, but smooth content survives closely
    means = got.reshape(7, -1).mean(axis=1)
    assert np.all(np.diff(means) > 15)  # frames come back in order (brightness rises ~30 per frame)
    # stride 3: frames 0, 3, 6
    strided = read_clip(path, num_frames=3, frame_stride=3)
    assert strided.shape == (3, 16, 24, 3)
    assert mae(strided, frames[[0, 3, 6]]) < 8
    for k, want in enumerate([0, 3, 6]):
        nearest = int(np.argmin([mae(strided[k], f) for f in frames]))
        assert nearest == want
    # fewer frames than the clip holds: the first ones
    assert mae(read_clip(path, num_frames=2), frames[:2]) < 8
    # the same frames give the same file (reproducible data sets)
    assert write_clip(tmp_path / "b.mp4", frames).read_bytes() == path.read_bytes()


def test_write_clip_refuses_odd_sizes_and_wrong_arrays(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="even"):
        write_clip(tmp_path / "odd.mp4", np.zeros((2, 16, 17, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        write_clip(tmp_path / "f.mp4", np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        write_clip(tmp_path / "g.mp4", np.zeros((16, 16, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_too_short_clip_names_the_counts_and_what_was_asked(tmp_path):
    path = write_clip(tmp_path / "short.mp4", ramp_clip(frames=4))
    with pytest.raises(ValueError, match=r"short\.mp4 has 4 frames.*num_frames=3 with frame_stride=2 needs 5"):
        read_clip(path, num_frames=3, frame_stride=2)
    with pytest.raises(ValueError, match="has 4 frames.*needs 5"):
        read_clip(path, num_frames=5)
    assert read_clip(path, num_frames=2, frame_stride=3).shape[0] == 2  # frames 0 and 3: exactly enough
    with pytest.raises(ValueError, match="num_frames"):
        read_clip(path, num_frames=0)
    with pytest.raises(ValueError, match="frame_stride"):
        read_clip(path, num_frames=1, frame_stride=0)


def test_unreadable_file_is_a_value_error_naming_it(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match="notes.mp4"):
        read_clip(fake, num_frames=1)
    cut = tmp_path / "cut.mp4"  # a real clip cut in half: the index (moov) at the end is gone
    cut.write_bytes(write_clip(tmp_path / "whole.mp4", ramp_clip()).read_bytes()[:300])
    with pytest.raises(ValueError, match="cut.mp4"):
        read_clip(cut, num_frames=1)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_clip(tmp_path / "missing.mp4", num_frames=1)


# --------------------------------------------------------------------------- VideoTextFolder


def test_items_are_channels_then_frames_in_range_with_their_caption(tmp_path):
    root = make_folder(tmp_path / "v", {"a.mp4": ramp_clip(frames=5)}, {"a.mp4": "a rising ramp"})
    ds = VideoTextFolder(root, resolution=16, num_frames=4, frame_stride=1)
    assert len(ds) == 1 and ds.skipped == 0
    item = ds[0]
    x = item["pixel_values"]
    assert item["text"] == "a rising ramp"
    assert x.shape == (3, 4, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # frame axis is dim 1: the per-frame brightness rises (30/255*2 ~ 0.24 per frame)
    assert torch.all(x.mean(dim=(0, 2, 3)).diff() > 0.12)


def test_non_square_clips_are_resized_on_the_short_side_and_center_cropped_like_images(tmp_path):
    rng = np.random.default_rng(0)
    # smooth random content: a coarse grid upsampled, so H.264 keeps it well
    coarse = rng.integers(0, 256, size=(3, 4, 6, 3)).astype(np.float64)
    big = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)  # (3, 32, 48, 3)
    frames = big.astype(np.uint8)
    root = make_folder(tmp_path / "v", {"wide.mp4": frames})
    item = VideoTextFolder(root, resolution=16, num_frames=3)[0]["pixel_values"]
    assert item.shape == (3, 3, 16, 16)
    # reference: the image pipeline (PIL resize of the short side, center crop) on each decoded frame
    decoded = read_clip(root / "wide.mp4", num_frames=3)
    transform = image_transform(16)
    want = torch.stack([transform(Image.fromarray(f)) for f in decoded], dim=1)  # (3, F, 16, 16)
    assert (item - want).abs().mean() < 0.02
    assert (item - want).abs().max() < 0.15
    # and it is the center: the left edge of the resized frame (21 wide) would be far off
    resized = [Image.fromarray(f).resize((21, 16), Image.BILINEAR) for f in decoded]
    left = torch.stack([to_tensor(im)[:, :16, :16] * 2 - 1 for im in resized], dim=1)
    assert (item - left).abs().mean() > 0.1


def test_random_crop_is_the_same_for_every_frame_and_varies_between_loads(tmp_path):
    ramp = np.linspace(0, 255, 48)[None, :, None]
    frames = np.broadcast_to(ramp, (4, 16, 48, 3)).astype(np.uint8)  # static: a crop shows where it was cut
    root = make_folder(tmp_path / "v", {"pan.mp4": frames})
    ds = VideoTextFolder(root, resolution=16, num_frames=4, center_crop=False)
    torch.manual_seed(0)
    lefts = set()
    for _ in range(12):
        x = ds[0]["pixel_values"]  # short side is already 16: only a horizontal crop
        per_frame = x.mean(dim=(0, 2, 3))
        assert (per_frame - per_frame[0]).abs().max() < 0.03  # one crop for the whole clip
        lefts.add(round(float(per_frame[0]), 1))
    assert len(lefts) >= 3


def test_missing_corrupt_and_short_clips_are_skipped_and_counted_once(tmp_path):
    clips = {
        "good1.mp4": ramp_clip(frames=4),
        "missing.mp4": None,
        "corrupt.mp4": b"not a video at all" * 10,
        "short.mp4": ramp_clip(frames=2),
        "good2.mp4": ramp_clip(frames=5),
    }
    root = make_folder(tmp_path / "v", clips)
    ds = VideoTextFolder(root, resolution=8, num_frames=4)
    assert ds.skipped == 1 and len(ds) == 4  # the missing file is dropped at build time
    assert "missing.mp4" in ds.skip_counter.reasons[0]
    texts = [ds[i]["text"] for i in range(len(ds))]
    # corrupt and short are each replaced by the next good item (good2; then wrapping to good1)
    assert texts == ["caption of good1.mp4", "caption of good2.mp4", "caption of good2.mp4",
                     "caption of good2.mp4"]
    assert ds.skipped == 3
    assert any("corrupt.mp4" in r for r in ds.skip_counter.reasons)
    assert any("short.mp4" in r and "has 2 frames" in r for r in ds.skip_counter.reasons)
    for i in range(len(ds)):  # a second epoch: bad clips are remembered, not counted again
        assert ds[i]["pixel_values"].shape == (3, 4, 8, 8)
    assert ds.skipped == 3


def test_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VideoTextFolder(tmp_path / "nope", resolution=16, num_frames=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl.*file_name"):
        VideoTextFolder(tmp_path / "empty", resolution=16, num_frames=2)
    root = make_folder(tmp_path / "v", {"a.mp4": ramp_clip(frames=2)})
    meta = root / "metadata.jsonl"
    meta.write_text('{"file_name": "a.mp4", "text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not valid JSON"):
        VideoTextFolder(root, resolution=16, num_frames=2)
    meta.write_text('{"file_name": "a.mp4", "caption": "wrong key"}\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:1: .*'text'"):
        VideoTextFolder(root, resolution=16, num_frames=2)
    assert VideoTextFolder(root, resolution=16, num_frames=2, caption_column="caption")[0]["text"] == "wrong key"
    meta.write_text('{"file_name": "gone.mp4", "text": "x"}\n')
    with pytest.raises(ValueError, match="no readable clips"):
        VideoTextFolder(root, resolution=16, num_frames=2)
    meta.write_text('{"file_name": "a.mp4", "text": "x"}\n')
    for kwargs, word in [({"num_frames": 0}, "num_frames"), ({"num_frames": 2, "frame_stride": 0}, "frame_stride"),
                         ({"num_frames": 2, "resolution": 4}, "resolution")]:
        with pytest.raises(ValueError, match=word):
            VideoTextFolder(root, **{"resolution": 16, **kwargs})


def test_all_clips_undecodable_when_loaded_is_an_error_not_a_hang(tmp_path):
    root = make_folder(tmp_path / "v", {"a.mp4": b"junk" * 50, "b.mp4": ramp_clip(frames=2)})
    ds = VideoTextFolder(root, resolution=8, num_frames=3)
    with pytest.raises(RuntimeError, match="no clip .* could be decoded"):
        ds[0]
    assert ds.skipped == 2


def test_dataloader_batches_are_b_c_f_h_w(tmp_path):
    root = make_folder(tmp_path / "v", {f"c{i}.mp4": ramp_clip(frames=3, step=10 * i) for i in range(3)})
    loader = DataLoader(VideoTextFolder(root, resolution=8, num_frames=3), batch_size=2,
                        collate_fn=collate_video_text)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 3, 8, 8), (1, 3, 3, 8, 8)]
    assert batches[0]["text"] == ["caption of c0.mp4", "caption of c1.mp4"]


# --------------------------------------------------------------------------- moving Fashion-MNIST


def center_of_mass(frame: np.ndarray) -> np.ndarray:
    """(row, column) of the brightness-weighted centre of an (H, W, 3) frame."""
    g = frame.astype(np.float64).mean(axis=-1)
    rows, cols = np.indices(g.shape)
    return np.array([(g * rows).sum(), (g * cols).sum()]) / g.sum()


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    root = tmp_path_factory.mktemp("moving")
    return {seed: moving_fmnist_clips(root / f"s{seed}", n=6, num_frames=8, size=32, seed=seed, split="test")
            for seed in (0, 1)} | {"again": moving_fmnist_clips(root / "again", n=6, num_frames=8, size=32,
                                                                 seed=0, split="test")}


def test_moving_fmnist_writes_n_clips_with_class_and_direction_captions(moving):
    folder = moving[0]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"clip_{i:05d}.mp4" for i in range(6)]
    assert sorted(p.name for p in folder.glob("*.mp4")) == [r["file_name"] for r in rows]
    prompts = {prompt_for(k) for k in range(len(PROMPT_NAMES))}
    for r in rows:
        head, motion = r["text"].rsplit(" moving ", 1)
        assert head in prompts and motion in MOTIONS
        assert set(r["text"].split()) <= set(moving_fmnist_words())
    ds = VideoTextFolder(folder, resolution=32, num_frames=8)
    assert len(ds) == 6 and ds[0]["pixel_values"].shape == (3, 8, 32, 32)


def test_moving_fmnist_is_deterministic_for_a_seed_and_differs_for_another(moving):
    for i in range(6):
        name = f"clip_{i:05d}.mp4"
        assert np.array_equal(read_clip(moving[0] / name, 8), read_clip(moving["again"] / name, 8))
    assert (moving[0] / "metadata.jsonl").read_text() == (moving["again"] / "metadata.jsonl").read_text()
    assert any(mae(read_clip(moving[0] / f"clip_{i:05d}.mp4", 8), read_clip(moving[1] / f"clip_{i:05d}.mp4", 8)) > 5
               for i in range(6))


def test_moving_fmnist_items_move_the_way_the_caption_says(moving):
    for folder in (moving[0], moving[1]):
        for line in (folder / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            frames = read_clip(folder / row["file_name"], 8)
            assert frames.reshape(8, -1).max(axis=1).min() > 100  # the item is on screen in every frame
            d_row, d_col = center_of_mass(frames[-1]) - center_of_mass(frames[0])
            motion = row["text"].rsplit(" ", 1)[1]
            along = {"left": -d_col, "right": d_col, "up": -d_row, "down": d_row}[motion]
            across = abs(d_row) if motion in ("left", "right") else abs(d_col)
            assert along > 4, (row, d_row, d_col)  # several pixels, in the captioned direction
            assert along > across, (row, d_row, d_col)  # and that direction dominates


def test_per_frame_fid_reads_every_frame_of_every_clip_and_skips_bad_clips(tmp_path):
    """tools/fid.py on a folder of clips: features of all frames, equal to those of the decoded frames."""
    import json as _json

    from tools import fid as fid_cli
    from tsm_core.data.video import read_clip, write_clip
    from tsm_core.eval import FeatureExtractor
    from tsm_core.eval.evaluate import features_from_source

    rng = np.random.default_rng(0)
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(2):
        small = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
        write_clip(clips / f"c{i}.mp4", small.repeat(8, axis=1).repeat(8, axis=2))  # 3 smooth 32x32 frames
    (clips / "broken.mp4").write_bytes(b"not a video")
    ext = FeatureExtractor(device="cpu", mode="clean", batch_size=6, workers=0, progress=False)
    fs = features_from_source(clips, ext)
    assert fs.features.shape == (6, 2048)
    assert [name for name, _ in fs.skipped] == [str(clips / "broken.mp4")]
    frames = np.concatenate([read_clip(clips / f"c{i}.mp4", None) for i in range(2)])
    direct = ext.features_from_images(list(frames)).features
    assert np.allclose(fs.features, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    with pytest.raises(ValueError, match="broken.mp4"):
        features_from_source(clips, ext, on_error="raise")
    # through the CLI, against the frames themselves as a reference: FID ~ 0 with 6 frames
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(ref / f"{i}.png")
    out = tmp_path / "r.json"
    assert fid_cli.main(["score", str(clips), "--ref", str(ref), "--device", "cpu", "--quiet", "--batch-size", "6",
                         "--json", str(out)]) == 0
    result = _json.loads(out.read_text())
    assert (result["n_images"], result["n_skipped"]) == (6, 1)
    assert abs(result["fid"]) < 1e-2  # the same frames: FID 0 up to sqrtm's rounding (FIDs of distinct sets are > 1)


def test_clip_shards_give_the_folders_items_and_skip_bad_samples(tmp_path):
    import webdataset as wds

    from tsm_core.data.video import webdataset_video_text, write_clip_shards

    folder = moving_fmnist_clips(tmp_path / "clips", n=5, num_frames=4, size=16)
    shards = write_clip_shards(folder, tmp_path / "shards" / "clips", maxcount=3)
    assert [s.name for s in shards] == ["clips-000000.tar", "clips-000001.tar"]
    first = (folder / "clip_00000.mp4").read_bytes()
    assert np.array_equal(read_clip(first, 4), read_clip(folder / "clip_00000.mp4", 4))  # bytes decode like files
    with wds.TarWriter(str(tmp_path / "shards" / "clips-000002.tar")) as sink:  # two bad samples
        sink.write({"__key__": "corrupt", "mp4": b"not a video", "txt": "a bag"})
        sink.write({"__key__": "no_clip", "txt": "a bag"})
    ds = webdataset_video_text(str(tmp_path / "shards" / "clips-{000000..000002}.tar"), 16, num_frames=3,
                               frame_stride=1, shuffle=0)
    items = list(ds)
    want = VideoTextFolder(folder, 16, num_frames=3)
    assert len(items) == 5 and ds.skip_counter.count == 2
    for i, item in enumerate(items):  # shard order = metadata order with shuffle 0
        assert item["text"] == want[i]["text"]
        assert torch.equal(item["pixel_values"], want[i]["pixel_values"])
    reasons = " ".join(ds.skip_counter.reasons)
    assert "corrupt" in reasons and "no clip" in reasons
    batch = collate_video_text(items[:2])
    assert batch["pixel_values"].shape == (2, 3, 3, 16, 16)
