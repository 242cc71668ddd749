"""The router test: stage 2 (assembling) trained alone from frozen stage-1 students, over a grid of settings.

The paper credits stage 1 with almost all of the distillation gain (Tab. 7: LoRA 14.58, stage 1 9.92,
stage 2 9.90), and on the demo stage 2 sits within seed noise of stage 1. This asks what the router can do
on its own, cheaply: from each finished tsm-demo seed, train only the router (paper eq. 5-6, core = the n = 4
experts) for every arm of

* learning rate x generator updates (default {3e-3, 1e-3, 3e-4} x {25, 100}), and
* context {n = 1} (the LoRA student, as the recipe) or {n = 1, n = 2}. The n = 2 experts do not exist in
  a demo run, so they are fostered first, once per seed, with DMD2 for as many iterations (and the same
  non-GAN / GAN split) as the seed's LoRA student had: what the n = 1 context expert got.

Every arm starts from the same state as the seed's own router phase: the stage-1 adapter (every expert
frozen) and the fake score and GAN head of the TSM run's checkpoint at the end of stage 1 (a fresh fake score
would first have to learn the student's distribution). Each arm is scored like the demo's students (FID/KID
against real images and against the teacher's samples) and paired with its own seed's stage 1, and its
gates are summarised per layer (mean over timesteps, tokens and test images at the student's steps).

    python -m tsm_distill.demo.router OUT_DIR --from SEED_DIR [SEED_DIR ...] [--lrs ...] [--updates ...]

writes ``OUT_DIR/results.json`` and ``results.md`` after every arm; each arm trains in ``SEED_DIR/router/<arm>/``.
The sweep resumes at every level: a finished arm is not trained again, a stopped one continues from its last
checkpoint, and an arm's scores and gates are kept in its ``scores.json`` (keyed by the adapter's hash and the
sample counts), so a rerun scores only what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tsm_core.eval.seeds import mean_std, t_interval
from tsm_core.serialization import atomic_write_text

from . import eval as ev
from .results import keyed_rows, read_results, seed_of

LRS = (3e-3, 1e-3, 3e-4)
UPDATES = (25, 100)
CONTEXTS = ((1,), (1, 2))


def arm_name(lr: float, updates: int, context: tuple[int, ...]) -> str:
    """A folder name for one arm, e.g. ``lr1e-03_g25_ctx1-2``."""
    return f"lr{lr:.0e}_g{updates}_ctx{'-'.join(map(str, context))}"


def _seed_recipe(seed_dir: Path):
    from tsm_core.train.recipe import load_recipe

    from ..config import DistillRecipe

    return load_recipe(seed_dir / "tsm" / "recipe.yaml", DistillRecipe)


def stage1_checkpoint(run: Path, recipe) -> Path:
    """The TSM run's checkpoint written at the end of its last foster phase (the skeleton writes one at
    every phase boundary): the fake score and GAN head the seed's own router phase started from."""
    step = sum(ph.steps for ph in recipe.phases if ph.type == "foster")
    path = run / "checkpoints" / f"step_{step:08d}"
    if not (path / "critic.safetensors").is_file():
        raise FileNotFoundError(f"{path} does not exist: the router test needs the TSM run's checkpoint at the end "
                                "of stage 1 (tsm-demo keeps every checkpoint)")
    return path


def load_critic(trainer, checkpoint: Path) -> None:
    """Copy a checkpoint's fake score and GAN head into ``trainer.critic`` (every saved tensor must fit)."""
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "critic.safetensors"))
    own = dict(trainer.critic.named_parameters())
    missing = sorted(set(saved) - set(own))
    if missing:
        raise ValueError(f"{checkpoint} does not fit this critic (e.g. {missing[:2]})")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)


def n2_recipe(seed_dir: Path):
    """Foster the n = 2 experts (all of them) for the LoRA student's iterations without and with the GAN,
    starting from the stage-1 adapter (its n = 1 and n = 4 experts are copied in and stay frozen)."""
    from tsm_core.train.recipe import load_recipe

    from ..config import DistillRecipe
    from .scores import stage1_adapter

    tsm = _seed_recipe(seed_dir)
    lora = load_recipe(seed_dir / "lora" / "recipe.yaml", DistillRecipe)

    phases = [replace(ph, name=f"n2{'_gan' if ph.gan else ''}", scale=2, experts=None) for ph in lora.phases]
    experts = replace(tsm.experts, scales=[1, 2, 4], init_from=str(stage1_adapter(seed_dir / "tsm")),
                      init_scales=[1, 4])
    return replace(tsm, phases=phases, experts=experts)


