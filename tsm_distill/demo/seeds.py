"""``tsm-demo`` over several training seeds: the resumable sweep and its paired statistics.

``tsm-demo --seeds 0 1 2 3 4 --jobs 2`` runs each seed as its own ``python -m tsm_distill.demo --seed N``
subprocess with the output folder ``<run-dir>/seed<N>/`` (log: ``demo.log`` there). A seed whose
``results.json`` already holds the three student rows is skipped, so a stopped sweep resumes; a seed
that fails is named at the end and the others still run. Then ``seeds.json``, ``seeds.md`` and
``seeds.png`` go into ``<run-dir>``.

Rebuild the aggregate from existing folders (for instance runs of the single-seed command)::

    python -m tsm_distill.demo.seeds aggregate OUT_DIR                 # reads OUT_DIR/seed*/results.json
    python -m tsm_distill.demo.seeds aggregate OUT_DIR --from A B C    # reads A/, B/, C/results.json

Statistics, all over seeds (a seed is one whole training run of both students):

* every row's mean and sample standard deviation (ddof 1);
* per seed the paired difference TSM - LoRA in FID (negative: TSM better), both for stage 2 (router)
  and stage 1 (experts); the mean difference with a 95% percentile-bootstrap interval (resampling
  seeds, fixed generator seed) and Student's t interval beside it, because with five seeds the
  bootstrap interval is too narrow (it never reaches past the observed differences); the number of
  seeds in which TSM has the lower FID;
* the ratio mean(TSM) / mean(LoRA) (the paper's 9.90 / 14.58 = 0.68).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tsm_core.eval.seeds import (  # noqa: F401
    BOOT_SEED,
    LEVEL,
    RESAMPLES,
    bootstrap_ci,
    format_interval,
    format_pm,
    mean_std,
    paired,
    row_summary,
    t_interval,
)
from tsm_core.train.sweep import check_seeds, run_logged, run_seeds

# Re-exported: callers (tests, tools) read one seed's results and the statistics through here.
from .results import (  # noqa: F401
    ROW_NAMES,
    STUDENTS,
    TEACHER_FULL_PREFIX,
    is_complete,
    keyed_rows,
    read_results,
    row_key,
    seed_of,
    trained_students,
)

DMD_ONLY_ROWS = ("lora_dmd_only", "tsm_stage1_dmd_only")  # scores.py: each student before its GAN training
ROW_ORDER = ("floor", "teacher_full", "teacher_few", *STUDENTS, *DMD_ONLY_ROWS)
PAIRS = (("tsm_stage2", "lora"), ("tsm_stage1", "lora"))  # seeds.json's paired["<tsm>_minus_<lora>"]
PAIR_LABELS = {"tsm_stage2": "TSM stage 2 - LoRA", "tsm_stage1": "TSM stage 1 - LoRA"}
TEACHER_SUFFIX = "_teacher"  # "<row>_teacher": the row's FID against the teacher's samples (scores.py)
EXTRA_PAIRS = {("tsm_stage1_dmd_only", "lora_dmd_only"): "DMD only: TSM stage 1 - LoRA",
               ("tsm_stage2_teacher", "lora_teacher"): "vs teacher: TSM stage 2 - LoRA",
               ("tsm_stage1_teacher", "lora_teacher"): "vs teacher: TSM stage 1 - LoRA"}
"""Paired comparisons made when every seed has both rows (seeds scored by scores.py)."""
PROTOCOL_LABELS = {1: "equal compute", 4: "LoRA at 4x batch, equal generator steps (A.3's batch ratio only)"}
A3P_LABEL = "A.3-proportional (A.3's phase lengths and batch ratios, scaled; LoRA at 4x batch)"
CAPACITY_LABEL = "capacity parity (LoRA at TSM stage 1's parameter count; equal compute)"
SEED_FOLDER = re.compile(r"seed(\d+)")
# Options of tsm-demo that the sweep sets per seed itself instead of passing them through.
SWEEP_ONLY = ("seeds", "jobs", "seed", "run_dir")


# ---------------------------------------------------------------------------- one seed's results
def protocol(lora_batch_multiplier: int, name: str = "recipe") -> dict:
    """The comparison's protocol as results.json and seeds.json record it: ``name`` (``recipe``: the recipes'
    phase lengths, ``a3p``: A.3-proportional, see ``tsm_distill.demo.protocol``), LoRA's batch multiplier, a label.

    Until December 2026 multiplier 4 under the recipes' lengths was labelled "paper A.3 protocol"; it gives
    both students the same iterations, which A.3 does not, so it is now named for what it is.
    """
    if not isinstance(lora_batch_multiplier, int) or lora_batch_multiplier < 1:
        raise ValueError(f"the LoRA batch multiplier must be an integer >= 1, got {lora_batch_multiplier!r}")
    if name == "a3p":
        label = A3P_LABEL
    elif name == "capacity":
        label = CAPACITY_LABEL
    elif name == "recipe":
        label = PROTOCOL_LABELS.get(lora_batch_multiplier, f"LoRA at {lora_batch_multiplier}x batch")
    else:
        raise ValueError(f"unknown protocol {name!r}: recipe, a3p or capacity")
    return {"name": name, "lora_batch_multiplier": lora_batch_multiplier, "label": label}


def protocol_of(results: dict) -> dict:
    """The protocol a results.json ran (results from before the field existed ran equal compute)."""
    recorded = results.get("protocol", {})
    return protocol(int(recorded.get("lora_batch_multiplier", 1)), recorded.get("name", "recipe"))


def seed_record(results: dict) -> dict:
    """One entry of seeds.json's ``seeds``: seed, N, FID of each known row and its KID as ``<row>_kid``."""
    if not is_complete(results):
        raise ValueError("the results lack a student row (LoRA, TSM stage 1 or stage 2): the seed did not finish")
    if trained_students(results) != STUDENTS:
        raise ValueError("this run trained only the LoRA student (--students lora, the capacity-parity arm): pair it "
                         "with an equal-compute run of the same seed (python -m tsm_distill.demo.seeds capacity)")
    rows = keyed_rows(results)
    record = {"seed": seed_of(results), "n": int(results.get("n", rows["lora"]["n"]))}
    for key in ROW_ORDER:
        if key in rows:
            record[key] = float(rows[key]["fid"])
            record[f"{key}_kid"] = float(rows[key]["kid_mean"])
            if "fid_teacher" in rows[key]:  # fidelity to the teacher (scores.py), kept as a row of its own
                record[f"{key}{TEACHER_SUFFIX}"] = float(rows[key]["fid_teacher"])
                record[f"{key}{TEACHER_SUFFIX}_kid"] = float(rows[key]["kid_teacher"])
    proto = protocol_of(results)
    record["lora_batch_multiplier"], record["protocol"] = proto["lora_batch_multiplier"], proto["name"]
    if "students" in results:  # iterations, generator updates, samples, parameters per student
        record["students"] = results["students"]
    return record


