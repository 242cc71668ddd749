"""Trainer plumbing shared by every trainer: recipes, accelerate/FSDP set-up, checkpoint/resume, logging.

- `tsm_core.train.recipe`: ``load_recipe`` (YAML -> nested dataclasses, ``--set`` overrides, ``base``
  files), ``save_recipe``, ``recipe_to_dict``, ``add_recipe_args``.
- `tsm_core.train.skeleton`: ``PhasedTrainer``, the run loop both trainers share.
- `tsm_core.train.accel`: ``make_accelerator``, ``seed_everything``; `tsm_core.train.fsdp`: FSDP2 sharding.
- `tsm_core.train.checkpoint`: ``CheckpointManager`` (atomic full-state save / latest / load),
  ``capture_rng_state``, ``restore_rng_state``.
- `tsm_core.train.logging`: ``RunLogger`` (tensorboard + stats.jsonl), ``save_image_grid``, ``progress``.

Model families live in `tsm_core.models`, data in `tsm_core.data` (layers below this one:
docs/architecture.md).

Import from the submodules; this file stays import-light so that importing one submodule does not
pull in tensorboard, webdataset or accelerate.
"""
