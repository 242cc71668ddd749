"""Fine-tune a diffusion model with vanilla LoRA or TimeStep Master experts (diffusion loss).

    tsm-finetune recipes/sd15_domain_tsm.yaml --set data.path=my_images/
    tsm-finetune recipes/sd15_domain_tsm.yaml --resume
    accelerate launch -m tsm_core.finetune.cli recipes/sd3_domain_tsm.yaml --set train.batch_size=8

The resolved recipe, checkpoints, stats.jsonl, tensorboard logs, sample grids and the final
adapters (``adapter/``, ``adapter_text_encoder{i}/``) go to the run folder: ``--run-dir``, else
``train.run_dir``, else ``runs/<recipe file's stem>`` (as for tsm-distill). Errors and exit statuses: `tsm_core.train.cli`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer
    from tsm_core.train.cli import add_run_args, run_dir_of, run_recipe

    parser = add_run_args(argparse.ArgumentParser(prog="tsm-finetune", description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    status, result = run_recipe(args, FinetuneRecipe, run_dir_of(args), FinetuneTrainer)
    if status == 0:
        print(f"done: step {result['step']}, loss {result['loss']:.4f}, adapter in {result['adapter_dir']}; "
              f"data: {result['data'] or 'every sample read'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
