"""FID / KID / CLIP-score evaluation: clean-fid's numbers, offline, for tools and trainers' validation.

Typical use in a trainer::

    from tsm_core.eval import FeatureExtractor, ReferenceStats, score_features
    ext = FeatureExtractor(device="cuda", mode="clean")
    ref = ReferenceStats.load("ref.npz")                    # made by `tools/fid.py stats`
    fs = ext.features_from_generator(sample_fn, n_images=1000)
    print(score_features(fs, ref).summary())
"""

from .clip_score import SKIPPED as CLIP_SKIPPED
from .clip_score import clip_available, clip_score, clip_score_or_skip, find_clip_weights
from .evaluate import ScoreResult, compute_reference, load_reference, score, score_features
from .features import FeatureExtractor, FeatureSet, features_from_folder, features_from_images
from .metrics import fid_from_features, fid_from_stats, fid_low_rank, kid_from_features, score_row, stats
from .preprocess import MODES, Mode
from .reference import ReferenceStats, stats_hash
from .weights import InceptionWeightsError, find_inception_weights

__all__ = [
    "CLIP_SKIPPED", "MODES", "FeatureExtractor", "FeatureSet", "InceptionWeightsError", "Mode", "ReferenceStats",
    "ScoreResult", "clip_available", "clip_score", "clip_score_or_skip", "compute_reference", "features_from_folder",
    "features_from_images", "fid_from_features", "fid_from_stats", "fid_low_rank", "find_clip_weights", "find_inception_weights",
    "kid_from_features", "load_reference", "score", "score_features", "score_row", "stats", "stats_hash",
]
