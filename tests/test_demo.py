"""tsm-demo: budgets, reference rows, the FID shortcut, the embedded teacher, and the quick run end to end."""

import json
import math

import numpy as np
import pytest
import torch

from tsm_core.eval import fid_from_features
from tsm_distill.demo import eval as ev
from tsm_distill.demo import run as demo
from tsm_distill.demo import seeds as ds

TEACHER = ev.DEFAULT_TEACHER


@pytest.fixture
def one_thread():
    # One thread per process: on a shared, oversubscribed 2-core CI box two threads ran 15x slower.
    restore = ev.limit_threads(1)
    yield
    restore()


def test_low_rank_fid_equals_the_clean_fid_formula():
    rng = np.random.RandomState(0)
    for n1, n2, d in ((30, 40, 64), (300, 200, 64)):
        a = rng.rand(n1, d).astype(np.float32)
        b = (rng.rand(n2, d) * 1.1 + 0.05).astype(np.float32)
        assert ev.fid_low_rank(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError, match="N x D"):
        ev.fid_low_rank(np.zeros((5, 3)), np.zeros((5, 4)))


def test_split_budget_sums_exactly_and_follows_the_weights():
    assert ev  # (module imported for the FID test)
    assert demo.split_budget([75, 25] * 4, 400) == [75, 25] * 4
    parts = demo.split_budget([75, 25] * 4, 16)
    assert sum(parts) == 16 and parts == [3, 1] * 4
    with pytest.raises(ValueError):
        demo.split_budget([], 4)


def test_recipes_have_equal_generator_step_budgets(tmp_path):
    args = demo.parse_args(["--run-dir", str(tmp_path)])
    lora, tsm, budget = demo.build_recipes(args, tmp_path, TEACHER)
    assert budget["lora"] == budget["tsm_stage1"] > 0
    assert budget["tsm_stage2_router"] > 0
    assert tsm.phases[-1].type == "assemble" and tsm.experts.init_from == str(tmp_path / "lora" / "adapter")
    # Same F, batch and learning rates on both sides, so fake-score updates are equal too.
    settings = {(p.fake_updates_per_generator_update, p.batch_size, p.lr, p.lr_critic) for p in lora.phases}
    assert settings == {(p.fake_updates_per_generator_update, p.batch_size, p.lr, p.lr_critic)
                        for p in tsm.phases}
    for g in (16, 40):
        args = demo.parse_args(["--run-dir", str(tmp_path), "--budget", str(g), "--fake-updates", "3"])
        lora, tsm, budget = demo.build_recipes(args, tmp_path, TEACHER)
        assert budget["lora"] == budget["tsm_stage1"] == g
        assert sum(p.steps for p in lora.phases) == 3 * g


def test_unequal_recipes_are_refused(tmp_path):
    bad = tmp_path / "tsm.yaml"
    bad.write_text(f"base: {demo.RECIPES / 'demo_fmnist_tsm.yaml'}\nphases:\n"
                   "  - {name: e, scale: 4, steps: 8, fake_updates_per_generator_update: 4}\n"
                   "  - {name: r, type: assemble, core_scale: 4, context_scales: [1], steps: 4}\n")
    args = demo.parse_args(["--run-dir", str(tmp_path), "--tsm-recipe", str(bad)])
    with pytest.raises(ValueError, match="unequal budgets"):
        demo.build_recipes(args, tmp_path, TEACHER)


def test_reference_rows_are_used_only_for_the_same_teacher_n_and_reference(tmp_path):
    path = tmp_path / "reference.json"
    rows, why = ev.read_reference_rows(path, "abc", 50, 1000, "r")
    assert rows is None and "does not exist" in why
    row = {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0, "n": 50}
    path.write_text(json.dumps({"unet_sha256": "abc", "n_reference": 1000, "reference_features_sha256": "r",
                                "rows": {"50": {"floor": row}}}))
    assert ev.read_reference_rows(path, "abc", 50, 1000, "r")[0] == {"floor": row}
    assert "teacher UNet" in ev.read_reference_rows(path, "other", 50, 1000, "r")[1]
    assert "no rows for N=1000" in ev.read_reference_rows(path, "abc", 1000, 1000, "r")[1]
    assert "reference set" in ev.read_reference_rows(path, "abc", 50, 500, "r")[1]
    assert ev.unet_hash(TEACHER) == ev.unet_hash(TEACHER) and len(ev.unet_hash(TEACHER)) == 16


