"""DMD2 distillation trainer on a tiny pixel-space pipeline (CPU, deterministic)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.numerics import assert_close, close
from tests.test_core import perturb
from tsm_core import TSMConfig, attach
from tsm_core.testing import tiny
from tsm_core.train.recipe import load_recipe
from tsm_distill import DistillRecipe, DMD2Trainer, NonFiniteLossError
from tsm_distill.rollout import backward_simulation, renoise
from tsm_distill.student import Student
from tsm_distill.teacher import load_teacher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def recipe(env, phases, **train):
    d, pipe = env
    r = {"model": {"path": str(pipe)},
         "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": ["to_q", "to_v", "conv1"]},
         "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
         "train": {"checkpoint_every": 1000, "sample_every": 0, "sample_prompts": ["a cat"], "sample_seeds": [0], "log_every": 1, **train},
         "phases": phases}
    return load_recipe(r, DistillRecipe)


def phase(name, steps=1, **kw):
    return {"name": name, "steps": steps, "batch_size": 2, "warmup_steps": 0,
            "fake_updates_per_generator_update": 1, "lr": 1e-3, "lr_critic": 1e-3, **kw}


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


# ---------------------------------------------------------------------------- rollout
def test_rollout_uses_each_steps_own_expert(env):
    teacher = load_teacher(env[1])
    tsm = attach(teacher.denoiser, TSMConfig(scales=(4,), target_modules=["to_q", "to_v", "conv1", "conv2"]))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    student = Student(teacher, tsm)
    cond = teacher.encode_prompts(["a cat", "a dog"])
    ts = [999, 749, 499, 249]
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = backward_simulation(student.predict_x0(cond), noise, 3, ts, teacher, torch.Generator().manual_seed(1))

    def manual(expert_t):
        # An independent composition: each step's expert fused into the weights (tsm.merged), not routed.
        g, x = torch.Generator().manual_seed(1), noise
        for i in range(3):
            t = torch.full((2,), ts[i])
            with tsm.merged(expert_t(i)), torch.no_grad():
                x0 = teacher.schedule.to_x0(x, teacher.denoiser(x, t, **cond).sample, t)
            x = renoise(x0, ts[i + 1], teacher.schedule, g)
        return x

    # Norm-relative: to_x0 at t = 999 multiplies float rounding by ~15 on values up to ~50, so a fixed
    # per-element atol depends on the CPU's BLAS (2.7e-5 seen on AMD EPYC).
    assert_close(got, manual(lambda i: ts[i]), rel=1e-5)
    # Negative control: using step k's expert (t = 249) for every earlier step gives another input.
    assert not close(got, manual(lambda i: ts[3]), rel=1e-3)


# ---------------------------------------------------------------------------- steps change only their own params
def test_generator_and_critic_steps_touch_only_their_parameters(env, tmp_path):
    tr = DMD2Trainer(recipe(env, [phase("e3gan", scale=4, experts=[3], gan=True)]), tmp_path / "run")
    tr.enter_phase(0)
    cond = tr.teacher.encode_prompts(["a cat", "a dog"])
    x_in = torch.randn(2, 3, 16, 16)
    t = torch.full((2,), 999)
    gen0, crit0 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.generator_step(x_in, t, cond)
    gen_changed = changed(gen0, tr.teacher.denoiser)
    assert gen_changed and all(".s4_e3" in n for n in gen_changed), sorted(gen_changed)[:5]
    assert not changed(crit0, tr.critic)
    assert {"loss_dmd", "loss_gan_generator"} <= set(logs)
    gen1, crit1 = params(tr.teacher.denoiser), params(tr.critic)
    logs = tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    assert not changed(gen1, tr.teacher.denoiser)
    crit_changed = changed(crit1, tr.critic)
    assert any(n.startswith("head.") for n in crit_changed) and any(n.startswith("fake.") for n in crit_changed)
    assert {"loss_fake", "loss_gan_critic", "d_accuracy"} <= set(logs)


# ---------------------------------------------------------------------------- every phase kind
def test_every_phase_kind_runs_and_saves(env, tmp_path):
    phases = [phase("lora", scale=1), phase("e3", scale=4, experts=[3]),
              phase("e3gan", scale=4, experts=[3], gan=True), phase("router", type="assemble", gan=True)]
    run = tmp_path / "run"
    out = DMD2Trainer(recipe(env, phases, sample_every=2, ema_decay=0.5), run).train()
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    assert "loss_gan_generator" not in stats[1] and "loss_gan_generator" in stats[2]
    assert stats[1]["student_step"] == 0  # expert 3 of scale 4 owns t = 999, student step 0
    assert any(k.startswith("gate/t") for k in stats[3])  # router phase logs gate statistics
    saved = [load_file(run / "phases" / p / "tsm_adapter.safetensors") for p in sorted(os.listdir(run / "phases"))]
    lora_keys = [k for k in saved[0] if ".s1_e0" in k]
    e3_keys = [k for k in saved[0] if ".s4_e3" in k]
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in e3_keys)  # e3 phase trained expert 3
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in lora_keys)  # ... and left the LoRA alone
    router_keys = [k for k in saved[3] if "router" in k]
    assert router_keys and all(torch.equal(saved[2][k], saved[3][k]) for k in e3_keys + lora_keys)
    assert any(saved[3][k].abs().sum() > 0 for k in router_keys)  # the router phase trained the router
    assert (run / "samples" / "final.png").exists() and (run / "samples" / "step_00000002.png").exists()
    assert (run / "recipe.yaml").exists() and (out / "tsm_adapter.safetensors").exists()
    final, ema = (load_file(run / d / "tsm_adapter.safetensors") for d in ("adapter", "adapter_ema"))
    assert any(not torch.equal(final[k], ema[k]) for k in router_keys + e3_keys)  # EMA lags the live weights
    assert list((run / "tb").iterdir())


# ---------------------------------------------------------------------------- resume
def _final_state(run):
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(ckpt / "generator.safetensors"), load_file(ckpt / "critic.safetensors")


def test_kill_and_resume_equals_uninterrupted(env, tmp_path, monkeypatch):
    phases = [phase("e3", steps=3, scale=4, experts=[3], fake_updates_per_generator_update=2),
              phase("router", steps=2, type="assemble", gan=True)]
    DMD2Trainer(recipe(env, phases, checkpoint_every=2), tmp_path / "a").train()
    ref_gen, ref_critic = _final_state(tmp_path / "a")

    calls = {"n": 0}
    original = DMD2Trainer.train_step

    def dies_at_step_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(DMD2Trainer, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        DMD2Trainer(recipe(env, phases, checkpoint_every=2), tmp_path / "b").train()
    monkeypatch.setattr(DMD2Trainer, "train_step", original)
    DMD2Trainer(recipe(env, phases, checkpoint_every=2), tmp_path / "b").train(resume=True)
    gen, critic = _final_state(tmp_path / "b")
    assert gen.keys() == ref_gen.keys() and critic.keys() == ref_critic.keys()
    assert all(torch.equal(gen[k], ref_gen[k]) for k in gen)
    assert all(torch.equal(critic[k], ref_critic[k]) for k in critic)


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_teacher(tmp_path / "no_such_teacher")
    with pytest.raises(ValueError, match="no expert"):
        recipe(env, [phase("bad", scale=4, experts=[5])])
    with pytest.raises(ValueError, match="scale 8 is not one of"):
        recipe(env, [phase("bad", scale=8)])
    d, pipe = env
    base = {"model": {"path": str(pipe)}, "phases": [phase("p", scale=1)], "experts": {"scales": [1]}}
    with pytest.raises(ValueError, match="out of range"):
        load_recipe({**base, "student_timesteps": [1000, 500]}, DistillRecipe)
    with pytest.raises(ValueError, match="unknown module.*'vae'"):
        load_recipe({**base, "train": {"fsdp": True, "fsdp_modules": ["critic", "vae"]}}, DistillRecipe)
    with pytest.raises(ValueError, match="fsdp_modules is empty, so nothing would be sharded"):
        load_recipe({**base, "train": {"fsdp": True, "fsdp_modules": []}}, DistillRecipe)
    assert load_recipe({**base, "train": {"fsdp": False, "fsdp_modules": []}}, DistillRecipe).train.fsdp_modules == []
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        DMD2Trainer(load_recipe({**base, "data": {"prompts": str(tmp_path / "empty.txt")}}, DistillRecipe), tmp_path / "r")


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(env, tmp_path, monkeypatch):
    import tsm_distill.losses as L

    real = L.dmd_loss
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        out = real(*a)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(L, "dmd_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"at step 3\b") as e:  # the third iteration; two are checkpointed
        DMD2Trainer(recipe(env, [phase("e", steps=5, scale=4)], checkpoint_every=1), run).train()
    assert "step_00000002" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


# ---------------------------------------------------------------------------- scale-out
def run_two_processes(recipe_dict: dict, tmp_path: Path, *mode: str):
    """Run ``tests/distill_worker.py`` on ``recipe_dict`` under torchrun with 2 processes; the ranks' adapters
    (``mode`` "resume-last": train, forget the last step, resume and redo it)."""
    (tmp_path / "recipe.json").write_text(json.dumps(recipe_dict))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "distill_worker.py"), str(tmp_path / "recipe.json"), str(tmp_path / "run"), *mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))


def test_two_process_run_keeps_weights_in_sync(env, tmp_path):
    d, pipe = env
    r = {"model": {"path": str(pipe)}, "experts": {"rank": 2, "alpha": 2, "scales": [4], "target_modules": ["to_q", "to_v"]},
         "data": {"prompts": str(d / "prompts.txt")}, "train": {"sample_every": 0, "checkpoint_every": 2},
         "phases": [phase("e", steps=2, scale=4, experts=[3])]}
    w0, w1 = run_two_processes(r, tmp_path)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(".s4_e3" in k and "lora_B" in k and w0[k].abs().sum() > 0 for k in w0)  # it trained
    # the two ranks drew different prompts (so the sync is what keeps them equal)
    p0, p1 = (json.loads((tmp_path / f"prompts{r}.json").read_text()) for r in (0, 1))
    assert p0 != p1


def _fsdp_run(env, where, fsdp, phases, *mode, modules=("critic", "generator", "text_encoders"), checkpointing=False):
    """A 2-process distillation run (global batch 4, per-rank draws); (adapters, critics, what was sharded)."""
    d, pipe = env
    r = {"model": {"path": str(pipe)},
         "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": ["to_q", "to_v"]},
         "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
         "train": {"sample_every": 0, "checkpoint_every": 1, "fsdp": fsdp, "fsdp_modules": list(modules),
                   "gradient_checkpointing": checkpointing},
         "phases": phases}
    where.mkdir()
    gen = run_two_processes(r, where, *mode)
    sharded = json.loads((where / "sharded0.json").read_text())
    return gen, tuple(load_file(where / f"critic{rank}.safetensors") for rank in (0, 1)), sharded


def test_fsdp_critic_trains_like_the_replicated_one(env, tmp_path):
    # The same 2-process GAN phase with the critic sharded (FSDP2) and not: the same generator and critic
    # within float tolerance (sharding changes the reduction order of the critic's gradient mean, nothing else).
    phases = [phase("e", steps=2, scale=4, experts=[3], gan=True, batch_size=4)]
    g_fsdp, c_fsdp, s_fsdp = _fsdp_run(env, tmp_path / "fsdp", True, phases, modules=["critic"])
    g_ddp, c_ddp, s_ddp = _fsdp_run(env, tmp_path / "ddp", False, phases)
    assert s_fsdp == {"critic": True, "generator_base": False, "experts": False, "text_encoders": False}
    assert not any(s_ddp.values())
    assert all(torch.equal(c_fsdp[0][k], c_fsdp[1][k]) for k in c_fsdp[0])  # one critic, gathered on both
    assert c_fsdp[0].keys() == c_ddp[0].keys() and any(k.startswith("head.") for k in c_fsdp[0])
    # Relative to what training changed, per tensor: the reduce-scatter sums the ranks' gradients in another
    # order (a few ulps), which AdamW's m / (sqrt(v) + eps) amplifies where gradients are near zero or change
    # sign (seen after three steps: 0.04% of the update over the whole critic, 0.19% in the worst tensor).
    # A real difference (a lost, doubled or unsynced gradient) is of the update's own size.
    init = load_file(tmp_path / "ddp" / "critic_init0.safetensors")
    assert init.keys() == load_file(tmp_path / "fsdp" / "critic_init0.safetensors").keys()
    for k in c_ddp[0]:
        update = c_ddp[0][k] - init[k]
        assert update.norm() > 0, k  # every trainable critic tensor moved
        assert (c_fsdp[0][k] - c_ddp[0][k]).norm() <= 1e-2 * update.norm(), k
    for k in g_ddp[0]:
        assert_close(g_fsdp[0][k], g_ddp[0][k], rel=1e-4, msg=k)
    assert any(".s4_e3" in k and "lora_B" in k and g_fsdp[0][k].abs().sum() > 0 for k in g_fsdp[0])  # it trained


def test_fsdp_of_the_frozen_base_and_text_encoder_changes_nothing_and_resumes_exactly(env, tmp_path):
    # Sharding the generator's frozen base (the experts stay whole) and the text encoder only moves their
    # weights: all-gathered exactly before each use, never updated. So a run that also shards them trains
    # the same experts, router and critic as one that shards the critic alone, through expert, GAN and
    # router phases (the router is created after sharding, on the sharded base). The fully sharded run also
    # recomputes its activations (gradient checkpointing: FSDP gathers the weights again for the recompute),
    # which changes no value either. Then the fully sharded run, resumed from its second-to-last checkpoint,
    # redoes the last step bit for bit.
    phases = [phase("e1", scale=1, batch_size=4), phase("e", steps=2, scale=4, experts=[3], gan=True, batch_size=4),
              phase("router", type="assemble", gan=True, batch_size=4)]
    g_all, c_all, s_all = _fsdp_run(env, tmp_path / "all", True, phases, checkpointing=True)
    g_critic, c_critic, _ = _fsdp_run(env, tmp_path / "critic", True, phases, modules=["critic"])
    assert s_all == {"critic": True, "generator_base": True, "experts": False, "text_encoders": True}
    assert g_all[0].keys() == g_critic[0].keys() and any(k.endswith(".router_emb") for k in g_all[0])
    for k in g_all[0]:
        assert torch.equal(g_all[0][k], g_all[1][k]), k  # experts and router in sync on a sharded base
        assert_close(g_all[0][k], g_critic[0][k], rel=1e-5, msg=k)
    # The critic: sharded weights are all-gathered into another memory layout, so kernels round a few ulps
    # differently; AdamW's first step after each phase's fresh optimizer (m / sqrt(v) = the gradient's
    # sign) turns that into +-2 lr on the few elements whose gradient is near zero (seen: at most 9% of a
    # tensor's elements, 0.9% of the update's norm over the whole critic). So per tensor, the typical
    # (median) element must agree to 1% of its typical update; a real difference (a wrong, stale or unsynced
    # weight or gradient) moves most elements by about their update.
    init = load_file(tmp_path / "critic" / "critic_init0.safetensors")
    for k in c_all[0]:
        update = (c_critic[0][k] - init[k]).abs().median()
        assert (c_all[0][k] - c_critic[0][k]).abs().median() <= 1e-2 * update, k
    for key in (".s1_e0", ".s4_e3", ".router_emb"):  # each phase trained its own tensors
        assert any(key in k and "lora_A" not in k and g_all[0][k].abs().sum() > 0 for k in g_all[0]), key
    g_resumed, c_resumed, _ = _fsdp_run(env, tmp_path / "resumed", True, phases, "resume-last", checkpointing=True)
    assert all(torch.equal(c_resumed[0][k], c_all[0][k]) for k in c_all[0])
    assert all(torch.equal(g_resumed[0][k], g_all[0][k]) for k in g_all[0])


# ---------------------------------------------------------------------------- recipes
def test_every_distill_recipe_loads_and_a3_schedule_is_exact():
    recipes = sorted((REPO / "recipes").glob("*dmd2*.yaml"))
    assert {p.name for p in recipes} >= {"sd15_dmd2_lora.yaml", "sd15_dmd2_tsm.yaml"}
    for p in recipes:
        load_recipe(p, DistillRecipe)
    tsm = load_recipe(REPO / "recipes" / "sd15_dmd2_tsm.yaml", DistillRecipe)
    assert tsm.experts.rank == 64 and tsm.experts.alpha == 8 and len(tsm.experts.target_modules) == 14
    sched = [(p.type, p.scale, p.experts, p.gan, p.steps, p.batch_size) for p in tsm.phases]
    assert sched == [
        ("foster", 4, [3], False, 20000, 32), ("foster", 4, [3], True, 5000, 16),
        ("foster", 4, [2], False, 20000, 32), ("foster", 4, [2], True, 5000, 16),
        ("foster", 4, [1], False, 5000, 32), ("foster", 4, [1], True, 20000, 16),
        ("foster", 4, [0], False, 5000, 32), ("foster", 4, [0], True, 40000, 16),
        ("assemble", None, None, True, 2000, 16),
    ]
    assert tsm.phases[-1].core_scale == 4 and tsm.phases[-1].context_scales == [1]
    lora = load_recipe(REPO / "recipes" / "sd15_dmd2_lora.yaml", DistillRecipe)
    # A.3: "The batch size is 32 without GAN loss and 16 with it (4 times for vanilla LoRA)", global batches.
    assert [(p.scale, p.gan, p.steps, p.batch_size) for p in lora.phases] == [(1, False, 40000, 128), (1, True, 5000, 64)]
    for p in tsm.phases + lora.phases:
        assert p.warmup_steps == 8, p.name  # DMD2's effective warm-up: 500 / 64 GPUs iterations
        # DMD2's rates: 1e-5 without GAN; its LoRA rate 5e-5 with it (generator = fake score, as in DMD2).
        assert (p.lr, p.lr_critic) == ((5e-5, 5e-5) if p.gan else (1e-5, 1e-5)), p.name


# ---------------------------------------------------------------------------- real images
def test_image_folder_real_batches_follow_the_generator(tmp_path):
    """Folder batches are drawn with the trainer's per-iteration generator: a resumed run sees the same."""
    import numpy as np
    from PIL import Image

    from tsm_distill.data import RealSource

    lines = []
    for i in range(6):  # six flat grey images, each its own value, so a batch tells which files it holds
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    def draw(seed, source):
        return source.sample(4, torch.Generator().manual_seed(seed), "cpu")[0]

    a = RealSource(str(tmp_path), 8, encode=lambda x, g: x)
    b = RealSource(str(tmp_path), 8, encode=lambda x, g: x)  # a fresh source, as after a resume
    assert torch.equal(draw(3, a), draw(3, b))
    values = {round(float(v), 3) for seed in range(8) for v in draw(seed, a).mean((1, 2, 3))}
    expected = {round(40 * i / 127.5 - 1, 3) for i in range(6)}
    # Random files: a sequential loader (what this replaced) only ever showed the first four.
    assert values <= expected and len(values) >= 5, (values, expected)
    with pytest.raises(ValueError, match="encoder"):
        RealSource(str(tmp_path), 8)


