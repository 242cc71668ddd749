"""The fine-tuning trainer on tiny UNet / PixArt / SD3 pipelines: stages, routing, resume, data errors."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.numerics import assert_close
from tests.test_core import perturb  # noqa: F401  (shared helper; keeps the import graph explicit)
from tsm_core.finetune import FinetuneRecipe, FinetuneTrainer, load_finetuned, plan_phases
from tsm_core.testing import tiny, tiny_dit
from tsm_core.train.logging import read_stats
from tsm_core.train.recipe import load_recipe

PROMPTS = ["a photo of a cat", "a red dog", "a small bag", "a blue coat"]


def _png(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    with open(root / "metadata.jsonl", "w") as f:
        for i, p in enumerate(PROMPTS):
            (root / f"{i}.png").write_bytes(_png(i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": p}) + "\n")
    return root


def _recipe(model_kind, model_path, data_path, run_dir, stages, te=(), experts=None, **train):
    d = {
        "model": {"kind": model_kind, "path": str(model_path), "max_sequence_length": 8},
        "data": {"source": "folder", "path": str(data_path), "resolution": 16},
        "experts": {"rank": 2, "alpha": 2, "text_encoder_targets": list(te), **(experts or {})},
        "stages": stages,
        "train": {"run_dir": str(run_dir), "batch_size": 2, "checkpoint_every": 3, "keep_last": None,
                  "log_every": 1, "tensorboard": False, **train},
    }
    return load_recipe(d, FinetuneRecipe)


def _snapshot(module):
    """The base model's own tensors (not the experts or routers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" not in k and "router" not in k}


def _base_weights_equal(before, module):
    now = module.state_dict()
    for k, v in before.items():
        assert torch.equal(now[k], v), k


TWO_STAGES = [{"type": "foster", "scale": 4, "steps": 3, "lr": 1e-2},
              {"type": "foster", "scale": 1, "steps": 3, "lr": 1e-2},
              {"type": "assemble", "steps": 3, "lr": 1e-2}]