def _classifier(images: np.ndarray, labels: np.ndarray) -> torch.nn.Module:
    """A small CNN trained on real 28x28 images (deterministic)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10))
    x = torch.as_tensor(images, dtype=torch.float32).div(255).unsqueeze(1)
    y = torch.as_tensor(labels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _accuracy(net, images: np.ndarray, labels) -> float:
    with torch.no_grad():
        pred = net(torch.as_tensor(images, dtype=torch.float32).div(255).unsqueeze(1)).argmax(1)
    return float((pred == torch.as_tensor(labels)).float().mean())


def test_shipped_teacher_loads_by_path_and_draws_the_prompted_class(one_thread):
    from tsm_core.data.fmnist import load_fashion_mnist
    from tsm_distill.teacher import load_teacher

    images, labels = load_fashion_mnist("train")
    # The judge must be good before it judges. Trained on 10,000 real images (1,000 per class, 1,500
    # steps) it scores ~88% on real test images. A weaker judge (3,000 images, 800 steps, 87%) put the
    # teachers of steps 4000 and 7000 at 78-83% of 60-100 samples, and the stronger one the step-7000
    # teacher at 88-91%: the weak judge measured itself as much as the teacher.
    pick = np.concatenate([np.nonzero(labels == c)[0][:1000] for c in range(10)])
    net = _classifier(images[pick], labels[pick])
    test_images, test_labels = load_fashion_mnist("test")
    real_acc = _accuracy(net, test_images[:1000], test_labels[:1000])
    assert real_acc > 0.86, f"the test's own classifier is too weak to judge the teacher ({real_acc:.2f})"

    teacher = load_teacher(str(TEACHER))  # by path, as users load it
    prompts, seeds = ev.eval_prompts(100)  # ten per class
    samples = ev.to_uint8(ev.teacher_generate(teacher, prompts, seeds, steps=10, progress_desc=""))
    acc = _accuracy(net, samples, [i % 10 for i in range(100)])
    assert acc > 0.8, (f"teacher samples are classified as the prompted class {acc:.0%} of the time "
                       f"(the classifier scores {real_acc:.0%} on real test images); the bar is 80%")


def test_evaluation_device_is_resolved_or_refused_with_a_fix(monkeypatch):
    assert ev.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.resolve_device("auto") == torch.device("cpu")  # a CPU-only machine evaluates on the CPU
    with pytest.raises(ValueError, match="sees no GPU; use --device cpu"):
        ev.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        ev.resolve_device("gpu0")
    with pytest.raises(ValueError, match="sees no GPU"):  # the demo refuses before anything runs
        demo.parse_args(["--device", "cuda:0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.resolve_device("auto") == torch.device("cuda")


def test_quick_demo_runs_end_to_end(quick_demo):
    run = quick_demo  # conftest: --quick, shrunk for CI (N=10, batch 1, a 2-step "full" teacher row)
    res = json.loads((run / "results.json").read_text())
    rows = res["rows"]
    assert len(rows) == 8
    assert [r["row"] for r in rows][3:6] == ["DMD2 + LoRA", "DMD2 + TSM stage 1 (experts)", "DMD2 + TSM stage 2 (router)"]
    # scores.py: every student is also scored against the teacher's samples, and the DMD-only students follow.
    assert [r["row"] for r in rows][6:] == [ds.ROW_NAMES["lora_dmd_only"], ds.ROW_NAMES["tsm_stage1_dmd_only"]]
    assert all(math.isfinite(r["fid_teacher"]) and math.isfinite(r["kid_teacher"]) for r in rows[3:])
    assert "fid_teacher" not in rows[0] and res["fidelity"]["teacher_steps"] == 50
    for r in rows:
        assert r["n"] == 10 and all(math.isfinite(r[k]) for k in ("fid", "kid_mean", "kid_std")), r
    assert rows[3]["generator_steps"] == rows[4]["generator_steps"] == res["budget"]["lora"] == 8
    assert rows[5]["generator_steps"] == {"experts": 8, "router": res["budget"]["tsm_stage2_router"]}
    assert res["n"] == 10 and res["n_reference"] == 200
    assert res["device"] == demo.device_name(ev.resolve_device("auto"))
    assert {"distill LoRA", "distill TSM", "reference rows"} <= set(res["seconds"])
    assert all(v >= 0 for v in res["seconds"].values())
    assert set(res["phase_seconds"]["tsm"]) == {p.split("/")[1] for p in res["budget"]["phases"] if p.startswith("tsm/")}
    for f in ("results.md", "samples.png", "gates.png"):
        assert (run / f).stat().st_size > 0
    assert "DMD2 + TSM stage 2" in (run / "results.md").read_text()
    # The budget curve (--budget-points 3): checkpoints every ceil(8 / 3) = 3 iterations were kept.
    curve = json.loads((run / "budget.json").read_text())
    steps = [p["generator_steps"] for p in curve["points"]]
    assert steps[0] == 3 and steps[-1] == 8 and steps == sorted(set(steps))
    assert curve["points"][0]["sources"]["lora"] == "lora/checkpoints/step_00000003"
    final = curve["points"][-1]
    assert final["fraction"] == 1.0 and final["lora"]["fid"] == rows[3]["fid"]
    assert final["tsm_stage1"]["fid"] == rows[4]["fid"]
    for p in curve["points"][:-1]:
        assert all(math.isfinite(p[k]["fid"]) for k in ("lora", "tsm_stage1")), p
    # A checkpoint holds the student of its step: the last one (step 8, the end of phase 01_lora_gan) loads
    # into the first phase adapter's structure and equals the 01 adapter, not the 00 one it was built from.
    from tsm_distill.demo.budget import load_snapshot
    lora_run = run / "lora"
    _, from_ckpt = load_snapshot(run / "teacher", lora_run, lora_run / "checkpoints" / "step_00000008")
    _, last_phase = load_snapshot(run / "teacher", lora_run, lora_run / "phases" / "01_lora_gan")
    _, first_phase = load_snapshot(run / "teacher", lora_run, lora_run / "phases" / "00_lora")
    a, b, c = from_ckpt.state_dict(), last_phase.state_dict(), first_phase.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert any(v.abs().sum() > 0 for v in a.values())  # a trained student, not the zero init


def test_a_retried_seed_resumes_a_student_only_from_the_same_recipe(tmp_path):
    from tsm_core.train.recipe import save_recipe

    args = demo.parse_args(["--quick", "--run-dir", str(tmp_path / "run")])
    lora, _, _ = demo.build_recipes(args, tmp_path, tmp_path / "teacher")

    class Trainer:  # records how train() was called
        def train(self, resume=False, overwrite=False):
            self.called = {"resume": resume, "overwrite": overwrite}
            return "adapter"

    run = tmp_path / "lora"
    t = Trainer()
    assert demo.train_student(t, lora, run) == ("adapter", False) and t.called == {"resume": False, "overwrite": True}
    save_recipe(lora, run / "recipe.yaml")
    assert demo.train_student(t, lora, run)[1] is False  # a recipe but no checkpoint yet: from scratch
    from tsm_core.train.checkpoint import STATE_FILE

    ckpt = run / "checkpoints" / "step_00000003"  # a complete checkpoint, as CheckpointManager marks one
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"global_step": 3}))
    assert demo.train_student(t, lora, run) == ("adapter", True) and t.called == {"resume": True, "overwrite": False}
    assert demo.train_student(t, lora, run, may_resume=False)[1] is False  # TSM after a retrained LoRA
    other, _, _ = demo.build_recipes(demo.parse_args(["--quick", "--lr-scale", "0.5", "--run-dir", str(tmp_path)]),
                                     tmp_path, tmp_path / "teacher")
    assert demo.train_student(t, other, run)[1] is False  # another learning rate: never resume
