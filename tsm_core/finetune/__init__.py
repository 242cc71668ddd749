"""Domain adaptation / post-pretraining with the diffusion loss: LoRA, TSM stage 1 and stage 2.

    from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer, load_finetuned
    from tsm_core.train.recipe import load_recipe

    recipe = load_recipe("recipes/sd15_domain_tsm.yaml", FinetuneRecipe, ["train.batch_size=8"])
    FinetuneTrainer(recipe).train(resume=False)
    bb, tsm, te = load_finetuned("unet", recipe.model.path, recipe.train.run_dir)
    images = bb.sample(["a photo of a cat"], tsm=tsm, reencode_prompts=bool(te))
"""

from .recipe import (
    DataSection,
    FinetuneExperts,
    FinetuneRecipe,
    ModelSection,
    Phase,
    StageSection,
    TrainSection,
    plan_phases,
)
from .trainer import FinetuneTrainer, load_finetuned, phase_folder

__all__ = [
    "DataSection",
    "FinetuneRecipe",
    "FinetuneExperts",
    "FinetuneTrainer",
    "ModelSection",
    "Phase",
    "StageSection",
    "TrainSection",
    "load_finetuned",
    "phase_folder",
    "plan_phases",
]
