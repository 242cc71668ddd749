#!/usr/bin/env python
"""FID / KID (clean-fid numbers, offline Inception weights) for folders, shards and generated images.

Subcommands (all logic lives in tsm_core.eval; this file only parses arguments):

  stats     SOURCE --out ref.npz          reference statistics (+ features for KID) with metadata
  score     SOURCE --ref REF              FID/KID of a folder/shards against a folder/shards/.npz
  generate  --pipeline DIR --prompts F    images from a diffusers pipeline (to a folder and/or scored)
  coco      --captions J --val-dir D      the COCO-2014 30K protocol (DMD2: crop + Lanczos 256, clean mode)

SOURCE is an image folder, webdataset shards (x.tar, "shards-{000..009}.tar", "dir/*.tar") or a
built-in dataset ("fashion-mnist:test"). Results: JSON on stdout (and --json FILE), one summary line
on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tsm_core.eval import coco as coco_lib
from tsm_core.eval import generate as gen_lib
from tsm_core.eval.clip_score import SKIPPED, clip_score_folder, find_clip_weights
from tsm_core.eval.evaluate import compute_reference, load_reference, score, score_features
from tsm_core.eval.features import FeatureExtractor
from tsm_core.eval.preprocess import MODES
from tsm_core.eval.sources import folder_items
from tsm_core.train.storage import check_output_path


def _add_extractor_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature extraction")
    g.add_argument("--mode", choices=MODES, default="clean",
                   help="clean-fid preprocessing: clean = PIL bicubic float resize (default); legacy_* as clean-fid")
    g.add_argument("--resolution", type=int, default=None,
                   help="center-crop and Lanczos-resize images to this side before Inception (DMD2 COCO: 256)")
    g.add_argument("--batch-size", type=int, default=32, help="images per Inception call")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--workers", type=int, default=None, help="decode/resize threads (0 = main thread)")
    g.add_argument("--weights", default=None, help="explicit Inception TorchScript file")
    g.add_argument("--no-download", action="store_true", help="never try clean-fid's weight download")
    g.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable images: skip and count them (default) or stop with an error")
    g.add_argument("--limit", type=int, default=None, help="use only the first N images of a source")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--json", default=None, help="also write the JSON result to this file")


def _extractor(args, pre_resize=None) -> FeatureExtractor:
    return FeatureExtractor(device=args.device, mode=args.mode, batch_size=args.batch_size, workers=args.workers,
                            pre_resize=pre_resize if pre_resize is not None else args.resolution,
                            weights_path=args.weights, allow_download=not args.no_download,
                            progress=not args.quiet)


def _emit(result: dict, summary: str, args) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(summary, file=sys.stderr)


def cmd_stats(args) -> int:
    ext = _extractor(args)
    ref = compute_reference(args.source, ext, on_error=args.on_error, keep_features=not args.no_features,
                            limit=args.limit)
    path = ref.save(args.out)
    meta = dict(ref.meta(), path=str(path), weights=ext.weights_origin)
    _emit(meta, f"saved {ref.n_images} images' statistics ({ref.mode}, resolution {ref.resolution}, "
                f"{ref.network}) to {path} [hash {ref.hash}]", args)
    return 0


def _clip_note(args) -> str:
    return SKIPPED if find_clip_weights(getattr(args, "clip_weights", None)) is None else \
        "skipped: CLIP score needs captions (use generate/coco with --out-dir)"


def cmd_score(args) -> int:
    ext = _extractor(args)
    result = score(args.source, args.ref, ext, on_error=args.on_error, kid_seed=args.kid_seed, limit=args.limit)
    result.clip_score = _clip_note(args)
    print(result.clip_score, file=sys.stderr)
    _emit(result.to_dict(), result.summary(), args)
    return 0


def _load_pipe(args):
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    return gen_lib.load_pipeline(args.pipeline, device=args.device, dtype=dtype, adapter=args.adapter, lora=args.lora)


def _generate_and_score(args, prompts, ext: FeatureExtractor | None, ref) -> dict:
    """Generate to --out-dir and/or straight to features; score against ``ref`` when given."""
    pipe = _load_pipe(args)
    gen_kwargs = dict(seed=args.seed, steps=args.steps, batch_size=args.gen_batch_size,
                      guidance_scale=args.guidance_scale, size=args.size, progress=not args.quiet)
    out: dict = {"n_images": args.n, "seed": args.seed, "steps": args.steps, "pipeline": str(args.pipeline)}
    if args.out_dir:
        gen_lib.generate_to_folder(pipe, args.out_dir, prompts, args.n, **gen_kwargs)
        out["out_dir"] = str(args.out_dir)
    if ext is None:
        return out
    if args.out_dir:
        fs = ext.features_from_items(folder_items(args.out_dir), total=args.n, on_error="raise")
    else:
        stream = gen_lib.iter_generated(pipe, prompts, args.n, **gen_kwargs)

        def make(n):  # FeatureExtractor asks for batches; hand it the next n images of the stream
            return [next(stream)[3] for _ in range(n)]

        fs = ext.features_from_generator(make, args.n, batch_size=args.gen_batch_size)
    if args.stats_out:
        from tsm_core.eval.reference import ReferenceStats

        gen_ref = ReferenceStats.from_features(fs.features, source=f"generated:{args.pipeline}", mode=ext.mode,
                                               resolution=ext.pre_resize, network=ext.network,
                                               image_size=fs.image_size, extra={"seed": args.seed, "steps": args.steps})
        out["stats_out"] = str(gen_ref.save(args.stats_out))
    if ref is not None:
        result = score_features(fs, ref)
        if args.out_dir and find_clip_weights(args.clip_weights) is not None:
            result.clip_score = clip_score_folder(args.out_dir, args.clip_weights, device=args.device)
        else:
            result.clip_score = _clip_note(args)
        out.update(result.to_dict())
        out["summary"] = result.summary()
    return out


def _add_generation_args(p: argparse.ArgumentParser, n_default: int | None) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--pipeline", required=True, help="diffusers StableDiffusionPipeline folder (or hub id)")
    g.add_argument("--adapter", default=None, help="TSM adapter folder (tsm_core.load_adapter)")
    g.add_argument("--lora", default=None, help="LoRA file/folder for pipe.load_lora_weights")
    g.add_argument("--n", type=int, default=n_default, required=n_default is None, help="number of images")
    g.add_argument("--steps", type=int, default=4, help="sampling steps")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (<= 1 disables CFG)")
    g.add_argument("--size", type=int, default=None, help="output side in pixels (default: the model's)")
    g.add_argument("--gen-batch-size", type=int, default=8, help="prompts per pipeline call")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    g.add_argument("--out-dir", default=None, help="write PNGs + prompts.jsonl here")
    g.add_argument("--stats-out", default=None, help="save the generated images' statistics (.npz)")
    g.add_argument("--clip-weights", default=None, help="local open_clip checkpoint for a CLIP score")


def cmd_generate(args) -> int:
    if not (args.out_dir or args.ref or args.stats_out):
        raise ValueError("generate needs somewhere to put the images: --out-dir, --ref (score) and/or --stats-out.")
    prompts = gen_lib.read_prompts(args.prompts)
    needs_features = bool(args.ref or args.stats_out)
    ext = _extractor(args) if needs_features else None
    ref = load_reference(args.ref, ext, on_error=args.on_error) if args.ref else None
    out = _generate_and_score(args, prompts, ext, ref)
    _emit(out, out.get("summary", f"wrote {args.n} images to {args.out_dir}"), args)
    return 0


def cmd_coco(args) -> int:
    ext = _extractor(args, pre_resize=coco_lib.COCO_RESOLUTION)
    if args.resolution not in (None, coco_lib.COCO_RESOLUTION):
        raise ValueError(f"The COCO protocol evaluates at {coco_lib.COCO_RESOLUTION}; drop --resolution.")
    ref = coco_lib.coco_reference(args.val_dir, ext, cache=args.ref_cache, on_error=args.on_error)
    if args.reference_only:
        _emit(ref.meta(), f"COCO reference: {ref.n_images} images [hash {ref.hash}]", args)
        return 0
    if args.pipeline is None:
        raise ValueError("coco needs --pipeline (or --reference-only to build the reference statistics).")
    prompts = (gen_lib.read_prompts(args.prompts) if args.prompts
               else coco_lib.select_coco_captions(args.captions, args.n, seed=args.caption_seed))
    if len(prompts) < args.n:
        raise ValueError(f"{len(prompts)} prompts for {args.n} images; the protocol uses one prompt per image.")
    out = _generate_and_score(args, prompts[:args.n], ext, ref)
    out["protocol"] = "coco2014-30k (DMD2: center crop + Lanczos 256, clean-fid clean mode)"
    _emit(out, out["summary"], args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="compute and cache reference statistics (.npz)")
    p.add_argument("source", help="image folder, shards, a folder of video clips (every frame) or built-in dataset")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--no-features", action="store_true", help="store mu/sigma only (no KID against this file)")
    _add_extractor_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("score", help="FID/KID of images against a reference")
    p.add_argument("source", help="image folder, shards, or a folder of video clips (per-frame FID) to evaluate")
    p.add_argument("--ref", required=True, help="reference folder, shards, built-in dataset or .npz")
    p.add_argument("--kid-seed", type=int, default=0, help="seed of KID's random subsets")
    p.add_argument("--clip-weights", default=None, help=argparse.SUPPRESS)
    _add_extractor_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("generate", help="images from a diffusers pipeline, to a folder and/or scored")
    p.add_argument("--prompts", required=True, help="prompt file: .txt lines, .json list / COCO captions, .jsonl")
    p.add_argument("--ref", default=None, help="score the images against this folder/shards/.npz")
    _add_generation_args(p, n_default=None)
    _add_extractor_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("coco", help="COCO-2014 30K FID protocol", description=coco_lib.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="annotations/captions_val2014.json")
    p.add_argument("--val-dir", required=True, help="the val2014 image folder (40,504 images)")
    p.add_argument("--ref-cache", default="coco2014_val_clean_256.npz", help="reference statistics cache (.npz)")
    p.add_argument("--prompts", default=None, help="a fixed prompt list (e.g. DMD2's) instead of drawing captions")
    p.add_argument("--caption-seed", type=int, default=2014, help="seed of the caption draw")
    p.add_argument("--reference-only", action="store_true", help="only build/check the reference statistics")
    _add_generation_args(p, n_default=coco_lib.COCO_N_PROMPTS)
    p.set_defaults(pipeline=None)
    for action in p._actions:  # --pipeline is optional with --reference-only
        if action.dest == "pipeline":
            action.required = False
    _add_extractor_args(p)
    p.set_defaults(func=cmd_coco)
    return parser


def check_outputs(args) -> None:
    """Refuse an output path that cannot be written before any scoring work (which can take hours).

    Raises:
        ValueError: the flag, the path and why (full, read-only, no permission, a file in the way).
    """
    files = {"--json": args.json, "--out": getattr(args, "out", None), "--stats-out": getattr(args, "stats_out", None)}
    cache = getattr(args, "ref_cache", None)
    if cache and not Path(cache).exists():  # an existing cache is only read
        files["--ref-cache"] = cache
    for flag, path in files.items():
        if path:
            check_output_path(path, flag)
    if getattr(args, "out_dir", None):
        check_output_path(args.out_dir, "--out-dir", directory=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors (an unwritable output path included) print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
