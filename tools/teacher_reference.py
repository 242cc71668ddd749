"""Compute ``reference.json`` for the embedded teacher: the floor and teacher rows of ``tsm-demo``.

    python tools/teacher_reference.py --n 1000 50 [--teacher DIR] [--steps 50] [--n-ref 1000]

Images are generated once for the largest N; each smaller N is scored on the first N of them, so
the rows equal what ``tsm-demo --n N`` would compute itself. The Inception features of the first
``--n-ref`` Fashion-MNIST test images (the FID reference, independent of the teacher) are cached in
``tsm_distill/assets/fmnist_test_features.npz`` (float16) and reused.

reference.json records the UNet weight hash, so the demo ignores it once the teacher is re-exported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsm_distill.demo import eval as ev  # noqa: E402


def compute(teacher_dir: Path, ns: list[int], steps: int, n_ref: int, features_cache: Path) -> dict:
    """The reference.json record: floor, teacher-``steps`` and teacher-4 rows for every N in ``ns``."""
    from tsm_distill.teacher import load_teacher

    extractor = ev.make_extractor()
    seconds = {}
    start = time.perf_counter()
    ref, source = ev.reference_features(extractor, n_ref, features_cache)
    if source.startswith("computed"):
        ev.save_test_features(ref, features_cache)
        print(f"wrote {features_cache}")
    seconds["reference_features"] = round(time.perf_counter() - start, 2)
    n_max = max(ns)
    teacher_hash = ev.unet_hash(teacher_dir)
    teacher = load_teacher(teacher_dir)
    prompts, seeds = ev.eval_prompts(n_max)
    feats = {}
    start = time.perf_counter()
    feats["floor"] = ev.image_features(extractor, ev.real_train_images(n_max))
    seconds["floor"] = round(time.perf_counter() - start, 2)
    for key, s in (("teacher_full", steps), ("teacher_few", 4)):
        start = time.perf_counter()
        images = ev.teacher_generate(teacher, prompts, seeds, s)
        feats[key] = ev.image_features(extractor, ev.to_uint8(images))
        seconds[key] = round(time.perf_counter() - start, 2)
    if ev.unet_hash(teacher_dir) != teacher_hash:
        raise RuntimeError(f"{teacher_dir} was re-exported while this ran; run again (or on a copy of it)")
    rows = {}
    for n in sorted(set(ns)):
        # The floor uses a random subset of train images; for smaller N re-draw it the way the demo does.
        floor = feats["floor"] if n == n_max else ev.image_features(extractor, ev.real_train_images(n))
        rows[str(n)] = {"floor": ev.score_row(floor, ref)}
        for key, s in (("teacher_full", steps), ("teacher_few", 4)):
            rows[str(n)][key] = dict(ev.score_row(feats[key][:n], ref), steps=s)
    info_file = teacher_dir / "teacher_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return {"unet_sha256": teacher_hash, "teacher_step": info.get("step"), "n_reference": n_ref,
            "reference_features_sha256": ev.features_hash(ref), "guidance": ev.GUIDANCE,
            "protocol": "tsm_distill.demo.eval: eval_prompts(N), DDIM trailing + CFG for the teacher, 28x28 grey "
                        "crops, clean-mode Inception, FID/KID vs the first n_reference Fashion-MNIST test images",
            "rows": rows, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, compute and write reference.json (atomically)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, default=ev.DEFAULT_TEACHER)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 50], help="images per row; one set of rows per N")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the full teacher row")
    p.add_argument("--n-ref", type=int, default=1000, help="Fashion-MNIST test images in the reference")
    p.add_argument("--features-cache", type=Path, default=ev.TEST_FEATURES)
    p.add_argument("--out", type=Path, default=None, help="default: TEACHER/reference.json")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared CPU); 0 = default")
    args = p.parse_args(argv)
    if min(args.n) < 10:
        raise ValueError(f"--n values must be at least 10, got {args.n}")
    if args.threads:
        ev.limit_threads(args.threads)
    record = compute(args.teacher, args.n, args.steps, args.n_ref, args.features_cache)
    out = args.out or args.teacher / ev.REFERENCE_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(record["rows"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
