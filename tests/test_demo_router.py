"""The router test (tsm_distill/demo/router.py): stage 2 alone from a frozen stage-1 student."""

import json
import shutil

import pytest
import torch

from tsm_core.serialization import read_adapter_file
from tsm_distill.demo import router as rt
from tsm_distill.demo import scores as sc


def test_router_arms_train_only_the_router_from_the_stage1_state_and_resume(quick_demo, tmp_path, monkeypatch,
                                                                            capsys):
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
    # A second run reuses the finished arms (nothing retrained) and their saved scores (nothing sampled).
    done = {p: p.stat().st_mtime_ns for p in (seed / "router").glob("*/done.json")}

    def no_scoring(*a, **kw):
        raise AssertionError("a finished arm was scored again")

    monkeypatch.setattr(rt, "score_arm", no_scoring)
    again = rt.run(tmp_path / "out", [seed], lrs=[1e-3], updates=[2], contexts=[(1,), (1, 2)])
    assert {p: p.stat().st_mtime_ns for p in (seed / "router").glob("*/done.json")} == done
    assert again["arms"] == json.loads(json.dumps(report["arms"], default=float))
    # --report-only trains and scores nothing: it reports the scored arms and lists the others as not finished.
    with monkeypatch.context() as m:
        m.setattr(rt, "train_arm", no_scoring)
        only = rt.run(tmp_path / "only", [seed], lrs=[1e-3, 3e-4], updates=[2], contexts=[(1,), (1, 2)],
                      report_only=True)
    assert only["arms"] == again["arms"]
    assert only["not_finished"] == ["seed0/lr3e-04_g2_ctx1", "seed0/lr3e-04_g2_ctx1-2"]
    assert "Not finished (not in the table): seed0/lr3e-04_g2_ctx1" in (tmp_path / "only" / "results.md").read_text()

    # A stopped arm (no done.json, no final adapter) resumes from its checkpoint instead of starting over, and
    # ends with the same router; an arm whose adapter changed is scored again.
    arm = seed / "router" / "lr1e-03_g2_ctx1"
    before, _ = read_adapter_file(arm / "adapter")
    (arm / "done.json").unlink()
    shutil.rmtree(arm / "adapter")
    capsys.readouterr()
    adapter = rt.train_arm(rt.arm_recipe(seed, 1e-3, 2, (1,), None), arm, rt.stage1_checkpoint(
        seed / "tsm", rt._seed_recipe(seed)))
    assert f"resuming {arm}" in capsys.readouterr().out
    after, _ = read_adapter_file(adapter)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    saved = json.loads((arm / "scores.json").read_text())
    saved["key"]["adapter_sha256"] = "0" * 64
    (arm / "scores.json").write_text(json.dumps(saved))
    with pytest.raises(AssertionError, match="scored again"):
        rt.run(tmp_path / "out", [seed], lrs=[1e-3], updates=[2], contexts=[(1,)])


def test_the_router_report_is_written_after_every_arm(quick_demo, tmp_path, monkeypatch):
    seed = tmp_path / "seed0"
    shutil.copytree(quick_demo, seed)
    real, calls = rt.train_arm, []

    def stop_at_the_second_arm(*a, **kw):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rt, "train_arm", stop_at_the_second_arm)
    with pytest.raises(KeyboardInterrupt):
        rt.run(tmp_path / "out", [seed], lrs=[1e-3, 3e-4], updates=[2], contexts=[(1,)])
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(report["arms"]) == ["lr1e-03_g2_ctx1"] and report["summary"]["lr1e-03_g2_ctx1"]["n_seeds"] == 1
    assert "lr1e-03_g2_ctx1" in (tmp_path / "out" / "results.md").read_text()


def test_the_router_test_refuses_what_it_cannot_start_from(quick_demo, tmp_path):
    seed = tmp_path / "seed0"
    shutil.copytree(quick_demo, seed, ignore=shutil.ignore_patterns("step_*"))  # no checkpoints kept
    with pytest.raises(FileNotFoundError, match="end of stage 1"):
        rt.stage1_checkpoint(seed / "tsm", rt._seed_recipe(seed))
    with pytest.raises(FileNotFoundError, match="no finished tsm-demo seed"):
        rt.run(tmp_path / "out", [tmp_path])
    gates = [{"a": [0.1, -0.2]}, {"a": [0.3, 0.1]}, {"a": [-0.1, 0.4]}]
    assert rt.sign_consistency(gates) == {"a[0]": pytest.approx(2 / 3), "a[1]": pytest.approx(2 / 3)}
    per_layer = rt.layer_gates(gates)
    assert per_layer["a[1]"]["mean"] == pytest.approx(0.1) and per_layer["a[1]"]["std"] == pytest.approx(0.3)
    assert per_layer["a[0]"]["sign_consistency"] == pytest.approx(2 / 3)
    assert rt.layer_gates(gates[:1])["a[0]"] == {"mean": pytest.approx(0.1), "std": None, "sign_consistency": None}
