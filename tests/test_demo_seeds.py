"""tsm-demo over seeds: paired statistics on hand-made results, resume, failed seeds, the LoRA batch protocol."""

import json
import math
import sys

import pytest

from tsm_distill.demo import eval as ev
from tsm_distill.demo import report as rep
from tsm_distill.demo import run as demo
from tsm_distill.demo import seeds as ds

T_975_DF2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)


def results(seed=None, lora=50.0, s1=46.0, s2=44.0, kids=(0.010, 0.008, 0.007), n=1000, multiplier=None,
            command=None, students=True):
    """A results.json as tsm-demo writes it (reference rows + the three student rows)."""
    rows = [{"row": "real train images (floor)", "fid": 28.0, "kid_mean": 1e-4, "kid_std": 0.0, "n": n},
            {"row": "teacher DDIM 50", "fid": 54.0, "kid_mean": 0.014, "kid_std": 0.0, "n": n},
            {"row": "teacher DDIM 4 (no distillation)", "fid": 62.0, "kid_mean": 0.020, "kid_std": 0.0, "n": n}]
    if students:
        rows += [{"row": name, "fid": fid, "kid_mean": kid, "kid_std": 0.0, "n": n}
                 for name, fid, kid in zip(["DMD2 + LoRA", "DMD2 + TSM stage 1 (experts)",
                                            "DMD2 + TSM stage 2 (router)"], (lora, s1, s2), kids)]
    out = {"rows": rows, "n": n, "n_reference": 1000, "teacher_unet_sha256": "abc",
           "budget": {"lora": 300, "tsm_stage1": 300, "tsm_stage2_router": 25},
           "command": command or f"tsm-demo --seed {seed}"}
    if seed is not None:
        out["seed"] = seed
    if multiplier is not None:
        out["protocol"] = ds.protocol(multiplier)
    return out


# Three seeds, given out of order: FIDs (LoRA, stage 1, stage 2) and KIDs (LoRA, stage 1, stage 2).
HAND = [results(2, 48.0, 44.0, 42.0, (0.012, 0.009, 0.008)),
        results(0, 50.0, 46.0, 44.0, (0.010, 0.008, 0.007)),
        results(1, 46.0, 45.0, 47.0, (0.008, 0.009, 0.010))]


def test_aggregate_matches_hand_computed_means_stds_differences_and_wins():
    agg = ds.aggregate(HAND, sources=["a", "b", "c"])
    assert [r["seed"] for r in agg["seeds"]] == [0, 1, 2]
    assert agg["seeds"][0] == {"seed": 0, "n": 1000, "floor": 28.0, "floor_kid": 1e-4, "teacher_full": 54.0,
                               "teacher_full_kid": 0.014, "teacher_few": 62.0, "teacher_few_kid": 0.020,
                               "lora": 50.0, "lora_kid": 0.010, "tsm_stage1": 46.0, "tsm_stage1_kid": 0.008,
                               "tsm_stage2": 44.0, "tsm_stage2_kid": 0.007, "lora_batch_multiplier": 1, "protocol": "recipe",
                               "source": "b"}
    # LoRA 50, 46, 48: mean 48, deviations 2, -2, 0 -> sample variance 8 / 2 = 4.
    assert agg["rows"]["lora"]["fid_mean"] == pytest.approx(48.0)
    assert agg["rows"]["lora"]["fid_std"] == pytest.approx(2.0)
    assert agg["rows"]["tsm_stage2"]["fid_mean"] == pytest.approx(133 / 3)
    assert agg["rows"]["floor"]["fid_std"] == 0.0 and agg["rows"]["teacher_full"]["name"] == "teacher DDIM 50"
    assert agg["rows"]["lora"]["kid_mean"] == pytest.approx(0.010)
    # Stage 2 - LoRA per seed: -6, +1, -6 -> mean -11/3, deviations -7/3, 14/3, -7/3 -> variance 294/9 / 2.
    p2 = agg["paired"]["tsm_stage2_minus_lora"]
    assert [d["fid_diff"] for d in p2["per_seed"]] == pytest.approx([-6.0, 1.0, -6.0])
    assert p2["mean"] == pytest.approx(-11 / 3) and p2["std"] == pytest.approx(math.sqrt(147 / 9))
    assert p2["tsm_wins"] == 2 and p2["n_seeds"] == 3
    assert p2["kid_mean_diff"] == pytest.approx((-0.003 + 0.002 - 0.004) / 3) and p2["kid_tsm_wins"] == 2
    half = T_975_DF2 * math.sqrt(147 / 9) / math.sqrt(3)
    assert p2["ci95_t"] == pytest.approx([-11 / 3 - half, -11 / 3 + half])
    # Stage 1 - LoRA: -4, -1, -4: TSM wins all three.
    p1 = agg["paired"]["tsm_stage1_minus_lora"]
    assert p1["mean"] == pytest.approx(-3.0) and p1["tsm_wins"] == 3
    assert agg["ratio"]["tsm_stage2_over_lora"] == pytest.approx((133 / 3) / 48)
    assert agg["ratio"]["tsm_stage1_over_lora"] == pytest.approx(45 / 48)
    assert agg["protocol"] == {"name": "recipe", "lora_batch_multiplier": 1, "label": "equal compute"}
    for p in (p1, p2):  # the percentile bootstrap stays inside the observed differences and holds the mean
        lo, hi = p["ci95_bootstrap"]
        diffs = [d["fid_diff"] for d in p["per_seed"]]
        assert min(diffs) <= lo <= p["mean"] <= hi <= max(diffs)
    assert p2["ci95_bootstrap_below_zero"] is False  # seed 1's +1 can be drawn three times


