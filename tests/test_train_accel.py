"""accelerate setup: typed settings, and real 2-process DDP on the CPU (gloo) with checkpoints.

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2
tests/test_train_accel.py OUT`` trains a tiny nn.Linear under DDP and writes each rank's results to OUT.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

STEPS = 3


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-specific data, so DDP gradient averaging is what keeps the ranks equal."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(4, 5, generator=g)
    return x, x.sum(1, keepdim=True)


def new_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(5, 1)


def worker(out: Path) -> None:
    from tsm_core.train.accel import make_accelerator
    from tsm_core.train.checkpoint import CheckpointManager

    acc = make_accelerator(cpu=True, seed=0, run_dir=out)
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    rank = acc.process_index
    for step in range(STEPS):
        x, y = batch(rank, step)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        acc.backward(loss)
        opt.step()

    # Checkpoint with the accelerator: one writer, one RNG file per rank, per-rank RNG restored.
    ckpt = CheckpointManager(out / "run", accelerator=acc)
    torch.manual_seed(100 + rank)
    path = ckpt.save(STEPS, {"model": model}, {"opt": opt}, state={"phase": 0})
    after_save = torch.rand(3)
    with torch.no_grad():
        acc.unwrap_model(model).weight.zero_()
    state = ckpt.load(path, {"model": model}, {"opt": opt})
    result = {
        "world": acc.num_processes,
        "weight": acc.unwrap_model(model).weight.detach().clone(),
        "bias": acc.unwrap_model(model).bias.detach().clone(),
        "rng_restored": torch.equal(torch.rand(3), after_save),
        "state": state,
        "files": sorted(p.name for p in path.iterdir()),
    }
    torch.save(result, out / f"rank{rank}.pt")
    acc.wait_for_everyone()
    acc.end_training()


def test_make_accelerator_settings(tmp_path):
    from accelerate.state import AcceleratorState

    from tsm_core.train.accel import make_accelerator

    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        make_accelerator(mixed_precision="fp8")
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        make_accelerator(mixed_precision="fp16", cpu=True)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_accelerator(gradient_accumulation_steps=0)
    try:
        acc = make_accelerator(gradient_accumulation_steps=2, run_dir=tmp_path, cpu=True, seed=5)
        assert acc.device.type == "cpu" and acc.gradient_accumulation_steps == 2
        assert Path(acc.project_dir) == tmp_path
        a = torch.rand(2)
        torch.manual_seed(5)
        assert torch.equal(a, torch.rand(2))  # seeded
    finally:
        AcceleratorState._reset_state(True)  # the state is a process-wide singleton: leave it clean


def test_two_process_ddp_keeps_ranks_equal(tmp_path):
    from tests.numerics import assert_close, close

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["weight"], r1["weight"]) and torch.equal(r0["bias"], r1["bias"])

    # DDP averages gradients: equal to one process stepping on the mean of the two ranks' losses.
    ref = new_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(STEPS):
        loss = sum((ref(x) - y).pow(2).mean() for x, y in (batch(0, step), batch(1, step))) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_close(r0["weight"], ref.weight.detach(), rel=1e-5)
    assert not close(r0["weight"], new_model().weight.detach(), rel=1e-3)  # it trained

    assert r0["rng_restored"] and r1["rng_restored"]  # each rank got its own RNG state back
    assert r0["state"] == r1["state"] == {"phase": 0, "step": STEPS}
    assert r0["files"] == ["manifest.json", "model.safetensors", "optimizers.pt", "rng_state_0.pt", "rng_state_1.pt",
                           "schedulers.pt", "trainer_state.json"]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
