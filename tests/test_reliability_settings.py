"""Reliability round 2 (issue 28, part A): settings checked when the recipe loads, YAML mistakes in one
line, phase names that cannot leave the run folder, and data sources read before the first step.

Each case is a mistake a probe found passing the load and failing later (a traceback at step 1, or an
adapter written outside the run folder); here each must stop at load, or before step 1, with one
``error:`` line through the CLI.
"""

import io
import re
import tarfile

import pytest
import torch
import yaml

from tests.test_distill import phase, recipe
from tests.test_reliability import expert_then_router, one_line_error, write_recipe
from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer
from tsm_core.finetune import cli as finetune_cli
from tsm_core.testing import tiny
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer, cli


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(folder, tiny teacher) as tests.test_reliability's ``env``, which its helpers take."""
    d = tmp_path_factory.mktemp("settings")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def assert_nothing_trained(run):
    assert not (run / "checkpoints").exists() and not (run / "phases").exists()
    stats = run / "stats.jsonl"
    assert not stats.exists() or stats.read_text() == ""


def last_line_error(capsys):
    """The one ``error:`` line a CLI ends with once models have loaded (their progress bars come first)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def run_cli(main, path, run, *overrides):
    """``main`` (a training CLI) on ``path`` with ``--set`` overrides; returns its exit status."""
    return main([str(path), "--run-dir", str(run)] + [a for o in overrides for a in ("--set", o)])


def tar(path, members):
    """A tar shard holding ``members`` (name -> bytes)."""
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def png(size=16):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- 1-2. YAML mistakes
def test_a_yaml_syntax_error_in_the_recipe_is_one_line_naming_the_file_and_line(env, tmp_path, capsys):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    lines = path.read_text().splitlines()
    lines.insert(3, "  seed: [1")  # an unclosed list inside a mapping: yaml.parser.ParserError
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(path.read_text())
    assert run_cli(cli.main, path, tmp_path / "run") == 2
    err = one_line_error(capsys)
    assert str(path) in err and re.search(r"line \d+", err) and "YAML" in err


def test_a_yaml_error_in_a_base_file_names_that_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n\tseed: 1\n")  # a tab: yaml.scanner.ScannerError
    (tmp_path / "r.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ValueError, match=r"base\.yaml.*line 2"):
        load_recipe(tmp_path / "r.yaml", DistillRecipe)


def test_bad_yaml_in_a_set_value_is_one_line_naming_the_argument(env, tmp_path, capsys):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    assert run_cli(cli.main, path, tmp_path / "run", "train.seed=[1") == 2
    err = one_line_error(capsys)
    assert "--set train.seed=[1" in err and "YAML" in err
    assert_nothing_trained(tmp_path / "run")


# ---------------------------------------------------------------------------- 4-6, 8. settings checked at load
REFUSED_AT_LOAD = [
    # Non-finite numbers: refused wherever a float is read, named by their key.
    ("train.real_guidance_scale=inf", r"train\.real_guidance_scale.*finite"),
    ("train.real_guidance_scale=nan", r"train\.real_guidance_scale.*finite"),
    ("phases.0.lr=.inf", r"phases\[0\]\.lr.*finite"),
    ("phases.0.lr_critic=-.inf", r"phases\[0\]\.lr_critic.*finite"),
    ("phases.1.gan_generator_weight=.nan", r"phases\[1\]\.gan_generator_weight.*finite"),
    ("train.max_grad_norm=.inf", r"train\.max_grad_norm.*finite"),
    ("experts.alpha=.inf", r"experts\.alpha.*finite"),
    ("train.ema_decay=.nan", r"train\.ema_decay.*finite"),
    # Numbers that must be positive (or at least 0).
    ("phases.0.lr=0", r"phases\[0\].*lr must be > 0"),
    ("phases.0.lr_critic=-1e-5", r"phases\[0\].*lr_critic must be > 0"),
    ("phases.0.weight_decay=-0.1", r"phases\[0\].*weight_decay must be >= 0"),
    ("phases.1.gan_critic_weight=-1", r"phases\[1\].*gan_critic_weight must be >= 0"),
    ("phases.0.warmup_steps=-1", r"phases\[0\].*warmup_steps must be >= 0"),
    ("train.ema_decay=1.5", r"ema_decay must lie in \(0, 1\)"),
    ("experts.alpha=0", r"experts.*alpha must be positive"),
    ("experts.rank=0", r"experts.*rank must be a positive integer"),
    ("experts.dropout=1.0", r"experts.*dropout must lie in \[0, 1\)"),
    ("critic.lora_rank=0", r"critic.*lora_rank must be >= 1"),
    ("data.resolution=0", r"data.*resolution must be >= 1"),
    # 6. diffusion-GAN timesteps: used to be a traceback at the first GAN step.
    ("critic.diffusion_gan_max_timestep=0", r"diffusion_gan_max_timestep must lie in \[1, 1000\]"),
    ("critic.diffusion_gan_max_timestep=1001", r"diffusion_gan_max_timestep must lie in \[1, 1000\]"),
    # 8. thread count: used to be torch's RuntimeError.
    ("train.threads=-1", r"train\.threads must be >= 1"),
]


@pytest.mark.parametrize("override,message", REFUSED_AT_LOAD, ids=[o for o, _ in REFUSED_AT_LOAD])
def test_distill_settings_that_would_fail_mid_run_are_refused_at_load(env, tmp_path, override, message):
    path = write_recipe(env, tmp_path / "r.yaml", expert_then_router())
    with pytest.raises(ValueError, match=message):
        load_recipe(path, DistillRecipe, [override])


def test_a_non_finite_guidance_set_after_load_still_stops_the_run_at_step_1(env, tmp_path):
    """The run's own guard stays behind the load-time check: a value set on a loaded recipe (no check
    runs then) still stops at step 1 with no checkpoint, not a run that learns nothing."""
    from tsm_distill import NonFiniteLossError

    r = recipe(env, [phase("e", steps=2, scale=4)])
    r.train.real_guidance_scale = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"real score .*real_guidance_scale inf.* at step 1\b.*no checkpoint"):
        DMD2Trainer(r, tmp_path / "run").train()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override", ["train.real_guidance_scale=inf", "phases.0.lr=.inf",
                                      "critic.diffusion_gan_max_timestep=0", "train.threads=-1"])
def test_the_cli_refuses_them_in_one_line_before_training(env, tmp_path, capsys, override):
    path = write_recipe(env, tmp_path / "r.yaml", expert_then_router())
    assert run_cli(cli.main, path, tmp_path / "run", override) == 2
    assert override.split("=")[0].split(".")[-1] in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_zero_threads_and_finite_extremes_still_load(env, tmp_path):
    """0 (or null) threads means torch's default, as before; large finite numbers are settings, not errors."""
    path = write_recipe(env, tmp_path / "r.yaml", expert_then_router())
    r = load_recipe(path, DistillRecipe, ["train.threads=0", "train.real_guidance_scale=1e30", "train.ema_decay=0"])
    assert r.train.threads == 0 and r.train.real_guidance_scale == 1e30
    assert load_recipe(path, DistillRecipe, ["train.threads=null", "train.max_grad_norm=null"]).train.threads is None


