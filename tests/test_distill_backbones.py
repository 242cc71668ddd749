"""DMD2 + TSM beyond SD1.5: a tiny SDXL teacher (two text encoders, text_time micro-conditioning) and a
tiny flow-matching SD3 teacher, through the same trainer, rollout and CLI (issue 14)."""

from pathlib import Path

import pytest
import torch
import yaml

from tests.numerics import assert_close, close
from tests.test_core import perturb
from tests.test_distill import changed, measured_step_peaks, params, phase
from tsm_core import TSMConfig, attach
from tsm_core.testing import tiny, tiny_dit
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer
from tsm_distill.critic import Critic
from tsm_distill.rollout import backward_simulation, renoise
from tsm_distill.student import Student
from tsm_distill.teacher import encode, load_teacher

KINDS = ("sdxl", "sd3")
SIZE = {"sdxl": 8, "sd3": 16}  # latent side
STEPS = {"sdxl": {"student_timesteps": [999, 749, 499, 249]}, "sd3": {"student_sigmas": [1.0, 0.9, 0.75, 0.5]}}
TARGETS = {"sdxl": ["to_q", "to_v", "conv1"], "sd3": ["to_q", "to_v", "add_q_proj"]}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbones")
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    # Real latents at each student's latent size. SD3's is 16 (32 px): at 8 its 2x2-patched bottleneck
    # would be 4x4 tokens, which the GAN head's second stage shrinks to one value per norm group.
    torch.save(torch.randn(8, 4, 8, 8), d / "real_sdxl.pt")
    torch.save(torch.randn(8, 4, 16, 16), d / "real_sd3.pt")
    return d, {"sdxl": tiny.build_sdxl_pipeline(d / "sdxl"), "sd3": tiny_dit.build_sd3_pipeline(d / "sd3", sample_size=16)}


def recipe(teachers, kind, phases, **train):
    d, pipes = teachers
    r = {"model": {"path": str(pipes[kind]), "kind": kind}, **STEPS[kind],
         "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": TARGETS[kind]},
         "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / f"real_{kind}.pt")},
         "train": {"checkpoint_every": 1000, "sample_every": 0, "sample_prompts": ["a cat"], "sample_seeds": [0],
                   "log_every": 1, **train},
         "phases": phases}
    return r


