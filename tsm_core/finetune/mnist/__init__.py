"""The fine-tuning experiment: adapt the embedded Fashion-MNIST teacher to MNIST digits with vanilla LoRA,
TSM stage 1, TSM stage 2 and a LoRA of TSM stage 1's parameter count, under two protocols (the paper's
A.1 proportions, and equal compute), over several seeds, scored by FID/KID against held-out digits.

    python -m tsm_core.finetune.mnist --out runs/mnist --seeds 0 1 2 3 4 --jobs 1 --threads 1
    python -m tsm_core.finetune.mnist --out runs/mnist --aggregate --to docs/finetune/mnist

Modules: `protocol` (the runs and students of each protocol), `data` (the digits), `run` (one seed),
`seeds` (the aggregate), `cli` (the command line; ``tools/exp_mnist.py`` is the same).
"""

from .cli import main

__all__ = ["main"]
