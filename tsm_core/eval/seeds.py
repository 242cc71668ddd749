"""Statistics over seeds (a seed is one whole training run): mean and sample std, the percentile
bootstrap and Student's t intervals of a mean, paired differences of two students, and their text forms.

Shared by the distillation demo (`tsm_distill.demo.seeds`) and the fine-tuning experiment
(`tsm_core.finetune.mnist`), so both report the same statistics. A seed's record is a dict with ``seed``
and, per student row, its FID under the row's key and its KID under ``<key>_kid``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RESAMPLES = 10_000
BOOT_SEED = 0
LEVEL = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = BOOT_SEED,
                 level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean: resample the values with replacement (None below 2)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student's t interval of the mean (None below 2 values); wider than the bootstrap at few seeds."""
    from scipy.stats import t

    mean, std = mean_std(values)
    if std is None:
        return None
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def format_pm(mean: float, std: float | None, scale: float = 1.0) -> str:
    return f"{scale * mean:.2f}" + ("" if std is None else f" +- {scale * std:.2f}")


def format_interval(ci: list[float] | None) -> str:
    """A 95% interval as "[lo, hi]", or why there is none."""
    return "n/a (one seed)" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def paired(records: Sequence[dict], tsm: str, lora: str = "lora", resamples: int = RESAMPLES,
           seed: int = BOOT_SEED) -> dict:
    """Paired difference ``tsm - lora`` per seed (FID and KID), its mean with intervals, and TSM's wins."""
    diffs = [r[tsm] - r[lora] for r in records]
    kid_diffs = [r[f"{tsm}_kid"] - r[f"{lora}_kid"] for r in records]
    mean, std = mean_std(diffs)
    boot, tint = bootstrap_ci(diffs, resamples, seed), t_interval(diffs)
    return {"per_seed": [{"seed": r["seed"], "fid_diff": d, "kid_diff": k}
                         for r, d, k in zip(records, diffs, kid_diffs)],
            "mean": mean, "std": std,
            "ci95_bootstrap": list(boot) if boot else None, "ci95_t": list(tint) if tint else None,
            "ci95_bootstrap_below_zero": bool(boot and boot[1] < 0),
            "tsm_wins": sum(d < 0 for d in diffs), "n_seeds": len(diffs),
            "kid_mean_diff": mean_std(kid_diffs)[0], "kid_tsm_wins": sum(k < 0 for k in kid_diffs)}


def row_summary(records: Sequence[dict], key: str) -> dict:
    """Mean and sample std of one row's FID and KID over the seeds."""
    fid_mean, fid_std = mean_std([r[key] for r in records])
    kid_mean, kid_std = mean_std([r[f"{key}_kid"] for r in records])
    return {"fid_mean": fid_mean, "fid_std": fid_std, "kid_mean": kid_mean, "kid_std": kid_std}
