"""The diffusion-loss trainer: vanilla LoRA, TSM fostering (stage 1) and assembling (stage 2).

One trainer for every backbone family (`tsm_core.train.backbones`). Per optimizer step it draws
timesteps in the phase's range, noises the (latent) images, and regresses the backbone's target
inside ``with tsm.timesteps(t):`` (forward, text encoding and backward), so each sample trains only
its own interval's expert, and text-encoder experts see the same per-sample timestep.

Randomness per step (timesteps, noise, VAE samples) comes from a generator seeded by (seed, step),
and folder data is indexed by step, so ``resume`` continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import TSMConfig, attach, load_adapter
from ..train.accel import make_accelerator, step_generator
from ..train.backbones import Backbone, load_backbone
from ..train.checkpoint import CheckpointManager
from ..train.logging import RunLogger, progress
from ..train.optim import check_finite, clip_gradients, sync_gradients, warmup_schedule
from ..train.recipe import save_recipe
from .data import batch_stream, build_dataset
from .recipe import FinetuneRecipe, Phase, plan_phases

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
TEXT_ADAPTER_DIR = "adapter_text_encoder{}"


class FinetuneTrainer:
    """Run a `FinetuneRecipe`: build the backbone and adapters, then train its phases in order.

    Args:
        recipe: the resolved recipe.
        run_dir: overrides ``recipe.train.run_dir``.

    Attributes after construction: ``backbone``, ``tsm`` (the denoiser's adapter), ``text_adapters``
    (one per text encoder that has matching layers), ``phases``, ``accelerator``.
    """

    def __init__(self, recipe: FinetuneRecipe, run_dir: str | os.PathLike | None = None):
        self.recipe = recipe
        tr = recipe.train
        self.run_dir = Path(run_dir if run_dir is not None else tr.run_dir)
        # Seeded before attach(), so the experts start from the same random A matrices every run.
        self.accelerator = make_accelerator(tr.mixed_precision, 1, self.run_dir, seed=tr.seed)
        self.backbone: Backbone = load_backbone(recipe.model.kind, recipe.model.path,
                                                recipe.model.max_sequence_length)
        self.backbone.to(self.accelerator.device)
        bb = self.backbone
        lora = recipe.lora
        common = dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, scales=recipe.scales,
                      num_timesteps=bb.num_timesteps, router_input=lora.router_input,
                      router_activation=lora.router_activation)
        self.tsm = attach(bb.denoiser, TSMConfig(target_modules=lora.target_modules, **common))
        self.text_adapters = []
        self.text_encoder_index: list[int] = []  # which encoder each text adapter sits on
        if lora.text_encoder_targets:
            te_cfg = TSMConfig(target_modules=lora.text_encoder_targets, **common)
            ends = tuple("." + t for t in lora.text_encoder_targets)
            for i, te in enumerate(bb.text_encoders):
                # e.g. SD3: CLIP q_proj/v_proj targets match the two CLIPs, not the T5
                if any(n.endswith(ends) for n, _ in te.named_modules()):
                    self.text_adapters.append(attach(te, te_cfg, context=self.tsm.context))
                    self.text_encoder_index.append(i)
            if not self.text_adapters:
                raise ValueError(f"lora.text_encoder_targets={lora.text_encoder_targets} match no layer of any "
                                 f"text encoder of this {recipe.model.kind} model")
        if tr.gradient_checkpointing:
            bb.enable_gradient_checkpointing(text_encoders=bool(self.text_adapters))
        self.phases = plan_phases(recipe, bb.num_timesteps)
        self.total_steps = self.phases[-1].end
        self.ckpt = CheckpointManager(self.run_dir, keep_last=tr.keep_last, accelerator=self.accelerator)
        self.dataset = build_dataset(recipe.data)
        self._latent_cache: dict[int, torch.Tensor] = {}
        self._text_cache: dict[str, dict] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self):
        return [self.tsm, *self.text_adapters]

    def _enter_phase(self, ph: Phase):
        """Set every adapter's mode for ``ph`` and build a fresh optimizer and LR schedule."""
        st, tr = self.recipe.stages[ph.stage], self.recipe.train
        for a in self.adapters:
            if ph.mode == "expert":
                a.set_mode("expert", scale=ph.scale, experts=ph.experts)
            else:
                a.set_mode("mixture", core_scale=ph.core_scale, context_scales=ph.context_scales)
        groups = [{"params": list(self.tsm.trainable_parameters()), "lr": st.lr, "weight_decay": st.weight_decay}]
        te_params = [p for a in self.text_adapters for p in a.trainable_parameters()]
        if te_params:
            groups.append({"params": te_params, "lr": st.text_encoder_lr or st.lr,
                           "weight_decay": st.weight_decay if st.text_encoder_weight_decay is None
                           else st.text_encoder_weight_decay})
        # Through accelerate: with fp16 its optimizer unscales the loss-scaled gradients before stepping.
        opt = self.accelerator.prepare(torch.optim.AdamW(groups, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps))
        return opt, warmup_schedule(opt, st.lr_warmup_steps)

    def _modules(self) -> dict:
        mods = {"adapter": self.tsm.state_dict()}
        for i, a in enumerate(self.text_adapters):
            mods[f"adapter_text_encoder{i}"] = a.state_dict()
        return mods

    # ------------------------------------------------------------------ one step
    def _cond(self, texts: list[str]):
        if not self.recipe.data.cache_text:
            return self.backbone.encode_prompts(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            with torch.no_grad():
                enc = self.backbone.encode_prompts(missing)
            for i, t in enumerate(missing):
                self._text_cache[t] = {k: v[i:i + 1].detach() for k, v in enc.items()}
        return {k: torch.cat([self._text_cache[t][k] for t in texts]) for k in self._text_cache[texts[0]]}

    def _latents(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        bb, dev = self.backbone, self.accelerator.device
        if not (self.recipe.data.cache_latents and "index" in batch):
            return bb.vae_encode(batch["pixel_values"].to(dev), generator=g if bb.vae is not None else None)
        todo = [j for j, i in enumerate(batch["index"]) if i not in self._latent_cache]
        if todo:
            z = bb.vae_encode(batch["pixel_values"][todo].to(dev))  # the mean: a cache must not be one sample
            for j, zz in zip(todo, z):
                self._latent_cache[batch["index"][j]] = zz.detach()
        return torch.stack([self._latent_cache[i] for i in batch["index"]])

    def train_step(self, ph: Phase, step: int, data, opt, sched) -> torch.Tensor:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); returns the mean loss."""
        tr, bb, acc = self.recipe.train, self.backbone, self.accelerator
        total = torch.zeros(())
        for micro in range(tr.gradient_accumulation_steps):
            g = step_generator(tr.seed, step, acc.process_index, micro)
            batch = next(data)
            x0 = self._latents(batch, g)
            t = bb.sample_timesteps(x0.shape[0], *ph.t_range, generator=g)
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            with self.tsm.timesteps(t):  # forward AND backward: checkpoint recomputes route the same way
                cond = self._cond(batch["text"])
                with acc.autocast():
                    pred = bb.predict(bb.add_noise(x0, noise, t), t, cond)
                loss = F.mse_loss(pred.float(), bb.target(x0, noise, t).float())
                acc.backward(loss / tr.gradient_accumulation_steps)
            total += loss.detach().cpu() / tr.gradient_accumulation_steps
        params = [p for grp in opt.param_groups for p in grp["params"]]
        sync_gradients(params, acc)
        clip_gradients(params, acc, tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return total

    # ------------------------------------------------------------------ the run
    def _phase_at(self, done: int) -> tuple[Phase, bool]:
        """The phase that runs step ``done + 1`` and whether it is already under way."""
        for ph in self.phases:
            if ph.start <= done < ph.end:
                return ph, done > ph.start
        return self.phases[-1], True

    def train(self, resume: bool = False) -> dict:
        """Train every phase; returns ``{"step", "loss", "adapter_dir", "skipped"}``.

        With ``resume`` it continues from the run folder's latest checkpoint (FileNotFoundError if
        there is none). The resolved recipe is written to ``run_dir/recipe.yaml``.

        Raises:
            NonFiniteLossError: (a ``FloatingPointError``) the loss became NaN/inf; the last checkpoint is
                kept and the step is named.
        """
        tr, acc = self.recipe.train, self.accelerator
        done = 0
        if resume:
            latest = self.ckpt.latest()
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.ckpt.dir}; start without --resume")
            done = int(latest.name.split("_")[1])
        if acc.is_main_process:
            save_recipe(self.recipe, self.run_dir / "recipe.yaml")
        logger = RunLogger(self.run_dir, enabled=acc.is_main_process, use_tensorboard=tr.tensorboard)
        bar = progress(self.total_steps, desc="finetune", disable=not acc.is_main_process)
        bar.update(done)
        data = batch_stream(self.dataset, self.recipe.data, tr.batch_size, tr.seed,
                            start_batch=done * tr.gradient_accumulation_steps,
                            rank=acc.process_index, world=acc.num_processes)
        loss = torch.tensor(float("nan"))
        current, opt, sched = None, None, None
        if resume:
            ph, under_way = self._phase_at(done)
            # Set the mode first, so a stage-2 checkpoint's routers exist to load into.
            current = ph
            opt, sched = self._enter_phase(ph)
            self.ckpt.load(latest, self._modules(),
                           {"opt": opt} if under_way else None, {"sched": sched} if under_way else None)
        step = done
        while step < self.total_steps:
            ph, _ = self._phase_at(step)
            if ph is not current:
                current = ph
                opt, sched = self._enter_phase(ph)
                log.info("phase %s: steps %d-%d", ph.name, ph.start + 1, ph.end)
            loss = self.train_step(ph, step, data, opt, sched)
            step += 1
            check_finite(loss, step, f"diffusion ({ph.name})", self.ckpt.latest())
            bar.update(1)
            if step % tr.log_every == 0 or step == self.total_steps:
                logger.log(step, {"loss": loss, "lr": opt.param_groups[0]["lr"], "phase": ph.index,
                                  "data/skipped": self.skipped})
                bar.set_postfix(loss=f"{float(loss):.4f}", phase=ph.name)
            if tr.sample_every and step % tr.sample_every == 0:
                self._log_samples(logger, step)
            if step % tr.checkpoint_every == 0 or step == self.total_steps:
                self.ckpt.save(step, self._modules(), {"opt": opt}, {"sched": sched},
                               state={"phase": ph.index, "phase_name": ph.name})
        bar.close()
        if acc.is_main_process:
            self.tsm.save(self.run_dir / ADAPTER_DIR)
            for i, a in zip(self.text_encoder_index, self.text_adapters):
                a.save(self.run_dir / TEXT_ADAPTER_DIR.format(i))
        if tr.sample_prompts:
            self._log_samples(logger, step)
        logger.close()
        return {"step": step, "loss": float(loss), "adapter_dir": self.run_dir / ADAPTER_DIR, "skipped": self.skipped}

    @property
    def skipped(self) -> int:
        """Samples skipped so far because they could not be read."""
        counter = getattr(self.dataset, "skip_counter", None)
        return counter.count if counter is not None else 0

    def _log_samples(self, logger: RunLogger, step: int) -> None:
        tr = self.recipe.train
        if not tr.sample_prompts:
            return
        images = self.backbone.sample(tr.sample_prompts, tsm=self.tsm, steps=tr.sample_steps,
                                      guidance_scale=tr.guidance_scale,
                                      generator=torch.Generator().manual_seed(tr.seed), size=tr.sample_size,
                                      reencode_prompts=bool(self.text_adapters))
        logger.log_image(step, "samples", images)


def load_finetuned(kind: str, model_path: str | os.PathLike, run_dir: str | os.PathLike,
                   max_sequence_length: int | None = None):
    """Load a backbone with the adapters a finetune run saved; returns ``(backbone, tsm, text_adapters)``.

    The adapters come back in the mode they were saved in (``expert`` after stage 1, ``mixture`` after
    stage 2); sample with ``backbone.sample(prompts, tsm=tsm, reencode_prompts=bool(text_adapters))``.
    """
    run_dir = Path(run_dir)
    bb = load_backbone(kind, model_path, max_sequence_length)
    tsm = load_adapter(bb.denoiser, run_dir / ADAPTER_DIR)
    texts = []
    for i, te in enumerate(bb.text_encoders):
        d = run_dir / TEXT_ADAPTER_DIR.format(i)
        if d.is_dir():
            texts.append(load_adapter(te, d, context=tsm.context))
    return bb, tsm, texts
