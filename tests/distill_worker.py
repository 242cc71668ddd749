"""Worker for the 2-process distillation test (run by torch.distributed.run, not collected by pytest)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tsm_core.train.accel import make_accelerator
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer
from tsm_distill.data import PromptSource

if __name__ == "__main__":
    torch.set_num_threads(1)
    recipe_path, run_dir = sys.argv[1], Path(sys.argv[2])
    recipe = load_recipe(json.loads(Path(recipe_path).read_text()), DistillRecipe)
    acc = make_accelerator(cpu=True, seed=recipe.train.seed)
    seen = []
    original = PromptSource.sample
    PromptSource.sample = lambda self, n, g: seen.extend(original(self, n, g)) or seen[-n:]
    trainer = DMD2Trainer(recipe, run_dir, accelerator=acc)
    trainer.train()
    out = run_dir.parent
    rank = acc.process_index
    save_file({k: v.contiguous() for k, v in trainer.tsm.state_dict().items()}, out / f"rank{rank}.safetensors")
    (out / f"prompts{rank}.json").write_text(json.dumps(seen))
