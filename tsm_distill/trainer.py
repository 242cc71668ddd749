"""DMD2 distillation of a few-step student with timestep LoRA experts (paper section 4.3, A.3).

Each iteration: draw the student step k (shared by every process), roll the student out to step k
(each earlier step through its own expert), then
  * ``generator_step`` (every ``fake_updates_per_generator_update`` iterations): DMD loss (+ GAN) on
    the trained experts or router only;
  * ``critic_step`` (every iteration): fake-score denoising loss (+ GAN D loss) on fake and D only.
Phases (``recipe.phases``) switch which experts train, whether the GAN is on, and the router phase.

Set-up semantics follow DMD2's ``main/train_sd.py`` and ``main/sd_guidance.py``:

* both learning-rate schedules step every iteration, so warm-up counts iterations (``PhaseConfig``);
* ``batch_size`` is the global batch; each process draws its share;
* every random draw of an iteration (rollout noise, DMD ``s`` and its noise, fake-loss ``t`` and its
  noise, diffusion-GAN ``t`` and its noise, prompts, real images) comes from generators seeded with
  the process index, as DMD2 seeds ``seed + process_index``; only the student step k is shared;
* D is text-conditional: fakes with their prompt's embedding, reals with their own captions';
* the fake score's prediction inside the DMD gradient runs in fp32 outside autocast, x0 in float64,
  and the GAN head runs on ``features.float()`` outside autocast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tsm_core import attach, load_adapter
from tsm_core.card import RunCard, write_run_card
from tsm_core.models import Backbone, cond_map
from tsm_core.serialization import check_adapter_fits, read_adapter_file
from tsm_core.train.accel import step_generator
from tsm_core.train.ema import EMA
from tsm_core.train.logging import save_image_grid
from tsm_core.train.optim import NonFiniteLossError
from tsm_core.train.sections import child_folder
from tsm_core.train.skeleton import PhasedTrainer, check_run_folder

from . import losses
from .config import DistillExperts, DistillRecipe, PhaseConfig, per_process_batch
from .critic import Critic
from .data import PromptSource, RealSource
from .rollout import backward_simulation, sample
from .student import Student
from .teacher import encode, load_teacher

# Streams of step_generator(seed, step, process_index, stream): one generator per purpose, so adding a
# draw to one does not shift the others.
_DATA_STREAM, _NOISE_STREAM = 1, 2

def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (CPU), then moved."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


class DMD2Trainer(PhasedTrainer):
    """Runs a :class:`DistillRecipe` in ``run_dir``. Pass an ``accelerate.Accelerator`` to scale out, and
    ``teacher`` (a built `Backbone` of ``model.kind``) to skip loading ``model.path``.

    Settings that would fail mid-run are checked here, before anything trains: the recipe's own
    (``DistillRecipe``), the teacher's timesteps, and, when a phase uses the GAN, that real samples
    have the generator's size and the GAN head fits the fake UNet's bottleneck.
    """

    desc = "distill"
    shape_keys = PhasedTrainer.shape_keys + (
        "experts.scales*", "critic.lora_rank", "critic.lora_targets*", "student_timesteps*", "student_sigmas*", "phases",
        "phases.*.type", "phases.*.scale", "phases.*.experts*", "phases.*.core_scale", "phases.*.context_scales*",
        "phases.*.gan")

    def __init__(self, recipe: DistillRecipe, run_dir: str | Path, accelerator=None, teacher: Backbone | None = None):
        tc = recipe.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        super().__init__(recipe, run_dir, seed=tc.seed, mixed_precision=tc.mixed_precision,
                         checkpoint_every=tc.checkpoint_every, log_every=tc.log_every, sample_every=tc.sample_every,
                         keep_last=tc.keep_last, max_grad_norm=tc.max_grad_norm, accelerator=accelerator)
        ec = recipe.experts
        if ec.init_from:  # from the file's header alone, before any model loads: a wrong file fails in a second
            check_init_from(ec)
        if teacher is None:
            teacher = load_teacher(recipe.model.path, recipe.model.kind, recipe.model.max_sequence_length)
        elif teacher.kind != recipe.model.kind:  # a built teacher (tools/gpu_check.py: random weights from config)
            raise ValueError(f"the given teacher is a {teacher.kind!r} backbone but the recipe's model.kind is "
                             f"{recipe.model.kind!r}; build the teacher of the recipe's family")
        self.teacher = teacher
        T = self.teacher.num_timesteps
        uses_gan = any(ph.gan for ph in recipe.phases)
        # The fake score is copied from the clean teacher before the experts are attached.
        self.critic = Critic(self.teacher, recipe.critic.lora_rank, tuple(recipe.critic.lora_targets), uses_gan)
        self.tsm = attach(self.teacher.denoiser, ec.tsm_config(ec.scales, T))
        if tc.cache_core_merge:  # acts in the assembling phases only, where the core is frozen
            self.tsm.set_merged_training("auto", cache_core=True)
        if ec.init_from:
            self._init_experts(ec.init_from, ec.init_scales)
        self.teacher.to(self.device)
        self.critic.to(self.device)
        if tc.gradient_checkpointing:
            self.teacher.denoiser.enable_gradient_checkpointing()
            self.critic.fake.enable_gradient_checkpointing()
        self.student = Student(self.teacher, self.tsm)
        self.timesteps = recipe.timesteps(T)
        if self.teacher.timestep_dtype == torch.long and max(self.timesteps) >= T:
            raise ValueError(f"student timestep {max(self.timesteps)} >= the teacher's {T} training timesteps")
        # The real score's unconditional input: the encoding of "" (SD1.5, SD3), zeros for SDXL (DMD2).
        with torch.no_grad():
            self.uncond = self.teacher.unconditional()
        self.prompts = PromptSource(recipe.data.prompts)
        if uses_gan and not recipe.data.real_images:
            raise ValueError("a GAN phase needs data.real_images (latent cache, image folder, shards or builtin:fmnist)")
        self.real = (RealSource(recipe.data.real_images, recipe.data.resolution, self.teacher.vae_encode,
                                recipe.data.encode_batch) if uses_gan else None)
        if uses_gan:
            self._check_gan_fits()  # may rebuild the head: before sharding
        if tc.fsdp:
            self._shard(tc.fsdp_modules)
        self.ema = EMA(self.tsm.state_dict(), tc.ema_decay) if tc.ema_decay else None
        self.per_process_batch = [per_process_batch(ph.batch_size, self.acc.num_processes, f"phases[{i}] "
                                                    f"({ph.name!r}).batch_size") for i, ph in enumerate(recipe.phases)]
        if self.acc.is_main_process:
            for ph, b in zip(recipe.phases, self.per_process_batch):
                print(f"phase {ph.name}: global batch {ph.batch_size} = {b} per process x "
                      f"{self.acc.num_processes} process(es); warm-up {ph.warmup_steps} iterations", flush=True)

    # ------------------------------------------------------------------ set-up
    def _shard(self, modules: list[str]) -> None:
        """FSDP2 over the processes (``train.fsdp``): the critic, the generator's frozen base without its
        experts (they stay whole and are synced like unsharded gradients), the text encoders. After every
        check that runs a module on one process only: a sharded module runs on all processes or none."""
        from tsm_core.train.fsdp import denoiser_units, encoder_units, shard

        if "critic" in modules:
            shard(self.critic.shard_units())
        if "generator" in modules:
            shard(denoiser_units(self.teacher.denoiser), ignored=self.tsm.adapter_parameters())
        if "text_encoders" in modules:
            for encoder in self.teacher.text_encoders:
                shard(encoder_units(encoder), reshard_root=True)  # run only under no_grad: no backward frees it

    def _pixels(self, size: int) -> int:
        """The image size in pixels of a model-space size (VAE factor 2^(levels - 1); 1 without a VAE)."""
        return size * self.teacher.vae_scale

    def _draw_t(self, low: float, high: float, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """``n`` training timesteps uniform in ``[low, high)`` from ``generator`` (on the CPU), warped to the
        teacher's training distribution (SD3's shift; DDPM: integers, unwarped, as DMD2 draws them)."""
        t = self.teacher.sample_timesteps(n, low, high, generator)
        return self.teacher.shift_timesteps(t).to(device)

    @torch.no_grad()
    def _check_gan_fits(self) -> None:
        """Real samples must have the generator's shape, and D must run on it: checked with one dummy pass
        now, so a mismatch is a clear error at start, not a kernel-size error at the first GAN step."""
        dc = self.recipe.data
        size = self.teacher.latent_size
        fake_shape = (self.teacher.latent_channels, size, size)
        if self.real.cache is not None:
            real_shape, source = tuple(self.real.cache.shape[1:]), f"data.real_images {dc.real_images}"
        else:  # folders and shards are resized to data.resolution, then encoded
            dummy = torch.zeros(1, 3, dc.resolution, dc.resolution, device=self.device)
            real_shape = tuple(self.teacher.vae_encode(dummy).shape[1:])
            source = f"data.resolution {dc.resolution}"
        if real_shape != fake_shape:
            raise ValueError(
                f"{source} gives real samples of shape {real_shape} (model space), but the student generates "
                f"{fake_shape} ({self._pixels(size)} px, the teacher UNet's sample_size {size}): D must see "
                f"reals and fakes at one size; use real images at {self._pixels(size)} px "
                f"(data.resolution: {self._pixels(size)}, or a latent cache of that size)")
        try:
            self.critic.fit_head(torch.zeros(1, *fake_shape, device=self.device), self.uncond)
        except ValueError as e:
            raise ValueError(f"the GAN cannot run at the student's resolution {self._pixels(size)} px "
                             f"({size}x{size} in model space): {e}; use a teacher with a larger sample_size "
                             "or fewer down blocks, or no GAN phase") from e

    def _init_experts(self, path: str, scales: list[int]) -> None:
        """Copy the experts of ``scales`` from a saved adapter (e.g. the LoRA run as the n = 1 context).

        `check_init_from` passed before the teacher loaded; here the adapter is checked against what only
        the teacher fixes: its timesteps T and the shapes of its layers."""
        check_adapter_fits(path, self.tsm.config, scales, where="experts.init_from")
        tensors, _ = read_adapter_file(path)
        own = self.tsm.state_dict()
        keys = [k for k in tensors if any(f".s{s}_e" in k for s in scales)]
        if not keys:
            raise ValueError(f"experts.init_from {path} holds no expert tensors at scales {scales}")
        missing = [k for k in keys if k not in own]
        if missing:
            raise ValueError(f"experts.init_from {path} does not fit this teacher: {len(missing)} of its tensors "
                             f"name no layer of it (e.g. {missing[:2]}); was it trained on another teacher?")
        wrong = [k for k in keys if tuple(tensors[k].shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise ValueError(f"experts.init_from {path} does not fit this teacher's layers: {len(wrong)} tensors "
                             f"differ in shape, e.g. {k}: saved {tuple(tensors[k].shape)}, this generator's "
                             f"{tuple(own[k].shape)}; was it trained on another teacher?")
        with torch.no_grad():
            for k in keys:
                own[k].copy_(tensors[k])

    def _phase_steps(self, ph: PhaseConfig) -> list[int]:
        return phase_student_steps(ph, self.timesteps, self.tsm.intervals)

    def phase_lengths(self) -> list[tuple[str, int]]:
        """(name, iterations) of every phase: a skeleton step is one DMD2 iteration."""
        return [(ph.name, ph.steps) for ph in self.recipe.phases]

    def enter_phase(self, index: int) -> None:
        """Route the generator for phase ``index`` and build fresh optimizers for its trained set."""
        ph = self.recipe.phases[index]
        set_phase_mode(self.tsm, ph)
        self.phase, self.steps = ph, self._phase_steps(ph)
        if self.ema is not None:
            self.ema.track(self.tsm.state_dict())  # the router exists from the mixture phase on
        self.gen_params = list(self.tsm.trainable_parameters())
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]

        # Both schedules step once per iteration in train_step() (PhaseConfig: warm-up counts iterations).
        self.gen_opt, self.gen_sched = self.make_optimizer(self.gen_params, ph.lr, ph.warmup_steps,
                                                           weight_decay=ph.weight_decay)
        self.critic_opt, self.critic_sched = self.make_optimizer(self.critic_params, ph.lr_critic, ph.warmup_steps,
                                                                 weight_decay=ph.weight_decay)
        critic_opt = self.critic_opt
        if self.recipe.train.fsdp:
            from tsm_core.train.fsdp import ShardedOptimizer

            critic_opt = ShardedOptimizer(self.critic, self.critic_opt)  # its moments are shards: checkpointed whole
        self.optimizers = {"generator": self.gen_opt, "critic": critic_opt}
        self.schedulers = {"generator": self.gen_sched, "critic": self.critic_sched}

    # ------------------------------------------------------------------ one iteration
    def _d_input(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """What D sees: the clean x at t = 0 (DMD2 without diffusion-GAN: no noise at all), or x noised
        at a random t with the diffusion-GAN option."""
        B = x.shape[0]
        cc = self.recipe.critic
        if not cc.diffusion_gan:
            return x, torch.zeros(B, dtype=self.teacher.timestep_dtype, device=x.device)
        t = self._draw_t(0, cc.diffusion_gan_max_timestep, B, generator, x.device)
        return self.teacher.add_noise(x, _randn_like(x, generator), t), t

    def _fake_x0_fp32(self, x_s: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake score's x0 for the DMD gradient as DMD2 computes it: the prediction in fp32 outside
        autocast, x0 from it in float64."""
        with torch.no_grad(), torch.autocast(device_type=x_s.device.type, enabled=False):
            pred = self.critic.predict(x_s.float(), s, cond_map(cond, lambda v: v.float()))
        return self.teacher.to_x0(x_s.double(), pred.double(), s)

    def generator_step(self, x_in: torch.Tensor, t: torch.Tensor, cond: dict,
                       generator: torch.Generator | None = None) -> dict:
        """DMD (+ GAN) update of the generator's trainable experts/router only. Returns detached x0 and logs.

        ``generator`` draws the DMD timestep ``s``, its noise and the diffusion-GAN noise (this
        process's noise stream; a fixed seed when omitted).
        """
        tc, ph, sched = self.recipe.train, self.phase, self.teacher
        generator = generator if generator is not None else torch.Generator().manual_seed(tc.seed)
        B = x_in.shape[0]
        self.critic.requires_grad_(False)  # D's and fake's weights are constants in this step
        logs = {}
        try:
            record = self.tsm.record_gates() if ph.type == "assemble" else contextlib.nullcontext(None)
            with self.tsm.timesteps(t), self.acc.autocast():
                with record as gates:  # forward only: checkpoint recomputes in backward are not recorded
                    x0 = self.student.x0(x_in, t, cond)
                T = sched.num_timesteps
                # DMD2 clamps the range to the schedule's timesteps (max_step_percent = 1 is t = T - 1).
                low = min(int(tc.min_step_percent * T), T - 1)
                high = min(int(tc.max_step_percent * T) + 1, T)
                s = self._draw_t(low, high, B, generator, x0.device)
                x_s = sched.add_noise(x0.detach(), _randn_like(x0, generator), s)
                x0_fake = self._fake_x0_fp32(x_s, s, cond)
                with torch.no_grad():
                    # The real score stays under autocast (DMD2 runs its real UNet in reduced precision);
                    # its x0 is formed in float64 like the fake one.
                    out_real = self.student.real_output(x_s, s, cond, self.uncond, tc.real_guidance_scale)
                    x0_real = sched.to_x0(x_s.double(), out_real.double(), s)
                self._check_scores(x0_real, x0_fake)
                loss = losses.dmd_loss(x0, x0_real, x0_fake)
                logs["loss_dmd"] = loss.detach()
                if ph.gan:
                    d_in, d_t = self._d_input(x0, generator)
                    # D is text-conditional: a fake is scored with its own prompt's embedding (DMD2).
                    g_gan = losses.gan_generator_loss(self.critic.discriminate(d_in, d_t, cond))
                    logs["loss_gan_generator"] = g_gan.detach()
                    loss = loss + ph.gan_generator_weight * g_gan
                self.check_finite(loss, "generator")
                self.acc.backward(loss)  # inside tsm.timesteps: checkpoint recomputes route correctly
        finally:
            for p in self.critic_params:
                p.requires_grad_(True)
        logs["grad_norm_generator"] = self.apply_gradients(self.gen_opt)
        if self.ema is not None:
            self.ema.update({k: p for k, p in self.tsm.named_adapter_parameters() if p.requires_grad})
        if gates:
            logs.update(self._gate_stats(gates))
        logs["x0"] = x0.detach()
        return logs

    def critic_step(self, x0: torch.Tensor, cond: dict, generator: torch.Generator,
                    noise_generator: torch.Generator | None = None) -> dict:
        """Fake-score denoising (+ GAN D) update of fake and D only, on the generator's samples.

        ``generator`` draws the real images (and their VAE posterior sample); ``noise_generator`` the
        fake-loss ``t``, its noise and the diffusion-GAN noise (default: ``generator``).
        """
        ph, sched = self.phase, self.teacher
        noise_generator = noise_generator if noise_generator is not None else generator
        B = x0.shape[0]
        x0 = x0.detach()
        logs = {}
        if ph.gan:
            # The reals and their captions are encoded first, outside autocast: in fp32, the precision
            # train_step encodes the generator's prompts in (the frozen text encoders and VAE are never cast),
            # and while none of the critic's activations is held, so the VAE's (in chunks of
            # data.encode_batch) add to nothing; --plan counts them here. D is text-conditional (DMD2): fakes
            # are scored with their prompts, reals with their own captions.
            real, captions = self.real.sample(B, generator, x0.device)
            real = real.to(x0.dtype)
            real_cond = cond_map(encode(self.teacher, captions), lambda v: v.to(cond["encoder_hidden_states"].dtype))
        with self.acc.autocast():
            t = self._draw_t(0, sched.num_timesteps, B, noise_generator, x0.device)
            noise = _randn_like(x0, noise_generator)
            pred = self.critic.predict(sched.add_noise(x0, noise, t), t, cond)
            loss = losses.fake_score_loss(pred, sched.target(x0, noise, t))
            logs["loss_fake"] = loss.detach()
            if ph.gan:
                fake_logits = self.critic.discriminate(*self._d_input(x0, noise_generator), cond)
                real_logits = self.critic.discriminate(*self._d_input(real, noise_generator), real_cond)
                d_loss = losses.gan_discriminator_loss(fake_logits, real_logits)
                logs["loss_gan_critic"] = d_loss.detach()
                logs["d_accuracy"] = losses.discriminator_accuracy(fake_logits, real_logits)
                loss = loss + ph.gan_critic_weight * d_loss
        self.check_finite(loss, "critic")
        self.acc.backward(loss)
        logs["grad_norm_critic"] = self.apply_gradients(self.critic_opt)
        return logs

    def train_step(self) -> dict:
        """One DMD2 iteration of the current phase (student step k shared across processes).

        Both learning-rate schedules step here, once per iteration, whether or not the generator
        updated (DMD2 steps both every iteration; warm-up therefore counts iterations).
        """
        ph, tc = self.phase, self.recipe.train
        k = self.steps[int(torch.randint(len(self.steps), (1,), generator=step_generator(tc.seed, self.global_step)))]
        rank = self.acc.process_index
        data_gen = step_generator(tc.seed, self.global_step, rank, _DATA_STREAM)
        noise_gen = step_generator(tc.seed, self.global_step, rank, _NOISE_STREAM)
        B = self.per_process_batch[self.phase_index]
        cond = encode(self.teacher, self.prompts.sample(B, data_gen))
        shape = self.teacher.noise_shape(B, self.teacher.latent_size)
        noise = torch.randn(shape, generator=noise_gen).to(self.device)
        x_in = backward_simulation(self.student.predict_x0(cond), noise, k, self.timesteps, self.teacher, noise_gen)
        t = torch.full((B,), self.timesteps[k], device=self.device, dtype=self.teacher.timestep_dtype)
        if self.phase_step % ph.fake_updates_per_generator_update == 0:
            logs = self.generator_step(x_in, t, cond, noise_gen)
        else:
            # DMD2 runs the generator of a critic-only iteration without grad and outside autocast (fp32).
            with torch.no_grad(), self.tsm.timesteps(t):
                logs = {"x0": self.student.x0(x_in, t, cond)}
        logs.update(self.critic_step(logs.pop("x0"), cond, data_gen, noise_gen))
        self.gen_sched.step()
        self.critic_sched.step()
        logs["student_step"] = k
        return logs

    # ------------------------------------------------------------------ helpers
    def _gate_stats(self, gates: dict) -> dict:
        """Mean gate per context expert over all layers, keyed by the student timestep."""
        out = {}
        means = [torch.cat([g for _, g in recs]).mean(0) for recs in gates.values() if recs]
        ts = [torch.cat([t for t, _ in recs]) for recs in gates.values() if recs]
        if means:
            g = torch.stack(means).mean(0)
            t = int(ts[0][0])
            for j, s in enumerate(self.tsm.layers[next(iter(self.tsm.layers))].gated_scales):
                out[f"gate/t{t}/scale{s}"] = g[j]
        return out

    def _check_scores(self, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> None:
        """Stop on a non-finite real or fake score, as on a NaN loss: the DMD gradient's nan_to_num would
        otherwise turn it into a loss of exactly 0 and the run would go on learning nothing."""
        finite = torch.stack([torch.isfinite(x0_real).all(), torch.isfinite(x0_fake).all()]).tolist()  # one sync
        if all(finite):
            return
        scale = self.recipe.train.real_guidance_scale
        name = (f"real score (the teacher with real_guidance_scale {scale})" if not finite[0]
                else "fake score (the critic's denoiser)")
        bad = x0_real if not finite[0] else x0_fake
        self.check_finite(bad, f"the {name}'s x0 is not finite, so the generator's DMD")

    def checkpoint_modules(self) -> dict:
        if self.recipe.train.fsdp:
            from tsm_core.train.fsdp import ShardedState

            critic = ShardedState(self.critic, self.critic.trainable_state())
        else:
            critic = {k: v.detach() for k, v in self.critic.trainable_state().items()}
        modules = {"generator": self.tsm.state_dict(), "critic": critic}
        if self.ema is not None:
            modules["ema"] = self.ema.state_dict()
        return modules

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def sample(self, tag: str) -> Path | None:
        """Images for the recipe's fixed prompts and seeds with the current student (rows = prompts)."""
        tc = self.recipe.train
        prompts = [p for p in tc.sample_prompts for _ in tc.sample_seeds]
        seeds = [s for _ in tc.sample_prompts for s in tc.sample_seeds]
        cond = encode(self.teacher, prompts)
        shape = self.teacher.noise_shape(1, self.teacher.latent_size)[1:]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(self.device)
        state = torch.get_rng_state()
        x0 = sample(self.student.predict_x0(cond), noise, self.timesteps, self.teacher,
                    generator=torch.Generator(device=self.device).manual_seed(tc.seed))
        torch.set_rng_state(state)  # sampling must not change the training run's random stream
        if not self.acc.is_main_process:
            return None
        path = save_image_grid(self.teacher.vae_decode(x0).float().cpu(), self.run_dir / "samples" / f"{tag}.png",
                               nrow=len(tc.sample_seeds))
        if self.logger is not None:
            self.logger.log_image(self.global_step, "samples", path)
        return path

    # ------------------------------------------------------------------ the run
    def end_phase(self, index: int) -> None:
        """Keep each phase's adapter (``phases/NN_name``): the intermediate students of the schedule."""
        if self.acc.is_main_process:
            # child_folder: a name that would leave phases/ is refused here too, not only at load.
            self.tsm.save(child_folder(self.run_dir / "phases", f"{index:02d}_{self.recipe.phases[index].name}"))

    def save_final(self) -> Path:
        """The final adapter (and the EMA one) and the final sample grid; returns ``run_dir/adapter``."""
        out = self.run_dir / "adapter"
        if self.acc.is_main_process:
            self._save_final(out)
        self.sample("final")  # on every process (it writes on the main one): a sharded generator is collective
        return out

    def _save_final(self, out: Path) -> None:
        """Write the final adapter (and the EMA one), each with its model card; the skeleton removed temp
        files of a killed write."""
        self.tsm.save(out)
        write_run_card(out, self._run_card())
        if self.ema is not None:
            live = self.tsm.state_dict()
            backup = {k: v.clone() for k, v in live.items()}
            self.ema.copy_to(live)
            self.tsm.save(self.run_dir / "adapter_ema")
            write_run_card(self.run_dir / "adapter_ema", self._run_card())
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(backup[k])

    def _run_card(self) -> RunCard:
        """What the final adapter's model card says beyond the adapter file: the teacher, the recipe's key
        settings, the phases and the student's timesteps."""
        r, ec = self.recipe, self.recipe.experts
        settings = {"model.path (teacher)": r.model.path, "model.kind": r.model.kind,
                    "experts": f"rank {ec.rank}, alpha {ec.alpha:g}, scales {list(ec.scales)}, targets {ec.target_modules}",
                    "student steps": r.student_sigmas if r.flow else r.student_timesteps,
                    "train.real_guidance_scale": r.train.real_guidance_scale, "train.seed": r.train.seed,
                    "train.ema_decay": r.train.ema_decay}
        if ec.init_from:
            settings["experts.init_from"] = f"{ec.init_from} (scales {list(ec.init_scales)} copied in)"
        phases = []
        for ph in r.phases:
            trained = (f"experts {ph.experts if ph.experts is not None else 'all'} of scale {ph.scale}"
                       if ph.type == "foster" else
                       f"router (core {ph.core_scale or max(ec.scales)}, context "
                       f"{ph.context_scales or [s for s in ec.scales if s != max(ec.scales)]})")
            phases.append((ph.name, ph.steps, trained + (", with the GAN loss" if ph.gan else "")))
        stock = {"unet": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}.get(r.model.kind)
        return RunCard("distill", r.model.path, kind=r.model.kind, component=self.teacher.denoiser_subfolder,
                       run_dir=str(self.run_dir), settings=settings,
                       phases=phases, steps=self.global_step, student_timesteps=list(self.timesteps),
                       # use_student_in_pipeline drives a stock SD / SDXL pipeline, which needs a VAE
                       pipeline_class=stock if self.teacher.vae is not None else None)


def check_init_from(experts: DistillExperts) -> None:
    """Check ``experts.init_from`` from its header alone (cheap: no model, no tensor loads): a readable TSM
    adapter whose rank, alpha and targets equal the recipe's and that holds every scale of ``init_scales``.
    ValueError/FileNotFoundError naming the saved and the recipe's value of each difference.

    T is the teacher's, known once it loads: `DMD2Trainer` compares it (and the layer shapes) then."""
    # Any T >= the largest scale builds the config; T itself is left out of this comparison.
    config = experts.tsm_config(experts.scales, max(experts.scales))
    check_adapter_fits(experts.init_from, config, experts.init_scales, where="experts.init_from",
                       keys=("rank", "alpha", "target_modules"))


def set_phase_mode(tsm, ph: PhaseConfig) -> None:
    """Route the generator's adapter for a phase: its experts' scale while fostering, the mixture after."""
    if ph.type == "foster":
        tsm.set_mode("expert", scale=ph.scale, experts=ph.experts)
    else:
        tsm.set_mode("mixture", core_scale=ph.core_scale, context_scales=ph.context_scales)


def phase_student_steps(ph: PhaseConfig, timesteps: list[int], intervals) -> list[int]:
    """Student steps (indices into ``timesteps``) a phase trains: given, or those inside its experts' intervals."""
    if ph.student_steps is not None:
        return list(ph.student_steps)
    if ph.type == "assemble" or ph.scale == 1:
        return list(range(len(timesteps)))
    experts = set(ph.experts if ph.experts is not None else range(ph.scale))
    idx = intervals.index(torch.tensor(timesteps), ph.scale).tolist()
    steps = [k for k, e in enumerate(idx) if e in experts]
    if not steps:
        raise ValueError(f"phase {ph.name!r}: no student timestep of {timesteps} falls in experts "
                         f"{sorted(experts)} of scale {ph.scale}; set student_steps explicitly")
    return steps


def load_student(teacher_path: str | Path, adapter_dir: str | Path, device: torch.device | str = "cpu",
                 kind: str = "unet", max_sequence_length: int | None = None):
    """A trained student for inference on ``device``: (teacher backbone, adapter) with the adapter's saved mode;
    ``max_sequence_length`` as the run's ``model.max_sequence_length`` (T5 families)."""
    teacher = load_teacher(teacher_path, kind, max_sequence_length)
    tsm = load_adapter(teacher.denoiser, adapter_dir)
    return teacher.to(device), tsm


__all__ = ["DMD2Trainer", "NonFiniteLossError", "check_init_from", "check_run_folder", "load_student",
           "phase_student_steps", "set_phase_mode"]
