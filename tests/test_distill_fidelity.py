"""DMD2 fidelity: the training set-up matches DMD2's own code (main/train_sd.py, main/sd_guidance.py).

Each test pins one part of DMD2's semantics that the loss formulas alone do not fix: what warm-up
counts, which draws differ per process, what D is conditioned on, global batches, precision, and
what D and the real latents are.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_distill import phase, recipe, run_two_processes
from tsm_core.testing import tiny
from tsm_core.train.accel import make_accelerator
from tsm_distill import DMD2Trainer
from tsm_distill.critic import Critic
from tsm_distill.data import RealSource

CAPTIONS = ["a cat", "a dog", "a red cat", "a big dog"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidelity")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    # An image folder whose image i is flat grey 40 * i with caption CAPTIONS[i]: a batch tells which files it holds.
    folder = d / "images"
    folder.mkdir()
    lines = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d, pipe


def stats(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- 1. warm-up counts iterations
def test_warmup_counts_iterations_for_both_optimizers(env, tmp_path):
    """DMD2 steps both schedules every iteration: with 4 fake updates per generator update, a warm-up
    of 8 ends after 8 iterations (2 generator updates), for the generator and the critic alike."""
    ph = phase("e", steps=10, scale=4, warmup_steps=8, fake_updates_per_generator_update=4,
               lr=2e-3, lr_critic=1e-3)
    run = tmp_path / "run"
    DMD2Trainer(recipe(env, [ph]), run).train()
    rows = stats(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for n, r in enumerate(rows, start=1):  # after n iterations, both schedules stepped n times
        assert r["lr_generator"] == pytest.approx(2e-3 * min(1.0, n / 8), rel=1e-6), n
        assert r["lr_critic"] == pytest.approx(1e-3 * min(1.0, n / 8), rel=1e-6), n


# ---------------------------------------------------------------------------- 4. global batch
def test_batch_size_is_the_global_batch():
    from tsm_distill.config import per_process_batch

    assert per_process_batch(32, 8) == 4 and per_process_batch(16, 1) == 16
    with pytest.raises(ValueError, match="does not divide over 4 processes"):
        per_process_batch(6, 4, "phases[0].batch_size")


# ---------------------------------------------------------------------------- 2 + 4. two processes
def test_two_processes_draw_their_own_noise_and_stay_in_sync(env, tmp_path):
    """Under torchrun with 2 processes: every noise draw (rollout, DMD s, fake-loss t, diffusion-GAN t)
    differs between ranks, as DMD2 seeds seed + process_index; each rank draws half of the global
    batch; the experts and the critic still end identical on both ranks."""
    d, pipe = env
    r = {"model": {"path": str(pipe)}, "student_timesteps": [999, 499],
         "experts": {"rank": 2, "alpha": 2, "scales": [2], "target_modules": ["to_q", "to_v"]},
         "critic": {"diffusion_gan": True},
         "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
         "train": {"sample_every": 0, "checkpoint_every": 100},
         "phases": [phase("e", steps=3, scale=2, student_steps=[1], batch_size=4, gan=True,
                          fake_updates_per_generator_update=2)]}
    w0, w1 = run_two_processes(r, tmp_path)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    c0, c1 = (load_file(tmp_path / f"critic{r}.safetensors") for r in (0, 1))
    assert c0.keys() == c1.keys() and all(torch.equal(c0[k], c1[k]) for k in c0)
    assert any("lora_B" in k and w0[k].abs().sum() > 0 for k in w0)  # it trained
    d0, d1 = (torch.load(tmp_path / f"draws{r}.pt") for r in (0, 1))
    assert d0.keys() == d1.keys() == {"rollout_noise", "renoise", "predict_t", "discriminate_t", "prompts"}
    # Each rank holds half the global batch of 4.
    assert all(len(p) == 2 for p in d0["prompts"]) and len(d0["prompts"]) == 3
    for name in ("rollout_noise", "renoise"):  # the 3 training iterations (rank 0 then samples the final grid)
        assert len(d0[name]) >= 3 and len(d1[name]) >= 3
        assert all(not torch.equal(a, b) for a, b in zip(d0[name][:3], d1[name][:3])), name
    # The DMD timestep s and the fake-loss t (every Critic.predict), and the diffusion-GAN t.
    for name in ("predict_t", "discriminate_t"):
        a, b = torch.cat(d0[name]), torch.cat(d1[name])
        assert a.shape == b.shape and not torch.equal(a, b), name


# ---------------------------------------------------------------------------- 3. D is text-conditional
def test_discriminator_sees_prompts_for_fakes_and_captions_for_reals(env, tmp_path, monkeypatch):
    d, _ = env
    tr = DMD2Trainer(recipe(env, [phase("g", scale=4, experts=[3], gan=True, batch_size=4)]), tmp_path / "run")
    tr.recipe.data.real_images = str(d / "images")
    tr.real = RealSource(str(d / "images"), 16, tr.teacher.vae_encode)
    tr.enter_phase(0)
    calls = []
    original = Critic.discriminate

    def spy(self, x_t, t, cond):
        calls.append((x_t.detach().clone(), cond["encoder_hidden_states"].detach().clone()))
        return original(self, x_t, t, cond)

    monkeypatch.setattr(Critic, "discriminate", spy)
    prompts = ["a cat", "a dog", "a big dog", "a red cat"]
    cond = tr.teacher.encode_prompts(prompts)
    x0 = tr.generator_step(torch.randn(4, 3, 16, 16), torch.full((4,), 999), cond)["x0"]
    text = cond["encoder_hidden_states"]
    assert len(calls) == 1 and torch.equal(calls[0][1], text)  # G's GAN loss: D(fake | its prompt)
    calls.clear()
    tr.critic_step(x0, cond, torch.Generator().manual_seed(0))
    (fake_x, fake_cond), (real_x, real_cond) = calls
    assert torch.equal(fake_cond, text)
    # Which image each real sample is (flat grey 40 * i), hence which caption it must be scored with.
    idx = [round((float(v) + 1) * 127.5 / 40) for v in real_x.mean((1, 2, 3))]
    assert torch.equal(real_cond, tr.teacher.encode_prompts([CAPTIONS[i] for i in idx])["encoder_hidden_states"])
    assert not torch.equal(real_cond, tr.uncond["encoder_hidden_states"].expand_as(real_cond))


def test_real_sources_return_captions(env, tmp_path):
    d, _ = env
    latents, captions = RealSource(str(d / "images"), 16, lambda x, g: x).sample(8, torch.Generator().manual_seed(1), "cpu")
    idx = [round((float(v) + 1) * 127.5 / 40) for v in latents.mean((1, 2, 3))]
    assert captions == [CAPTIONS[i] for i in idx]
    with pytest.warns(UserWarning, match="no captions") as record:
        cache = RealSource(str(d / "real.pt"), 16)
    assert len(record) == 1
    assert cache.sample(3, torch.Generator().manual_seed(0), "cpu")[1] == ["", "", ""]


def test_fmnist_real_images_carry_their_class_prompt():
    from tsm_core.data.fmnist import FashionMNIST

    source = RealSource("builtin:fmnist", 32)
    images, captions = source.sample(6, torch.Generator().manual_seed(3), "cpu")
    idx = torch.randint(60000, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    data = FashionMNIST("train")
    for i, image, caption in zip(idx, images, captions):
        want_image, want_caption = data[i]  # the pair the teacher was trained on
        assert caption == want_caption and torch.equal(image, want_image)


# ---------------------------------------------------------------------------- 7. precision and inputs
@pytest.fixture
def bf16_accelerator():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # a process-wide singleton: earlier tests built an fp32 one
    try:
        yield make_accelerator(mixed_precision="bf16", cpu=True)
    finally:
        AcceleratorState._reset_state(True)


def test_dmd_fake_score_and_gan_head_run_in_fp32_under_bf16(env, tmp_path, monkeypatch, bf16_accelerator):
    import tsm_distill.losses as L

    tr = DMD2Trainer(recipe(env, [phase("g", scale=4, experts=[3], gan=True)], mixed_precision="bf16"),
                     tmp_path / "run", accelerator=bf16_accelerator)
    tr.enter_phase(0)
    seen = {"predict": [], "head": [], "dmd": []}
    predict = Critic.predict

    def spy_predict(self, x_t, t, cond):
        seen["predict"].append((torch.is_autocast_enabled("cpu"), x_t.dtype))
        return predict(self, x_t, t, cond)

    monkeypatch.setattr(Critic, "predict", spy_predict)
    tr.critic.head.register_forward_pre_hook(
        lambda m, args: seen["head"].append((torch.is_autocast_enabled("cpu"), args[0].dtype)))
    dmd = L.dmd_loss
    monkeypatch.setattr(L, "dmd_loss", lambda x0, real, fake: seen["dmd"].append((real.dtype, fake.dtype))
                        or dmd(x0, real, fake))
    cond = tr.teacher.encode_prompts(["a cat", "a dog"])
    tr.generator_step(torch.randn(2, 3, 16, 16), torch.full((2,), 999), cond)
    # The DMD branch's fake-score prediction: fp32, outside autocast; both x0 in float64.
    assert seen["predict"] == [(False, torch.float32)]
    assert seen["dmd"] == [(torch.float64, torch.float64)]
    # The GAN head on features.float(), outside autocast (the UNet before it stays under autocast).
    assert seen["head"] == [(False, torch.float32)]


def test_without_diffusion_gan_d_sees_the_clean_sample(env, tmp_path):
    tr = DMD2Trainer(recipe(env, [phase("g", scale=4, gan=True)]), tmp_path / "run")
    x = torch.randn(3, 3, 16, 16)
    seen, t = tr._d_input(x, torch.Generator().manual_seed(0))
    assert torch.equal(seen, x) and torch.equal(t, torch.zeros(3, dtype=torch.long))
    tr.recipe.critic.diffusion_gan = True
    noised, t = tr._d_input(x, torch.Generator().manual_seed(0))
    assert not torch.equal(noised, x) and t.max() > 0


def test_real_latents_are_vae_posterior_samples(sd_pipeline_path, tmp_path):
    """DMD2 encodes real images with ``latent_dist.sample()``, not the mean; drawn with the trainer's
    per-iteration generator, so a resumed run draws the same latents."""
    from tsm_distill.teacher import load_teacher

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cat"}) + "\n")
    teacher = load_teacher(sd_pipeline_path)
    pixels = torch.as_tensor(np.asarray(Image.open(tmp_path / "0.png")), dtype=torch.float32).permute(2, 0, 1)
    x = pixels[None] / 127.5 - 1
    mean = teacher.vae_encode(x)
    a, b, c = (teacher.vae_encode(x, torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, mean)
    seen = []
    source = RealSource(str(tmp_path), 16, lambda px, g: seen.append(g) or teacher.vae_encode(px, g))
    generator = torch.Generator().manual_seed(3)
    latents, captions = source.sample(2, generator, "cpu")  # the one image, twice
    assert seen == [generator] and captions == ["a cat", "a cat"]
    assert not torch.equal(latents[0], latents[1])  # two posterior samples, not the mean twice
