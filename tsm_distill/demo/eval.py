"""Evaluation pieces of ``tsm-demo``: the fixed prompt/seed set, teacher sampling, FID/KID rows, references.

Protocol (every row uses it, so rows compare):

* images: the first ``n`` (prompt, seed) pairs of :func:`eval_prompts` (classes cycle, seeds count up);
* generated 3x32x32 images are cropped to the 28x28 centre (the teacher's training padding) and
  averaged over channels, so they are the same kind of image as the Fashion-MNIST files;
* reference: Inception features (clean-fid "clean" mode) of the first ``n_ref`` Fashion-MNIST test
  images, cached teacher-independently in ``assets/fmnist_test_features.npz``;
* FID and KID from ``tsm_core.eval.metrics`` (clean-fid's arithmetic).

The teacher rows (50-step and 4-step DDIM with the same classifier-free guidance the distillation's
real score uses) are slow, so ``tools/teacher_reference.py`` stores them in ``reference.json`` next
to the teacher, keyed by a hash of the UNet weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# tsm-demo's --device. Sampling noise is drawn on the CPU from each image's seed on every device, so the
# rows of a GPU run start from the same noise as a CPU run's; the numbers differ only by float rounding.
from tsm_core.eval.features import resolve_device  # noqa: F401
from tsm_core.eval.metrics import fid_low_rank, score_row  # noqa: F401  (re-exported: the demo's scores)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_TEACHER = ASSETS / "fmnist_teacher"
TEST_FEATURES = ASSETS / "fmnist_test_features.npz"
REFERENCE_NAME = "reference.json"
GUIDANCE = 1.75  # the recipes' train.real_guidance_scale: the teacher the students are distilled from
FEATURE_MODE = "clean"


def limit_threads(n: int):
    """Use ``n`` threads in torch and in numpy's BLAS (the FID SVD); returns a function that restores them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # only a speed matter: BLAS then keeps its default thread count
        limiter = None
    else:
        limiter = threadpool_limits(n)

    def restore() -> None:
        torch.set_num_threads(before)
        if limiter is not None:
            limiter.restore_original_limits()
    return restore


