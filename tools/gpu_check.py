"""A prepared GPU check of the shipped DMD2 recipes: measured memory and speed beside the planner's figure.

For every shipped distillation recipe (``recipes/*_dmd2_*.yaml``, demo recipes left out) and every phase kind
it holds (``dmd``: fostering without the GAN, ``dmd_gan``: with it, ``router``: the router-only phase), this
runs a few DMD2 iterations through `DMD2Trainer` itself (its ``train_step``, so the generator and critic
updates are the trainer's own) on the teacher built from the shipped config-only folder
(``tsm_distill/assets/configs/``) with random weights: nothing is downloaded, no weight file is read. Each
phase runs at its per-GPU batch on 8 GPUs, at the recipe's resolution and precision, unsharded (one process
cannot shard). Per recipe x phase kind it writes to one JSON file:

* ``max_memory_allocated_bytes``: ``torch.cuda.max_memory_allocated`` over the phase's iterations (weights,
  optimizer state and step peaks, like the plan; no CUDA context);
* ``seconds_generator_iteration`` / ``seconds_critic_iteration`` (an iteration with and without the
  generator update) and ``seconds_per_iteration``, their mean over one ``fake_updates_per_generator_update``
  cycle;
* ``plan``: `tsm_distill.plan.plan_recipe` of exactly the recipe that ran (``checked_recipe``), one process.

What does not fit is skipped with its reason: a phase whose plan exceeds the device's memory, and what the
time budget (``--budget-seconds``, default 480 s: with start-up and one iteration past it, inside the 9 minutes
a lent GPU allows) leaves no room for. An out-of-memory error is recorded as a result, with the peak reached.
The JSON is rewritten after every phase, so a run cut short keeps what it measured. How to run it on a lent GPU and where its JSON goes:
docs/backbones.md ("Checking the plan on a GPU").

    python tools/gpu_check.py [--out gpu_check.json] [--budget-seconds 480] [--only sdxl]
    python tools/gpu_check.py --smoke --out smoke.json   # CPU: tiny configs, float32, the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "tsm_distill" / "assets" / "configs"
CONFIG_FOLDER = {"unet": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
"""model.kind -> the shipped config-only folder of its family."""
RECIPE_GLOB = "recipes/*_dmd2_*.yaml"
PROCESSES = 8
"""The shipped recipes' global batches are split over this many GPUs (their comments say so)."""
PHASE_KINDS = ("dmd", "dmd_gan", "router")
_START = time.perf_counter()


def phase_kind(phase) -> str:
    """``router`` for an assembling phase, else ``dmd_gan`` or ``dmd`` by its GAN flag."""
    if phase.type == "assemble":
        return "router"
    return "dmd_gan" if phase.gan else "dmd"


def shipped_recipes(pattern: str = RECIPE_GLOB) -> list[Path]:
    """The shipped distillation recipes, sorted; demo recipes are not distillation runs of a shipped family."""
    found = sorted(p for p in REPO.glob(pattern) if "demo" not in p.name)
    if not found:
        raise FileNotFoundError(f"no recipe matches {REPO / pattern}")
    return found


def checked_recipe(path: Path, model_path: Path, data: Path, *, mixed_precision: str, iterations: int,
                   batch_cap: int | None = None, resolution: int | None = None) -> tuple[dict, dict[str, str]]:
    """The recipe this check runs, as a plain dict, and phase kind -> the shipped phase it stands for.

    The first phase of each kind, at its per-GPU batch on `PROCESSES` GPUs (capped at ``batch_cap``), on the
    teacher in ``model_path`` and the generated data in ``data``; no FSDP (one process), no experts copied in
    (random context experts cost what trained ones do), no samples, checkpoints or logs."""
    from tsm_core.train.recipe import load_recipe, recipe_to_dict
    from tsm_distill import DistillRecipe
    from tsm_distill.config import per_process_batch

    shipped = load_recipe(path, DistillRecipe)
    raw = recipe_to_dict(shipped)
    phases, names = [], {}
    for i, (ph, ph_raw) in enumerate(zip(shipped.phases, raw["phases"])):
        kind = phase_kind(ph)
        if kind in names:
            continue
        names[kind] = ph.name
        batch = per_process_batch(ph.batch_size, PROCESSES, f"{path.name} phases[{i}].batch_size")
        phases.append({**ph_raw, "batch_size": min(batch, batch_cap or batch), "steps": iterations})
    raw["phases"] = phases
    raw["model"]["path"] = str(model_path)
    raw["experts"].update(init_from=None, init_scales=[])
    raw["data"].update(prompts=str(data / "prompts.txt"), real_images=str(data / "real"))
    if resolution is not None:
        raw["data"]["resolution"] = resolution
    raw["train"].update(mixed_precision=mixed_precision, fsdp=False, sample_every=0, checkpoint_every=10**9,
                        log_every=10**9, threads=None)
    load_recipe(raw, DistillRecipe)  # refused settings fail here, before any model is built
    return raw, names


