"""`tools/fid.py generate` on tiny pipelines: deterministic images, and features equal to the saved files."""

import json

import numpy as np
import pytest
from PIL import Image

from tools import fid as fid_cli
from tsm_core.eval import FeatureExtractor, ReferenceStats
from tsm_core.eval.coco import select_coco_captions
from tsm_core.eval.generate import read_prompts


def _images(folder):
    return [np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red dress\n\na blue bag\na small cat\n")
    return path


@pytest.mark.parametrize("fixture", ["pixel_pipeline_path", "sd_pipeline_path"])
def test_generate_writes_n_images_deterministically(fixture, request, prompts, tmp_path):
    pipeline = request.getfixturevalue(fixture)
    args = ["generate", "--pipeline", str(pipeline), "--prompts", str(prompts), "--n", "3", "--steps", "2",
            "--gen-batch-size", "2", "--quiet", "--device", "cpu"]
    assert fid_cli.main([*args, "--seed", "7", "--out-dir", str(tmp_path / "a")]) == 0
    assert fid_cli.main([*args, "--seed", "7", "--out-dir", str(tmp_path / "b"), "--gen-batch-size", "3"]) == 0
    assert fid_cli.main([*args, "--seed", "8", "--out-dir", str(tmp_path / "c")]) == 0
    a, b, c = (_images(tmp_path / x) for x in "abc")
    assert len(a) == 3 and a[0].shape == (16, 16, 3) and a[0].dtype == np.uint8
    # Same seed -> the same bytes, whatever the batch size; another seed -> other images.
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    rows = [json.loads(line) for line in (tmp_path / "a" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red dress", "a blue bag", "a small cat"]
    assert [r["seed"] for r in rows] == [7, 8, 9]


def test_generated_features_equal_the_saved_folder(pixel_pipeline_path, prompts, tmp_path):
    """In-memory generation straight to statistics == the same images written as PNGs and read back."""
    base = ["generate", "--pipeline", str(pixel_pipeline_path), "--prompts", str(prompts), "--n", "4",
            "--steps", "2", "--seed", "1", "--quiet", "--batch-size", "4"]
    assert fid_cli.main([*base, "--stats-out", str(tmp_path / "gen.npz")]) == 0
    assert fid_cli.main([*base, "--out-dir", str(tmp_path / "g")]) == 0
    in_memory = ReferenceStats.load(tmp_path / "gen.npz")
    assert in_memory.n_images == 4 and in_memory.source.startswith("generated:")
    from_folder = FeatureExtractor(batch_size=4, progress=False).features_from_folder(tmp_path / "g")
    assert np.array_equal(from_folder.features, in_memory.features)


def test_coco_reference_is_built_at_256_cached_and_checked(tmp_path, capsys):
    val = tmp_path / "val2014"
    val.mkdir()
    rng = np.random.RandomState(0)
    for i, shape in enumerate([(40, 60), (64, 48), (50, 50)]):  # COCO images are not square
        Image.fromarray(rng.randint(0, 256, (*shape, 3), dtype=np.uint8)).save(val / f"COCO_val2014_{i:012d}.jpg")
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"annotations": [{"id": i, "image_id": i, "caption": "a cat"} for i in range(3)]}))
    args = ["coco", "--captions", str(captions), "--val-dir", str(val), "--ref-cache", str(tmp_path / "ref.npz"),
            "--reference-only", "--quiet", "--batch-size", "3"]
    assert fid_cli.main(args) == 0
    ref = ReferenceStats.load(tmp_path / "ref.npz")
    assert ref.n_images == 3 and ref.resolution == 256 and ref.mode == "clean"
    assert ref.extra["protocol"] == "coco2014-val-dmd2" and "expected 40504" in ref.extra["warning"]
    capsys.readouterr()
    assert fid_cli.main(args) == 0  # second run: read from the cache
    assert json.loads(capsys.readouterr().out)["hash"] == ref.hash
    assert fid_cli.main([*args, "--mode", "legacy_tensorflow"]) == 2  # the cache was made in clean mode
    assert "mode 'clean' (requested 'legacy_tensorflow')" in capsys.readouterr().err


def test_generate_errors_are_clear(pixel_pipeline_path, prompts, tmp_path, capsys):
    base = ["generate", "--pipeline", str(pixel_pipeline_path), "--prompts", str(prompts), "--n", "2", "--quiet"]
    assert fid_cli.main(base) == 2
    assert "--out-dir" in capsys.readouterr().err
    assert fid_cli.main([*base, "--out-dir", str(tmp_path / "o"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "LoRA file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_coco_captions_one_per_image_seeded(tmp_path):
    anns = [{"id": 10 + i, "image_id": i // 2, "caption": f"caption {i}"} for i in range(10)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": anns, "images": []}))
    picked = select_coco_captions(path, n=3, seed=0)
    assert len(picked) == 3 and len(set(picked)) == 3
    assert all(int(c.split()[1]) % 2 == 0 for c in picked)  # the first caption of each image
    assert picked == select_coco_captions(path, n=3, seed=0)
    with pytest.raises(ValueError, match="only 5 images"):
        select_coco_captions(path, n=6)


def test_generate_with_a_tsm_adapter_routes_each_step(pixel_pipeline_path, tmp_path):
    from tests.test_core import perturb
    from tsm_core import TSMConfig, attach
    from tsm_core.eval.generate import generate_batch, load_pipeline

    pipe = load_pipeline(pixel_pipeline_path)
    tsm = attach(pipe.unet, TSMConfig(scales=(4,), target_modules=["to_q", "to_v", "conv1"]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    tsm.save(tmp_path / "adapter")
    base = generate_batch(load_pipeline(pixel_pipeline_path), ["a cat"], [0], steps=4)
    routed = load_pipeline(pixel_pipeline_path, adapter=tmp_path / "adapter")
    seen = []
    push = routed._tsm_routing.tsm.context.push
    routed._tsm_routing.tsm.context.push = lambda t: (seen.append(int(t[0])), push(t))[1]
    with_adapter = generate_batch(routed, ["a cat"], [0], steps=4)
    assert len(seen) == 4 and seen == sorted(seen, reverse=True)  # one routed call per step, noisiest first
    assert not (base == with_adapter).all()
