"""Every fine-tuning recipe in recipes/ loads, holds the paper's values, and the CLI runs one."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsm_core.finetune import FinetuneRecipe, plan_phases
from tsm_core.train.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# The distillation recipes (sd15_dmd2_*) share the sd15_ prefix but belong to tsm_distill.
FINETUNE = sorted(p for pat in ("*_domain_*.yaml", "*_posttrain_*.yaml", "*_ablation_*.yaml")
                  for p in RECIPES.glob(pat))


def test_recipes_exist_for_every_family():
    names = {p.name for p in FINETUNE}
    for model in ("sd15", "sd2", "pixart", "sd3"):
        assert f"{model}_domain_lora.yaml" in names and f"{model}_domain_tsm.yaml" in names
    assert "pixart_posttrain_tsm.yaml" in names and "mnist_domain_tsm.yaml" in names


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    r = load_recipe(path, FinetuneRecipe)
    phases = plan_phases(r)
    assert phases and r.experts.target_modules
    if not path.name.startswith("mnist"):
        global_batch = 32 if path.name.startswith("video") else 64  # the paper's (A.2.2: 32 for video)
        assert r.train.batch_size == global_batch and r.recipe_version == 2  # batch_size is the global batch
        assert r.experts.rank == 4  # lost in the paper's text: Tab. 5 default
    if "_tsm" in path.name:
        assert phases[-1].mode == "mixture"
        if not path.name.startswith("mnist"):
            assert (phases[-1].core_scale, phases[-1].context_scales) == (8, (1,))  # the paper's default


def test_paper_values():
    sd3 = load_recipe(RECIPES / "sd3_domain_tsm.yaml", FinetuneRecipe)
    st = sd3.stages[0]
    assert (st.lr, st.weight_decay, st.text_encoder_lr, st.text_encoder_weight_decay) == (1e-5, 1e-4, 5e-6, 1e-3)
    assert sd3.experts.text_encoder_targets == ["q_proj", "k_proj", "v_proj", "out_proj"]
    pix = load_recipe(RECIPES / "pixart_domain_tsm.yaml", FinetuneRecipe)
    assert pix.experts.text_encoder_targets == ["q", "v"] and pix.stages[0].lr == 2e-5
    sd15 = load_recipe(RECIPES / "sd15_domain_lora.yaml", FinetuneRecipe)
    assert [(s.scale, s.steps, s.lr) for s in sd15.stages] == [(1, 4000, 1e-4)]
    seq = load_recipe(RECIPES / "sd15_ablation_foster_n8_sequential.yaml", FinetuneRecipe)
    assert plan_phases(seq)[-1].end == 32000  # Tab. 8: 4K steps per expert, 32K in all


def test_cli_runs_a_recipe_with_overrides(tmp_path, pixel_pipeline_path, capsys):
    from tsm_core.finetune.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(2):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": "a photo of a seven"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    argv = [str(RECIPES / "mnist_domain_tsm.yaml"), "--run-dir", str(run),
            "--set", f"model.path={pixel_pipeline_path}", "--set", f"data.path={data}", "--set", "data.resolution=16",
            "--set", "data.crop=resize", "--set", "train.batch_size=2", "--set", "stages.0.steps=2",
            "--set", "stages.1.steps=1", "--set", "stages.2.steps=1", "--set", "train.sample_steps=2"]
    assert main(argv) == 0
    assert (run / "adapter" / "tsm_adapter.safetensors").is_file()
    assert (run / "images" / "samples" / "00000004.png").is_file()
    assert load_recipe(run / "recipe.yaml", FinetuneRecipe).data.crop == "resize"
    assert main(argv + ["--resume"]) == 0  # already finished: resumes at the end and rewrites the adapter
    capsys.readouterr()
    assert main(argv) == 2  # a used folder without --resume/--overwrite: refused, nothing changed
    assert "already holds a run" in capsys.readouterr().err
    assert main([str(RECIPES / "mnist_domain_tsm.yaml"), "--set", "experts.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "experts.bogus" in err and err.count("\n") == 1
