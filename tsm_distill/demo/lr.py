"""Learning-rate fairness of the demo: the LoRA and TSM students, each at several generator learning rates.

One shared learning rate may suit one student and not the other (in ``tsm-demo --quick`` the LoRA
student saturates while TSM's look clean), so the headline must not rest on one rate. Given finished
``tsm-demo`` seed folders run at different ``--lr-scale`` values, this writes ``lr_fairness.json`` and
``lr_fairness.md``:

* per rate, the seed aggregate of the seeds run at that rate (``demo_seeds.aggregate``);
* every student's FID per seed and rate (LoRA and TSM, each at each rate);
* each student's *better rate*: the lower mean FID over the seeds that ran at every rate. It is chosen
  on the mean, not per seed, so the comparison cannot pick each seed's luckier run;
* the paired TSM - LoRA difference with each student at its own better rate, on those seeds.

``python -m tsm_distill.demo.lr OUT_DIR --from SEED_DIR ...``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tsm_core.serialization import atomic_write_text

from . import seeds as ds

REPORT_NAME = "lr_fairness"
TSM_ROWS = ("tsm_stage2", "tsm_stage1")


def device_of(results: dict) -> str:
    """Where a run was sampled and scored; results.json files from before the field existed ran on the CPU."""
    return str(results.get("device", "cpu"))


def lr_fairness(results_list: Sequence[dict], sources: Sequence[str]) -> dict:
    """The report (pure: no files) from finished results.json dicts at two or more ``lr_scale`` values.

    Raises:
        ValueError: fewer than two rates; runs that differ in anything but the rate (N, reference,
            teacher, protocol, budget); a seed twice at one rate; no seed that ran at every rate.
    """
    ds.check_comparable([dict(r, lr_scale=1.0) for r in results_list], sources)  # all but the rate must match
    groups: dict[float, list[tuple[dict, str]]] = {}
    for results, source in zip(results_list, sources):
        groups.setdefault(float(results.get("lr_scale", 1.0)), []).append((results, source))
    if len(groups) < 2:
        raise ValueError(f"all runs used lr_scale {sorted(groups)}: a fairness check needs two or more rates "
                         "(tsm-demo --lr-scale F)")
    rates = sorted(groups, reverse=True)
    per_rate = {rate: ds.aggregate([r for r, _ in groups[rate]], [s for _, s in groups[rate]]) for rate in rates}
    by_seed = {rate: {rec["seed"]: rec for rec in per_rate[rate]["seeds"]} for rate in rates}
    devices = {rate: {ds.seed_of(r): device_of(r) for r, _ in groups[rate]} for rate in rates}
    common = sorted(set.intersection(*(set(seeds) for seeds in by_seed.values())))
    if not common:
        raise ValueError(f"no seed ran at every rate (seeds per rate: { {r: sorted(s) for r, s in by_seed.items()} })")

    def mean_on_common(rate: float, key: str) -> float:
        return ds.mean_std([by_seed[rate][s][key] for s in common])[0]

    better = {key: min(rates, key=lambda rate: mean_on_common(rate, key)) for key in ds.STUDENTS}
    records = []
    for seed in common:
        rec = {"seed": seed}
        for key in ds.STUDENTS:
            rec[key] = by_seed[better[key]][seed][key]
            rec[f"{key}_kid"] = by_seed[better[key]][seed][f"{key}_kid"]
        records.append(rec)
    return {
        "rates": rates, "common_seeds": common,
        "per_seed": [{"seed": seed, **{str(rate): {**{k: by_seed[rate][seed][k] for k in ds.STUDENTS},
                                                   "device": devices[rate][seed]}
                                       for rate in rates if seed in by_seed[rate]}}
                     for seed in sorted(set().union(*(set(s) for s in by_seed.values())))],
        "mean_on_common_seeds": {str(rate): {k: mean_on_common(rate, k) for k in ds.STUDENTS} for rate in rates},
        "better_rate": better,
        "paired_at_better_rates": {f"{tsm}_minus_lora": ds.paired(records, tsm, "lora") for tsm in TSM_ROWS},
        "per_rate": {str(rate): {"seeds": sorted(by_seed[rate]), "rows": per_rate[rate]["rows"],
                                 "paired": per_rate[rate]["paired"]} for rate in rates},
        "protocol": per_rate[rates[0]]["protocol"], "n": per_rate[rates[0]]["n"],
        "sources": list(sources),
    }


def format_markdown(report: dict) -> str:
    """lr_fairness.md: the per-seed table at every rate, the better rates and the paired result there."""
    rates = report["rates"]
    label = {r: f"x{r:g}" for r in rates}
    lines = [f"# Learning-rate fairness (N = {report['n']}, protocol: {report['protocol']['label']})", "",
             "Generator learning rate = the recipes' times the rate. FID per seed (device in brackets).", "",
             "| seed | " + " | ".join(f"{ds.ROW_NAMES[k]} {label[r]}" for k in ds.STUDENTS for r in rates) + " |",
             "|---|" + "---|" * (len(rates) * len(ds.STUDENTS))]
    for entry in report["per_seed"]:
        cells = []
        for key in ds.STUDENTS:
            for rate in rates:
                run = entry.get(str(rate))
                cells.append(f"{run[key]:.2f} ({run['device']})" if run else "-")
        lines.append(f"| {entry['seed']} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean FID on the seeds that ran at every rate ({', '.join(map(str, report['common_seeds']))}):", "",
              "| student | " + " | ".join(label[r] for r in rates) + " | better rate |",
              "|---|" + "---|" * (len(rates) + 1)]
    for key in ds.STUDENTS:
        means = report["mean_on_common_seeds"]
        lines.append(f"| {ds.ROW_NAMES[key]} | " + " | ".join(f"{means[str(r)][key]:.2f}" for r in rates)
                     + f" | {label[report['better_rate'][key]]} |")
    lines += ["", "Each student at its own better rate, paired by seed:", ""]
    for tsm in TSM_ROWS:
        p = report["paired_at_better_rates"][f"{tsm}_minus_lora"]
        std = "" if p["std"] is None else f" +- {p['std']:.2f}"
        lines.append(f"- {ds.PAIR_LABELS[tsm]} ({label[report['better_rate'][tsm]]} vs LoRA "
                     f"{label[report['better_rate']['lora']]}): {p['mean']:+.2f}{std} FID, 95% t interval "
                     f"{ds.format_interval(p['ci95_t'])}, TSM wins {p['tsm_wins']}/{p['n_seeds']} (KID {p['kid_tsm_wins']}/"
                     f"{p['n_seeds']})")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: dict) -> list[Path]:
    """Write lr_fairness.json and lr_fairness.md into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{REPORT_NAME}.json", out_dir / f"{REPORT_NAME}.md"]
    atomic_write_text(paths[0], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths[1], format_markdown(report))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_distill.demo.lr OUT_DIR --from SEED_DIR ...``: write the learning-rate fairness report."""
    p = argparse.ArgumentParser(prog="python -m tsm_distill.demo.lr", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="where lr_fairness.json and lr_fairness.md go")
    p.add_argument("--from", dest="folders", nargs="+", required=True,
                   help="tsm-demo seed folders (results.json) at two or more --lr-scale values")
    args = p.parse_args(argv)
    results, sources, missing = ds.read_folders(args.folders)
    if missing:
        print(f"not finished, not counted: {', '.join(missing)}", file=sys.stderr)
    try:
        report = lr_fairness(results, sources)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_report(args.out_dir, report)
    print(format_markdown(report))
    print(f"written: {', '.join(map(str, paths))}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
