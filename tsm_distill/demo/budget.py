"""The demo's budget curve: FID of the LoRA and TSM students after parts of their generator-step budget.

Issue 11 asks whether TSM's gap over LoRA grows or shrinks with training. The intermediate students come
from what each ``tsm-demo`` run already keeps, read back by global step (iterations):

* ``phases/NN_name``: the adapter at the end of every phase (both runs, always kept);
* ``checkpoints/step_S``: the generator at every 1/K of the expert budget (``tsm-demo --budget-points K``,
  default 3) and at each phase boundary.

An *equal-budget pair* is a LoRA snapshot and a TSM stage-1 snapshot at the same global step: both runs
count DMD2 iterations with the same fake-score updates per generator update F, so they have made the same
number of generator steps there (``generator_steps_at`` checks it). The last pair (the whole budget) is the
results.json rows themselves (same students, prompts, seeds and N), so it is not sampled again.

TSM snapshots are scored as stage-1 students (expert mode, no router). Its experts are fostered one
after another (999, then 749, ...), so at 1/3 of the budget the later experts are still zero and those
student steps are the plain teacher: the curve shows what sequential fostering costs part-way, which is
what a user stopping early would get.

``python -m tsm_distill.demo.budget SEED_DIR [...]`` scores finished seeds (``tsm-demo`` does it itself
after its table); points already in ``budget.json`` are kept, so a stopped evaluation resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from tsm_core.serialization import atomic_write_text
from tsm_core.train.checkpoint import CheckpointManager, step_of

from . import eval as ev

BUDGET_FILE = "budget.json"
STUDENTS = ("lora", "tsm_stage1")


# ---------------------------------------------------------------------------- snapshots
def read_phases(run_dir: str | Path) -> list[dict]:
    """The phases of a finished run, from the resolved ``recipe.yaml`` it saved."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a tsm-distill run folder")
    phases = yaml.safe_load(path.read_text())["phases"]
    for ph in phases:  # runs saved before the one-vocabulary rename (December 2026) stay readable
        if "iterations" in ph:
            ph["steps"] = ph.pop("iterations")
        if "mode" in ph:
            ph["type"] = {"expert": "foster", "mixture": "assemble"}[ph.pop("mode")]
    return phases


def generator_steps_at(phases: list[dict], global_step: int) -> int:
    """Generator steps made in the first ``global_step`` iterations (a phase updates the student at its
    iterations 0, F, 2F, ...: ceil(k / F) updates after k of them, as DMD2Trainer.train_step does)."""
    made, left = 0, global_step
    for p in phases:
        k = min(left, p["steps"])
        made += math.ceil(k / p["fake_updates_per_generator_update"])
        left -= k
        if left <= 0:
            break
    return made


def snapshots(run_dir: str | Path, phases: list[dict] | None = None) -> dict[int, Path]:
    """Every saved student of a run's foster (stage-1) phases, by global step: phase adapters and checkpoints
    (a checkpoint at a phase boundary holds the same student as that phase's adapter; the adapter wins).
    ``phases``: the run's (`read_phases`), when the caller has read them already."""
    run_dir = Path(run_dir)
    phases = read_phases(run_dir) if phases is None else phases
    found: dict[int, Path] = {}
    end, foster_end = 0, 0
    for i, p in enumerate(phases):
        end += p["steps"]
        if p.get("type", "foster") == "foster":
            foster_end = end
            adapter = run_dir / "phases" / f"{i:02d}_{p['name']}"
            if adapter.is_dir():
                found[end] = adapter
    for ckpt in CheckpointManager(run_dir, keep_last=None).all():  # complete ones only
        step = step_of(ckpt)
        if step <= foster_end and step not in found and (ckpt / "generator.safetensors").is_file():
            found[step] = ckpt
    return dict(sorted(found.items()))


