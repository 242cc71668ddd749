"""Fashion-MNIST from the Debian IDX files: loader, errors, prompts, tokenizer and shards."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tsm_core.data import fmnist

REPO = Path(__file__).resolve().parents[1]


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_idx(path, header: bytes, data: bytes):
    with gzip.open(path, "wb") as f:
        f.write(header + data)


@pytest.fixture(scope="module")
def test_split():
    return fmnist.load_fashion_mnist("test")


def test_real_files_have_the_documented_shapes_and_labels(test_split):
    train_images, train_labels = fmnist.load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert train_labels.shape == (60000,)
    images, labels = test_split
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    # Ten balanced classes: 6000 train and 1000 test images each.
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(labels).tolist() == [1000] * 10


def test_prompts_use_the_right_article():
    assert fmnist.prompt_for(9, 0) == "a photo of an ankle boot"
    assert fmnist.prompt_for(7, 1) == "a picture of a sneaker"
    assert fmnist.prompt_for(0, 0) == "a photo of a t-shirt"
    assert fmnist.prompt_for(8, 2) == "an image of a bag"
    with pytest.raises(ValueError, match="label must be in 0..9"):
        fmnist.prompt_for(10)


def test_missing_folder_names_the_apt_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_fashion_mnist("train", tmp_path / "nowhere")
    # A folder that exists but lacks the files gets the same hint, and the env var is honoured.
    monkeypatch.setenv(fmnist.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_fashion_mnist("test")
    with pytest.raises(ValueError, match="split must be one of"):
        fmnist.load_fashion_mnist("valid", tmp_path)


def test_corrupt_idx_raises_value_error(tmp_path):
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx(labels, bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big"), bytes([3, 4]))
    # Wrong magic: says 1 dimension where images need 3.
    _write_idx(images, bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big"), bytes(2))
    with pytest.raises(ValueError, match="IDX magic"):
        fmnist.load_fashion_mnist("test", tmp_path)
    # Right magic, truncated data.
    _write_idx(images, bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)), bytes(100))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        fmnist.load_fashion_mnist("test", tmp_path)
    # Not gzip at all.
    images.write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="not a readable gzip"):
        fmnist.load_fashion_mnist("test", tmp_path)
    # A well-formed pair loads.
    _write_idx(images, bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28)),
               bytes(range(256)) * 6 + bytes(1568 - 1536))
    got, lab = fmnist.load_fashion_mnist("test", tmp_path)
    assert got.shape == (2, 28, 28) and lab.tolist() == [3, 4]


def test_dataset_item_is_padded_model_space_image(test_split):
    ds = fmnist.FashionMNIST("test")
    image, prompt = ds[3]
    raw = torch.as_tensor(test_split[0][3]).float()
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # The 2-pixel border is the background value, the middle is the raw image mapped to [-1, 1].
    assert torch.equal(image[:, :2], torch.full((3, 2, 32), -1.0))
    assert torch.equal(image[:, :, -2:], torch.full((3, 32, 2), -1.0))
    assert torch.allclose(image[1, 2:30, 2:30], raw / 127.5 - 1)
    assert prompt == fmnist.prompt_for(int(test_split[1][3]), template=3)
    assert np.array_equal(ds.raw, test_split[0]) and len(ds) == 10000


def test_tokenizer_keeps_every_prompt_word_whole(tmp_path):
    tok = fmnist.write_clip_tokenizer(tmp_path / "tok")
    for label in range(10):
        for k in range(len(fmnist.TEMPLATES)):
            prompt = fmnist.prompt_for(label, k)
            ids = tok(prompt).input_ids
            # bos + one token per word (CLIP splits "t-shirt" into t, -, shirt) + eos.
            assert len(ids) == len(prompt.replace("-", " - ").split()) + 2, prompt
            assert tok.decode(ids, skip_special_tokens=True).replace(" - ", "-") == prompt


def test_make_shards_round_trips_images_prompts_and_labels(tmp_path, test_split):
    import webdataset as wds

    make_shards = _load_tool("make_shards")
    files = make_shards.write_shards(tmp_path / "fm", split="test", limit=5, maxcount=2)
    assert [f.name for f in files] == ["fm-000000.tar", "fm-000001.tar", "fm-000002.tar"]
    ds = wds.WebDataset([str(f) for f in files], shardshuffle=False).decode("l8").to_tuple("png", "txt", "cls")
    got = list(ds)
    assert len(got) == 5
    for i, (image, prompt, label) in enumerate(got):
        assert np.array_equal(image, test_split[0][i])  # PNG is lossless
        assert label == int(test_split[1][i])
        assert prompt == fmnist.prompt_for(label, template=i)