def plan_figures(raw: dict) -> list[dict]:
    """`plan_recipe` of a checked recipe on one process: per phase, its byte counts (in a worker process on a
    GPU machine: meta passes compute nothing, so one thread each)."""
    from tsm_core.train.recipe import load_recipe
    from tsm_distill import DistillRecipe
    from tsm_distill.plan import plan_recipe

    return [{"total_bytes": p.total, "weights_bytes": p.weights, "optimizer_bytes": p.optimizer,
             "generator_step_bytes": p.generator_step, "critic_step_bytes": p.critic_step}
            for p in plan_recipe(load_recipe(raw, DistillRecipe), 1)]


def random_teacher(path: Path, kind: str, max_sequence_length: int | None, device: torch.device, tokenizers: Path):
    """The teacher of family ``kind`` built from the config files in ``path`` with random weights, directly on
    ``device`` (a 12B denoiser is never initialised on the CPU), with CLIP BPE tokenizers from
    ``tsm_core.data.tokenizer`` (the config-only folders ship none; any ids below the vocabulary size do)."""
    import diffusers
    import transformers

    from tsm_core.data.tokenizer import write_clip_tokenizer
    from tsm_core.models import backbone_class
    from tsm_core.models.base import _text_encoder_classes
    from tsm_core.testing.tiny import WORDS

    cls = backbone_class(kind)
    torch.manual_seed(0)
    with torch.device(device):
        denoiser_cls = getattr(diffusers, cls.denoiser_class)
        denoiser = denoiser_cls.from_config(denoiser_cls.load_config(path / cls.denoiser_subfolder))
        encoders, toks = [], []
        for folder, name in _text_encoder_classes(path):
            config = transformers.AutoConfig.from_pretrained(path / folder)
            encoders.append(getattr(transformers, name)(config))
            # CLIP pads to its position count; T5 slots get the recipe's max_sequence_length from the family.
            length = getattr(config, "max_position_embeddings", 77) if "clip" in config.model_type else 77
            toks.append(write_clip_tokenizer(tokenizers / f"{folder}_{length}", WORDS, length))
        vae = (diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(path / "vae"))
               if (path / "vae" / "config.json").is_file() else None)
    sched_cls = getattr(diffusers, cls.scheduler_class)
    scheduler = sched_cls.from_config(sched_cls.load_config(path / "scheduler"))
    return cls.from_parts(denoiser, encoders, toks, vae, scheduler, str(path), max_sequence_length)


