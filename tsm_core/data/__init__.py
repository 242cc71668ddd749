"""Data: image folders and webdataset shards (`tsm_core.data.images`), video clips (`tsm_core.data.video`),
Fashion-MNIST (`tsm_core.data.fmnist`) and the offline CLIP tokenizer (`tsm_core.data.tokenizer`).

Import from the submodules; this file stays import-light (no webdataset or PyAV on ``import tsm_core.data``).
"""
