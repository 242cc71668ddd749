"""The router test (tsm_distill/demo/router.py): stage 2 alone from a frozen stage-1 student."""

import json
import shutil

import pytest
import torch

from tsm_core.serialization import read_adapter_file
from tsm_distill.demo import router as rt
from tsm_distill.demo import scores as sc


def test_router_arms_train_only_the_router_from_the_stage1_state_and_resume(quick_demo, tmp_path):
    seed = tmp_path / "seed0"
    shutil.copytree(quick_demo, seed)
    report = rt.run(tmp_path / "out", [seed], lrs=[1e-3], updates=[2], contexts=[(1,), (1, 2)])
    assert set(report["arms"]) == {"lr1e-03_g2_ctx1", "lr1e-03_g2_ctx1-2"}
    stage1_fid = next(r["fid"] for r in json.loads((seed / "results.json").read_text())["rows"]
                      if r["row"] == "DMD2 + TSM stage 1 (experts)")
    stage1, _ = read_adapter_file(sc.stage1_adapter(seed / "tsm"))
    n2, _ = read_adapter_file(seed / "router" / "n2" / "adapter")
    # The n = 2 experts were fostered (no longer zero); the copied n = 1 and n = 4 experts stayed as stage 1 left them.
    assert any(v.abs().sum() > 0 for k, v in n2.items() if ".lora_B.s2_" in k)
    assert all(torch.equal(v, stage1[k]) for k, v in n2.items() if k in stage1)
    for name, (arm,) in report["arms"].items():
        assert arm["stage1_fid"] == stage1_fid and arm["fid"] > 0 and arm["fid_teacher"] > 0
        tensors, meta = read_adapter_file(seed / "router" / name / "adapter")
        source = n2 if name.endswith("1-2") else stage1
        experts = [k for k in tensors if ".lora_" in k]
        assert experts and all(torch.equal(tensors[k], source[k]) for k in experts)  # every expert frozen
        routers = [k for k in tensors if k.endswith(("router_fc", "router_emb"))]
        assert routers and any(tensors[k].abs().sum() > 0 for k in routers)  # the router trained
        assert json.loads(meta["mode_args"])["context_scales"] == ([1, 2] if name.endswith("1-2") else [1])
        assert set(arm["gates"]) and all(len(g) == len(arm["context"]) for g in arm["gates"].values())
    summary = report["summary"]["lr1e-03_g2_ctx1"]
    assert summary["stage2_minus_stage1"]["per_seed"] == [pytest.approx(report["arms"]["lr1e-03_g2_ctx1"][0]["fid"]
                                                                         - stage1_fid)]
    assert "lr1e-03_g2_ctx1-2" in (tmp_path / "out" / "results.md").read_text()
    # A second run reuses the finished arms (nothing retrained) and reports the same scores.
    done = {p: p.stat().st_mtime_ns for p in (seed / "router").glob("*/done.json")}
    again = rt.run(tmp_path / "out", [seed], lrs=[1e-3], updates=[2], contexts=[(1,), (1, 2)])
    assert {p: p.stat().st_mtime_ns for p in (seed / "router").glob("*/done.json")} == done
    assert [a[0]["fid"] for a in again["arms"].values()] == [a[0]["fid"] for a in report["arms"].values()]


def test_the_router_test_refuses_what_it_cannot_start_from(quick_demo, tmp_path):
    seed = tmp_path / "seed0"
    shutil.copytree(quick_demo, seed, ignore=shutil.ignore_patterns("step_*"))  # no checkpoints kept
    with pytest.raises(FileNotFoundError, match="end of stage 1"):
        rt.stage1_checkpoint(seed / "tsm", rt._seed_recipe(seed))
    with pytest.raises(FileNotFoundError, match="no finished tsm-demo seed"):
        rt.run(tmp_path / "out", [tmp_path])
    assert rt.sign_consistency([{"a": [0.1, -0.2]}, {"a": [0.3, 0.1]}, {"a": [-0.1, 0.4]}]) == {
        "a[0]": pytest.approx(2 / 3), "a[1]": pytest.approx(2 / 3)}
