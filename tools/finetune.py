"""Thin wrapper: ``python tools/finetune.py RECIPE ...`` == ``tsm-finetune RECIPE ...`` (tsm_core.finetune.cli)."""

import sys

from tsm_core.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
