"""The demo's budget curve: generator steps at an iteration, equal-budget pairs, and the curve over seeds."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.test_demo_seeds import results
from tsm_distill.demo import budget as db
from tsm_distill.demo import seeds as ds


def phases(*spec):
    return [{"name": f"p{i}", "steps": s, "fake_updates_per_generator_update": f, "type": t}
            for i, (s, f, t) in enumerate(spec)]


def test_generator_steps_at_counts_updates_at_iterations_0_F_2F_of_each_phase():
    ph = phases((10, 4, "foster"), (6, 2, "foster"))
    # phase 0 updates the student at its iterations 0, 4, 8; phase 1 at 0, 2, 4
    assert [db.generator_steps_at(ph, s) for s in (0, 1, 4, 5, 9, 10, 11, 12, 13, 16, 99)] == \
        [0, 1, 1, 2, 3, 3, 4, 4, 5, 6, 6]


def make_run(root, name, spec, checkpoints=(), broken=()):
    run = root / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"phases": phases(*spec)}))
    for i, _ in enumerate(spec):
        (run / "phases" / f"{i:02d}_p{i}").mkdir(parents=True)
    for step in (*checkpoints, *broken):
        ck = run / "checkpoints" / f"step_{step:08d}"
        ck.mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(ck / "generator.safetensors"))
        if step not in broken:  # a checkpoint without its state file is unfinished (a killed save)
            (ck / "trainer_state.json").write_text(json.dumps({"step": step}))
    return run


def test_pairs_are_the_common_iterations_of_both_runs_up_to_the_end_of_fostering(tmp_path):
    make_run(tmp_path, "lora", [(8, 2, "foster"), (4, 2, "foster")], checkpoints=(4, 8, 12), broken=(6,))
    make_run(tmp_path, "tsm", [(2, 2, "foster"), (2, 2, "foster"), (4, 2, "foster"), (4, 2, "foster"),
                               (2, 2, "assemble")], checkpoints=(4, 6, 12, 14))
    pairs = db.equal_budget_pairs(tmp_path)
    # LoRA: phase ends 8, 12 + checkpoints 4 (6 is unfinished). TSM: phase ends 2, 4, 8, 12 (+14 is the
    # router phase: not a stage-1 student) + checkpoint 6. Common: 4, 8, 12.
    assert [p["global_step"] for p in pairs] == [4, 8, 12]
    assert [p["generator_steps"] for p in pairs] == [2, 4, 6]
    assert [p["fraction"] for p in pairs] == [pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), 1.0]
    # a phase adapter wins over a checkpoint at the same step; paths are relative to the seed folder
    assert pairs[0]["sources"] == {"lora": "lora/checkpoints/step_00000004", "tsm_stage1": "tsm/phases/01_p1"}
    assert pairs[1]["sources"] == {"lora": "lora/phases/00_p0", "tsm_stage1": "tsm/phases/02_p2"}


def test_runs_with_different_fake_updates_are_not_an_equal_budget(tmp_path):
    make_run(tmp_path, "lora", [(8, 2, "foster")], checkpoints=(4,))
    make_run(tmp_path, "tsm", [(4, 4, "foster"), (4, 4, "foster")])
    with pytest.raises(ValueError, match="fake_updates_per_generator_update differ"):
        db.equal_budget_pairs(tmp_path)


def test_a_missing_recipe_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tsm-distill run folder"):
        db.read_phases(tmp_path / "lora")


def curve(seed, *points):
    return {"seed": seed, "points": [{"generator_steps": g, "fraction": g / 300, "lora": {"fid": lo, "kid": 0.0},
                                      "tsm_stage1": {"fid": ts, "kid": 0.0}} for g, lo, ts in points]}


def test_curves_aggregate_per_budget_point_over_the_seeds_that_have_it():
    entries = db.aggregate_curves([curve(4, (100, 70.0, 60.0), (300, 58.0, 47.0)),
                                   curve(3, (100, 64.0, 66.0), (300, 60.0, 45.0)),
                                   curve(1, (300, 56.0, 46.0))])
    assert [e["generator_steps"] for e in entries] == [100, 300]
    first, last = entries
    assert first["seeds"] == [3, 4] and last["seeds"] == [1, 3, 4]
    assert first["lora"]["fid_mean"] == pytest.approx(67.0) and first["tsm_stage1"]["fid_mean"] == pytest.approx(63.0)
    assert first["lora"]["fid_std"] == pytest.approx(18 ** 0.5)
    d = first["tsm_stage1_minus_lora"]
    assert d["mean"] == pytest.approx(-4.0) and d["tsm_wins"] == 1 and d["n_seeds"] == 2
    assert last["tsm_stage1_minus_lora"]["mean"] == pytest.approx((-10 - 15 - 11) / 3)
    assert last["tsm_stage1_minus_lora"]["tsm_wins"] == 3
    assert last["per_seed"][0] == {"seed": 1, "lora": 56.0, "tsm_stage1": 46.0}
    md = db.format_curves(entries)
    assert "| 100 | 0.33 | 3, 4 | 67.00 +- 4.24 | 63.00 +- 4.24 | -4.00 +- 8.49 |" in md


def test_the_seed_aggregate_adds_the_curve_of_the_folders_that_have_one(tmp_path):
    for seed, c in ((0, None), (1, curve(1, (100, 70.0, 60.0), (300, 50.0, 46.0)))):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(results(seed)))
        if c:
            (folder / "budget.json").write_text(json.dumps(c))
    assert ds.main(["aggregate", str(tmp_path)]) == 0
    agg = json.loads((tmp_path / "seeds.json").read_text())
    assert [e["seeds"] for e in agg["budget_curve"]] == [[1], [1]]
    assert agg["budget_curve"][0]["tsm_stage1_minus_lora"]["mean"] == pytest.approx(-10.0)
    assert "## Budget curve" in (tmp_path / "seeds.md").read_text()
    assert (tmp_path / "budget.png").stat().st_size > 0
    # without any budget.json the aggregate is as before: no curve, no plot
    (tmp_path / "seed1" / "budget.json").unlink()
    (tmp_path / "budget.png").unlink()
    assert ds.main(["aggregate", str(tmp_path)]) == 0
    assert "budget_curve" not in json.loads((tmp_path / "seeds.json").read_text())
    assert not (tmp_path / "budget.png").exists()


def test_run_folders_saved_with_the_old_phase_keys_still_read(tmp_path):
    run = tmp_path / "lora"
    run.mkdir()
    old = [{"name": "a", "iterations": 8, "mode": "expert", "fake_updates_per_generator_update": 2},
           {"name": "r", "iterations": 4, "mode": "mixture", "fake_updates_per_generator_update": 2}]
    (run / "recipe.yaml").write_text(yaml.safe_dump({"phases": old}))
    assert [(p["steps"], p["type"]) for p in db.read_phases(run)] == [(8, "foster"), (4, "assemble")]


def test_selected_pairs_keep_the_whole_budget_and_refuse_counts_without_a_pair(tmp_path):
    make_run(tmp_path, "lora", [(8, 2, "foster"), (4, 2, "foster")], checkpoints=(4,))
    make_run(tmp_path, "tsm", [(2, 2, "foster"), (2, 2, "foster"), (4, 2, "foster"), (4, 2, "foster")])
    pairs = db.equal_budget_pairs(tmp_path)
    assert [p["generator_steps"] for p in db.select_pairs(pairs, [2])] == [2, 6]
    assert db.select_pairs(pairs, None) == pairs
    with pytest.raises(ValueError, match=r"no equal-budget pair at \[3\].*pairs at \[2, 4, 6\]"):
        db.select_pairs(pairs, [3])