def write_data(folder: Path, images: int = 4) -> Path:
    """A prompt file and a captioned image folder of random images (the loader resizes them to the recipe's
    resolution, and the critic VAE-encodes them, as with real data)."""
    from PIL import Image

    (folder / "real").mkdir(parents=True, exist_ok=True)
    prompts = ["a photo of a cat", "a red car", "a dog on the grass", "a drawing of a boot"]
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(images):
        pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / "real" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": prompts[i % len(prompts)]}))
    (folder / "real" / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def smoke_teachers(folder: Path, kinds: set[str]) -> dict[str, Path]:
    """Tiny pipeline folders of these distillable families, as the tests build them (their config files are
    what `random_teacher` reads in smoke mode)."""
    from tsm_core.testing import tiny, tiny_dit, tiny_flux

    builders = {"unet": lambda: tiny.build_sd_pipeline(folder / "sd15", with_vae=True),
                "sdxl": lambda: tiny.build_sdxl_pipeline(folder / "sdxl"),
                # latents of 16: at 8 the GAN head's second stage would shrink SD3's 4x4 bottleneck to nothing
                "sd3": lambda: tiny_dit.build_sd3_pipeline(folder / "sd3", sample_size=16),
                "flux": lambda: tiny_flux.build_flux_pipeline(folder / "flux")}
    return {k: build() for k, build in builders.items() if k in kinds}


class Clock:
    """The run's time budget, counted from the module's import."""

    def __init__(self, budget: float):
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - _START

    def left(self) -> float:
        return self.budget - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    """Return the last phase's memory to the device before the next one is measured (a no-op on the CPU,
    where nothing is measured and a collection of the tiny models' objects costs half a second)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def run_phase(tr, index: int, iterations: int, warm_up: bool, clock: Clock) -> dict:
    """Iterations of phase ``index`` through the trainer's own ``train_step``: (an untimed warm-up with the
    generator update,) one with the generator update, then critic-only ones. Returns what was measured."""
    device = tr.device
    tr.phase_index, tr.global_step = index, 0
    tr.enter_phase(index)
    ratio = tr.phase.fake_updates_per_generator_update
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # train_step updates the generator when phase_step % ratio == 0 (the skeleton's counter), else only the critic.
    plan = [True] * warm_up + [True] + [False] * (iterations - 1 if ratio > 1 else 0)
    runs, last = [], 0.0
    for n, generator in enumerate(plan):
        if runs and 1.5 * last > clock.left():
            break  # the next iteration would overrun the budget: keep what was measured
        tr.phase_step = 0 if generator else 1
        _sync(device)
        t0 = time.perf_counter()
        logs = tr.train_step()
        _sync(device)
        last = time.perf_counter() - t0
        tr.global_step += 1
        runs.append({"generator_update": generator, "warm_up": warm_up and n == 0, "seconds": last,
                     "student_step": int(logs["student_step"])})
    out = {"iterations": runs, "fake_updates_per_generator_update": ratio, **_timings(runs, ratio)}
    # No allocator peak exists on the CPU: the smoke run measures time only.
    out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out


def _timings(runs: list[dict], ratio: int) -> dict:
    """Seconds of an iteration with and without the generator update (warm-up left out unless it is all there
    is) and their mean over one cycle of ``ratio`` iterations, DMD2's schedule."""
    def best(generator: bool) -> float | None:
        timed = [r["seconds"] for r in runs if r["generator_update"] == generator and not r["warm_up"]]
        timed = timed or [r["seconds"] for r in runs if r["generator_update"] == generator]
        return min(timed) if timed else None

    gen, critic = best(True), best(False)
    out = {"seconds_generator_iteration": gen, "seconds_critic_iteration": critic,
           "timing_includes_warm_up": all(r["warm_up"] for r in runs if r["generator_update"])}
    if gen is not None and (critic is not None or ratio == 1):
        out["seconds_per_iteration"] = (gen + (ratio - 1) * (critic or 0.0)) / ratio
    return out