@pytest.mark.parametrize("kind", ["unet", "sdxl", "pixart", "sd3"])
def test_stage1_then_stage2_change_only_their_parameters(kind, tmp_path, folder, sd_pipeline_path, pixart_path,
                                                          sd3_path, sdxl_path):
    path, te = {"unet": (sd_pipeline_path, ["q_proj", "v_proj"]), "pixart": (pixart_path, ["q", "v"]),
                "sd3": (sd3_path, ["q_proj", "v_proj"]), "sdxl": (sdxl_path, ["q_proj", "v_proj"])}[kind]
    run = tmp_path / "run"
    trainer = FinetuneTrainer(_recipe(kind, path, folder, run, TWO_STAGES, te=te))
    # SD3 and SDXL: the two CLIPs (not SD3's T5)
    assert len(trainer.text_adapters) == (2 if kind in ("sd3", "sdxl") else 1)
    bases = [_snapshot(m) for m in trainer.backbone.modules()]
    init = trainer.tsm.state_dict()
    init = {k: v.clone() for k, v in init.items()}
    drawn = []  # the timesteps of every optimizer step, in order (3 steps per stage)
    sample_timesteps = trainer.backbone.sample_timesteps
    trainer.backbone.sample_timesteps = lambda *a, **kw: drawn.append(sample_timesteps(*a, **kw)) or drawn[-1]
    result = trainer.train()
    assert result["step"] == 9
    for before, m in zip(bases, trainer.backbone.modules()):
        if m is trainer.backbone.vae:
            assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())

    ck = {s: load_file(run / "checkpoints" / f"step_{s:08d}" / "adapter.safetensors") for s in (3, 6, 9)}
    s4 = [k for k in init if ".s4_" in k and "lora_B" in k]
    s1 = [k for k in init if ".s1_" in k and "lora_B" in k]
    a_keys = [k for k in init if "lora_A" in k]
    # stage 1 at n=4: exactly the n=4 experts whose intervals the first 3 steps drew move; n=1 untouched
    hit = {int(e) for e in torch.cat(drawn[:3]) * 4 // trainer.backbone.num_timesteps}
    moved = {int(k.split(".s4_e")[1].split(".")[0]) for k in s4 if not torch.equal(ck[3][k], init[k])}
    assert moved == hit and hit, (moved, hit)  # an expert moves exactly when its interval was drawn
    assert all(torch.equal(ck[3][k], init[k]) for k in s1)
    # stage 1 at n=1: n=4 frozen, n=1 moves
    assert all(torch.equal(ck[6][k], ck[3][k]) for k in s4 + [k for k in a_keys if ".s4_" in k])
    assert all(not torch.equal(ck[6][k], init[k]) for k in s1)
    # stage 2: every expert frozen; the router (absent before) trained away from zero
    assert all(torch.equal(ck[9][k], ck[6][k]) for k in init)
    routers = [k for k in ck[9] if "router" in k]
    assert routers and not any("router" in k for k in ck[6])
    assert any(ck[9][k].abs().sum() > 0 for k in routers)
    te_ck = load_file(run / "checkpoints" / "step_00000009" / "adapter_text_encoder0.safetensors")
    assert any("router" in k for k in te_ck)
    # base weights of denoiser and text encoders never change
    for before, m in zip(bases, trainer.backbone.modules()):
        _base_weights_equal(before, m)

    # the saved adapters load into a fresh model and reproduce the trained one
    bb, tsm, tes = load_finetuned(kind, path, run, max_sequence_length=8)
    assert tsm.mode == "mixture" and len(tes) == len(trainer.text_adapters)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    want = trainer.backbone.sample(["a cat"], tsm=trainer.tsm, steps=2, generator=g(), reencode_prompts=True)
    got = bb.sample(["a cat"], tsm=tsm, steps=2, generator=g(), reencode_prompts=True)
    assert_close(got, want, rel=1e-5)
    assert (run / "recipe.yaml").is_file()
    assert load_recipe(run / "recipe.yaml", FinetuneRecipe).stages[0].scale == 4
    assert [r["step"] for r in read_stats(run)] == list(range(1, 10))


def test_a_plain_text_encoder_lora_trains_while_fostering_and_rests_while_assembling(tmp_path, folder,
                                                                                      sd_pipeline_path):
    run = tmp_path / "run"
    # A.2.2: timestep experts only in the denoiser, a plain LoRA on the text encoder
    r = _recipe("unet", sd_pipeline_path, folder, run, TWO_STAGES, te=["q_proj", "v_proj"],
                experts={"text_encoder_experts": "plain"})
    trainer = FinetuneTrainer(r)
    (text,) = trainer.text_adapters
    assert text.config.scales == (1,) and trainer.tsm.config.scales == (1, 4)
    init = {k: v.clone() for k, v in text.state_dict().items()}
    trainer.train()
    ck = {s: load_file(run / "checkpoints" / f"step_{s:08d}" / "adapter_text_encoder0.safetensors") for s in (3, 6, 9)}
    b_keys = [k for k in init if "lora_B" in k]
    assert b_keys and all(k.endswith("lora_B.s1_e0") for k in b_keys)  # one LoRA per layer, nothing per interval
    assert all(not torch.equal(ck[3][k], init[k]) for k in b_keys)  # foster n=4: it trains
    assert all(not torch.equal(ck[6][k], ck[3][k]) for k in b_keys)  # foster n=1: it trains on
    assert ck[9].keys() == ck[6].keys() and all(torch.equal(ck[9][k], ck[6][k]) for k in ck[6])  # assemble: frozen
    bb, tsm, (te,) = load_finetuned("unet", sd_pipeline_path, run, max_sequence_length=8)
    assert tsm.mode == "mixture" and te.mode == "expert" and te.config.scales == (1,)
    with pytest.raises(ValueError, match="text_encoder_experts 'plain' needs experts.text_encoder_targets"):
        _recipe("unet", sd_pipeline_path, folder, run, TWO_STAGES, experts={"text_encoder_experts": "plain"})


def _eval_loss(trainer, seed=123):
    """Loss on the training batch at fixed timesteps and noise (the overfitting measure)."""
    bb = trainer.backbone
    ds = trainer.dataset
    x0 = bb.vae_encode(torch.stack([ds[i]["pixel_values"] for i in range(2)]))
    texts = [ds[i]["text"] for i in range(2)]
    g = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for _ in range(8):
            t = bb.sample_timesteps(2, generator=g)
            noise = torch.randn(x0.shape, generator=g)
            with trainer.tsm.timesteps(t):
                pred = bb.predict(bb.add_noise(x0, noise, t), t, bb.encode_prompts(texts))
            losses.append(torch.nn.functional.mse_loss(pred, bb.target(x0, noise, t)))
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("scale", [1, 4])
def test_overfitting_one_batch_halves_the_loss(scale, tmp_path, pixel_pipeline_path):
    data = tmp_path / "one"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(2):
            (data / f"{i}.png").write_bytes(_png(10 + i))
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i]}) + "\n")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "conv_in", "conv_out"]
    r = _recipe("unet", pixel_pipeline_path, data, tmp_path / "run",
                [{"type": "foster", "scale": scale, "steps": 50, "lr": 1e-2}], checkpoint_every=1000)
    r.experts.target_modules = targets
    r.experts.rank = 8
    trainer = FinetuneTrainer(r)
    trainer.tsm.set_mode("expert", scale=scale)
    before = _eval_loss(trainer)
    trainer.train()
    after = _eval_loss(trainer)
    assert after <= 0.5 * before, (before, after)


