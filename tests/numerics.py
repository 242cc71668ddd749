"""Magnitude-relative float comparisons for tests.

A fixed per-element ``atol`` (``torch.allclose(a, b, atol=1e-5)``) does not travel between machines:
BLAS and oneDNN kernels round differently on different CPUs and thread counts, and the rounding error
grows with the values (outputs up to 51 differed by 2.7e-5 between two CPUs). These helpers compare the
norm-relative error ``||actual - expected|| / ||expected||`` in float64, so one tolerance fits any scale.

float32 rounding is about 1e-7 of the norm through one layer and 1e-6 through the tiny UNet; a real bug
(a wrong expert, a dropped LoRA term, a mis-routed sample) is 1e-2 or more. So: ``rel=1e-5`` for one or
two layers, or the very same arithmetic (zero-initialised experts, a checkpoint recompute, a reload);
``rel=1e-4`` for a whole network computed another way (batched vs looped, merged vs routed, a stock
pipeline or LoRA loader vs ours); and ``assert not close(..., rel=1e-3)`` for "this changed the output".
"""

from __future__ import annotations

import torch

TINY = 1e-12  # floor for ||expected||, so that comparing zeros with zeros is not 0 / 0


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def rel_error(actual, expected) -> float:
    """``||actual - expected|| / max(||expected||, TINY)`` in float64 (tensors, arrays or numbers)."""
    a, b = _f64(actual), _f64(expected)
    if a.shape != b.shape:  # no broadcasting: a shape slip must not pass silently
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if not (a.isfinite().all() and b.isfinite().all()):
        raise AssertionError("non-finite values (nan or inf) in a compared tensor")
    return ((a - b).norm() / b.norm().clamp_min(TINY)).item()


def close(actual, expected, rel: float = 1e-4) -> bool:
    """Whether the norm-relative error is at most ``rel`` (for ``assert not close(...)``: "it changed")."""
    return rel_error(actual, expected) <= rel


def assert_close(actual, expected, rel: float = 1e-4, msg: str = "") -> None:
    """Assert that the norm-relative error is at most ``rel``; the message shows it and the max abs diff."""
    err = rel_error(actual, expected)
    if err > rel:
        diff = (_f64(actual) - _f64(expected)).abs().max().item()
        raise AssertionError(f"relative error {err:.3g} > {rel:g} (max abs diff {diff:.3g}) {msg}".rstrip())
