"""tsm-demo's command line: its options, the full and quick presets, and their checks.

Kept apart from `tsm_distill.demo.run` so the seed sweep (`tsm_distill.demo.seeds`) reads the same parser
without importing the run it starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import eval as ev
from .protocol import A3_LORA_BATCH_MULTIPLIER, PROTOCOLS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FULL = {"n": 1000, "n_ref": 1000, "budget": None, "router_steps": None, "fake_updates": None, "batch_size": None,
        "teacher_steps": 50, "budget_points": 3}
QUICK = {"n": 50, "n_ref": 1000, "budget": 16, "router_steps": 2, "fake_updates": 2, "batch_size": 8,
         "teacher_steps": 50, "budget_points": 3}


def build_parser() -> argparse.ArgumentParser:
    """tsm-demo's options (the seed sweep passes the non-default ones on to each seed's run)."""
    p = argparse.ArgumentParser(prog="tsm-demo", description="Distill the embedded Fashion-MNIST teacher into 4-step LoRA and TSM students, score them.")
    p.add_argument("--quick", action="store_true", help="tiny budgets and N=50: the whole pipeline in minutes, "
                   "not the quality claim")
    p.add_argument("--run-dir", default=None, help="output folder (default runs/tsm_demo or runs/tsm_demo_quick)")
    p.add_argument("--teacher", default=str(ev.DEFAULT_TEACHER), help="teacher pipeline folder")
    p.add_argument("--reference", default=None,
                   help="reference.json with the floor/teacher rows (default: next to the teacher); 'none' to compute")
    p.add_argument("--lora-recipe", default=str(RECIPES / "demo_fmnist_lora.yaml"))
    p.add_argument("--tsm-recipe", default=str(RECIPES / "demo_fmnist_tsm.yaml"))
    p.add_argument("--n", type=int, help="images per FID row (full 1000, quick 50)")
    p.add_argument("--n-ref", type=int, help="Fashion-MNIST test images in the FID reference (default 1000)")
    p.add_argument("--budget", type=int, help="generator steps of the LoRA run = of the TSM expert phases "
                   "(default: the recipes' own; quick 16)")
    p.add_argument("--router-steps", type=int, help="generator steps of the TSM router phase (default: the recipe's)")
    p.add_argument("--fake-updates", type=int, help="fake-score updates per generator update (default: the recipes')")
    p.add_argument("--batch-size", type=int, help="distillation batch size (default: the recipes'); the LoRA "
                   "student's is this times --lora-batch-multiplier")
    p.add_argument("--teacher-steps", type=int, help="DDIM steps of the full teacher row (default 50)")
    p.add_argument("--budget-points", type=int,
                   help="keep checkpoints of both students at every 1/K of the expert budget, for the budget "
                        "curve (default 3: 1/3, 2/3 and all; 0: none)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply both students' generator learning rate in every phase (the fake score's stays); "
                        "the learning-rate fairness check runs 1 and 1/3")
    p.add_argument("--lora-batch-multiplier", type=int, default=1,
                   help="the LoRA student's batch in every phase is K times the recipe's (default 1: equal compute; "
                        "4: A.3's batch ratio at equal iterations)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="recipe",
                   help="recipe: the recipes' phase lengths (equal generator steps); a3p: the paper's A.3 lengths "
                        "and batch ratios scaled so LoRA keeps its recipe length (TSM 2.67x LoRA's iterations, LoRA "
                        "4x TSM's batch, GAN phases at half batch; see tsm_distill/demo/protocol.py)")
    p.add_argument("--students", choices=("all", "lora"), default="all",
                   help="all: the LoRA and TSM students (default); lora: the LoRA student only, for the capacity-parity "
                        "arm, whose TSM students come from an equal-compute run of the same seed "
                        "(python -m tsm_distill.demo.seeds capacity)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="the LoRA student's rank (default: the recipe's). Capacity parity: 4x the TSM experts' rank, "
                        "the trainable parameters of TSM stage 1's four experts; alpha stays the recipe's unless "
                        "--lora-alpha is given, as A.3 keeps alpha 8 at rank 64. Needs --students lora: TSM's router "
                        "copies the LoRA run in as its context expert, which must have the experts' rank")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="the LoRA student's alpha (default: the recipe's); needs --students lora")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="training seed of both students")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="run every seed in <run-dir>/seed<N>/ (finished seeds are skipped), then write "
                            "<run-dir>/seeds.json, seeds.md and seeds.png")
    p.add_argument("--jobs", type=int, default=1, help="with --seeds: seeds run at once, each a subprocess")
    p.add_argument("--device", default="auto",
                   help="where the students are sampled and scored: auto (the GPU when torch sees one), cpu, "
                        "cuda; training runs where accelerate puts it (also the GPU when there is one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/BLAS CPU threads (default 1: on a shared, oversubscribed CPU one thread per process "
                        "ran this tiny UNet 15x faster than two; use 2+ on an idle machine); 0 = torch's default")
    return p


def parse_args(argv):
    """Parse tsm-demo's command line, fill in the full or quick presets and check the values."""
    args = build_parser().parse_args(argv)
    if args.protocol == "a3p":
        if args.router_steps is not None or args.budget_points:
            raise ValueError("--protocol a3p sets the router's length from A.3 and has no budget curve (the students "
                             "differ in iterations): drop --router-steps and --budget-points")
        if args.lora_batch_multiplier not in (1, A3_LORA_BATCH_MULTIPLIER):
            raise ValueError(f"--protocol a3p trains LoRA at A.3's {A3_LORA_BATCH_MULTIPLIER}x batch; drop "
                             f"--lora-batch-multiplier {args.lora_batch_multiplier}")
        args.lora_batch_multiplier, args.budget_points = A3_LORA_BATCH_MULTIPLIER, 0
    if (args.lora_rank is not None or args.lora_alpha is not None) and args.students != "lora":
        raise ValueError("--lora-rank / --lora-alpha need --students lora (TSM's router phase copies the LoRA run in "
                         "as its context expert, which must have the experts' rank)")
    if (args.lora_rank is not None and args.lora_rank < 1) or (args.lora_alpha is not None and not args.lora_alpha > 0):
        raise ValueError(f"--lora-rank must be >= 1 and --lora-alpha positive (got {args.lora_rank}, {args.lora_alpha})")
    if args.students == "lora":
        if args.budget_points:
            raise ValueError("--students lora has no budget curve (it pairs LoRA with TSM's checkpoints): drop "
                             "--budget-points")
        args.budget_points = 0
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.n < 10 or args.n_ref < 10:
        raise ValueError(f"--n and --n-ref must be at least 10 images (got {args.n}, {args.n_ref})")
    if not args.lr_scale > 0:
        raise ValueError(f"--lr-scale must be positive (got {args.lr_scale})")
    if args.budget_points < 0:
        raise ValueError(f"--budget-points must be 0 (no budget curve) or more (got {args.budget_points})")
    if args.lora_batch_multiplier < 1 or args.jobs < 1:
        raise ValueError(f"--lora-batch-multiplier and --jobs must be at least 1 (got {args.lora_batch_multiplier}, "
                         f"{args.jobs})")
    args.device = ev.resolve_device(args.device)
    if not Path(args.teacher).is_dir():
        raise FileNotFoundError(f"teacher folder {args.teacher} does not exist; pass --teacher DIR")
    if args.reference is None:
        args.reference = str(Path(args.teacher) / ev.REFERENCE_NAME)
    args.run_dir = Path(args.run_dir or ("runs/tsm_demo_quick" if args.quick else "runs/tsm_demo"))
    return args