@pytest.mark.parametrize("kind", KINDS)
def test_rollout_routes_each_step_through_its_own_expert(teachers, kind):
    teacher = load_teacher(teachers[1][kind], kind)
    tsm = attach(teacher.denoiser, TSMConfig(scales=(4,), target_modules=TARGETS[kind]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    ts = load_recipe(recipe(teachers, kind, [phase("e", scale=4)]), DistillRecipe).timesteps(teacher.num_timesteps)
    cond = encode(teacher, ["a cat", "a dog"])
    noise = torch.randn(2, 4, SIZE[kind], SIZE[kind], generator=torch.Generator().manual_seed(0))
    got = backward_simulation(Student(teacher, tsm).predict_x0(cond), noise, 3, ts, teacher,
                              torch.Generator().manual_seed(1))

    def manual(expert_t):
        # Each step's expert fused into the weights (tsm.merged), the denoiser called by hand.
        g, x = torch.Generator().manual_seed(1), noise
        for i in range(3):
            t = torch.full((2,), ts[i], dtype=teacher.timestep_dtype)
            with tsm.merged(expert_t(i)), torch.no_grad():
                x0 = teacher.to_x0(x, teacher.predict(x, t, cond), t)
            x = renoise(x0, ts[i + 1], teacher, g)
        return x

    assert_close(got, manual(lambda i: ts[i]), rel=1e-5)
    assert not close(got, manual(lambda i: ts[3]), rel=1e-3)  # step 3's expert everywhere: another input


@pytest.mark.parametrize("kind", KINDS)
def test_generator_and_critic_steps_touch_only_their_parameters(teachers, kind, tmp_path):
    r = recipe(teachers, kind, [phase("e3gan", scale=4, experts=[3], gan=True)], real_guidance_scale=3.0)
    tr = DMD2Trainer(load_recipe(r, DistillRecipe), tmp_path / "run")
    tr.enter_phase(0)
    cond = encode(tr.teacher, ["a cat", "a dog"])
    t = torch.full((2,), tr.timesteps[0], dtype=tr.teacher.timestep_dtype)
    gen0, crit0 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.generator_step(torch.randn(2, 4, SIZE[kind], SIZE[kind]), t, cond)
    gen_changed = changed(gen0, tr.teacher.denoiser)
    assert gen_changed and all(".s4_e3" in n for n in gen_changed), sorted(gen_changed)[:5]
    assert not changed(crit0, tr.critic)
    assert torch.isfinite(logs["loss_dmd"]) and torch.isfinite(logs["loss_gan_generator"])
    gen1, crit1 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    assert not changed(gen1, tr.teacher.denoiser)
    crit_changed = changed(crit1, tr.critic)
    assert any(n.startswith("head.") for n in crit_changed) and any(n.startswith("fake.") for n in crit_changed)
    assert torch.isfinite(logs["loss_gan_critic"])


@pytest.mark.parametrize("kind", KINDS)
def test_cli_distills_both_stages_end_to_end_and_the_student_loads(teachers, kind, tmp_path):
    from tsm_distill.cli import main
    from tsm_distill.sampler import generate
    from tsm_distill.trainer import load_student

    phases = [phase("e3", scale=4, experts=[3]), phase("e3gan", scale=4, experts=[3], gan=True),
              phase("router", type="assemble", core_scale=4, context_scales=[1], gan=True)]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(teachers, kind, phases)))
    run = tmp_path / "run"
    assert main([str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    stats = [yaml.safe_load(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 3 and all(torch.isfinite(torch.tensor(s["loss_dmd"])) for s in stats)
    assert "loss_gan_critic" in stats[1] and "loss_gan_critic" not in stats[0]
    teacher, tsm = load_student(teachers[1][kind], run / "adapter", kind=kind)
    timesteps = load_recipe(run / "recipe.yaml", DistillRecipe).timesteps(teacher.num_timesteps)
    images = generate(teacher, tsm, ["a cat", "a dog"], [0, 1], timesteps)
    assert images.shape == (2, 3, 2 * SIZE[kind], 2 * SIZE[kind]) and torch.isfinite(images).all()
    assert not close(images[0], images[1], rel=1e-3)  # two prompts and seeds, two images


def test_sdxl_conditions_every_network_on_text_embeds_and_time_ids(teachers, tmp_path, monkeypatch):
    tr = DMD2Trainer(load_recipe(recipe(teachers, "sdxl", [phase("g", scale=4, gan=True)]), DistillRecipe),
                     tmp_path / "run")
    tr.enter_phase(0)
    seen = []
    forward = type(tr.teacher.denoiser).forward

    def spy(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **kw):
        seen.append((self is tr.critic.fake, sorted(added_cond_kwargs), added_cond_kwargs["time_ids"][0].tolist()))
        return forward(self, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)

    monkeypatch.setattr(type(tr.teacher.denoiser), "forward", spy)
    cond = encode(tr.teacher, ["a cat", "a dog"])
    logs = tr.generator_step(torch.randn(2, 4, 8, 8), torch.full((2,), 999), cond)
    tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    # CFG's unconditional input: zero text states and pooled embedding, the same time ids (DMD2's SDXL)
    assert not tr.uncond["encoder_hidden_states"].any() and not tr.uncond["text_embeds"].any()
    assert tr.uncond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    # generator, fake score (DMD), real score (CFG), D (G's GAN loss); then fake-score loss, D on fakes and reals
    assert [fake for fake, _, _ in seen] == [False, True, False, True, True, True, True]
    assert all(keys == ["text_embeds", "time_ids"] and ids == [16, 16, 0, 0, 16, 16] for _, keys, ids in seen)


def test_sd3_dmd_draws_shifted_sigmas_and_recovers_x0_from_the_velocity(teachers, tmp_path, monkeypatch):
    tr = DMD2Trainer(load_recipe(recipe(teachers, "sd3", [phase("e", scale=4)]), DistillRecipe), tmp_path / "run")
    assert tr.timesteps == [1000.0, 900.0, 750.0, 500.0] and tr.teacher.timestep_dtype == torch.float32
    # x0 from the flow velocity inverts the forward process at any sigma
    x0, noise, t = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16), torch.tensor([999.0, 500.0, 20.0])
    assert_close(tr.teacher.to_x0(tr.teacher.add_noise(x0, noise, t), noise - x0, t), x0, rel=1e-5)
    # SD3's shift 3: sigma' = 3 s / (1 + 2 s)
    assert_close(tr.teacher.shift_timesteps(torch.tensor([0.0, 250.0, 500.0, 1000.0])),
                 torch.tensor([0.0, 500.0, 750.0, 1000.0]), rel=1e-6)
    tr.enter_phase(0)
    seen = []
    predict = Critic.predict
    monkeypatch.setattr(Critic, "predict", lambda self, x, t, c: seen.append(t.clone()) or predict(self, x, t, c))
    g = torch.Generator().manual_seed(5)
    tr.generator_step(torch.randn(2, 4, 16, 16), torch.full((2,), 1000.0), encode(tr.teacher, ["a", "b"]), g)
    u = torch.Generator().manual_seed(5)
    want = tr.teacher.shift_timesteps(tr.teacher.sample_timesteps(2, 20, 981, u))
    assert_close(seen[0], want, rel=1e-6)  # the DMD timestep s: uniform in [20, 981), then shifted
    assert not torch.equal(seen[0], seen[0].round())  # continuous, not DDPM integers


def test_flow_and_ddpm_student_steps_are_checked_at_load(teachers):
    r = recipe(teachers, "sd3", [phase("e", scale=4)])
    del r["student_sigmas"]
    with pytest.raises(ValueError, match="student_sigmas"):
        load_recipe(r, DistillRecipe)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        load_recipe({**r, "student_sigmas": [1.5, 0.5]}, DistillRecipe)
    with pytest.raises(ValueError, match="strictly decrease"):
        load_recipe({**r, "student_sigmas": [0.5, 0.9]}, DistillRecipe)
    with pytest.raises(ValueError, match="DDPM"):
        load_recipe({**recipe(teachers, "sdxl", [phase("e", scale=4)]), "student_sigmas": [1.0]}, DistillRecipe)
    with pytest.raises(ValueError, match="supports"):
        load_recipe({**r, "student_sigmas": [1.0], "model": {"path": "x", "kind": "pixart"}}, DistillRecipe)


def test_recipes_for_sdxl_and_sd3_load(tmp_path):
    repo = Path(__file__).resolve().parents[1] / "recipes"
    lora = load_recipe(repo / "sdxl_dmd2_lora.yaml", DistillRecipe)
    tsm = load_recipe(repo / "sdxl_dmd2_tsm.yaml", DistillRecipe)
    sd3 = load_recipe(repo / "sd3_dmd2_tsm.yaml", DistillRecipe)
    assert lora.model.kind == tsm.model.kind == "sdxl" and sd3.model.kind == "sd3"
    assert tsm.timesteps() == [999, 749, 499, 249] and tsm.experts.scales == [1, 4]
    assert sd3.flow and sd3.timesteps(1000) == pytest.approx([1000.0, 749.0, 499.0, 249.0])
    from tsm_core.intervals import TimestepIntervals
    from tsm_distill.trainer import phase_student_steps

    # one scale-4 expert per student step, as on SD1.5
    for recipe_ in (tsm, sd3):
        steps = {ph.name: phase_student_steps(ph, recipe_.timesteps(1000), TimestepIntervals(1000, (1, 4)))
                 for ph in recipe_.phases if ph.type == "foster" and ph.scale == 4}
        assert sorted(k for ks in steps.values() for k in ks) == [0, 0, 1, 1, 2, 2, 3, 3], steps
    # one foster phase per student step, then the router; every scale-4 expert is trained
    fostered = {e for ph in tsm.phases if ph.type == "foster" for e in ph.experts}
    assert fostered == {0, 1, 2, 3} and tsm.phases[-1].type == "assemble"
    # A.3's relation of each LoRA baseline to its TSM run: 4x the experts' batch without and with the GAN,
    # A.3's 40K + 5K split (SDXL: scaled by 16/45 like every SDXL expert phase), the TSM run's other settings.
    sd3_lora = load_recipe(repo / "sd3_dmd2_lora.yaml", DistillRecipe)
    for base, tsm_run in ((lora, tsm), (sd3_lora, sd3)):
        experts = {ph.gan: ph.batch_size for ph in tsm_run.phases if ph.type == "foster" and ph.scale == 4}
        assert [(ph.scale, ph.gan, ph.batch_size) for ph in base.phases] == [(1, False, 4 * experts[False]),
                                                                             (1, True, 4 * experts[True])]
        assert base.experts.scales == [1] and base.experts.target_modules == tsm_run.experts.target_modules
        assert base.model == tsm_run.model and base.timesteps(1000) == tsm_run.timesteps(1000)
    assert [ph.steps for ph in lora.phases] == [14200, 1800] and [ph.steps for ph in sd3_lora.phases] == [40000, 5000]


def test_gan_head_has_dmd2s_sd15_and_sdxl_shapes_and_fits_any_bottleneck():
    from torch import nn

    from tsm_distill.critic import GANHead

    def convs(head):
        return [(m.kernel_size[0], m.stride[0]) for m in head.net if isinstance(m, nn.Conv2d)]

    assert convs(GANHead(64, 8)) == [(4, 2), (4, 4), (1, 1)]  # SD1.5: 8x8 mid block
    assert convs(GANHead(64, 32)) == [(4, 2)] * 3 + [(4, 4), (1, 1)]  # SDXL: 32x32 mid block
    for side in (2, 4, 8, 12, 16, 32, 64):
        assert GANHead(16, side)(torch.randn(2, 16, side, side)).shape == (2,)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_from_config_files_matches_a_measured_cpu_step(teachers, kind, tmp_path):
    import shutil

    from tsm_distill.plan import plan_recipe

    config_only = tmp_path / "configs"  # the pipeline folder without a single weight file
    shutil.copytree(teachers[1][kind], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    phases = [phase("e3", scale=4, experts=[3], gan=True, batch_size=4)]
    planned = load_recipe(recipe(teachers, kind, phases), DistillRecipe)
    planned.model.path = str(config_only)
    (plan,) = plan_recipe(planned)
    tr = DMD2Trainer(load_recipe(recipe(teachers, kind, phases), DistillRecipe), tmp_path / "run")
    t = torch.full((4,), tr.timesteps[0], dtype=tr.teacher.timestep_dtype)
    gen_step, critic_step = measured_step_peaks(tr, torch.randn(4, 4, SIZE[kind], SIZE[kind]), t,
                                                encode(tr.teacher, ["a cat", "a dog"] * 2))
    modules = (tr.teacher.denoiser, tr.critic, *tr.teacher.text_encoders, tr.teacher.vae)
    assert plan.weights == sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    # train.fsdp over 2 processes: the sharded modules' weights count half per process, and the critic's moments
    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)

    experts = {id(p) for p in tr.tsm.adapter_parameters()}
    parts = {"critic": nbytes(tr.critic.parameters()),
             "generator": nbytes(p for p in tr.teacher.denoiser.parameters() if id(p) not in experts),
             "text_encoders": nbytes(p for te in tr.teacher.text_encoders for p in te.parameters())}
    planned.train.fsdp = True
    for modules in (["critic"], ["critic", "generator", "text_encoders"]):
        planned.train.fsdp_modules = modules
        (sharded,) = plan_recipe(planned, num_processes=2)
        assert abs(sharded.weights - (plan.weights - sum(parts[m] for m in modules) / 2)) <= 3, modules
        assert abs(sharded.optimizer - 8 * (plan.trainable_generator + plan.trainable_critic / 2)) <= 8
        assert sharded.critic_step < plan.critic_step and sharded.total < plan.total
    for name, want, got in (("generator", gen_step.peak, plan.generator_step),
                            ("critic", critic_step.peak, plan.critic_step)):
        assert abs(got - want) <= 0.25 * want, (name, got, want)


def test_shipped_config_folders_are_the_published_models():
    from tsm_distill.plan import _meta_teacher

    root = Path(__file__).resolve().parents[1] / "tsm_distill" / "assets" / "configs"

    def count(module):
        return sum(p.numel() for p in module.parameters())

    sdxl = _meta_teacher(root / "sdxl", "sdxl")
    sd3 = _meta_teacher(root / "sd3", "sd3")
    # Published parameter counts: SDXL base 1.0's UNet and text encoders; SD3 medium's MM-DiT, CLIPs and T5-XXL.
    assert count(sdxl.denoiser) == 2_567_463_684
    assert [count(m) for m in sdxl.text_encoders] == [123_060_480, 694_659_840]
    assert count(sd3.denoiser) == 2_028_328_000
    assert [count(m) for m in sd3.text_encoders] == [123_650_304, 694_659_840, 4_762_310_656]
    assert sdxl.latent_size * sdxl.vae_scale == 1024 and sd3.latent_channels == 16


def test_stock_sdxl_pipeline_with_the_student_matches_our_sampler(teachers):
    from diffusers import StableDiffusionXLPipeline

    from tsm_distill.rollout import sample
    from tsm_distill.sampler import use_student_in_pipeline

    path = teachers[1]["sdxl"]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path))
    tsm = attach(pipe.unet, TSMConfig(scales=(1, 4), target_modules=TARGETS["sdxl"]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    kwargs = use_student_in_pipeline(pipe, tsm)
    latents = pipe(["a cat"], height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    # Our sampler on the same UNet, with the pipeline's noise stream (one generator, drawn in order).
    teacher = load_teacher(path, "sdxl")
    teacher.denoiser = pipe.unet
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 4, 8, 8), generator=g)
    ours = sample(Student(teacher, tsm).predict_x0(encode(teacher, ["a cat"])), noise, [999, 749, 499, 249], teacher, g)
    assert_close(latents, ours, rel=1e-4)
    tsm.set_mode("off")
    base = sample(Student(teacher, tsm).predict_x0(encode(teacher, ["a cat"])), noise, [999, 749, 499, 249], teacher,
                  torch.Generator().manual_seed(0))
    assert not close(base, ours, rel=1e-3)


def test_plan_cli_prints_the_shipped_sdxl_recipe_from_the_shipped_configs(capsys):
    from tsm_distill.cli import main

    repo = Path(__file__).resolve().parents[1]
    assert main([str(repo / "recipes" / "sdxl_dmd2_lora.yaml"), "--plan", "--processes", "8",
                 "--set", f"model.path={repo / 'tsm_distill' / 'assets' / 'configs' / 'sdxl'}"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("| lora_gan |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # The reals' encoding is counted in the critic step: 1024 px images, 4 per VAE call (data.encode_batch),
    # near 2.5 GB each in fp32 (the whole 8 at once would be 20 GB, more than the critic's own passes).
    encoding = float(out.split("and their captions first: at most ")[1].split(" GB")[0])
    assert 7 < encoding < 13 and encoding < float(cells[8])
    assert cells[1] == "8" and cells[2] == "yes"  # global batch 64 over 8 processes; the GAN phase
    weights, optimizer, total = float(cells[5]), float(cells[6]), float(cells[9].strip("*"))
    # fp32 weights of the 2.57B UNet twice (generator base, fake score) plus both CLIPs and the VAE
    assert 2 * 2_567_463_684 * 4 / 2**30 < weights < 25 and total > weights + optimizer
