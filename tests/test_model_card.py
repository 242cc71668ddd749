"""Model cards (issue 28): every exported LoRA folder and every finished run's ``adapter/`` holds a README.md
that huggingface_hub reads, with the base model and tags in its metadata and a body that names the scales,
the intervals each expert serves and the code that loads it."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

import tests.test_finetune as finetune_tests
from tests.test_distill import phase, recipe
from tsm_core import TSMConfig, attach
from tsm_core.card import NOT_MEASURED, RunCard, method_section, write_run_card
from tsm_core.finetune import FinetuneTrainer
from tsm_core.testing import tiny
from tsm_distill import DMD2Trainer

folder = finetune_tests.folder  # the fine-tuning tests' image folder fixture


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """tests.test_distill's set-up: a tiny pixel-space teacher, prompts and real images."""
    d = tmp_path_factory.mktemp("card")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def load_card(directory):
    card = ModelCard.load(directory / "README.md")
    return card, card.data.to_dict(), card.text


def assert_tags(meta, *extra):
    assert {"lora", "tsm", "diffusers", "text-to-image", *extra} <= set(meta["tags"]), meta["tags"]
    assert meta["pipeline_tag"] == "text-to-image"


# ---------------------------------------------------------------------------- finished runs
def test_a_finished_distill_run_has_cards_for_its_adapters(env, tmp_path):
    run = tmp_path / "run"
    r = recipe(env, [phase("e3", scale=4, experts=[3], gan=True), phase("router", type="assemble")], ema_decay=0.5)
    out = DMD2Trainer(r, run).train()
    for name in ("adapter", "adapter_ema"):
        _, meta, body = load_card(run / name)
        assert meta["base_model"] == str(env[1]) and meta["library_name"] == "tsm"
        assert_tags(meta, "dmd2", "distillation")
        assert "TSM stage 2 (assembling)" in body
        assert "core scale n = 4 is always on" in body and "context scales n = [1]" in body
        # Each expert's interval and the student step it serves: 999 -> expert 3 of n = 4 (paper A.3).
        assert "| 4 | 3 | [750, 1000) | core: always on | 999 |" in body
        assert "| 1 | 0 | [0, 1000) | context: gated by the router | 999, 749, 499, 249 |" in body
        assert "rank 2, alpha 2, scales [1, 4]" in body and "[`../recipe.yaml`](../recipe.yaml)" in body
        assert "2 DMD2 iterations in all" in body and "| e3 | 1 | experts [3] of scale 4, with the GAN loss |" in body
        assert f'load_student("{env[1]}", "{run / name}", kind="unet")' in body
        assert "timesteps=[999, 749, 499, 249]" in body and NOT_MEASURED in body
    assert out == run / "adapter"


def test_a_finished_finetune_run_has_a_card_for_its_adapter(tmp_path, folder, sd_pipeline_path):
    stages = [{"type": "foster", "scale": 4, "steps": 1, "lr": 1e-2},
              {"type": "foster", "scale": 1, "steps": 1, "lr": 1e-2}]
    run = tmp_path / "run"
    FinetuneTrainer(finetune_tests._recipe("unet", sd_pipeline_path, folder, run, stages)).train()
    _, meta, body = load_card(run / "adapter")
    assert meta["base_model"] == str(sd_pipeline_path) and meta["library_name"] == "tsm"
    assert_tags(meta)
    assert "dmd2" not in meta["tags"]
    # Saved after the n = 1 stage: stage 1 with scale 1 active, the n = 4 experts stored beside it.
    assert "TSM stage 1 (fostering)" in body and "at scale n = 1 only" in body
    assert "| 4 | 2 | [500, 750) | stored, not used in this mode |" in body
    assert "| 1 | 0 | [0, 1000) | active: the expert of t's interval |" in body
    assert "2 optimizer steps in all" in body and "experts all of scale 4, t in [0, 1000)" in body
    assert f'load_finetuned("unet", "{sd_pipeline_path}", "{run}")' in body
    # The pipeline has a VAE and no text-encoder experts: a stock diffusers pipeline loads it too.
    assert f'tsm = load_adapter(pipe.unet, "{run / "adapter"}")' in body and "route_by_timestep(pipe.unet, tsm)" in body
    assert NOT_MEASURED in body


