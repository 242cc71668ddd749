"""``tsm-demo``: distill the embedded Fashion-MNIST teacher into 4-step LoRA and TSM students, score them.

- `tsm_distill.demo.run`: one seed (train both students, FID/KID rows, samples, gates, budget curve);
- `tsm_distill.demo.options`: the command line and its presets;
- `tsm_distill.demo.protocol`: the A.3-proportional protocol (``--protocol a3p``) and per-student accounting;
- `tsm_distill.demo.seeds`: the resumable seed sweep and its paired statistics;
- `tsm_distill.demo.budget`: the budget curve; `tsm_distill.demo.lr`: the learning-rate fairness report;
- `tsm_distill.demo.eval`: prompts, Inception features, FID/KID; `tsm_distill.demo.report`: tables and plots.

``python -m tsm_distill.demo`` and the ``tsm-demo`` script both run `tsm_distill.demo.run.main`.
"""


def main(argv: list[str] | None = None) -> int:
    """The ``tsm-demo`` entry point (`tsm_distill.demo.run.main`; imported on call, so that importing a
    submodule of the demo does not load the trainer)."""
    from .run import main as run_main

    return run_main(argv)
