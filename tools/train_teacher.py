"""Train the embedded Fashion-MNIST teacher: a pixel-space, text-conditioned SD pipeline, on the CPU.

The teacher is a diffusers StableDiffusionPipeline folder with no VAE (UNet on 3x32x32 pixels,
a small CLIP text encoder trained with it, an offline CLIP tokenizer, a DDPM scheduler). Load it
with ``StableDiffusionPipeline.from_pretrained(path, vae=None)``; ``pipe(prompts,
output_type="latent")`` returns images (B, 3, 32, 32) in [-1, 1].

Training state lives in ``--out``: ``checkpoint.pt`` (model, EMA, optimizer, RNG, step; written
to a temporary file and renamed, so a killed run always resumes from a whole checkpoint),
``stats.jsonl`` (one line per logging tick) and ``tokenizer/``. The EMA weights are exported
as a pipeline folder every ``--export-every`` steps and at the end, swapped in atomically.

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

from tsm_core.train import fmnist
from tsm_core.train.schedule import NoiseSchedule

CHECKPOINT = "checkpoint.pt"


@dataclass
class TeacherConfig:
    """Model and optimisation settings of the teacher (defaults: the calibrated configuration)."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths at 32x32, 16x16, 8x8
    cross_attention_at_lowest_only: bool = True  # cross-attention only at 8x8: 32x32 attention is slow on CPU
    cross_attention_dim: int = 64  # = text hidden size
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16  # tokenizer length = text position embeddings
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100  # linear LR warm-up
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # prompts replaced by "" so the teacher supports classifier-free guidance
    num_train_timesteps: int = 1000
    seed: int = 0


