"""Save and load a TSM adapter as one safetensors file with its config in the metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ADAPTER_FILE = "tsm_adapter.safetensors"
FORMAT_VERSION = "1"


def save_adapter(tsm, directory: str | Path) -> Path:
    """Write ``directory/tsm_adapter.safetensors`` atomically (temp file + rename).

    Metadata keys: ``tsm_config`` (TSMConfig JSON), ``intervals``, ``mode`` and ``mode_args``, so the file
    alone is enough to rebuild the adapter on a fresh copy of the base model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tsm.state_dict().items()}
    meta = {
        "format": "tsm",
        "format_version": FORMAT_VERSION,
        "tsm_config": tsm.config.to_json(),
        "intervals": json.dumps(tsm.intervals.to_dict()),
        "mode": tsm.mode,
        "mode_args": json.dumps(tsm.mode_args),
        # Every layer's router serves the same gated scales (set_mode sets them all at once).
        "router_scales": json.dumps(list(next(iter(tsm.layers.values())).router_scales)),
    }
    return atomic_save_file(tensors, directory / ADAPTER_FILE, meta)


def atomic_save_file(tensors: dict, path: Path, metadata: dict) -> Path:
    """``safetensors.save_file`` into a temporary sibling, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to the sibling ``<name>.tmp``, then rename it over ``path``: readers never see
    half a file, and a killed write leaves the old one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_adapter_file(directory: str | Path) -> tuple[dict, dict]:
    """Return (tensors, metadata) of a saved adapter; FileNotFoundError/ValueError on bad input."""
    path = Path(directory)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise FileNotFoundError(f"no TSM adapter at {path}; expected a folder written by TSMAdapter.save()")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "tsm":
            raise ValueError(f"{path} is not a TSM adapter file (metadata format={meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def count_saved_parameters(adapter_dir, scales: list[int] | None = None, router: bool = False) -> int:
    """Parameters of a saved adapter's experts of ``scales`` (all scales when None), plus its routers
    when ``router``: the trainable-parameter count of the student that uses them."""
    tensors, _ = read_adapter_file(adapter_dir)
    total = 0
    for key, t in tensors.items():
        field, _, tail = key.rpartition(".")
        if field.endswith("lora_A") or field.endswith("lora_B"):
            scale = int(tail.split("_")[0][1:])  # "s4_e3" -> 4
            if scales is None or scale in scales:
                total += t.numel()
        elif router and tail in ("router_fc", "router_emb"):
            total += t.numel()
    return total
