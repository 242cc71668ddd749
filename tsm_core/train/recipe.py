"""One YAML recipe per run, loaded into nested dataclasses.

A recipe is a YAML mapping whose shape is given by a (nested) dataclass *schema*.
`load_recipe` checks every key and value against the schema's type hints and builds the
dataclasses with keyword arguments, so each dataclass's own ``__post_init__`` validation runs.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``pathlib.Path``, ``Optional[...]``,
``Literal[...]``, ``list[...]`` / ``tuple[...]`` of those, ``dict[str, ...]``, nested dataclasses
and ``list[SomeDataclass]`` (for example a list of training phases).

Recipe inheritance: a recipe may contain ``base: other.yaml`` (a path relative to the recipe file,
or a list of such paths, applied in order). The base recipe is loaded first (it may have its own
``base``) and this recipe is deep-merged over it: mappings merge key by key, while every other
value, lists included, replaces the base value whole. This lets demo recipes share settings.

Command-line overrides (``--set a.b=value``, ``--set phases.1.lr=1e-5``) are applied to the merged
mapping before the dataclasses are built; the value is parsed with ``yaml.safe_load``.

Every number read into a ``float`` field (learning rates, guidance scales, loss weights, betas, ...)
must be finite: ``.inf`` and ``.nan`` are refused at load, named by their key. A file or ``--set`` value
that is not valid YAML is a ValueError naming the file and line, or the ``--set`` argument.

Renamed keys: a schema may declare ``renamed_keys: ClassVar[dict[str, str]]`` (old key -> what to
write instead). An old key in a recipe or an override is then an error that names the new one, so a
recipe written for an older version fails with the fix, not with "unknown key".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

BASE_KEY = "base"


# --------------------------------------------------------------------------- reading files


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as "line L, column C: what" (1-based, as editors count), without PyYAML's excerpt."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _read_yaml(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        # PyYAML's errors are not ValueErrors: without this they reach the user as a parser traceback.
        raise ValueError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}; fix the file there "
                         "(indent with spaces, close brackets and quotes)") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """Return ``base`` with ``over`` merged on top: mappings merge recursively, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_bases(data: dict, here: pathlib.Path, seen: tuple[pathlib.Path, ...]) -> dict:
    """Expand the ``base`` key of ``data`` (paths relative to folder ``here``), recursively."""
    if BASE_KEY not in data:
        return data
    bases = data.pop(BASE_KEY)
    if isinstance(bases, (str, os.PathLike)):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, (str, os.PathLike)) for b in bases):
        raise ValueError(f"'{BASE_KEY}' must be a path or a list of paths to recipe files, got {bases!r}")
    merged: dict = {}
    for b in bases:
        path = (here / b).resolve()
        if path in seen:
            chain = " -> ".join(str(p) for p in (*seen, path))
            raise ValueError(f"recipe '{BASE_KEY}' files form a cycle: {chain}")
        parent = _resolve_bases(_read_yaml(path), path.parent, (*seen, path))
        merged = deep_merge(merged, parent)
    return deep_merge(merged, data)


def read_recipe_dict(path_or_dict: str | os.PathLike | Mapping) -> dict:
    """Read a recipe file (or copy a mapping) and expand its ``base`` chain into one plain dict.

    A mapping's ``base`` paths are taken relative to the current directory.
    """
    if isinstance(path_or_dict, Mapping):
        data = copy.deepcopy(dict(path_or_dict))
        return _resolve_bases(data, pathlib.Path.cwd(), ())
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(f"expected a recipe path or a mapping, got {type(path_or_dict).__name__}")
    path = pathlib.Path(path_or_dict).resolve()
    return _resolve_bases(_read_yaml(path), path.parent, (path,))


# --------------------------------------------------------------------------- type checking


