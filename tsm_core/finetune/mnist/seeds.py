"""The fine-tuning experiment over seeds: one ``seeds.json`` / ``seeds.md`` per protocol.

Each protocol's aggregate (``<out>/<protocol>/seeds.json``) holds per seed the FID of ``lora``,
``tsm_stage1``, ``tsm_stage2``, ``lora_matched`` and the unadapted ``teacher`` (KID as ``<row>_kid``),
every row's mean and sample std, and the paired differences with the same statistics as the distillation
demo (`tsm_core.eval.seeds`: mean, percentile-bootstrap and t intervals, wins): stage 1 - LoRA,
stage 2 - LoRA, stage 1 - capacity-parity LoRA, capacity-parity LoRA - LoRA.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tsm_core.eval.seeds import BOOT_SEED, LEVEL, RESAMPLES, format_interval, format_pm, paired, row_summary

from . import protocol as mp

ROWS = ("teacher", *mp.STUDENTS)
ROW_NAMES = {"teacher": "teacher, not adapted", "lora": "vanilla LoRA", "tsm_stage1": "TSM stage 1 (experts)",
             "tsm_stage2": "TSM stage 2 (router)", "lora_matched": "LoRA at TSM stage 1's parameter count"}
PAIRS = (("tsm_stage1", "lora"), ("tsm_stage2", "lora"), ("tsm_stage1", "lora_matched"), ("lora_matched", "lora"))
SAME = ("n", "n_reference", "reference_features_sha256", "settings", "sample_seed")
"""results.json fields every seed of one aggregate must share."""


def read_results(folder: str | Path) -> dict | None:
    path = Path(folder) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def is_complete(results: dict | None, protocols: Sequence[str] = mp.PROTOCOLS) -> bool:
    """Every student of every protocol scored."""
    return bool(results) and all(set(results.get("protocols", {}).get(p, {}).get("rows", {})) >= set(mp.STUDENTS)
                                 for p in protocols)


def seed_record(results: dict, protocol: str) -> dict:
    """One seed of a protocol: seed, N, and FID / ``<row>_kid`` of the teacher and the four students."""
    if not is_complete(results, [protocol]):
        raise ValueError(f"seed {results.get('seed')} has not scored every {protocol} student: it did not finish")
    rows = dict(results["protocols"][protocol]["rows"], teacher=results["teacher"])
    record = {"seed": int(results["seed"]), "n": int(results["n"])}
    for key in ROWS:
        record[key], record[f"{key}_kid"] = float(rows[key]["fid"]), float(rows[key]["kid_mean"])
    return record


def check_comparable(results_list: Sequence[dict], sources: Sequence[str]) -> None:
    """Refuse to average seeds run with other settings, N or reference set, or a seed twice."""
    for field in SAME:
        values = {s: r.get(field) for s, r in zip(sources, results_list)}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            raise ValueError(f"the seeds differ in {field} ({values}): their FIDs cannot be averaged; "
                             "aggregate each setting on its own")
    seeds = [r["seed"] for r in results_list]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears twice ({sorted(seeds)}; sources {list(sources)}): each seed counts once")


def aggregate(results_list: Sequence[dict], protocol: str, sources: Sequence[str] | None = None,
              resamples: int = RESAMPLES, boot_seed: int = BOOT_SEED) -> dict:
    """seeds.json of one protocol from per-seed results.json dicts (pure: no files)."""
    if not results_list:
        raise ValueError("no finished seed to aggregate")
    sources = list(sources) if sources is not None else [f"results {i}" for i in range(len(results_list))]
    check_comparable(results_list, sources)
    records = sorted((dict(seed_record(r, protocol), source=s) for r, s in zip(results_list, sources)),
                     key=lambda r: r["seed"])
    rows = {k: dict(row_summary(records, k), name=ROW_NAMES[k]) for k in ROWS}
    first = results_list[0]
    return {"protocol": {"name": protocol, "label": mp.LABELS[protocol]}, "n": records[0]["n"],
            "n_reference": first["n_reference"], "settings": first["settings"],
            "students": {k: {f: v for f, v in row.items() if f not in ("fid", "kid_mean", "kid_std", "n")}
                         for k, row in first["protocols"][protocol]["rows"].items()},
            "n_seeds": len(records), "seeds": records, "rows": rows,
            "paired": {f"{a}_minus_{b}": dict(paired(records, a, b, resamples, boot_seed),
                                              ratio=rows[a]["fid_mean"] / rows[b]["fid_mean"])
                       for a, b in PAIRS},
            "bootstrap": {"method": "percentile", "resamples": resamples, "seed": boot_seed, "level": LEVEL,
                          "unit": "seed (every student of a seed resampled together: paired)"}}


def setting_effect(this: Sequence[dict], other: Sequence[dict], protocol: str, resamples: int = RESAMPLES,
                   boot_seed: int = BOOT_SEED) -> dict:
    """What one setting changes (issue 25, item 4: the text-encoder experts on vs off): for every student,
    the paired FID/KID difference ``this - other`` over the seeds both runs finished.

    The two runs must share N, the reference set and the sampling seed, and their settings may differ only
    in what is being measured (recorded under ``differs``); each run's own seeds must be comparable."""
    for name, run in (("this run", this), ("the other run", other)):
        if run:
            check_comparable(run, [f"{name}, seed {r.get('seed')}" for r in run])
    theirs = {int(r["seed"]): r for r in other if is_complete(r, [protocol])}
    pairs = [(r, theirs[int(r["seed"])]) for r in this if is_complete(r, [protocol]) and int(r["seed"]) in theirs]
    if not pairs:
        raise ValueError(f"no seed finished {protocol} in both runs (this: {sorted(r.get('seed') for r in this)}, "
                         f"other: {sorted(theirs)}): nothing to pair")
    a, b = pairs[0]
    for field in (f for f in SAME if f != "settings"):  # the settings are what may differ
        if a.get(field) != b.get(field):
            raise ValueError(f"the runs differ in {field} ({a.get(field)} vs {b.get(field)}): their FIDs are not "
                             "comparable; rerun one with the other's")
    differs = {k: [a["settings"].get(k), b["settings"].get(k)]
               for k in sorted(set(a["settings"]) | set(b["settings"])) if a["settings"].get(k) != b["settings"].get(k)}
    if not differs:
        raise ValueError("the two runs have the same settings: there is no setting whose effect to measure")
    records = []
    for mine, yours in pairs:
        rec, rec_other = seed_record(mine, protocol), seed_record(yours, protocol)
        records.append({"seed": rec["seed"], **{k: rec[k] for k in rec if k != "seed" and k != "n"},
                        **{f"{k}@other": rec_other[k] for k in mp.STUDENTS},
                        **{f"{k}@other_kid": rec_other[f"{k}_kid"] for k in mp.STUDENTS}})
    return {"protocol": {"name": protocol, "label": mp.LABELS[protocol]}, "differs": differs,
            "n": a["n"], "n_seeds": len(records), "seeds": sorted(r["seed"] for r in records),
            "students": {k: dict(paired(records, k, f"{k}@other", resamples, boot_seed), name=ROW_NAMES[k])
                         for k in mp.STUDENTS},
            "bootstrap": {"method": "percentile", "resamples": resamples, "seed": boot_seed, "level": LEVEL,
                          "unit": "seed (both runs of a seed resampled together: paired)"}}


