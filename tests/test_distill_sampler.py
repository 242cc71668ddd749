"""The student samples the same in our sampler and in a stock diffusers pipeline; the CLI runs a recipe."""

import torch
from diffusers import StableDiffusionPipeline

from tests.numerics import assert_close, close
from tests.test_core import perturb
from tsm_core import TSMConfig, attach
from tsm_distill.rollout import sample
from tsm_distill.sampler import generate, use_student_in_pipeline
from tsm_distill.student import Student
from tsm_distill.teacher import load_teacher


def test_stock_pipeline_with_student_matches_our_sampler(sd_pipeline_path):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_path), safety_checker=None)
    tsm = attach(pipe.unet, TSMConfig(scales=(1, 4), target_modules=["to_q", "to_v", "conv1", "conv2"]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    seen = []
    push = tsm.context.push
    tsm.context.push = lambda t: (seen.append(t.tolist()), push(t))[1]
    kwargs = use_student_in_pipeline(pipe, tsm)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe(["a cat"], height=size, width=size, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kwargs).images
    tsm.context.push = push
    assert seen == [[999], [749], [499], [249]]  # one UNet call per step, each routed by its own t

    # The same student through our sampler, with the pipeline's noise stream (one generator, in order).
    teacher = load_teacher(sd_pipeline_path)
    teacher.denoiser = pipe.unet  # the pipeline's UNet, which carries the experts
    student = Student(teacher, tsm)
    cond = {"encoder_hidden_states": pipe.encode_prompt(["a cat"], "cpu", 1, False)[0]}
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 4, 8, 8), generator=g)
    ours = sample(student.predict_x0(cond), noise, [999, 749, 499, 249], teacher, g)
    assert_close(latents, ours, rel=1e-4)
    tsm.set_mode("off")
    base = sample(student.predict_x0(cond), noise, [999, 749, 499, 249], teacher,
                  torch.Generator().manual_seed(0))
    assert not close(base, ours, rel=1e-3)


def test_generate_is_deterministic_and_pixel_space_works(pixel_pipeline_path):
    teacher = load_teacher(pixel_pipeline_path)
    assert teacher.vae is None
    tsm = attach(teacher.denoiser, TSMConfig(scales=(4,), target_modules=["to_q"]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    a = generate(teacher, tsm, ["a cat", "a dog", "a cat"], [0, 1, 0], batch_size=2)
    b = generate(teacher, tsm, ["a cat", "a dog", "a cat"], [0, 1, 0], batch_size=3)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert_close(a[0], b[0], rel=1e-4)


def test_cli_runs_a_recipe_and_resumes(pixel_pipeline_path, tmp_path):
    import yaml

    from tsm_distill.cli import main

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    recipe = {"model": {"path": str(pixel_pipeline_path)},
              "experts": {"rank": 2, "alpha": 2, "scales": [4], "target_modules": ["to_q"]},
              "data": {"prompts": str(tmp_path / "p.txt")},
              "train": {"sample_every": 0, "sample_prompts": ["a cat"], "sample_seeds": [0], "log_every": 1},
              "phases": [{"name": "e", "steps": 1, "scale": 4, "batch_size": 1}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    assert main([str(tmp_path / "r.yaml"), "--run-dir", str(run), "--set", "phases.0.steps=2"]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["phases"][0]["steps"] == 2
    assert len((run / "stats.jsonl").read_text().splitlines()) == 2
    # --resume of a finished run loads the last checkpoint and has nothing left to do
    assert main([str(tmp_path / "r.yaml"), "--run-dir", str(run), "--set", "phases.0.steps=2", "--resume"]) == 0
    assert len((run / "stats.jsonl").read_text().splitlines()) == 2


def test_prompts_from_shard_captions_and_clear_errors(tmp_path):
    import io

    import pytest
    import webdataset as wds
    from PIL import Image

    from tsm_distill.data import PromptSource

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as w:
        w.write({"__key__": "a", "png": buf.getvalue(), "txt": "a red cat"})
        w.write({"__key__": "b", "png": buf.getvalue(), "json": b'{"caption": "a blue dog"}'})
    src = PromptSource(str(tmp_path / "s-{0..0}.tar"))
    assert src.prompts == ["a red cat", "a blue dog"]
    assert set(src.sample(8, torch.Generator().manual_seed(0))) <= {"a red cat", "a blue dog"}
    with pytest.raises(FileNotFoundError):
        PromptSource(str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(ValueError, match="empty"):
        PromptSource("")