def _fmt_path(path: str) -> str:
    return path or "<recipe>"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (e.g. list -> tuple, "1e-4" -> 1e-4)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):  # an already-built section passed in a dict recipe
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{_fmt_path(path)}: expected a mapping of {tp.__name__} fields, got {value!r}; "
                f"valid keys: {', '.join(f.name for f in _init_fields(tp))}"
            )
        return _build(tp, value, path)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if len(args) == 2 and type(None) in args and _unwrap_optional(tp) in (int, float, str, bool):
            try:  # an optional number or string: its own error says it best ("must be a finite number")
                return _convert(_unwrap_optional(tp), value, path)
            except ValueError as e:
                raise ValueError(f"{e} (or null)") from e
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ValueError as e:
                errors.append(str(e))
        allowed = " or ".join(_type_name(a) for a in args)
        raise ValueError(f"{_fmt_path(path)}: value {value!r} is not a valid {allowed} ({'; '.join(errors)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value is False and "no" in allowed:
            value = "no"  # YAML 1.1 reads a bare `no` (e.g. accelerate's `mixed_precision: no`) as false
        # `True == 1` in Python, so compare types too: a bool must not pass for the literal 1.
        for a in allowed:
            if value == a and type(value) is type(a):
                return a
        raise ValueError(f"{_fmt_path(path)}: value {value!r} is not allowed; allowed values: {list(allowed)}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{_fmt_path(path)}: expected a list for {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(
                    f"{_fmt_path(path)}: expected {len(args)} items for {_type_name(tp)}, got {len(value)}: {value!r}"
                )
            return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{_fmt_path(path)}: expected a mapping for {_type_name(tp)}, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(kt, k, _join(path, str(k))): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{_fmt_path(path)}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{_fmt_path(path)}: expected an integer, got {value!r}")
    if tp is float:
        return _finite_float(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{_fmt_path(path)}: expected a string, got {value!r} (quote it in YAML)")
    if tp is pathlib.Path:
        if isinstance(value, (str, os.PathLike)):
            return pathlib.Path(value)
        raise ValueError(f"{_fmt_path(path)}: expected a path string, got {value!r}")
    raise TypeError(f"{_fmt_path(path)}: recipe schemas do not support the type {_type_name(tp)}")


def _finite_float(value: Any, path: str) -> float:
    """``value`` as a float, which must be finite.

    Every float of a recipe passes here, so this one check covers every learning rate, guidance scale,
    loss weight, beta and eps: ``.inf`` and ``.nan`` are valid YAML but no run can use them, and they
    used to pass the load and fail at step 1 (or, as a learning rate, turn the weights into NaN).
    """
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        # PyYAML reads "1e-4" (no dot) as a string; accept scientific notation for floats.
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{_fmt_path(path)}: expected a number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{_fmt_path(path)}: must be a finite number, got {value!r}; give a finite value")
    return number


def _check_renamed(cls: type, keys: Sequence, path: str) -> None:
    """Raise for the first of ``keys`` that ``cls`` lists as renamed, naming its replacement."""
    renamed = getattr(cls, "renamed_keys", {})
    for k in keys:
        if k in renamed:
            raise ValueError(f"recipe key {_join(path, str(k))!r} was renamed: write {renamed[k]} instead")


def _build(cls: type[T], data: Mapping, path: str) -> T:
    """Build dataclass ``cls`` from mapping ``data``, checking keys and values (``path`` names it in errors)."""
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    hints = _hints(cls)
    unknown = [k for k in data if k not in names]
    _check_renamed(cls, unknown, path)
    if unknown:
        where = f" in {path}" if path else ""
        raise ValueError(
            f"unknown recipe key {_join(path, str(unknown[0]))!r}{where}; valid keys: {', '.join(names)}"
        )
    missing = [
        f.name for f in fields
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(
            f"missing required recipe key(s) {', '.join(repr(_join(path, m)) for m in missing)}; set them in the recipe"
        )
    kwargs = {k: _convert(hints[k], v, _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_fmt_path(path)} ({cls.__name__}): {e}") from e


# --------------------------------------------------------------------------- overrides


def _split_key(key: str) -> list[str]:
    # "phases[1].lr" and "phases.1.lr" both mean the same thing.
    key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
    parts = key.split(".")
    if not key or any(p == "" for p in parts):
        raise ValueError(f"bad override key {key!r}: use dotted keys like 'a.b' or 'phases.1.lr'")
    return parts


def _unwrap_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def apply_override(raw: dict, override: str, schema: type) -> None:
    """Apply one ``KEY=VALUE`` override to the raw recipe dict in place, checking KEY against ``schema``."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like KEY=VALUE, e.g. 'optim.lr=1e-4'")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {override}: the value {text!r} is not valid YAML ({_yaml_problem(e)}); "
                         "close brackets and quotes, or quote the whole value as a string") from e
    parts = _split_key(key)
    node: Any = raw
    tp: Any = schema
    path = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in _init_fields(tp)]
            _check_renamed(tp, [part], path)
            if part not in names:
                raise ValueError(
                    f"override key {key!r}: {_join(path, part)!r} is not a recipe key; "
                    f"valid keys{' in ' + path if path else ''}: {', '.join(names)}"
                )
            child_tp = _hints(tp)[part]
            slot: Any = part
        elif origin in (list, tuple) or origin is Sequence:
            if not part.isdigit():
                raise ValueError(f"override key {key!r}: {path!r} is a list, so {part!r} must be an index")
            slot = int(part)
            if not isinstance(node, list) or slot >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ValueError(
                    f"override key {key!r}: index {slot} is out of range for {path!r} which has {size} item(s)"
                )
            args = typing.get_args(tp)
            child_tp = args[slot] if (origin is tuple and args and args[-1] is not Ellipsis) else (args[0] if args else Any)
        elif origin is dict:
            slot = part
            child_tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        else:
            raise ValueError(f"override key {key!r}: {path!r} is a {_type_name(tp)} value and has no sub-keys")
        if last:
            node[slot] = value
        else:
            if isinstance(slot, str) and not isinstance(node.get(slot), (dict, list)):
                # Sections left at their defaults are absent from the raw dict: create them.
                node[slot] = {}
            elif isinstance(node, list) and isinstance(node[slot], tuple):
                node[slot] = list(node[slot])
            node = node[slot]
            path = _join(path, slot)
            tp = child_tp


# --------------------------------------------------------------------------- public API


def load_recipe(path_or_dict: str | os.PathLike | Mapping, schema: type[T], overrides: Sequence[str] = ()) -> T:
    """Load a recipe (YAML path or mapping), apply ``overrides``, and build ``schema`` from it.

    Args:
        path_or_dict: a YAML file (its ``base`` files are merged under it) or an already-read mapping.
        schema: the dataclass type to build; nested dataclasses and lists of dataclasses are allowed.
        overrides: ``"a.b=value"`` strings (list entries by index: ``"phases.1.lr=1e-5"``), applied in order.

    Raises:
        FileNotFoundError: the recipe (or one of its ``base`` files) does not exist.
        ValueError: an unknown key, a missing required key, a value of the wrong type or not among the
            allowed ``Literal`` values, or a dataclass's ``__post_init__`` rejected the settings.
    """
    if not (dataclasses.is_dataclass(schema) and isinstance(schema, type)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    raw = read_recipe_dict(path_or_dict)
    for ov in overrides:
        apply_override(raw, ov, schema)
    return _build(schema, raw, "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def recipe_to_dict(obj: Any) -> dict:
    """The resolved recipe ``obj`` (a dataclass instance) as plain YAML-able data (tuples become lists)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def save_recipe(obj: Any, path: str | os.PathLike) -> pathlib.Path:
    """Write the resolved recipe ``obj`` as YAML to ``path``; ``load_recipe(path, type(obj))`` gives it back."""
    from ..serialization import atomic_write_text

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, yaml.safe_dump(recipe_to_dict(obj), sort_keys=False, default_flow_style=False))


def add_recipe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments every training CLI shares: ``recipe``, ``--set``, ``--resume`` and ``--run-dir``.

    Parsed names: ``args.recipe`` (path), ``args.overrides`` (list of ``KEY=VALUE``), ``args.resume``
    (bool) and ``args.run_dir`` (path or None).
    """
    parser.add_argument("recipe", type=pathlib.Path, help="YAML recipe file (one file = one run)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.lr=1e-4 or --set phases.1.steps=500 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--run-dir", type=pathlib.Path, default=None, help="run folder (overrides the recipe's)")
    return parser
