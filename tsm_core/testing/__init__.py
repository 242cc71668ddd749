"""Tiny diffusers pipelines built from config (random weights), for tests, benchmarks and smoke runs.

Every builder saves its model to a folder and loads it back with ``from_pretrained(path)``, so the
loading code users run against the hub is the code under test, with nothing downloaded. The test
suite and ``tools/bench_*`` use the same builders.
"""