def equal_budget_pairs(seed_dir: str | Path) -> list[dict]:
    """Global steps where a tsm-demo run's ``lora/`` and ``tsm/`` both have a snapshot, with the generator
    steps each had made there and the snapshots' paths relative to ``seed_dir``.

    Raises:
        ValueError: the runs made different generator steps by the same global step (unequal F).
    """
    seed_dir = Path(seed_dir)
    lora_phases, tsm_phases = read_phases(seed_dir / "lora"), read_phases(seed_dir / "tsm")
    lora, tsm = snapshots(seed_dir / "lora", lora_phases), snapshots(seed_dir / "tsm", tsm_phases)
    total = generator_steps_at(lora_phases, sum(p["steps"] for p in lora_phases))
    pairs = []
    for step in sorted(set(lora) & set(tsm)):
        g_lora, g_tsm = generator_steps_at(lora_phases, step), generator_steps_at(tsm_phases, step)
        if g_lora != g_tsm:
            raise ValueError(f"at iteration {step} the LoRA run made {g_lora} generator steps and the TSM run "
                             f"{g_tsm}: the recipes' fake_updates_per_generator_update differ, so equal "
                             "iterations are not an equal budget")
        pairs.append({"global_step": step, "generator_steps": g_lora, "fraction": round(g_lora / total, 4),
                      "sources": {"lora": str(lora[step].relative_to(seed_dir)),
                                  "tsm_stage1": str(tsm[step].relative_to(seed_dir))}})
    return pairs


def load_snapshot(teacher_path: str | Path, run_dir: str | Path, source: str | Path, device: torch.device | str = "cpu"):
    """The student a snapshot holds, as (teacher, tsm) on ``device`` in its stage-1 mode.

    A phase adapter loads as saved. A checkpoint holds only tensors: the run's first phase adapter gives
    the structure and mode (expert mode for TSM, the single scale for LoRA), then the checkpoint's
    generator tensors replace its own.
    """
    from safetensors.torch import load_file

    from ..trainer import load_student

    source = Path(source)
    if (source / "generator.safetensors").is_file():
        first = sorted((Path(run_dir) / "phases").iterdir())[0]
        teacher, tsm = load_student(teacher_path, first, device)
        tsm.load_state_dict(load_file(source / "generator.safetensors", device="cpu"))  # copied onto the device
        return teacher, tsm
    return load_student(teacher_path, source, device)


# ---------------------------------------------------------------------------- scoring
def _final_scores(results: dict) -> dict[str, dict]:
    from .results import keyed_rows

    rows = keyed_rows(results)
    return {k: {"fid": rows[k]["fid"], "kid": rows[k]["kid_mean"]} for k in STUDENTS}


def select_pairs(pairs: list[dict], at: list[int] | None) -> list[dict]:
    """The pairs at the generator-step counts ``at`` (None: all), always with the whole-budget pair last.

    Raises:
        ValueError: a count in ``at`` has no pair (the message lists the ones there are).
    """
    if at is None:
        return pairs
    have = {p["generator_steps"] for p in pairs}
    missing = sorted(set(at) - have)
    if missing:
        raise ValueError(f"no equal-budget pair at {missing} generator steps; the runs have pairs at {sorted(have)}")
    return [p for p in pairs if p["generator_steps"] in set(at) or p["fraction"] == 1.0]


