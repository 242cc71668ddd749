"""tools/train_teacher.py: a few tiny steps, atomic checkpoint, resume == uninterrupted, loadable export."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_teacher", REPO / "tools" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_teacher"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run(tool, out, *extra):
    # Same thread count as the rest of the test session, so results are bitwise repeatable.
    args = ["--out", str(out), "--tiny", "--threads", str(torch.get_num_threads()), "--log-every", "1",
            "--checkpoint-every", "2", *extra]
    assert tool.main(args) == 0
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tool, tmp_path_factory):
    """A 3-step run resumed to 6 steps with export, and an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("teacher")
    first = _run(tool, root / "resumed", "--max-steps", "3")
    resumed = _run(tool, root / "resumed", "--max-steps", "6", "--resume", "--export-to", str(root / "pipe"))
    straight = _run(tool, root / "straight", "--max-steps", "6")
    return root, first, resumed, straight


def test_three_steps_write_a_whole_checkpoint(runs):
    root, first, _, _ = runs
    assert first["step"] == 3
    assert {"unet", "text_encoder", "ema", "optimizer", "generator", "torch_rng", "config"} <= set(first)
    assert len(first["optimizer"]["state"]) > 0  # AdamW moments are saved, not just weights
    # The temporary file was renamed away, never left behind.
    assert not (root / "resumed" / "checkpoint.pt.tmp").exists()


def test_resume_equals_uninterrupted(runs):
    _, first, resumed, straight = runs
    assert resumed["step"] == straight["step"] == 6
    for name in ("unet", "text_encoder"):
        for key, value in straight[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}.{key} differs after resume"
    for a, b in zip(resumed["ema"], straight["ema"]):
        assert torch.equal(a, b)
    # Training moved the weights: the comparison is not between two untouched models.
    key = next(k for k in first["unet"] if k.endswith("conv_in.weight"))
    assert not torch.equal(first["unet"][key], straight["unet"][key])
    stats = [json.loads(line) for line in (runs[0] / "resumed" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_or_resume_nothing(tool, runs, tmp_path):
    root = runs[0]
    with pytest.raises(ValueError, match="pass --resume"):
        tool.main(["--out", str(root / "straight"), "--tiny", "--max-steps", "1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tool.main(["--out", str(tmp_path / "empty"), "--resume", "--max-steps", "1"])


def test_exported_ema_pipeline_loads_and_generates(runs):
    from diffusers import StableDiffusionPipeline

    root, _, resumed, _ = runs
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "pipe"), vae=None, safety_checker=None)
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    # The exported weights are the EMA weights of the final step.
    exported = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    assert all(torch.equal(p, e) for p, e in zip(exported, resumed["ema"]))
    info = json.loads((root / "pipe" / "teacher_info.json").read_text())
    assert info["step"] == 6 and info["weights"] == "EMA"
    # With no VAE the "latents" are the images: (B, 3, 32, 32).
    out = pipe(["a photo of an ankle boot", "a picture of a sneaker"], num_inference_steps=2,
               guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert not (root / "pipe.tmp").exists() and not (root / "pipe.old").exists()