# ---------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_with_the_cfg_real_score_updates_like_without(env, tmp_path):
    # The real score's bypassed CFG pass (2B rows) runs between the checkpointed generator forward and its
    # backward; the recomputed layers must still route the generator's B rows (the SD1.5 recipes' setting).
    after = {}
    for gc in (False, True):
        tr = DMD2Trainer(recipe(env, [phase("e3", scale=4, experts=[3], gan=True)], gradient_checkpointing=gc,
                                real_guidance_scale=1.75), tmp_path / f"run{gc}")
        tr.enter_phase(0)
        cond = tr.teacher.encode_prompts(["a cat", "a dog"])
        x_in = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        tr.generator_step(x_in, torch.full((2,), 999), cond, torch.Generator().manual_seed(1))
        after[gc] = {k: v.detach().clone() for k, v in tr.tsm.state_dict().items() if ".s4_e3" in k}
    assert after[True].keys() == after[False].keys() and after[True]
    for k in after[False]:
        assert_close(after[True][k], after[False][k], rel=1e-5, msg=k)


# ---------------------------------------------------------------------------- tsm-distill --plan
def measured_step_peaks(tr, x_in, t, cond):
    """`LiveBytes` of one generator and one critic update of a fresh trainer, after a first iteration (which
    creates the AdamW moments), with AdamW's foreach path as on a GPU (what the planner models)."""
    from tsm_distill.plan import LiveBytes

    tr.enter_phase(0)
    for opt in (tr.gen_opt, tr.critic_opt):
        for group in opt.param_groups:
            group["foreach"] = True
    logs = tr.generator_step(x_in, t, cond)
    tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    with LiveBytes() as gen_step:
        logs = tr.generator_step(x_in, t, cond)
    with LiveBytes() as critic_step:
        tr.critic_step(logs["x0"], cond, torch.Generator().manual_seed(0))
    return gen_step, critic_step


