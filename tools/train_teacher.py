"""Train the embedded Fashion-MNIST teacher: a pixel-space, text-conditioned SD pipeline, on the CPU.

The teacher is a diffusers StableDiffusionPipeline folder with no VAE (UNet on 3x32x32 pixels,
a small CLIP text encoder trained with it, an offline CLIP tokenizer, a DDPM scheduler). Load it
with ``StableDiffusionPipeline.from_pretrained(path, vae=None)``; ``pipe(prompts,
output_type="latent")`` returns images (B, 3, 32, 32) in [-1, 1].

It trains on the shared skeleton (`tsm_core.train.skeleton.PhasedTrainer`), like the fine-tuning and
distillation trainers: one open-ended phase that stops at ``--max-steps`` or after ``--minutes`` the
way a Ctrl-C stops a run (a checkpoint of the last step, then ``--resume`` continues it exactly).
Training state lives in ``--out``: ``recipe.yaml`` (the `TeacherConfig`), ``checkpoints/step_*``
(atomic: UNet, text encoder and EMA weights as safetensors, optimizer and schedule, RNG, step as
JSON), ``stats.jsonl`` and ``tokenizer/``. The EMA weights are exported as a pipeline folder every
``--export-every`` steps and at the end, swapped in atomically. Every random draw of step k comes
from ``step_generator(seed, k)``.

    python tools/train_teacher.py --out /work/teacher_run --threads 1 --minutes 150 \\
        --export-to tsm_distill/assets/fmnist_teacher --export-every 500
    python tools/train_teacher.py --out /work/teacher_run --resume --threads 1 --minutes 60 \\
        --export-to tsm_distill/assets/fmnist_teacher --export-every 500
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tsm_core.data import fmnist
from tsm_core.models.schedule import NoiseSchedule
from tsm_core.train.accel import step_generator
from tsm_core.train.recipe import load_recipe
from tsm_core.train.skeleton import PhasedTrainer, TrainingInterrupted


@dataclass
class TeacherConfig:
    """Model and optimisation settings of the teacher (defaults: the calibrated configuration)."""

    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 64])  # at 32, 16, 8 px
    cross_attention_at_lowest_only: bool = True  # cross-attention only at 8x8: 32x32 attention is slow on CPU
    cross_attention_dim: int = 64  # = text hidden size
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16  # tokenizer length = text position embeddings
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100  # linear LR warm-up (diffusers' constant_with_warmup)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # prompts replaced by "" so the teacher supports classifier-free guidance
    num_train_timesteps: int = 1000
    seed: int = 0


# A configuration small enough for tests: same shapes of data and pipeline, few parameters.
TINY = dict(block_out_channels=[8, 16, 16], cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
            text_heads=2, batch_size=4)


def build_models(cfg: TeacherConfig, tokenizer):
    """Return ``(unet, text_encoder, scheduler)`` freshly initialised from ``cfg`` for ``tokenizer``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    levels = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * (levels - 1) + ["CrossAttnDownBlock2D"]
    if not cfg.cross_attention_at_lowest_only:
        down = ["CrossAttnDownBlock2D"] * levels
    up = [d.replace("Down", "Up") for d in reversed(down)]
    unet = UNet2DConditionModel(
        sample_size=fmnist.IMAGE_SIZE, in_channels=3, out_channels=3,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=1,
        down_block_types=tuple(down), up_block_types=tuple(up),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.cross_attention_dim, intermediate_size=2 * cfg.cross_attention_dim,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_tokens, projection_dim=cfg.cross_attention_dim,
        # Our tokenizer's ids, not OpenAI CLIP's 49406/49407 (the pooled output finds eos by id).
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # SD1.5's schedule, so the teacher drops into code written for SD1.5.
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                              steps_offset=1)
    return unet, text_encoder, scheduler


