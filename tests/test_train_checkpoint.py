"""Checkpoints: save -> load restores everything, saves are atomic, and resume == uninterrupted."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from tsm_core.train.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state


def draw():
    """One number from each generator a trainer may use."""
    return random.random(), float(np.random.rand()), torch.rand(3)


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # Warmup over 4 steps, so a restored scheduler matters for the next learning rates.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 4)  # the data stream is random too: resume must continue it exactly
        loss = (model(x) - x[:, :3].flip(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_rng_round_trip():
    state = capture_rng_state()
    a = draw()
    draw()
    restore_rng_state(state)
    b = draw()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])


def test_save_mutate_load_restores_tensors_optimizer_and_rng(tmp_path):
    model, opt, sched = make()
    train(model, opt, sched, 2)
    extra = {"router.E": torch.randn(5, 2)}  # an explicit dict of tensors (trainable part of a big model)
    ckpt = CheckpointManager(tmp_path)
    path = ckpt.save(7, {"model": model, "router": extra}, {"opt": opt}, {"sched": sched},
                     {"phase": 1, "note": "x"})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert json.loads((path / "trainer_state.json").read_text()) == {"phase": 1, "note": "x", "step": 7}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    router = extra["router.E"].clone()
    opt_state = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    lr = sched.get_last_lr()
    expected_draw = draw()

    train(model, opt, sched, 3)  # mutate everything
    extra["router.E"].add_(1.0)
    state = ckpt.load(path, {"model": model, "router": extra}, {"opt": opt}, {"sched": sched})

    assert state == {"phase": 1, "note": "x", "step": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert torch.equal(extra["router.E"], router)
    restored = opt.state_dict()
    for pid, s in opt_state["state"].items():
        for k, v in s.items():
            assert torch.equal(restored["state"][pid][k], v)
    assert restored["param_groups"] == opt_state["param_groups"]
    assert sched.get_last_lr() == lr
    got = draw()
    assert got[:2] == expected_draw[:2] and torch.equal(got[2], expected_draw[2])


def test_load_rejects_unconsumed_or_missing_entries(tmp_path):
    model, opt, sched = make()
    ckpt = CheckpointManager(tmp_path)
    path = ckpt.save(1, {"model": model}, {"opt": opt})
    partial = {"weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"1 saved tensor\(s\) have no place.*'bias'"):
        ckpt.load(path, {"model": partial})  # bias has nowhere to go
    assert partial["weight"].abs().sum() == 0  # a failed load changes nothing
    with pytest.raises(ValueError, match="has shape"):
        ckpt.load(path, {"model": {"weight": torch.zeros(4, 4), "bias": torch.zeros(3)}})
    with pytest.raises(ValueError, match="does not match its checkpoint"):
        ckpt.load(path, {"model": nn.Linear(5, 3)})
    with pytest.raises(ValueError, match=r"no module 'unet'; it has: \['model'\]"):
        ckpt.load(path, {"unet": model})
    with pytest.raises(ValueError, match="no optimizer 'critic'"):
        ckpt.load(path, {}, {"critic": opt})
    # A subset module receiving everything saved is fine: missing keys are allowed.
    sub = {"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}
    ckpt.load(path, {"model": sub})
    assert torch.equal(sub["weight"], model.weight.detach())
    # strict=False skips what is absent.
    assert ckpt.load(path, {"unet": model}, {"critic": opt}, strict=False)["step"] == 1
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load(tmp_path / "checkpoints" / "step_00000099", {})


def test_bad_inputs_to_save(tmp_path):
    model, *_ = make()
    with pytest.raises(ValueError, match="JSON-able"):
        CheckpointManager(tmp_path).save(1, {"model": model}, state={"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="name"):
        CheckpointManager(tmp_path).save(1, {"a/b": model})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    assert CheckpointManager(tmp_path).latest() is None  # nothing half-written became visible


def test_keep_last_prunes_oldest(tmp_path):
    model, *_ = make()
    ckpt = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"model": model})
    assert [p.name for p in ckpt.all()] == ["step_00000030", "step_00000040"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]
    ckpt.save(40, {"model": model}, state={"again": True})  # re-saving a step replaces it
    assert json.loads((ckpt.latest() / "trainer_state.json").read_text())["again"] is True


def test_interrupted_save_is_invisible_and_cleaned(tmp_path):
    model, *_ = make()
    ckpt = CheckpointManager(tmp_path)
    good = ckpt.save(5, {"model": model})
    # Simulate a kill mid-save: a temp folder with some files, and a step folder with no state file.
    tmp = tmp_path / "checkpoints" / ".tmp_step_00000006"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / "step_00000007").mkdir()
    assert ckpt.latest() == good
    ckpt.save(8, {"model": model})
    assert not tmp.exists()
    assert ckpt.latest().name == "step_00000008"


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight  # shared storage: safetensors needs separate copies
    ckpt = CheckpointManager(tmp_path)
    path = ckpt.save(0, {"m": model})
    fresh = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    ckpt.load(path, {"m": fresh})
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(123)
    model, opt, sched = make(seed=1)
    train(model, opt, sched, 6)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)
    model, opt, sched = make(seed=1)
    train(model, opt, sched, 3)
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(3, {"model": model}, {"opt": opt}, {"sched": sched})
    del model, opt, sched
    torch.manual_seed(999)  # the fresh process starts from some other RNG state

    model, opt, sched = make(seed=2)  # fresh objects, different init
    state = ckpt.load(ckpt.latest(), {"model": model}, {"opt": opt}, {"sched": sched})
    train(model, opt, sched, 6 - state["step"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k