def finetune_raw(model_path, data_path, run_dir, source="folder"):
    return {"model": {"path": str(model_path)},
            "data": {"source": source, "path": str(data_path), "resolution": 16, "shuffle_buffer": 0},
            "experts": {"rank": 2, "alpha": 2},
            "stages": [{"type": "foster", "scale": 2, "steps": 1}],
            "train": {"run_dir": str(run_dir), "batch_size": 2, "log_every": 1, "tensorboard": False,
                      "sample_prompts": []},
            "recipe_version": 2}


FINETUNE_REFUSED = [
    ("stages.0.lr=.inf", r"stages\[0\]\.lr.*finite"),
    ("stages.0.text_encoder_lr=.nan", r"stages\[0\]\.text_encoder_lr.*finite"),
    ("train.adam_eps=.nan", r"train\.adam_eps.*finite"),
    ("train.adam_beta2=inf", r"train\.adam_beta2.*finite"),
    ("train.guidance_scale=-.inf", r"train\.guidance_scale.*finite"),
    ("train.adam_beta1=1.0", r"adam_beta1 must lie in \[0, 1\)"),
    ("train.adam_eps=0", r"adam_eps must be > 0"),
    ("train.batch_size=0", r"batch_size must be >= 1"),
    ("train.gradient_accumulation_steps=0", r"gradient_accumulation_steps must be >= 1"),
    ("train.sample_steps=0", r"sample_steps must be >= 1"),
    ("stages.0.weight_decay=-1", r"stages\[0\].*weight_decay must be >= 0"),
    ("stages.0.text_encoder_lr=0", r"stages\[0\].*text_encoder_lr must be > 0"),
    ("stages.0.warmup_steps=-1", r"stages\[0\].*warmup_steps must be >= 0"),
    ("data.resolution=0", r"data.*resolution must be >= 1"),
    ("data.num_workers=-1", r"data.*num_workers must be >= 0"),
    ("train.threads=1", r"'train.threads' is not a recipe key"),  # the fine-tuner has none: unchanged
]


