"""Backbone adapters: each family loads from a saved folder, noises, targets, predicts and samples."""

import pytest
import torch

from tests.numerics import close
from tests.test_core import perturb
from tsm_core import TimestepContextError, TSMConfig, attach
from tsm_core.models import cat_cond, load_backbone, route_by_timestep
from tsm_core.testing import tiny_dit


def _roundtrip(bb):
    size = bb.denoiser.config.sample_size * bb.vae_scale
    x0 = bb.vae_encode(torch.rand(2, 3, size, size) * 2 - 1)
    cond = bb.encode_prompts(["a cat", "a red dog"])
    t = bb.sample_timesteps(2, 100, 300, generator=torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    out = bb.predict(bb.add_noise(x0, noise, t), t, cond)
    return x0, noise, t, out


def test_unet_latent_epsilon(sd_pipeline_path):
    bb = load_backbone("unet", sd_pipeline_path)
    assert bb.vae is not None and bb.prediction_type == "epsilon"
    x0, noise, t, out = _roundtrip(bb)
    assert out.shape == x0.shape == (2, 4, 8, 8)
    assert ((t >= 100) & (t < 300)).all() and t.dtype == torch.long
    assert torch.equal(bb.target(x0, noise, t), noise)
    assert not any(p.requires_grad for m in bb.modules() for p in m.parameters())


def test_unet_pixel_v_prediction(tmp_path):
    from tsm_core.testing import tiny

    bb = load_backbone("unet", tiny.build_sd_pipeline(tmp_path, with_vae=False, prediction_type="v_prediction"))
    assert bb.vae is None and bb.prediction_type == "v_prediction"
    x0, noise, t, out = _roundtrip(bb)
    assert torch.equal(bb.vae_encode(x0), x0)  # pixel space: identity
    a = bb.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - bb.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(bb.target(x0, noise, t), a * noise - s * x0)
    torch.testing.assert_close(bb.add_noise(x0, noise, t), a * x0 + s * noise)


def test_pixart_drops_variance_channels(pixart_path):
    bb = load_backbone("pixart", pixart_path, max_sequence_length=12)
    x0, noise, t, out = _roundtrip(bb)
    assert bb.denoiser.config.out_channels == 8 and out.shape == x0.shape
    assert bb.encode_prompts(["a cat"])["encoder_attention_mask"].shape == (1, 12)


def test_sd3_flow_matching(sd3_path):
    bb = load_backbone("sd3", sd3_path, max_sequence_length=8)
    assert len(bb.text_encoders) == 3
    x0, noise, t, out = _roundtrip(bb)
    assert t.is_floating_point() and ((t >= 100) & (t < 300)).all()
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(bb.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(bb.target(x0, noise, t), noise - x0)
    cond = cat_cond([bb.encode_prompts(["a"]), bb.encode_prompts(["b"])])
    assert cond["encoder_hidden_states"].shape == (2, 16 + 8, 32)  # 16 CLIP tokens + 8 T5 tokens
    assert cond["pooled_projections"].shape == (2, 16)


def test_sd3_without_t5(tmp_path):
    bb = load_backbone("sd3", tiny_dit.build_sd3_pipeline(tmp_path), max_sequence_length=4)
    assert len(bb.text_encoders) == 2
    assert bb.encode_prompts(["a"])["encoder_hidden_states"][:, 16:].abs().sum() == 0


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="backbone kind"):
        load_backbone("gan", tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_backbone("unet", tmp_path / "nope")


def test_sampler_switches_experts_and_stock_pipeline_hook(sd_pipeline_path):
    from diffusers import StableDiffusionPipeline

    bb = load_backbone("unet", sd_pipeline_path)
    tsm = attach(bb.denoiser, TSMConfig(rank=2, scales=(4,)))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with_experts = bb.sample(["a cat"], tsm=tsm, steps=3, generator=g())
    tsm.set_mode("off")
    base = bb.sample(["a cat"], steps=3, generator=g())
    assert with_experts.shape == (1, 3, 16, 16) and not close(with_experts, base, rel=1e-3)

    tsm.set_mode("expert", scale=4)
    pipe = StableDiffusionPipeline.from_pretrained(sd_pipeline_path, unet=bb.denoiser, safety_checker=None)
    with pytest.raises(TimestepContextError):
        pipe(["a cat"], num_inference_steps=2, output_type="latent")
    calls = []
    bb.denoiser.register_forward_pre_hook(lambda m, a, k: calls.append(tsm.context.current().index[4].tolist()),
                                          with_kwargs=True)
    with route_by_timestep(pipe.unet, tsm):
        pipe(["a cat"], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    assert not tsm.context.active
    # two steps from the top and the middle: experts 3 then 1 (timesteps 999 / 500 region)
    assert calls[0][0] > calls[-1][0]


def test_sampler_takes_given_starting_noise_and_scheduler(sd_pipeline_path):
    """``noise`` replaces the generator's draw (the demo seeds each image on its own) and ``scheduler``
    replaces `sampling_scheduler` (the teacher rows keep their DDIM config); the teacher rows' per-image
    seeding makes an image independent of the batch it is sampled in."""
    from diffusers import DDIMScheduler

    from tsm_distill.demo.eval import teacher_generate

    bb = load_backbone("unet", sd_pipeline_path)
    prompts = ["a cat", "a dog"]
    noise = torch.randn(bb.noise_shape(2, bb.latent_size), generator=torch.Generator().manual_seed(3))
    drawn = bb.sample(prompts, steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(3))
    given = bb.sample(prompts, steps=2, guidance_scale=2.0, noise=noise)
    assert close(given, drawn, rel=1e-5)
    other = DDIMScheduler.from_config(bb.scheduler.config, timestep_spacing="leading")
    assert not close(bb.sample(prompts, steps=2, guidance_scale=2.0, noise=noise, scheduler=other), given, rel=1e-3)
    with pytest.raises(ValueError, match="one starting latent per prompt"):
        bb.sample(prompts, steps=2, noise=noise[:1])

    together = teacher_generate(bb, prompts + ["a bird"], [5, 6, 7], steps=2, batch_size=3, progress_desc="")
    apart = teacher_generate(bb, prompts + ["a bird"], [5, 6, 7], steps=2, batch_size=1, progress_desc="")
    assert close(together, apart, rel=1e-4)
    with pytest.raises(ValueError, match="guidance must be > 1"):
        teacher_generate(bb, prompts, [1, 2], steps=2, guidance=1.0)


@pytest.mark.parametrize("kind", ["unet", "sdxl"])
def test_sampler_guidance_pairs_prompts_with_the_familys_unconditional_input(kind, tmp_path, sd_pipeline_path):
    """Under CFG the "" rows are the family's unconditional input, as the real score's in training: the
    encoding of "" for SD1.5, zeros (same time ids) for SDXL, as diffusers' SDXL pipeline by default."""
    from tsm_core.testing.tiny import build_sdxl_pipeline

    bb = load_backbone(kind, sd_pipeline_path if kind == "unet" else build_sdxl_pipeline(tmp_path))
    seen = []
    predict = bb.predict
    bb.predict = lambda x, t, cond, denoiser=None: seen.append(cond) or predict(x, t, cond, denoiser)
    bb.sample(["a cat", "a dog"], steps=1, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    uncond = bb.unconditional()
    prompts = bb.encode_prompts(["a cat", "a dog"])
    for k, v in seen[0].items():
        # Encoded in another batch than here: equal up to the kernels' rounding.
        assert close(v[:2], uncond[k].expand_as(v[:2]), rel=1e-5) and close(v[2:], prompts[k], rel=1e-5), k
    if kind == "sdxl":
        assert seen[0]["encoder_hidden_states"][:2].abs().sum() == 0 and seen[0]["text_embeds"][:2].abs().sum() == 0
        assert torch.equal(seen[0]["time_ids"][:2], prompts["time_ids"])
