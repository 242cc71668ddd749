"""The two protocols of the fine-tuning experiment, as finetune recipes: which runs train, for how many
steps, at which scales and ranks, and which saved adapter each scored student is.

Both protocols are built from one step count S (``steps``) and one expert rank r.

**A.1-proportional** (``a1``). Appendix A.1 (every domain-adaptation recipe): "We train 4K steps for
vanilla LoRA and two stages of TSM", with "TimeStep experts" at core n = 8 and context n = 1 for the
assembling stage. We read "two stages of TSM" as *each stage* trains as long as vanilla LoRA, and stage 1
as fostering every scale stage 2 needs, each for S steps (a scale's experts train jointly: every sample
goes to its interval's expert, ``schedule: joint``). So:

- ``lora``: vanilla LoRA (scale 1), S steps;
- ``tsm_stage1``: the n = 8 experts after S steps of fostering;
- ``tsm_stage2``: the same run, continued: n = 1 fostered for S steps, then the router for S steps with
  core n = 8 and context n = 1 (3 S steps in all; stage 1 is scored from the adapter saved at the end of
  its fostering phase, so stage 2 grows out of exactly the stage-1 experts that were scored).

TSM thus trains 3 S steps against LoRA's S, as in the paper (the n = 1 context expert is a second
vanilla LoRA, trained inside the TSM run rather than borrowed from the ``lora`` run, so the two
students share no weights).

**Equal compute** (``equal``): every student gets S optimizer steps in all, the protocol of
``tools/exp_mnist.py`` before December 2026:

- ``lora``: as above (the same run: same recipe, same seed);
- ``tsm_stage1``: n = 4 fostered for S steps;
- ``tsm_stage2``: n = 4 for int(0.6 S), n = 1 for int(0.2 S), the router for the rest (core 4, context 1).

**Capacity parity** (``lora_matched``, both protocols): vanilla LoRA for S steps at rank n r, where n is
the protocol's stage-1 scale, so it holds as many trainable parameters as TSM stage 1's n experts of
rank r (a rank-k LoRA of a layer has k (in + out) parameters; stage 1 has n of them at rank r).
Its alpha stays the recipe's, as in the distillation demo's capacity arm (A.3 itself runs alpha 8 at
rank 64): scaling alpha with the rank would multiply the update like a larger learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("a1", "equal")
STUDENTS = ("lora", "tsm_stage1", "tsm_stage2", "lora_matched")
A1_CORE, A1_CONTEXT = 8, 1  # A.1: "TimeStep experts" n = 8 (core) and n = 1 (context)
EQUAL_CORE, EQUAL_CONTEXT = 4, 1
EQUAL_SPLIT = (0.6, 0.2)  # equal compute: stage 2's fostering shares of S (the router gets the rest)
LABELS = {
    "a1": "A.1-proportional (LoRA S steps; TSM stage 1 fosters n = 8 for S, stage 2 fosters n = 1 for S "
          "and trains the router for S, core 8 + context 1)",
    "equal": "equal compute (every student S optimizer steps; TSM n = 4, stage 2 = 0.6 S n = 4 + 0.2 S n = 1 "
             "+ 0.2 S router)",
}


@dataclass(frozen=True)
class Student:
    """A scored student: the run that trains it and the adapter that is it.

    ``phase`` is None for the run's final adapter, else the index of the phase whose saved adapter
    (``phases/NN_<name>/``) is the student (stage 1 scored inside a longer run).
    """

    run: str
    phase: int | None = None


def foster(scale: int, steps: int, lr: float) -> dict:
    return {"type": "foster", "scale": scale, "steps": steps, "lr": lr}


def assemble(steps: int, lr: float, core: int, context: int) -> dict:
    return {"type": "assemble", "steps": steps, "lr": lr, "core_scale": core, "context_scales": [context]}


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 5:
        raise ValueError(f"steps (S) must be an integer >= 5 so that every stage of both protocols gets at least "
                         f"one step (equal compute gives stage 2's parts int(0.6 S), int(0.2 S) and the rest); "
                         f"got {steps!r}")


def equal_compute_stages(steps: int, lr: float) -> dict[str, list[dict]]:
    """The equal-compute students' stages (``lora``, ``tsm_stage1``, ``tsm_stage2``), S steps each; also
    the protocol of tools/exp_video.py."""
    check_steps(steps)
    a, b = int(EQUAL_SPLIT[0] * steps), int(EQUAL_SPLIT[1] * steps)
    return {"lora": [foster(1, steps, lr)],
            "tsm_stage1": [foster(EQUAL_CORE, steps, lr)],
            "tsm_stage2": [foster(EQUAL_CORE, a, lr), foster(EQUAL_CONTEXT, b, lr),
                           assemble(steps - a - b, lr, EQUAL_CORE, EQUAL_CONTEXT)]}


def runs(steps: int, lr: float, rank: int) -> dict[str, dict]:
    """Every run of one seed, by name: ``{"stages": [...], "rank": int}`` (the finetune recipe's stages
    and the experts' rank). Runs shared by both protocols appear once."""
    equal = equal_compute_stages(steps, lr)
    return {
        "lora": {"stages": equal["lora"], "rank": rank},
        "a1_tsm": {"stages": [foster(A1_CORE, steps, lr), foster(A1_CONTEXT, steps, lr),
                              assemble(steps, lr, A1_CORE, A1_CONTEXT)], "rank": rank},
        "a1_lora_matched": {"stages": [foster(1, steps, lr)], "rank": A1_CORE * rank},
        "equal_tsm_stage1": {"stages": equal["tsm_stage1"], "rank": rank},
        "equal_tsm_stage2": {"stages": equal["tsm_stage2"], "rank": rank},
        "equal_lora_matched": {"stages": [foster(1, steps, lr)], "rank": EQUAL_CORE * rank},
    }


def students(protocol: str) -> dict[str, Student]:
    """The four scored students of a protocol and where each comes from."""
    if protocol == "a1":
        return {"lora": Student("lora"), "tsm_stage1": Student("a1_tsm", phase=0),
                "tsm_stage2": Student("a1_tsm"), "lora_matched": Student("a1_lora_matched")}
    if protocol == "equal":
        return {"lora": Student("lora"), "tsm_stage1": Student("equal_tsm_stage1"),
                "tsm_stage2": Student("equal_tsm_stage2"), "lora_matched": Student("equal_lora_matched")}
    raise ValueError(f"unknown protocol {protocol!r}: choose from {', '.join(PROTOCOLS)}")


def runs_of(protocols) -> list[str]:
    """The runs the given protocols need, in training order (shared runs once)."""
    return list(dict.fromkeys(s.run for p in protocols for s in students(p).values()))


def optimizer_steps(run: dict) -> int:
    """A run's optimizer steps (every stage here is joint or assembling: steps count the whole stage)."""
    return sum(st["steps"] for st in run["stages"])


def student_steps(protocol: str, steps: int, lr: float, rank: int) -> dict[str, dict]:
    """Per student of ``protocol``: optimizer steps that made it and its rank, for results.json, so the
    protocol can be checked from the file."""
    all_runs = runs(steps, lr, rank)
    out = {}
    for name, st in students(protocol).items():
        run = all_runs[st.run]
        stages = run["stages"] if st.phase is None else run["stages"][: st.phase + 1]
        out[name] = {"run": st.run, "optimizer_steps": sum(s["steps"] for s in stages), "rank": run["rank"],
                     "stages": [{k: v for k, v in s.items() if k != "lr"} for s in stages]}
    return out
