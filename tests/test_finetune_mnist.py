"""The fine-tuning experiment (tsm_core.finetune.mnist): protocol arithmetic, the aggregate's statistics, and
one tiny seed end to end (synthetic digits, a few steps) with its resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tsm_core.eval.seeds import paired
from tsm_core.finetune.mnist import protocol as mp
from tsm_core.finetune.mnist import seeds as ms


# ---------------------------------------------------------------------------- protocol arithmetic
def test_a1_protocol_gives_each_tsm_stage_as_many_steps_as_lora():
    runs = mp.runs(200, 1e-3, 4)
    assert runs["lora"] == {"stages": [mp.foster(1, 200, 1e-3)], "rank": 4}
    tsm = runs["a1_tsm"]["stages"]
    assert [(s["type"], s.get("scale"), s["steps"]) for s in tsm] == [
        ("foster", 8, 200), ("foster", 1, 200), ("assemble", None, 200)]
    assert (tsm[2]["core_scale"], tsm[2]["context_scales"]) == (8, [1])
    steps = mp.student_steps("a1", 200, 1e-3, 4)
    assert {k: v["optimizer_steps"] for k, v in steps.items()} == {
        "lora": 200, "tsm_stage1": 200, "tsm_stage2": 600, "lora_matched": 200}
    # Stage 1 is the first phase of the run stage 2 continues: the same experts.
    assert mp.students("a1")["tsm_stage1"] == mp.Student("a1_tsm", phase=0)
    assert mp.students("a1")["tsm_stage2"] == mp.Student("a1_tsm")


def test_equal_compute_gives_every_student_the_same_steps_and_matched_ranks_follow_the_scale():
    steps = mp.student_steps("equal", 203, 1e-3, 4)
    assert {v["optimizer_steps"] for v in steps.values()} == {203}
    parts = [s["steps"] for s in steps["tsm_stage2"]["stages"]]
    assert parts == [121, 40, 42] and sum(parts) == 203
    assert steps["lora_matched"]["rank"] == 4 * 4
    assert mp.student_steps("a1", 203, 1e-3, 4)["lora_matched"]["rank"] == 8 * 4
    # The lora run is one run, shared by both protocols.
    assert mp.runs_of(["a1", "equal"]).count("lora") == 1
    assert mp.runs_of(["equal"]) == ["lora", "equal_tsm_stage1", "equal_tsm_stage2", "equal_lora_matched"]


@pytest.mark.parametrize("bad", [4, 0, -3, 10.0])
def test_too_few_steps_are_refused_with_the_reason(bad):
    with pytest.raises(ValueError, match="at least one step"):
        mp.runs(bad, 1e-3, 4)


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown protocol 'a3'"):
        mp.students("a3")


# ---------------------------------------------------------------------------- aggregate
def fake_results(seed: int, fids: dict, settings: dict | None = None) -> dict:
    def row(fid):
        return {"fid": fid, "kid_mean": fid / 1000, "kid_std": 0.0, "n": 1000, "run": "r", "optimizer_steps": 1,
                "rank": 4, "stages": [], "trainable_parameters": 10}

    return {"seed": seed, "n": 1000, "n_reference": 1000, "reference_features_sha256": "abc", "sample_seed": 1,
            "settings": settings or {"steps": 200}, "teacher": row(300.0),
            "protocols": {p: {"rows": {k: row(v) for k, v in fids.items()}} for p in mp.PROTOCOLS}}


def test_aggregate_pairs_each_seed_and_reports_wins_and_intervals():
    seeds = [fake_results(0, {"lora": 270.0, "tsm_stage1": 260.0, "tsm_stage2": 275.0, "lora_matched": 268.0}),
             fake_results(1, {"lora": 280.0, "tsm_stage1": 276.0, "tsm_stage2": 270.0, "lora_matched": 281.0}),
             fake_results(2, {"lora": 265.0, "tsm_stage1": 267.0, "tsm_stage2": 266.0, "lora_matched": 262.0})]
    agg = ms.aggregate(seeds, "a1", ["s0", "s1", "s2"])
    s1 = agg["paired"]["tsm_stage1_minus_lora"]
    assert [d["fid_diff"] for d in s1["per_seed"]] == [-10.0, -4.0, 2.0]
    assert s1["mean"] == pytest.approx(-4.0) and s1["tsm_wins"] == 2 and s1["n_seeds"] == 3
    assert s1["ci95_t"][0] < -4.0 < s1["ci95_t"][1]
    assert agg["paired"]["tsm_stage1_minus_lora_matched"]["tsm_wins"] == 2
    assert agg["rows"]["teacher"]["fid_mean"] == pytest.approx(300.0)
    assert agg["seeds"][1]["tsm_stage2_kid"] == pytest.approx(0.270)
    # The same statistics as the demo's: one shared helper.
    assert s1 == {**paired(agg["seeds"], "tsm_stage1", "lora"), "ratio": s1["ratio"]}
    md = ms.format_markdown(dict(agg, settings={"steps": 200, "batch": 32, "lr": 1e-3, "rank": 4, "alpha": 4.0,
                                                "text_experts": False, "sample_steps": 10, "guidance_scale": 1.0}))
    assert "| 1 | 300.00 | 280.00 | 276.00 | 270.00 | 281.00 |" in md
    json.dumps(agg)


def test_aggregate_refuses_mixed_settings_duplicate_seeds_and_unfinished_seeds():
    fids = {"lora": 1.0, "tsm_stage1": 1.0, "tsm_stage2": 1.0, "lora_matched": 1.0}
    with pytest.raises(ValueError, match="differ in settings"):
        ms.aggregate([fake_results(0, fids), fake_results(1, fids, {"steps": 300})], "a1")
    with pytest.raises(ValueError, match="appears twice"):
        ms.aggregate([fake_results(0, fids), fake_results(0, fids)], "a1")
    unfinished = fake_results(2, {"lora": 1.0})
    assert not ms.is_complete(unfinished)
    with pytest.raises(ValueError, match="did not finish"):
        ms.aggregate([unfinished], "equal")


SETTINGS = {"steps": 200, "batch": 32, "lr": 1e-3, "rank": 4, "alpha": 4.0, "sample_steps": 10, "guidance_scale": 1.0}
ON, OFF = dict(SETTINGS, text_experts=True), dict(SETTINGS, text_experts=False)


def test_setting_effect_pairs_the_same_seeds_of_two_runs_per_student():
    def fids(lora, s1):
        return {"lora": lora, "tsm_stage1": s1, "tsm_stage2": 1.0, "lora_matched": 1.0}

    on = [fake_results(0, fids(170.0, 160.0), ON), fake_results(1, fids(175.0, 171.0), ON),
          fake_results(3, fids(1.0, 1.0), ON)]  # seed 3 has no partner: left out
    off = [fake_results(1, fids(172.0, 170.0), OFF), fake_results(0, fids(171.0, 166.0), OFF),
           fake_results(2, fids(1.0, 1.0), OFF)]
    eff = ms.setting_effect(on, off, "a1")
    assert eff["differs"] == {"text_experts": [True, False]} and eff["seeds"] == [0, 1] and eff["n_seeds"] == 2
    lora, s1 = eff["students"]["lora"], eff["students"]["tsm_stage1"]
    assert [d["fid_diff"] for d in lora["per_seed"]] == [-1.0, 3.0]  # on - off, seed by seed
    assert lora["mean"] == pytest.approx(1.0) and lora["tsm_wins"] == 1
    assert [d["fid_diff"] for d in s1["per_seed"]] == [-6.0, 1.0] and s1["tsm_wins"] == 1
    assert lora["kid_mean_diff"] == pytest.approx(0.001)
    md = ms.format_effect(eff)
    assert "text_experts: True here, False in the other run" in md and "| vanilla LoRA | 1.00 +- 2.83 |" in md
    json.dumps(eff)


def test_setting_effect_refuses_runs_it_cannot_pair():
    fids = {"lora": 1.0, "tsm_stage1": 1.0, "tsm_stage2": 1.0, "lora_matched": 1.0}
    with pytest.raises(ValueError, match="nothing to pair"):
        ms.setting_effect([fake_results(0, fids, ON)], [fake_results(1, fids, OFF)], "a1")
    with pytest.raises(ValueError, match="same settings"):
        ms.setting_effect([fake_results(0, fids, OFF)], [fake_results(0, fids, OFF)], "a1")
    other_ref = dict(fake_results(0, fids, OFF), reference_features_sha256="def")
    with pytest.raises(ValueError, match="differ in reference_features_sha256"):
        ms.setting_effect([fake_results(0, fids, ON)], [other_ref], "a1")
    with pytest.raises(ValueError, match="differ in settings"):  # one run's own seeds must agree
        ms.setting_effect([fake_results(0, fids, ON), fake_results(1, fids, {"steps": 300})],
                          [fake_results(0, fids, OFF)], "a1")


# ---------------------------------------------------------------------------- one tiny seed, end to end
@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory):
    from tsm_core.finetune.mnist import run as mr

    out = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    digits = (rng.integers(0, 255, (24, 32, 32), dtype=np.uint8), np.arange(24) % 10)
    settings = mr.Settings(steps=5, batch=4, n=6, sample_steps=2)
    return out, digits, settings, mr.run_seed(out, 0, settings, digits=digits, log=lambda *a: None)


def test_a_tiny_seed_scores_every_student_with_matched_parameter_counts(tiny_seed):
    out, _, _, results = tiny_seed
    for proto in mp.PROTOCOLS:
        rows = results["protocols"][proto]["rows"]
        assert set(rows) == set(mp.STUDENTS)
        assert all(np.isfinite(r["fid"]) and r["n"] == 6 for r in rows.values())
        # Capacity parity: LoRA at rank n r holds exactly the parameters of stage 1's n rank-r experts.
        assert rows["lora_matched"]["trainable_parameters"] == rows["tsm_stage1"]["trainable_parameters"]
        assert rows["tsm_stage1"]["trainable_parameters"] > rows["lora"]["trainable_parameters"]
    a1 = results["protocols"]["a1"]["rows"]
    assert a1["tsm_stage1"]["trainable_parameters"] == 8 * a1["lora"]["trainable_parameters"]
    assert a1["tsm_stage2"]["optimizer_steps"] == 15
    assert json.loads((out / "seed0" / "results.json").read_text())["protocols"]["a1"]["rows"].keys() == a1.keys()


def test_stage_2_grows_out_of_exactly_the_stage_1_experts_it_is_compared_with(tiny_seed):
    from tsm_core.serialization import read_adapter_file

    out = tiny_seed[0]
    run = out / "seed0" / "runs" / "a1_tsm"
    (phase0,) = sorted((run / "phases").glob("00_*"))
    stage1, _ = read_adapter_file(phase0 / "adapter")
    final, _ = read_adapter_file(run / "adapter")
    n8 = [k for k in stage1 if ".lora_" in k and k.rsplit(".", 1)[1].startswith("s8_")]
    assert n8 and all(np.array_equal(stage1[k].numpy(), final[k].numpy()) for k in n8)
    n1 = [k for k in final if ".lora_B." in k and k.endswith("s1_e0")]
    assert any(not np.array_equal(stage1[k].numpy(), final[k].numpy()) for k in n1)  # fostered after stage 1


def test_a_finished_seed_reruns_without_training_or_sampling_and_refuses_other_settings(tiny_seed, monkeypatch):
    from dataclasses import replace

    from tsm_core.finetune import FinetuneTrainer
    from tsm_core.finetune.mnist import run as mr

    out, digits, settings, results = tiny_seed

    def boom(*a, **k):
        raise AssertionError("a finished seed must not train or sample again")

    monkeypatch.setattr(FinetuneTrainer, "train", boom)
    monkeypatch.setattr(mr, "sample_features", boom)
    again = mr.run_seed(out, 0, settings, digits=digits, log=lambda *a: None)
    assert again["protocols"] == results["protocols"]
    with pytest.raises(ValueError, match="other settings"):
        mr.run_seed(out, 0, replace(settings, lr=2e-3), digits=digits, log=lambda *a: None)


def test_cli_aggregates_finished_seed_folders_per_protocol(tiny_seed, tmp_path, capsys):
    from tsm_core.finetune.mnist.cli import main

    out = tiny_seed[0]
    assert main(["--out", str(out), "--aggregate", "--to", str(tmp_path)]) == 0
    for proto in mp.PROTOCOLS:
        agg = json.loads((tmp_path / proto / "seeds.json").read_text())
        assert agg["n_seeds"] == 1 and agg["seeds"][0]["seed"] == 0
        assert {"lora", "tsm_stage1", "tsm_stage2", "lora_matched", "lora_kid"} <= set(agg["seeds"][0])
    assert main(["--out", str(out), "--seed", "-1"]) == 2
    assert "error:" in capsys.readouterr().err
    # --compare-with: the same seed folder cannot measure a setting (nothing differs), and needs --aggregate.
    assert main(["--out", str(out), "--aggregate", "--to", str(tmp_path), "--compare-with", str(out)]) == 2
    assert "same settings" in capsys.readouterr().err
    assert main(["--out", str(out), "--seeds", "0", "--compare-with", str(out)]) == 2
    assert "use it with --aggregate" in capsys.readouterr().err


def test_cli_writes_the_effect_of_a_setting_against_another_run(tmp_path, capsys):
    from tsm_core.finetune.mnist.cli import main

    fids = {"lora": 170.0, "tsm_stage1": 165.0, "tsm_stage2": 168.0, "lora_matched": 169.0}
    for run, settings in (("on", ON), ("off", OFF)):
        for seed in (0, 1):
            folder = tmp_path / run / f"seed{seed}"
            folder.mkdir(parents=True)
            shifted = {k: v + (2.0 if run == "on" else 0.0) + seed for k, v in fids.items()}
            (folder / "results.json").write_text(json.dumps(fake_results(seed, shifted, settings)))
    assert main(["--out", str(tmp_path / "on"), "--aggregate", "--protocols", "a1",
                 "--compare-with", str(tmp_path / "off")]) == 0
    eff = json.loads((tmp_path / "on" / "a1" / "effect.json").read_text())
    assert eff["students"]["tsm_stage1"]["mean"] == pytest.approx(2.0) and eff["students"]["lora"]["tsm_wins"] == 0
    assert (tmp_path / "on" / "a1" / "effect.md").is_file() and (tmp_path / "on" / "a1" / "seeds.json").is_file()
    assert not (tmp_path / "on" / "equal").exists()
