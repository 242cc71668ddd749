"""FID and KID from Inception features, with clean-fid's arithmetic.

- ``stats``: mu = mean of float32 features (float32, as clean-fid keeps it), sigma = ``np.cov`` (float64).
- ``fid_from_stats``: the Frechet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` (Heusel et
  al. 2017), computed as clean-fid's ``frechet_distance`` does, with ValueErrors instead of asserts.
- ``kid_from_features``: clean-fid's ``kernel_distance`` (unbiased MMD^2 with the cubic polynomial
  kernel over random subsets, Binkowski et al. 2018), with a seeded generator and the std over subsets.
- ``fid_low_rank``: the same FID straight from two feature sets through an N1 x N2 SVD, for N << 2048.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of N x D features, exactly as clean-fid computes them. Needs N >= 2."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {features.shape}.")
    if features.shape[0] < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {features.shape[0]}.")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (clean-fid's ``frechet_distance``)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"Mean vectors differ in length: {mu1.shape} vs {mu2.shape} (different feature networks?).")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"Covariances differ in shape: {sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2
    # The product may be nearly singular (fewer images than dimensions): same fallback as clean-fid.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID is numerically unstable: sqrt(S1 S2) has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}. "
                "Use more images."
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets."""
    return fid_from_stats(*stats(features1), *stats(features2))


def kid_from_features(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) of two feature sets.

    The mean equals clean-fid's ``kernel_distance(features1, features2)`` after ``np.random.seed(seed)``:
    same draws in the same order (subset of features2 first), same kernel, same sums.
    """
    features1, features2 = np.asarray(features1), np.asarray(features2)
    if features1.ndim != 2 or features2.ndim != 2 or features1.shape[1] != features2.shape[1]:
        raise ValueError(f"KID needs two N x D feature arrays with equal D, got {features1.shape} and {features2.shape}.")
    n = features1.shape[1]
    m = min(features1.shape[0], features2.shape[0], max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {features1.shape[0]} and {features2.shape[0]}.")
    rng = np.random.RandomState(seed)
    t = 0
    per_subset = []
    for _ in range(num_subsets):
        x = features2[rng.choice(features2.shape[0], m, replace=False)]
        y = features1[rng.choice(features1.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        term = (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
        t += term
        per_subset.append(float(term) / m)
    return float(t / num_subsets / m), float(np.std(per_subset))


def fid_low_rank(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID of two feature sets, exact, through an N1 x N2 matrix instead of a 2048 x 2048 ``sqrtm``.

    With S1 = A A^T and S2 = B B^T (A, B: the centred features over sqrt(N - 1)), the eigenvalues of
    S1 S2 are the squared singular values of B^T A, so Tr sqrt(S1 S2) is the nuclear norm of B^T A.
    Same number as ``tsm_core.eval.fid_from_features`` (clean-fid's formula; a test checks it), but
    seconds instead of minutes on a busy 2-core CPU, where scipy's 2048 x 2048 sqrtm took 200 s.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID needs two N x D feature arrays (N >= 2, equal D), got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a = (f1 - mu1) / np.sqrt(len(f1) - 1)
    b = (f2 - mu2) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(b @ a.T, compute_uv=False).sum()
    diff = mu1.astype(np.float32) - mu2.astype(np.float32)  # clean-fid keeps mu in float32
    return float(diff.astype(np.float64) @ diff + (a * a).sum() + (b * b).sum() - 2 * nuclear)


def score_row(features: np.ndarray, reference: np.ndarray) -> dict:
    """FID and KID (mean, std) of generated features against the reference features."""
    fid = fid_low_rank(features, reference)
    kid_mean, kid_std = kid_from_features(features, reference)
    return {"fid": float(fid), "kid_mean": float(kid_mean), "kid_std": float(kid_std), "n": int(len(features))}