def arm_recipe(seed_dir: Path, lr: float, updates: int, context: tuple[int, ...], n2_adapter: Path | None):
    """The seed's own router phase with another learning rate, length and context, from the frozen stage 1."""
    from .scores import stage1_adapter

    tsm = _seed_recipe(seed_dir)
    router = next(ph for ph in tsm.phases if ph.type == "assemble")
    F = router.fake_updates_per_generator_update
    phase = replace(router, name="router", lr=lr, steps=updates * F, context_scales=list(context),
                    warmup_steps=min(router.warmup_steps, updates * F))
    if 2 in context:
        if n2_adapter is None:
            raise ValueError("context n = 2 needs the fostered n = 2 experts")
        experts = replace(tsm.experts, scales=[1, 2, 4], init_from=str(n2_adapter), init_scales=[1, 2, 4])
    else:
        experts = replace(tsm.experts, init_from=str(stage1_adapter(seed_dir / "tsm")), init_scales=list(tsm.experts.scales))
    return replace(tsm, phases=[phase], experts=experts)


def train_arm(recipe, run: Path, critic_from: Path | None) -> Path:
    """Train one arm (or return a finished one's adapter), its critic loaded from ``critic_from`` (None: a fresh
    copy of the teacher, DMD2's own start); returns its adapter."""
    from ..trainer import DMD2Trainer
    from .run import train_student

    if (run / "adapter" / "tsm_adapter.safetensors").is_file() and (run / "done.json").is_file():
        return run / "adapter"
    trainer = DMD2Trainer(recipe, run)
    if critic_from is not None:
        # On a resume the checkpoint's own critic replaces this one (the skeleton restores it), so loading first
        # is right in both cases.
        load_critic(trainer, critic_from)
    adapter, _ = train_student(trainer, recipe, run)
    (run / "done.json").write_text(json.dumps({"finished": time.time()}))
    return adapter


def gate_summary(teacher_path: Path, adapter: Path, timesteps: list[int], device="cpu") -> dict[str, list[float]]:
    """Per layer, the mean gate of each context expert over the student's timesteps (``report.gate_curves``)."""
    from ..trainer import load_student
    from .report import gate_curves

    teacher, tsm = load_student(teacher_path, adapter, device)
    curves = gate_curves(teacher, tsm, timesteps)
    return {layer: list(np.mean([curve[t] for t in timesteps], axis=0)) for layer, curve in curves.items()}


def score_arm(seed_dir: Path, adapter: Path, extractor, ref_feats, teacher_feats, n: int, device="cpu") -> dict:
    from .eval import student_images
    from .scores import fidelity

    ts = list(_seed_recipe(seed_dir).student_timesteps)
    prompts, seeds = ev.eval_prompts(n)
    imgs = student_images(seed_dir / "teacher", adapter, prompts, seeds, ts, desc=f"sample {adapter.parent.name}",
                          device=device)
    feats = ev.image_features(extractor, ev.to_uint8(imgs))
    return dict(ev.score_row(feats, ref_feats), **fidelity(feats, teacher_feats))


def _score_key(adapter: Path, n: int, n_reference: int) -> dict:
    return {"adapter_sha256": hashlib.sha256((adapter / "tsm_adapter.safetensors").read_bytes()).hexdigest(),
            "n": n, "n_reference": n_reference}


def saved_scores(arm_dir: Path, n: int, n_reference: int, adapter: Path | None = None,
                 key: dict | None = None) -> dict | None:
    """The scores and gates kept in ``arm_dir/scores.json``, if they were written for the arm's adapter as it
    is now and for these sample counts (``key``, when the caller has it); else None (the arm is unfinished, or
    changed since it was scored)."""
    adapter = adapter if adapter is not None else arm_dir / "adapter"
    cache = arm_dir / "scores.json"
    if not (cache.is_file() and (adapter / "tsm_adapter.safetensors").is_file()):
        return None
    saved = json.loads(cache.read_text())
    return saved["scores"] if saved.get("key") == (key or _score_key(adapter, n, n_reference)) else None