def budget_curve(seed_dir: str | Path, extractor=None, progress: bool = True, at: list[int] | None = None,
                 device: str | torch.device = "cpu") -> dict:
    """Score the equal-budget pairs of a finished tsm-demo run and write ``seed_dir/budget.json``.

    Uses the run's N, reference set, prompts and seeds (results.json), so the points compare with its
    table. Points already in budget.json are kept (resume); the whole-budget point is read from results.json.
    ``at``: only the pairs at these generator-step counts (and the whole budget); None: every pair.
    ``device``: where the students are sampled (and, when ``extractor`` is None, scored).
    """
    from .eval import student_images_of
    from .results import is_complete, read_results, seed_of

    seed_dir = Path(seed_dir)
    results = read_results(seed_dir)
    if not is_complete(results):
        raise FileNotFoundError(f"{seed_dir}/results.json is missing or unfinished: run tsm-demo there first")
    out = seed_dir / BUDGET_FILE
    done = {p["global_step"]: p for p in json.loads(out.read_text())["points"]} if out.is_file() else {}
    pairs = equal_budget_pairs(seed_dir)
    if pairs:
        pairs = select_pairs(pairs, at)
    if not pairs:
        raise FileNotFoundError(f"{seed_dir}: the LoRA and TSM runs keep no snapshots at a common iteration")
    teacher = seed_dir / "teacher"
    prompts, seeds = ev.eval_prompts(results["n"])
    ref_feats = None
    timesteps = yaml.safe_load((seed_dir / "lora" / "recipe.yaml").read_text())["student_timesteps"]
    record = {"seed": seed_of(results), "n": results["n"], "protocol": results.get("protocol"),
              "budget_generator_steps": results["budget"]["lora"], "points": []}
    for pair in pairs:
        step = pair["global_step"]
        if step in done:
            record["points"].append(done[step])
            continue
        if pair is pairs[-1] and pair["fraction"] == 1.0:
            record["points"].append(dict(pair, **_final_scores(results), scored="results.json"))
            continue
        if extractor is None:
            extractor = ev.make_extractor(progress, device)
        if ref_feats is None:
            ref_feats, _ = ev.reference_features(extractor, results["n_reference"])
        point = dict(pair)
        start = time.perf_counter()
        for key in STUDENTS:
            source = seed_dir / pair["sources"][key]
            student = load_snapshot(teacher, source.parents[1], source, device)
            imgs = student_images_of(*student, prompts, seeds, timesteps, desc=f"sample {key} @ {step}")
            scores = ev.score_row(ev.image_features(extractor, ev.to_uint8(imgs)), ref_feats)
            point[key] = {"fid": scores["fid"], "kid": scores["kid_mean"]}
        point["seconds"] = round(time.perf_counter() - start, 2)
        record["points"].append(point)
        atomic_write_text(out, json.dumps(record, indent=2) + "\n")  # a stopped run keeps its scored points
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    (seed_dir / "budget.md").write_text(format_curve(record))
    return record