def format_effect(effect: dict) -> str:
    """effect.md: per student, this run - the other, paired over seeds."""
    what = "; ".join(f"{k}: {v[0]} here, {v[1]} in the other run" for k, v in effect["differs"].items())
    lines = [f"# What one setting changes: {what}", "",
             f"Protocol: **{effect['protocol']['label']}**. Seeds {', '.join(map(str, effect['seeds']))} "
             f"(N = {effect['n']} digits each), paired by seed.", "",
             "| student | this - other, FID mean +- std | 95% CI bootstrap | 95% CI t | this run better (FID) "
             "| KID x1e3 mean diff | this run better (KID) |", "|---|---|---|---|---|---|---|"]
    for st in effect["students"].values():
        lines.append(f"| {st['name']} | {format_pm(st['mean'], st['std'])} | {format_interval(st['ci95_bootstrap'])} "
                     f"| {format_interval(st['ci95_t'])} | {st['tsm_wins']} / {st['n_seeds']} "
                     f"| {1e3 * st['kid_mean_diff']:+.2f} | {st['kid_tsm_wins']} / {st['n_seeds']} |")
    return "\n".join(lines + ["", "Negative = the setting of this run gives the lower (better) score.", ""])


def format_markdown(agg: dict) -> str:
    """seeds.md: per-seed FIDs, every row's mean +- std, the paired differences."""
    s = agg["settings"]
    lines = [f"# Fine-tuning, Fashion-MNIST teacher -> MNIST digits: {agg['n_seeds']} seed(s)", "",
             f"Protocol: **{agg['protocol']['label']}**.", "",
             f"S = {s['steps']} steps, batch {s['batch']}, lr {s['lr']}, rank {s['rank']}, alpha {s['alpha']}, "
             f"text-encoder experts {'on' if s['text_experts'] else 'off'}; FID/KID of N = {agg['n']} generated digits "
             f"({s['sample_steps']} DDIM steps, guidance {s['guidance_scale']}) against {agg['n_reference']} held-out "
             "digits that no run trained on.", "",
             "| seed | " + " | ".join(ROW_NAMES[k] for k in ROWS) + " |", "|---" * (len(ROWS) + 1) + "|"]
    for r in agg["seeds"]:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]:.2f}" for k in ROWS) + " |")
    lines += ["", "| row | FID mean +- std | KID x1e3 mean +- std |", "|---|---|---|"]
    for row in agg["rows"].values():
        lines.append(f"| {row['name']} | {format_pm(row['fid_mean'], row['fid_std'])} "
                     f"| {format_pm(row['kid_mean'], row['kid_std'], 1e3)} |")
    lines += ["", "## Paired differences (FID; negative = the first is better)", "",
              "| comparison | mean +- std | 95% CI bootstrap | 95% CI t | first wins (FID) | KID x1e3 mean diff "
              "| first wins (KID) | ratio of means |", "|---|---|---|---|---|---|---|---|"]
    for key, p in agg["paired"].items():
        a, b = key.split("_minus_")
        lines.append(f"| {ROW_NAMES[a]} - {ROW_NAMES[b]} | {format_pm(p['mean'], p['std'])} "
                     f"| {format_interval(p['ci95_bootstrap'])} | {format_interval(p['ci95_t'])} "
                     f"| {p['tsm_wins']} / {p['n_seeds']} | {1e3 * p['kid_mean_diff']:+.2f} "
                     f"| {p['kid_tsm_wins']} / {p['n_seeds']} | {p['ratio']:.3f} |")
    lines += ["", "## What each student trained", "",
              "| student | run | optimizer steps | rank | trainable parameters |", "|---|---|---|---|---|"]
    for k, st in agg["students"].items():
        lines.append(f"| {ROW_NAMES[k]} | {st['run']} | {st['optimizer_steps']} | {st['rank']} "
                     f"| {st['trainable_parameters']} |")
    b = agg["bootstrap"]
    lines += ["", f"Bootstrap: {b['method']}, {b['resamples']} resamples of the seeds (generator seed {b['seed']}), "
              "paired. With few seeds the percentile bootstrap is too narrow; the t interval assumes normal "
              "differences.", "", "Sources: " + ", ".join(f"seed {r['seed']}: `{r['source']}`" for r in agg["seeds"]),
              ""]
    return "\n".join(lines)


