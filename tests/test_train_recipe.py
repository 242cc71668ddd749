"""Recipes: YAML -> nested dataclasses, with strict keys, typed values, overrides and `base` files."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from tsm_core.train.recipe import add_recipe_args, load_recipe, recipe_to_dict, save_recipe


@dataclass
class Gan:
    weight: float = 0.0
    noise: bool = False


@dataclass
class Phase:
    steps: int
    lr: float = 1e-5
    mode: Literal["expert", "mixture"] = "expert"
    gan: Gan = field(default_factory=Gan)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass
class Recipe:
    model: str
    seed: int = 0
    scales: tuple[int, ...] = (1, 4)
    timesteps: list[int] = field(default_factory=lambda: [999, 749])
    run_dir: str | None = None
    precision: Literal["no", "fp16", "bf16"] = "no"
    phases: list[Phase] = field(default_factory=list)


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_load_builds_nested_dataclasses(tmp_path):
    p = write(tmp_path / "r.yaml", """
model: tiny
scales: [1, 2, 4]
phases:
  - {steps: 10, lr: 1e-4}
  - steps: 5
    mode: mixture
    gan: {weight: 3, noise: true}
""")
    r = load_recipe(p, Recipe)
    assert r.model == "tiny" and r.scales == (1, 2, 4) and r.timesteps == [999, 749]
    assert r.phases[0] == Phase(steps=10, lr=1e-4)  # "1e-4" is a YAML string: accepted as a float
    assert isinstance(r.phases[0].lr, float)
    assert r.phases[1].gan == Gan(weight=3.0, noise=True) and isinstance(r.phases[1].gan.weight, float)
    assert r.phases[1].mode == "mixture"


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ValueError, match=r"phases\[1\]\.gan\.wieght.*valid keys: weight, noise"):
        load_recipe({"model": "m", "phases": [{"steps": 1}, {"steps": 2, "gan": {"wieght": 1}}]}, Recipe)
    with pytest.raises(ValueError, match=r"'modle'.*valid keys: model, seed"):
        load_recipe({"modle": "m"}, Recipe)


@pytest.mark.parametrize("data, match", [
    ({"model": "m", "seed": "x"}, r"seed: expected an integer, got 'x'"),
    ({"model": "m", "seed": 1.5}, r"seed: expected an integer"),
    ({"model": "m", "seed": True}, r"seed: expected an integer"),
    ({"model": 3}, r"model: expected a string"),
    ({"model": "m", "precision": "fp8"}, r"precision: value 'fp8' is not allowed; allowed values: \['no', 'fp16', 'bf16'\]"),
    ({"model": "m", "phases": [{"steps": 1, "lr": "fast"}]}, r"phases\[0\]\.lr: expected a number, got 'fast'"),
    ({"model": "m", "phases": [{"steps": 1, "mode": "both"}]}, r"phases\[0\]\.mode.*'both'.*allowed"),
    ({"model": "m", "phases": [{"steps": 1, "gan": {"noise": "yes please"}}]}, r"phases\[0\]\.gan\.noise"),
    ({"model": "m", "scales": 4}, r"scales: expected a list"),
    ({"model": "m", "scales": [1, "two"]}, r"scales\[1\]: expected an integer"),
    ({"model": "m", "phases": [{"lr": 1.0}]}, r"missing required recipe key\(s\) 'phases\[0\]\.steps'"),
    ({}, r"missing required recipe key\(s\) 'model'"),
    ({"model": "m", "phases": [{"steps": 0}]}, r"phases\[0\].*steps must be positive"),  # __post_init__
])
def test_bad_values_raise_value_error_with_path(data, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(data, Recipe)


def test_dict_recipe_may_hold_built_sections():
    r = load_recipe({"model": "m", "phases": [Phase(steps=2)]}, Recipe)
    assert r.phases == [Phase(steps=2)]


def test_optional_accepts_null_and_value():
    assert load_recipe({"model": "m", "run_dir": None}, Recipe).run_dir is None
    assert load_recipe({"model": "m", "run_dir": "out"}, Recipe).run_dir == "out"


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml", Recipe)


def test_overrides_set_nested_and_indexed_keys(tmp_path):
    p = write(tmp_path / "r.yaml", {"model": "m", "phases": [{"steps": 1}, {"steps": 2}]})
    r = load_recipe(p, Recipe, ["seed=7", "phases.1.lr=1e-6", "phases[0].gan.weight=0.5",
                                "scales=[8]", "precision=bf16", "run_dir=null"])
    assert r.seed == 7 and r.phases[1].lr == 1e-6 and r.phases[0].gan.weight == 0.5
    assert r.scales == (8,) and r.precision == "bf16" and r.run_dir is None
    # Values are YAML-parsed and then type-checked like the file's.
    with pytest.raises(ValueError, match="seed: expected an integer"):
        load_recipe(p, Recipe, ["seed=abc"])


@pytest.mark.parametrize("override, match", [
    ("sed=1", r"'sed' is not a recipe key; valid keys: model, seed"),
    ("phases.1.gan.wieght=1", r"'phases\[1\]\.gan\.wieght' is not a recipe key; valid keys in phases\[1\]\.gan: weight, noise"),
    ("phases.5.lr=1", r"index 5 is out of range for 'phases' which has 2 item"),
    ("phases.x.lr=1", r"must be an index"),
    ("seed.a=1", r"has no sub-keys"),
    ("seed", r"KEY=VALUE"),
])
def test_bad_override_keys(tmp_path, override, match):
    p = write(tmp_path / "r.yaml", {"model": "m", "phases": [{"steps": 1}, {"steps": 2}]})
    with pytest.raises(ValueError, match=match):
        load_recipe(p, Recipe, [override])


def test_base_file_is_deep_merged_under_recipe(tmp_path):
    (tmp_path / "common").mkdir()
    write(tmp_path / "common" / "root.yaml", {"model": "root", "seed": 1, "precision": "fp16"})
    write(tmp_path / "common" / "base.yaml", {"base": "root.yaml", "seed": 2, "timesteps": [1, 2, 3],
                                             "phases": [{"steps": 9}]})
    p = write(tmp_path / "demo.yaml", {"base": "common/base.yaml", "timesteps": [5], "model": "demo"})
    r = load_recipe(p, Recipe)
    # Deepest base first, nearer files win; lists replace whole.
    assert (r.model, r.seed, r.precision, r.timesteps, r.phases) == ("demo", 2, "fp16", [5], [Phase(steps=9)])


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "model": "a"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_recipe(tmp_path / "a.yaml", Recipe)
    write(tmp_path / "c.yaml", {"base": "gone.yaml", "model": "c"})
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        load_recipe(tmp_path / "c.yaml", Recipe)


def test_save_recipe_round_trips(tmp_path):
    r = load_recipe({"model": "m", "scales": [1, 8], "phases": [{"steps": 3, "lr": 2.5e-7, "mode": "mixture",
                                                                 "gan": {"weight": 1e-3, "noise": True}}]}, Recipe)
    path = save_recipe(r, tmp_path / "run" / "recipe.yaml")
    again = load_recipe(path, Recipe)
    assert again == r
    assert recipe_to_dict(r)["scales"] == [1, 8]
    assert dataclasses.asdict(again) == dataclasses.asdict(r)


def test_add_recipe_args_parses_the_shared_cli():
    parser = add_recipe_args(argparse.ArgumentParser())
    args = parser.parse_args(["r.yaml", "--set", "a=1", "--set", "b.c=2", "--resume", "--run-dir", "out"])
    assert args.recipe == Path("r.yaml") and args.overrides == ["a=1", "b.c=2"]
    assert args.resume is True and args.run_dir == Path("out")
    args = parser.parse_args(["r.yaml"])
    assert args.overrides == [] and args.resume is False and args.run_dir is None
