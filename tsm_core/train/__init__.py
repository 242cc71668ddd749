"""Machinery shared by every trainer: recipes, accelerate setup, checkpoint/resume, logging and data.

Import from the submodules (``tsm_core.train.recipe``, ``.checkpoint``, ``.logging``, ``.data``,
``.accel``); this package file stays import-light so that ``import tsm_core.train.recipe`` does not
pull in torch, tensorboard or webdataset.
"""
