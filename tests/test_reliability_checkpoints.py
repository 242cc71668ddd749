"""Reliability round 2 (issue 28, part B): damaged checkpoints, the run-folder lock, disk errors.

Each case was found by a probe of ``tsm-distill`` on the tiny models:

* a full disk or a read-only folder at any write (safetensors, torch.save, JSON, images, adapters) is
  one ``error:`` line that says which of the two it is (cases 10, 11);
* a damaged latest checkpoint (a cut-short ``.safetensors`` or ``optimizers.pt``, a garbage
  ``trainer_state.json``) is set aside and ``--resume`` falls back to the one before, ending exactly
  like the uninterrupted run (cases 12-14);
* a checkpoint loaded into modules of another shape is one line naming the tensor (case 15);
* a second run in a folder a live run holds is refused, naming the holder; a dead run's lock is none;
* ``tools/fid.py`` refuses an unwritable output path before scoring (case 16).
"""

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

import tsm_core.train.checkpoint as checkpoint_module
from tests.test_distill import phase, recipe
from tests.test_reliability import adapter, assert_same_adapter, one_line_error, stats_steps, write_recipe
from tsm_core import serialization
from tsm_core.testing import tiny
from tsm_core.train.checkpoint import CheckpointManager, CorruptCheckpointError
from tsm_core.train.logging import RunLogger
from tsm_core.train.runlock import LOCK_FILE, RunFolderInUse, lock_holder
from tsm_core.train.storage import describe_write_failure
from tsm_distill import DMD2Trainer, cli

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words
READ_ONLY = "Error while serializing: I/O error: Read-only file system (os error 30)"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny teacher, prompts and real images of tests.test_reliability (its fixture, built here)."""
    d = tmp_path_factory.mktemp("reliability_checkpoints")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def last_error_line(capsys) -> str:
    """The CLI's last stderr line (after any progress bars); no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------------------- 10. every writer, one line
def _safetensors_full(*args, **kwargs):
    raise SafetensorError(FULL)


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


WRITERS = [  # (what fails, owner, attribute, replacement, extra train settings, expected words)
    ("checkpoint tensors", checkpoint_module, "save_file", _safetensors_full, {},
     "could not write checkpoint step 1: no space left on the device"),
    ("phase adapter", serialization, "save_file", _safetensors_full, {},
     "could not write the adapter of phase 'e': no space left on the device"),
    ("torch.save", torch, "save", _read_only, {}, "could not write checkpoint step 1: .* read-only file system"),
    ("stats.jsonl", RunLogger, "log", _disk_full, {},
     r"could not write the outputs of step 1 \(logs, samples, exports\): no space left on the device"),
    ("sample grid", Image.Image, "save", _read_only, {"sample_every": 1},
     "could not write the outputs of step 1 .* read-only file system"),
]


