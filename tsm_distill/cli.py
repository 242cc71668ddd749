"""``tsm-distill RECIPE [--set key=value ...] [--run-dir DIR] [--resume | --overwrite]``: run a DMD2 distillation recipe.

Scale out with ``accelerate launch -m tsm_distill.cli RECIPE`` or ``torchrun --nproc_per_node N -m
tsm_distill.cli RECIPE``; each process draws its own prompts and the gradients are averaged.

Errors and exit statuses: `tsm_core.train.cli` (one ``error:`` line and status 2 for a setting to fix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tsm_core.train.cli import USER_ERROR, add_run_args, run_recipe

__all__ = ["USER_ERROR", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-distill", description=__doc__.splitlines()[0])
    args = add_run_args(parser).parse_args(argv)
    from .config import DistillRecipe
    from .trainer import DMD2Trainer

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.recipe).stem
    status, out = run_recipe(args, DistillRecipe, lambda recipe: run_dir, DMD2Trainer)
    if status == 0:
        print(f"student adapter: {out}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
