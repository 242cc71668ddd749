"""The model-family registry: a family added from inside a test (one class + one registry call) trains with
both trainers and is planned by --plan, though no file of the library names it."""

import shutil

import pytest
import torch

from tests.test_distill import changed, env, params, phase  # noqa: F401  (env: the tiny teacher fixture)
from tests.test_distill import recipe as distill_recipe
from tests.test_finetune import _recipe as finetune_recipe
from tests.test_finetune import folder  # noqa: F401  (the tiny image-folder fixture)
from tsm_core.models import (
    UNetBackbone,
    backbone_class,
    kinds,
    load_backbone,
    register_backbone,
    unregister_backbone,
)
from tsm_core.train.sections import ModelSection

KIND = "toy_unet"


@pytest.fixture
def toy():
    """A family no library file knows: the SD UNet interface, counting its denoiser calls."""

    class ToyUNetBackbone(UNetBackbone):
        kind = KIND
        calls = 0

        def predict(self, *args, **kwargs):
            type(self).calls += 1
            return super().predict(*args, **kwargs)

    register_backbone(ToyUNetBackbone)
    yield ToyUNetBackbone
    unregister_backbone(KIND)


def test_registry_lists_families_and_their_traits(toy, env):  # noqa: F811
    assert KIND in kinds() and KIND in kinds(distillable=True) and KIND not in kinds(video=True)
    assert set(kinds(flow=True)) == {"sd3", "flux"} and {"unet3d", "animatediff"} == set(kinds(video=True))
    assert {"unet", "sdxl", "sd3", "flux"} <= set(kinds(distillable=True)) and "pixart" not in kinds(distillable=True)
    assert backbone_class(KIND) is toy and isinstance(load_backbone(KIND, env[1]), toy)
    with pytest.raises(ValueError, match="taken by"):
        register_backbone(type("Other", (UNetBackbone,), {"kind": "unet"}))
    with pytest.raises(ValueError, match="not a tsm_core.models.Backbone"):
        register_backbone(dict)
    assert ModelSection(path="p", kind=KIND).kind == KIND  # recipe validation reads the registry
    unregister_backbone(KIND)
    with pytest.raises(ValueError, match=f"unknown backbone kind '{KIND}'.*'sd3'"):
        backbone_class(KIND)
    with pytest.raises(ValueError, match="unknown backbone kind"):
        ModelSection(path="p", kind=KIND)
    register_backbone(toy)  # the fixture unregisters it again


def test_a_registered_family_fine_tunes(toy, tmp_path, folder, sd_pipeline_path):  # noqa: F811
    from tsm_core.finetune import FinetuneTrainer

    r = finetune_recipe(KIND, sd_pipeline_path, folder, tmp_path / "run",
                        [{"type": "foster", "scale": 4, "steps": 2, "lr": 1e-2}], checkpoint_every=1000)
    trainer = FinetuneTrainer(r)
    assert isinstance(trainer.backbone, toy)
    before = {k: v.clone() for k, v in trainer.tsm.state_dict().items()}
    trainer.train()
    assert toy.calls >= 2  # every step went through the registered family's predict
    assert any(not torch.equal(v, before[k]) for k, v in trainer.tsm.state_dict().items())


def test_a_registered_family_distills_and_is_planned(toy, env, tmp_path):  # noqa: F811
    from tsm_distill.plan import plan_recipe
    from tsm_distill.trainer import DMD2Trainer

    phases = [phase("e3", scale=4, experts=[3])]
    r = distill_recipe(env, phases)
    r.model.kind = KIND
    trainer = DMD2Trainer(r, tmp_path / "run")
    assert isinstance(trainer.teacher, toy)
    before = params(trainer.teacher.denoiser)
    trainer.train()
    assert toy.calls > 0
    assert changed(before, trainer.teacher.denoiser) and all(".lora_" in n for n in changed(before, trainer.teacher.denoiser))
    # --plan builds the family on the meta device from config files alone: the same bytes as the UNet it wraps.
    config_only = tmp_path / "configs"
    shutil.copytree(env[1], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    r.model.path = str(config_only)
    (toy_plan,) = plan_recipe(r)
    r.model.kind = "unet"
    (unet_plan,) = plan_recipe(r)
    assert toy_plan.weights == unet_plan.weights > 0 and toy_plan.total == unet_plan.total
