"""Reliability probe of the distillation trainer and ``tsm-distill`` (issue 15), on the tiny models.

Each case is a user's realistic mistake or an interrupted run: resuming after the router phase, a
new run in a used folder, settings that used to fail only mid-run, ``mixed_precision: no``, one-line
CLI errors, and a non-finite score that used to pass as a loss of 0.
"""

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_distill import phase, recipe
from tsm_core.testing import tiny
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer, NonFiniteLossError, cli
from tsm_distill.critic import Critic
from tsm_distill.teacher import load_teacher


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def expert_then_router(steps=1, gan=True):
    """The paper's schedule in small: an expert phase, then the router (mixture) phase last."""
    return [phase("e3", steps=steps, scale=4, experts=[3]),
            phase("router", steps=steps, type="assemble", gan=gan)]


def adapter(run, name="adapter"):
    """(tensors, metadata) of a saved adapter folder."""
    path = run / name / "tsm_adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(path), meta


def assert_same_adapter(a, b):
    (ta, ma), (tb, mb) = a, b
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert ma == mb


def stats_steps(run):
    return [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]


def write_recipe(env, path, phases, **train):
    """The recipe of tests.test_distill.recipe as a YAML file, for the CLI."""
    d, pipe = env
    raw = {"model": {"path": str(pipe)},
           "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": ["to_q", "to_v", "conv1"]},
           "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
           "train": {"checkpoint_every": 1000, "sample_every": 0, "sample_prompts": ["a cat"], "sample_seeds": [0], "log_every": 1, **train},
           "phases": phases}
    path.write_text(yaml.safe_dump(raw))
    return path


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------- 1. resume after the router phase
def test_resume_after_the_router_phase_rebuilds_the_final_adapters(env, tmp_path):
    """Killed after the final checkpoint, while adapter/ was written (a 0-byte temp file, no adapter,
    no EMA adapter): --resume rebuilds both, equal to the uninterrupted run's, and exits cleanly."""
    run = tmp_path / "run"
    DMD2Trainer(recipe(env, expert_then_router(), ema_decay=0.5), run).train()
    ref = {name: adapter(run, name) for name in ("adapter", "adapter_ema")}
    assert ref["adapter"][1]["mode"] == "mixture"
    rows = stats_steps(run)

    (run / "adapter" / "tsm_adapter.safetensors").unlink()
    (run / "adapter" / ".tmp_killed.safetensors").write_bytes(b"")
    shutil.rmtree(run / "adapter_ema")
    out = DMD2Trainer(recipe(env, expert_then_router(), ema_decay=0.5), run).train(resume=True)

    assert out == run / "adapter"
    for name in ("adapter", "adapter_ema"):
        assert_same_adapter(adapter(run, name), ref[name])
    assert not list((run / "adapter").glob(".tmp_*"))
    assert stats_steps(run) == rows  # nothing trained again
    # Resuming the finished run once more is a no-op that rewrites the same adapters.
    DMD2Trainer(recipe(env, expert_then_router(), ema_decay=0.5), run).train(resume=True)
    assert_same_adapter(adapter(run), ref["adapter"])


