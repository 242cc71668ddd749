"""Save and load a TSM adapter as one safetensors file with its config in the metadata."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import TSMConfig

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


EXPECTED = (f"a TSM adapter: a folder written by TSMAdapter.save() holding {ADAPTER_FILE} (e.g. a run's "
            "adapter/ or phases/NN_name/), or that file itself")


@dataclass(frozen=True)
class AdapterHeader:
    """What a saved adapter's header says, read without loading any tensor (cheap even for a large file)."""

    path: Path
    """The ``tsm_adapter.safetensors`` file."""
    metadata: dict[str, str]
    config: TSMConfig
    """The adapter's settings (its ``tsm_config`` metadata)."""
    shapes: dict[str, tuple[int, ...]]
    """Tensor key -> shape, e.g. ``down_blocks.0...to_q.lora_A.s4_e3`` -> (rank, in_features)."""

    @property
    def mode(self) -> str:
        """The mode it was saved in: ``off``, ``expert`` (stage 1), ``mixture`` (stage 2) or ``symmetric``."""
        return self.metadata.get("mode", "off")

    @property
    def mode_args(self) -> dict:
        """``set_mode``'s arguments for `mode` (``scale``/``experts``, or ``core_scale``/``context_scales``)."""
        return json.loads(self.metadata.get("mode_args", "{}"))


def describe_path(path: str | os.PathLike) -> str:
    """A few words on what ``path`` is, for an error that must say what was found instead of an adapter."""
    path = Path(path)
    if not path.exists():
        return "nothing (no such file or folder)"
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return f"a folder holding {names[:8]}{more}" if names else "an empty folder"
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(80)
    # A safetensors file starts with its header's length as 8 little-endian bytes, so it has NUL bytes
    # where text has none.
    if b"\0" not in head:
        first = head.decode("utf-8", "replace").splitlines()[0] if head.strip() else ""
        return f"a text file of {size} bytes starting {first[:40]!r}"
    return f"a binary file of {size} bytes"


def adapter_file(directory: str | os.PathLike) -> Path:
    """The ``tsm_adapter.safetensors`` of an adapter folder (or the file itself); FileNotFoundError that says
    what is there instead."""
    path = Path(directory)
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return path / ADAPTER_FILE
        hint = ""
        if (path / "adapter" / ADAPTER_FILE).is_file():  # a run folder: its final adapter is one level down
            hint = f"; it looks like a run folder, whose final adapter is {path / 'adapter'}"
        raise FileNotFoundError(f"no TSM adapter at {path}: found {describe_path(path)}, without {ADAPTER_FILE}"
                                f"{hint}; expected {EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"no TSM adapter at {path}: found {describe_path(path)}; expected {EXPECTED}")
    return path


def read_adapter_header(directory: str | os.PathLike) -> AdapterHeader:
    """Check that ``directory`` is a readable TSM adapter and return its header (metadata, config, shapes).

    Only the safetensors header is read. Raises FileNotFoundError (nothing there) or ValueError (a file
    that is not a TSM adapter: text, another safetensors file, an unreadable config), naming what was
    found and what was expected. Every loader goes through here (`read_adapter_file`, ``load_adapter``).
    """
    path = adapter_file(directory)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a TSM adapter: it is {describe_path(path)}, which safetensors cannot "
                         f"read ({e}); expected {EXPECTED}") from e
    if meta.get("format") != "tsm":
        found = f"metadata format={meta.get('format')!r}"
        if "tsm_scale" in meta:  # export_lora's file: one expert as a standard LoRA
            found += f": an exported standard LoRA (expert {meta.get('tsm_expert')} of scale {meta['tsm_scale']})"
        raise ValueError(f"{path} is a safetensors file but not a TSM adapter ({found}); expected {EXPECTED}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is a TSM adapter of format version {meta.get('format_version')!r}; this tsm reads "
                         f"version {FORMAT_VERSION}")
    try:
        config = TSMConfig.from_json(meta["tsm_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is a TSM adapter whose tsm_config metadata cannot be read ({e!r}); was it "
                         "written by TSMAdapter.save()?") from e
    return AdapterHeader(path, meta, config, shapes)


def read_adapter_file(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Return (tensors, metadata) of a saved adapter, checked by `read_adapter_header` first
    (FileNotFoundError/ValueError on bad input)."""
    header = read_adapter_header(directory)
    with safe_open(str(header.path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, header.metadata


# The settings that fix what a copied expert computes: its tensors' shapes (rank, targets), the strength
# alpha / rank they are applied with, and the timesteps each expert owns (T).
FIT_KEYS = ("rank", "alpha", "target_modules", "num_timesteps")


def check_adapter_fits(directory: str | os.PathLike, expected: TSMConfig, scales: Iterable[int] | None = None,
                       where: str = "the adapter", keys: Iterable[str] = FIT_KEYS) -> AdapterHeader:
    """Check, from its header alone, that a saved adapter's experts of ``scales`` fit adapters built with
    ``expected``: the same ``keys`` settings, and ``scales`` (default: all of ``expected``'s) among both
    the saved scales and ``expected.scales``.

    ``where`` names the setting that points at the adapter in errors (e.g. ``experts.init_from``). Raises
    FileNotFoundError/ValueError that name the saved and the expected value of every difference.
    """
    try:
        header = read_adapter_header(directory)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from e  # say which setting pointed at the wrong file
    saved = header.config
    scales = list(expected.scales if scales is None else scales)
    if not scales:
        raise ValueError(f"{where} {directory}: no scales to copy; list the interval counts to take from it "
                         f"(its scales are {list(saved.scales)})")
    diffs = []
    for key in keys:
        have, want = getattr(saved, key), getattr(expected, key)
        if key == "target_modules" and not isinstance(have, str) and not isinstance(want, str):
            same = sorted(have) == sorted(want)
        else:
            same = have == want
        if not same:
            diffs.append(f"{key} {_show(have)} (saved) vs {_show(want)} (expected)")
    missing = [s for s in scales if s not in saved.scales]
    if missing:
        diffs.append(f"scale(s) {missing} asked for, but it holds only scales {list(saved.scales)}")
    unbuilt = [s for s in scales if s not in expected.scales]
    if unbuilt:
        diffs.append(f"scale(s) {unbuilt} asked for, but the experts built are of scales {list(expected.scales)}")
    if diffs:
        raise ValueError(f"{where} {directory} does not fit: {'; '.join(diffs)}. The saved adapter has rank "
                         f"{saved.rank}, alpha {saved.alpha:g}, scales {list(saved.scales)}, targets "
                         f"{saved.target_modules}; expected rank {expected.rank}, alpha {expected.alpha:g}, scales "
                         f"{scales} of {list(expected.scales)}, targets {expected.target_modules}")
    return header


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


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