def format_curve(record: dict) -> str:
    """budget.md: one row per equal-budget pair."""
    lines = [f"# Budget curve, seed {record['seed']} (N = {record['n']})", "",
             "| generator steps | fraction | LoRA FID | TSM stage 1 FID | TSM - LoRA | LoRA KID x1e3 | TSM KID x1e3 |",
             "|---|---|---|---|---|---|---|"]
    for p in record["points"]:
        lo, ts = p["lora"], p["tsm_stage1"]
        lines.append(f"| {p['generator_steps']} | {p['fraction']:.2f} | {lo['fid']:.2f} | {ts['fid']:.2f} | "
                     f"{ts['fid'] - lo['fid']:+.2f} | {1e3 * lo['kid']:.2f} | {1e3 * ts['kid']:.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- over seeds
def read_curves(folders) -> list[dict]:
    """The budget.json of each folder that has one (seeds scored before the curve existed have none)."""
    out = []
    for folder in map(Path, folders):
        path = folder / BUDGET_FILE
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def aggregate_curves(curves: list[dict]) -> list[dict]:
    """One entry per generator-step count that any seed scored: the seeds there, each student's mean +- std
    FID, and the paired TSM - LoRA difference (mean, intervals, wins) as demo_seeds computes it."""
    from tsm_core.eval.seeds import bootstrap_ci, mean_std, t_interval

    by_steps: dict[int, list[dict]] = {}
    for c in curves:
        for p in c["points"]:
            by_steps.setdefault(p["generator_steps"], []).append(dict(p, seed=c["seed"]))
    out = []
    for steps, points in sorted(by_steps.items()):
        points.sort(key=lambda p: p["seed"])
        diffs = [p["tsm_stage1"]["fid"] - p["lora"]["fid"] for p in points]
        entry = {"generator_steps": steps, "fraction": points[0]["fraction"], "seeds": [p["seed"] for p in points],
                 "per_seed": [{"seed": p["seed"], "lora": p["lora"]["fid"], "tsm_stage1": p["tsm_stage1"]["fid"]}
                              for p in points]}
        for key in STUDENTS:
            entry[key] = dict(zip(("fid_mean", "fid_std"), mean_std([p[key]["fid"] for p in points])))
        mean, std = mean_std(diffs)
        boot, tint = bootstrap_ci(diffs), t_interval(diffs)
        entry["tsm_stage1_minus_lora"] = {"mean": mean, "std": std, "ci95_bootstrap": list(boot) if boot else None,
                                          "ci95_t": list(tint) if tint else None,
                                          "tsm_wins": sum(d < 0 for d in diffs), "n_seeds": len(diffs)}
        out.append(entry)
    return out


def format_curves(entries: list[dict]) -> str:
    """The budget-curve section of seeds.md."""
    from tsm_core.eval.seeds import format_interval, format_pm

    lines = ["## Budget curve: equal-budget pairs (LoRA vs TSM stage 1, FID)", "",
             "Intermediate students from each run's checkpoints and phase adapters (tsm_distill/demo/budget.py). "
             "TSM fosters its experts one after another, so part-way through the budget its later experts are "
             "still zero (those student steps are the plain teacher).", "",
             "| generator steps | fraction | seeds | LoRA | TSM stage 1 | TSM - LoRA | 95% CI bootstrap | 95% CI t "
             "| TSM wins |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        d = e["tsm_stage1_minus_lora"]
        lines.append(f"| {e['generator_steps']} | {e['fraction']:.2f} | {', '.join(map(str, e['seeds']))} "
                     f"| {format_pm(e['lora']['fid_mean'], e['lora']['fid_std'])} "
                     f"| {format_pm(e['tsm_stage1']['fid_mean'], e['tsm_stage1']['fid_std'])} | {format_pm(d['mean'], d['std'])} "
                     f"| {format_interval(d['ci95_bootstrap'])} | {format_interval(d['ci95_t'])} | {d['tsm_wins']} / {d['n_seeds']} |")
    return "\n".join(lines) + "\n"


def save_curve_plot(entries: list[dict], path: str | Path) -> Path:
    """FID against generator steps: thin lines per seed, thick lines the means, for both students."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, color, label in (("lora", "C3", "DMD2 + LoRA"), ("tsm_stage1", "C0", "DMD2 + TSM stage 1")):
        seeds = sorted({s for e in entries for s in e["seeds"]})
        for seed in seeds:
            pts = [(e["generator_steps"], q[key]) for e in entries for q in e["per_seed"] if q["seed"] == seed]
            ax.plot(*zip(*pts), color=color, alpha=0.3, lw=1, marker=".")
        ax.plot([e["generator_steps"] for e in entries], [e[key]["fid_mean"] for e in entries], color=color, lw=2.5,
                marker="o", label=f"{label} (mean; thin: seeds)")
    ax.set_xlabel("generator steps (equal budget for both students)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("budget curve (a point's mean is over the seeds scored there: see seeds.md)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_distill.demo.budget SEED_DIR [...]``: the budget curve of finished tsm-demo runs."""
    p = argparse.ArgumentParser(prog="python -m tsm_distill.demo.budget", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="tsm-demo run folders (one seed each) with results.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="where students are sampled and scored: auto (the GPU when "
                   "torch sees one), cpu, cuda")
    p.add_argument("--at", type=int, nargs="+", default=None,
                   help="score only the pairs at these generator-step counts (the whole budget always comes "
                        "from results.json); default: every pair")
    args = p.parse_args(argv)
    restore = ev.limit_threads(args.threads) if args.threads else (lambda: None)
    try:
        device = ev.resolve_device(args.device)
        for folder in args.folders:
            record = budget_curve(folder, at=args.at, device=device)
            print(format_curve(record))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        restore()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