def scored_arm(seed_dir: Path, arm_dir: Path, adapter: Path, extractor, ref_feats, teacher_feats, n: int,
               n_reference: int, device="cpu") -> dict:
    """An arm's scores (``score_arm``) and gates (``gate_summary``): ``saved_scores`` when they are current,
    else computed (minutes on a CPU) and written to ``arm_dir/scores.json``."""
    key = _score_key(adapter, n, n_reference)
    saved = saved_scores(arm_dir, n, n_reference, adapter, key)
    if saved is not None:
        return saved
    scores = score_arm(seed_dir, adapter, extractor, ref_feats, teacher_feats, n, device)
    scores["gates"] = gate_summary(seed_dir / "teacher", adapter, list(_seed_recipe(seed_dir).student_timesteps),
                                   device)
    # Atomic: a killed sweep leaves the old file or the new one, never half of one.
    atomic_write_text(arm_dir / "scores.json", json.dumps({"key": key, "scores": scores}, indent=2, default=float)
                      + "\n")
    return scores


def sign_consistency(per_seed: list[dict[str, list[float]]]) -> dict[str, float]:
    """Per layer (and context expert), the share of seeds whose mean gate has the majority's sign."""
    out = {}
    for layer in per_seed[0]:
        for j in range(len(per_seed[0][layer])):
            signs = [math.copysign(1.0, g[layer][j]) for g in per_seed if layer in g]
            out[f"{layer}[{j}]"] = max(signs.count(1.0), signs.count(-1.0)) / len(signs)
    return out


def layer_gates(per_seed: list[dict[str, list[float]]]) -> dict[str, dict]:
    """Per layer (and context expert), over seeds: the mean gate, its spread (std; None for one seed) and the
    share of seeds with the majority's sign (None for one seed)."""
    consistency = sign_consistency(per_seed) if len(per_seed) > 1 else {}
    out = {}
    for layer in per_seed[0]:
        for j in range(len(per_seed[0][layer])):
            mean, std = mean_std([g[layer][j] for g in per_seed if layer in g])
            out[f"{layer}[{j}]"] = {"mean": mean, "std": std, "sign_consistency": consistency.get(f"{layer}[{j}]")}
    return out


def summarise(arms: dict[str, list[dict]]) -> dict:
    """Per arm over seeds: FID, the paired difference to each seed's stage 1, gate mean/spread/consistency
    (averaged over layers, and per layer in ``gates_per_layer``)."""
    out = {}
    for name, runs in arms.items():
        diffs = [r["fid"] - r["stage1_fid"] for r in runs]
        mean, std = mean_std(diffs)
        layer_means = [np.mean([v for vals in r["gates"].values() for v in vals]) for r in runs]
        spread = [np.std([np.mean(vals) for vals in r["gates"].values()]) for r in runs]
        per_layer = layer_gates([r["gates"] for r in runs])
        consistency = [g["sign_consistency"] for g in per_layer.values() if g["sign_consistency"] is not None]
        out[name] = {"n_seeds": len(runs), "fid_mean": mean_std([r["fid"] for r in runs])[0],
                     "stage2_minus_stage1": {"mean": mean, "std": std, "ci95_t": t_interval(diffs),
                                             "per_seed": diffs, "wins": sum(d < 0 for d in diffs)},
                     "fid_teacher_mean": mean_std([r["fid_teacher"] for r in runs])[0],
                     "gate_mean": float(np.mean(layer_means)), "gate_spread_over_layers": float(np.mean(spread)),
                     "gate_sign_consistency": float(np.mean(consistency)) if consistency else None,
                     "gates_per_layer": per_layer}
    return out


