"""One seed's results.json: its row names, whether the seed finished, its training seed.

Shared by the seed sweep's aggregate (`tsm_distill.demo.seeds`) and the budget curve
(`tsm_distill.demo.budget`), which both read finished seeds.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

# Row names in results.json -> short keys in seeds.json. run.py names its student rows from here.
ROW_NAMES = {"lora": "DMD2 + LoRA", "tsm_stage1": "DMD2 + TSM stage 1 (experts)",
             "tsm_stage2": "DMD2 + TSM stage 2 (router)", "floor": "real train images (floor)",
             "teacher_few": "teacher DDIM 4 (no distillation)",
             "lora_dmd_only": "DMD2 + LoRA, DMD only (before its GAN phase)",
             "tsm_stage1_dmd_only": "DMD2 + TSM stage 1, DMD only (each expert before its GAN phase)"}
TEACHER_FULL_PREFIX = "teacher DDIM "  # "teacher DDIM 50": its step count is a demo option
STUDENTS = ("lora", "tsm_stage1", "tsm_stage2")


def row_key(name: str) -> str | None:
    """The seeds.json key of a results.json row name, or None for a row the aggregate does not know."""
    for key, known in ROW_NAMES.items():
        if name == known:
            return key
    return "teacher_full" if name.startswith(TEACHER_FULL_PREFIX) else None


def keyed_rows(results: dict) -> dict[str, dict]:
    """The known rows of one results.json, by key."""
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list):
        return {}
    return {key: r for r in rows if isinstance(r, dict) and (key := row_key(str(r.get("row", "")))) is not None}


def trained_students(results: dict) -> tuple[str, ...]:
    """The students a run trained: all three, or only LoRA (``--students lora``, the capacity-parity arm)."""
    return tuple(results.get("students_trained", STUDENTS))


def is_complete(results: dict | None) -> bool:
    """True when results.json holds a row with a finite FID for every student the run trained (it finished)."""
    if results is None:
        return False
    rows = keyed_rows(results)
    return all(k in rows and isinstance(rows[k].get("fid"), (int, float)) and math.isfinite(rows[k]["fid"])
               for k in trained_students(results))


def read_results(folder: str | Path) -> dict | None:
    """``folder/results.json`` as a dict, or None when it is missing or not valid JSON (a killed write)."""
    path = Path(folder) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def seed_of(results: dict) -> int:
    """The training seed of a results.json: its ``seed`` field, else ``--seed`` in its recorded command.

    Results written before the field existed hold only the command; without ``--seed`` there the run
    used tsm-demo's default seed, 0.
    """
    if "seed" in results:
        return int(results["seed"])
    command = results.get("command")
    if not isinstance(command, str):
        raise ValueError("the results hold neither a 'seed' nor a 'command' to read the seed from")
    tokens = shlex.split(command)
    for i, token in enumerate(tokens):
        if token == "--seed" and i + 1 < len(tokens):
            return int(tokens[i + 1])
        if token.startswith("--seed="):
            return int(token.split("=", 1)[1])
    return 0