def test_plan_needs_no_weight_files_and_matches_a_measured_cpu_step(env, tmp_path):
    import shutil

    from tsm_distill.plan import plan_recipe

    config_only = tmp_path / "configs"  # the pipeline folder without a single weight file
    shutil.copytree(env[1], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(config_only.rglob("*.safetensors"))
    for gan in (False, True):
        phases = [phase("e3", scale=4, experts=[3], gan=gan, batch_size=8)]
        planned = recipe(env, phases)
        planned.model.path = str(config_only)
        (plan,) = plan_recipe(planned)
        tr = DMD2Trainer(recipe(env, phases), tmp_path / f"run{gan}")
        gen_step, critic_step = measured_step_peaks(tr, torch.randn(8, 3, 16, 16), torch.full((8,), 999),
                                                    tr.teacher.encode_prompts(["a cat", "a dog"] * 4))
        # Weights and optimizer moments are counted exactly; the step peaks within 25% of the measured ones.
        modules = (tr.teacher.denoiser, tr.critic, tr.teacher.text_encoders[0])
        assert plan.weights == sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        assert plan.optimizer == sum(v.numel() * v.element_size() for opt in (tr.gen_opt, tr.critic_opt)
                                     for state in opt.state.values() for v in state.values() if v.ndim > 0)
        for name, want, got in (("generator", gen_step.peak, plan.generator_step),
                                ("critic", critic_step.peak, plan.critic_step)):
            assert abs(got - want) <= 0.25 * want, (gan, name, got, want)
    with pytest.raises(FileNotFoundError, match="needs a local pipeline folder"):
        bad = recipe(env, phases)
        bad.model.path = str(tmp_path / "nowhere")
        plan_recipe(bad)


def test_plan_cli_prints_every_phase_and_refuses_a_missing_folder(env, tmp_path, capsys):
    import shutil

    import yaml

    from tsm_distill.cli import main

    config_only = tmp_path / "configs"
    shutil.copytree(env[1], config_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    d, _ = env
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(config_only)},
        "experts": {"rank": 2, "alpha": 2, "scales": [1, 4], "target_modules": ["to_q", "to_v"]},
        "data": {"prompts": str(d / "prompts.txt"), "real_images": str(d / "real.pt")},
        "phases": [phase("e3", scale=4, experts=[3], batch_size=4),
                   phase("e3_gan", scale=4, experts=[3], gan=True, batch_size=4),
                   phase("router", type="assemble", core_scale=4, context_scales=[1], gan=True, batch_size=4)]}))
    assert main([str(path), "--plan", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "with 2 process(es)" in out
    rows = [line for line in out.splitlines() if line.startswith("| e3") or line.startswith("| router")]
    assert [r.split("|")[1].strip() for r in rows] == ["e3", "e3_gan", "router"]
    assert all(r.split("|")[2].strip() == "2" for r in rows)  # the global batch 4 over 2 processes
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/checkpoints"))  # nothing trained
    assert main([str(path), "--plan", "--set", f"model.path={tmp_path / 'missing'}"]) == 2
    assert "needs a local pipeline folder" in capsys.readouterr().err