# A configuration small enough for tests: same shapes of data and pipeline, few parameters.
TINY = dict(block_out_channels=(8, 16, 16), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
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


class TeacherTrainer:
    """Holds the models, EMA, optimizer and data RNG; ``step()`` runs one training step."""

    def __init__(self, cfg: TeacherConfig, images, labels, tokenizer):
        self.cfg = cfg
        self.images = torch.as_tensor(images)  # uint8 (N, 28, 28); converted per batch to keep memory low
        self.labels = torch.as_tensor(labels)
        self.tokenizer = tokenizer
        self.table = prompt_table(tokenizer)
        self.unet, self.text_encoder, self.scheduler = build_models(cfg, tokenizer)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # All data randomness (images, prompts, dropout, t, noise) comes from this one generator,
        # so saving its state makes a resumed run repeat an uninterrupted one.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.schedule = NoiseSchedule.from_scheduler(self.scheduler)
        self.step_count = 0

    def sample_batch(self):
        """Draw one batch: noisy images, timesteps, token ids and the target noise."""
        cfg, g = self.cfg, self.gen
        idx = torch.randint(len(self.labels), (cfg.batch_size,), generator=g)
        template = torch.randint(len(fmnist.TEMPLATES), (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.uncond_prob
        t = torch.randint(cfg.num_train_timesteps, (cfg.batch_size,), generator=g)
        x0 = fmnist.to_model_space(self.images[idx])  # (B, 3, 32, 32)
        noise = torch.randn(x0.shape, generator=g)
        row = torch.where(drop, len(self.table) - 1, self.labels[idx] * len(fmnist.TEMPLATES) + template)
        return self.schedule.add_noise(x0, noise, t), t, self.table[row], noise

    def step(self) -> torch.Tensor:
        """One optimisation step plus the EMA update; returns the loss (a tensor, no sync)."""
        cfg = self.cfg
        x_t, t, ids, noise = self.sample_batch()
        lr = cfg.lr * min(1.0, (self.step_count + 1) / max(1, cfg.warmup_steps))
        for group in self.opt.param_groups:
            group["lr"] = lr
        emb = self.text_encoder(ids)[0]  # (B, L, D)
        loss = F.mse_loss(self.unet(x_t, t, encoder_hidden_states=emb).sample, noise)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()} at step {self.step_count}; "
                               f"the last checkpoint is kept, resume from it with a lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        # EMA with a warm-up so early exports are not dominated by the random initialisation.
        decay = min(cfg.ema_decay, (1 + self.step_count) / (10 + self.step_count))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - decay)
        self.step_count += 1
        return loss.detach()

    def state_dict(self) -> dict:
        """Everything a resume needs."""
        return {
            "step": self.step_count, "config": dataclasses.asdict(self.cfg),
            "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
            "ema": self.ema, "optimizer": self.opt.state_dict(),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` taken from a trainer with the same config."""
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        with torch.no_grad():
            for e, saved in zip(self.ema, state["ema"]):
                e.copy_(saved)
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step_count = int(state["step"])

    def ema_models(self):
        """Copies of the UNet and text encoder holding the EMA weights."""
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        ema_params = list(unet.parameters()) + list(text_encoder.parameters())
        with torch.no_grad():
            for p, e in zip(ema_params, self.ema):
                p.copy_(e)
        return unet.eval(), text_encoder.eval()


def save_checkpoint(trainer: TeacherTrainer, out: Path, elapsed_s: float) -> None:
    """Write ``out/checkpoint.pt`` atomically: a temporary file, then ``os.replace``."""
    state = trainer.state_dict() | {"elapsed_s": elapsed_s}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


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
        "step": trainer.step_count,
        "images_seen": trainer.step_count * trainer.cfg.batch_size,
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
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
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
    """The run's config: the checkpoint's on resume, else defaults with --tiny/--batch-size/--seed."""
    ckpt = out / CHECKPOINT
    if args.resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume given but {ckpt} does not exist; drop --resume to start a new run")
        saved = json.loads((out / "config.json").read_text())
        return TeacherConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    if ckpt.exists():
        raise ValueError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
    over = dict(TINY) if args.tiny else {}
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    if args.seed is not None:
        over["seed"] = args.seed
    return TeacherConfig(**over)


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(args, out)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    images, labels = fmnist.load_fashion_mnist("train", args.data_root)
    tokenizer = fmnist.write_clip_tokenizer(out / "tokenizer", model_max_length=cfg.max_tokens)
    trainer = TeacherTrainer(cfg, images, labels, tokenizer)
    elapsed_before = 0.0
    stats_path = out / "stats.jsonl"
    if args.resume:
        state = torch.load(out / CHECKPOINT, weights_only=False)
        trainer.load_state_dict(state)
        elapsed_before = float(state.get("elapsed_s", 0.0))
        # Drop stats logged after the checkpoint: those steps are about to be redone.
        if stats_path.exists():
            kept = [ln for ln in stats_path.read_text().splitlines() if json.loads(ln)["step"] <= trainer.step_count]
            stats_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"resumed at step {trainer.step_count} ({elapsed_before / 60:.1f} min trained)", flush=True)
    elif stats_path.exists():
        stats_path.unlink()

    start = time.time()
    deadline = start + 60 * args.minutes if args.minutes is not None else math.inf
    losses: list[torch.Tensor] = []
    recent_loss = None
    tick_start, tick_step = time.time(), trainer.step_count
    total = args.max_steps if args.max_steps is not None else None
    bar = tqdm(initial=trainer.step_count, total=total, desc="teacher", mininterval=10, file=sys.stdout)
    while (args.max_steps is None or trainer.step_count < args.max_steps) and time.time() < deadline:
        losses.append(trainer.step())
        bar.update(1)
        step = trainer.step_count
        if step % args.log_every == 0:
            recent_loss = torch.stack(losses).mean().item()
            losses.clear()
            now = time.time()
            row = {"step": step, "loss": round(recent_loss, 5),
                   "s_per_step": round((now - tick_start) / max(1, step - tick_step), 4),
                   "minutes": round((elapsed_before + now - start) / 60, 2)}
            tick_start, tick_step = now, step
            with open(stats_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{recent_loss:.4f}")
        if step % args.checkpoint_every == 0:
            save_checkpoint(trainer, out, elapsed_before + time.time() - start)
        if args.export_to is not None and step % args.export_every == 0:
            export_pipeline(trainer, args.export_to,
                            teacher_info(trainer, elapsed_before + time.time() - start, recent_loss, args.threads))
    bar.close()
    if losses:
        recent_loss = torch.stack(losses).mean().item()
    elapsed = elapsed_before + time.time() - start
    save_checkpoint(trainer, out, elapsed)
    if args.export_to is not None:
        export_pipeline(trainer, args.export_to, teacher_info(trainer, elapsed, recent_loss, args.threads))
    print(f"stopped at step {trainer.step_count} after {elapsed / 60:.1f} min; checkpoint in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
