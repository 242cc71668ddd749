"""Atomic full-state checkpoints: module tensors, optimizers, schedulers, RNG and trainer state.

Layout of one checkpoint, ``run_dir/checkpoints/step_{step:08d}/``::

    {name}.safetensors      one file per entry of ``modules`` (a module's state dict or a dict of tensors)
    optimizers.pt           {name: optimizer.state_dict()}       (torch.save)
    schedulers.pt           {name: scheduler.state_dict()}       (torch.save)
    rng_state_{rank}.pt     python / numpy / torch CPU / CUDA generator states, one file per process
    manifest.json           {"files": {name: {"bytes": n, "sha256": hex}}} of every other file
    trainer_state.json      the trainer's ``state`` dict plus ``"step"``; written last

Why it is never half-written: everything goes into a hidden temporary sibling folder
(``.tmp_step_...``), each file is fsynced, and only then is the folder renamed into place with
``os.replace`` (a rename is atomic on POSIX file systems). A process killed mid-save leaves only a
temporary folder, which `CheckpointManager.latest` ignores and the next save deletes.

Why it is checked before it is loaded: a complete folder can still be damaged later (a disk error, a
copy cut short, a file edited by hand). `CheckpointManager.verify` compares every file with the
manifest written at save time (sizes, then SHA-256); a checkpoint from before manifests existed is
verified by reading every file. `CheckpointManager.latest_loadable` sets a damaged checkpoint aside as
``checkpoints/corrupt_step_{step:08d}`` (renamed, never deleted; no longer counted as a checkpoint)
and returns the newest one that verifies, so ``--resume`` falls back instead of failing.

Scope: under DDP every process holds the same weights and optimizer state, so the main process
writes them; each process adds its own ``rng_state_{rank}.pt``, so multi-node runs need a run
folder on a shared file system (as ``accelerator.save_state`` does). Sharded entries (FSDP2,
`tsm_core.train.fsdp.ShardedEntry`: ``ShardedState`` / ``ShardedOptimizer``, with ``gather()`` and
``scatter(saved)``) are gathered to full tensors on every process before the main one writes, and
scattered back after every process read the files: the files are the same as an unsharded run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .fsdp import ShardedEntry, ShardedState

STEP_DIR = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp_"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizers.pt"
SCHED_FILE = "schedulers.pt"
MANIFEST_FILE = "manifest.json"
CORRUPT_PREFIX = "corrupt_"  # a checkpoint set aside: corrupt_step_00001000 (no longer matches STEP_DIR)
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is damaged: missing, cut short, changed since it was saved, or unreadable.
    ``file`` is the file; the message names it and says what is wrong."""

    def __init__(self, file: Path, problem: str):
        super().__init__(f"checkpoint file {file} {problem}")
        self.file = file


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Snapshot the python ``random``, numpy, torch CPU and (when available) CUDA generators.

    The result holds only tensors, ints, floats, strings and tuples, so it loads with
    ``torch.load(..., weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Restore generators captured by `capture_rng_state` (CUDA only if both then and now have it)."""
    random.setstate(_as_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this process sees "
                          f"{torch.cuda.device_count()}; restoring the common ones", stacklevel=2)
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def _as_tuples(x: Any) -> Any:
    # random.setstate needs tuples; a round trip through some serialisers turns them into lists.
    if isinstance(x, (list, tuple)):
        return tuple(_as_tuples(v) for v in x)
    return x


# --------------------------------------------------------------------------- file helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(file: Path, reader: Any) -> Any:
    """``reader(file)``, with any failure to read turned into a `CorruptCheckpointError` naming the file."""
    if not file.is_file():
        raise CorruptCheckpointError(file, "is missing")
    try:
        return reader(file)
    except Exception as e:  # safetensors, zip, pickle and JSON errors all mean the same here: damaged
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        raise CorruptCheckpointError(file, f"cannot be read ({type(e).__name__}: {first_line})") from e


def _torch_load(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_json(file: Path) -> Any:
    return json.loads(file.read_text(encoding="utf-8"))


def _tensors_for_saving(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage (tied weights) get their own copy,
    because safetensors refuses shared storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"module entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def _write_manifest(folder: Path, state_text: str) -> None:
    """``manifest.json``: size and SHA-256 of every file of ``folder`` plus the state file about to be
    written (hashed from its text). Reading the files back costs one pass over the checkpoint, small
    next to the time between two checkpoints, and makes `CheckpointManager.verify` certain."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST_FILE, STATE_FILE)}
    data = state_text.encode("utf-8")
    files[STATE_FILE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")
    _fsync_file(folder / MANIFEST_FILE)


def step_of(path: str | os.PathLike) -> int:
    """The step number of a checkpoint folder named ``step_{step:08d}``."""
    m = STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step_00001000)")
    return int(m.group(1))


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save and restore full training state under ``run_dir/checkpoints``.

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints/step_{step:08d}``.
        keep_last: how many complete checkpoints to keep (older ones are deleted after each save);
            ``None`` keeps all.
        accelerator: an ``accelerate.Accelerator``; with it only the main process writes shared files,
            every process writes its own RNG state, and all processes wait for the save to finish.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int | None = 3, accelerator: Any = None):
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last must be a positive integer or None (keep all), got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.accelerator = accelerator

    # -- process helpers
    @property
    def _rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def _is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def _unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module) if self.accelerator is not None else module

    # -- listing
    def all(self) -> list[Path]:
        """Complete checkpoints, oldest step first (temporary folders and unfinished ones excluded)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir()
                 if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        found = self.all()
        return found[-1] if found else None

    # -- verifying
    def verify(self, path: str | os.PathLike) -> None:
        """Check that checkpoint ``path`` is intact before loading it.

        With a manifest: every listed file exists, has its size and its SHA-256. Without one (saved
        before manifests existed): every file reads in full.

        Raises:
            CorruptCheckpointError: the first damaged file, named, and what is wrong with it.
        """
        path = Path(path)
        manifest = path / MANIFEST_FILE
        if not manifest.is_file():
            self._verify_by_reading(path)
            return
        files = _read(manifest, lambda f: _read_json(f)["files"])
        for name, saved in files.items():
            file = path / name
            if not file.is_file():
                raise CorruptCheckpointError(file, "is missing")
            size = file.stat().st_size
            if size != saved["bytes"]:
                raise CorruptCheckpointError(file, f"has {size} bytes, {saved['bytes']} when it was saved "
                                                   "(cut short or overwritten)")
            if _sha256(file) != saved["sha256"]:
                raise CorruptCheckpointError(file, "has changed since it was saved (its SHA-256 differs)")

    def _verify_by_reading(self, path: Path) -> None:
        self.read_state(path)
        for file in sorted(path.glob("*.safetensors")):
            _read(file, lambda f: load_file(f, device="cpu"))
        for file in sorted(path.glob("*.pt")):
            _read(file, _torch_load)

    def set_aside(self, path: str | os.PathLike) -> Path:
        """Rename a damaged checkpoint to ``corrupt_step_...`` beside it (``.2``, ``.3``, ... when that
        name is taken): its files stay for a look, and it no longer counts as a checkpoint."""
        path = Path(path)
        target = path.with_name(CORRUPT_PREFIX + path.name)
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{n}")
        os.replace(path, target)
        _fsync_dir(path.parent)
        return target

    def latest_loadable(self) -> tuple[Path | None, list[tuple[Path, CorruptCheckpointError]]]:
        """The newest checkpoint that verifies, after setting aside each newer one that does not.

        The main process verifies and renames; every process then sees the same folder. Returns
        ``(checkpoint or None, [(where a damaged one was moved, why), ...])`` (the list is empty on
        other processes).
        """
        set_aside: list[tuple[Path, CorruptCheckpointError]] = []
        if self._is_main:
            for path in reversed(self.all()):
                try:
                    self.verify(path)
                    break
                except CorruptCheckpointError as e:
                    set_aside.append((self.set_aside(path), e))
        self._wait()
        return self.latest(), set_aside

    # -- saving
    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically, prune old ones, and return its folder.

        Args:
            step: the global step; names the folder and is stored in ``trainer_state.json``.
            modules: name -> ``nn.Module`` (its whole state dict is saved) or a dict of tensors (saved as
                given: pass only the trainable tensors of a large frozen model).
            optimizers / schedulers: name -> object with ``state_dict()``.
            state: JSON-able trainer state (phase index, counters, ...); ``"step"`` is added.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        optimizers, schedulers, state = optimizers or {}, schedulers or {}, dict(state or {})
        for name in [*modules, *optimizers, *schedulers]:
            if not _NAME.match(name):
                raise ValueError(f"checkpoint entry name {name!r} must use only letters, digits, '_', '-', '.'")
        state["step"] = step
        try:
            state_text = json.dumps(state, indent=2, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"trainer state must be JSON-able (no tensors, NaN or objects): {e}") from e

        # Sharded entries are gathered by every process (collectives), before only the main one writes.
        modules = {k: m.gather() if isinstance(m, ShardedEntry) else m for k, m in modules.items()}
        optimizer_states = {k: o.gather() if isinstance(o, ShardedEntry) else None for k, o in optimizers.items()}
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"{TMP_PREFIX}step_{step:08d}"
        if self._is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(f"{TMP_PREFIX}*"):  # left by a killed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._wait()
        _torch_save(capture_rng_state(), tmp / f"rng_state_{self._rank}.pt")
        self._wait()
        if self._is_main:
            for name, m in modules.items():
                sd = self._unwrap(m).state_dict() if isinstance(m, nn.Module) else m
                save_file(_tensors_for_saving(sd), tmp / f"{name}.safetensors", metadata={"step": str(step)})
                _fsync_file(tmp / f"{name}.safetensors")
            _torch_save({k: o.state_dict() if optimizer_states[k] is None else optimizer_states[k]
                         for k, o in optimizers.items()}, tmp / OPTIM_FILE)
            _torch_save({k: s.state_dict() for k, s in schedulers.items()}, tmp / SCHED_FILE)
            _write_manifest(tmp, state_text)
            # The state file is the completion marker inside the folder: written last.
            (tmp / STATE_FILE).write_text(state_text, encoding="utf-8")
            _fsync_file(tmp / STATE_FILE)
            _fsync_dir(tmp)
            old = None
            if final.exists():  # re-saving a step (e.g. after resume): swap the old folder out
                old = self.dir / f"{TMP_PREFIX}old_{final.name}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
        self._wait()
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for p in self.all()[: -self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)

    # -- loading
    def read_state(self, path: str | os.PathLike) -> dict:
        """The trainer state a checkpoint holds (``save``'s ``state`` plus ``"step"``), without loading it.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            CorruptCheckpointError: the state file is not a JSON object.
        """
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                                    f"use CheckpointManager.latest() to find one")
        state = _read(path / STATE_FILE, _read_json)
        if not isinstance(state, dict) or "step" not in state:
            raise CorruptCheckpointError(path / STATE_FILE, "is not a trainer state (a JSON object with a step)")
        return state

    def load(
        self,
        path: str | os.PathLike,
        modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        strict: bool = True,
        verify: bool = True,
    ) -> dict:
        """Restore a checkpoint in place and return its trainer state (with ``"step"``).

        Modules load with ``load_state_dict(strict=False)`` (a checkpoint may hold only the trainable
        tensors), but every saved tensor must land somewhere; dicts of tensors are copied into in place.
        RNG states are restored last, so the next random numbers equal those after the save.
        ``verify`` checks the files first (`verify`); pass False when `latest_loadable` just did.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            CorruptCheckpointError: a file of the checkpoint is damaged (named in the message).
            ValueError: (``strict``) a requested module / optimizer / scheduler is not in the checkpoint,
                or a saved tensor has no matching key; (always) a saved tensor or optimizer moment has
                another shape than the one it would load into (both shapes named).
        """
        path = Path(path)
        state = self.read_state(path)
        if verify:
            self.verify(path)
        optimizers, schedulers = optimizers or {}, schedulers or {}

        for name, target in modules.items():
            file = path / f"{name}.safetensors"
            if not file.is_file():
                if strict:
                    saved = sorted(p.stem for p in path.glob("*.safetensors"))
                    raise ValueError(f"checkpoint {path} has no module {name!r}; it has: {saved}")
                continue
            saved = _read(file, lambda f: load_file(f, device="cpu"))
            if isinstance(target, ShardedEntry):  # a sharded module: every process loads its shards
                if isinstance(target, ShardedState):  # sharded parameters (DTensors) report their global shape
                    live = {**dict(target.module.named_parameters()), **dict(target.module.named_buffers())}
                    _check_shapes(f"module {name!r}", live, saved)
                target.scatter(saved)
            else:
                self._load_tensors(name, target, saved, strict)

        for file, wanted in ((OPTIM_FILE, optimizers), (SCHED_FILE, schedulers)):
            if not wanted:
                continue
            saved = _read(path / file, _torch_load)
            for name, obj in wanted.items():
                if name not in saved:
                    if strict:
                        raise ValueError(f"checkpoint {path} has no {file[:-3].rstrip('s')} {name!r}; "
                                         f"it has: {sorted(saved)}")
                    continue
                if isinstance(obj, ShardedEntry):
                    obj.scatter(saved[name])
                else:
                    if file == OPTIM_FILE:
                        _check_optimizer_shapes(name, obj, saved[name])
                    obj.load_state_dict(saved[name])

        rng_file = path / f"rng_state_{self._rank}.pt"
        if not rng_file.is_file():
            warnings.warn(f"{rng_file.name} not found (resuming on more processes?); using rank 0's RNG state",
                          stacklevel=2)
            rng_file = path / "rng_state_0.pt"
        restore_rng_state(_read(rng_file, _torch_load))
        return state

    def _load_tensors(self, name: str, target: Any, saved: dict[str, torch.Tensor], strict: bool) -> None:
        # Check everything before copying anything, so a mismatch leaves the target untouched.
        module = self._unwrap(target) if isinstance(target, nn.Module) else None
        current = module.state_dict() if module is not None else target
        unused = [k for k in saved if k not in current]
        if unused and strict:
            raise ValueError(f"module {name!r}: {len(unused)} saved tensor(s) have no place to load into, "
                             f"e.g. {unused[:5]}; was the model built with the same adapters/config?")
        _check_shapes(f"module {name!r}", current, saved)
        usable = {k: v for k, v in saved.items() if k in current}
        if module is not None:
            module.load_state_dict(usable, strict=False)
        else:
            with torch.no_grad():
                for k, v in usable.items():
                    target[k].copy_(v)


def _check_shapes(what: str, current: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before anything is copied, a saved tensor whose shape differs from the one it would load
    into (a resumed run built with another rank or targets)."""
    for k, v in saved.items():
        if k in current and tuple(current[k].shape) != tuple(v.shape):
            raise ValueError(f"{what} does not match its checkpoint: tensor {k!r} has shape "
                             f"{tuple(current[k].shape)}, checkpoint has {tuple(v.shape)}")


# Optimizer state entries shaped like their parameter (Adam/AdamW, SGD momentum); factored optimizers
# (Adafactor) keep other shapes and are not checked.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def _check_optimizer_shapes(name: str, optimizer: Any, saved: Mapping) -> None:
    """The moments of each saved parameter must have that parameter's shape: torch's
    ``load_state_dict`` does not check, and the next step would fail with a bare size mismatch."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
    if len(ids) != len(params):
        return  # torch's load_state_dict says this one in its own words
    for index, (i, p) in enumerate(zip(ids, params)):
        for key, value in saved.get("state", {}).get(i, {}).items():
            if key in _PARAM_SHAPED and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"optimizer {name!r} does not match its checkpoint: parameter {index} has shape "
                                 f"{tuple(p.shape)}, its saved {key!r} has {tuple(value.shape)}")
