"""tools/train_teacher.py on the shared skeleton: a few tiny steps, safetensors + JSON checkpoints (no
pickles), resume == uninterrupted, a loadable EMA export."""

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
    """Run the tool; return the latest checkpoint as {"path", "state", module name: tensors}."""
    from safetensors.torch import load_file

    from tsm_core.train.checkpoint import CheckpointManager

    # Same thread count as the rest of the test session, so results are bitwise repeatable.
    args = ["--out", str(out), "--tiny", "--threads", str(torch.get_num_threads()), "--log-every", "1",
            "--checkpoint-every", "2", *extra]
    assert tool.main(args) == 0
    ckpt = CheckpointManager(out, keep_last=None)
    path = ckpt.latest()
    # Read now: a later resume prunes old checkpoints (keep_last).
    return {"path": path, "state": ckpt.read_state(path), "files": {p.name for p in path.iterdir()},
            "optim": torch.load(path / "optimizers.pt", weights_only=True),  # weights_only: no pickled objects
            **{name: load_file(path / f"{name}.safetensors") for name in ("unet", "text_encoder", "ema")}}


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
    assert first["state"]["step"] == 3 and first["path"].name == "step_00000003"
    assert first["files"] == {"unet.safetensors", "text_encoder.safetensors", "ema.safetensors", "optimizers.pt",
                              "schedulers.pt", "rng_state_0.pt", "manifest.json", "trainer_state.json"}
    assert "checkpoint.pt" not in {p.name for p in (root / "resumed").iterdir()}  # the old pickle is gone
    assert len(first["optim"]["opt"]["state"]) > 0  # AdamW moments are saved, not just weights
    assert not list((root / "resumed" / "checkpoints").glob(".tmp_*"))


def test_resume_equals_uninterrupted(runs):
    _, first, resumed, straight = runs
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    for name in ("unet", "text_encoder", "ema"):
        for key, value in straight[name].items():
            assert torch.equal(resumed[name][key], value), f"{name}.{key} differs after resume"
    # Training moved the weights: the comparison is not between two untouched models.
    key = next(k for k in first["unet"] if k.endswith("conv_in.weight"))
    assert not torch.equal(first["unet"][key], straight["unet"][key])
    stats = [json.loads(line) for line in (runs[0] / "resumed" / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_or_resume_nothing(tool, runs, tmp_path):
    root = runs[0]
    with pytest.raises(ValueError, match="pass --resume"):  # the skeleton's run-folder check
        tool.main(["--out", str(root / "straight"), "--tiny", "--max-steps", "1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tool.main(["--out", str(tmp_path / "empty"), "--resume", "--max-steps", "1"])


def test_exported_ema_pipeline_loads_and_generates(runs):
    from diffusers import StableDiffusionPipeline

    root, _, resumed, _ = runs
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "pipe"), vae=None, safety_checker=None)
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    # The exported weights are the EMA weights of the final step.
    exported = {f"unet.{k}": p for k, p in pipe.unet.named_parameters()}
    exported |= {f"text_encoder.{k}": p for k, p in pipe.text_encoder.named_parameters()}
    assert exported.keys() == resumed["ema"].keys()
    assert all(torch.equal(p, resumed["ema"][k]) for k, p in exported.items())
    info = json.loads((root / "pipe" / "teacher_info.json").read_text())
    assert info["step"] == 6 and info["weights"] == "EMA"
    # With no VAE the "latents" are the images: (B, 3, 32, 32).
    out = pipe(["a photo of an ankle boot", "a picture of a sneaker"], num_inference_steps=2,
               guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert not (root / "pipe.tmp").exists() and not (root / "pipe.old").exists()