def test_bootstrap_collapses_to_the_value_when_all_differences_are_equal_and_is_reproducible():
    same = [results(s, 50.0 + s, 47.5 + s, 47.5 + s) for s in range(5)]
    p = ds.aggregate(same)["paired"]["tsm_stage2_minus_lora"]
    assert p["ci95_bootstrap"] == pytest.approx([-2.5, -2.5]) and p["ci95_t"] == pytest.approx([-2.5, -2.5])
    assert p["ci95_bootstrap_below_zero"] is True and p["tsm_wins"] == 5
    values = [-3.0, 1.0, -2.0, -5.0, 0.5]
    assert ds.bootstrap_ci(values) == ds.bootstrap_ci(values)  # fixed generator seed
    assert ds.bootstrap_ci([-3.0]) is None and ds.t_interval([-3.0]) is None
    tie = ds.aggregate([results(0, 50.0, 50.0, 50.0), results(1, 50.0, 49.0, 51.0)])["paired"]
    assert tie["tsm_stage2_minus_lora"]["tsm_wins"] == 0 and tie["tsm_stage1_minus_lora"]["tsm_wins"] == 1  # a tie is no win


def test_one_seed_has_no_std_and_no_interval():
    agg = ds.aggregate([results(0)])
    assert agg["rows"]["lora"]["fid_std"] is None
    assert agg["paired"]["tsm_stage2_minus_lora"]["ci95_bootstrap"] is None
    assert "n/a (one seed)" in ds.format_markdown(agg)


def test_aggregate_refuses_duplicate_seeds_mixed_settings_and_unfinished_seeds():
    with pytest.raises(ValueError, match="appears twice"):
        ds.aggregate([results(0), results(0, lora=40.0)])
    with pytest.raises(ValueError, match="lora_batch_multiplier"):
        ds.aggregate([results(0, multiplier=1), results(1, multiplier=4)])
    with pytest.raises(ValueError, match="differ in n"):
        ds.aggregate([results(0), results(1, n=500)])
    with pytest.raises(ValueError, match="did not finish"):
        ds.aggregate([results(0), results(1, students=False)])
    with pytest.raises(ValueError, match="no finished seed"):
        ds.aggregate([])


def test_seed_comes_from_the_field_or_else_the_recorded_command():
    assert ds.seed_of({"seed": 4, "command": "tsm-demo --seed 1"}) == 4
    assert ds.seed_of({"command": "tsm-demo --seed 1 --threads 1 --run-dir /x/seed1"}) == 1
    assert ds.seed_of({"command": "tsm-demo --seed=3"}) == 3
    assert ds.seed_of({"command": "tsm-demo --run-dir /x/seed0"}) == 0  # tsm-demo's default seed
    with pytest.raises(ValueError, match="neither"):
        ds.seed_of({})


def _fake_runner(calls, fail=()):
    """A per-seed runner that records its calls and writes finished results (or fails for ``fail``)."""
    def run_seed(seed, folder, child_args, threads):
        calls.append((seed, list(child_args), threads))
        if seed in fail:
            return 3
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results(seed, lora=50.0 + seed, s2=44.0 + seed)))
        return 0
    return run_seed


def test_a_stopped_sweep_resumes_skipping_finished_seeds_and_rerunning_broken_ones(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ds, "run_seed", _fake_runner(calls))
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "results.json").write_text(json.dumps(results(0)))  # finished
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "results.json").write_text('{"rows": [')  # killed mid-write
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "results.json").write_text(json.dumps(results(2, students=False)))  # no student rows
    argv = ["--seeds", "0", "1", "2", "3", "--run-dir", str(tmp_path), "--quick", "--n", "20"]
    assert demo.main(argv) == 0
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] == ["--quick", "--n", "20"] and calls[0][2] == 1  # passed through; one thread each
    assert "skipped seeds 0" in capsys.readouterr().out
    agg = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in agg["seeds"]] == [0, 1, 2, 3] and agg["missing"] == []
    # Everything finished: a rerun runs nothing and still rebuilds the aggregate.
    (tmp_path / "seeds.json").unlink()
    assert demo.main(argv) == 0
    assert len(calls) == 3 and (tmp_path / "seeds.json").exists()
    assert "skipped seeds 0, 1, 2, 3" in capsys.readouterr().out


