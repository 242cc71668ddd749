"""``tsm-distill RECIPE [--set key=value ...] [--run-dir DIR] [--resume | --overwrite]``: run a DMD2 distillation recipe.

``tsm-distill RECIPE --plan [--processes N]`` trains nothing: it prints the memory each process needs per
phase (`tsm_distill.plan`), from the model's config files alone (``--set model.path=CONFIG_DIR`` for a
folder without weights, e.g. ``tsm_distill/assets/configs/sd15``).

Scale out with ``accelerate launch -m tsm_distill.cli RECIPE`` or ``torchrun --nproc_per_node N -m
tsm_distill.cli RECIPE``; each process draws its own prompts and the gradients are averaged.

Errors and exit statuses: `tsm_core.train.cli` (one ``error:`` line and status 2 for a setting to fix).
"""

from __future__ import annotations

import argparse

from tsm_core.train.cli import USER_ERROR, add_run_args, run_dir_of, run_recipe, user_error

__all__ = ["USER_ERROR", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-distill", description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--plan", action="store_true", help="print the memory per process and phase, train nothing")
    parser.add_argument("--processes", type=int, default=1, help="with --plan: processes (GPUs) the global batch "
                        "is split over")
    args = parser.parse_args(argv)
    from .config import DistillRecipe
    from .trainer import DMD2Trainer

    if args.plan:
        return _plan(args, DistillRecipe)

    status, out = run_recipe(args, DistillRecipe, run_dir_of(args), DMD2Trainer)
    if status == 0:
        print(f"student adapter: {out}")
    return status


def _plan(args, schema) -> int:
    from tsm_core.train.recipe import load_recipe

    from .plan import format_plan, plan_recipe

    try:
        recipe = load_recipe(args.recipe, schema, args.overrides)
        print(format_plan(plan_recipe(recipe, args.processes), args.recipe, recipe.model.path, args.processes))
    except (ValueError, FileNotFoundError) as e:
        return user_error(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
