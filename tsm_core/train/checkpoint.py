"""Atomic full-state checkpoints: module tensors, optimizers, schedulers, RNG and trainer state.

Layout of one checkpoint, ``run_dir/checkpoints/step_{step:08d}/``::

    {name}.safetensors      one file per entry of ``modules`` (a module's state dict or a dict of tensors)
    optimizers.pt           {name: optimizer.state_dict()}       (torch.save)
    schedulers.pt           {name: scheduler.state_dict()}       (torch.save)
    rng_state_{rank}.pt     python / numpy / torch CPU / CUDA generator states, one file per process
    trainer_state.json      the trainer's ``state`` dict plus ``"step"``; written last

Why it is never half-written: everything goes into a hidden temporary sibling folder
(``.tmp_step_...``), each file is fsynced, and only then is the folder renamed into place with
``os.replace`` (a rename is atomic on POSIX file systems). A process killed mid-save leaves only a
temporary folder, which `CheckpointManager.latest` ignores and the next save deletes.

Scope: under DDP every process holds the same weights and optimizer state, so the main process
writes them; each process adds its own ``rng_state_{rank}.pt``, so multi-node runs need a run
folder on a shared file system (as ``accelerator.save_state`` does). Sharded entries (FSDP2,
`tsm_core.train.fsdp.ShardedEntry`: ``ShardedState`` / ``ShardedOptimizer``, with ``gather()`` and
``scatter(saved)``) are gathered to full tensors on every process before the main one writes, and
scattered back after every process read the files: the files are the same as an unsharded run's.
"""

from __future__ import annotations

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

from .fsdp import ShardedEntry

STEP_DIR = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp_"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizers.pt"
SCHED_FILE = "schedulers.pt"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


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
            # The state file is the completion marker inside the folder: written last.
            (tmp / STATE_FILE).write_text(state_text)
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
        """
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                                    f"use CheckpointManager.latest() to find one")
        return json.loads((path / STATE_FILE).read_text())

    def load(
        self,
        path: str | os.PathLike,
        modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        strict: bool = True,
    ) -> dict:
        """Restore a checkpoint in place and return its trainer state (with ``"step"``).

        Modules load with ``load_state_dict(strict=False)`` (a checkpoint may hold only the trainable
        tensors), but every saved tensor must land somewhere; dicts of tensors are copied into in place.
        RNG states are restored last, so the next random numbers equal those after the save.

        Raises:
            FileNotFoundError: ``path`` is not a complete checkpoint.
            ValueError: (``strict``) a requested module / optimizer / scheduler is not in the checkpoint,
                or a saved tensor has no matching key or a different shape.
        """
        path = Path(path)
        state = self.read_state(path)
        optimizers, schedulers = optimizers or {}, schedulers or {}

        for name, target in modules.items():
            file = path / f"{name}.safetensors"
            if not file.is_file():
                if strict:
                    saved = sorted(p.stem for p in path.glob("*.safetensors"))
                    raise ValueError(f"checkpoint {path} has no module {name!r}; it has: {saved}")
                continue
            if isinstance(target, ShardedEntry):  # a sharded module: every process loads its shards
                target.scatter(load_file(file, device="cpu"))
            else:
                self._load_tensors(name, target, load_file(file, device="cpu"), strict)

        for file, wanted in ((OPTIM_FILE, optimizers), (SCHED_FILE, schedulers)):
            if not wanted:
                continue
            saved = torch.load(path / file, map_location="cpu", weights_only=True)
            for name, obj in wanted.items():
                if name not in saved:
                    if strict:
                        raise ValueError(f"checkpoint {path} has no {file[:-3].rstrip('s')} {name!r}; "
                                         f"it has: {sorted(saved)}")
                    continue
                if isinstance(obj, ShardedEntry):
                    obj.scatter(saved[name])
                else:
                    obj.load_state_dict(saved[name])

        rng_file = path / f"rng_state_{self._rank}.pt"
        if not rng_file.is_file():
            warnings.warn(f"{rng_file.name} not found (resuming on more processes?); using rank 0's RNG state",
                          stacklevel=2)
            rng_file = path / "rng_state_0.pt"
        restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        return state

    def _load_tensors(self, name: str, target: Any, saved: dict[str, torch.Tensor], strict: bool) -> None:
        # Check everything before copying anything, so a mismatch leaves the target untouched.
        module = self._unwrap(target) if isinstance(target, nn.Module) else None
        current = module.state_dict() if module is not None else target
        unused = [k for k in saved if k not in current]
        if unused and strict:
            raise ValueError(f"module {name!r}: {len(unused)} saved tensor(s) have no place to load into, "
                             f"e.g. {unused[:5]}; was the model built with the same adapters/config?")
        for k, v in saved.items():
            if k in current and current[k].shape != v.shape:
                raise ValueError(f"module {name!r} does not match its checkpoint: tensor {k!r} has shape "
                                 f"{tuple(current[k].shape)}, checkpoint has {tuple(v.shape)}")
        usable = {k: v for k, v in saved.items() if k in current}
        if module is not None:
            module.load_state_dict(usable, strict=False)
        else:
            with torch.no_grad():
                for k, v in usable.items():
                    target[k].copy_(v)
