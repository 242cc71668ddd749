"""Prompt and real-image sources for distillation, sampled with an explicit generator.

Batches are drawn by index with a ``torch.Generator`` whose state lives in the checkpoint, so a
resumed run sees exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

BUILTIN_FMNIST = "builtin:fmnist"


class PromptSource:
    """Prompts from a .txt/.jsonl file, the captions of webdataset shards (``*.tar`` pattern), or the
    Fashion-MNIST class prompts (``builtin:fmnist``)."""

    def __init__(self, spec: str):
        if not spec:
            raise ValueError("data.prompts is empty: give a prompt file (.txt or .jsonl) or 'builtin:fmnist'")
        if spec == BUILTIN_FMNIST:
            from tsm_core.data.fmnist import CLASS_NAMES, TEMPLATES, prompt_for

            self.prompts = [prompt_for(c, k) for c in range(len(CLASS_NAMES)) for k in range(len(TEMPLATES))]
        elif ".tar" in spec:
            self.prompts = _shard_captions(spec)
        else:
            from tsm_core.data.images import read_prompts

            self.prompts = read_prompts(spec)

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]


def _shard_captions(spec: str) -> list[str]:
    """Every caption of webdataset shards (``shard_caption``: txt, or json text/prompt/caption), images
    not decoded; samples without one are left out."""
    import webdataset as wds

    from tsm_core.data.images import expand_shards, shard_caption

    captions = []
    for sample in wds.WebDataset(expand_shards(spec), shardshuffle=False):
        try:
            captions.append(shard_caption(sample))
        except ValueError:
            continue
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"the shards {spec!r} hold no captions (txt, or json with text/prompt/caption)")
    return captions


class RealSource:
    """Real samples in model space (VAE latents, or pixels for a pixel-space teacher) for D, with captions.

    ``spec`` is a latent cache (``.pt`` tensor or ``.safetensors`` with key ``latents``), ``builtin:fmnist``,
    an image folder with ``metadata.jsonl``, or webdataset shards (``*.tar`` pattern). Folders and
    shards are VAE-encoded on the fly by ``encode(pixels, generator)`` (the teacher's ``encode_images``),
    which draws a sample of the VAE posterior, as DMD2 does, not its mean; ``encode_batch`` images per call
    (the recipe's ``data.encode_batch``: the encoder's activations grow with the batch, its output does not).

    D is text-conditional (DMD2 scores each real image with its own caption), so :meth:`sample` returns
    the captions too: the folder's ``metadata.jsonl`` text, the shards' ``txt``/``json`` caption, the
    class prompt for ``builtin:fmnist``. A latent cache holds no captions: its images are scored with
    the empty prompt ``""``, and a warning says so once, when the source is built.
    """

    def __init__(self, spec: str, resolution: int, encode=None, encode_batch: int = 4):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1 (real images per VAE encode call), got {encode_batch}")
        self.cache: torch.Tensor | None = None
        self.captions: list[str] | None = None
        self._iter = None
        self.encode = encode
        self.encode_batch = encode_batch
        if spec == BUILTIN_FMNIST:
            from tsm_core.data.fmnist import load_fashion_mnist, prompt_for, to_model_space

            images, labels = load_fashion_mnist("train")
            self.cache = to_model_space(images)
            # The same caption the teacher was trained with for image i (FashionMNIST dataset's rule).
            self.captions = [prompt_for(int(c), template=i) for i, c in enumerate(labels)]
            return
        path = Path(spec)
        if spec.endswith((".pt", ".safetensors")):
            if not path.exists():
                raise FileNotFoundError(f"real-latent cache {path} does not exist")
            if spec.endswith(".pt"):
                self.cache = torch.load(path, map_location="cpu", weights_only=True)
            else:
                from safetensors.torch import load_file

                self.cache = load_file(path)["latents"]
            if self.cache.ndim != 4 or len(self.cache) == 0:
                raise ValueError(f"{path} must hold a non-empty (N, C, H, W) tensor, got {tuple(self.cache.shape)}")
            warnings.warn(
                f"real-latent cache {path} has no captions: D scores its real images with the empty prompt \"\" "
                "(DMD2 uses each image's own caption). Give an image folder with metadata.jsonl or caption "
                "shards instead to condition D on the real captions.", stacklevel=2)
            return
        if ".tar" in spec:
            from tsm_core.data.images import webdataset_image_text

            self.dataset = webdataset_image_text(spec, resolution, shuffle=1000)
        else:
            from tsm_core.data.images import ImageTextFolder

            self.dataset = ImageTextFolder(spec, resolution)
        if encode is None:
            raise ValueError("image folders and shards need an encoder (the teacher's VAE) to make latents")
        self._check_readable(spec, resolution)

    def _check_readable(self, spec: str, resolution: int) -> None:
        """Read one real sample now, so a source that cannot give any (shards whose samples lack an image
        or a caption, a folder none of whose images decode) is a clear error when the trainer is built,
        not a traceback at the first GAN step. Shards are read through a separate unshuffled copy, so
        the training stream starts where it would have."""
        from tsm_core.data.images import describe_shards, webdataset_image_text

        if isinstance(self.dataset, torch.utils.data.IterableDataset):
            probe = webdataset_image_text(spec, resolution, shuffle=0)
            if next(iter(probe), None) is None:
                raise ValueError(f"data.real_images {spec}: no real sample could be read; each needs an image "
                                 f"(jpg/png/webp) and a caption (txt, or json with text/prompt/caption); "
                                 f"{describe_shards(probe)}")
            return
        try:
            self.dataset[0]  # skips undecodable images; raises only when none decodes
        except RuntimeError as e:
            raise ValueError(f"data.real_images {spec}: {e}") from e

    def sample(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, list[str]]:
        """``n`` real samples in model space and their captions (``""`` for a cache without captions).

        Caches and image folders are indexed with ``generator`` (the trainer's per-iteration, per-process
        generator), so a resumed run draws exactly the batches the uninterrupted run would have; the
        VAE posterior sample is drawn with it too. Shards are a stream: they are read in their shuffled
        order, and a resumed run restarts it.
        """
        if self.cache is not None:
            idx = torch.randint(len(self.cache), (n,), generator=generator)
            captions = [self.captions[i] for i in idx.tolist()] if self.captions is not None else [""] * n
            return self.cache[idx].to(device), captions
        from tsm_core.data.images import collate_image_text, describe_shards, infinite

        if not isinstance(self.dataset, torch.utils.data.IterableDataset):  # an image folder: random access
            idx = torch.randint(len(self.dataset), (n,), generator=generator)
            batch = collate_image_text([self.dataset[int(i)] for i in idx])
        else:
            if self._iter is None:
                # One sample at a time, batched here: phases may ask for different batch sizes (a loader
                # built with the first call's batch size would keep it).
                loader = torch.utils.data.DataLoader(self.dataset, batch_size=None)
                self._iter = infinite(loader, lambda: describe_shards(self.dataset))
            batch = collate_image_text([next(self._iter) for _ in range(n)])
        # In chunks, one after the other from the same generator: a resumed run draws the same posterior samples.
        pixels = batch["pixel_values"].to(device)
        latents = torch.cat([self.encode(chunk, generator) for chunk in pixels.split(self.encode_batch)])
        return latents, list(batch["text"])
