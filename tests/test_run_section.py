"""One run section for both trainers: shared defaults, the global batch, the old-recipe guard, the run folder."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from tests.test_finetune import _recipe as finetune_recipe
from tests.test_finetune import folder  # noqa: F401  (the tiny image-folder fixture)
from tsm_core.finetune import FinetuneTrainer, TrainSection
from tsm_core.finetune.recipe import per_process_micro_batch
from tsm_core.train.cli import run_dir_of
from tsm_core.train.sections import RunSection
from tsm_distill.config import TrainConfig


def test_both_trainers_share_the_run_sections_keys_and_defaults():
    shared = {f.name for f in dataclasses.fields(RunSection)}
    assert {"run_dir", "seed", "max_grad_norm", "sample_every", "checkpoint_every", "keep_last"} <= shared
    assert RunSection(max_grad_norm=0).max_grad_norm == 0  # 0, like null, turns clipping off
    for section in (TrainConfig(), TrainSection()):
        assert isinstance(section, RunSection)
        for name in shared:  # one default each (max_grad_norm 1.0, sample_every 0, run_dir None, ...)
            assert getattr(section, name) == getattr(RunSection(), name), (type(section).__name__, name)
    for bad, match in (({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
                       ({"sample_every": -1}, "sample_every"), ({"max_grad_norm": -1.0}, "max_grad_norm")):
        for section in (TrainConfig, TrainSection, RunSection):
            with pytest.raises(ValueError, match=match):
                section(**bad)


def _with(recipe, version, batch, accumulation=1):
    recipe.recipe_version, recipe.train.batch_size = version, batch
    recipe.train.gradient_accumulation_steps = accumulation
    return recipe


def test_batch_size_is_global_and_an_old_recipe_is_refused_where_its_meaning_changed(tmp_path, folder,  # noqa: F811
                                                                                       sd_pipeline_path):
    r = finetune_recipe("unet", sd_pipeline_path, folder, tmp_path / "run", [{"type": "foster", "scale": 1, "steps": 1}])
    assert r.recipe_version == 1  # a dict without the key: written for the old meaning
    assert per_process_micro_batch(_with(r, 2, 64), 8) == 8
    assert per_process_micro_batch(_with(r, 2, 64, accumulation=2), 8) == 4
    assert per_process_micro_batch(_with(r, 1, 16), 1) == 16  # one process, no accumulation: both meanings agree
    with pytest.raises(ValueError, match="does not divide"):
        per_process_micro_batch(_with(r, 2, 6), 4)
    for processes, accumulation in ((2, 1), (1, 2)):
        with pytest.raises(ValueError, match=r"now the global batch.*recipe_version: 2") as e:
            per_process_micro_batch(_with(r, 1, 8, accumulation), processes)
        assert f"instead of {8 * processes * accumulation}" in str(e.value)
    # The trainer refuses the old recipe before any step, and splits a new one's global batch.
    with pytest.raises(ValueError, match="now the global batch"):
        FinetuneTrainer(_with(r, 1, 4, accumulation=2))
    trainer = FinetuneTrainer(_with(r, 2, 4, accumulation=2))
    assert trainer.micro_batch == 2
    sizes = []
    original = trainer._latents

    def record(batch, g):
        sizes.append(len(batch["text"]))
        return original(batch, g)

    trainer._latents = record
    trainer.train()
    assert sizes == [2, 2]  # one optimizer step = two micro-batches of 2 = the global batch of 4


def test_both_commands_choose_the_run_folder_the_same_way(tmp_path):
    recipe = argparse.Namespace(train=RunSection())
    args = argparse.Namespace(run_dir=None, recipe="recipes/sd15_dmd2_tsm.yaml")
    assert run_dir_of(args)(recipe) == Path("runs/sd15_dmd2_tsm") and recipe.train.run_dir == "runs/sd15_dmd2_tsm"
    recipe.train.run_dir = str(tmp_path / "from_recipe")
    assert run_dir_of(args)(recipe) == tmp_path / "from_recipe"
    args.run_dir = tmp_path / "from_cli"
    assert run_dir_of(args)(recipe) == tmp_path / "from_cli" and recipe.train.run_dir == str(tmp_path / "from_cli")
    with pytest.raises(ValueError, match="no run folder"):
        FinetuneTrainer(argparse.Namespace(train=TrainSection()))
