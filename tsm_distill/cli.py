"""``tsm-distill RECIPE [--set key=value ...] [--run-dir DIR] [--resume | --overwrite]``: run a DMD2 distillation recipe.

Scale out with ``accelerate launch -m tsm_distill.cli RECIPE`` or ``torchrun --nproc_per_node N -m
tsm_distill.cli RECIPE``; each process draws its own prompts and the gradients are averaged.

A user's mistake found before training starts (a bad recipe key or value, a missing teacher or data
set, a used run folder) prints one line ``error: ...`` on stderr and exits with status 2; anything
else, and any error once training has started, keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tsm_core.train.recipe import add_recipe_args, load_recipe

USER_ERROR = 2  # argparse's own status for a bad command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-distill", description=__doc__.splitlines()[0])
    add_recipe_args(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run folder that holds an earlier run, deleting its checkpoints, "
                             "phases/, adapter*/, samples and logs")
    args = parser.parse_args(argv)
    from .config import DistillRecipe
    from .trainer import DMD2Trainer, check_run_folder

    trainer = None
    try:
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.recipe).stem
        recipe = load_recipe(args.recipe, DistillRecipe, args.overrides)
        check_run_folder(run_dir, args.resume, args.overwrite)  # before the models load
        trainer = DMD2Trainer(recipe, run_dir)
        out = trainer.train(resume=args.resume, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:
        if trainer is not None and trainer.started:
            raise  # raised by a training step: a bug's traceback, not a setting to fix
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return USER_ERROR
    print(f"student adapter: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