@pytest.mark.parametrize("override,message", FINETUNE_REFUSED, ids=[o for o, _ in FINETUNE_REFUSED])
def test_finetune_settings_that_would_fail_mid_run_are_refused_at_load(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(finetune_raw(tmp_path / "model", tmp_path, tmp_path / "run"), FinetuneRecipe, [override])


# ---------------------------------------------------------------------------- 9. phase names
@pytest.mark.parametrize("name", ["../../../escaped", "a/b", "a\\b", "..", ".", "", "  ", "x\0y"])
def test_phase_names_must_be_plain_folder_names(env, tmp_path, name):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    raw = yaml.safe_load(path.read_text())
    raw["phases"][0]["name"] = name
    with pytest.raises(ValueError, match=r"phases\[0\].*name"):
        load_recipe(raw, DistillRecipe)


def test_a_phase_named_to_escape_is_refused_by_the_cli_and_writes_nothing(env, tmp_path, capsys):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("../../../escaped", scale=4)])
    run = tmp_path / "a" / "b" / "run"
    assert run_cli(cli.main, path, run) == 2
    assert "folder name" in one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("*escaped*"))


def test_phase_folders_are_checked_to_stay_inside_phases(env, tmp_path):
    """The defensive check where the folders are built: a name that slipped past the recipe's check (set
    after loading) is refused, and nothing is written outside phases/."""
    from tsm_core.finetune.trainer import phase_folder
    from tsm_core.train.sections import child_folder

    run = tmp_path / "run"
    assert child_folder(run / "phases", "00_e") == run / "phases" / "00_e"
    for parts in (("a", "../../x"), ("..",), ("/etc",), ()):
        with pytest.raises(ValueError, match="would lie outside"):
            child_folder(run / "phases", *parts)
    with pytest.raises(ValueError, match="would lie outside"):
        phase_folder(run, 0, "../../../x")  # phases/00_.., .., .., x: run/x, beside phases/
    tr = DMD2Trainer(recipe(env, [phase("e", scale=4)]), run)
    tr.recipe.phases[0].name = "../../../escaped"  # the probe's name: it used to land in run/escaped
    with pytest.raises(ValueError, match="would lie outside"):
        tr.end_phase(0)
    assert not list(tmp_path.rglob("*escaped*"))


# ---------------------------------------------------------------------------- 7. data read at start-up
def test_real_shards_without_images_stop_the_cli_before_step_1(env, tmp_path, capsys, monkeypatch):
    """Shards whose samples have no image (or no caption): one line at start-up, not a traceback at the
    first GAN step."""
    shard = tar(tmp_path / "real.tar", {"0000.cls": b"3", "0000.txt": b"a cat", "0001.cls": b"1"})
    path = write_recipe(env, tmp_path / "r.yaml", [phase("g", scale=4, gan=True)])
    steps = []
    monkeypatch.setattr(DMD2Trainer, "train_step", lambda self: steps.append(1) or {})
    assert run_cli(cli.main, path, tmp_path / "run", f"data.real_images={shard}") == 2
    err = last_line_error(capsys)
    assert "data.real_images" in err and str(shard) in err and "no image" in err
    assert steps == []


def test_real_shards_without_captions_are_refused_when_the_source_opens(tmp_path):
    from tsm_distill.data import RealSource

    shard = tar(tmp_path / "real.tar", {"0000.png": png(), "0001.png": png()})
    with pytest.raises(ValueError, match=r"real\.tar.*no caption"):
        RealSource(str(shard), 16, encode=lambda x, g: x)


def test_finetune_shards_without_images_stop_the_cli_before_step_1(pixel_pipeline_path, tmp_path, capsys, monkeypatch):
    shard = tar(tmp_path / "d.tar", {"0000.txt": b"a cat", "0001.txt": b"a dog"})
    path = tmp_path / "r.yaml"
    run = tmp_path / "run"
    path.write_text(yaml.safe_dump(finetune_raw(pixel_pipeline_path, shard, run, source="webdataset")))
    steps = []
    monkeypatch.setattr(FinetuneTrainer, "train_step", lambda self: steps.append(1) or {})
    assert run_cli(finetune_cli.main, path, run) == 2
    err = last_line_error(capsys)
    assert "data.path" in err and str(shard) in err and "no image" in err
    assert steps == []
    assert_nothing_trained(run)


def test_finetune_first_batch_read_at_start_is_the_first_batch_trained(pixel_pipeline_path, tmp_path, monkeypatch):
    """Reading ahead at start-up must not skip or repeat a batch: the steps see the batches an unchecked
    stream gives, in order."""
    import json

    from tsm_core.data.stream import batch_stream, build_dataset

    root = tmp_path / "imgs"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(6):
            (root / f"{i}.png").write_bytes(png())
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"p{i}"}) + "\n")
    r = load_recipe(finetune_raw(pixel_pipeline_path, root, tmp_path / "run"), FinetuneRecipe, ["stages.0.steps=3"])
    seen = []
    latents = FinetuneTrainer._latents
    monkeypatch.setattr(FinetuneTrainer, "_latents", lambda self, b, g: seen.append(b["text"]) or latents(self, b, g))
    FinetuneTrainer(r).train()
    expected = batch_stream(build_dataset(r.data), r.data, 2, r.train.seed, start_batch=0)
    assert seen == [next(expected)["text"] for _ in range(3)]