def settings(results: dict) -> dict:
    """What must be equal across seeds for their FIDs to be averaged (absent fields are not compared)."""
    budget = results.get("budget", {})
    out = {"n": results.get("n"), "n_reference": results.get("n_reference"),
           "teacher_unet_sha256": results.get("teacher_unet_sha256"),
           "lora_batch_multiplier": protocol_of(results)["lora_batch_multiplier"],
           "protocol": protocol_of(results)["name"],
           "lr_scale": results.get("lr_scale", 1.0)}  # runs before --lr-scale existed used the recipes' rates
    out |= {f"budget.{k}": budget.get(k) for k in ("lora", "tsm_stage1", "tsm_stage2_router")}
    return {k: v for k, v in out.items() if v is not None}


def check_comparable(results_list: Sequence[dict], names: Sequence[str]) -> None:
    """Refuse to average seeds that differ in N, reference set, teacher, protocol or budget."""
    for field in dict.fromkeys(k for r in results_list for k in settings(r)):
        values = {name: settings(r).get(field) for name, r in zip(names, results_list)}
        if len(set(map(json.dumps, values.values()))) > 1:
            raise ValueError(f"the seeds differ in {field} ({values}): their FIDs cannot be averaged; "
                             "aggregate each setting on its own")


# ---------------------------------------------------------------------------- statistics
def aggregate(results_list: Sequence[dict], sources: Sequence[str] | None = None, resamples: int = RESAMPLES,
              boot_seed: int = BOOT_SEED) -> dict:
    """seeds.json from per-seed results.json dicts (pure: no files). Raises on duplicate or mixed seeds."""
    if not results_list:
        raise ValueError("no finished seed to aggregate")
    sources = list(sources) if sources is not None else [f"results {i}" for i in range(len(results_list))]
    check_comparable(results_list, sources)
    records = [dict(seed_record(r), source=s) for r, s in zip(results_list, sources)]
    seeds = [r["seed"] for r in records]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice ({sorted(seeds)}; sources {sources}): each seed counts once")
    records.sort(key=lambda r: r["seed"])
    names = {k: r["row"] for res in results_list for k, r in keyed_rows(res).items()}
    # A reference row (floor, teacher) missing from one seed's results is left out of the means.
    present = [k for k in ROW_ORDER if all(k in r for r in records)]
    present += [f"{k}{TEACHER_SUFFIX}" for k in ROW_ORDER if all(f"{k}{TEACHER_SUFFIX}" in r for r in records)]
    names |= {f"{k}{TEACHER_SUFFIX}": f"{names[k]} vs teacher samples" for k in ROW_ORDER if k in names}
    rows = {k: dict(row_summary(records, k), name=names[k]) for k in present}
    extra = {f"{tsm}_minus_{lora}": dict(paired(records, tsm, lora, resamples, boot_seed), label=label,
                                         ratio=rows[tsm]["fid_mean"] / rows[lora]["fid_mean"])
             for (tsm, lora), label in EXTRA_PAIRS.items() if tsm in rows and lora in rows}
    return {"protocol": protocol(records[0]["lora_batch_multiplier"], records[0]["protocol"]), "lr_scale": settings(results_list[0])["lr_scale"],
            "n": records[0]["n"],
            "n_seeds": len(records), "seeds": records, "rows": rows,
            "paired": {f"{tsm}_minus_{lora}": paired(records, tsm, lora, resamples, boot_seed) for tsm, lora in PAIRS},
            "ratio": {f"{tsm}_over_{lora}": rows[tsm]["fid_mean"] / rows[lora]["fid_mean"] for tsm, lora in PAIRS},
            "paired_extra": extra,
            "bootstrap": {"method": "percentile", "resamples": resamples, "seed": boot_seed, "level": LEVEL,
                          "unit": "seed (both students of a seed resampled together: paired)"}}


