"""One recipe vocabulary for both trainers (issue 12): shared sections, and old keys that fail naming
the new ones, in files and in --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsm_core.finetune import FinetuneRecipe
from tsm_core.train.recipe import load_recipe
from tsm_core.train.sections import ExpertsSection, ModelSection
from tsm_distill import DistillRecipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

FINETUNE = {"model": {"kind": "unet", "path": "m"}, "data": {"source": "folder", "path": "d"},
            "stages": [{"type": "foster", "scale": 1, "steps": 1}]}
DISTILL = {"model": {"path": "m"}, "phases": [{"name": "p", "steps": 1, "scale": 1}], "experts": {"scales": [1]}}


def _with(base: dict, **changes) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else [dict(x) for x in v] if isinstance(v, list) else v)
           for k, v in base.items()}
    for path, value in changes.items():
        node = out
        *parents, last = path.split("__")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        node[last] = value
    return out


def test_every_recipe_loads_with_its_schema():
    for path in sorted(RECIPES.glob("*.yaml")):
        schema = DistillRecipe if "dmd2" in path.name or path.name.startswith("demo_") else FinetuneRecipe
        r = load_recipe(path, schema)
        assert isinstance(r.model, ModelSection) and isinstance(r.experts, ExpertsSection), path.name
        assert r.train.keep_last == 3 or "keep_last" in path.read_text(), path.name  # one default in both


@pytest.mark.parametrize("schema, recipe, message", [
    (FinetuneRecipe, _with(FINETUNE, lora={"rank": 8}), r"'lora' was renamed: write experts"),
    (FinetuneRecipe, _with(FINETUNE, stages__0__lr_warmup_steps=10), r"'stages\[0\]\.lr_warmup_steps'.*warmup_steps"),
    (DistillRecipe, {**{k: v for k, v in DISTILL.items() if k != "model"}, "teacher": "m"}, r"'teacher'.*model: \{path"),
    (DistillRecipe, _with(DISTILL, phases__0__iterations=5), r"'phases\[0\]\.iterations'.*write steps"),
    (DistillRecipe, _with(DISTILL, phases__0__lr_generator=1e-4), r"'phases\[0\]\.lr_generator'.*write lr"),
    (DistillRecipe, _with(DISTILL, phases__0__mode="mixture"), r"'phases\[0\]\.mode'.*type \(expert -> foster, mixture"),
    (DistillRecipe, _with(DISTILL, data__sample_prompts=["a"]), r"'data\.sample_prompts'.*train\.sample_prompts"),
])
def test_old_keys_fail_naming_the_new_key(schema, recipe, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe, schema)


def test_old_keys_in_overrides_fail_naming_the_new_key():
    with pytest.raises(ValueError, match=r"'lora' was renamed: write experts"):
        load_recipe(FINETUNE, FinetuneRecipe, ["lora.rank=8"])
    with pytest.raises(ValueError, match=r"'phases\.0\.iterations'|'phases\[0\]\.iterations'|iterations' was renamed"):
        load_recipe(DISTILL, DistillRecipe, ["phases.0.iterations=3"])


def test_shared_sections_mean_the_same_in_both_trainers():
    ft = load_recipe(_with(FINETUNE, experts={"rank": 8, "alpha": 2, "router_input": "timestep"}), FinetuneRecipe)
    ds = load_recipe(_with(DISTILL, experts={"rank": 8, "alpha": 2, "router_input": "timestep", "scales": [1]}),
                     DistillRecipe)
    a, b = ft.experts.tsm_config([1, 4], 1000), ds.experts.tsm_config([1, 4], 1000)
    assert a == b and a.rank == 8 and a.router_input == "timestep"
    assert ft.train.keep_last == ds.train.keep_last == 3
    with pytest.raises(ValueError, match="model.kind 'pixart'.*supports"):  # one model section, checked per trainer
        load_recipe(_with(DISTILL, model={"path": "m", "kind": "pixart"}), DistillRecipe)
