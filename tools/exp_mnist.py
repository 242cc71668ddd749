"""The fine-tuning experiment (Fashion-MNIST teacher -> MNIST digits): `tsm_core.finetune.mnist`.

    python tools/exp_mnist.py --out runs/mnist --seeds 0 1 2 3 4 --jobs 1 --threads 1
    python tools/exp_mnist.py --out runs/mnist --aggregate --to docs/finetune/mnist

Same options as ``python -m tsm_core.finetune.mnist --help``.
"""

import sys

from tsm_core.finetune.mnist import main

if __name__ == "__main__":
    sys.exit(main())
