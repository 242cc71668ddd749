"""The training skeleton both trainers subclass: one run loop, one resume, one checkpoint schedule.

A run is a list of *phases* (fostering one scale or one expert, assembling the router, a DMD2 phase
with or without the GAN); each phase has a name and a number of *steps*. What one step is belongs to
the subclass: an optimizer step of the diffusion loss (``tsm_core.finetune``) or one DMD2 iteration
(``tsm_distill``). The skeleton owns everything around the step:

* accelerate set-up, optimizers through ``accelerator.prepare`` (fp16 loss scaling is undone before
  clipping and stepping) and warm-up through diffusers' ``constant_with_warmup`` (`optim`);
* gradient sync of sparse expert gradients and clipping (`PhasedTrainer.apply_gradients`);
* the NaN stop (`PhasedTrainer.check_finite`);
* the run folder: a used folder is refused without ``resume``/``overwrite``; a folder another live
  run holds is refused (`tsm_core.train.runlock`); temp files a killed write left are removed;
  ``recipe.yaml`` is written;
* checkpoints every ``checkpoint_every`` steps and at every phase boundary (without optimizers: the
  next phase starts fresh ones), resume through `CheckpointManager`, bit-exact when the subclass draws
  its randomness from `step_generator`; a damaged checkpoint is set aside and the run resumes from the
  newest one that verifies;
* a full disk or an unwritable folder at any write (checkpoints, adapters, logs, samples) stops the
  run with a `RunFolderError` in words (`tsm_core.train.storage`);
* SIGINT/SIGTERM: the current step finishes, a checkpoint is written and `TrainingInterrupted` says
  how to resume;
* logging: scalars every ``log_every`` steps and at each phase end. Values a step did not produce
  (the DMD loss on a critic-only DMD2 iteration) keep their latest value, so every logged row holds
  every loss; a resumed run drops the rows logged after its checkpoint, so no step appears twice.

Subclasses implement `phase_lengths`, `enter_phase` (set the adapters' mode, fill ``self.optimizers``
and ``self.schedulers``), `train_step`, `checkpoint_modules` and `save_final`; optionally `on_start`,
`end_phase` and `sample`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..serialization import atomic_write_text
from .accel import make_accelerator
from .checkpoint import TMP_PREFIX, CheckpointManager
from .fsdp import full
from .logging import RunLogger, progress
from .optim import check_finite, clip_gradients, sync_gradients, warmup_schedule
from .recipe import recipe_to_dict, save_recipe
from .runlock import RunFolderInUse, RunLock, check_unlocked  # noqa: F401 (RunFolderInUse: re-exported)
from .storage import LOW_SPACE_BYTES, RunFolderError, describe_write_failure, probe_write  # noqa: F401 (defined here first)

log = logging.getLogger(__name__)

# What a run writes into its folder (beside recipe.yaml): a new run must not mix with an old one's.
RUN_OUTPUTS = ("checkpoints", "phases", "adapter", "adapter_ema", "samples", "images", "tb", "stats.jsonl")
STATS_FILE = "stats.jsonl"
RECIPE_FILE = "recipe.yaml"
RESUME_HISTORY = "resume_history.jsonl"


def check_writable(run_dir: str | Path) -> None:
    """Create ``run_dir`` and write one small file there, so a read-only or full run folder fails now,
    in words, not with a torch serialization error at the first checkpoint.

    Raises:
        RunFolderError: the folder cannot be written.
    """
    run_dir = Path(run_dir)
    try:
        probe_write(run_dir)
    except OSError as e:
        why = describe_write_failure(e, run_dir) or f"{run_dir} cannot be written ({e})"
        raise RunFolderError(f"{why}; choose another --run-dir or fix the folder") from e


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint; ``checkpoint`` is its folder."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


def _adapter_folders(run_dir: Path) -> list[Path]:
    """Folders a run saves adapters into (not checkpoints: CheckpointManager cleans its own)."""
    found = [p for p in run_dir.glob("adapter*") if p.is_dir()]
    phases = run_dir / "phases"
    if phases.is_dir():
        found += [p for p in phases.iterdir() if p.is_dir()]
        found += [p for p in phases.glob("*/adapter*") if p.is_dir()]  # a fine-tuning phase: a run's layout
    return found


def old_run(run_dir: str | Path) -> list[str]:
    """What of an earlier run ``run_dir`` holds: complete checkpoints, saved adapters, logged rows."""
    run_dir = Path(run_dir)
    latest = CheckpointManager(run_dir, keep_last=None).latest()
    found = [f"checkpoints/{latest.name}"] if latest is not None else []
    for name in ("phases", "adapter", "adapter_ema"):
        if (run_dir / name).is_dir():
            found.append(f"{name}/")
    stats = run_dir / STATS_FILE
    if stats.is_file() and stats.stat().st_size > 0:
        found.append(STATS_FILE)
    return found


def check_run_folder(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start where the run would mix with an earlier one (cheap: call it before loading models).

    A new run needs a run folder without an earlier run's checkpoints, adapters or logged rows;
    ``resume`` needs a checkpoint; ``overwrite`` allows a used folder (the trainer clears it). No live
    run may hold the folder (`tsm_core.train.runlock`), whatever the flags.

    Raises:
        ValueError: both flags, or a used folder with neither.
        FileNotFoundError: ``resume`` without a checkpoint to resume from.
        RunFolderInUse: another live run holds the folder (the message names its pid and host).
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite deletes it: pass only one")
    check_unlocked(run_dir)
    _check_contents(run_dir, resume, overwrite)


def _check_contents(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """`check_run_folder` without the lock: what the folder holds fits the flags."""
    if resume:
        if CheckpointManager(run_dir, keep_last=None).latest() is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without "
                                    "--resume (add --overwrite if the folder holds a stopped run's files)")
        return
    found = old_run(run_dir)
    if found and not overwrite:
        raise ValueError(f"run folder {run_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                         "--overwrite to delete it and start again, or choose another --run-dir")


def clear_run(run_dir: str | Path) -> None:
    """Delete an earlier run's outputs (``--overwrite``); other files in the folder stay."""
    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the ``.tmp_*`` files a killed adapter write left in ``adapter*/``, ``phases/*/`` and ``phases/*/adapter*/``."""
    removed = []
    for folder in _adapter_folders(Path(run_dir)):
        for stale in folder.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            removed.append(stale)
    return removed


def truncate_stats(run_dir: str | Path, step: int) -> int:
    """Drop the rows of ``stats.jsonl`` logged after ``step`` (a resumed run logs them again); returns
    how many were dropped. Written atomically; a torn last line (a killed write) is dropped too."""
    path = Path(run_dir) / STATS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return dropped


def recipe_changes(saved: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """Every ``(key, old, new)`` where two plain recipe dicts differ; keys are dotted as in ``--set``
    (``phases.0.lr``). Lists of equal length compare item by item, others as a whole."""
    if isinstance(saved, Mapping) and isinstance(new, Mapping):
        out = []
        for k in list(saved) + [k for k in new if k not in saved]:
            sub = f"{key}.{k}" if key else str(k)
            out += recipe_changes(saved.get(k), new.get(k), sub)
        return out
    if isinstance(saved, list) and isinstance(new, list) and len(saved) == len(new):
        return [c for i, (a, b) in enumerate(zip(saved, new)) for c in recipe_changes(a, b, f"{key}.{i}")]
    return [] if saved == new else [(key, saved, new)]


def check_resume_recipe(run_dir: str | Path, recipe: Any, shape_keys: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """How ``recipe`` differs from the one ``run_dir/recipe.yaml`` holds (cheap: call it before loading
    models); ``shape_keys`` are fnmatch patterns of keys a resumed run may not change.

    Raises:
        ValueError: a change to a key matching ``shape_keys`` (the checkpoint would not fit, or would
            mean something else).
    """
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return []  # a folder from before recipes were saved: nothing to compare with
    changes = recipe_changes(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, recipe_to_dict(recipe))
    fixed = [c for c in changes if any(fnmatch.fnmatchcase(c[0], p) for p in shape_keys)]
    if fixed:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in fixed)
        raise ValueError(f"--resume: the recipe changes what the checkpoint holds ({listed}); resume with the "
                         f"values saved in {path}, or start a new run (--overwrite or another --run-dir)")
    return changes


class PhasedTrainer:
    """The run loop, checkpoints, resume, logging and optimizer plumbing of every tsm trainer.

    Args:
        recipe: the resolved recipe (a dataclass); written to ``run_dir/recipe.yaml``.
        run_dir: the run folder.
        seed: seeds every generator at start (before the adapters are attached, so experts start equal).
        mixed_precision: accelerate's "no", "fp16" or "bf16".
        checkpoint_every / log_every / sample_every: in steps (``sample_every`` 0: no grids mid-run).
        keep_last: complete checkpoints to keep (None: all).
        max_grad_norm: clip at this norm (None/0: no clipping).
        tensorboard: also log to ``run_dir/tb``.
        accelerator: an existing ``accelerate.Accelerator`` (tests, notebooks); default: a new one.
    """

    desc = "train"  # the progress bar's label
    # Recipe keys (fnmatch patterns on --set style keys) that a resumed run may not change: they fix
    # the shapes or the meaning of what the checkpoint holds. Other changes are listed and recorded.
    shape_keys: tuple[str, ...] = ("model.kind", "model.max_sequence_length", "experts.rank", "experts.alpha",
                                   "experts.target_modules*", "experts.router_input", "experts.router_activation")

    def __init__(self, recipe: Any, run_dir: str | os.PathLike, *, seed: int, mixed_precision: str,
                 checkpoint_every: int, log_every: int, sample_every: int, keep_last: int | None,
                 max_grad_norm: float | None, tensorboard: bool = True, accelerator: Any = None):
        for name, value in (("checkpoint_every", checkpoint_every), ("log_every", log_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (steps between two), got {value}; use a large value to make "
                                 "it rare")
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.seed, self.checkpoint_every, self.log_every = seed, checkpoint_every, log_every
        self.sample_every, self.max_grad_norm, self.tensorboard = sample_every, max_grad_norm, tensorboard
        self.acc = accelerator or make_accelerator(mixed_precision, 1, self.run_dir, seed=seed)
        self.device = self.acc.device
        self.ckpt = CheckpointManager(self.run_dir, keep_last=keep_last, accelerator=self.acc)
        # Opened by train(), once the run folder has been checked: building a trainer writes nothing.
        self.logger: RunLogger | None = None
        self.started = False  # True once the first step ran (the CLIs' line between set-up and a bug)
        self.global_step = self.phase_index = self.phase_step = 0
        self.seconds: dict[str, float] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self._latest_logs: dict[str, Any] = {}
        self._stop_signal: int | None = None
        self._lock: RunLock | None = None  # held by the main process from _prepare_folder to the end of train()

    # ------------------------------------------------------------------ what a subclass provides
    def phase_lengths(self) -> list[tuple[str, int]]:
        """(name, steps) of every phase, in order."""
        raise NotImplementedError

    def enter_phase(self, index: int) -> None:
        """Set the adapters' mode for phase ``index`` and build its optimizers (`make_optimizer`) into
        ``self.optimizers`` / ``self.schedulers``."""
        raise NotImplementedError

    def train_step(self) -> dict:
        """One step of the current phase (``self.phase_index``, ``self.global_step`` before the step);
        returns the scalars to log."""
        raise NotImplementedError

    def checkpoint_modules(self) -> dict:
        """name -> module or dict of tensors that a checkpoint holds (the trained tensors)."""
        raise NotImplementedError

    def save_final(self) -> Any:
        """Write the final adapters (every process calls it; write on the main one); returns ``train``'s result."""
        raise NotImplementedError

    def on_start(self) -> None:
        """Called once before the first step, after a resume restored the counters (e.g. open data streams)."""

    def end_phase(self, index: int) -> None:
        """Called after the last step of phase ``index``, before its boundary checkpoint."""

    def sample(self, tag: str) -> None:
        """Write a sample grid named ``tag`` (every ``sample_every`` steps); default: none."""

    def after_step(self) -> None:
        """Called after every step's logging and samples, before its checkpoint (e.g. periodic exports)."""

    def should_stop(self) -> bool:
        """A budget of the subclass's own (time, a step count): True stops the run like a signal does,
        after a checkpoint of the finished step."""
        return False

    def progress_total(self) -> int | None:
        """The progress bar's total (default: every phase's steps)."""
        return sum(n for _, n in self.phase_lengths())

    # ------------------------------------------------------------------ optimizer plumbing
    def make_optimizer(self, groups: Sequence, lr: float, warmup_steps: int, betas=(0.9, 0.999), eps: float = 1e-8,
                       weight_decay: float = 0.0):
        """AdamW through ``accelerator.prepare`` and its warm-up schedule (stepped by the subclass once
        per step; see `warmup_schedule`). Returns ``(optimizer, scheduler)``."""
        opt = self.acc.prepare(torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        return opt, warmup_schedule(opt, warmup_steps)

    def apply_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Average the gradients over processes, clip them, step and zero; returns the norm before clipping."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sync_gradients(params, self.acc)
        norm = full(clip_gradients(params, self.acc, self.max_grad_norm))  # sharded params give a DTensor norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        """Stop with `NonFiniteLossError` naming the step (1-based: the step under way), the phase and the
        last good checkpoint. Call it before the update, so the weights stay those of the last step."""
        lengths = self.phase_lengths()
        name = lengths[min(self.phase_index, len(lengths) - 1)][0]
        check_finite(loss, self.global_step + 1, f"{what} (phase {name!r})", self.ckpt.latest())

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {"phase": self.phase_index, "phase_step": self.phase_step, "global_step": self.global_step,
                "seconds": self.seconds}

    def save_checkpoint(self, with_optimizers: bool = True) -> Path:
        """An atomic checkpoint of the current step (optimizers off at a phase boundary).

        Raises:
            RunFolderError: the disk is full or the folder became unwritable; the message names the last
                complete checkpoint (a failed save leaves only a temp folder, removed by the next save).
        """
        with self.writing(f"checkpoint step {self.global_step}"):
            return self.ckpt.save(self.global_step, self.checkpoint_modules(),
                                  self.optimizers if with_optimizers else {},
                                  self.schedulers if with_optimizers else {}, self._state())

    @contextlib.contextmanager
    def writing(self, what: str):
        """Turn a full disk or an unwritable run folder during ``what`` into a `RunFolderError` in words
        (whichever writer failed: safetensors, torch.save, JSON, PIL); other errors pass unchanged."""
        try:
            yield
        except RunFolderError:
            raise
        except Exception as e:
            why = describe_write_failure(e, self.run_dir)
            if why is None:
                raise
            last = self.ckpt.latest()
            resume = (f"the last complete checkpoint is {last}; free space (or move the run folder), then --resume"
                      if last is not None else "no checkpoint was written yet; free space, then start again")
            raise RunFolderError(f"could not write {what}: {why}; {resume}") from e

    def _resume(self) -> None:
        """Restore the latest checkpoint, entering its phase first (its modules, e.g. a router, must
        exist to load into; a boundary checkpoint restores no optimizers: the phase starts fresh ones)."""
        path = self.ckpt.latest()  # exists and verified: _prepare_folder set damaged ones aside
        state = self.ckpt.read_state(path)
        self.phase_index, self.phase_step, self.global_step = state["phase"], state["phase_step"], state["global_step"]
        self.seconds = state.get("seconds", {})
        # A finished run (killed while writing adapter/, or resumed when done) still enters its last phase.
        self.enter_phase(min(self.phase_index, len(self.phase_lengths()) - 1))
        under_way = self.phase_step > 0
        self.ckpt.load(path, self.checkpoint_modules(), self.optimizers if under_way else None,
                       self.schedulers if under_way else None, verify=False)
        if self.acc.is_main_process:
            truncate_stats(self.run_dir, self.global_step)

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _stop_on_signal(self):
        """SIGINT/SIGTERM set a flag that the loop checks after each step (a second SIGINT stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum, frame):
            if self._stop_signal == signal.SIGINT and signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
            self._stop_signal = signum
            print(f"\n{signal.Signals(signum).name}: finishing step {self.global_step + 1}, then writing a checkpoint "
                  "(Ctrl-C again to stop at once)", flush=True)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """Whether any process got a stop signal or hit `should_stop` (all processes agree, so all write
        the checkpoint)."""
        stop = self._stop_signal is not None or self.should_stop()
        if self.acc.num_processes == 1:
            return stop  # called every step: no device tensor (and no sync) unless processes must agree
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _interrupt(self, with_optimizers: bool) -> None:
        path = self.save_checkpoint(with_optimizers=with_optimizers)
        why = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "budget reached"
        raise TrainingInterrupted(f"stopped at step {self.global_step} ({why}); checkpoint {path} written. Continue "
                                  "with the same command plus --resume", path)

    # ------------------------------------------------------------------ logging
    def _log(self, bar) -> None:
        scalars = {k: v for k, v in self._latest_logs.items() if not isinstance(v, dict)}
        if len(self.schedulers) == 1:
            scalars["lr"] = next(iter(self.schedulers.values())).get_last_lr()[0]
        else:
            scalars.update({f"lr_{name}": s.get_last_lr()[0] for name, s in self.schedulers.items()})
        shown = self.logger.log(self.global_step, scalars)
        name = self.phase_lengths()[self.phase_index][0]
        bar.set_postfix(phase=name, **{k: f"{v:.4g}" for k, v in shown.items() if k.startswith("loss")})

    def _add_seconds(self, name: str, start: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    # ------------------------------------------------------------------ the run
    def _record_resume(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Print the changes a resumed run makes and append them to ``resume_history.jsonl``."""
        for key, old, new in changes:
            print(f"resume: {key} {old!r} -> {new!r}", flush=True)
        row = {"time": round(time.time(), 3), "checkpoint": str(self.ckpt.latest()),
               "changes": [{"key": k, "old": old, "new": new} for k, old, new in changes]}
        with open(self.run_dir / RESUME_HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _resume_from_loadable(self) -> None:
        """Before a resume (every process): set aside each newest checkpoint that fails to verify, saying
        so, so that `_resume` loads the newest one that does."""
        good, damaged = self.ckpt.latest_loadable()
        for moved, error in damaged:
            print(f"resume: {error}; checkpoint set aside as {moved}", flush=True)
        if good is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt.dir} loads (damaged ones are set aside "
                                    f"as {self.ckpt.dir / 'corrupt_step_*'}); start the run again with --overwrite, "
                                    "or put back a checkpoint from a copy")
        if damaged:
            print(f"resume: falling back to {good}", flush=True)

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        check_run_folder(self.run_dir, resume, overwrite)
        changes = check_resume_recipe(self.run_dir, self.recipe, self.shape_keys) if resume else []
        check_writable(self.run_dir)  # creates the folder: after the checks that only read
        self.acc.wait_for_everyone()  # every process has looked before the main one locks or deletes anything
        if self.acc.is_main_process:
            self._lock = RunLock.acquire(self.run_dir)
            # Again under the lock: a run that started (or ended) since the first look must be seen.
            _check_contents(self.run_dir, resume, overwrite)
            with self.writing("the run folder"):
                if overwrite:
                    clear_run(self.run_dir)
                for stale in remove_stale_temp_files(self.run_dir):
                    log.warning("removed %s, left by a write that was killed", stale)
        if resume:
            with self.writing("the run folder"):
                self._resume_from_loadable()  # waits for every process
        if self.acc.is_main_process:
            with self.writing("the run folder"):
                if resume:
                    self._record_resume(changes)
                save_recipe(self.recipe, self.run_dir / RECIPE_FILE)  # recipe.yaml: what the run now runs
        self.acc.wait_for_everyone()

    def train(self, resume: bool = False, overwrite: bool = False) -> Any:
        """Run every phase, then `save_final`; returns what it returns.

        Args:
            resume: continue from the run folder's latest checkpoint that loads (damaged newer ones are
                set aside as ``checkpoints/corrupt_step_*``); a finished run rebuilds its final adapters
                and returns.
            overwrite: start again in a run folder that holds an earlier run, deleting its checkpoints,
                phases/, adapter*/, samples and logs first. Without it (or ``resume``) such a folder is
                refused (`check_run_folder`).

        The main process holds the run-folder lock (``run_dir/.lock``) until this returns or raises.

        Raises:
            NonFiniteLossError: a loss became NaN/inf; the last good checkpoint is named.
            TrainingInterrupted: SIGINT/SIGTERM; a checkpoint of the last finished step was written.
            RunFolderError: the disk filled up or the folder became unwritable; ``RunFolderInUse``: another
                live run holds the folder.
        """
        try:
            return self._train(resume, overwrite)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _train(self, resume: bool, overwrite: bool) -> Any:
        self._prepare_folder(resume, overwrite)
        if resume:
            self._resume()
        # Opened after _resume trimmed stats.jsonl (the logger appends through an open handle).
        with self.writing("the run's logs"):
            self.logger = RunLogger(self.run_dir, enabled=self.acc.is_main_process, use_tensorboard=self.tensorboard)
        try:  # whatever stops the run (a bad first batch in on_start included), every row logged so far is kept
            self.on_start()
            bar = progress(self.progress_total(), desc=self.desc, disable=not self.acc.is_main_process)
            bar.update(self.global_step)
            try:
                with self._stop_on_signal():
                    self._run_phases(bar, resumed=resume)
            finally:
                bar.close()
            with self.writing("the final adapters"):
                result = self.save_final()
        finally:
            self.logger.close()  # the checkpoint, not the logger, is the way back after a failure
        self.acc.wait_for_everyone()
        return result

    def _run_phases(self, bar, resumed: bool) -> None:
        lengths = self.phase_lengths()
        while self.phase_index < len(lengths):
            name, steps = lengths[self.phase_index]
            if not resumed:  # a resumed run's phase was entered by _resume, before its weights loaded
                self.enter_phase(self.phase_index)
                log.info("phase %s: steps %d-%d", name, self.global_step + 1, self.global_step + steps)
            resumed = False
            self._run_phase(bar, name, steps)
            with self.writing(f"the adapter of phase {name!r}"):
                self.end_phase(self.phase_index)
            self.phase_index += 1
            self.phase_step = 0
            self._latest_logs = {}  # the next phase's rows hold only its own losses
            if self._stop_requested():
                self._interrupt(with_optimizers=False)
            self.save_checkpoint(with_optimizers=False)  # phase boundary: the next phase starts fresh optimizers

    def _run_phase(self, bar, name: str, steps: int) -> None:
        """The steps of the current phase, from ``phase_step`` on, with their logs, samples and checkpoints."""
        if self.phase_step < steps and self.should_stop():  # e.g. resumed with a budget already spent
            self._interrupt(with_optimizers=self.phase_step > 0)
        start = time.perf_counter()
        while self.phase_step < steps:
            self.started = True
            self._latest_logs.update(self.train_step())
            self.phase_step += 1
            self.global_step += 1
            bar.update(1)
            with self.writing(f"the outputs of step {self.global_step} (logs, samples, exports)"):
                if self.global_step % self.log_every == 0 or self.phase_step == steps:
                    self._log(bar)
                if self.sample_every and self.global_step % self.sample_every == 0:
                    self.sample(f"step_{self.global_step:08d}")
                self.after_step()
            if self.phase_step == steps:
                break  # the boundary checkpoint follows in _run_phases
            stop = self._stop_requested()
            if stop or self.global_step % self.checkpoint_every == 0:
                self._add_seconds(name, start)
                start = time.perf_counter()
                if stop:
                    self._interrupt(with_optimizers=True)
                self.save_checkpoint()
        self._add_seconds(name, start)
