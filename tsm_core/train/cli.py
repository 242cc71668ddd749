"""What every training command shares: its arguments, and how a run's errors reach the user.

``tsm-finetune`` and ``tsm-distill`` both take ``RECIPE [--set KEY=VALUE ...] [--run-dir DIR]
[--resume | --overwrite]``. A user's mistake found before training starts (a bad recipe key or
value, a missing model or data set, a used run folder) prints one line ``error: ...`` on stderr and
exits with status 2, as does a read-only or full run folder at any time; anything else, and any
other error once training has started, keeps its traceback.
Ctrl-C or SIGTERM writes a checkpoint and exits with status 130 and a line that says how to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .recipe import add_recipe_args, load_recipe
from .skeleton import (
    PhasedTrainer,
    RunFolderError,
    TrainingInterrupted,
    check_resume_recipe,
    check_run_folder,
)

USER_ERROR = 2  # argparse's own status for a bad command line
INTERRUPTED = 130  # the shell's status for a run stopped by SIGINT


def user_error(e: BaseException) -> int:
    """Print a setting the user must fix as one ``error:`` line on stderr; returns `USER_ERROR`."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return USER_ERROR


def add_run_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`add_recipe_args` plus ``--overwrite``."""
    add_recipe_args(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a run folder that holds an earlier run, deleting its checkpoints, "
                             "phases/, adapter*/, samples and logs")
    return parser


def run_dir_of(args: argparse.Namespace) -> Callable[[Any], Path]:
    """How both training commands choose the run folder: ``--run-dir``, else the recipe's ``train.run_dir``,
    else ``runs/<recipe file's stem>``. The choice is written back into the recipe, so the run folder's
    recipe.yaml names the folder it is in."""
    def choose(recipe) -> Path:
        run_dir = args.run_dir or recipe.train.run_dir or Path("runs") / Path(args.recipe).stem
        recipe.train.run_dir = str(run_dir)
        return Path(run_dir)

    return choose


def run_recipe(args: argparse.Namespace, schema: type, run_dir_of: Callable[[Any], Path],
               trainer_class: type[PhasedTrainer]) -> tuple[int, Any]:
    """Load ``args.recipe`` into ``schema``, check the run folder (and with ``--resume`` the recipe
    against the saved one) before any model loads, build the trainer and train.

    Args:
        run_dir_of: the run folder of a loaded recipe (``--run-dir`` applied).
        trainer_class: built as ``trainer_class(recipe, run_dir)``.

    Returns ``(status, result)``: ``(0, train()'s result)``, or a non-zero status after printing one line.
    """
    trainer = None
    try:
        recipe = load_recipe(args.recipe, schema, args.overrides)
        run_dir = Path(run_dir_of(recipe))
        check_run_folder(run_dir, args.resume, args.overwrite)  # before the models load
        if args.resume:
            check_resume_recipe(run_dir, recipe, trainer_class.shape_keys)
        trainer = trainer_class(recipe, run_dir)
        return 0, trainer.train(resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return INTERRUPTED, None
    except RunFolderError as e:  # the machine, not the code: one line even mid-run
        return user_error(e), None
    except (ValueError, FileNotFoundError) as e:
        if trainer is not None and trainer.started:
            raise  # raised by a training step: a bug's traceback, not a setting to fix
        return user_error(e), None