def check_recipe(path: Path, entry: dict, plans: list[dict] | Exception, *, teacher_path: Path, device: torch.device, capacity: int | None,
                 iterations: int, warm_up: bool, clock: Clock, work: Path, save) -> None:
    """Build the recipe's teacher and trainer once, then measure each of its phase kinds into ``entry``;
    ``plans`` are `plan_figures` of its checked recipe, or the exception planning raised."""
    from tsm_core.train.recipe import load_recipe
    from tsm_distill import DistillRecipe, DMD2Trainer

    phases = entry["phases"]
    for kind, figure in zip(phases, plans if isinstance(plans, list) else [plans] * len(phases)):
        # a failed plan is a finding too; the measurement still runs
        phases[kind]["plan"] = f"error: {_why(figure)}" if isinstance(figure, Exception) else figure
    planned = {k: ph["plan"]["total_bytes"] for k, ph in phases.items() if isinstance(ph.get("plan"), dict)}
    if capacity is not None:
        for kind, total in planned.items():
            if total > capacity:
                phases[kind]["status"] = (f"skipped: the plan ({total / 2**30:.1f} GB on one unsharded process) "
                                          f"exceeds this device's {capacity / 2**30:.1f} GB"
                                          + ("; the shipped recipe shards it over 8 GPUs (train.fsdp), which one "
                                             "GPU cannot" if entry["shipped_fsdp"] else ""))
    todo = [k for k, ph in phases.items() if "status" not in ph]
    if not todo:
        save()
        return
    if clock.left() < 60:
        for k in todo:
            phases[k]["status"] = f"skipped: time budget ({clock.left():.0f} s of {clock.budget:.0f} s left)"
        save()
        return
    recipe = load_recipe(entry["checked_recipe"], DistillRecipe)
    tr = teacher = None
    try:
        t0 = time.perf_counter()
        teacher = random_teacher(teacher_path, recipe.model.kind, recipe.model.max_sequence_length, device,
                                 work / "tokenizers")
        tr = DMD2Trainer(recipe, work / f"run_{path.stem}", teacher=teacher)
        _sync(device)
        entry["build_seconds"] = time.perf_counter() - t0
        for i, kind in enumerate(phases):
            if kind not in todo:
                continue
            ph = phases[kind]
            if clock.left() < 2 * entry.get("_last_phase_seconds", 10.0):
                ph["status"] = f"skipped: time budget ({clock.left():.0f} s of {clock.budget:.0f} s left)"
                continue
            t1 = time.perf_counter()
            try:
                ph.update(run_phase(tr, i, iterations, warm_up, clock))
                total = planned.get(kind)
                if total and ph["max_memory_allocated_bytes"]:
                    ph["measured_over_plan"] = ph["max_memory_allocated_bytes"] / total
                ph["status"] = "ok"
            except torch.OutOfMemoryError as e:
                ph["status"] = f"out of memory: {_why(e)}"
                if device.type == "cuda":
                    ph["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                for p in [*tr.teacher.denoiser.parameters(), *tr.critic.parameters()]:
                    p.grad = None
            except Exception as e:  # one phase's failure must not cost the others their measurement
                traceback.print_exc()
                ph["status"] = f"error: {_why(e)}"
            entry["_last_phase_seconds"] = time.perf_counter() - t1
            save()
    except torch.OutOfMemoryError as e:
        for k in todo:
            phases[k].setdefault("status", f"out of memory while building the models: {_why(e)}")
    except Exception as e:
        traceback.print_exc()
        for k in todo:
            phases[k].setdefault("status", f"error while building the models: {_why(e)}")
    finally:
        entry.pop("_last_phase_seconds", None)
        del tr, teacher
        _free(device)
        save()


def run(args) -> dict:
    """The whole check; returns the JSON document (also written to ``args.out``)."""
    clock = Clock(args.budget_seconds)
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise ValueError("no CUDA device: this check measures GPU memory; run it on a GPU, or pass --smoke for "
                         "the CPU smoke run on tiny configs")
    else:
        device = torch.device("cuda")
    recipes = [p for p in shipped_recipes(args.recipes) if not args.only or any(s in p.name for s in args.only)]
    if not recipes:
        raise ValueError(f"--only {args.only} matches none of the recipes {args.recipes}")
    if args.work:
        return _run(args, recipes, device, clock, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        return _run(args, recipes, device, clock, Path(tmp))


def _run(args, recipes: list[Path], device: torch.device, clock: Clock, work: Path) -> dict:
    from tsm_core.models import backbone_class
    from tsm_core.train.recipe import load_recipe
    from tsm_distill import DistillRecipe

    data = write_data(work / "data")
    shipped = {p: load_recipe(p, DistillRecipe) for p in recipes}
    teachers = (smoke_teachers(work / "teachers", {r.model.kind for r in shipped.values()}) if args.smoke
                else {k: CONFIGS / v for k, v in CONFIG_FOLDER.items()})
    out = Path(args.out)
    doc = {"tool": "tools/gpu_check.py", "mode": "smoke" if args.smoke else "gpu", "device": _device_name(device),
           "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
           "processes_the_batches_assume": PROCESSES,
           "budget_seconds": args.budget_seconds if math.isfinite(args.budget_seconds) else None,
           "versions": _versions(), "recipes": {}}

    def save():
        doc["elapsed_seconds"] = clock.elapsed()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, out)  # a run killed mid-write keeps the last whole file

    entries = {}
    for path in recipes:
        name = str(path.relative_to(REPO))
        kind = shipped[path].model.kind
        entry = doc["recipes"][path.stem] = {"recipe": name, "kind": kind, "phases": {}}
        if kind not in teachers:
            entry["status"] = f"skipped: no shipped config folder for model.kind {kind!r}"
            continue
        resolution = None
        if args.smoke:  # the tiny teacher's pixel size, not the recipe's
            meta = backbone_class(kind).meta(teachers[kind])
            resolution = meta.latent_size * meta.vae_scale
        raw, names = checked_recipe(path, teachers[kind], data, mixed_precision="no" if args.smoke else "bf16",
                                    iterations=args.iterations, batch_cap=args.batch_cap, resolution=resolution)
        entry.update(model_path=str(teachers[kind]), shipped_fsdp=shipped[path].train.fsdp,
                     checked_recipe=raw)
        for ph_kind, ph in zip(names, raw["phases"]):
            entry["phases"][ph_kind] = {"phase": names[ph_kind], "type": ph["type"], "gan": ph["gan"],
                                        "batch_per_process": ph["batch_size"]}
        entries[path] = entry
    save()
    capacity = doc["device_memory_bytes"]
    with contextlib.closing(_plans(entries, args.plan_workers, clock)) as plans:
        for path, figures in plans:
            entry = entries[path]
            check_recipe(path, entry, figures, teacher_path=teachers[entry["kind"]], device=device, capacity=capacity,
                         iterations=args.iterations, warm_up=not args.smoke, clock=clock, work=work, save=save)
            print(f"{entry['recipe']}: " + ", ".join(f"{k} {ph.get('status')}" for k, ph in entry["phases"].items()),
                  flush=True)
    save()
    return doc


def _plans(entries: dict[Path, dict], workers: int, clock: Clock):
    """Yield (recipe, its `plan_figures` or the exception planning raised), each recipe once.

    The plans need only the CPU (meta tensors). With ``workers`` > 0 (a GPU machine) they run in worker
    processes while the GPU measures, and each recipe comes as soon as its plan is ready (a 12B teacher's takes
    longest); plans not ready when the budget is spent come as a TimeoutError, and the workers are killed
    when this closes (a plan still running must not hold the exit). With 0, in this process, in order."""
    if workers <= 0:
        for path, entry in entries.items():
            try:
                yield path, plan_figures(entry["checked_recipe"])
            except Exception as e:
                traceback.print_exc()
                yield path, e
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(entries)), initializer=torch.set_num_threads,
                                                     initargs=(1,))
    try:
        pending = {p: pool.apply_async(plan_figures, (e["checked_recipe"],)) for p, e in entries.items()}
        while pending:
            ready = [p for p, r in pending.items() if r.ready()]
            if not ready and clock.left() <= 0:
                for path in list(pending):
                    yield path, TimeoutError("its plan was not ready within the time budget")
                return
            if not ready:
                time.sleep(0.2)
                continue
            result = pending.pop(ready[0])
            try:
                yield ready[0], result.get()
            except Exception as e:
                yield ready[0], e
    finally:
        pool.terminate()


