"""Machinery shared by every trainer: recipes, accelerate setup, checkpoint/resume, logging and data.

- `tsm_core.train.recipe`: ``load_recipe`` (YAML -> nested dataclasses, ``--set`` overrides, ``base``
  files), ``save_recipe``, ``recipe_to_dict``, ``add_recipe_args``.
- `tsm_core.train.accel`: ``make_accelerator``, ``seed_everything``.
- `tsm_core.train.checkpoint`: ``CheckpointManager`` (atomic full-state save / latest / load),
  ``capture_rng_state``, ``restore_rng_state``.
- `tsm_core.train.logging`: ``RunLogger`` (tensorboard + stats.jsonl), ``save_image_grid``, ``progress``.
- `tsm_core.train.data`: ``read_prompts``, ``ImageTextFolder``, ``webdataset_image_text``,
  ``image_transform``, ``infinite``, ``SkipCounter``.

Import from the submodules; this file stays import-light so that importing one submodule does not
pull in tensorboard, webdataset or accelerate.
"""
