"""Shared fixtures: tiny models built from config, saved, and loaded back by path."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tsm_core.testing import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture
def unet(tiny_dir):
    return tiny.build_unet(tiny_dir / "unet")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return tiny.write_clip_tokenizer(tiny_dir / "tokenizer")


@pytest.fixture
def text_encoder(tiny_dir, tokenizer):
    return tiny.build_text_encoder(tiny_dir / "text_encoder", vocab_size=len(tokenizer))


@pytest.fixture
def scheduler(tiny_dir):
    return tiny.build_scheduler(tiny_dir / "scheduler")


@pytest.fixture
def vae(tiny_dir):
    return tiny.build_vae(tiny_dir / "vae")


@pytest.fixture
def pixart(tiny_dir):
    return tiny.build_pixart(tiny_dir / "pixart")


@pytest.fixture
def sd3(tiny_dir):
    return tiny.build_sd3(tiny_dir / "sd3")


@pytest.fixture(scope="session")
def sd_pipeline_path(tmp_path_factory):
    """Folder of a tiny latent-space StableDiffusionPipeline (UNet, CLIP, tokenizer, DDPM, VAE)."""
    return tiny.build_sd_pipeline(tmp_path_factory.mktemp("sdpipe"))


@pytest.fixture(scope="session")
def pixel_pipeline_path(tmp_path_factory):
    """Folder of a tiny pixel-space StableDiffusionPipeline with no VAE (like the demo teacher)."""
    return tiny.build_sd_pipeline(tmp_path_factory.mktemp("pixpipe"), with_vae=False)


@pytest.fixture(scope="session")
def pixart_path(tmp_path_factory):
    """Folder of a tiny PixArt-alpha pipeline (transformer, T5 encoder, tokenizer, scheduler, VAE)."""
    from tsm_core.testing import tiny_dit

    return tiny_dit.build_pixart_pipeline(tmp_path_factory.mktemp("pixart"))


@pytest.fixture(scope="session")
def sdxl_path(tmp_path_factory):
    """Folder of a tiny SDXL pipeline (two CLIP encoders, text_time micro-conditioning, VAE)."""
    return tiny.build_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def sd3_path(tmp_path_factory):
    """Folder of a tiny SD3 pipeline (MM-DiT, two CLIP encoders + T5, flow-matching scheduler, VAE)."""
    from tsm_core.testing import tiny_dit

    return tiny_dit.build_sd3_pipeline(tmp_path_factory.mktemp("sd3"), with_t5=True)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One finished ``tsm-demo --quick`` seed, shrunk for CI (N=10, batch 1, a 2-step "full" teacher row,
    reference rows computed here), shared by the tests that read a finished seed (copy it before writing)."""
    from tsm_distill.demo import run as demo

    run = tmp_path_factory.mktemp("quick_demo") / "demo"
    assert demo.main(["--quick", "--run-dir", str(run), "--n", "10", "--n-ref", "200", "--teacher-steps", "2",
                      "--budget", "8", "--fake-updates", "1", "--batch-size", "1", "--reference", "none"]) == 0
    return run
