"""tsm-demo's scores beyond FID-to-real: the DMD-only students, the cached teacher features, the aggregate."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tsm_core.config import TSMConfig
from tsm_core.serialization import ADAPTER_FILE, FORMAT_VERSION, read_adapter_file
from tsm_core.train.recipe import save_recipe
from tsm_distill.demo import eval as ev
from tsm_distill.demo import run as demo
from tsm_distill.demo import scores as sc
from tsm_distill.demo import seeds as ds


def _fake_run(run, recipe):
    """A finished student run: recipe.yaml and one phase adapter per phase whose tensors say which phase
    wrote them (value = phase index + 1) and carry an expert marker (the expert index / 10)."""
    save_recipe(recipe, run / "recipe.yaml")
    for i, ph in enumerate(recipe.phases):
        tensors = {}
        for scale in (1, 4):
            for e in range(scale):
                tensors[f"blk.lora_A.s{scale}_e{e}"] = torch.full((2, 3), i + 1 + e / 10)
                tensors[f"blk.lora_B.s{scale}_e{e}"] = torch.full((5, 2), i + 1 + e / 10)
        folder = run / "phases" / f"{i:02d}_{ph.name}"
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / ADAPTER_FILE), {"format": "tsm", "format_version": FORMAT_VERSION,
                                                        "tsm_config": TSMConfig(rank=2, scales=(1, 4)).to_json(),
                                                        "phase": ph.name})


def test_dmd_only_students_take_each_expert_from_its_last_non_gan_phase(tmp_path):
    args = demo.parse_args(["--quick", "--run-dir", str(tmp_path)])
    lora, tsm, _ = demo.build_recipes(args, tmp_path, ev.DEFAULT_TEACHER)
    _fake_run(tmp_path / "tsm", tsm)
    _fake_run(tmp_path / "lora", lora)
    names = [p.name for p in tsm.phases]
    # TSM: phases expert999 (0), expert999_gan (1), expert749 (2), ...; expert k of scale 4 serves step 999 - 250 k'.
    out = sc.dmd_only_adapter(tmp_path / "tsm", tmp_path / "tsm" / "dmd_only")
    tensors, meta = read_adapter_file(out)
    source = {3: names.index("expert999"), 2: names.index("expert749"), 1: names.index("expert499"),
              0: names.index("expert249")}
    for e, i in source.items():
        assert torch.equal(tensors[f"blk.lora_A.s4_e{e}"], torch.full((2, 3), i + 1 + e / 10)), e
        assert torch.equal(tensors[f"blk.lora_B.s4_e{e}"], torch.full((5, 2), i + 1 + e / 10)), e
    last_foster = max(i for i, p in enumerate(tsm.phases) if p.type == "foster")
    assert sc.stage1_adapter(tmp_path / "tsm").name == f"{last_foster:02d}_{names[last_foster]}"
    assert torch.equal(tensors["blk.lora_A.s1_e0"], torch.full((2, 3), last_foster + 1.0))  # untouched: stage 1's
    assert meta["phase"] == names[last_foster]  # the stage-1 adapter's metadata (config, mode) is kept
    # LoRA: its one expert from the non-GAN phase 00_lora, not 01_lora_gan.
    lora_out, _ = read_adapter_file(sc.dmd_only_adapter(tmp_path / "lora", tmp_path / "lora" / "dmd_only"))
    assert torch.equal(lora_out["blk.lora_A.s1_e0"], torch.full((2, 3), 1.0))
    # A student whose expert never trained without the GAN has no DMD-only state.
    gan_only = tmp_path / "gan_only"
    lora.phases = [lora.phases[-1]]
    _fake_run(gan_only, lora)
    with pytest.raises(ValueError, match="never trained without the GAN"):
        sc.dmd_only_adapter(gan_only, gan_only / "dmd_only")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        sc.dmd_only_adapter(_half(tmp_path, tsm), tmp_path / "x")


def _half(tmp_path, recipe):
    run = tmp_path / "half"
    save_recipe(recipe, run / "recipe.yaml")  # no phase adapters: a stopped run
    return run


class _Extractor:
    """Deterministic stand-in for Inception: features from the images' pixel statistics (no network)."""

    def features_from_images(self, images, on_error="raise"):
        x = np.stack([np.asarray(i, np.float32).ravel() for i in images])
        rng = np.random.default_rng(0)
        proj = rng.standard_normal((x.shape[1], 2048)).astype(np.float32) / 100
        return type("F", (), {"features": x @ proj})()