def test_a_failed_seed_exits_non_zero_naming_it_while_the_others_run(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ds, "run_seed", _fake_runner(calls, fail={1}))
    assert demo.main(["--seeds", "0", "1", "2", "--jobs", "2", "--run-dir", str(tmp_path)]) == 1
    assert sorted(c[0] for c in calls) == [0, 1, 2]
    assert "FAILED seeds: 1 " in capsys.readouterr().err
    agg = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in agg["seeds"]] == [0, 2] and agg["missing"] == [str(tmp_path / "seed1")]
    assert "Missing (not finished, not counted)" in (tmp_path / "seeds.md").read_text()


def test_run_seed_logs_the_subprocess_and_returns_its_exit_status(tmp_path, monkeypatch):
    script = "import os; print('child says hi', os.environ['OMP_NUM_THREADS']); raise SystemExit(3)"
    monkeypatch.setattr(ds, "seed_command", lambda seed, folder, args: [sys.executable, "-c", script])
    assert ds.run_seed(7, tmp_path / "seed7", ["--quick"], threads=1) == 3
    log = (tmp_path / "seed7" / "demo.log").read_text()
    assert "child says hi 1" in log and "$ " in log


def test_each_seed_runs_the_single_seed_demo_with_the_sweep_options():
    argv = ["--quick", "--seeds", "0", "1", "--jobs", "2", "--n", "10", "--run-dir", "out",
            "--lora-batch-multiplier", "4"]
    child = ds.passthrough_args(argv)
    assert child == ["--quick", "--n", "10", "--lora-batch-multiplier", "4"]
    cmd = ds.seed_command(1, ds.seed_folder("out", 1), child)
    assert cmd[:3] == [sys.executable, "-m", "tsm_distill.demo"]
    args = demo.parse_args(cmd[3:])  # what the child will see
    assert (args.seed, args.seeds, args.quick, args.n, args.lora_batch_multiplier) == (1, None, True, 10, 4)
    assert str(args.run_dir) == str(ds.seed_folder("out", 1))
    with pytest.raises(SystemExit):  # one seed or several, not both
        demo.parse_args(["--seed", "1", "--seeds", "2", "3"])
    with pytest.raises(ValueError, match="at least 1"):
        demo.parse_args(["--lora-batch-multiplier", "0"])


def test_lora_batch_multiplier_scales_only_the_lora_phases(tmp_path):
    def batches(extra):
        args = demo.parse_args(["--run-dir", str(tmp_path), *extra])
        lora, tsm, budget = demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)
        return [p.batch_size for p in lora.phases], [p.batch_size for p in tsm.phases], budget

    lora1, tsm1, budget1 = batches([])
    lora4, tsm4, budget4 = batches(["--lora-batch-multiplier", "4"])
    assert lora4 == [4 * b for b in lora1] and tsm4 == tsm1
    assert budget4 == budget1  # generator steps do not depend on the batch
    lora_b, tsm_b, _ = batches(["--batch-size", "8", "--lora-batch-multiplier", "4"])
    assert set(lora_b) == {32} and set(tsm_b) == {8}
    assert ds.protocol(4)["label"] == "LoRA at 4x batch, equal generator steps (A.3's batch ratio only)"
    assert ds.protocol(1)["label"] == "equal compute"