# ---------------------------------------------------------------------------- seeds.md / seeds.png
def format_markdown(agg: dict) -> str:
    """seeds.md: per-seed FIDs, mean +- std of every row, the paired differences and the ratios."""
    proto = agg["protocol"]
    seeds = agg["seeds"]
    lr = agg.get("lr_scale", 1.0)
    lr_text = "" if lr == 1 else f"; both students' generator learning rates x{lr:g} of the recipes'"
    lines = [f"# tsm-demo over {agg['n_seeds']} seeds: {proto['label']}", "",
             f"Protocol: {proto['label']} (LoRA batch x{proto['lora_batch_multiplier']} of TSM's{lr_text}). "
             f"N = {agg['n']} images per FID row; seeds {', '.join(str(r['seed']) for r in seeds)}. Lower is better.",
             "", "## Per seed (FID; KID x1e3 in brackets)", "",
             "| seed | LoRA | TSM stage 1 | TSM stage 2 | stage 2 - LoRA | stage 1 - LoRA |", "|---|---|---|---|---|---|"]
    for r in seeds:
        cells = [f"{r[k]:.2f} ({1e3 * r[f'{k}_kid']:.2f})" for k in STUDENTS]
        lines.append(f"| {r['seed']} | {' | '.join(cells)} | {r['tsm_stage2'] - r['lora']:+.2f} "
                     f"| {r['tsm_stage1'] - r['lora']:+.2f} |")
    lines += ["", "## Mean +- std over seeds (sample std, ddof 1)", "", "| row | FID | KID x1e3 |", "|---|---|---|"]
    for s in agg["rows"].values():
        lines.append(f"| {s['name']} | {format_pm(s['fid_mean'], s['fid_std'])} | {format_pm(s['kid_mean'], s['kid_std'], 1e3)} |")
    lines += ["", "## Paired: TSM - LoRA per seed (FID; negative = TSM better)", "",
              "| comparison | mean diff +- std | 95% CI bootstrap | 95% CI t | TSM wins (FID) | mean KID diff x1e3 "
              "| TSM wins (KID) | mean(TSM) / mean(LoRA) |", "|---|---|---|---|---|---|---|---|"]
    for tsm, lora in PAIRS:
        p = agg["paired"][f"{tsm}_minus_{lora}"]
        lines.append(f"| {PAIR_LABELS[tsm]} | {format_pm(p['mean'], p['std'])} | {format_interval(p['ci95_bootstrap'])} | {format_interval(p['ci95_t'])} "
                     f"| {p['tsm_wins']} / {p['n_seeds']} | {1e3 * p['kid_mean_diff']:+.2f} "
                     f"| {p['kid_tsm_wins']} / {p['n_seeds']} | {agg['ratio'][f'{tsm}_over_{lora}']:.3f} |")
    students = seeds[0].get("students")
    if students:  # the same for every seed of one protocol (check_comparable holds the budget equal)
        lines += ["", "## What each student trained (seed " + str(seeds[0]["seed"]) + ")", "",
                  "| student | iterations | generator updates | samples | trainable parameters |", "|---|---|---|---|---|"]
        for key, st in students.items():
            lines.append(f"| {key} | {st.get('iterations', '')} | {st.get('generator_updates', '')} | "
                         f"{st.get('samples', '')} | {st.get('trainable_parameters', '')} |")
    if agg.get("paired_extra"):
        lines += ["", "## Paired: fidelity to the teacher and the DMD-only students (FID; negative = TSM better)", "",
                  "| comparison | mean diff +- std | 95% CI t | TSM wins (FID) | mean(TSM) / mean(LoRA) |",
                  "|---|---|---|---|---|"]
        for p in agg["paired_extra"].values():
            lines.append(f"| {p['label']} | {format_pm(p['mean'], p['std'])} | {format_interval(p['ci95_t'])} "
                         f"| {p['tsm_wins']} / {p['n_seeds']} | {p['ratio']:.3f} |")
    b = agg["bootstrap"]
    lines += ["", f"Bootstrap: {b['method']}, {b['resamples']} resamples of the seeds (numpy generator seed "
              f"{b['seed']}), paired. With few seeds the percentile bootstrap is too narrow (its interval never "
              "reaches past the observed differences); the t interval assumes normally distributed differences.",
              "", f"Stage-2 interval entirely below zero (bootstrap): "
              f"{'yes' if agg['paired']['tsm_stage2_minus_lora']['ci95_bootstrap_below_zero'] else 'no'}."]
    if agg.get("missing"):
        lines += ["", f"**Missing (not finished, not counted):** {', '.join(map(str, agg['missing']))}"]
    lines += ["", "Sources: " + ", ".join(f"seed {r['seed']}: `{r['source']}`" for r in seeds), ""]
    return "\n".join(lines)


