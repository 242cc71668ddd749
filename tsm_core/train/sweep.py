"""Run one command per training seed, ``jobs`` at a time, each a subprocess with its own log.

The experiments' sweeps (``tsm-demo --seeds``, ``python -m tsm_core.finetune.mnist --seeds``) share this:
each seed runs as its own process (so a crash or a kill loses one seed, and its memory is returned), with
its thread count fixed before torch starts, its output appended to a log in the seed's folder, and a
seed counted as done only when its exit status is 0 *and* its results say it finished.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path


def run_logged(cmd: Sequence[str], log_file: Path, threads: int) -> int:
    """Run ``cmd`` with its output appended to ``log_file``; returns its exit status. ``threads`` > 0 sets
    the child's OpenMP/MKL pool size before torch starts in it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # Append: a seed re-run after a stop keeps the log of the stopped attempt above the new one.
    with open(log_file, "a") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}\n")
        log.flush()
        return subprocess.run(list(map(str, cmd)), stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def run_seeds(seeds: Sequence[int], run: Callable[[int], int], finished: Callable[[int], bool],
              log_file: Callable[[int], Path], jobs: int = 1) -> list[int]:
    """Call ``run(seed)`` (which runs the seed, e.g. through `run_logged`, and returns its exit status)
    for every seed, ``jobs`` at a time; returns the seeds that failed (a non-zero exit, or
    ``finished(seed)`` false afterwards). One seed's failure does not stop the others."""

    def one(seed: int) -> tuple[int, int, float]:
        start = time.perf_counter()
        print(f"seed {seed}: running (log {log_file(seed)})", flush=True)
        try:
            rc = run(seed)
        except Exception as e:  # noqa: BLE001 - one seed's launch failure must not stop the others
            print(f"seed {seed}: could not run: {e!r}", flush=True)
            rc = -1
        return seed, rc, time.perf_counter() - start

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for fut in as_completed([pool.submit(one, s) for s in seeds]):
            seed, rc, seconds = fut.result()
            ok = rc == 0 and finished(seed)
            print(f"seed {seed}: {'done' if ok else f'FAILED (exit {rc})'} after {seconds:.0f} s", flush=True)
            if not ok:
                failed.append(seed)
    return sorted(failed)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds once each, in order; a negative seed is refused."""
    if any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds must be non-negative integers, got {list(seeds)}")
    return list(dict.fromkeys(seeds))
