"""``tsm-distill RECIPE [--set key=value ...] [--run-dir DIR] [--resume]``: run a DMD2 distillation recipe.

Scale out with ``accelerate launch -m tsm_distill.cli RECIPE`` or ``torchrun --nproc_per_node N -m
tsm_distill.cli RECIPE``; each process draws its own prompts and the gradients are averaged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tsm_core.train.recipe import add_recipe_args, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-distill", description=__doc__.splitlines()[0])
    add_recipe_args(parser)
    args = parser.parse_args(argv)
    from .config import DistillRecipe
    from .trainer import DMD2Trainer

    recipe = load_recipe(args.recipe, DistillRecipe, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.recipe).stem
    out = DMD2Trainer(recipe, run_dir).train(resume=args.resume)
    print(f"student adapter: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