def test_teacher_features_are_computed_once_and_cached_per_teacher_and_setting(tmp_path):
    teacher = demo.copy_teacher(ev.DEFAULT_TEACHER, tmp_path / "teacher")
    first, why = sc.teacher_features(_Extractor(), teacher, 4, steps=2)
    assert why.startswith("computed") and first.shape == (4, 2048)
    again, why = sc.teacher_features(_Extractor(), teacher, 4, steps=2)
    assert why.startswith("cache") and np.array_equal(first, again)
    fewer, why = sc.teacher_features(_Extractor(), teacher, 3, steps=2)
    assert why.startswith("cache") and np.array_equal(fewer, first[:3])
    meta = json.loads(str(np.load(teacher / sc.TEACHER_FEATURES_NAME)["meta"]))
    assert meta["seed_offset"] == sc.TEACHER_SEED_OFFSET and meta["unet_sha256"] == ev.unet_hash(teacher)
    other, why = sc.teacher_features(_Extractor(), teacher, 4, steps=3)  # another step count: not the cache
    assert why.startswith("computed") and not np.array_equal(other, first)
    # The teacher samples use seeds disjoint from the students' (an independent draw of the teacher).
    assert set(ev.eval_prompts(4, sc.TEACHER_SEED_OFFSET)[1]).isdisjoint(ev.eval_prompts(1000)[1])


def test_the_aggregate_pairs_fidelity_and_dmd_only_rows_when_every_seed_has_them():
    def results(seed, lora, tsm1, tsm2, lora_dmd, tsm_dmd, scored=True):
        def row(key, fid):
            r = {"row": ds.ROW_NAMES[key], "fid": fid, "kid_mean": fid / 1000, "kid_std": 0.0, "n": 1000}
            if scored:
                r |= {"fid_teacher": fid / 2, "kid_teacher": fid / 2000}
            return r
        rows = [row("lora", lora), row("tsm_stage1", tsm1), row("tsm_stage2", tsm2)]
        if scored:
            rows += [row("lora_dmd_only", lora_dmd), row("tsm_stage1_dmd_only", tsm_dmd)]
        return {"rows": rows, "seed": seed, "n": 1000}

    agg = ds.aggregate([results(0, 50, 46, 44, 60, 52), results(1, 48, 47, 45, 58, 59)])
    extra = agg["paired_extra"]
    assert [d["fid_diff"] for d in extra["tsm_stage1_dmd_only_minus_lora_dmd_only"]["per_seed"]] == [-8.0, 1.0]
    assert [d["fid_diff"] for d in extra["tsm_stage2_teacher_minus_lora_teacher"]["per_seed"]] == [-3.0, -1.5]
    assert extra["tsm_stage1_dmd_only_minus_lora_dmd_only"]["tsm_wins"] == 1
    assert agg["rows"]["lora_teacher"]["fid_mean"] == pytest.approx(24.5)
    assert agg["seeds"][0]["tsm_stage2_teacher"] == 22.0 and agg["seeds"][0]["tsm_stage1_dmd_only"] == 52.0
    assert "DMD only: TSM stage 1 - LoRA" in ds.format_markdown(agg)
    # A seed without the new scores leaves them out of the aggregate (and its seed-level FIDs still count).
    mixed = ds.aggregate([results(0, 50, 46, 44, 60, 52), results(1, 48, 47, 45, 58, 59, scored=False)])
    assert mixed["paired_extra"] == {} and "lora_teacher" not in mixed["rows"] and mixed["n_seeds"] == 2


def test_a_lora_only_run_finishes_with_its_scores(tmp_path):
    from tsm_distill.demo.results import is_complete, row_key

    run = tmp_path / "capacity"
    assert demo.main(["--quick", "--students", "lora", "--lora-rank", "16", "--run-dir", str(run), "--n", "10",
                      "--n-ref", "200", "--teacher-steps", "2", "--budget", "8", "--fake-updates", "1",
                      "--batch-size", "1", "--reference", "none"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert [row_key(r["row"]) for r in res["rows"]] == ["floor", "teacher_full", "teacher_few", "lora", "lora_dmd_only"]
    assert all("fid_teacher" in r for r in res["rows"][3:]) and not (run / "tsm").exists()
    assert res["students_trained"] == ["lora"] and is_complete(res)
    tensors, _ = read_adapter_file(run / "lora" / "adapter")
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {16}  # the LoRA trained at rank 16
    assert res["students"]["lora"]["rank"] == 16
    assert res["students"]["lora"]["trainable_parameters"] == sum(t.numel() for k, t in tensors.items() if ".s1_" in k)