def _why(e: BaseException) -> str:
    """An exception in one line for the JSON (torch's checkpoint errors run to hundreds of lines; the full
    traceback goes to stderr)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write (rewritten after every phase)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny configs, float32, no warm-up")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="stop starting work after this many seconds (default 480 on a GPU, unlimited with --smoke)")
    p.add_argument("--iterations", type=int, default=None,
                   help="measured iterations per phase: one with the generator update, the rest critic-only "
                        "(default 3 on a GPU, 2 with --smoke)")
    p.add_argument("--batch-cap", type=int, default=None, help="cap the per-process batch (default: none on a GPU, "
                   "2 with --smoke)")
    p.add_argument("--only", nargs="*", default=None, help="run only recipes whose file name contains one of these")
    p.add_argument("--work", default=None, help="keep the generated data, tokenizers (and with --smoke the tiny "
                   "teachers the JSON's checked recipes name) in this folder (default: a temporary one, removed)")
    p.add_argument("--recipes", default=RECIPE_GLOB, help="recipe files, a glob relative to the repository")
    p.add_argument("--plan-workers", type=int, default=None,
                   help="processes planning in parallel with the GPU work (default: CPU cores - 2 on a GPU, "
                        "0 = in this process with --smoke)")
    args = p.parse_args(argv)
    if args.budget_seconds is None:
        args.budget_seconds = math.inf if args.smoke else 480.0
    args.iterations = args.iterations or (2 if args.smoke else 3)
    if args.batch_cap is None and args.smoke:
        args.batch_cap = 2
    if args.plan_workers is None:
        args.plan_workers = 0 if args.smoke else max(1, (os.cpu_count() or 2) - 2)
    if args.iterations < 1 or (args.batch_cap is not None and args.batch_cap < 1):
        print("error: --iterations and --batch-cap must be >= 1", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation (2-3x slower, measured)
    try:
        doc = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {args.out} ({doc['elapsed_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
