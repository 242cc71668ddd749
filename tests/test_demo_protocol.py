"""tsm-demo --protocol a3p: A.3's phase lengths and batch ratios scaled by one factor, and its records."""

import json

import pytest

from tsm_distill.demo import eval as ev
from tsm_distill.demo import protocol as dp
from tsm_distill.demo import run as demo
from tsm_distill.demo import seeds as ds


def recipes(tmp_path, *extra):
    args = demo.parse_args(["--run-dir", str(tmp_path), "--protocol", "a3p", *extra])
    return args, *demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)


def test_a3p_scales_every_a3_length_by_one_factor_and_keeps_the_batch_ratios(tmp_path):
    args, lora, tsm, budget = recipes(tmp_path)
    # s = 1200 / 45000: LoRA keeps the recipe's 1,200 iterations (issue 24's table).
    assert [(p.name, p.steps, p.gan) for p in lora.phases] == [("lora", 1067, False), ("lora_gan", 133, True)]
    assert [(p.name, p.steps) for p in tsm.phases] == [
        ("expert999", 533), ("expert999_gan", 133), ("expert749", 533), ("expert749_gan", 133),
        ("expert499", 133), ("expert499_gan", 533), ("expert249", 133), ("expert249_gan", 1067), ("router_gan", 53)]
    # A.3: 32 without the GAN, 16 with it, 4x for LoRA; the demo's non-GAN batch is the recipe's 16.
    assert {(p.gan, p.batch_size) for p in tsm.phases} == {(False, 16), (True, 8)}
    assert {(p.gan, p.batch_size) for p in lora.phases} == {(False, 64), (True, 32)}
    assert tsm.phases[-1].type == "assemble" and tsm.phases[-1].gan
    assert args.lora_batch_multiplier == 4 and args.budget_points == 0
    # Iterations 2.67x for TSM, samples 2x for LoRA, as in A.3 (120K vs 45K; 4x batch at 1/2.67 the steps).
    st = demo.students_accounting(lora, tsm)
    assert st["lora"]["iterations"] == 1200 and st["tsm_stage1"]["iterations"] == 3198
    assert st["tsm_stage2_router"]["iterations"] == 53
    assert st["lora"]["samples"] == 64 * 1067 + 32 * 133 and st["tsm_stage1"]["samples"] == 16 * 1332 + 8 * 1866
    assert st["lora"]["samples"] / st["tsm_stage1"]["samples"] == pytest.approx(2.0, rel=0.01)
    f = lora.phases[0].fake_updates_per_generator_update
    assert st["lora"]["generator_updates"] == budget["lora"] == -(-1067 // f) + -(-133 // f)
    assert st["lora"]["generator_samples"] == 64 * -(-1067 // f) + 32 * -(-133 // f)
    # The recipes' learning rates, F and warm-up (absolute iterations, capped by the phase) stay.
    assert {p.lr for p in lora.phases + tsm.phases} == {3e-3}
    assert all(p.warmup_steps == min(20, p.steps) for p in lora.phases + tsm.phases)
    # Checkpoints for resuming only (no budget curve): every third of the LoRA run.
    assert lora.train.checkpoint_every == tsm.train.checkpoint_every == 400


def test_a3p_follows_the_lora_length_and_batch_options(tmp_path):
    _, lora, tsm, _ = recipes(tmp_path, "--budget", "30", "--fake-updates", "2", "--batch-size", "4")
    assert sum(p.steps for p in lora.phases) == 60  # 30 generator steps x F = 2
    s = 60 / 45000
    assert [p.steps for p in tsm.phases] == [dp.scaled(n, s) for n in
                                             (20_000, 5_000, 20_000, 5_000, 5_000, 20_000, 5_000, 40_000, 2_000)]
    assert [p.steps for p in tsm.phases][-1] == 3  # 2000 x s = 2.67 -> 3
    assert {(p.gan, p.batch_size) for p in tsm.phases} == {(False, 4), (True, 2)}
    assert {(p.gan, p.batch_size) for p in lora.phases} == {(False, 16), (True, 8)}
    assert dp.scaled(10, 1e-6) == 1  # a phase never vanishes


def test_a3p_refuses_what_it_cannot_honour(tmp_path):
    for extra, match in ((["--router-steps", "5"], "drop --router-steps"), (["--budget-points", "3"], "budget curve"),
                         (["--lora-batch-multiplier", "2"], "4x batch")):
        with pytest.raises(ValueError, match=match):
            demo.parse_args(["--run-dir", str(tmp_path), "--protocol", "a3p", *extra])
    with pytest.raises(ValueError, match="even"):
        recipes(tmp_path, "--batch-size", "3")
    # A TSM recipe whose expert phases are not one expert per A.3 step has no A.3 lengths.
    bad = tmp_path / "tsm.yaml"
    bad.write_text(f"base: {demo.RECIPES / 'demo_fmnist_tsm.yaml'}\nphases:\n"
                   "  - {name: all, scale: 4, steps: 8, fake_updates_per_generator_update: 4}\n"
                   "  - {name: r, type: assemble, core_scale: 4, context_scales: [1], steps: 4}\n")
    with pytest.raises(ValueError, match="one expert per student step"):
        recipes(tmp_path, "--tsm-recipe", str(bad))
    twice = tmp_path / "twice.yaml"
    twice.write_text(f"base: {demo.RECIPES / 'demo_fmnist_tsm.yaml'}\nphases:\n"
                     "  - {name: a, scale: 4, experts: [3], steps: 8, fake_updates_per_generator_update: 4}\n"
                     "  - {name: b, scale: 4, experts: [3], steps: 8, fake_updates_per_generator_update: 4}\n"
                     "  - {name: r, type: assemble, core_scale: 4, context_scales: [1], steps: 4}\n")
    with pytest.raises(ValueError, match="two expert phases train step 999"):
        recipes(tmp_path, "--tsm-recipe", str(twice))


def test_the_recipe_protocol_is_unchanged_and_records_its_students(tmp_path):
    args = demo.parse_args(["--run-dir", str(tmp_path)])
    lora, tsm, budget = demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)
    assert [p.steps for p in lora.phases] == [900, 300] and {p.batch_size for p in lora.phases + tsm.phases} == {16}
    st = demo.students_accounting(lora, tsm)
    assert st["lora"]["generator_updates"] == st["tsm_stage1"]["generator_updates"] == budget["lora"] == 300
    assert st["lora"]["samples"] == st["tsm_stage1"]["samples"] == 1200 * 16


def test_protocol_labels_and_the_aggregate_keep_protocols_apart():
    assert ds.protocol(1)["name"] == "recipe" and ds.protocol(1)["label"] == "equal compute"
    assert "equal generator steps" in ds.protocol(4)["label"]  # not A.3: same iterations for both
    assert ds.protocol(4, "a3p")["label"].startswith("A.3-proportional")
    with pytest.raises(ValueError, match="unknown protocol"):
        ds.protocol(4, "a3")

    def results(seed, name, lora=50.0):
        rows = [{"row": ds.ROW_NAMES[k], "fid": f, "kid_mean": 0.01, "kid_std": 0.0, "n": 1000}
                for k, f in (("lora", lora), ("tsm_stage1", 45.0), ("tsm_stage2", 44.0))]
        out = {"rows": rows, "seed": seed, "n": 1000, "protocol": ds.protocol(4, name)}
        if name == "a3p":
            out["students"] = {"lora": {"iterations": 1200, "trainable_parameters": 1000}}
        return out

    agg = ds.aggregate([results(0, "a3p"), results(1, "a3p", 46.0)])
    assert agg["protocol"]["name"] == "a3p" and agg["seeds"][0]["protocol"] == "a3p"
    assert agg["seeds"][0]["students"]["lora"] == {"iterations": 1200, "trainable_parameters": 1000}
    assert "| lora | 1200 |  |  | 1000 |" in ds.format_markdown(agg)
    assert agg["paired"]["tsm_stage2_minus_lora"]["per_seed"][1]["fid_diff"] == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="differ in protocol"):
        ds.aggregate([results(0, "a3p"), results(1, "recipe")])
    json.dumps(agg)  # seeds.json is written from it