def test_sequential_schedule_trains_each_expert_on_its_interval_only(tmp_path, folder, sd_pipeline_path):
    r = _recipe("unet", sd_pipeline_path, folder, tmp_path / "run",
                [{"type": "foster", "scale": 4, "steps": 2, "schedule": "sequential", "lr": 1e-2}])
    trainer = FinetuneTrainer(r)
    assert [(p.experts, p.t_range) for p in trainer.phases] == [
        ([0], (0, 250)), ([1], (250, 500)), ([2], (500, 750)), ([3], (750, 1000))]
    seen = []

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # training forwards only
            state = trainer.tsm.context.current()
            trainable = trainer.tsm.mode_args["experts"]
            seen.append((state.index[4].tolist(), trainable))

    trainer.backbone.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    assert len(seen) == 8
    for step, (routed, trainable) in enumerate(seen):
        assert trainable == [step // 2]
        assert routed == [step // 2] * 2  # every sample of the step went to the trained expert


def test_resume_equals_uninterrupted(tmp_path, folder, sd_pipeline_path):
    stages = [{"type": "foster", "scale": 2, "steps": 3, "lr": 1e-2},
              {"type": "foster", "scale": 1, "steps": 2, "lr": 1e-2},
              {"type": "assemble", "steps": 2, "lr": 1e-2}]
    a = tmp_path / "a"
    FinetuneTrainer(_recipe("unet", sd_pipeline_path, folder, a, stages, te=["q_proj"], checkpoint_every=2)).train()
    want = load_file(a / "adapter" / "tsm_adapter.safetensors")
    # Every checkpoint_every steps, and at each phase boundary (steps 3, 5 and 7), as in distillation.
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == [f"step_0000000{s}" for s in (2, 3, 4, 5, 6, 7)]
    for keep in (2, 6):  # mid stage 1 (optimizer restored) and mid stage 2 (router restored)
        b = tmp_path / f"b{keep}"
        shutil.copytree(a, b)
        shutil.rmtree(b / "adapter")
        for p in (b / "checkpoints").iterdir():
            if p.name != f"step_{keep:08d}":
                shutil.rmtree(p)
        rec = _recipe("unet", sd_pipeline_path, folder, b, stages, te=["q_proj"], checkpoint_every=2)
        assert FinetuneTrainer(rec).train(resume=True)["step"] == 7
        got = load_file(b / "adapter" / "tsm_adapter.safetensors")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (keep, k)
        te_a = load_file(a / "adapter_text_encoder0" / "tsm_adapter.safetensors")
        te_b = load_file(b / "adapter_text_encoder0" / "tsm_adapter.safetensors")
        assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)


def _shard(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for key, ext, data in samples:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_shard_sample_is_skipped_and_counted(tmp_path, sd_pipeline_path):
    shard = tmp_path / "shard-000.tar"
    samples = []
    for i in range(4):
        png = _png(i) if i != 1 else b"\x89PNG\r\n\x1a\n this is not an image"
        samples += [(f"{i:04d}", "png", png), (f"{i:04d}", "txt", PROMPTS[i].encode())]
    _shard(shard, samples)
    r = _recipe("unet", sd_pipeline_path, tmp_path, tmp_path / "run", [{"type": "foster", "scale": 2, "steps": 1}])
    r.data.source, r.data.path, r.data.shuffle_buffer = "webdataset", str(shard), 0
    trainer = FinetuneTrainer(r)
    out = trainer.train()
    assert out["skipped"] == 1
    assert read_stats(tmp_path / "run")[-1]["data/skipped"] == 1


def test_bad_recipes(tmp_path, folder, sd_pipeline_path):
    with pytest.raises(ValueError, match="at least two scales"):
        _recipe("unet", sd_pipeline_path, folder, tmp_path, [{"type": "foster", "scale": 4, "steps": 1},
                                                             {"type": "assemble", "steps": 1}])
    with pytest.raises(ValueError, match="cache_text"):
        r = _recipe("unet", sd_pipeline_path, folder, tmp_path, [{"type": "foster", "steps": 1}], te=["q_proj"])
        load_recipe({**{"model": vars(r.model), "stages": [{"type": "foster", "steps": 1}]},
                     "data": {**vars(r.data), "cache_text": True}, "experts": {"text_encoder_targets": ["q_proj"]}},
                    FinetuneRecipe)
    with pytest.raises(ValueError, match="match no layer"):
        FinetuneTrainer(_recipe("unet", sd_pipeline_path, folder, tmp_path, [{"type": "foster", "steps": 1}],
                                te=["nothing_here"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        FinetuneTrainer(_recipe("unet", sd_pipeline_path, folder, tmp_path / "new",
                                [{"type": "foster", "steps": 1}])).train(resume=True)
    with pytest.raises(FileNotFoundError):
        FinetuneTrainer(_recipe("unet", sd_pipeline_path, tmp_path / "missing", tmp_path,
                                [{"type": "foster", "steps": 1}]))


def test_caches_give_the_same_training(tmp_path, folder, pixel_pipeline_path):
    losses = []
    for cache in (False, True):
        r = _recipe("unet", pixel_pipeline_path, folder, tmp_path / f"c{cache}",
                    [{"type": "foster", "scale": 2, "steps": 3, "lr": 1e-3}])
        r.data.cache_latents = r.data.cache_text = cache
        trainer = FinetuneTrainer(r)
        trainer.train()
        losses.append([rec["loss"] for rec in read_stats(tmp_path / f"c{cache}")])
        assert len(trainer._text_cache) == (len(PROMPTS) if cache else 0)
        assert len(trainer._latent_cache) == (len(PROMPTS) if cache else 0)
    # Same batches, timesteps and noise; only kernel rounding differs (oneDNN picks paths by memory layout).
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)


def test_plan_phases_counts_steps():
    r = load_recipe({"model": {"kind": "unet", "path": "x/y"}, "data": {"source": "folder", "path": "d"},
                     "stages": [{"type": "foster", "scale": 8, "steps": 5, "schedule": "sequential"},
                                {"type": "foster", "scale": 1, "steps": 7},
                                {"type": "assemble", "steps": 4, "context_scales": [1]}]}, FinetuneRecipe)
    phases = plan_phases(r)
    assert len(phases) == 10 and phases[-1].end == 8 * 5 + 7 + 4
    assert phases[7].t_range == (875, 1000) and phases[-1].context_scales == (1,)


def test_tiny_builders_are_used():
    assert tiny.WORDS and tiny_dit.build_sd3_pipeline


def test_fp16_loss_scaling_is_undone_before_clipping_and_the_optimizer_step(tmp_path, folder, sd_pipeline_path,
                                                                            monkeypatch):
    """With fp16, accelerate scales the loss in backward; the optimizer must go through
    ``accelerator.prepare`` so the gradients are unscaled before clipping and the step. A CPU has no
    fp16, so a real ``GradScaler`` on the CPU stands in for it (accelerate's fp16 checks mocked)."""
    import contextlib

    from accelerate import Accelerator

    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for g in self.param_groups for p in g["params"]
                                   if p.grad is not None)))
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    stages = [{"type": "foster", "scale": 1, "steps": 1, "lr": 1e-2}]
    norms = {}
    for scaled in (False, True):
        trainer = FinetuneTrainer(_recipe("unet", sd_pipeline_path, folder, tmp_path / f"run{scaled}", stages,
                                          max_grad_norm=0))
        acc = trainer.acc
        if scaled:
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            acc.native_amp = True  # what unscale_gradients checks, with the precision below
            monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
            monkeypatch.setattr(acc, "autocast", contextlib.nullcontext)  # keep the forward in fp32
        seen.clear()
        trainer.train()
        assert len(seen) == 1
        norms[scaled] = seen[0]
        monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: self.state.mixed_precision))
    # Unscaled: the optimizer sees the same gradients as without loss scaling (not 1024 times them).
    # (No clipping here: clipping to a norm would hide the scale.)
    assert float(norms[False]) > 0
    assert_close(norms[True], norms[False], rel=1e-3)