def test_a_run_card_shows_scores_and_the_stock_student_pipeline(tmp_path, unet):
    tsm = attach(unet, TSMConfig(rank=4, alpha=8, scales=(1, 4), target_modules=["to_q"]))
    tsm.set_mode("expert", scale=4)
    tsm.save(tmp_path / "adapter")
    run = RunCard("distill", "stable-diffusion-v1-5/stable-diffusion-v1-5", run_dir=str(tmp_path),
                  student_timesteps=[999, 749, 499, 249], pipeline_class="StableDiffusionPipeline",
                  scores={"FID": 45.29, "KID x1e3": 7.4})
    write_run_card(tmp_path / "adapter", run)
    _, meta, body = load_card(tmp_path / "adapter")
    assert meta["license"] == "creativeml-openrail-m"  # the base model's, known for the shipped recipes' bases
    assert "| FID | 45.29 |" in body and "| KID x1e3 | 7.4 |" in body and NOT_MEASURED not in body
    assert "from tsm_distill.sampler import use_student_in_pipeline" in body
    assert "kwargs = use_student_in_pipeline(pipe, tsm, timesteps=[999, 749, 499, 249])" in body
    assert "at scale n = 4 only" in body and "| 4 | 0 | [0, 250) | active: the expert of t's interval | 249 |" in body


# ---------------------------------------------------------------------------- exported LoRA
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_an_exported_lora_has_a_card_naming_its_expert_interval_and_loader(sd_pipeline_path, tmp_path, fmt):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_path), safety_checker=None,
                                                   requires_safety_checker=False)
    tsm = attach(pipe.unet, TSMConfig(rank=4, alpha=8, scales=(1, 4), target_modules=["to_q", "to_v"]))
    tsm.export_lora(tmp_path / "lora", scale=4, expert=2, format=fmt)
    _, meta, body = load_card(tmp_path / "lora")
    # The base model is the pipeline folder the UNet was loaded from.
    assert meta["base_model"] == str(sd_pipeline_path) and meta["library_name"] == "diffusers"
    assert_tags(meta)
    assert "expert 2 of scale n = 4" in body and "timesteps t in [500, 750)" in body
    assert "rank 4, alpha 8" in body and "scales were [1, 4]" in body
    assert f'pipe.load_lora_weights("{tmp_path / "lora"}")' in body
    assert ("kohya keys" in body) == (fmt == "kohya")
    # An explicit base model wins over the one the model's config records.
    tsm.export_lora(tmp_path / "lora", scale=1, expert=0, format=fmt, base_model="stabilityai/stable-diffusion-2")
    _, meta, body = load_card(tmp_path / "lora")
    assert meta["base_model"] == "stabilityai/stable-diffusion-2" and meta["license"] == "openrail++"
    assert "expert 0 of scale n = 1" in body and "[0, 1000)" in body


def test_method_section_names_core_context_and_the_symmetric_baseline():
    cfg = TSMConfig(rank=4, alpha=4, scales=(1, 2, 8), target_modules=["to_q"])
    mixture = method_section(cfg, "mixture", {"core_scale": 8, "context_scales": [1, 2]})
    assert "core scale n = 8 is always on" in mixture and "context scales n = [1, 2]" in mixture
    assert "| 8 | 7 | [875, 1000) | core: always on |" in mixture
    assert "| 2 | 1 | [500, 1000) | context: gated by the router |" in mixture
    symmetric = method_section(cfg, "symmetric", {"core_scale": 8, "context_scales": [1, 2]})
    assert "ablation baseline" in symmetric and "| 8 | 0 | [0, 125) | gated by the router |" in symmetric
    # Flow-matching students step at t = sigma T (floats); t = T belongs to the last interval.
    flow = method_section(TSMConfig(scales=(4,), target_modules=["to_q"]), "expert", {"scale": 4},
                          student_timesteps=[1000.0, 749.0, 499.0, 249.0])
    assert "| 4 | 3 | [750, 1000) | active: the expert of t's interval | 1000 |" in flow