def seed_folders(out: str | Path) -> list[Path]:
    return sorted((p for p in Path(out).glob("seed*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))


def write_aggregates(out_dir: str | Path, folders: Sequence[str | Path],
                     protocols: Sequence[str] = mp.PROTOCOLS) -> list[Path]:
    """``out_dir/<protocol>/seeds.json`` and ``seeds.md`` over the finished seed folders; unfinished ones
    are listed as missing. Returns the files written."""
    written = []
    for proto in protocols:
        done = [(str(f), r) for f in folders if is_complete(r := read_results(f), [proto])]
        missing = [str(f) for f in folders if str(f) not in {s for s, _ in done}]
        if not done:
            continue
        agg = aggregate([r for _, r in done], proto, [s for s, _ in done])
        agg["missing"] = missing
        target = Path(out_dir) / proto
        target.mkdir(parents=True, exist_ok=True)
        (target / "seeds.json").write_text(json.dumps(agg, indent=2))
        md = format_markdown(agg)
        if missing:
            md += f"\n**Missing (not finished, not counted):** {', '.join(missing)}\n"
        (target / "seeds.md").write_text(md)
        written += [target / "seeds.json", target / "seeds.md"]
    return written


def write_effect(out_dir: str | Path, folders: Sequence[str | Path], other_folders: Sequence[str | Path],
                 protocols: Sequence[str] = mp.PROTOCOLS) -> list[Path]:
    """``out_dir/<protocol>/effect.json`` and ``effect.md``: `setting_effect` of these seed folders against
    the other run's. Returns the files written."""
    this = [r for f in folders if (r := read_results(f))]
    other = [r for f in other_folders if (r := read_results(f))]
    written = []
    for proto in protocols:
        effect = setting_effect(this, other, proto)
        effect["sources"] = {"this": [str(f) for f in folders], "other": [str(f) for f in other_folders]}
        target = Path(out_dir) / proto
        target.mkdir(parents=True, exist_ok=True)
        (target / "effect.json").write_text(json.dumps(effect, indent=2))
        (target / "effect.md").write_text(format_effect(effect))
        written += [target / "effect.json", target / "effect.md"]
    return written