def unet_hash(teacher_dir: str | Path) -> str:
    """Short sha256 of the teacher's UNet weight file: identifies the teacher version in reference.json."""
    path = Path(teacher_dir) / "unet" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {teacher_dir} is not a diffusers pipeline with a UNet")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def eval_prompts(n: int, seed_offset: int = 0) -> tuple[list[str], list[int]]:
    """The evaluation set: prompt i is class i % 10 (template (i // 10) % 3), seed i + seed_offset."""
    from tsm_core.data.fmnist import prompt_for

    return [prompt_for(i % 10, i // 10) for i in range(n)], [i + seed_offset for i in range(n)]


@torch.no_grad()
def teacher_generate(teacher, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                     guidance: float = GUIDANCE, batch_size: int = 64, progress_desc: str | None = None) -> torch.Tensor:
    """The undistilled teacher: DDIM (eta 0, "trailing" spacing, so the first step is t = 999) with CFG.

    Returns images in [-1, 1], (N, C, H, W). The initial noise of each image comes from its own seed,
    exactly as :func:`tsm_distill.sampler.generate` draws it, so rows share their starting noise.
    """
    from diffusers import DDIMScheduler
    from tqdm import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance <= 1.0:
        raise ValueError(f"the teacher rows use classifier-free guidance; guidance must be > 1, got {guidance}")
    shape = teacher.noise_shape(1, teacher.latent_size)[1:]
    out = []
    batches = range(0, len(prompts), batch_size)
    bar = tqdm(total=len(batches), desc=progress_desc or f"teacher {steps} steps", disable=progress_desc == "")
    for i in batches:
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in ss])
        # The teacher's own DDIM config (set_alpha_to_one as its scheduler says), not `sampling_scheduler`'s
        # SD-pipeline default: the committed teacher reference rows were measured with it.
        sched = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing")
        out.append(teacher.sample(ps, steps=steps, guidance_scale=guidance, noise=x, scheduler=sched).float().cpu())
        bar.update(1)
    bar.close()
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model images (N, C, 32, 32) in [-1, 1] -> (N, 28, 28) uint8 grey, like the Fashion-MNIST files."""
    from tsm_core.data.fmnist import IMAGE_SIZE

    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    pad = (images.shape[-1] - 28) // 2 if images.shape[-1] == IMAGE_SIZE else 0
    x = images[..., pad:images.shape[-2] - pad, pad:images.shape[-1] - pad].float().mean(1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def make_extractor(progress: bool = True, device: str | torch.device = "cpu"):
    """The clean-mode Inception extractor every row uses (the same network and preprocessing on any device)."""
    from tsm_core.eval import FeatureExtractor

    return FeatureExtractor(device=device, mode=FEATURE_MODE, batch_size=50, progress=progress, allow_download=False)


def image_features(extractor, images_uint8: np.ndarray) -> np.ndarray:
    """N x 2048 float32 Inception features of uint8 (N, H, W) images."""
    return extractor.features_from_images(list(images_uint8), on_error="raise").features.astype(np.float32)


def features_hash(features: np.ndarray) -> str:
    """Short sha256 of a feature array (records which reference a score was computed against)."""
    a = np.ascontiguousarray(features)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]


def reference_features(extractor, n_ref: int, cache: str | Path | None = TEST_FEATURES) -> tuple[np.ndarray, str]:
    """Features of the first ``n_ref`` Fashion-MNIST test images, and where they came from.

    Read from ``cache`` when it holds at least ``n_ref`` images (stored as float16 to keep the
    package small; cast back to float32), else computed (about 0.1-0.4 s per image on a CPU).
    """
    if n_ref < 2:
        raise ValueError(f"the reference needs at least 2 test images, got n_ref={n_ref}")
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as data:
            feats, meta = data["features"], json.loads(str(data["meta"]))
        if meta.get("mode") == FEATURE_MODE and meta.get("split") == "test" and len(feats) >= n_ref:
            return feats[:n_ref].astype(np.float32), f"cache {cache}"
    from tsm_core.data.fmnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    if n_ref > len(images):
        raise ValueError(f"n_ref={n_ref} exceeds the {len(images)} Fashion-MNIST test images")
    # Round through float16 like the cache does, so cached and computed references give equal scores.
    feats = image_features(extractor, images[:n_ref]).astype(np.float16).astype(np.float32)
    return feats, "computed from the Fashion-MNIST test split"


def save_test_features(features: np.ndarray, path: str | Path = TEST_FEATURES) -> Path:
    """Write the test-set reference features (float16) with their protocol, atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"split": "test", "first_n": int(len(features)), "mode": FEATURE_MODE, "dtype": "float16",
            "what": "Inception (FID 2015-12-05) features of the first first_n Fashion-MNIST test images, 28x28"}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, features=features.astype(np.float16), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path


def real_train_images(n: int, seed: int = 0) -> np.ndarray:
    """``n`` Fashion-MNIST train images (a fixed random subset): the floor row."""
    from tsm_core.data.fmnist import load_fashion_mnist

    images, _ = load_fashion_mnist("train")
    idx = np.random.RandomState(seed).choice(len(images), n, replace=False)
    return images[np.sort(idx)]


def read_reference_rows(path: str | Path, teacher_hash: str, n: int, n_ref: int, ref_hash: str) -> tuple[dict | None, str]:
    """Rows stored by tools/teacher_reference.py for this teacher, N and reference, or (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, f"{path} does not exist"
    data = json.loads(path.read_text())
    if data.get("unet_sha256") != teacher_hash:
        return None, f"{path} was computed for teacher UNet {data.get('unet_sha256')}, this teacher is {teacher_hash}"
    if data.get("n_reference") != n_ref or data.get("reference_features_sha256") != ref_hash:
        return None, f"{path} used another reference set (n_ref {data.get('n_reference')}, this run {n_ref})"
    rows = data.get("rows", {}).get(str(n))
    if not rows:
        return None, f"{path} has no rows for N={n} (it has N in {sorted(data.get('rows', {}), key=int)})"
    return rows, f"read from {path}"


def student_images(teacher_path: Path, adapter: Path, prompts, seeds, timesteps, desc: str,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Images of a trained student (the adapter's saved mode) for the given prompts and seeds."""
    from ..trainer import load_student

    return student_images_of(*load_student(teacher_path, adapter, device), prompts, seeds, timesteps, desc)


def student_images_of(teacher, tsm, prompts, seeds, timesteps, desc: str) -> torch.Tensor:
    """Images of a loaded student (teacher parts, adapter in its mode) for the given prompts and seeds."""
    from tqdm import tqdm

    from ..sampler import generate

    chunk = 100
    out = [generate(teacher, tsm, prompts[i:i + chunk], seeds[i:i + chunk], timesteps, batch_size=50)
           for i in tqdm(range(0, len(prompts), chunk), desc=desc)]
    return torch.cat(out)
