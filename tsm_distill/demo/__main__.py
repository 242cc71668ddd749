"""``python -m tsm_distill.demo``: the same as ``tsm-demo`` (the seed sweep starts each seed this way)."""

from .run import main

raise SystemExit(main())
