"""Fashion-MNIST from local IDX files: loader, prompts, a torch Dataset and an offline tokenizer.

The data comes from Debian's ``dataset-fashion-mnist`` package (MIT licence), so nothing is
downloaded at run time. Images are 28x28 grey; models see them as 3x32x32 in [-1, 1], padded
with the background value (black, -1) and repeated over three channels.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "TSM_FMNIST_DIR"
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (after `apt-get update`), "
    f"or point {ENV_VAR} / the root argument at a folder holding the four *-ubyte.gz files"
)

# Label order of the dataset (label i is CLASS_NAMES[i]).
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
# The names that go into prompts: single words a tiny tokenizer can hold whole.
PROMPT_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
TEMPLATES = ("a photo of {article} {name}", "a picture of {article} {name}", "an image of {article} {name}")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SIZE = 32  # 28 padded by 2 on every side: a UNet with three levels needs a multiple of 4


def default_root() -> Path:
    """The data folder: ``$TSM_FMNIST_DIR`` if set, else the Debian package's folder."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes with ``ndim`` dimensions.

    The IDX header is two zero bytes, a type byte (0x08 = uint8), a byte with the number of
    dimensions, then one big-endian uint32 per dimension. A file that does not match raises
    ``ValueError`` naming the file, so a truncated download never becomes silent garbage.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST file {path} not found: {INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e}); reinstall dataset-fashion-mnist") from e
    magic = raw[:4]
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != 0x08 or magic[3] != ndim:
        raise ValueError(
            f"{path} has IDX magic {magic.hex()!r}, expected 000008{ndim:02x} (uint8, {ndim} dims); "
            "the file is corrupt or not a Fashion-MNIST IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header} data bytes but its header says {shape} = {expected}; "
            "the file is truncated or corrupt"
        )
    # A writable copy: torch warns on (and must not write to) read-only buffers.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(split: Literal["train", "test"] = "train",
                       root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 (N, 28, 28) and int64 (N,), N = 60000 or 10000."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} not found: {INSTALL_HINT}")
    img_name, lab_name = _FILES[split]
    images = read_idx(root / img_name, ndim=3)
    labels = read_idx(root / lab_name, ndim=1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{root / lab_name} has label {labels.max()}, expected 0..{len(CLASS_NAMES) - 1}")
    return images, labels


def article(word: str) -> str:
    """English indefinite article for ``word`` by its first letter ("an ankle boot", "a sneaker")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def prompt_for(label: int, template: int = 0) -> str:
    """The prompt for class ``label`` with template number ``template`` (taken modulo the count)."""
    if not 0 <= int(label) < len(PROMPT_NAMES):
        raise ValueError(f"label must be in 0..{len(PROMPT_NAMES) - 1}, got {label}")
    name = PROMPT_NAMES[int(label)]
    return TEMPLATES[int(template) % len(TEMPLATES)].format(article=article(name), name=name)


def to_model_space(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 3, 32, 32) in [-1, 1], padded with the background (-1)."""
    x = torch.as_tensor(np.array(images, dtype=np.float32)).div(127.5).sub(1.0)  # (N, 28, 28)
    pad = (IMAGE_SIZE - x.shape[-1]) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)  # (N, 32, 32)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 32, 32)


class FashionMNIST(Dataset):
    """Fashion-MNIST as ``(image, prompt)`` pairs for text-to-image training.

    ``image`` is a float tensor (3, 32, 32) in [-1, 1]; ``prompt`` cycles through the templates
    by index, so the dataset is deterministic. ``raw`` gives the uint8 (N, 28, 28) images
    (for FID reference statistics) and ``labels`` the class indices.
    """

    def __init__(self, split: Literal["train", "test"] = "train", root: str | Path | None = None):
        self.raw, self.labels = load_fashion_mnist(split, root)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, str]:
        image = to_model_space(self.raw[idx: idx + 1])[0]
        return image, prompt_for(int(self.labels[idx]), template=idx)


# --- the words an offline CLIP tokenizer must hold whole ------------------------------------

def prompt_words() -> list[str]:
    """Every word that can appear in a prompt."""
    # CLIP's pre-tokenizer splits "t-shirt" into "t", "-", "shirt", so split the same way.
    text = " ".join([t.replace("{article}", "a an").replace("{name}", "") for t in TEMPLATES] + list(PROMPT_NAMES))
    return sorted(set(re.findall(r"[a-z]+|[^a-z\s]", text)))


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 16):
    """The offline CLIP tokenizer (`tsm_core.data.tokenizer`) holding every prompt word whole."""
    from .tokenizer import write_clip_tokenizer as write

    return write(folder, prompt_words(), model_max_length)