def test_adapter_parameters_counts_experts_by_scale_and_the_router(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tsm_core.config import TSMConfig
    from tsm_core.serialization import ADAPTER_FILE, FORMAT_VERSION, count_saved_parameters

    tensors = {"l.lora_A.s1_e0": torch.zeros(2, 5), "l.lora_B.s1_e0": torch.zeros(7, 2),
               "l.lora_A.s4_e3": torch.zeros(2, 5), "l.lora_B.s4_e3": torch.zeros(7, 2),
               "l.router_fc": torch.zeros(1, 5), "l.router_emb": torch.zeros(1000, 1)}
    save_file(tensors, str(tmp_path / ADAPTER_FILE), {"format": "tsm", "format_version": FORMAT_VERSION,
                                                    "tsm_config": TSMConfig(rank=2, scales=(1, 4)).to_json()})
    assert count_saved_parameters(tmp_path, [1]) == 24 and count_saved_parameters(tmp_path, [4]) == 24
    assert count_saved_parameters(tmp_path) == 48 and count_saved_parameters(tmp_path, [], router=True) == 1005


def test_capacity_parity_options_and_lora_rank(tmp_path):
    with pytest.raises(ValueError, match="need --students lora"):
        demo.parse_args(["--run-dir", str(tmp_path), "--lora-rank", "32"])
    args = demo.parse_args(["--run-dir", str(tmp_path), "--lora-rank", "32", "--students", "lora"])
    assert args.budget_points == 0
    lora, tsm, budget = demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)
    base, _, base_budget = demo.build_recipes(demo.parse_args(["--run-dir", str(tmp_path)]), tmp_path, ev.DEFAULT_TEACHER)
    # alpha stays the recipe's (A.3: alpha 8 at rank 64) unless given.
    assert (lora.experts.rank, lora.experts.alpha) == (32, 8) and (base.experts.rank, base.experts.alpha) == (8, 8)
    scaled, _, _ = demo.build_recipes(demo.parse_args(["--run-dir", str(tmp_path), "--lora-rank", "32", "--lora-alpha",
                                                       "32", "--students", "lora"]), tmp_path, ev.DEFAULT_TEACHER)
    assert (scaled.experts.rank, scaled.experts.alpha) == (32, 32)
    with pytest.raises(ValueError, match="positive"):
        demo.parse_args(["--run-dir", str(tmp_path), "--lora-alpha", "0", "--students", "lora"])
    assert tsm.experts.rank == 8 and budget == base_budget  # equal compute: only the LoRA's capacity changes
    assert [p.steps for p in lora.phases] == [p.steps for p in base.phases]


