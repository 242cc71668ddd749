"""The diffusion-loss trainer: vanilla LoRA, TSM fostering (stage 1) and assembling (stage 2).

One trainer for every backbone family (`tsm_core.models`). Per optimizer step it draws
timesteps in the phase's range, noises the (latent) images, and regresses the backbone's target
inside ``with tsm.timesteps(t):`` (forward, text encoding and backward), so each sample trains only
its own interval's expert, and text-encoder experts see the same per-sample timestep.

Randomness per step (timesteps, noise, VAE samples) comes from a generator seeded by (seed, step),
and folder data is indexed by step, so ``resume`` continues exactly as an uninterrupted run.

The run loop, checkpoints, resume and optimizer plumbing are the shared `PhasedTrainer`'s; a skeleton
step here is one optimizer step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import attach, load_adapter
from ..card import RunCard, write_run_card
from ..data.stream import batch_stream, build_dataset, read_ahead
from ..models import Backbone, load_backbone, video_strip
from ..train.accel import step_generator
from ..train.sections import child_folder
from ..train.skeleton import PhasedTrainer
from .recipe import FinetuneRecipe, per_process_micro_batch, plan_phases

ADAPTER_DIR = "adapter"
TEXT_ADAPTER_DIR = "adapter_text_encoder{}"
PHASES_DIR = "phases"


def phase_folder(run_dir: str | os.PathLike, index: int, name: str) -> Path:
    """Where phase ``index`` (named ``name``, e.g. ``stage0_foster_n8``) keeps its adapters, laid out like
    the run folder (``adapter/``, ``adapter_text_encoder{i}/``) so `load_finetuned` reads either."""
    return child_folder(Path(run_dir) / PHASES_DIR, f"{index:02d}_{name}")  # a name must not leave phases/


class FinetuneTrainer(PhasedTrainer):
    """Run a `FinetuneRecipe`: build the backbone and adapters, then train its phases in order.

    Args:
        recipe: the resolved recipe.
        run_dir: overrides ``recipe.train.run_dir``.

    Attributes after construction: ``backbone``, ``tsm`` (the denoiser's adapter), ``text_adapters``
    (one per text encoder that has matching layers), ``phases``, ``acc`` (the accelerator).
    """

    desc = "finetune"
    shape_keys = PhasedTrainer.shape_keys + ("experts.text_encoder_targets*", "experts.text_encoder_experts", "stages", "stages.*.type",
                                             "stages.*.scale", "stages.*.schedule", "stages.*.core_scale",
                                             "stages.*.context_scales*")

    def __init__(self, recipe: FinetuneRecipe, run_dir: str | os.PathLike | None = None):
        tr = recipe.train
        run_dir = run_dir if run_dir is not None else tr.run_dir
        if run_dir is None:
            raise ValueError("no run folder: set train.run_dir in the recipe or pass one (tsm-finetune --run-dir DIR)")
        # Seeded here, before attach(), so the experts start from the same random A matrices every run.
        super().__init__(recipe, run_dir, seed=tr.seed,
                         mixed_precision=tr.mixed_precision, checkpoint_every=tr.checkpoint_every,
                         log_every=tr.log_every, sample_every=tr.sample_every, keep_last=tr.keep_last,
                         max_grad_norm=tr.max_grad_norm, tensorboard=tr.tensorboard)
        self.backbone: Backbone = load_backbone(recipe.model.kind, recipe.model.path,
                                                recipe.model.max_sequence_length)
        self.backbone.to(self.device)
        bb = self.backbone
        if hasattr(bb, "num_frames"):  # video backbones sample videos as long as the training clips
            bb.num_frames = recipe.data.num_frames
        if hasattr(bb, "resolution"):  # SDXL's time_ids say the size the images are trained at
            bb.resolution = recipe.data.resolution
        ex = recipe.experts
        self.tsm = attach(bb.denoiser, ex.tsm_config(recipe.scales, bb.num_timesteps))
        if recipe.train.cache_core_merge:  # assembling phases, for batches inside one core interval
            self.tsm.set_merged_training("auto", cache_core=True)
        self.text_adapters = []
        self.text_encoder_index: list[int] = []  # which encoder each text adapter sits on
        if ex.text_encoder_targets:
            # "plain": one interval covering every t, i.e. an ordinary LoRA (routing then always picks it).
            te_scales = (1,) if ex.text_encoder_experts == "plain" else recipe.scales
            te_cfg = ex.tsm_config(te_scales, bb.num_timesteps, target_modules=ex.text_encoder_targets)
            ends = tuple("." + t for t in ex.text_encoder_targets)
            for i, te in enumerate(bb.text_encoders):
                # e.g. SD3: CLIP q_proj/v_proj targets match the two CLIPs, not the T5
                if any(n.endswith(ends) for n, _ in te.named_modules()):
                    self.text_adapters.append(attach(te, te_cfg, context=self.tsm.context))
                    self.text_encoder_index.append(i)
            if not self.text_adapters:
                raise ValueError(f"experts.text_encoder_targets={ex.text_encoder_targets} match no layer of any "
                                 f"text encoder of this {recipe.model.kind} model")
        if tr.gradient_checkpointing:
            bb.enable_gradient_checkpointing(text_encoders=bool(self.text_adapters))
        self.phases = plan_phases(recipe, bb.num_timesteps)
        # The global batch (A.1's 64) split over processes and accumulation; a recipe written when batch_size
        # counted one process is refused where the meanings differ, before any step.
        self.micro_batch = per_process_micro_batch(recipe, self.acc.num_processes)
        if self.acc.is_main_process:
            print(f"global batch {tr.batch_size} = {self.micro_batch} per process x {self.acc.num_processes} "
                  f"process(es) x {tr.gradient_accumulation_steps} accumulation step(s)", flush=True)
        self.last_loss = torch.tensor(float("nan"))
        self.dataset = build_dataset(recipe.data)
        self._latent_cache: dict[int, torch.Tensor] = {}
        self._text_cache: dict[str, dict] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self):
        return [self.tsm, *self.text_adapters]

    def phase_lengths(self) -> list[tuple[str, int]]:
        return [(ph.name, ph.steps) for ph in self.phases]

    def enter_phase(self, index: int) -> None:
        """Set every adapter's mode for phase ``index`` and build a fresh optimizer and LR schedule."""
        ph = self.phases[index]
        st, tr = self.recipe.stages[ph.stage], self.recipe.train
        plain_text = self.recipe.experts.text_encoder_experts == "plain"
        for a in self.adapters:
            if plain_text and a is not self.tsm:  # the one LoRA: trained while fostering, frozen while assembling
                a.set_mode("expert", scale=1, experts=None if ph.mode == "expert" else [])
            elif ph.mode == "expert":
                a.set_mode("expert", scale=ph.scale, experts=ph.experts)
            else:
                a.set_mode("mixture", core_scale=ph.core_scale, context_scales=ph.context_scales)
        groups = [{"params": list(self.tsm.trainable_parameters()), "lr": st.lr, "weight_decay": st.weight_decay}]
        te_params = [p for a in self.text_adapters for p in a.trainable_parameters()]
        if te_params:
            groups.append({"params": te_params, "lr": st.text_encoder_lr or st.lr,
                           "weight_decay": st.weight_decay if st.text_encoder_weight_decay is None
                           else st.text_encoder_weight_decay})
        opt, sched = self.make_optimizer(groups, st.lr, st.warmup_steps, betas=(tr.adam_beta1, tr.adam_beta2),
                                         eps=tr.adam_eps, weight_decay=st.weight_decay)
        self.optimizers, self.schedulers = {"opt": opt}, {"sched": sched}

    def checkpoint_modules(self) -> dict:
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
        bb, dev = self.backbone, self.device
        if not (self.recipe.data.cache_latents and "index" in batch):
            return bb.vae_encode(batch["pixel_values"].to(dev), generator=g if bb.vae is not None else None)
        todo = [j for j, i in enumerate(batch["index"]) if i not in self._latent_cache]
        if todo:
            z = bb.vae_encode(batch["pixel_values"][todo].to(dev))  # the mean: a cache must not be one sample
            for j, zz in zip(todo, z):
                self._latent_cache[batch["index"][j]] = zz.detach()
        return torch.stack([self._latent_cache[i] for i in batch["index"]])

    def train_step(self) -> dict:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); logs the mean loss."""
        tr, bb, acc = self.recipe.train, self.backbone, self.acc
        ph, step = self.phases[self.phase_index], self.global_step
        total = torch.zeros(())
        for micro in range(tr.gradient_accumulation_steps):
            g = step_generator(tr.seed, step, acc.process_index, micro)
            batch = next(self._data)
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
        # Before the update: a NaN loss must not reach the weights the last checkpoint is compared with.
        self.check_finite(total, "diffusion")
        self.apply_gradients(self.optimizers["opt"])
        self.schedulers["sched"].step()
        self.last_loss = total
        lost = len(getattr(getattr(self.dataset, "skip_counter", None), "lost_shards", {}))
        return {"loss": total, "phase": ph.index, "data/skipped": self.skipped, "data/shards_lost": lost}

    # ------------------------------------------------------------------ the run
    def on_start(self) -> None:
        # Indexed by step: a resumed run reads the batches the uninterrupted run would have read. The first
        # batch is read now, so data that cannot give one is a user's error before step 1 (`read_ahead`).
        tr, acc = self.recipe.train, self.acc
        self._data = read_ahead(batch_stream(self.dataset, self.recipe.data, self.micro_batch, tr.seed,
                                             start_batch=self.global_step * tr.gradient_accumulation_steps,
                                             rank=acc.process_index, world=acc.num_processes), self.recipe.data)

    def _save_adapters(self, folder: Path) -> None:
        if self.acc.is_main_process:
            self.tsm.save(folder / ADAPTER_DIR)
            for i, a in zip(self.text_encoder_index, self.text_adapters):
                a.save(folder / TEXT_ADAPTER_DIR.format(i))

    def _run_card(self) -> RunCard:
        """What the final adapter's model card says beyond the adapter file: the base model, the recipe's key
        settings and the phases."""
        r, ex, bb = self.recipe, self.recipe.experts, self.backbone
        settings = {"model.path": r.model.path, "model.kind": r.model.kind,
                    "experts": f"rank {ex.rank}, alpha {ex.alpha:g}, scales {list(r.scales)}, targets {ex.target_modules}",
                    "data": f"{r.data.source} {r.data.path} at {r.data.resolution} px",
                    "train.batch_size (global)": r.train.batch_size, "train.seed": r.train.seed}
        if ex.text_encoder_targets:
            settings["experts.text_encoder_targets"] = f"{ex.text_encoder_targets} ({ex.text_encoder_experts})"
        phases = [(ph.name, ph.steps,
                   f"experts {ph.experts if ph.experts is not None else 'all'} of scale {ph.scale}, t in "
                   f"[{ph.t_range[0]}, {ph.t_range[1]})" if ph.mode == "expert" else
                   f"router (core {ph.core_scale}, context {list(ph.context_scales or ())})") for ph in self.phases]
        return RunCard("finetune", r.model.path, kind=r.model.kind, component=bb.denoiser_subfolder,
                       run_dir=str(self.run_dir), settings=settings, phases=phases, steps=self.global_step,
                       # a stock pipeline needs a VAE; text-encoder experts need prompts re-encoded per step
                       pipeline_class="DiffusionPipeline" if bb.vae is not None else None,
                       text_adapters=[TEXT_ADAPTER_DIR.format(i) for i in self.text_encoder_index],
                       video=hasattr(bb, "num_frames"))

    def end_phase(self, index: int) -> None:
        """Keep each phase's adapters (`phase_folder`): a stage-1 student inside a longer run stays
        usable after stage 2 trains on (e.g. the fostered experts that the router then assembles)."""
        self._save_adapters(phase_folder(self.run_dir, index, self.phases[index].name))

    def save_final(self) -> dict:
        """Write ``adapter/`` (with its model card) and ``adapter_text_encoder{i}/`` and the final samples; returns
        ``{"step", "loss", "adapter_dir", "skipped", "data"}`` (``data``: what could not be read, in words)."""
        self._save_adapters(self.run_dir)
        if self.acc.is_main_process:
            write_run_card(self.run_dir / ADAPTER_DIR, self._run_card())
        self.sample("final")
        counter = getattr(self.dataset, "skip_counter", None)
        return {"step": self.global_step, "loss": float(self.last_loss), "adapter_dir": self.run_dir / ADAPTER_DIR,
                "skipped": self.skipped, "data": counter.summary() if counter is not None else ""}

    @property
    def skipped(self) -> int:
        """Samples skipped so far because they could not be read."""
        counter = getattr(self.dataset, "skip_counter", None)
        return counter.count if counter is not None else 0

    def sample(self, tag: str) -> None:
        """A grid of the recipe's sample prompts with the current adapters, logged at this step."""
        tr = self.recipe.train
        if not tr.sample_prompts:
            return
        images = self.backbone.sample(tr.sample_prompts, tsm=self.tsm, steps=tr.sample_steps,
                                      guidance_scale=tr.guidance_scale,
                                      generator=torch.Generator().manual_seed(tr.seed), size=tr.sample_size,
                                      reencode_prompts=bool(self.text_adapters))
        if images.ndim == 5:  # videos: one strip of frames per prompt in the grid, and a GIF each
            from ..data.video import save_gif

            if self.acc.is_main_process:
                for i, video in enumerate(images):
                    save_gif(video, self.run_dir / "samples" / tag / f"{i:02d}.gif")
            images = video_strip(images)
        self.logger.log_image(self.global_step, "samples", images)


def load_finetuned(kind: str, model_path: str | os.PathLike, run_dir: str | os.PathLike,
                   max_sequence_length: int | None = None):
    """Load a backbone with the adapters a finetune run saved; returns ``(backbone, tsm, text_adapters)``.

    ``run_dir`` is the run folder (its final adapters) or one of its `phase_folder` s (the adapters as
    they were at the end of that phase).

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