def prompt_table(tokenizer) -> torch.Tensor:
    """Token ids (10 * templates + 1, L): row ``label * templates + k``; the last row is ""."""
    prompts = [fmnist.prompt_for(c, k) for c in range(len(fmnist.CLASS_NAMES)) for k in range(len(fmnist.TEMPLATES))]
    # Padded exactly as StableDiffusionPipeline.encode_prompt pads, so training matches sampling.
    return tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class TeacherTrainer(PhasedTrainer):
    """The teacher's diffusion training on the shared skeleton: one open-ended phase, stopped by
    `should_stop` (a step or time budget), with an EMA of the weights exported as a pipeline."""

    desc = "teacher"

    def __init__(self, cfg: TeacherConfig, run_dir: Path, images, labels, tokenizer, *, max_steps: int | None,
                 deadline: float, checkpoint_every: int, log_every: int, export_to: Path | None,
                 export_every: int, threads: int):
        super().__init__(cfg, run_dir, seed=cfg.seed, mixed_precision="no", checkpoint_every=checkpoint_every,
                         log_every=log_every, sample_every=0, keep_last=2, max_grad_norm=cfg.grad_clip,
                         tensorboard=False)
        self.cfg = cfg
        self.images = torch.as_tensor(images)  # uint8 (N, 28, 28); converted per batch to keep memory low
        self.labels = torch.as_tensor(labels)
        self.tokenizer = tokenizer
        self.table = prompt_table(tokenizer)
        self.unet, self.text_encoder, self.scheduler = build_models(cfg, tokenizer)
        self.named = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        self.named |= {f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()}
        self.ema = {k: p.detach().clone() for k, p in self.named.items()}
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler)
        self.max_steps, self.deadline = max_steps, deadline
        self.export_to, self.export_every, self.threads = export_to, export_every, threads
        self.recent: list[torch.Tensor] = []

    def phase_lengths(self):
        return [("teacher", 2**62)]  # open-ended: should_stop ends it, so a longer --max-steps resumes exactly

    def progress_total(self):
        return self.max_steps

    def should_stop(self) -> bool:
        return (self.max_steps is not None and self.global_step >= self.max_steps) or time.time() >= self.deadline

    def enter_phase(self, index: int) -> None:
        opt, sched = self.make_optimizer(list(self.named.values()), self.cfg.lr, self.cfg.warmup_steps,
                                         weight_decay=self.cfg.weight_decay)
        self.optimizers, self.schedulers = {"opt": opt}, {"sched": sched}

    def sample_batch(self, g: torch.Generator):
        """One batch: noisy images, timesteps, token ids and the target noise, all drawn from ``g``."""
        cfg = self.cfg
        idx = torch.randint(len(self.labels), (cfg.batch_size,), generator=g)
        template = torch.randint(len(fmnist.TEMPLATES), (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.uncond_prob
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        x0 = fmnist.to_model_space(self.images[idx])  # (B, 3, 32, 32)
        noise = torch.randn(x0.shape, generator=g)
        row = torch.where(drop, len(self.table) - 1, self.labels[idx] * len(fmnist.TEMPLATES) + template)
        return self.schedule.add_noise(x0, noise, t), t, self.table[row], noise

    def train_step(self) -> dict:
        """One optimisation step plus the EMA update."""
        x_t, t, ids, noise = self.sample_batch(step_generator(self.cfg.seed, self.global_step))
        emb = self.text_encoder(ids)[0]  # (B, L, D)
        loss = F.mse_loss(self.unet(x_t, t, encoder_hidden_states=emb).sample, noise)
        self.check_finite(loss, "teacher diffusion")
        loss.backward()
        self.apply_gradients(self.optimizers["opt"])
        self.schedulers["sched"].step()
        # EMA with a warm-up so early exports are not dominated by the random initialisation.
        decay = min(self.cfg.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in self.named.values()], 1.0 - decay)
        self.recent = (self.recent + [loss.detach()])[-self.log_every:]
        return {"loss": loss.detach()}

    def checkpoint_modules(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder, "ema": self.ema}

    def after_step(self) -> None:
        if self.export_to is not None and self.global_step % self.export_every == 0:
            self.export()

    def save_final(self):
        return self.global_step

    @property
    def recent_loss(self) -> float | None:
        return torch.stack(self.recent).mean().item() if self.recent else None

    def export(self) -> None:
        """The EMA weights as a pipeline at ``export_to``."""
        elapsed = self.seconds.get("teacher", 0.0)
        export_pipeline(self, self.export_to, teacher_info(self, elapsed, self.recent_loss, self.threads))

    def ema_models(self):
        """Copies of the UNet and text encoder holding the EMA weights."""
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        with torch.no_grad():
            for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
                for k, p in model.named_parameters():
                    p.copy_(self.ema[prefix + k])
        return unet.eval(), text_encoder.eval()


def export_pipeline(trainer: TeacherTrainer, dest: Path, info: dict) -> None:
    """Save the EMA weights as a StableDiffusionPipeline folder (vae=None) at ``dest``, atomically.

    The new folder is written beside ``dest`` and swapped in with two renames, so a reader sees
    the old pipeline or the new one, never a half-written folder.
    """
    from diffusers import StableDiffusionPipeline

    unet, text_encoder = trainer.ema_models()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=trainer.tokenizer, unet=unet,
                                   scheduler=trainer.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = dest.with_name(dest.name + ".tmp"), dest.with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "teacher_info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    # Files others keep beside the weights (reference.json, keyed by the UNet hash) survive the swap;
    # a stale one is harmless because its hash no longer matches.
    if (dest / "reference.json").exists():
        shutil.copy2(dest / "reference.json", tmp / "reference.json")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def teacher_info(trainer: TeacherTrainer, elapsed_s: float, recent_loss: float | None, threads: int) -> dict:
    """Provenance written next to the exported pipeline."""
    import diffusers
    import transformers

    n_unet = sum(p.numel() for p in trainer.unet.parameters())
    n_text = sum(p.numel() for p in trainer.text_encoder.parameters())
    return {
        "what": "pixel-space text-to-image DDPM teacher trained on Fashion-MNIST by tools/train_teacher.py",
        "load": "StableDiffusionPipeline.from_pretrained(path, vae=None); "
                "pipe(prompts, output_type='latent').images is (B, 3, 32, 32) in [-1, 1]",
        "dataset": "Fashion-MNIST train split, 60000 images (MIT licence), 28x28 padded to 32x32 with -1",
        "class_names": list(fmnist.CLASS_NAMES),
        "prompt_templates": list(fmnist.TEMPLATES),
        "weights": "EMA",
        "step": trainer.global_step,
        "images_seen": trainer.global_step * trainer.cfg.batch_size,
        "train_seconds": round(elapsed_s, 1),
        "threads": threads,
        "recent_loss": recent_loss,
        "params": {"unet": n_unet, "text_encoder": n_text},
        "config": dataclasses.asdict(trainer.cfg),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoint, stats, tokenizer)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall time (this invocation)")
    p.add_argument("--max-steps", type=int, default=None, help="stop at this total step count")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--export-to", type=Path, default=None, help="pipeline folder for the EMA teacher")
    p.add_argument("--export-every", type=int, default=500, help="steps between exports (and one at the end)")
    p.add_argument("--log-every", type=int, default=50, help="steps between stats.jsonl lines")
    p.add_argument("--data-root", type=Path, default=None, help=f"Fashion-MNIST folder (default ${fmnist.ENV_VAR} "
                                                                 f"or {fmnist.DEFAULT_DIR})")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch, for tests")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    p.add_argument("--seed", type=int, default=None, help="override the seed")
    args = p.parse_args(argv)
    if args.minutes is None and args.max_steps is None:
        p.error("give --minutes or --max-steps (or both) so the run knows when to stop")
    for name in ("threads", "checkpoint_every", "export_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_config(args, out: Path) -> TeacherConfig:
    """The run's config: the saved recipe.yaml on resume, else defaults with --tiny/--batch-size/--seed."""
    if args.resume:
        if not (out / "recipe.yaml").is_file():
            raise FileNotFoundError(f"--resume given but {out / 'recipe.yaml'} does not exist; drop --resume to start "
                                    "a new run")
        return load_recipe(out / "recipe.yaml", TeacherConfig)
    over = dict(TINY) if args.tiny else {}
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    if args.seed is not None:
        over["seed"] = args.seed
    return TeacherConfig(**over)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    cfg = make_config(args, out)
    images, labels = fmnist.load_fashion_mnist("train", args.data_root)
    tokenizer = fmnist.write_clip_tokenizer(out / "tokenizer", model_max_length=cfg.max_tokens)
    deadline = time.time() + 60 * args.minutes if args.minutes is not None else math.inf
    trainer = TeacherTrainer(cfg, out, images, labels, tokenizer, max_steps=args.max_steps, deadline=deadline,
                             checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                             export_to=args.export_to, export_every=args.export_every, threads=args.threads)
    try:
        trainer.train(resume=args.resume)
    except TrainingInterrupted as stop:  # the step or time budget (or Ctrl-C): a checkpoint was written
        if trainer._stop_signal is not None:
            raise
        print(f"stopped at step {trainer.global_step} after {trainer.seconds.get('teacher', 0) / 60:.1f} min; "
              f"checkpoint {stop.checkpoint}", flush=True)
    if args.export_to is not None:
        trainer.export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
