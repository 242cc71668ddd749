"""Fine-tune a diffusion model with vanilla LoRA or TimeStep Master experts (diffusion loss).

    python tools/finetune.py recipes/sd15_domain_tsm.yaml --set data.path=my_images/
    python tools/finetune.py recipes/sd15_domain_tsm.yaml --resume
    accelerate launch tools/finetune.py recipes/sd3_domain_tsm.yaml --set train.batch_size=8

The resolved recipe, checkpoints, stats.jsonl, tensorboard logs, sample grids and the final
adapters (``adapter/``, ``adapter_text_encoder{i}/``) go to the run folder.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer
    from tsm_core.train.recipe import add_recipe_args, load_recipe

    parser = add_recipe_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, FinetuneRecipe, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.run_dir is not None:
        recipe.train.run_dir = str(args.run_dir)
    result = FinetuneTrainer(recipe).train(resume=args.resume)
    print(f"done: step {result['step']}, loss {result['loss']:.4f}, adapter in {result['adapter_dir']}, "
          f"{result['skipped']} unreadable samples skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