@pytest.mark.parametrize("what,owner,name,replacement,train,message", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_or_read_only_disk_at_any_write_is_one_line_naming_which(env, tmp_path, monkeypatch, capsys, what,
                                                                        owner, name, replacement, train, message):
    import re

    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", steps=2, scale=4)], checkpoint_every=1, **train)
    monkeypatch.setattr(owner, name, replacement)
    assert cli.main([str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert re.search(message, last_error_line(capsys))


# ---------------------------------------------------------------------------- 11. the errno decides first
def _free(monkeypatch, mib: float) -> None:
    free = int(mib * 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - free, free))


ERRORS = [  # (error, free MiB, expected words or None)
    (OSError(errno.EROFS, "Read-only file system"), 4.0, "read-only file system"),
    (OSError(errno.EACCES, "Permission denied"), 4.0, r"not writable \(permission denied\)"),
    (OSError(errno.ENOSPC, "No space left on device"), 4.0, "no space left on the device .*4.0 MiB free"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 500.0, "no space left"),
    (SafetensorError(READ_ONLY), 4.0, "read-only file system"),
    (SafetensorError(FULL), 500.0, "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), 4.0, "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), 500.0, None),
    (ValueError("a bug, not the disk"), 4.0, None),
    (OSError(errno.EIO, "Input/output error"), 4.0, None),
]


@pytest.mark.parametrize("error,free_mib,words", ERRORS, ids=[f"{type(e).__name__}-{e}-{f}" for e, f, _ in ERRORS])
def test_the_errno_decides_before_free_space(tmp_path, monkeypatch, error, free_mib, words):
    import re

    _free(monkeypatch, free_mib)
    said = describe_write_failure(error, tmp_path)
    if words is None:
        assert said is None
    else:
        assert said is not None and re.search(words, said), said


# ---------------------------------------------------------------------------- 12-14. damaged checkpoints
@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted 4-step run with a checkpoint after every step (all kept)."""
    d = tmp_path_factory.mktemp("fallback")
    path = write_recipe(env, d / "r.yaml", [phase("e", steps=4, scale=4)], checkpoint_every=1, keep_last=None)
    assert cli.main([str(path), "--run-dir", str(d / "run")]) == 0
    assert checkpoints(d / "run") == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    return path, d / "run"


def _cut_short(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _garbage(file: Path) -> None:
    file.write_text("{ not json")


DAMAGES = [  # (file, how, keep the manifest)
    ("generator.safetensors", _cut_short, True),
    ("optimizers.pt", _cut_short, True),
    ("trainer_state.json", _garbage, True),
    ("optimizers.pt", _flip_a_byte, True),  # same size: only the checksum sees it
    ("generator.safetensors", _cut_short, False),  # a checkpoint from before manifests: found by reading
    ("trainer_state.json", _garbage, False),
]


@pytest.mark.parametrize("file,damage,manifest", DAMAGES,
                         ids=[f"{f}-{d.__name__[1:]}-{'manifest' if m else 'no manifest'}" for f, d, m in DAMAGES])
def test_a_damaged_latest_checkpoint_is_set_aside_and_resume_equals_uninterrupted(reference, tmp_path, capsys,
                                                                                  file, damage, manifest):
    """The run was stopped after step 3; step 3's checkpoint is damaged. --resume names the file, sets the
    checkpoint aside (kept, renamed), falls back to step 2 and ends bit for bit like the uninterrupted run."""
    path, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    if not manifest:
        for m in (run / "checkpoints").glob("*/manifest.json"):
            m.unlink()
    damage(run / "checkpoints" / "step_00000003" / file)
    damaged = (run / "checkpoints" / "step_00000003" / file).read_bytes()
    capsys.readouterr()

    assert cli.main([str(path), "--run-dir", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"step_00000003/{file}" in out and "set aside as" in out
    assert f"falling back to {run / 'checkpoints' / 'step_00000002'}" in out
    assert_same_adapter(adapter(run), adapter(ref))
    assert stats_steps(run) == [1, 2, 3, 4]  # steps 3 and 4 trained again, logged once
    assert checkpoints(run) == ["corrupt_step_00000003", *(f"step_0000000{s}" for s in (1, 2, 3, 4))]
    assert (run / "checkpoints" / "corrupt_step_00000003" / file).read_bytes() == damaged  # kept as it was


def test_resume_with_no_checkpoint_that_loads_is_one_line(reference, tmp_path, capsys):
    path, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for ckpt in (run / "checkpoints").iterdir():
        _cut_short(ckpt / "generator.safetensors")
    capsys.readouterr()
    assert cli.main([str(path), "--run-dir", str(run), "--resume"]) == 2
    err = last_error_line(capsys)  # found once the models are built: after their loading bars
    assert "no checkpoint in" in err and "loads" in err and "--overwrite" in err
    assert checkpoints(run) == [f"corrupt_step_0000000{s}" for s in (1, 2, 3, 4)]  # set aside, not deleted


def _tiny_checkpoint(run: Path, steps, keep_last=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = CheckpointManager(run, keep_last=keep_last)
    for step in steps:
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ckpt.save(step, {"model": model}, {"opt": opt}, state={"k": step})
    return ckpt, model, opt


def test_set_aside_checkpoints_are_neither_latest_nor_counted_by_keep_last(tmp_path):
    ckpt, model, opt = _tiny_checkpoint(tmp_path, (1, 2, 3), keep_last=2)
    _cut_short(ckpt.dir / "step_00000003" / "optimizers.pt")
    good, damaged = ckpt.latest_loadable()
    assert good == ckpt.dir / "step_00000002"
    assert [(moved.name, e.file.name) for moved, e in damaged] == [("corrupt_step_00000003", "optimizers.pt")]
    assert ckpt.latest() == good
    for step in (3, 4):
        ckpt.save(step, {"model": model}, {"opt": opt})
    assert [p.name for p in ckpt.all()] == ["step_00000003", "step_00000004"]  # keep_last counts good ones only
    assert (ckpt.dir / "corrupt_step_00000003").is_dir()
    _cut_short(ckpt.dir / "step_00000004" / "model.safetensors")
    (ckpt.dir / "step_00000003" / "trainer_state.json").write_text("[]")
    good, damaged = ckpt.latest_loadable()
    assert good is None
    assert sorted(moved.name for moved, _ in damaged) == ["corrupt_step_00000003.2", "corrupt_step_00000004"]


def test_load_names_the_damaged_file_and_old_checkpoints_without_a_manifest_still_load(tmp_path):
    ckpt, model, opt = _tiny_checkpoint(tmp_path, (1, 2))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for path in ckpt.all():
        (path / "manifest.json").unlink()  # as written before manifests existed
    with torch.no_grad():
        model.weight.zero_()
    assert ckpt.load(ckpt.latest(), {"model": model}, {"opt": opt})["k"] == 2
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)

    _cut_short(ckpt.latest() / "model.safetensors")
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=r"step_00000002/model\.safetensors cannot be read"):
            ckpt.load(ckpt.latest(), {"model": model}, verify=verify)
    (ckpt.dir / "step_00000001" / "trainer_state.json").write_text("garbage")
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001/trainer_state\.json cannot be read"):
        ckpt.read_state(ckpt.dir / "step_00000001")


# ---------------------------------------------------------------------------- 15. another shape
def test_resume_into_another_rank_without_recipe_yaml_is_one_line_naming_the_tensor(env, tmp_path, capsys):
    """recipe.yaml deleted, so the recipe check cannot see the rank change: the checkpoint load does, and
    the checkpoint is not taken for a damaged one."""
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", steps=3, scale=4)], checkpoint_every=1)
    run = tmp_path / "run"
    assert cli.main([str(path), "--run-dir", str(run)]) == 0
    (run / "recipe.yaml").unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000003")  # stopped mid-phase: optimizers are restored too
    before = checkpoints(run)
    capsys.readouterr()
    assert cli.main([str(path), "--run-dir", str(run), "--resume", "--set", "experts.rank=4"]) == 2
    err = last_error_line(capsys)
    assert "does not match its checkpoint: tensor '" in err
    assert "lora_A" in err and "has shape (4, " in err and "checkpoint has (2, " in err
    assert checkpoints(run) == before


def test_optimizer_moments_of_another_shape_are_refused_at_load(tmp_path):
    """Modules not requested (or loaded elsewhere): the optimizer's saved moments must still fit, else
    the first step fails with a bare size mismatch."""
    ckpt, _, _ = _tiny_checkpoint(tmp_path, (1,))
    wider = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(wider.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer 'opt' does not match its checkpoint: parameter 0 has shape "
                                         r"\(4, 3\), its saved 'exp_avg' has \(2, 3\)"):
        ckpt.load(ckpt.latest(), {}, {"opt": opt})


# ---------------------------------------------------------------------------- the run-folder lock
def _hold_lock(run: Path, text: str) -> int:
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, text.encode())
    return fd


def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder(env, tmp_path, capsys):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    run = tmp_path / "run"
    fd = _hold_lock(run, "pid 4242 on otherhost, since 2026-01-01 00:00:00\n")
    try:
        for extra in ([], ["--overwrite"]):
            assert cli.main([str(path), "--run-dir", str(run), *extra]) == 2
            err = one_line_error(capsys)
            assert f"run folder {run} is in use by another run (pid 4242 on otherhost" in err
        assert not (run / "stats.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        os.close(fd)  # closing the only descriptor drops the lock
    assert cli.main([str(path), "--run-dir", str(run)]) == 0


def test_the_lock_is_held_while_the_run_lives_and_released_when_it_fails(env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []

    def failing_step(self):
        seen.append(lock_holder(run))
        raise ValueError("a bug inside a training step")

    monkeypatch.setattr(DMD2Trainer, "train_step", failing_step)
    with pytest.raises(ValueError, match="a bug"):
        DMD2Trainer(recipe(env, [phase("e", scale=4)]), run).train()
    assert seen[0].startswith(f"pid {os.getpid()} on ")
    assert lock_holder(run) is None


def test_a_lock_left_by_a_killed_process_is_no_lock(env, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom tsm_core.train.runlock import RunLock\n"
         "RunLock.acquire(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderInUse, match=f"in use by another run \\(pid {holder.pid} on "):
            DMD2Trainer(recipe(env, [phase("e", scale=4)]), run).train()
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in (run / LOCK_FILE).read_text()  # the file says who; the kernel says it is over
    DMD2Trainer(recipe(env, [phase("e", scale=4)]), run).train()
    assert stats_steps(run) == [1]


# ---------------------------------------------------------------------------- 16. tools/fid.py outputs
def test_fid_refuses_an_unwritable_output_before_scoring(tmp_path, monkeypatch, capsys):
    from tools import fid as fid_cli

    scored = []
    fake = SimpleNamespace(to_dict=lambda: {"fid": 1.0}, summary=lambda: "FID 1.0")
    monkeypatch.setattr(fid_cli, "_extractor", lambda args, pre_resize=None: None)
    monkeypatch.setattr(fid_cli, "score", lambda *a, **k: scored.append(a) or fake)
    (tmp_path / "afile").write_text("x")
    args = ["score", str(tmp_path / "src"), "--ref", str(tmp_path / "ref.npz"), "--quiet"]

    assert fid_cli.main([*args, "--json", str(tmp_path / "afile" / "out.json")]) == 2
    err = one_line_error(capsys)
    assert f"--json {tmp_path / 'afile' / 'out.json'} cannot be written: {tmp_path / 'afile'} is a file" in err

    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".tmp_write_probe_"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert fid_cli.main([*args, "--json", str(tmp_path / "ro" / "out.json")]) == 2
    assert "is on a read-only file system" in one_line_error(capsys)
    assert fid_cli.main(["stats", str(tmp_path / "src"), "--out", str(tmp_path / "ro" / "ref.npz"), "--quiet"]) == 2
    assert "--out" in one_line_error(capsys)
    assert scored == []  # refused before any scoring work
    monkeypatch.setattr(Path, "write_bytes", real)
    assert fid_cli.main([*args, "--json", str(tmp_path / "ok" / "out.json")]) == 0
    assert len(scored) == 1 and (tmp_path / "ok" / "out.json").is_file()