def save_seed_plot(agg: dict, path: str | Path) -> Path:
    """Left: FID per seed and student, each seed's points joined. Right: paired differences with the mean's CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(STUDENTS))
    for i, r in enumerate(agg["seeds"]):
        left.plot(xs, [r[k] for k in STUDENTS], marker="o", color=f"C{i % 10}", label=f"seed {r['seed']}")
    means = [agg["rows"][k]["fid_mean"] for k in STUDENTS]
    stds = [agg["rows"][k]["fid_std"] or 0.0 for k in STUDENTS]
    left.errorbar([x + 0.12 for x in xs], means, yerr=stds, fmt="s", color="black", capsize=4, label="mean +- std")
    for key, style in (("teacher_full", "--"), ("teacher_few", ":")):
        if key in agg["rows"]:
            left.axhline(agg["rows"][key]["fid_mean"], color="grey", ls=style, lw=1, label=agg["rows"][key]["name"])
    left.set_xticks(list(xs), ["LoRA", "TSM stage 1", "TSM stage 2"])
    left.set_ylabel(f"FID (N = {agg['n']}, lower is better)")
    left.set_title(f"per seed: {agg['protocol']['label']}")
    left.legend(fontsize=7)
    for j, (tsm, lora) in enumerate(PAIRS):
        p = agg["paired"][f"{tsm}_minus_{lora}"]
        right.scatter([j] * p["n_seeds"], [d["fid_diff"] for d in p["per_seed"]], color="C0", alpha=0.7)
        ci = p["ci95_bootstrap"] or [p["mean"], p["mean"]]
        right.errorbar([j + 0.15], [p["mean"]], yerr=[[p["mean"] - ci[0]], [ci[1] - p["mean"]]], fmt="s",
                       color="black", capsize=4)
    right.axhline(0, color="grey", lw=1)
    right.set_xlim(-0.5, len(PAIRS) - 0.5)
    right.set_xticks(range(len(PAIRS)), [PAIR_LABELS[tsm] for tsm, _ in PAIRS], fontsize=8)
    right.set_ylabel("paired FID difference (< 0: TSM better)")
    right.set_title("per seed, and mean with bootstrap 95% CI")
    from .report import save_figure

    return save_figure(fig, path)


# ---------------------------------------------------------------------------- folders
def seed_folder(run_dir: str | Path, seed: int) -> Path:
    """Where the sweep puts one seed's outputs."""
    return Path(run_dir) / f"seed{seed}"


