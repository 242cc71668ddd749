"""FLUX.1 as a teacher and a fine-tuning backbone (issue 27 item 5), on a tiny FluxPipeline built from config:
packing and shift as diffusers' FluxPipeline does them, the guidance embedding in DMD2's three scores, the
rollout's per-step experts, the steps' parameters, the CLI end to end, a stock FluxPipeline sampling the
student, tsm-finetune, the planner, and the shipped FLUX.1-dev config folder."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.numerics import assert_close, close
from tests.test_core import perturb
from tests.test_distill import changed, measured_step_peaks, params, phase
from tests.test_finetune import _png
from tsm_core import TSMConfig, attach
from tsm_core.models import FluxBackbone, load_backbone
from tsm_core.models.flux import image_ids, pack_latents, unpack_latents
from tsm_core.testing.tiny_flux import build_flux_pipeline
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer
from tsm_distill.rollout import backward_simulation, renoise, sample
from tsm_distill.student import Student
from tsm_distill.teacher import encode

SIDE = 16  # latent side of the tiny pipeline: 8x8 packed tokens, 32 px images
SIGMAS = [1.0, 0.749, 0.499, 0.249]
TARGETS = ["to_q", "to_v", "add_q_proj", "proj_out"]  # both stream kinds; proj_out: the single blocks' output
LEN = 8  # T5 prompt length of the tests


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.randn(8, 4, SIDE, SIDE), d / "real.pt")
    return d, build_flux_pipeline(d / "flux", sample_size=SIDE)


def teacher_of(path) -> FluxBackbone:
    return load_backbone("flux", path, max_sequence_length=LEN)


def recipe(flux, phases, **train):
    d, path = flux
    return {"model": {"path": str(path), "kind": "flux", "max_sequence_length": LEN}, "student_sigmas": SIGMAS,
            "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": TARGETS},
            "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
            "train": {"checkpoint_every": 1000, "sample_every": 0, "sample_prompts": ["a cat"], "sample_seeds": [0],
                      "log_every": 1, **train},
            "phases": phases}


def test_packing_ids_and_shift_are_flux_pipelines(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    x = torch.randn(2, 4, 6, 10)
    packed = FluxPipeline._pack_latents(x, 2, 4, 6, 10)
    assert torch.equal(pack_latents(x), packed) and torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 6))

    # The tiny pipeline has FLUX.1-dev's scheduler config: mu 1.15 at 1024 px (128 latents), 0.5 at 256 tokens
    bb = teacher_of(flux[1])
    assert bb.mu(128) == pytest.approx(calculate_shift(64 * 64)) == pytest.approx(1.15)
    assert bb.latent_size == SIDE and bb.mu() == pytest.approx(calculate_shift((SIDE // 2) ** 2))
    # DMD's timesteps are warped as the scheduler warps its own sigmas at the training size
    sched = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
    s = torch.tensor([1.0, 0.9, 0.6, 0.25, 0.02])
    sched.set_timesteps(sigmas=s.numpy(), mu=bb.mu())
    assert_close(bb.shift_timesteps(s * 1000), sched.timesteps, rel=1e-6)
    assert bb.shift_timesteps(torch.tensor([0.0]))[0] == 0  # finite at sigma 0
    # sampling: FluxPipeline's grid linspace(1, 1/steps) shifted by the image size's mu
    ours = bb.sampling_scheduler()
    bb.set_sampling_timesteps(ours, 4, 64, "cpu")
    sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=calculate_shift(32 * 32))
    assert_close(ours.sigmas, sched.sigmas, rel=1e-6)


def test_real_score_is_one_pass_at_real_guidance_while_student_fake_and_d_run_at_the_embedded_one(flux, tmp_path,
                                                                                                  monkeypatch):
    r = recipe(flux, [phase("g", scale=4, experts=[3], gan=True)], real_guidance_scale=5.0)
    tr = DMD2Trainer(load_recipe(r, DistillRecipe), tmp_path / "run")
    tr.enter_phase(0)
    seen = []
    forward = type(tr.teacher.denoiser).forward

    def spy(self, *a, guidance=None, hidden_states=None, **kw):
        seen.append((self is tr.critic.fake, hidden_states.shape[0], sorted(set(guidance.tolist()))))
        return forward(self, *a, guidance=guidance, hidden_states=hidden_states, **kw)

    monkeypatch.setattr(type(tr.teacher.denoiser), "forward", spy)
    cond = encode(tr.teacher, ["a cat", "a dog"])
    tr.generator_step(torch.randn(2, 4, SIDE, SIDE), torch.full((2,), 1000.0), cond)
    # generator, fake score (DMD), real score, D (G's GAN loss): every call 2 rows; only the real score at 5
    assert seen == [(False, 2, [3.5]), (True, 2, [3.5]), (False, 2, [5.0]), (True, 2, [3.5])]
    # FLUX.1-dev's resolution shift warps the DMD timesteps: k = e^mu at the native 8x8 tokens
    k = torch.exp(torch.tensor(tr.teacher.mu()))
    assert_close(tr.teacher.shift_timesteps(torch.tensor([500.0])), (k * 500 / (1 + (k - 1) * 0.5)).reshape(1), rel=1e-6)


def test_a_flux_without_guidance_embedding_guides_its_real_score_with_cfg(tmp_path):
    bb = teacher_of(build_flux_pipeline(tmp_path, sample_size=8, guidance_embeds=False))  # FLUX.1-schnell's shape
    assert not bb.guidance_distilled
    cond, uncond = bb.encode_prompts(["a cat"]), bb.unconditional()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([600.0])
    with torch.no_grad():
        c, u = bb.predict(x, t, cond), bb.predict(x, t, uncond)
        assert_close(bb.guided_predict(x, t, cond, uncond, 3.0), u + 3.0 * (c - u), rel=1e-5)


def test_rollout_routes_each_step_through_its_own_expert(flux):
    teacher = teacher_of(flux[1])
    tsm = attach(teacher.denoiser, TSMConfig(scales=(4,), target_modules=TARGETS))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    ts = load_recipe(recipe(flux, [phase("e", scale=4)]), DistillRecipe).timesteps(teacher.num_timesteps)
    assert ts == pytest.approx([1000.0, 749.0, 499.0, 249.0])
    cond = encode(teacher, ["a cat", "a dog"])
    noise = torch.randn(2, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    got = backward_simulation(Student(teacher, tsm).predict_x0(cond), noise, 3, ts, teacher,
                              torch.Generator().manual_seed(1))

    def manual(expert_t):
        # Each step's expert fused into the weights (tsm.merged), the transformer called by hand.
        g, x = torch.Generator().manual_seed(1), noise
        for i in range(3):
            t = torch.full((2,), ts[i])
            with tsm.merged(expert_t(i)), torch.no_grad():
                x0 = teacher.to_x0(x, teacher.predict(x, t, cond), t)
            x = renoise(x0, ts[i + 1], teacher, g)
        return x

    assert_close(got, manual(lambda i: ts[i]), rel=1e-5)
    assert not close(got, manual(lambda i: ts[3]), rel=1e-3)  # step 3's expert everywhere: another input


def test_generator_and_critic_steps_touch_only_their_parameters(flux, tmp_path):
    r = recipe(flux, [phase("e2gan", scale=4, experts=[2], gan=True)], real_guidance_scale=4.0)
    tr = DMD2Trainer(load_recipe(r, DistillRecipe), tmp_path / "run")
    tr.enter_phase(0)
    cond = encode(tr.teacher, ["a cat", "a dog"])
    t = torch.full((2,), tr.timesteps[1])  # sigma 0.749: expert 2 of 4
    gen0, crit0 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.generator_step(torch.randn(2, 4, SIDE, SIDE), t, cond)
    gen_changed = changed(gen0, tr.teacher.denoiser)
    assert gen_changed and all(".s4_e2" in n for n in gen_changed), sorted(gen_changed)[:5]
    # the current expert on every targeted layer of both block kinds, and nothing else
    assert {n.rsplit(".lora_", 1)[0] for n in gen_changed} == set(tr.tsm.layers)
    assert any(n.startswith("single_transformer_blocks.") for n in tr.tsm.layers)
    assert not changed(crit0, tr.critic)
    assert torch.isfinite(logs["loss_dmd"]) and torch.isfinite(logs["loss_gan_generator"])
    gen1, crit1 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    assert not changed(gen1, tr.teacher.denoiser)
    crit_changed = changed(crit1, tr.critic)
    assert any(n.startswith("head.") for n in crit_changed) and any(n.startswith("fake.") for n in crit_changed)
    assert torch.isfinite(logs["loss_gan_critic"])


def test_cli_distills_both_stages_end_to_end_and_the_student_loads(flux, tmp_path):
    from tsm_distill.cli import main
    from tsm_distill.sampler import generate
    from tsm_distill.trainer import load_student

    phases = [phase("e3", scale=4, experts=[3]), phase("e3gan", scale=4, experts=[3], gan=True),
              phase("router", type="assemble", core_scale=4, context_scales=[1], gan=True)]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(flux, phases)))
    run = tmp_path / "run"
    assert main([str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 3 and all(torch.isfinite(torch.tensor(s["loss_dmd"])) for s in stats)
    assert "loss_gan_critic" in stats[1] and "loss_gan_critic" not in stats[0]
    teacher, tsm = load_student(flux[1], run / "adapter", kind="flux", max_sequence_length=LEN)
    assert tsm.mode == "mixture" and teacher.max_sequence_length == LEN
    timesteps = load_recipe(run / "recipe.yaml", DistillRecipe).timesteps(teacher.num_timesteps)
    images = generate(teacher, tsm, ["a cat", "a dog"], [0, 1], timesteps)
    assert images.shape == (2, 3, 2 * SIDE, 2 * SIDE) and torch.isfinite(images).all()
    assert not close(images[0], images[1], rel=1e-3)  # two prompts and seeds, two images


def test_stock_flux_pipeline_samples_the_student_like_our_rollout(flux, monkeypatch):
    import diffusers.schedulers.scheduling_flow_match_lcm as lcm
    from diffusers import FluxPipeline

    from tsm_distill.sampler import use_student_in_flux_pipeline

    pipe = FluxPipeline.from_pretrained(str(flux[1]))
    tsm = attach(pipe.transformer, TSMConfig(scales=(1, 4), target_modules=TARGETS))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    kwargs = use_student_in_flux_pipeline(pipe, tsm, SIGMAS)
    assert kwargs == {"sigmas": SIGMAS, "guidance_scale": 3.5}
    teacher = teacher_of(flux[1])
    teacher.denoiser = pipe.transformer
    noise = torch.randn(1, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(0))

    def ours():
        cond = encode(teacher, ["a cat"])
        x0 = sample(Student(teacher, tsm).predict_x0(cond), noise, [s * 1000 for s in SIGMAS], teacher,
                    torch.Generator().manual_seed(1))
        return (teacher.vae_decode(x0) + 1) / 2

    def stock():
        # The pipeline's scheduler draws its re-noising noise itself (randn_tensor, packed, unseeded): hand it
        # our rollout's draws (one generator, in order) in the packed layout; the last step's is multiplied by 0.
        g = torch.Generator().manual_seed(1)
        draws = [pack_latents(torch.randn(1, 4, SIDE, SIDE, generator=g)) for _ in SIGMAS]
        monkeypatch.setattr(lcm, "randn_tensor", lambda shape, **kw: draws.pop(0))
        images = pipe(["a cat"], height=2 * SIDE, width=2 * SIDE, latents=pack_latents(noise), max_sequence_length=LEN,
                      output_type="pt", **kwargs).images
        assert not draws
        return images

    images = stock()
    pipe._tsm_routing.remove()  # our rollout routes by its own tsm.timesteps, not through the pipeline's hook
    student = ours()
    assert_close(images, student, rel=1e-4)
    tsm.set_mode("off")
    assert not close(ours(), student, rel=1e-3)  # the experts made the difference


def test_tsm_finetune_fosters_and_assembles_flux(flux, tmp_path):
    from tsm_core.finetune import load_finetuned
    from tsm_core.finetune.cli import main
    from tsm_core.train.logging import read_stats

    images = tmp_path / "images"
    images.mkdir()
    with open(images / "metadata.jsonl", "w") as f:
        for i, text in enumerate(["a photo of a cat", "a red dog", "a small bag", "a blue coat"]):
            (images / f"{i}.png").write_bytes(_png(i, 2 * SIDE))
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    run = tmp_path / "run"
    r = {"recipe_version": 2,
         "model": {"kind": "flux", "path": str(flux[1]), "max_sequence_length": LEN},
         "data": {"source": "folder", "path": str(images), "resolution": 2 * SIDE},
         "experts": {"rank": 2, "alpha": 2, "target_modules": TARGETS, "text_encoder_targets": ["q_proj", "v_proj"]},
         "stages": [{"type": "foster", "scale": 4, "steps": 2, "lr": 1e-2},
                    {"type": "foster", "scale": 1, "steps": 1, "lr": 1e-2},
                    {"type": "assemble", "steps": 1, "lr": 1e-2}],
         "train": {"batch_size": 2, "checkpoint_every": 1000, "log_every": 1, "tensorboard": False,
                   "sample_prompts": ["a cat"], "sample_steps": 2, "guidance_scale": 3.5}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main([str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    losses = [s["loss"] for s in read_stats(run)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    bb, tsm, tes = load_finetuned("flux", flux[1], run, max_sequence_length=LEN)
    assert tsm.mode == "mixture" and len(tes) == 1  # CLIP's q/v only: the T5 names its projections q and v
    moved = [k for k, v in tsm.state_dict().items() if "lora_B.s4" in k and v.abs().sum() > 0]
    assert moved and any(k.startswith("single_transformer_blocks.") for k in moved)
    out = bb.sample(["a cat"], tsm=tsm, steps=2, generator=torch.Generator().manual_seed(0), reencode_prompts=True)
    assert out.shape == (1, 3, 2 * SIDE, 2 * SIDE) and torch.isfinite(out).all()
    tsm.set_mode("off")
    base = bb.sample(["a cat"], tsm=tsm, steps=2, generator=torch.Generator().manual_seed(0), reencode_prompts=True)
    assert not close(out, base, rel=1e-3)


def test_plan_from_config_files_matches_a_measured_cpu_step(flux, tmp_path):
    import shutil

    from tsm_distill.plan import plan_recipe

    config_only = tmp_path / "configs"  # the pipeline folder without a single weight file
    shutil.copytree(flux[1], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    phases = [phase("e3", scale=4, experts=[3], gan=True, batch_size=4)]
    planned = load_recipe(recipe(flux, phases), DistillRecipe)
    planned.model.path = str(config_only)
    (plan,) = plan_recipe(planned)
    tr = DMD2Trainer(load_recipe(recipe(flux, phases), DistillRecipe), tmp_path / "run")
    t = torch.full((4,), tr.timesteps[0])
    gen_step, critic_step = measured_step_peaks(tr, torch.randn(4, 4, SIDE, SIDE), t,
                                                encode(tr.teacher, ["a cat", "a dog"] * 2))
    modules = (tr.teacher.denoiser, tr.critic, *tr.teacher.text_encoders, tr.teacher.vae)
    assert plan.weights == sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    for name, want, got in (("generator", gen_step.peak, plan.generator_step),
                            ("critic", critic_step.peak, plan.critic_step)):
        assert abs(got - want) <= 0.25 * want, (name, got, want)


def test_shipped_config_folder_is_flux1_dev_and_the_recipes_load():
    from tsm_distill.plan import _meta_teacher

    repo = Path(__file__).resolve().parents[1]
    bb = _meta_teacher(repo / "tsm_distill" / "assets" / "configs" / "flux", "flux")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # Built on the meta device from the shipped configs; the published totals they match (the hub's
    # safetensors parameter counts of black-forest-labs/FLUX.1-dev): transformer 11.9B (BFL: "12B"),
    # T5-XXL encoder 4.76B (pinned to the same count for SD3's text_encoder_3), CLIP ViT-L/14 text
    # 123M (the count pinned for SDXL's text_encoder), VAE 83.8M.
    assert count(bb.denoiser) == 11_901_408_320
    assert [count(m) for m in bb.text_encoders] == [123_060_480, 4_762_310_656]
    assert count(bb.vae) == 83_819_683
    assert bb.latent_channels == 16 and bb.latent_size * bb.vae_scale == 1024 and bb.guidance_distilled
    assert bb.max_sequence_length == 512 and bb.bottleneck_size() == (3072, 64)

    lora = load_recipe(repo / "recipes" / "flux_dmd2_lora.yaml", DistillRecipe)
    tsm = load_recipe(repo / "recipes" / "flux_dmd2_tsm.yaml", DistillRecipe)
    assert lora.model.kind == tsm.model.kind == "flux" and tsm.flow
    assert tsm.timesteps(1000) == pytest.approx([1000.0, 749.0, 499.0, 249.0])
    assert tsm.experts.target_modules == lora.experts.target_modules and tsm.train.fsdp
    # A.3's relation: the LoRA at 4x the experts' batch, without and with the GAN
    assert [ph.batch_size for ph in lora.phases] == [128, 64]
    assert {ph.batch_size for ph in tsm.phases if ph.type == "foster"} == {32, 16}