def test_aggregate_command_reads_single_seed_folders_and_labels_the_protocol(tmp_path):
    old = {"a": "tsm-demo --run-dir a", "b": "tsm-demo --run-dir b --seed 1"}  # before seed/protocol fields
    for name, command in old.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results(command=command)))
    out = tmp_path / "agg"
    assert ds.main(["aggregate", str(out), "--from", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    agg = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in agg["seeds"]] == [0, 1] and agg["protocol"]["label"] == "equal compute"
    assert "equal compute" in (out / "seeds.md").read_text() and (out / "seeds.png").stat().st_size > 0
    # A folder named for one seed that holds another seed's results is refused.
    (tmp_path / "seed5").mkdir()
    (tmp_path / "seed5" / "results.json").write_text(json.dumps(results(0)))
    with pytest.raises(ValueError, match="not of seed 5"):
        ds.main(["aggregate", str(tmp_path)])


def test_results_md_names_the_seed_and_protocol(tmp_path):
    meta = {"mode": "full", "seed": 3, "protocol": ds.protocol(4)}
    _, md = rep.write_results(tmp_path, results(3)["rows"], meta)
    assert "Seed 3; protocol: LoRA at 4x batch, equal generator steps" in md.read_text()


def test_lr_scale_scales_both_students_generator_rates_and_keeps_seeds_apart(tmp_path):
    args = demo.parse_args(["--quick", "--lr-scale", "0.3333", "--run-dir", str(tmp_path)])
    lora, tsm, _ = demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)
    base_lora, base_tsm, _ = demo.build_recipes(demo.parse_args(["--quick", "--run-dir", str(tmp_path)]), tmp_path,
                                                ev.DEFAULT_TEACHER)
    for new, old in ((lora, base_lora), (tsm, base_tsm)):
        assert [p.lr for p in new.phases] == pytest.approx([0.3333 * p.lr for p in old.phases])
        assert [p.lr_critic for p in new.phases] == [p.lr_critic for p in old.phases]  # the fake score's stays
    with pytest.raises(ValueError, match="--lr-scale must be positive"):
        demo.parse_args(["--quick", "--lr-scale", "0"])
    # seeds at another learning rate are not averaged with the recipe's (runs without the field: x1)
    with pytest.raises(ValueError, match="differ in lr_scale"):
        ds.aggregate([results(0), dict(results(1), lr_scale=1 / 3)])
    agg = ds.aggregate([dict(results(0), lr_scale=0.5), dict(results(1), lr_scale=0.5)])
    assert agg["lr_scale"] == 0.5 and "learning rates x0.5" in ds.format_markdown(agg)


def test_lr_fairness_picks_each_students_better_rate_on_the_mean_and_pairs_there(tmp_path):
    from tsm_distill.demo import lr as demo_lr

    def at(rate, *a, **kw):
        return dict(results(*a, **kw), lr_scale=rate)

    # Rate 1: LoRA 60, 58, 62 (mean 60); rate 1/3: LoRA 50, 59, 53 (mean 54) -> LoRA's better rate is 1/3.
    # TSM stage 2: rate 1 -> 44, 45, 46 (mean 45); rate 1/3 -> 43, 48, 47 (mean 46) -> stage 2 keeps rate 1,
    # although seed 0 alone did better at 1/3 (the choice is on the mean, not per seed).
    runs = [at(1.0, 0, 60.0, 46.0, 44.0), at(1.0, 1, 58.0, 47.0, 45.0), at(1.0, 2, 62.0, 48.0, 46.0),
            at(1 / 3, 0, 50.0, 45.0, 43.0), at(1 / 3, 1, 59.0, 46.0, 48.0), at(1 / 3, 2, 53.0, 47.0, 47.0),
            at(1 / 3, 3, 40.0, 39.0, 38.0)]  # seed 3 ran at one rate only: listed, not paired
    rep = demo_lr.lr_fairness(runs, [f"r{i}" for i in range(len(runs))])
    assert rep["rates"] == [1.0, 1 / 3] and rep["common_seeds"] == [0, 1, 2]
    assert rep["better_rate"] == {"lora": 1 / 3, "tsm_stage1": 1 / 3, "tsm_stage2": 1.0}
    assert rep["mean_on_common_seeds"][str(1 / 3)]["lora"] == pytest.approx(54.0)
    p2 = rep["paired_at_better_rates"]["tsm_stage2_minus_lora"]
    assert [d["fid_diff"] for d in p2["per_seed"]] == pytest.approx([44 - 50, 45 - 59, 46 - 53])
    assert p2["tsm_wins"] == 3 and p2["n_seeds"] == 3
    assert [e["seed"] for e in rep["per_seed"]] == [0, 1, 2, 3] and str(1.0) not in rep["per_seed"][3]
    assert rep["per_seed"][0][str(1.0)] == {"lora": 60.0, "tsm_stage1": 46.0, "tsm_stage2": 44.0, "device": "cpu"}
    paths = demo_lr.write_report(tmp_path, rep)
    assert json.loads(paths[0].read_text())["better_rate"]["tsm_stage2"] == 1.0
    assert "| 3 | - | 40.00 (cpu) |" in paths[1].read_text()
    # Refusals: one rate only; a setting other than the rate differs; no seed at every rate.
    with pytest.raises(ValueError, match="two or more rates"):
        demo_lr.lr_fairness(runs[:3], ["a", "b", "c"])
    with pytest.raises(ValueError, match="differ in n"):
        demo_lr.lr_fairness([at(1.0, 0), at(0.5, 0, n=500)], ["a", "b"])
    with pytest.raises(ValueError, match="no seed ran at every rate"):
        demo_lr.lr_fairness([at(1.0, 0), at(0.5, 1)], ["a", "b"])
