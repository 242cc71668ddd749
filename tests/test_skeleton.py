"""The shared training skeleton (tsm_core.train.skeleton) on a small linear model: the run loop,
checkpoints at intervals and phase boundaries, bit-exact resume, SIGINT/SIGTERM, the stats rows and
the NaN stop. The two real trainers run on it too (tests/test_finetune.py, tests/test_distill.py)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field

import pytest
import torch

from tests.numerics import assert_close
from tsm_core.train.accel import make_accelerator, step_generator
from tsm_core.train.checkpoint import CheckpointManager
from tsm_core.train.logging import read_stats
from tsm_core.train.optim import NonFiniteLossError
from tsm_core.train.skeleton import PhasedTrainer, TrainingInterrupted, truncate_stats


@dataclass
class LinearRecipe:
    phases: list[int] = field(default_factory=lambda: [3, 4])
    lr: float = 0.1
    warmup: int = 0


class LinearTrainer(PhasedTrainer):
    """Regresses y = 2x with a Linear layer: phase 0 trains the weight, phase 1 the bias. Step k draws
    its batch from step_generator(seed, k), so a resumed run sees the same batches."""

    def __init__(self, run_dir, recipe=None, checkpoint_every=2, log_every=1, on_step=None):
        recipe = recipe or LinearRecipe()
        super().__init__(recipe, run_dir, seed=0, mixed_precision="no", checkpoint_every=checkpoint_every,
                         log_every=log_every, sample_every=0, keep_last=None, max_grad_norm=None, tensorboard=False,
                         accelerator=make_accelerator(seed=0))
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 4)
        self.on_step = on_step or (lambda trainer: None)

    def phase_lengths(self):
        return [(f"p{i}", n) for i, n in enumerate(self.recipe.phases)]

    def enter_phase(self, index):
        trained = self.model.weight if index == 0 else self.model.bias
        for p in self.model.parameters():
            p.requires_grad_(p is trained)
        opt, sched = self.make_optimizer([trained], self.recipe.lr, self.recipe.warmup)
        self.optimizers, self.schedulers = {"opt": opt}, {"sched": sched}

    def train_step(self):
        self.on_step(self)
        g = step_generator(0, self.global_step)
        x = torch.randn(8, 4, generator=g)
        loss = ((self.model(x) - 2 * x) ** 2).mean()
        self.check_finite(loss, "regression")
        loss.backward()
        self.apply_gradients(self.optimizers["opt"])
        self.schedulers["sched"].step()
        logs = {"loss": loss.detach()}
        if self.global_step % 2 == 0:  # like DMD2's generator loss: only on some steps
            logs["loss_even"] = loss.detach()
        return logs

    def checkpoint_modules(self):
        return {"model": self.model}

    def save_final(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def test_checkpoints_at_intervals_and_phase_boundaries(tmp_path):
    LinearTrainer(tmp_path).train()
    ckpt = CheckpointManager(tmp_path, keep_last=None)
    assert [p.name for p in ckpt.all()] == [f"step_{s:08d}" for s in (2, 3, 4, 6, 7)]
    # Mid-phase checkpoints hold the optimizer; boundary ones do not (the next phase starts a fresh one).
    opts = {p.name: torch.load(p / "optimizers.pt", weights_only=True) for p in ckpt.all()}
    assert "opt" in opts["step_00000002"] and opts["step_00000003"] == {}
    state = ckpt.read_state(ckpt.dir / "step_00000003")
    assert (state["phase"], state["phase_step"], state["global_step"]) == (1, 0, 3)


@pytest.mark.parametrize("keep", [2, 3, 6])
def test_resume_from_any_checkpoint_equals_the_uninterrupted_run(tmp_path, keep):
    want = LinearTrainer(tmp_path / "a").train()
    b = tmp_path / "b"
    LinearTrainer(b).train()
    for p in CheckpointManager(b, keep_last=None).all():
        if p.name != f"step_{keep:08d}":
            import shutil

            shutil.rmtree(p)
    got = LinearTrainer(b).train(resume=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    steps = [r["step"] for r in read_stats(b)]
    assert steps == list(range(1, 8))  # the re-run steps replaced their rows: none twice


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_same(tmp_path):
    want = LinearTrainer(tmp_path / "a").train()

    def term_at_step_5(trainer):
        if trainer.global_step == 4:  # during the fifth step (mid phase 1)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        LinearTrainer(tmp_path / "b", on_step=term_at_step_5).train()
    assert info.value.checkpoint.name == "step_00000005"  # the step under way finished first
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was removed again
    got = LinearTrainer(tmp_path / "b").train(resume=True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [r["step"] for r in read_stats(tmp_path / "b")] == list(range(1, 8))


def test_a_used_folder_is_refused_and_stale_temp_files_are_removed(tmp_path):
    LinearTrainer(tmp_path).train()
    with pytest.raises(ValueError, match="already holds a run"):
        LinearTrainer(tmp_path).train()
    (tmp_path / "adapter").mkdir()
    stale = tmp_path / "adapter" / ".tmp_tsm_adapter.safetensors"
    stale.write_bytes(b"half a file")
    LinearTrainer(tmp_path).train(resume=True)
    assert not stale.exists()


def test_rows_keep_the_latest_value_of_a_loss_the_step_did_not_produce(tmp_path):
    LinearTrainer(tmp_path, log_every=3).train()
    rows = read_stats(tmp_path)
    assert [r["step"] for r in rows] == [3, 6, 7]  # every 3 steps and at each phase end
    # Step 3 (global_step 2 during it) produced loss_even; step 6 did not (5 did, global_step 4).
    assert all("loss_even" in r for r in rows)
    assert rows[1]["loss_even"] != rows[1]["loss"]


def test_warmup_counts_steps_and_a_nan_loss_stops_before_the_update(tmp_path):
    seen = []
    LinearTrainer(tmp_path / "w", recipe=LinearRecipe(phases=[4], lr=0.1, warmup=4),
                  on_step=lambda tr: seen.append(tr.optimizers["opt"].param_groups[0]["lr"])).train()
    assert_close(torch.tensor(seen), torch.tensor([0.0, 0.025, 0.05, 0.075]), rel=1e-6)

    def poison(trainer):  # during step 3 (phase 0 trains the weight): a NaN bias makes the loss NaN
        if trainer.global_step == 2:
            with torch.no_grad():
                trainer.model.bias.fill_(float("nan"))
            trainer.before = trainer.model.weight.detach().clone()

    tr = LinearTrainer(tmp_path / "n", on_step=poison)
    with pytest.raises(NonFiniteLossError, match=r"at step 3\b.*step_00000002"):
        tr.train()
    assert torch.equal(tr.model.weight, tr.before)  # the NaN step did not update the weight


def test_truncate_stats_drops_later_rows_and_a_torn_line(tmp_path):
    (tmp_path / "stats.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    assert truncate_stats(tmp_path, 2) == 2
    assert [r["step"] for r in read_stats(tmp_path)] == [1, 2]


def test_resume_records_recipe_changes_and_refuses_shape_changes(tmp_path):
    import yaml

    class Trainer(LinearTrainer):
        shape_keys = ("phases*",)

    Trainer(tmp_path, checkpoint_every=100).train()
    saved = (tmp_path / "recipe.yaml").read_text()
    with pytest.raises(ValueError, match=r"phases: \[3, 4\] -> \[3, 4, 2\]"):
        Trainer(tmp_path, recipe=LinearRecipe(phases=[3, 4, 2])).train(resume=True)
    assert (tmp_path / "recipe.yaml").read_text() == saved  # refused before anything was written
    assert not (tmp_path / "resume_history.jsonl").exists()

    Trainer(tmp_path, recipe=LinearRecipe(lr=0.05)).train(resume=True)
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["lr"] == 0.05  # recipe.yaml stays true
    rows = [json.loads(line) for line in (tmp_path / "resume_history.jsonl").read_text().splitlines()]
    assert rows[-1]["changes"] == [{"key": "lr", "old": 0.1, "new": 0.05}]
    assert rows[-1]["checkpoint"].endswith("step_00000007")


def test_a_read_only_run_folder_is_refused_in_words_before_training(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    from tsm_core.train.skeleton import RunFolderError

    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".tmp_write_probe"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    tr = LinearTrainer(tmp_path / "run")
    with pytest.raises(RunFolderError, match="read-only file system; choose another --run-dir"):
        tr.train()
    assert not tr.started


def test_a_full_disk_at_a_checkpoint_says_so_and_names_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil as sh

    import tsm_core.train.checkpoint as ck
    from tsm_core.train.skeleton import RunFolderError

    saves = {"n": 0}
    real_save = ck._torch_save

    def fills_the_disk(obj, path):
        saves["n"] += 1
        if saves["n"] > 3:  # the first checkpoint (rng, optimizers, schedulers) fits; the second does not
            monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, path)

    monkeypatch.setattr(ck, "_torch_save", fills_the_disk)
    with pytest.raises(RunFolderError, match=r"checkpoint step 3: no space left .*0\.0 MiB free.*step_00000002.*--resume"):
        LinearTrainer(tmp_path).train()
    monkeypatch.undo()

    def bug(obj, path):
        raise RuntimeError("a bug")

    # A RuntimeError with room on the disk is a bug, not the disk: it stays what it is.
    monkeypatch.setattr(ck, "_torch_save", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        LinearTrainer(tmp_path / "b").train()


def test_a_failure_in_on_start_or_save_final_closes_the_logger_and_releases_the_folder(tmp_path):
    closed = []

    class Failing(LinearTrainer):
        def __init__(self, run_dir, where):
            super().__init__(run_dir)
            self.where = where

        def on_start(self):
            real_close = self.logger.close
            self.logger.close = lambda: (closed.append(self.where), real_close())
            if self.where == "on_start":
                raise ValueError("bad first batch")

        def save_final(self):
            raise ValueError("cannot export")

    for where in ("on_start", "save_final"):
        with pytest.raises(ValueError):
            Failing(tmp_path / where, where).train()
    assert closed == ["on_start", "save_final"]
    # The lock went with the failed run: the folder can be resumed (save_final) or overwritten (on_start).
    assert LinearTrainer(tmp_path / "on_start").train(overwrite=True)["weight"].shape == (4, 4)
