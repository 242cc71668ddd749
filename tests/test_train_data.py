"""Data sources: prompt files, image-text folders and webdataset shards, with corrupt samples counted."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tsm_core.data.images import (
    ImageTextFolder,
    SkipCounter,
    collate_image_text,
    expand_shards,
    image_transform,
    infinite,
    read_prompts,
    webdataset_image_text,
)


def solid(value: int, size=(12, 8), mode="RGB") -> Image.Image:
    """A uniform image: after any resize/crop every pixel is still `value`, so values are checkable."""
    return Image.new(mode, size, (value,) * len(mode) if mode != "L" else value)


def png_bytes(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def expected(value: int) -> float:
    return value / 255 * 2 - 1


# --------------------------------------------------------------------------- prompts


def test_read_prompts_txt_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "one"}\n\n{"prompt": "two"}\n{"caption": "three", "id": 3}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["one", "two", "three"]


def test_read_prompts_json_lists_and_coco_and_the_fid_tool_reads_the_same(tmp_path):
    from tsm_core.eval import generate

    (tmp_path / "p.json").write_text('["a cat", {"text": "a dog"}, {"caption": " a cow "}]')
    assert read_prompts(tmp_path / "p.json") == ["a cat", "a dog", "a cow"]
    (tmp_path / "coco.json").write_text('{"annotations": [{"image_id": 1, "caption": "two dogs"}]}')
    assert read_prompts(tmp_path / "coco.json") == ["two dogs"]
    # tools/fid.py generate used to reject the "text" key that training accepts: one reader now.
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n')
    assert generate.read_prompts(tmp_path / "t.jsonl") == read_prompts(tmp_path / "t.jsonl") == ["one"]
    (tmp_path / "bad.json").write_text('[{"label": 3}]')
    with pytest.raises(ValueError, match="item 0 is neither"):
        read_prompts(tmp_path / "bad.json")


def test_read_prompts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"label": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        read_prompts(tmp_path / "bad.jsonl")


# --------------------------------------------------------------------------- transform


def test_image_transform_shape_range_crop_and_flip():
    im = Image.new("L", (40, 10))
    im.paste(255, (0, 0, 20, 10))  # left half white; short side 10 -> 8 gives 32x8, center crop cols 12..19
    x = image_transform(8, center_crop=True)(im)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, :, 0], torch.tensor(1.0), atol=1e-2)  # white edge kept on the left
    assert torch.allclose(x[:, :, -1], torch.tensor(-1.0), atol=1e-2)
    flip = image_transform(8, center_crop=True, random_flip=True)
    torch.manual_seed(0)
    lefts = {round(flip(im)[0, 0, 0].item()) for _ in range(20)}
    assert lefts == {-1, 1}  # both orientations occur
    with pytest.raises(ValueError, match="resolution"):
        image_transform(0)


# --------------------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rows = []
    for i, v in enumerate((0, 128, 255)):
        solid(v).save(root / "sub" / f"{i}.png")
        rows.append({"file_name": f"sub/{i}.png", "text": f"value {v}"})
    (root / "sub" / "bad.png").write_bytes(b"not a png at all")  # corrupt
    rows.insert(1, {"file_name": "sub/bad.png", "text": "broken"})
    rows.append({"file_name": "sub/gone.png", "text": "missing file"})  # missing
    solid(64, mode="L").save(root / "gray.jpg")  # grayscale JPEG becomes RGB
    rows.append({"file_name": "gray.jpg", "text": "gray"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_image_text_folder_items_and_skips(image_folder):
    ds = ImageTextFolder(image_folder, resolution=4)
    assert ds.skipped == 2 and len(ds) == 4
    assert any("bad.png" in r for r in ds.skip_counter.reasons)
    assert [ds[i]["text"] for i in range(4)] == ["value 0", "value 128", "value 255", "gray"]
    for i, v in enumerate((0, 128, 255)):
        item = ds[i]
        assert item["pixel_values"].shape == (3, 4, 4)
        assert torch.allclose(item["pixel_values"], torch.tensor(expected(v)), atol=1e-6)
    assert abs(ds[3]["pixel_values"].mean().item() - expected(64)) < 0.02  # JPEG is lossy
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_image_text)))
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["text"] == ["value 0", "value 128", "value 255"]


def test_image_text_folder_truncated_image_is_replaced(image_folder):
    ds = ImageTextFolder(image_folder, resolution=4)
    data = (image_folder / "sub" / "1.png").read_bytes()
    (image_folder / "sub" / "1.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    item = ds[1]
    assert item["text"] == "value 255" and ds.skipped == 3


def test_image_text_folder_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageTextFolder(tmp_path / "nope", 8)
    with pytest.raises(FileNotFoundError, match=r"metadata.jsonl.*file_name"):
        ImageTextFolder(tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: each line needs 'file_name'"):
        ImageTextFolder(tmp_path, 8)


# --------------------------------------------------------------------------- webdataset


@pytest.fixture
def shards(tmp_path):
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    pattern = str(tmp_path / "shards" / "s-%03d.tar")
    with wds.ShardWriter(pattern, maxcount=3, verbose=0) as sink:
        sink.write({"__key__": "a", "png": png_bytes(solid(0)), "txt": "black"})
        sink.write({"__key__": "b", "jpg": b"\xff\xd8 corrupt jpeg bytes", "txt": "broken"})
        sink.write({"__key__": "c", "webp": png_bytes(solid(255), "WEBP"), "json": json.dumps({"caption": "white"})})
        sink.write({"__key__": "d", "png": png_bytes(solid(128)), "txt": "  gray \n"})
        sink.write({"__key__": "e", "png": png_bytes(solid(10))})  # no caption
        sink.write({"__key__": "f", "jpeg": png_bytes(solid(200), "JPEG"), "txt": "light"})
    return tmp_path / "shards"


def test_webdataset_reads_decodes_and_counts_skips(shards):
    counter = SkipCounter()
    ds = webdataset_image_text(str(shards / "s-{000..001}.tar"), resolution=4, shuffle=0, counter=counter)
    items = list(ds)
    assert [it["text"] for it in items] == ["black", "white", "gray", "light"]
    assert counter.count == 2 and ds.skip_counter is counter
    assert any(":b:" in r for r in counter.reasons) and any(":e:" in r and "caption" in r for r in counter.reasons)
    assert set(items[0]) == {"pixel_values", "text"}
    assert torch.allclose(items[0]["pixel_values"], torch.tensor(-1.0))
    assert torch.allclose(items[1]["pixel_values"], torch.tensor(1.0))
    assert torch.allclose(items[2]["pixel_values"], torch.tensor(expected(128)), atol=1e-6)
    assert items[3]["pixel_values"].shape == (3, 4, 4)


def test_webdataset_shuffle_resampled_and_loader(shards):
    ds = webdataset_image_text(str(shards / "*.tar"), resolution=4, shuffle=8, seed=0)
    assert sorted(it["text"] for it in ds) == ["black", "gray", "light", "white"]
    ds = webdataset_image_text(str(shards / "*.tar"), resolution=4, shuffle=0, resampled=True).with_epoch(10)
    texts = [it["text"] for it in ds]
    assert len(texts) == 10 and set(texts) <= {"black", "gray", "light", "white"}
    ds = webdataset_image_text(str(shards / "*.tar"), resolution=4, shuffle=0)
    batches = list(DataLoader(ds, batch_size=2, collate_fn=collate_image_text))
    assert [b["text"] for b in batches] == [["black", "white"], ["gray", "light"]]


def test_shard_patterns_must_match(shards, tmp_path):
    assert len(expand_shards([shards / "s-000.tar", str(shards / "s-{001..001}.tar")])) == 2
    assert expand_shards("pipe:cat x.tar") == ["pipe:cat x.tar"]
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        webdataset_image_text(str(tmp_path / "none-*.tar"), 4)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        webdataset_image_text(str(shards / "s-{000..005}.tar"), 4)


def test_corrupt_shard_is_skipped(shards):
    (shards / "s-001.tar").write_bytes(np.random.default_rng(0).bytes(3000))  # garbage "tar"
    ds = webdataset_image_text(str(shards / "*.tar"), resolution=4, shuffle=0)
    assert [it["text"] for it in ds] == ["black", "white"]
    # The broken jpeg is one skipped sample; the unreadable shard is one lost shard, named, not a "sample".
    assert ds.skip_counter.count == 1
    assert list(ds.skip_counter.lost_shards) == [str(shards / "s-001.tar")]


# --------------------------------------------------------------------------- infinite


def test_infinite_reiterates_and_sets_epoch():
    class Sampler:
        epochs: list[int] = []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __iter__(self):
            return iter(range(3))

        def __len__(self):
            return 3

    sampler = Sampler()
    loader = DataLoader(list(range(3)), batch_size=2, sampler=sampler)
    it = infinite(loader)
    got = [next(it).tolist() for _ in range(5)]
    assert got == [[0, 1], [2], [0, 1], [2], [0, 1]]
    assert sampler.epochs == [0, 1, 2]
    with pytest.raises(ValueError, match="no batches"):
        next(infinite(DataLoader([1], batch_size=2, drop_last=True)))