def _results(seed, keys, fids, **extra):
    rows = [{"row": ds.ROW_NAMES[k], "fid": f, "kid_mean": f / 1000, "kid_std": 0.0, "n": 1000}
            for k, f in zip(keys, fids)]
    return {"rows": rows, "seed": seed, "n": 1000, "n_reference": 1000, "teacher_unet_sha256": "t",
            "budget": {"lora": 300, "tsm_stage1": 300, "tsm_stage2_router": 25}, "protocol": ds.protocol(1), **extra}


def test_capacity_pairs_a_lora_only_seed_with_the_equal_compute_seed(tmp_path):
    students = ("lora", "tsm_stage1", "tsm_stage2")
    for seed, (big, lora, tsm1, tsm2) in enumerate([(49.0, 57.0, 45.0, 46.0), (52.0, 55.0, 44.0, 43.0)]):
        (tmp_path / f"cap{seed}").mkdir()
        (tmp_path / f"cap{seed}" / "results.json").write_text(json.dumps(_results(
            seed, ["lora"], [big], students_trained=["lora"],
            students={"lora": {"rank": 32, "trainable_parameters": 920576}})))
        (tmp_path / f"eq{seed}").mkdir()
        (tmp_path / f"eq{seed}" / "results.json").write_text(json.dumps(_results(seed, students, [lora, tsm1, tsm2])))
    # A LoRA-only seed is finished (the sweep skips it) but is no three-student seed to average alone.
    assert ds.is_complete(ds.read_results(tmp_path / "cap0"))
    with pytest.raises(ValueError, match="capacity"):
        ds.aggregate([ds.read_results(tmp_path / "cap0")])
    assert ds.main(["capacity", str(tmp_path / "out"), "--lora", str(tmp_path / "cap0"), str(tmp_path / "cap1"),
                    "--equal", str(tmp_path / "eq1"), str(tmp_path / "eq0")]) == 0
    agg = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert agg["protocol"]["name"] == "capacity" and agg["n_seeds"] == 2
    assert [r["lora"] for r in agg["seeds"]] == [49.0, 52.0]  # the rank-4r LoRA, not the equal-compute one
    assert [d["fid_diff"] for d in agg["paired"]["tsm_stage1_minus_lora"]["per_seed"]] == [-4.0, -8.0]
    assert agg["seeds"][0]["students"]["lora"]["trainable_parameters"] == 920576
    # Pairs must match: another seed, or a run that was not equal compute, is refused.
    other = _results(0, students, [1.0, 2.0, 3.0], protocol=ds.protocol(4))
    with pytest.raises(ValueError, match="differ in lora_batch_multiplier"):
        ds.capacity_pair(ds.read_results(tmp_path / "cap0"), other)
    with pytest.raises(ValueError, match="seeds differ"):
        ds.capacity_pair(ds.read_results(tmp_path / "cap0"), ds.read_results(tmp_path / "eq1"))
