"""Command line of the fine-tuning experiment: one seed in this process, or a sweep of seeds as
subprocesses (`tsm_core.train.sweep`), then the per-protocol aggregates."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import protocol as mp

SETTING_FLAGS = ("steps", "batch", "lr", "rank", "alpha", "n", "sample_steps", "guidance_scale")


def build_parser() -> argparse.ArgumentParser:
    from .run import TEACHER, Settings

    d = Settings()
    p = argparse.ArgumentParser(prog="python -m tsm_core.finetune.mnist", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (shared inputs, seed<N>/ folders)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run one seed in this process")
    which.add_argument("--seeds", type=int, nargs="+", help="run these seeds, each as a subprocess, then aggregate")
    which.add_argument("--aggregate", action="store_true", help="only aggregate the finished seed folders of --out")
    p.add_argument("--to", type=Path, help="where the aggregates go (default: --out)")
    p.add_argument("--compare-with", type=Path, metavar="OUT",
                   help="with --aggregate: pair these seeds with the same seeds of another run's --out that "
                        "differs in one setting (e.g. --text-experts) and write <to>/<protocol>/effect.{json,md}")
    p.add_argument("--jobs", type=int, default=1, help="seeds at a time (--seeds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per seed")
    p.add_argument("--protocols", nargs="+", choices=mp.PROTOCOLS, default=list(mp.PROTOCOLS))
    p.add_argument("--teacher", type=Path, default=TEACHER)
    p.add_argument("--steps", type=int, default=d.steps, help="S: vanilla LoRA's optimizer steps")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--n", type=int, default=d.n, help="generated digits per student")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--text-experts", action="store_true", help="experts on the text encoder's q_proj/v_proj (A.1)")
    return p


def settings_of(args):
    from .run import Settings

    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})


def child_args(args) -> list[str]:
    """The options every seed's subprocess gets: the settings, protocols, teacher and threads."""
    out = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SETTING_FLAGS]
    out += ["--protocols", *args.protocols, "--teacher", str(args.teacher), "--threads", str(args.threads)]
    return out + (["--text-experts"] if args.text_experts else [])


def sweep(args) -> int:
    from tsm_core.train.sweep import check_seeds, run_logged, run_seeds

    from .run import prepare
    from .seeds import is_complete, read_results

    seeds = check_seeds(args.seeds)
    prepare(args.out, args.teacher)  # once, before the seeds start side by side
    done = [s for s in seeds if is_complete(read_results(args.out / f"seed{s}"), args.protocols)]
    if done:
        print(f"skipped seeds {', '.join(map(str, done))}: already scored", flush=True)
    folder = lambda s: args.out / f"seed{s}"  # noqa: E731
    cmd = lambda s: [sys.executable, "-m", "tsm_core.finetune.mnist", "--out", str(args.out), "--seed", str(s),  # noqa: E731
                     *child_args(args)]
    failed = run_seeds([s for s in seeds if s not in done],
                       lambda s: run_logged(cmd(s), folder(s) / "run.log", args.threads),
                       lambda s: is_complete(read_results(folder(s)), args.protocols),
                       lambda s: folder(s) / "run.log", args.jobs)
    write(args, [folder(s) for s in seeds])
    if failed:
        print(f"FAILED seeds: {', '.join(map(str, failed))}; rerun the same command to resume them", file=sys.stderr)
    return 1 if failed else 0


def write(args, folders) -> None:
    from .seeds import write_aggregates

    paths = write_aggregates(args.to or args.out, folders, args.protocols)
    print("\n".join(map(str, paths)) if paths else "no seed has finished: no aggregate written", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.threads < 1 or args.jobs < 1:
            raise ValueError(f"--threads and --jobs must be >= 1, got {args.threads} and {args.jobs}")
        settings = settings_of(args)
        if args.compare_with is not None and not args.aggregate:
            raise ValueError("--compare-with pairs finished seeds: use it with --aggregate")
        if args.aggregate:
            from .seeds import seed_folders

            write(args, seed_folders(args.out))
            if args.compare_with is not None:
                from .seeds import write_effect

                if not args.compare_with.is_dir():
                    raise FileNotFoundError(f"--compare-with {args.compare_with}: no such run folder")
                paths = write_effect(args.to or args.out, seed_folders(args.out), seed_folders(args.compare_with),
                                     args.protocols)
                print("\n".join(map(str, paths)), flush=True)
            return 0
        if args.seeds is not None:
            return sweep(args)
        if args.seed is None or args.seed < 0:
            raise ValueError("give --seed N (N >= 0), --seeds N [N ...] or --aggregate")
        import torch

        from .run import run_seed

        torch.set_num_threads(args.threads)
        run_seed(args.out, args.seed, settings, args.protocols, args.teacher)
        return 0
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