# ---------------------------------------------------------------------------- 2. a used run folder
def test_new_run_in_a_used_folder_is_refused_and_keeps_the_old_run(env, tmp_path):
    run = tmp_path / "run"
    DMD2Trainer(recipe(env, [phase("e", scale=4)]), run).train()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already holds a run .*step_00000001.*--resume.*--overwrite"):
        DMD2Trainer(recipe(env, [phase("e", scale=4)]), run).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert stats_steps(run) == [1]
    from tsm_distill.trainer import check_run_folder

    with pytest.raises(ValueError, match="pass only one"):
        check_run_folder(run, resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        check_run_folder(tmp_path / "empty", resume=True)


def test_overwrite_starts_again_like_a_fresh_folder(env, tmp_path):
    """--overwrite clears the old run's checkpoints, phases/, adapters and rows, keeps other files, and
    the new run equals one in a fresh folder."""
    run = tmp_path / "run"
    DMD2Trainer(recipe(env, expert_then_router(gan=False), ema_decay=0.5), run).train()
    (run / "notes.txt").write_text("mine")
    new = [phase("lora", scale=1)]
    DMD2Trainer(recipe(env, new), run).train(overwrite=True)
    DMD2Trainer(recipe(env, new), tmp_path / "fresh").train()

    assert sorted(p.name for p in (run / "phases").iterdir()) == ["00_lora"]
    assert not (run / "adapter_ema").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert stats_steps(run) == [1]
    assert (run / "notes.txt").read_text() == "mine"
    assert_same_adapter(adapter(run), adapter(tmp_path / "fresh"))


def test_cli_refuses_a_used_folder_then_overwrites_it(env, tmp_path, capsys):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    run = tmp_path / "run"
    assert cli.main([str(path), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert cli.main([str(path), "--run-dir", str(run)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert cli.main([str(path), "--run-dir", str(run), "--overwrite"]) == 0
    assert stats_steps(run) == [1]


def test_resume_refuses_a_model_shape_change_and_records_other_changes(env, tmp_path, capsys):
    """--resume compares the recipe with the saved recipe.yaml first: a rank change is refused with
    recipe.yaml untouched; a learning-rate change is printed, kept in resume_history.jsonl and in
    recipe.yaml."""
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    run = tmp_path / "run"
    assert cli.main([str(path), "--run-dir", str(run)]) == 0
    saved = (run / "recipe.yaml").read_text()
    capsys.readouterr()
    assert cli.main([str(path), "--run-dir", str(run), "--resume", "--set", "experts.rank=8"]) == 2
    assert "experts.rank: 2 -> 8" in one_line_error(capsys)
    assert (run / "recipe.yaml").read_text() == saved
    assert cli.main([str(path), "--run-dir", str(run), "--resume", "--set", "phases.0.lr=5e-4"]) == 0
    assert "resume: phases.0.lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert yaml.safe_load((run / "recipe.yaml").read_text())["phases"][0]["lr"] == 5e-4
    history = [json.loads(x) for x in (run / "resume_history.jsonl").read_text().splitlines()]
    assert [c["key"] for c in history[-1]["changes"]] == ["phases.0.lr"]


def test_ctrl_c_writes_a_checkpoint_and_the_cli_says_how_to_resume(env, tmp_path, monkeypatch, capsys):
    """SIGINT in the router phase: the step under way finishes, a checkpoint is written, the CLI exits 130
    with the resume command; --resume then ends exactly like the uninterrupted run, with no repeated rows."""
    import os
    import signal

    path = write_recipe(env, tmp_path / "r.yaml", expert_then_router(steps=2))
    assert cli.main([str(path), "--run-dir", str(tmp_path / "ref")]) == 0
    calls = {"n": 0}
    original = DMD2Trainer.train_step

    def ctrl_c_in_step_3(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(DMD2Trainer, "train_step", ctrl_c_in_step_3)
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli.main([str(path), "--run-dir", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("interrupted: stopped at step 3 (SIGINT)") and err.endswith("plus --resume")
    assert (run / "checkpoints" / "step_00000003").is_dir() and not (run / "adapter").exists()
    monkeypatch.setattr(DMD2Trainer, "train_step", original)
    assert cli.main([str(path), "--run-dir", str(run), "--resume"]) == 0
    assert_same_adapter(adapter(run), adapter(tmp_path / "ref"))
    assert stats_steps(run) == stats_steps(tmp_path / "ref") == [1, 2, 3, 4]


# ---------------------------------------------------------------------------- 3 + 5. settings checked at start-up
BAD_SETTINGS = [
    (["phases.1.core_scale=8"], "core_scale 8 is not one of experts.scales"),
    (["phases.1.core_scale=1"], "core_scale 1 is not the finest"),
    (["phases.1.context_scales=[4]"], "contain the core scale 4"),
    (["phases.1.context_scales=[2]"], r"context scale\(s\) \[2\] are not among"),
    (["phases.1.context_scales=[]"], "at least one context scale"),
    (["train.checkpoint_every=0"], "checkpoint_every must be >= 1"),
    (["train.log_every=0"], "log_every must be >= 1"),
    (["train.sample_every=-1"], "sample_every must be >= 0"),
    (["train.max_step_percent=2.0"], "0 <= min <= max <= 1"),
    (["train.min_step_percent=-0.1"], "0 <= min <= max <= 1"),
    (["train.min_step_percent=0.6", "train.max_step_percent=0.5"], "0 <= min <= max <= 1"),
    (["phases.0.steps=0", "phases.1.steps=0"], "every phase has 0 steps"),
    (["experts.rnk=8"], "'experts.rnk' is not a recipe key"),
    (["model.path=/no/such/teacher"], "not found"),
    (["teacher=/no/such/teacher"], "was renamed: write model"),
]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[o[0] for o, _ in BAD_SETTINGS])
def test_bad_settings_stop_the_cli_before_training_with_one_line(env, tmp_path, capsys, overrides, message):
    import re

    path = write_recipe(env, tmp_path / "r.yaml", expert_then_router(gan=False))
    run = tmp_path / "run"
    args = [str(path), "--run-dir", str(run)] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (run / "checkpoints").exists() and not (run / "stats.jsonl").exists()


def test_zero_iterations_in_some_phases_and_sampling_off_are_allowed(env):
    r = recipe(env, [phase("e", steps=0, scale=4), phase("l", scale=1)], sample_every=0)
    assert r.train.sample_every == 0 and r.phases[0].steps == 0


def test_max_step_percent_1_draws_the_last_timestep_not_past_it(env, tmp_path, monkeypatch):
    tr = DMD2Trainer(recipe(env, [phase("e", scale=4)], min_step_percent=1.0, max_step_percent=1.0), tmp_path / "r")
    tr.enter_phase(0)
    seen = []
    predict = Critic.predict
    monkeypatch.setattr(Critic, "predict", lambda self, x, t, c: seen.append(t.clone()) or predict(self, x, t, c))
    tr.generator_step(torch.randn(2, 3, 16, 16), torch.full((2,), 999), tr.teacher.encode_prompts(["a", "b"]))
    assert torch.equal(torch.cat(seen), torch.full((2,), 999))  # DMD2 clamps at T - 1


def test_gan_reals_of_another_size_are_refused_at_start(env, tmp_path):
    d, _ = env
    torch.save(torch.rand(4, 3, 8, 8), tmp_path / "small.pt")
    r = recipe(env, [phase("g", scale=4, gan=True)])
    r.data.real_images = str(tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*generates \(3, 16, 16\) \(16 px.*data.resolution: 16"):
        DMD2Trainer(r, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def teacher_2px(tmp_path_factory):
    """A pixel-space teacher at 2x2 px: its UNet's bottleneck is 1x1, smaller than the GAN head's kernels."""
    from diffusers import StableDiffusionPipeline

    d = tmp_path_factory.mktemp("teacher_2px")
    tok = tiny.write_clip_tokenizer(d / "_tok")
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=tiny.build_text_encoder(d / "_te", vocab_size=len(tok)), tokenizer=tok,
        unet=tiny.build_unet(d / "_unet", in_channels=3, sample_size=2), scheduler=tiny.build_scheduler(d / "_s"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(d / "pipe"))
    torch.save(torch.rand(4, 3, 2, 2), d / "real.pt")
    return d


def test_gan_head_that_cannot_fit_the_bottleneck_is_refused_at_start(env, teacher_2px, tmp_path):
    r = recipe(env, [phase("g", scale=4, gan=True)])
    r.model.path, r.data.real_images = str(teacher_2px / "pipe"), str(teacher_2px / "real.pt")
    with pytest.raises(ValueError, match=r"resolution 2 px \(2x2 in model space\).*1x1 bottleneck"):
        DMD2Trainer(r, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    r.phases[0].gan = False  # without a GAN phase the same teacher is fine
    DMD2Trainer(r, tmp_path / "run")


def test_gan_head_is_sized_from_the_measured_bottleneck(env):
    teacher = load_teacher(env[1])
    critic = Critic(teacher)
    cond = teacher.encode_prompts([""])
    assert critic.head_resolution == 8  # the config's estimate: 16 px, two levels
    assert critic.fit_head(torch.zeros(1, 3, 32, 32), cond) == (16, 16)
    assert critic.head_resolution == 16
    assert critic.discriminate(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long),
                                {"encoder_hidden_states": cond["encoder_hidden_states"].expand(2, -1, -1)}).shape == (2,)
    with pytest.raises(ValueError, match="1x1 bottleneck"):
        critic.fit_head(torch.zeros(1, 3, 2, 2), cond)


# ---------------------------------------------------------------------------- 4. mixed_precision: no
def test_mixed_precision_no_in_yaml_is_accepted(env, tmp_path):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    text = path.read_text().replace("train:\n", "train:\n  mixed_precision: no\n", 1)
    assert "mixed_precision: no" in text
    path.write_text(text)
    assert load_recipe(path, DistillRecipe).train.mixed_precision == "no"
    assert load_recipe(path, DistillRecipe, ["train.mixed_precision=bf16", "train.mixed_precision=no"]) \
        .train.mixed_precision == "no"
    with pytest.raises(ValueError, match="not allowed"):  # false means no only where "no" is a choice
        load_recipe(path, DistillRecipe, ["experts.router_activation=no"])
    with pytest.raises(ValueError, match="not allowed"):
        load_recipe(path, DistillRecipe, ["train.mixed_precision=yes"])


# ---------------------------------------------------------------------------- 5. tracebacks stay for bugs
def test_cli_keeps_tracebacks_for_bugs(env, tmp_path, monkeypatch):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])

    def broken_step(self):
        raise ValueError("a bug inside a training step")

    monkeypatch.setattr(DMD2Trainer, "train_step", broken_step)
    with pytest.raises(ValueError, match="a bug inside"):
        cli.main([str(path), "--run-dir", str(tmp_path / "a")])

    def broken_init(self, *a, **k):
        raise RuntimeError("not a user's mistake")

    monkeypatch.setattr(DMD2Trainer, "__init__", broken_init)
    with pytest.raises(RuntimeError):
        cli.main([str(path), "--run-dir", str(tmp_path / "b")])


# ---------------------------------------------------------------------------- 6. non-finite scores
# A non-finite guidance is now refused at load; the step-1 guard is tested with the value set after load:
# tests/test_reliability_settings.py::test_a_non_finite_guidance_set_after_load_still_stops_the_run_at_step_1


def test_non_finite_fake_score_stops_the_run(env, tmp_path, monkeypatch):
    original = DMD2Trainer._fake_x0_fp32
    monkeypatch.setattr(DMD2Trainer, "_fake_x0_fp32", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="fake score"):
        DMD2Trainer(recipe(env, [phase("e", scale=4)]), tmp_path / "run").train()


# ---------------------------------------------------------------------------- timesteps that have no interval
@pytest.mark.parametrize("t, message", [
    (torch.tensor([float("nan"), 10.0]), "finite numbers, got \\[nan\\]"),
    (torch.tensor([float("inf")]), "finite numbers, got \\[inf\\]"),
    (torch.tensor([True, False]), "got booleans"),
    (True, "got booleans"),
])
def test_nan_and_boolean_timesteps_are_refused(t, message):
    from tsm_core import TimestepIntervals, TSMConfig, attach

    iv = TimestepIntervals(1000, (1, 4))
    with pytest.raises(ValueError, match=message):
        iv.index(t, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    tsm = attach(model, TSMConfig(rank=2, alpha=2, scales=(1, 4), target_modules=["0"]))
    tsm.set_mode("expert", scale=4)
    with pytest.raises(ValueError, match=message):
        with tsm.timesteps(t):
            model(torch.zeros(2, 4))


def test_cli_reports_a_full_disk_mid_run_in_one_line(env, tmp_path, monkeypatch, capsys):
    import shutil as sh

    import tsm_core.train.checkpoint as ck

    def full(obj, path):
        monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9, 0))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ck, "_torch_save", full)
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e", scale=4)])
    assert cli.main([str(path), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line, no traceback
    assert err.startswith("error: could not write checkpoint step 1: no space left on the device")
    assert err.endswith("no checkpoint was written yet; free space, then start again")


# ---------------------------------------------------------------------------- truncated shards
def _write_shard(path, first: int, n: int = 6):
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i in range(first, first + n):
            png = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
            for ext, data in (("png", png.getvalue()), ("txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_truncated_shards_are_reported_by_name_not_as_one_skipped_sample(tmp_path):
    from tsm_core.data.images import webdataset_image_text

    for name, first in (("a", 0), ("b", 100), ("c", 200)):
        _write_shard(tmp_path / f"{name}.tar", first)
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 3 + 100])  # cut inside a member: tarfile raises
    import tarfile

    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("0102.png").offset  # after two whole samples
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[:cut])  # cut at a member boundary: tarfile stops silently
    ds = webdataset_image_text(str(tmp_path / "*.tar"), resolution=8, shuffle=0)
    texts = [it["text"] for it in ds]
    counter = ds.skip_counter
    assert counter.count == 0  # no sample was unreadable: two shards were cut short
    assert sorted(counter.lost_shards) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert counter.read[str(tmp_path / "c.tar")] == 6 == sum(t.startswith("sample 2") for t in texts)
    got_a = sum(t in {f"sample {i}" for i in range(6)} for t in texts)
    assert 0 < got_a < 6 and counter.read[str(tmp_path / "a.tar")] == got_a
    summary = counter.summary()
    assert summary.startswith("0 unreadable sample(s) skipped; 2 shard(s) could not be read to the end")
    assert f"a.tar (cut short after {got_a} samples" in summary and "b.tar (cut short after 2 samples" in summary


def test_a_data_set_without_a_readable_batch_names_its_shards(tmp_path):
    from tsm_core.data.stream import batch_stream, build_dataset
    from tsm_core.finetune.recipe import DataSection

    for name in ("x", "y"):
        (tmp_path / f"{name}.tar").write_bytes(b"\0" * 100 + b"garbage" * 200)
    cfg = DataSection(source="webdataset", path=str(tmp_path / "*.tar"), resolution=8, shuffle_buffer=0)
    stream = batch_stream(build_dataset(cfg), cfg, batch_size=2, seed=0, start_batch=0)
    with pytest.raises(ValueError, match=r"no batches.*shards .*x\.tar, .*y\.tar.*could not be read to the end"):
        next(stream)


def test_real_shards_serve_each_phases_own_batch_size(tmp_path):
    """The GAN phases of one recipe may use different batches: a shard stream must follow each call's
    size (it used to keep the first call's)."""
    from tsm_distill.data import RealSource

    _write_shard(tmp_path / "r.tar", 0)
    source = RealSource(str(tmp_path / "r.tar"), 16, encode=lambda x, g: x)
    g = torch.Generator().manual_seed(0)
    sizes = [len(source.sample(n, g, "cpu")[0]) for n in (2, 4, 3)]
    latents, captions = source.sample(5, g, "cpu")
    assert sizes == [2, 4, 3] and latents.shape == (5, 3, 16, 16)
    assert len(captions) == 5 and all(c.startswith("sample ") for c in captions)