def run(out_dir: Path, seed_dirs: list[Path], lrs=LRS, updates=UPDATES, contexts=CONTEXTS, device="cpu",
        report_only: bool = False) -> dict:
    """Every arm on every seed (finished arms and their scores are reused, stopped ones resume); writes the
    report after every arm and returns it.

    With ``report_only`` nothing is trained or scored: the report holds the arms whose scores are saved and
    current, and lists the others under ``not_finished`` (to publish a sweep that is still running).
    """
    from .scores import stage1_adapter, teacher_features

    extractor = None if report_only else ev.make_extractor(device=device)
    arms: dict[str, list[dict]] = {}
    not_finished: list[str] = []
    for seed_dir in map(Path, seed_dirs):
        results = read_results(seed_dir)
        rows = keyed_rows(results or {})
        if "tsm_stage1" not in rows:
            raise FileNotFoundError(f"{seed_dir} holds no finished tsm-demo seed (results.json with TSM stage 1)")
        n, n_reference = int(results["n"]), int(results.get("n_reference", 1000))
        if not report_only:
            ref_feats, _ = ev.reference_features(extractor, n_reference)
            teacher_feats, _ = teacher_features(extractor, seed_dir / "teacher", n, device=device)
            recipe = _seed_recipe(seed_dir)
            critic_from = stage1_checkpoint(seed_dir / "tsm", recipe)
            n2 = None
            if any(2 in c for c in contexts):
                # A fresh fake score, as any DMD2 run starts: the n = 2 experts start at zero, i.e. from the teacher.
                n2 = train_arm(n2_recipe(seed_dir), seed_dir / "router" / "n2", None)
        stage1_dir = stage1_adapter(seed_dir / "tsm")
        for lr in lrs:
            for g in updates:
                for context in contexts:
                    name = arm_name(lr, g, tuple(context))
                    arm_dir = seed_dir / "router" / name
                    if report_only:
                        scores = saved_scores(arm_dir, n, n_reference)
                        if scores is None:
                            not_finished.append(f"{seed_dir.name}/{name}")
                            continue
                    else:
                        adapter = train_arm(arm_recipe(seed_dir, lr, g, tuple(context), n2), arm_dir, critic_from)
                        scores = scored_arm(seed_dir, arm_dir, adapter, extractor, ref_feats, teacher_feats, n,
                                            n_reference, device)
                    arms.setdefault(name, []).append(dict(
                        scores, seed=seed_of(results), lr=lr, generator_updates=g, context=list(context),
                        stage1_fid=rows["tsm_stage1"]["fid"], stage1_source=str(stage1_dir)))
                    if not report_only:
                        # Written after every arm, so a sweep stopped part-way leaves what it has finished.
                        write_report(out_dir, arms, seed_dirs)
    return write_report(out_dir, arms, seed_dirs, not_finished)


def write_report(out_dir: Path, arms: dict[str, list[dict]], seed_dirs: list[Path],
                 not_finished: list[str] = ()) -> dict:
    """Summarise the arms so far and write ``results.json`` / ``results.md`` (atomically); returns the report."""
    report = {"arms": arms, "summary": summarise(arms), "seeds": [str(s) for s in seed_dirs],
              "not_finished": list(not_finished), "definition": __doc__.split("\n\n")[1].strip()}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(out_dir / "results.md", format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = ["# Router test: stage 2 alone from frozen stage-1 students", "",
             "| arm | seeds | FID | stage 2 - stage 1 (FID) | 95% CI t | wins | FID vs teacher | gate mean | "
             "gate spread | sign consistency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        d = s["stage2_minus_stage1"]
        ci = "n/a" if d["ci95_t"] is None else f"[{d['ci95_t'][0]:.2f}, {d['ci95_t'][1]:.2f}]"
        cons = "n/a" if s["gate_sign_consistency"] is None else f"{s['gate_sign_consistency']:.2f}"
        lines.append(f"| {name} | {s['n_seeds']} | {s['fid_mean']:.2f} | {d['mean']:+.2f} | {ci} | {d['wins']} / "
                     f"{s['n_seeds']} | {s['fid_teacher_mean']:.2f} | {s['gate_mean']:+.4f} | "
                     f"{s['gate_spread_over_layers']:.4f} | {cons} |")
    if report.get("not_finished"):
        lines += ["", f"Not finished (not in the table): {', '.join(report['not_finished'])}."]
    return "\n".join(lines + ["", report["definition"], ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tsm_distill.demo.router", description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--from", dest="seed_dirs", nargs="+", required=True, help="finished tsm-demo seed folders")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--updates", type=int, nargs="+", default=list(UPDATES), help="generator updates per arm")
    p.add_argument("--contexts", nargs="+", default=["1", "1,2"], help="context scales per arm, e.g. 1 1,2")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true",
                   help="train and score nothing: report the arms already scored, list the others as not finished")
    args = p.parse_args(argv)
    contexts = [tuple(int(x) for x in c.split(",")) for c in args.contexts]
    bad = [c for c in contexts if not set(c) <= {1, 2}]
    if bad:
        raise ValueError(f"--contexts: the demo has n = 1 (LoRA) and can foster n = 2; got {bad}")
    restore = ev.limit_threads(args.threads) if args.threads else (lambda: None)
    try:
        report = run(Path(args.out_dir), args.seed_dirs, args.lrs, args.updates, contexts, ev.resolve_device(args.device),
                     report_only=args.report_only)
    finally:
        restore()
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
