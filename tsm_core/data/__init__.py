"""Data: image folders and webdataset shards (`tsm_core.data.images`), video clips (`tsm_core.data.video`),
Fashion-MNIST (`tsm_core.data.fmnist`), the offline CLIP tokenizer (`tsm_core.data.tokenizer`), and the
fine-tuner's resumable batch stream with its latent cache keys (`tsm_core.data.stream`).

Import from the submodules; this file stays import-light (no webdataset or PyAV on ``import tsm_core.data``).
"""
