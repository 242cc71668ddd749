"""What the small LoRA-vs-TSM experiments (tools/exp_mnist.py, tools/exp_video.py) share.

The same protocol in both: three runs of S optimizer steps each from the same start and data (vanilla
LoRA at n = 1; TSM stage 1 at n = 4; TSM stage 2 = n = 4 for 0.6 S, n = 1 for 0.2 S, the router for
0.2 S with core 4 and context 1), plus the untrained start; each scored by Inception FID/KID against
held-out real data and written to results.json as it finishes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def equal_step_recipes(common: dict, out: Path, steps: int, lr: float) -> dict[str, dict]:
    """The three runs' finetune recipes: ``common`` (model, data, experts, train) plus their stages
    (`tsm_core.finetune.mnist.protocol.equal_compute_stages`) and run folders ``out/<run>``."""
    from tsm_core.finetune.mnist.protocol import equal_compute_stages

    return {name: {**common, "stages": st, "train": {**common["train"], "run_dir": str(out / name)}}
            for name, st in equal_compute_stages(steps, lr).items()}


def trained_model(kind: str, model: Path, recipe: dict | None):
    """``(backbone, tsm)``: the untrained start when ``recipe`` is None, else the model after training the
    recipe (a re-run of the experiment replaces its earlier run)."""
    from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer, load_finetuned
    from tsm_core.models import load_backbone
    from tsm_core.train.recipe import load_recipe

    if recipe is None:
        return load_backbone(kind, model), None
    loaded = load_recipe(recipe, FinetuneRecipe)
    FinetuneTrainer(loaded).train(overwrite=True)
    bb, tsm, _ = load_finetuned(kind, model, loaded.train.run_dir)
    return bb, tsm


def record_run(results: dict, name: str, features, reference, start: float, train_seconds: float,
               out: Path) -> None:
    """Score one run (clean-fid's FID, exact, without the 2048^2 sqrtm; KID) into ``results`` and rewrite
    ``out/results.json``, so a stopped experiment keeps the runs it finished."""
    from tsm_core.eval import fid_low_rank, kid_from_features

    kid, kid_std = kid_from_features(features, reference)
    results["runs"][name] = {"fid": fid_low_rank(features, reference), "kid": kid, "kid_std": kid_std,
                             "train_seconds": round(train_seconds, 1),
                             "total_seconds": round(time.time() - start, 1)}
    print(name, json.dumps(results["runs"][name]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
