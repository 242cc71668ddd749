"""``tsm-demo``: distill the embedded Fashion-MNIST teacher into 4-step LoRA and TSM students, score them.

Stages (each with a progress bar; seconds per stage go into results.json):

1. copy the teacher into the run folder (the shipped one may be re-exported while the demo runs);
2. Inception features of the Fashion-MNIST test images (the FID reference; cached in the package);
3. DMD2 + vanilla LoRA (``recipes/demo_fmnist_lora.yaml``);
4. DMD2 + TSM (``recipes/demo_fmnist_tsm.yaml``): per-step experts without then with the GAN, then
   the router phase with the LoRA run's adapter as the scale-1 context expert;
5. FID/KID of the LoRA, TSM stage-1 and TSM stage-2 students;
6. reference rows at the same N, prompts and seeds: the floor (real train images) and the teacher at
   50 and 4 DDIM steps, read from ``reference.json`` next to the teacher when it was computed for this
   teacher, N and reference set (``tools/teacher_reference.py``), otherwise computed here (slow; the
   demo says so); then results.md, results.json, samples.png (one row per model) and gates.png;
7. fidelity to the teacher's samples and the DMD-only students (`tsm_distill.demo.scores`);
8. the budget curve (`tsm_distill.demo.budget`): both students after every 1/K of the budget
   (``--budget-points``), from the checkpoints and phase adapters the runs kept, in budget.json and budget.md.

Equal generator-step budget: a *generator step* is one optimizer update of the student (DMD loss,
plus the GAN loss in GAN phases); a phase of I iterations with F fake-score updates per generator
update makes ceil(I / F) of them. The LoRA run's phases and the TSM run's expert phases (stage 1)
make the same number of generator steps, with the same F, batch size and learning rates, hence
also the same number of fake-score updates. The router phase (stage 2) comes on top and is
reported separately, as the paper reports its 2K router steps beside the expert schedule.

Protocol: by default both students train at the same batch size (equal compute).
``--lora-batch-multiplier K`` multiplies the LoRA student's batch in every phase by K (A.3's batch ratio
is K = 4, at equal generator steps); ``--protocol a3p`` takes A.3's phase lengths and batch ratios, scaled
(`tsm_distill.demo.protocol`); ``--students lora --lora-rank R`` trains the LoRA student alone at another
rank (capacity parity). results.json records the protocol and, per student, its iterations, samples and
parameters.

Several seeds: ``--seeds 0 1 2 3 4 [--jobs 2]`` runs this single-seed demo once per seed, each in
``<run-dir>/seed<N>/``, skips finished seeds and writes the paired statistics (`tsm_distill.demo.seeds`). A stopped
seed run again with the same options resumes each student from its last checkpoint (`train_student`).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from tsm_core.serialization import count_saved_parameters as adapter_parameters

from . import eval as ev
from . import report as rep
from . import seeds as ds
from .eval import student_images, student_images_of  # noqa: F401  (re-exported: callers sample students here)
from .options import FULL, QUICK, RECIPES, build_parser, parse_args  # noqa: F401  (re-exported)
from .protocol import (
    A3P_BUDGET_DEFINITION,
    a3p_phases,
    phase_value,
    student_accounting,
)
from .scores import score_seed

A3P_CHECKPOINTS = 3  # --protocol a3p: checkpoints per LoRA-run length, for resuming only
GRID_COLUMNS = 10  # one image per class in the sample grid
BUDGET_DEFINITION = __doc__.split("Equal generator-step budget: ")[1].split("\n\n")[0].strip().replace("\n", " ")


# ---------------------------------------------------------------------------- budget
def generator_steps(phase: dict) -> int:
    """Generator updates a phase makes: the trainer updates the student on every F-th iteration."""
    return math.ceil(phase["steps"] / phase.get("fake_updates_per_generator_update", 10))


def split_budget(weights: list[int], total: int) -> list[int]:
    """Split ``total`` over phases in proportion to ``weights`` (largest remainder; sums exactly)."""
    if total < 0 or not weights or sum(weights) <= 0:
        raise ValueError(f"cannot split a budget of {total} generator steps over weights {weights}")
    exact = [total * w / sum(weights) for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: out[i] - exact[i])
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def rescale_phases(phases: list[dict], budget: int | None, fake_updates: int | None,
                   batch_size: int | None) -> list[dict]:
    """Phases with ``budget`` generator steps in all (split like the recipe's), F and batch overridden.

    Warm-up counts iterations (``PhaseConfig``); it stays the same fraction of each phase's iterations.
    """
    phases = [dict(p) for p in phases]
    warmup_fraction = [p.get("warmup_steps", 500) / max(1, p["steps"]) for p in phases]
    for p in phases:
        if fake_updates is not None:
            g = generator_steps(p)
            p["fake_updates_per_generator_update"] = fake_updates
            p["steps"] = g * fake_updates
        if batch_size is not None:
            p["batch_size"] = batch_size
    if budget is not None:
        old = [generator_steps(p) for p in phases]
        for p, g in zip(phases, split_budget(old, budget)):
            f = p.get("fake_updates_per_generator_update", 10)
            p["steps"] = g * f
    for p, fraction in zip(phases, warmup_fraction):
        p["warmup_steps"] = min(p["steps"], round(fraction * p["steps"]))
    return phases


def scale_phase_key(phases: list[dict], key: str, factor: float) -> list[dict]:
    """Phases with ``key`` times ``factor`` in every one (a phase that does not name it has PhaseConfig's
    default). The LR-fairness check scales ``lr`` (the fake score's ``lr_critic`` stays); A.3's protocol
    gives the LoRA student 4x TSM's ``batch_size``."""
    return [dict(p, **{key: phase_value(p, key) * factor}) for p in phases]


def build_recipes(args, run_dir: Path, teacher: Path):
    """The LoRA and TSM recipes of this run (budgets applied), plus the budget record."""
    from tsm_core.train.recipe import load_recipe, read_recipe_dict

    from ..config import DistillRecipe

    lora = read_recipe_dict(args.lora_recipe)
    tsm = read_recipe_dict(args.tsm_recipe)
    experts = [p for p in tsm["phases"] if p.get("type", "foster") == "foster"]
    routers = [p for p in tsm["phases"] if p.get("type", "foster") != "foster"]
    if not routers or tsm["phases"][-len(routers):] != routers:
        raise ValueError(f"{args.tsm_recipe}: the TSM recipe must end with its router (assemble) phase(s)")
    if args.lora_rank is not None or args.lora_alpha is not None:  # capacity parity
        # alpha stays the recipe's unless given, as A.3 keeps alpha 8 at rank 64: the update of B A scales with
        # alpha, so alpha grown with the rank acts as a larger learning rate (the first capacity seed, alpha 32 at
        # rank 32, scored 90.92 against LoRA r8's 57 mean: docs/demo/capacity_alpha32_seed1).
        lora["experts"] = dict(lora.get("experts", {}))
        if args.lora_rank is not None:
            lora["experts"]["rank"] = args.lora_rank
        if args.lora_alpha is not None:
            lora["experts"]["alpha"] = args.lora_alpha
    lora_phases = rescale_phases(lora["phases"], args.budget, args.fake_updates, args.batch_size)
    experts = rescale_phases(experts, args.budget, args.fake_updates, args.batch_size)
    routers = rescale_phases(routers, args.router_steps, args.fake_updates, args.batch_size)
    if args.protocol == "a3p":
        non_gan = [p for p in experts if not p.get("gan", False)] or experts
        base_batch = args.batch_size or phase_value(non_gan[0], "batch_size")
        lora_phases, experts, routers, _ = a3p_phases(lora_phases, experts, routers,
                                                      list(lora.get("student_timesteps", [999, 749, 499, 249])),
                                                      base_batch)
    else:
        lora_phases = scale_phase_key(lora_phases, "batch_size", args.lora_batch_multiplier)
    lora["phases"], experts, routers = (scale_phase_key(p, "lr", args.lr_scale) for p in (lora_phases, experts, routers))
    tsm["phases"] = experts + routers
    budget = {"lora": sum(generator_steps(p) for p in lora["phases"]),
              "tsm_stage1": sum(generator_steps(p) for p in experts),
              "tsm_stage2_router": sum(generator_steps(p) for p in routers),
              "phases": {f"lora/{p['name']}": generator_steps(p) for p in lora["phases"]}
              | {f"tsm/{p['name']}": generator_steps(p) for p in tsm["phases"]}}
    if args.protocol == "recipe" and budget["lora"] != budget["tsm_stage1"]:
        raise ValueError(f"unequal budgets: LoRA makes {budget['lora']} generator steps, the TSM expert phases "
                         f"{budget['tsm_stage1']}; fix the recipes or pass --budget")
    # The budget curve (demo_budget) scores both students at every 1/K of the expert budget from these
    # checkpoints. Both runs count the same iterations with the same F up to there, so a checkpoint at global
    # step s is an equal-generator-step pair. All are kept; saving one draws no random numbers, so the
    # students are bit-identical to a run without them.
    # Under --protocol a3p the students differ in iterations, so there is no budget curve; the LoRA run's
    # thirds still get checkpoints, so a stopped seed loses at most a third of a phase.
    iterations = sum(p["steps"] for p in lora["phases"])
    points = args.budget_points or (A3P_CHECKPOINTS if args.protocol == "a3p" else 0)
    every = math.ceil(iterations / points) if points else 10**9
    for r in (lora, tsm):
        r["model"] = {"path": str(teacher)}
        r.setdefault("train", {})
        r["train"].update({"seed": args.seed, "checkpoint_every": every, "keep_last": None, "sample_every": 0})
        if args.threads:
            r["train"]["threads"] = args.threads
    tsm["experts"]["init_from"] = str(run_dir / "lora" / "adapter")
    return load_recipe(lora, DistillRecipe), load_recipe(tsm, DistillRecipe), budget


def students_accounting(lora, tsm) -> dict:
    """Iterations, generator updates and samples of each student (``demo_protocol.student_accounting``) from
    the two loaded recipes: LoRA, TSM's expert phases (stage 1) and its router phases (stage 2)."""
    from dataclasses import asdict

    experts = [asdict(p) for p in tsm.phases if p.type == "foster"]
    routers = [asdict(p) for p in tsm.phases if p.type != "foster"]
    return {"lora": student_accounting([asdict(p) for p in lora.phases]), "tsm_stage1": student_accounting(experts),
            "tsm_stage2_router": student_accounting(routers)}


# ---------------------------------------------------------------------------- stages
class Stages:
    """Times named stages (wall-clock seconds) and prints a headline as each starts."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *a, **kw):
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def train_student(trainer, recipe, run: Path, may_resume: bool = True) -> tuple[Path, bool]:
    """Train a student in ``run``, or resume it there when a stopped run of the *same* recipe left a
    checkpoint (a retried seed of ``tsm-demo --seeds`` then loses at most the work since the student's last
    checkpoint: every 1/K of the budget with ``--budget-points K``). Resume is the skeleton's, bit-exact, so
    the student equals an uninterrupted one; a finished run only rebuilds its final adapter. Any other
    recipe, or ``may_resume`` false, starts again from scratch.

    Returns ``(adapter path, resumed)``.
    """
    from tsm_core.train.checkpoint import CheckpointManager
    from tsm_core.train.recipe import load_recipe

    from ..config import DistillRecipe

    saved, latest = run / "recipe.yaml", CheckpointManager(run).latest()
    resume = may_resume and latest is not None and saved.is_file() and load_recipe(saved, DistillRecipe) == recipe
    if resume:
        print(f"resuming {run} from {latest.name} (same recipe)", flush=True)
    return trainer.train(resume=resume, overwrite=not resume), resume


def device_name(device: torch.device) -> str:
    """What results.json records as the device: "cpu", or the GPU's name (floats differ between them)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def copy_teacher(src: Path, dest: Path) -> Path:
    """Snapshot the teacher pipeline folder (it is small), retrying if an export swaps it meanwhile."""
    if dest.exists():
        return dest
    for attempt in range(5):
        try:
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.npz", ev.REFERENCE_NAME))
            tmp.rename(dest)
            return dest
        except (FileNotFoundError, shutil.Error):  # the folder was being swapped by a re-export
            time.sleep(2 * (attempt + 1))
    raise FileNotFoundError(f"could not copy the teacher from {src}: it keeps changing or does not exist")


def grid_real_images() -> torch.Tensor:
    """One real train image per class (classes 0..9), in model space: the grid's first row."""
    from tsm_core.data.fmnist import load_fashion_mnist, to_model_space

    images, labels = load_fashion_mnist("train")
    first = [int((labels == c).nonzero()[0][0]) for c in range(GRID_COLUMNS)]
    return to_model_space(images[first])


def reference_rows(args, teacher_path: Path, extractor, ref_feats, ref_hash: str, notes: list[str]) -> list[dict]:
    """Floor and teacher rows: from reference.json when it matches, else computed here."""
    from ..teacher import load_teacher

    names = {"floor": (ds.ROW_NAMES["floor"], "-"),
             "teacher_full": (f"{ds.TEACHER_FULL_PREFIX}{args.teacher_steps}", args.teacher_steps),
             "teacher_few": (ds.ROW_NAMES["teacher_few"], 4)}
    stored, why = (None, "--reference none") if args.reference == "none" else ev.read_reference_rows(
        args.reference, ev.unet_hash(teacher_path), args.n, args.n_ref, ref_hash)
    if stored is not None and stored.get("teacher_full", {}).get("steps") != args.teacher_steps:
        stored, why = None, f"{args.reference} holds another teacher step count"
    if stored is not None:
        print(f"reference rows {why}")
        return [dict(stored[k], row=names[k][0], steps=names[k][1], source="reference.json") for k in names]
    msg = f"reference rows computed here ({why}); this is slow: run tools/teacher_reference.py once to cache them"
    print(msg, flush=True)
    notes.append(msg)
    return compute_reference_rows(load_teacher(teacher_path).to(args.device), args.n, args.teacher_steps, extractor, ref_feats, names)


def compute_reference_rows(teacher, n: int, teacher_steps: int, extractor, ref_feats, names: dict | None = None) -> list[dict]:
    """The floor row and the two teacher rows at N images (shared with tools/teacher_reference.py)."""
    names = names or {"floor": ("floor", "-"), "teacher_full": ("teacher_full", teacher_steps), "teacher_few": ("teacher_few", 4)}
    prompts, seeds = ev.eval_prompts(n)
    rows = []
    start = time.perf_counter()
    feats = ev.image_features(extractor, ev.real_train_images(n))
    rows.append(dict(ev.score_row(feats, ref_feats), row=names["floor"][0], steps="-", source="computed",
                     seconds=round(time.perf_counter() - start, 2)))
    for key, steps in (("teacher_full", teacher_steps), ("teacher_few", 4)):
        start = time.perf_counter()
        imgs = ev.teacher_generate(teacher, prompts, seeds, steps)
        feats = ev.image_features(extractor, ev.to_uint8(imgs))
        rows.append(dict(ev.score_row(feats, ref_feats), row=names[key][0], steps=steps, source="computed",
                         seconds=round(time.perf_counter() - start, 2)))
    return rows


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 and leaves results.{md,json}, samples.png and gates.png in the run folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.seeds is not None:  # the sweep only starts subprocesses: it keeps the caller's thread settings
        return ds.run_sweep(args, argv)
    restore = ev.limit_threads(args.threads) if args.threads else (lambda: None)
    try:
        return _run(args, argv)
    finally:
        restore()  # a caller (e.g. a test session) keeps its own thread settings


def _run(args, argv: list[str]) -> int:
    from ..trainer import DMD2Trainer, load_student

    run_dir = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stages, notes = Stages(), []
    teacher = stages.run("copy teacher", copy_teacher, Path(args.teacher), run_dir / "teacher")
    lora_recipe, tsm_recipe, budget = build_recipes(args, run_dir, teacher)
    print(f"budget (generator steps): LoRA {budget['lora']}, TSM experts {budget['tsm_stage1']} "
          f"+ router {budget['tsm_stage2_router']}")

    extractor = ev.make_extractor(device=args.device)
    ref_feats, ref_source = stages.run("reference features", ev.reference_features, extractor, args.n_ref)
    ref_hash = ev.features_hash(ref_feats)

    lora_tr = DMD2Trainer(lora_recipe, run_dir / "lora")
    lora_adapter, lora_resumed = stages.run("distill LoRA", train_student, lora_tr, lora_recipe, run_dir / "lora")
    students_info = students_accounting(lora_recipe, tsm_recipe)
    students_info["lora"] |= {"rank": lora_recipe.experts.rank, "alpha": lora_recipe.experts.alpha,
                              "trainable_parameters": adapter_parameters(lora_adapter, [1])}
    lora_only = args.students == "lora"
    if lora_only:  # the capacity-parity arm: its TSM students come from an equal-compute run of the same seed
        tsm_tr = tsm_adapter = stage1 = None
        students_info = {"lora": students_info["lora"]}
    else:
        tsm_tr = DMD2Trainer(tsm_recipe, run_dir / "tsm")
        # The TSM run's router phase starts from the LoRA adapter (its n = 1 context expert): it may resume only
        # when the LoRA student did too, i.e. is the same one its checkpoints were made with.
        tsm_adapter, _ = stages.run("distill TSM", train_student, tsm_tr, tsm_recipe, run_dir / "tsm", lora_resumed)
        n_experts = len(tsm_recipe.phases) - sum(p.type != "foster" for p in tsm_recipe.phases)
        stage1 = run_dir / "tsm" / "phases" / f"{n_experts - 1:02d}_{tsm_recipe.phases[n_experts - 1].name}"
        router = tsm_recipe.phases[-1]
        students_info["tsm_stage1"] |= {"rank": tsm_recipe.experts.rank,
                                        "trainable_parameters": adapter_parameters(stage1, [router.core_scale])}
        students_info["tsm_stage2_router"] |= {
            "trainable_parameters": adapter_parameters(tsm_adapter, [], router=True),
            "parameters_in_use": adapter_parameters(tsm_adapter, [router.core_scale, *router.context_scales],
                                                    router=True)}

    prompts, seeds = ev.eval_prompts(args.n)
    ts = list(lora_recipe.student_timesteps)
    students = [("lora", lora_adapter, budget["lora"]), ("tsm_stage1", stage1, budget["tsm_stage1"]),
                ("tsm_stage2", tsm_adapter, {"experts": budget["tsm_stage1"], "router": budget["tsm_stage2_router"]})]
    students = students[:1] if lora_only else students
    grid = {"real (train)": grid_real_images()}
    rows, features = [], {}
    for key, adapter, gen_steps in students:
        name = ds.ROW_NAMES[key]

        def score_student(adapter=adapter, name=name, key=key):
            imgs = student_images(teacher, adapter, prompts, seeds, ts, desc=f"sample {name}", device=args.device)
            features[key] = ev.image_features(extractor, ev.to_uint8(imgs))
            return imgs, ev.score_row(features[key], ref_feats)
        start = time.perf_counter()
        imgs, scores = stages.run(f"evaluate {name}", score_student)
        grid[name] = imgs[:GRID_COLUMNS]
        rows.append(dict(scores, row=name, steps=len(ts), generator_steps=gen_steps, source="this run",
                         seconds=round(time.perf_counter() - start, 2)))
    # The floor and teacher rows come last: reference.json is read only now, so tools/teacher_reference.py
    # may still be filling it for a freshly exported teacher while the students train.
    rows = stages.run("reference rows", reference_rows, args, teacher, extractor, ref_feats, ref_hash, notes) + rows
    for r in rows:
        r.setdefault("generator_steps", None)

    def report():
        from ..teacher import load_teacher

        t = load_teacher(teacher).to(args.device)
        p10, s10 = prompts[:GRID_COLUMNS], seeds[:GRID_COLUMNS]
        teacher_grid = {f"teacher DDIM {args.teacher_steps}": ev.teacher_generate(t, p10, s10, args.teacher_steps),
                        "teacher DDIM 4": ev.teacher_generate(t, p10, s10, 4)}
        ordered = {"real (train)": grid.pop("real (train)"), **teacher_grid, **grid}
        rep.save_sample_grid(ordered, run_dir / "samples.png")
        if tsm_adapter is None:
            return
        teacher2, tsm = load_student(teacher, tsm_adapter, args.device)
        sweep = sorted(set(range(0, 1000, 50)) | set(ts))
        rep.save_gate_plot(rep.gate_curves(teacher2, tsm, sweep), ts, run_dir / "gates.png")

    stages.run("report (samples.png, gates.png)", report)
    if ref_source.startswith("computed"):
        notes.append(f"reference features {ref_source} (no cache with {args.n_ref} images)")
    notes.append("FID/KID against the first n_reference Fashion-MNIST test images; generated images cropped to "
                 "the 28x28 centre, grey; teacher rows: DDIM (trailing spacing) with CFG "
                 f"{ev.GUIDANCE}, the distillation's real-score guidance")
    if args.lr_scale != 1:
        notes.append(f"generator learning rates x{args.lr_scale:g} of the recipes' in every phase of both students")
    proto = ds.protocol(args.lora_batch_multiplier, args.protocol)
    if args.protocol == "a3p":
        lora_s, tsm_s = students_info["lora"], students_info["tsm_stage1"]
        notes.append(f"protocol {proto['label']}: phase lengths are A.3's times one factor (LoRA keeps the recipe's "
                     f"{lora_s['iterations']} iterations), not equal generator steps: TSM stage 1 "
                     f"{tsm_s['iterations']} iterations / {tsm_s['samples']} samples, LoRA {lora_s['iterations']} / "
                     f"{lora_s['samples']} (results.json 'students')")
    elif args.lora_batch_multiplier != 1:  # the budget definition's "same batch size" then holds for TSM only
        notes.append(f"protocol {proto['label']}: the LoRA student's batch is "
                     f"{args.lora_batch_multiplier}x TSM's in every phase, so it sees that many more samples per "
                     "generator step (equal generator steps, unequal compute)")
    if args.n >= 1000:
        notes.append("KID std is over clean-fid's 100 subsets of min(N, 1000) images; at N >= 1000 each subset "
                     "is the whole set, so the std reads 0 and says nothing about noise: compare runs (seeds)")
    meta = {"mode": "quick" if args.quick else "full", "seed": args.seed,
            "protocol": proto, "students": students_info, "lr_scale": args.lr_scale, "n": args.n,
            "device": device_name(args.device),
            "n_reference": args.n_ref,
            "reference_features": ref_source, "teacher_unet_sha256": ev.unet_hash(teacher),
            "teacher_info": json.loads((teacher / "teacher_info.json").read_text())
            if (teacher / "teacher_info.json").exists() else {},
            "budget": budget, "budget_definition": A3P_BUDGET_DEFINITION if proto["name"] == "a3p" else BUDGET_DEFINITION, "seconds": stages.seconds,
            "phase_seconds": {"lora": lora_tr.seconds} | ({} if lora_only else {"tsm": tsm_tr.seconds}),
            "students_trained": [key for key, *_ in students],
            "command": "tsm-demo " + shlex.join(argv), "notes": notes}
    rep.write_results(run_dir, rows, meta)
    # Fidelity to the teacher's samples and the DMD-only students (scores.py): after results.json, from the
    # features just computed, so only the two DMD-only students are sampled again.
    rows = stages.run("fidelity and DMD-only scores", score_seed, run_dir, extractor, args.device,
                      features=features)["rows"]
    print("\n" + rep.format_table(rows))
    print(f"\nresults: {run_dir / 'results.md'}, {run_dir / 'results.json'}, {run_dir / 'samples.png'}, "
          f"{run_dir / 'gates.png'}")
    if args.budget_points:  # after results.json: a failure here cannot cost the seed's table
        from .budget import budget_curve, format_curve

        print("\n" + format_curve(stages.run("budget curve", budget_curve, run_dir, extractor, device=args.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
