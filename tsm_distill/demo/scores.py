"""Scores beyond FID-to-real for tsm-demo's students: distillation fidelity and the DMD-only students.

The demo's headline is FID against real Fashion-MNIST test images. The students (41.7-53.1 FID) beat the
teacher's own 50-step FID (54.0), so that score measures the GAN term on real images as much as the
distillation. Two more views of every student:

* **Fidelity to the teacher** (``fid_teacher``, ``kid_teacher`` on each student row): FID/KID against
  ``n`` samples of the teacher at 50 DDIM steps with the distillation's guidance. The teacher samples use
  the evaluation prompts with seeds ``TEACHER_SEED_OFFSET + i``, disjoint from the students' seeds ``i``:
  an independent draw of the teacher's distribution, so a student is not rewarded for reproducing the
  teacher's image from the same noise. Their Inception features are computed once and cached beside
  ``reference.json`` (``teacher_features.npz``, keyed by the teacher's UNet hash, N, steps and guidance).
* **DMD-only students** (rows ``lora_dmd_only``, ``tsm_stage1_dmd_only``): each student as it stood at the
  end of its last training without the GAN loss: LoRA from its non-GAN phase adapter; TSM with every expert
  taken from the adapter of the phase that last trained it without the GAN (A.3 trains each expert
  without, then with, the GAN), scored like the final students (against real images and the teacher).

``python -m tsm_distill.demo.scores SEED_DIR [...]`` adds both to finished seeds (tsm-demo does it for its
own runs); it rewrites results.json and results.md in place, keeping every other row.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from . import eval as ev
from .results import ROW_NAMES, is_complete, keyed_rows, read_results, trained_students

TEACHER_SEED_OFFSET = 1_000_000
TEACHER_FEATURES_NAME = "teacher_features.npz"
TEACHER_STEPS = 50
DMD_ONLY = {"lora": "lora_dmd_only", "tsm_stage1": "tsm_stage1_dmd_only"}
"""The student each DMD-only row is taken from."""


# ---------------------------------------------------------------------------- the teacher's distribution
def teacher_features(extractor, teacher_path: str | Path, n: int, steps: int = TEACHER_STEPS,
                     cache: str | Path | None = None, device="cpu") -> tuple[np.ndarray, str]:
    """Inception features of ``n`` teacher samples (``steps`` DDIM steps, the demo's CFG), and their source.

    Read from ``cache`` (default ``<teacher>/teacher_features.npz``) when it was made for this teacher UNet,
    step count and guidance with at least ``n`` images; else computed (minutes on a CPU) and written there.
    """
    from ..teacher import load_teacher

    teacher_path = Path(teacher_path)
    cache = Path(cache) if cache is not None else teacher_path / TEACHER_FEATURES_NAME
    want = {"unet_sha256": ev.unet_hash(teacher_path), "steps": steps, "guidance": ev.GUIDANCE,
            "seed_offset": TEACHER_SEED_OFFSET, "mode": ev.FEATURE_MODE}
    # The shipped teacher's features ship beside it; a run's teacher copy (tsm-demo copies it without
    # *.npz files) finds them there when its UNet is the shipped one.
    for candidate in (cache, ev.DEFAULT_TEACHER / TEACHER_FEATURES_NAME):
        if candidate.is_file():
            with np.load(candidate, allow_pickle=False) as data:
                feats, meta = data["features"], json.loads(str(data["meta"]))
            if all(meta.get(k) == v for k, v in want.items()) and len(feats) >= n:
                return feats[:n].astype(np.float32), f"cache {candidate}"
    prompts, seeds = ev.eval_prompts(n, seed_offset=TEACHER_SEED_OFFSET)
    teacher = load_teacher(teacher_path).to(device)
    images = ev.teacher_generate(teacher, prompts, seeds, steps)
    # Rounded through float16 as the cache stores them, so cached and computed features score alike.
    feats = ev.image_features(extractor, ev.to_uint8(images)).astype(np.float16)
    meta = dict(want, n=int(n), dtype="float16",
                what=f"Inception features of the teacher's samples at {steps} DDIM steps: eval_prompts(n) with "
                     f"seeds {TEACHER_SEED_OFFSET} + i")
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez_compressed(tmp, features=feats, meta=np.array(json.dumps(meta)))
    os.replace(tmp, cache)
    return feats.astype(np.float32), f"computed ({n} samples), cached in {cache}"


def fidelity(features: np.ndarray, teacher_feats: np.ndarray) -> dict:
    """``fid_teacher`` and ``kid_teacher`` of a student's features against the teacher's samples."""
    s = ev.score_row(features, teacher_feats)
    return {"fid_teacher": s["fid"], "kid_teacher": s["kid_mean"]}


# ---------------------------------------------------------------------------- the DMD-only students
def _phases(run: Path) -> list[tuple[Path, object]]:
    """(phase adapter folder, PhaseConfig) of a finished student run, in training order."""
    from tsm_core.train.recipe import load_recipe

    from ..config import DistillRecipe

    recipe = load_recipe(run / "recipe.yaml", DistillRecipe)
    out = []
    for i, ph in enumerate(recipe.phases):
        folder = run / "phases" / f"{i:02d}_{ph.name}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: {run} did not finish, or predates phase adapters")
        out.append((folder, ph))
    return out


def stage1_adapter(run: Path) -> Path:
    """The adapter of a run's last foster phase: the TSM stage-1 student (every expert fostered)."""
    fostered = [folder for folder, ph in _phases(run) if ph.type == "foster"]
    if not fostered:
        raise ValueError(f"{run} has no foster phase")
    return fostered[-1]


def dmd_only_adapter(run: str | Path, out: str | Path) -> Path:
    """Write the run's DMD-only student to ``out``: the last foster phase's adapter with every expert
    replaced by its tensors from the last phase that trained it *without* the GAN loss.

    Raises:
        ValueError: an expert of the student was never trained without the GAN.
    """
    from tsm_core.serialization import ADAPTER_FILE, atomic_save_file, read_adapter_file

    run = Path(run)
    phases = _phases(run)
    fostered = [(folder, ph) for folder, ph in phases if ph.type == "foster"]
    tensors, meta = read_adapter_file(stage1_adapter(run))
    scale = fostered[-1][1].scale
    source: dict[int, Path] = {}  # expert -> the adapter of the last non-GAN phase that trained it
    for folder, ph in fostered:
        if ph.scale == scale and not ph.gan:
            for e in (ph.experts if ph.experts is not None else range(scale)):
                source[e] = folder
    missing = sorted(set(range(scale)) - set(source))
    if missing:
        raise ValueError(f"{run}: expert(s) {missing} of scale {scale} were never trained without the GAN; "
                         "the student has no DMD-only state")
    for e, folder in source.items():
        theirs, _ = read_adapter_file(folder)
        for key in tensors:
            if key.endswith(f".s{scale}_e{e}"):
                tensors[key] = theirs[key]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_file(tensors, out / ADAPTER_FILE, meta)
    return out


def student_adapters(seed_dir: str | Path, students=("lora", "tsm_stage1", "tsm_stage2")) -> dict[str, Path]:
    """The adapters of a finished tsm-demo seed's ``students``, by seeds.json key."""
    seed_dir = Path(seed_dir)
    where = {"lora": lambda: seed_dir / "lora" / "adapter", "tsm_stage1": lambda: stage1_adapter(seed_dir / "tsm"),
             "tsm_stage2": lambda: seed_dir / "tsm" / "adapter"}
    return {k: where[k]() for k in students}


# ---------------------------------------------------------------------------- one seed
def score_seed(seed_dir: str | Path, extractor=None, device="cpu", teacher_cache: str | Path | None = None,
               features: dict[str, np.ndarray] | None = None) -> dict:
    """Add fidelity scores to every student row of a finished seed and its DMD-only rows; returns results.

    ``features``: Inception features of students already sampled (by seeds.json key), e.g. by tsm-demo's own
    evaluation, which are then not sampled again.
    """
    from tsm_core.train.recipe import load_recipe

    from ..config import DistillRecipe
    from . import report as rep
    from .eval import student_images

    seed_dir = Path(seed_dir)
    results = read_results(seed_dir)
    if not is_complete(results):
        raise FileNotFoundError(f"{seed_dir / 'results.json'} holds no finished seed (run tsm-demo first)")
    rows = keyed_rows(results)
    trained = trained_students(results)  # all three, or LoRA alone (--students lora)
    extractor = extractor or ev.make_extractor(device=device)
    teacher = seed_dir / "teacher"
    n = int(results["n"])
    ref_feats, _ = ev.reference_features(extractor, int(results.get("n_reference", 1000)))
    teacher_feats, teacher_source = teacher_features(extractor, teacher, n, cache=teacher_cache, device=device)
    prompts, seeds = ev.eval_prompts(n)
    recipe_ts = list(load_recipe(seed_dir / "lora" / "recipe.yaml", DistillRecipe).student_timesteps)
    adapters = student_adapters(seed_dir, trained)
    for key, dmd_key in DMD_ONLY.items():
        if key in trained:
            run = seed_dir / ("lora" if key == "lora" else "tsm")
            adapters[dmd_key] = dmd_only_adapter(run, run / "dmd_only")
    new_rows = []
    for key, adapter in adapters.items():
        feats = (features or {}).get(key)
        if feats is None:
            imgs = student_images(teacher, adapter, prompts, seeds, recipe_ts, desc=f"sample {key}", device=device)
            feats = ev.image_features(extractor, ev.to_uint8(imgs))
        if key in rows:  # a final student: its row gains the fidelity columns
            rows[key].update(fidelity(feats, teacher_feats))
        else:
            new_rows.append(dict(ev.score_row(feats, ref_feats), **fidelity(feats, teacher_feats),
                                 row=ROW_NAMES[key], steps=len(recipe_ts), source="this run (scores.py)",
                                 generator_steps=None))
    kept = [r for r in results["rows"] if r.get("row") not in {ROW_NAMES[k] for k in DMD_ONLY.values()}]
    results["rows"] = kept + new_rows
    results["fidelity"] = {"teacher_steps": TEACHER_STEPS, "teacher_seed_offset": TEACHER_SEED_OFFSET,
                           "teacher_features": teacher_source, "definition": __doc__.split("* ")[1].strip()}
    meta = {k: v for k, v in results.items() if k != "rows"}
    rep.write_results(seed_dir, results["rows"], meta)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_distill.demo.scores SEED_DIR [...]``: fidelity and DMD-only scores of finished seeds."""
    p = argparse.ArgumentParser(prog="python -m tsm_distill.demo.scores", description=__doc__.splitlines()[0])
    p.add_argument("seed_dirs", nargs="+", help="finished tsm-demo seed folders (results.json, lora/, tsm/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-cache", default=None,
                   help=f"the teacher features file (default: {TEACHER_FEATURES_NAME} in each seed's teacher copy)")
    args = p.parse_args(argv)
    restore = ev.limit_threads(args.threads) if args.threads else (lambda: None)
    try:
        device = ev.resolve_device(args.device)
        extractor = ev.make_extractor(device=device)
        for d in args.seed_dirs:
            rows = keyed_rows(score_seed(d, extractor, device, args.teacher_cache))
            print(f"{d}: " + ", ".join(f"{k} FID {r['fid']:.2f} (vs teacher {r['fid_teacher']:.2f})"
                                       for k, r in rows.items() if "fid_teacher" in r))
    finally:
        restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
