"""tools/gpu_check.py, the prepared GPU check, in its CPU smoke mode: every shipped DMD2 recipe and phase kind
runs through the trainer's own steps on tiny configs, and the JSON carries what a GPU run would report."""

import json
import math

import pytest
import torch

from tools import gpu_check
from tsm_core.testing import tiny
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer
from tsm_distill.config import per_process_batch
from tsm_distill.plan import plan_recipe

SMOKE_BATCH = 2  # --smoke's default --batch-cap


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    out = work / "smoke.json"
    # --work keeps the tiny teachers the checked recipes name, for the planner to rebuild here
    assert gpu_check.main(["--smoke", "--out", str(out), "--work", str(work / "work")]) == 0
    return json.loads(out.read_text())


def first_phase_of_each_kind(path):
    kinds = {}
    for ph in load_recipe(path, DistillRecipe).phases:
        kinds.setdefault(gpu_check.phase_kind(ph), ph)
    return kinds


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_shipped_recipe_and_phase_kind_is_measured(smoke):
    recipes = gpu_check.shipped_recipes()
    assert {p.stem for p in recipes} == set(smoke["recipes"])
    assert {"sd15", "sdxl", "sd3", "flux"} <= {p.stem.split("_")[0] for p in recipes}
    seen = set()
    for path in recipes:
        entry = smoke["recipes"][path.stem]
        kinds = first_phase_of_each_kind(path)
        assert list(entry["phases"]) == list(kinds), path.name
        seen.update(kinds)
        for kind, ph in kinds.items():
            got = entry["phases"][kind]
            assert got["status"] == "ok", (path.name, kind, got["status"])
            assert (got["phase"], got["gan"]) == (ph.name, ph.gan)
            assert got["batch_per_process"] == min(per_process_batch(ph.batch_size, gpu_check.PROCESSES), SMOKE_BATCH)
            ratio = ph.fake_updates_per_generator_update
            assert got["fake_updates_per_generator_update"] == ratio
            # one iteration with the generator update, then a critic-only one (none when every iteration updates G)
            assert [r["generator_update"] for r in got["iterations"]] == [True] + [False] * (ratio > 1)
            assert all(positive(r["seconds"]) and not r["warm_up"] for r in got["iterations"])
            assert positive(got["seconds_generator_iteration"]) and positive(got["seconds_per_iteration"])
            assert positive(got["seconds_critic_iteration"]) == (ratio > 1)
            lo, hi = sorted([got["seconds_generator_iteration"], got["seconds_critic_iteration"] or 0.0])
            assert lo <= got["seconds_per_iteration"] <= hi or ratio == 1
            assert got["max_memory_allocated_bytes"] is None  # the CPU has no allocator peak: nothing faked
            plan = got["plan"]
            assert all(isinstance(v, int) and v > 0 for v in plan.values()), plan
            assert plan["total_bytes"] == (plan["weights_bytes"] + plan["optimizer_bytes"]
                                           + max(plan["generator_step_bytes"], plan["critic_step_bytes"]))
    assert seen == set(gpu_check.PHASE_KINDS)
    assert smoke["mode"] == "smoke" and positive(smoke["elapsed_seconds"])


def test_plan_figure_is_plan_recipe_of_the_recipe_that_ran(smoke):
    for name, entry in smoke["recipes"].items():
        recipe = load_recipe(entry["checked_recipe"], DistillRecipe)
        assert recipe.model.kind == entry["kind"] and not recipe.train.fsdp and not recipe.experts.init_from
        plans = plan_recipe(recipe, 1)
        assert [p.name for p in plans] == [ph["phase"] for ph in entry["phases"].values()], name
        for p, ph in zip(plans, entry["phases"].values()):
            assert ph["batch_per_process"] == p.batch_per_process
            assert ph["plan"] == {"total_bytes": p.total, "weights_bytes": p.weights, "optimizer_bytes": p.optimizer,
                                  "generator_step_bytes": p.generator_step, "critic_step_bytes": p.critic_step}, name


def test_a_phase_over_the_device_memory_is_skipped_with_its_reason(smoke, tmp_path):
    entry = json.loads(json.dumps(smoke["recipes"]["sd15_dmd2_tsm"]))
    figures = [ph.pop("plan") for ph in entry["phases"].values()]
    for ph in entry["phases"].values():
        for key in [k for k in ph if k not in ("phase", "type", "gan", "batch_per_process")]:
            del ph[key]
    gpu_check.check_recipe(gpu_check.REPO / entry["recipe"], entry, figures, teacher_path=tmp_path, device=torch.device("cpu"),
                           capacity=1, iterations=1, warm_up=False, clock=gpu_check.Clock(math.inf), work=tmp_path,
                           save=lambda: None)
    for ph, figure in zip(entry["phases"].values(), figures):
        assert ph["plan"] == figure
        assert ph["status"].startswith("skipped: the plan (") and "exceeds this device's" in ph["status"]


def test_an_exhausted_time_budget_skips_with_its_reason(tmp_path):
    out = tmp_path / "budget.json"
    assert gpu_check.main(["--smoke", "--only", "sd15_dmd2_lora", "--budget-seconds", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["recipes"]) == ["sd15_dmd2_lora"]
    for ph in doc["recipes"]["sd15_dmd2_lora"]["phases"].values():
        assert ph["status"].startswith("skipped: time budget (") and ph["plan"]["total_bytes"] > 0


def test_plans_from_a_worker_process_equal_the_smoke_runs(smoke):
    # the GPU mode's path: plans in spawned worker processes, each recipe yielded once its plan is ready
    entry = smoke["recipes"]["sd15_dmd2_lora"]
    got = list(gpu_check._plans({"sd15": entry}, 1, gpu_check.Clock(math.inf)))
    assert got == [("sd15", [ph["plan"] for ph in entry["phases"].values()])]


def test_gpu_mode_without_a_gpu_says_how_to_run(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU mode would run")
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_the_trainer_refuses_a_given_teacher_of_another_family(smoke, tmp_path):
    sdxl = gpu_check.random_teacher(tiny.build_sdxl_pipeline(tmp_path / "sdxl"), "sdxl", None, torch.device("cpu"),
                                    tmp_path / "tok")
    recipe = load_recipe(smoke["recipes"]["sd15_dmd2_lora"]["checked_recipe"], DistillRecipe)
    with pytest.raises(ValueError, match="'sdxl' backbone but the recipe's model.kind is 'unet'"):
        DMD2Trainer(recipe, tmp_path / "run", teacher=sdxl)