def find_seed_folders(run_dir: str | Path) -> list[Path]:
    """The ``seed<N>`` subfolders of a sweep's run folder, by seed."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and SEED_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(SEED_FOLDER.fullmatch(p.name).group(1)))


def read_folders(folders: Sequence[str | Path]) -> tuple[list[dict], list[str], list[str]]:
    """Finished results of the folders, their paths, and the folders without finished results."""
    results, sources, missing = [], [], []
    for folder in map(Path, folders):
        res = read_results(folder)
        if not is_complete(res):
            missing.append(str(folder))
            continue
        named = SEED_FOLDER.fullmatch(folder.name)
        if named and int(named.group(1)) != seed_of(res):
            raise ValueError(f"{folder} holds the results of seed {seed_of(res)}, not of seed {named.group(1)}")
        results.append(res)
        sources.append(str(folder))
    return results, sources, missing


def write_aggregate(out_dir: str | Path, results_list: Sequence[dict], sources: Sequence[str],
                    missing: Sequence = ()) -> list[Path]:
    """Write seeds.json, seeds.md and seeds.png into ``out_dir``; returns their paths."""
    agg = aggregate(results_list, sources)
    agg["missing"] = list(missing)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "seeds.json", out_dir / "seeds.md"
    from . import budget as demo_budget

    curve = demo_budget.aggregate_curves(demo_budget.read_curves(sources))
    if curve:
        agg["budget_curve"] = curve
    js.write_text(json.dumps(agg, indent=2) + "\n")
    md.write_text(format_markdown(agg) + (f"\n{demo_budget.format_curves(curve)}" if curve else ""))
    paths = [js, md, save_seed_plot(agg, out_dir / "seeds.png")]
    if curve:
        paths.append(demo_budget.save_curve_plot(curve, out_dir / "budget.png"))
    return paths


# ---------------------------------------------------------------------------- the sweep
def passthrough_args(argv: Sequence[str]) -> list[str]:
    """The sweep's tsm-demo options that every seed's subprocess gets (all but seeds, jobs, seed, run dir).

    Only options given a non-default value are passed, so each subprocess fills in the same presets
    (--quick's N and budgets) as a single-seed run; an option added to tsm-demo later passes through too.
    """
    from .options import build_parser

    parser = build_parser()
    raw = parser.parse_args(list(argv))
    out: list[str] = []
    for dest, value in vars(raw).items():
        if dest in SWEEP_ONLY or value == parser.get_default(dest):
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def seed_command(seed: int, folder: Path, child_args: Sequence[str]) -> list[str]:
    """The command line of one seed's run: the single-seed tsm-demo with its own seed and folder."""
    return [sys.executable, "-m", "tsm_distill.demo", *child_args, "--seed", str(seed), "--run-dir", str(folder)]


def run_seed(seed: int, folder: Path, child_args: Sequence[str], threads: int) -> int:
    """Run one seed as a subprocess, its output appended to ``folder/demo.log``; returns its exit status."""
    return run_logged(seed_command(seed, folder, child_args), folder / "demo.log", threads)


def split_done(run_dir: Path, seeds: Sequence[int]) -> tuple[list[int], list[int]]:
    """Seeds whose folder already holds finished results (skipped), and the seeds still to run."""
    done = [s for s in seeds if is_complete(read_results(seed_folder(run_dir, s)))]
    return done, [s for s in seeds if s not in done]


def run_pending(run_dir: Path, seeds: Sequence[int], child_args: Sequence[str], jobs: int, threads: int) -> list[int]:
    """Run the seeds, ``jobs`` at a time; returns the seeds that failed (non-zero exit or no finished results)."""
    return run_seeds(seeds, lambda s: run_seed(s, seed_folder(run_dir, s), child_args, threads),
                     lambda s: is_complete(read_results(seed_folder(run_dir, s))),
                     lambda s: seed_folder(run_dir, s) / "demo.log", jobs)


def run_sweep(args, argv: Sequence[str], extra_args: Sequence[str] = ()) -> int:
    """``tsm-demo --seeds ...``: run the unfinished seeds, then write the aggregate; 0 when every seed finished.

    ``extra_args`` are appended to every seed's command line (for options the sweep's parser lacks).
    """
    seeds = check_seeds(args.seeds)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    done, pending = split_done(run_dir, seeds)
    if done:
        print(f"skipped seeds {', '.join(map(str, done))}: their results.json already holds the student rows",
              flush=True)
    child_args = [*passthrough_args(argv), *extra_args]
    failed = run_pending(run_dir, pending, child_args, args.jobs, args.threads) if pending else []
    folders = [seed_folder(run_dir, s) for s in seeds]
    if getattr(args, "students", "all") != "all":
        print("LoRA-only seeds: pair them with equal-compute seeds: python -m tsm_distill.demo.seeds capacity "
              f"OUT --lora {' '.join(map(str, folders))} --equal EQUAL_SEED_DIRS ...", flush=True)
        return 1 if failed else 0
    results, sources, missing = read_folders(folders)
    if results:
        paths = write_aggregate(run_dir, results, sources, missing)
        print(f"aggregate over {len(results)} seed(s): {', '.join(map(str, paths))}")
    else:
        print("no seed has finished: no aggregate written", file=sys.stderr)
    if failed:
        logs = ", ".join(str(seed_folder(run_dir, s) / "demo.log") for s in failed)
        print(f"FAILED seeds: {', '.join(map(str, failed))} (logs: {logs}); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0 if results else 1


# ---------------------------------------------------------------------------- capacity parity
def capacity_pair(lora_only: dict, equal: dict) -> dict:
    """One seed of the capacity-parity arm as a results dict the aggregate reads: the LoRA student (and its
    DMD-only row) of a ``--students lora --lora-rank R`` run, the TSM students of an equal-compute run of the
    same seed. Refused unless both ran the same seed, N, reference, teacher, generator steps and rates."""
    if trained_students(lora_only) != ("lora",) or trained_students(equal) != STUDENTS:
        raise ValueError("capacity pairs a --students lora run with an equal-compute run of both students")
    names = ("the LoRA-only run", "the equal-compute run")
    if seed_of(lora_only) != seed_of(equal):
        raise ValueError(f"seeds differ: {names[0]} ran seed {seed_of(lora_only)}, {names[1]} seed {seed_of(equal)}")
    check_comparable([lora_only, equal], names)
    if protocol_of(equal)["name"] != "recipe" or protocol_of(equal)["lora_batch_multiplier"] != 1:
        raise ValueError(f"{names[1]} ran {protocol_of(equal)['label']}, not equal compute")
    lora_rows = {k: r for k, r in keyed_rows(lora_only).items() if k not in ("tsm_stage1", "tsm_stage2")}
    tsm_rows = {k: r for k, r in keyed_rows(equal).items() if k.startswith("tsm_")}
    students = dict(equal.get("students", {})) | {"lora": lora_only.get("students", {}).get("lora", {})}
    return {"rows": list(lora_rows.values()) + list(tsm_rows.values()), "seed": seed_of(lora_only),
            "n": lora_only.get("n"), "n_reference": lora_only.get("n_reference"),
            "teacher_unet_sha256": lora_only.get("teacher_unet_sha256"), "budget": lora_only.get("budget", {}),
            "lr_scale": lora_only.get("lr_scale", 1.0), "protocol": protocol(1, "capacity"), "students": students}


def write_capacity(out_dir: str | Path, lora_folders: Sequence[str | Path], equal_folders: Sequence[str | Path]) -> list[Path]:
    """seeds.json/md/png of the capacity-parity arm: each LoRA-only seed paired with the equal-compute folder
    of the same seed."""
    equal = {}
    for folder in equal_folders:
        res = read_results(folder)
        if is_complete(res) and trained_students(res) == STUDENTS:
            equal[seed_of(res)] = (res, str(folder))
    pairs, sources, missing = [], [], []
    for folder in lora_folders:
        res = read_results(folder)
        if not is_complete(res):
            missing.append(str(folder))
            continue
        if seed_of(res) not in equal:
            raise ValueError(f"no equal-compute results of seed {seed_of(res)} among {list(map(str, equal_folders))}")
        other, other_source = equal[seed_of(res)]
        pairs.append(capacity_pair(res, other))
        sources.append(f"{folder} + {other_source}")
    if not pairs:
        raise ValueError(f"no finished LoRA-only seed in {list(map(str, lora_folders))}")
    return write_aggregate(out_dir, pairs, sources, missing)


# ---------------------------------------------------------------------------- standalone aggregate
def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_distill.demo.seeds aggregate OUT_DIR [--from DIR ...]``: rebuild seeds.json/md/png."""
    p = argparse.ArgumentParser(prog="python -m tsm_distill.demo.seeds", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    agg = sub.add_parser("aggregate", help="write seeds.json, seeds.md and seeds.png from per-seed folders")
    agg.add_argument("out_dir", help="where to write; also where seed<N>/ folders are read when --from is absent")
    agg.add_argument("--from", dest="folders", nargs="+", default=None,
                     help="folders each holding one seed's results.json (e.g. single-seed tsm-demo runs)")
    cap = sub.add_parser("capacity", help="pair LoRA-only seeds (--students lora --lora-rank R) with equal-compute "
                                          "seeds and write their aggregate")
    cap.add_argument("out_dir")
    cap.add_argument("--lora", nargs="+", required=True, help="LoRA-only seed folders")
    cap.add_argument("--equal", nargs="+", required=True, help="equal-compute seed folders (both students)")
    args = p.parse_args(argv)
    if args.command == "capacity":
        paths = write_capacity(args.out_dir, args.lora, args.equal)
        print(f"capacity-parity aggregate: {', '.join(map(str, paths))}")
        return 0
    out_dir = Path(args.out_dir)
    if args.folders is None and not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir} does not exist: pass a sweep's run folder or --from DIR ...")
    folders = args.folders if args.folders is not None else find_seed_folders(out_dir)
    results, sources, missing = read_folders(folders)
    if not results:
        print(f"no finished results.json in {', '.join(map(str, folders)) or out_dir}", file=sys.stderr)
        return 1
    paths = write_aggregate(out_dir, results, sources, missing)
    print(f"aggregate over seeds {', '.join(str(seed_of(r)) for r in results)}: {', '.join(map(str, paths))}")
    if missing:
        print(f"not finished, not counted: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
