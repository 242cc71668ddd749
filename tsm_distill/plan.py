"""``tsm-distill RECIPE --plan``: the memory a DMD2 recipe needs per process, per phase, before any download.

The recipe's models are built from their config files alone, on the meta device (no weights are read or
allocated), so a pipeline folder that holds only ``model_index.json`` and the ``config.json`` files is
enough (``tsm_distill/assets/configs/`` ships SD1.5's, SDXL base 1.0's, SD3 medium's and FLUX.1-dev's). Per
phase it reports, for one process:

* **weights**: the teacher's denoiser (real score and generator base), text encoders (fp32: they are
  not cast), VAE, the fake score's copy of the denoiser, the TSM experts and router, the GAN head; at the training dtype (fp32 master weights:
  mixed precision autocasts the compute, not the weights);
* **optimizer**: AdamW's two fp32 moments of every trainable tensor (generator and critic);
* **step peak**: the most bytes the generator update or the critic update allocates on top (activations
  kept for backward, transient outputs, the gradients, then AdamW's foreach temporaries while the
  gradients are held), measured by running both updates' passes on
  meta tensors under `LiveBytes` at the phase's per-process batch and the teacher's sample size. In GAN
  phases the critic update begins, as in the trainer, by encoding its real images (the VAE in fp32, in
  chunks of ``data.encode_batch``, for image folders and shards; a latent cache is not encoded) and their
  captions (the text encoders in fp32); the generator's prompts are encoded the same way at the start of
  each iteration, with less held, so this figure covers them too;
* **core cache** (``train.cache_core_merge``, assembling phases): the frozen core merged into one copy of the
  targeted weights per core expert used, in the compute dtype; shown within the weights column;
* **total** = weights + core cache + optimizer + step peak.

With ``train.fsdp`` each module of ``train.fsdp_modules`` counts 1/N per process (`_sharded`): the critic's
weights, moments, gradients and AdamW temporaries, plus two of its FSDP units gathered at a time in both
updates; the generator's frozen base (not its experts), plus two of its units gathered in the generator
update; the text encoders' weights (their units are gathered while prompts are encoded, before either update).

What it leaves out: the CUDA context and allocator fragmentation (add 1-2 GB on a GPU), the EMA copy
(``train.ema_decay``: one more fp32 copy of the adapter), the no-grad rollout before the updates (a
forward without grad at the same batch: less than the generator update). Under bf16/fp16 autocast the
passes run with weights cast to that dtype, which counts the ops autocast keeps in fp32 (norms, softmax)
at half size: the activation figure is then a slight underestimate.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .data import BUILTIN_FMNIST

GB = 1024 ** 3
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create inside this mode and that are still alive; ``peak`` is
    the most at any time. Works the same on meta tensors (nothing allocated, sizes real) and real ones, so
    the planner's estimate and a measured CPU run use one ruler."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ids: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output on an input's storage allocates nothing: a view (F.linear's transpose of its weight, which
        # lives as long as the weight, so it used to count every Linear weight of a pass as held), or an
        # in-place result.
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._ids and key not in inputs:
                    self._ids.add(key)
                    nbytes = storage.nbytes()
                    self.live += nbytes
                    weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@dataclass
class PhasePlan:
    """One phase's bytes per process (see the module docstring)."""

    name: str
    batch_per_process: int
    gan: bool
    trainable_generator: int
    trainable_critic: int
    weights: int
    optimizer: int
    generator_step: int
    critic_step: int
    real_encoding: int = 0
    """The peak of encoding the reals and their captions, the first part of the critic update (included in
    ``critic_step``; 0 outside GAN phases)."""
    core_cache: int = 0
    """``train.cache_core_merge`` in an assembling phase: one merged copy of the targeted weights, in the
    compute dtype, per core expert the phase's student steps use (held for the whole phase)."""

    @property
    def total(self) -> int:
        return self.weights + self.core_cache + self.optimizer + max(self.generator_step, self.critic_step)


def _meta_teacher(path: Path, kind: str = "unet", max_sequence_length: int | None = None):
    """The teacher's backbone built from config files on the meta device (``Backbone.meta``: no weight file
    is opened), for a family distillation supports."""
    from .teacher import check_teacher_kind

    try:
        return check_teacher_kind(kind).meta(Path(path), max_sequence_length)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (--plan; tsm_distill/assets/configs/ ships the config folders of SD1.5, "
                                "SDXL base 1.0, SD3 medium and FLUX.1-dev)") from None


class _MetaTokenizer:
    """A text encoder's tokenizer for a meta build (a config-only folder may hold no vocabulary): token ids of
    the length the real one pads to (its ``model_max_length``, the encoder's positions, unless the caller
    gives ``max_length``: T5's ``max_sequence_length``). Zeros: the values change no byte count."""

    def __init__(self, encoder):
        config = encoder.config
        self.model_max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 512)

    def __call__(self, prompts, padding=None, max_length=None, truncation=None, return_tensors=None):
        from types import SimpleNamespace

        shape = (len(prompts), max_length or self.model_max_length)
        return SimpleNamespace(input_ids=torch.zeros(shape, dtype=torch.long),
                               attention_mask=torch.ones(shape, dtype=torch.long))


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient SDPA on a GPU) allocates: the output, and for
    backward q, k, v, the output and one fp32 log-sum-exp per query; never the N x N score matrix, which
    meta tensors' reference SDPA would materialise (16x too much for SD1.5's 4096-token first level)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention():
    """Count ``F.scaled_dot_product_attention`` as the fused kernel a GPU runs (see `_FusedAttention`)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    # torch's own parameter names: diffusers' attention dispatcher (Flux) passes them as keywords
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _step_peak(passes, update, autocast_module) -> int:
    """Peak bytes ``update`` (one of the passes' updates) allocates; ``autocast_module``'s weights are cast
    to the compute dtype before, outside the count."""
    with passes.cast(autocast_module), _fused_attention(), LiveBytes() as counter:
        update()
    return counter.peak


def plan_recipe(recipe, num_processes: int = 1) -> list[PhasePlan]:
    """The per-process memory of every phase of a `DistillRecipe` (see the module docstring)."""
    from accelerate import init_empty_weights

    from tsm_core import attach

    from .critic import Critic
    from .trainer import per_process_batch, phase_student_steps, set_phase_mode

    teacher = _meta_teacher(Path(recipe.model.path), recipe.model.kind, recipe.model.max_sequence_length)
    # The family's own encode_prompts runs on meta encoders (the real captions' encoding, `_Passes.encode_reals`).
    teacher.tokenizers = [_MetaTokenizer(encoder) for encoder in teacher.text_encoders]
    denoiser = teacher.denoiser
    dtype = DTYPES[recipe.train.mixed_precision]
    uses_gan = any(ph.gan for ph in recipe.phases)
    ec, cc = recipe.experts, recipe.critic
    T = teacher.num_timesteps
    timesteps = recipe.timesteps(T)
    with init_empty_weights():
        critic = Critic(teacher, cc.lora_rank, tuple(cc.lora_targets), uses_gan)
        tsm = attach(denoiser, ec.tsm_config(ec.scales, T))
    if recipe.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        critic.fake.enable_gradient_checkpointing()
    frozen = [p for m in (*teacher.text_encoders, teacher.vae) if m is not None for p in m.parameters()]
    # Image folders and shards are VAE-encoded in the critic update (RealSource); caches are latents already.
    source = recipe.data.real_images or ""
    encoded = teacher.vae is not None and not (source == BUILTIN_FMNIST or source.endswith((".pt", ".safetensors")))
    encode_batch = recipe.data.encode_batch if encoded else None
    sharded = set(recipe.train.fsdp_modules) if recipe.train.fsdp and num_processes > 1 else set()
    plans = []
    for i, ph in enumerate(recipe.phases):
        B = per_process_batch(ph.batch_size, num_processes, f"phases[{i}] ({ph.name!r}).batch_size")
        with init_empty_weights():  # the router's parameters appear with the first mixture phase
            set_phase_mode(tsm, ph)
        # A timestep the phase trains (its expert's), so the generator pass has the phase's gradients.
        trained = [timesteps[k] for k in phase_student_steps(ph, timesteps, tsm.intervals)]
        t = trained[0]
        passes = _Passes(teacher, tsm, critic, B, dtype, ph.gan, t, recipe.train.real_guidance_scale,
                         encode_batch)
        gen = sum(p.numel() for p in tsm.trainable_parameters())
        crit = sum(p.numel() for p in passes.critic_trainable)
        weights = _bytes([*denoiser.parameters(), *critic.parameters(), *frozen])  # the denoiser holds the experts
        optimizer = 2 * 4 * (gen + crit)  # AdamW: two fp32 moments per element
        # The GAN head stays fp32 in the critic update (DMD2 runs it outside autocast).
        gen_step = _step_peak(passes, passes.generator_update, denoiser)
        critic_step = _step_peak(passes, passes.critic_update, critic.fake)
        encoding = _step_peak(passes, passes.encode_reals, critic.fake) if ph.gan else 0
        if sharded:
            weights, optimizer, gen_step, critic_step = _sharded(
                sharded, teacher, tsm, critic, crit, num_processes, dtype, weights, optimizer, gen_step, critic_step,
                ph.gan, encoding)
        cache = (_core_cache_bytes(tsm, trained, dtype)
                 if recipe.train.cache_core_merge and ph.type == "assemble" and "generator" not in sharded else 0)
        plans.append(PhasePlan(ph.name, B, ph.gan, gen, crit, weights, optimizer, gen_step, critic_step, encoding,
                               cache))
    return plans


def _core_cache_bytes(tsm, timesteps: list[int], dtype: torch.dtype) -> int:
    """Bytes of the frozen core's cached merges (`TSMAdapter.set_merged_training` ``cache_core``): one copy of
    every layer's weight that can merge, per core interval among ``timesteps``. The planner's own passes run
    without the cache (each measures one timestep), so it is counted here, for the whole phase."""
    from tsm_core.merged import merge_blocker

    layers = list(tsm.layers.values())
    core = layers[0].core_scale
    cores = len(set(tsm.intervals.index(torch.tensor(timesteps), core).tolist())) if core > 1 else 1
    size = torch.empty((), dtype=dtype).element_size()
    return cores * size * sum(layer.base_layer.weight.numel() for layer in layers
                              if merge_blocker(layer.base_layer, layer.dropout) is None)


def _largest_unit(units, skip=()) -> int:
    """Bytes of the largest of these FSDP units (innermost first; each its parameters not in an inner unit,
    nor in ``skip``)."""
    seen = {id(p) for p in skip}
    largest = 0
    for unit in units:
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        largest = max(largest, _bytes(own))
    return largest


def _sharded(modules: set[str], teacher, tsm, critic, trainable: int, n: int, dtype, weights: int, optimizer: int,
             gen_step: int, critic_step: int, gan: bool = True, encoding: int = 0):
    """The same figures with ``modules`` sharded N ways (``train.fsdp``). Each keeps 1/N of its weights; the
    critic also 1/N of its AdamW moments, gradients and AdamW temporaries. Every pass through a sharded
    module all-gathers one unit at a time while prefetching the next: two of its largest units on top of
    the step peaks of the updates that run it (D's head only in GAN phases: outside them it never runs; the
    text encoders' on top of the real captions' ``encoding``, before the critic's passes)."""
    from tsm_core.train.fsdp import denoiser_units, encoder_units

    kept = (n - 1) / n
    if "critic" in modules:
        gathered = 2 * _largest_unit([u for u in critic.shard_units() if gan or u is not critic.head])
        # In the critic pass the gradients were measured at the compute dtype and the temporaries in fp32.
        grads_and_temporaries = trainable * (torch.finfo(dtype).bits // 8 + 4)
        weights -= int(kept * _bytes(critic.parameters()))
        optimizer -= int(kept * 8 * trainable)
        gen_step += gathered  # the fake score and D run in the generator update too
        critic_step += gathered - int(kept * grads_and_temporaries)
    if "generator" in modules:  # the experts stay whole on every process
        experts = list(tsm.adapter_parameters())
        skip = {id(p) for p in experts}
        weights -= int(kept * _bytes([p for p in teacher.denoiser.parameters() if id(p) not in skip]))
        gen_step += 2 * _largest_unit(denoiser_units(teacher.denoiser), experts)
    if "text_encoders" in modules:
        weights -= int(kept * _bytes([p for te in teacher.text_encoders for p in te.parameters()]))
        if encoding:
            gathered = 2 * max(_largest_unit(encoder_units(te)) for te in teacher.text_encoders)
            critic_step = max(critic_step, encoding + gathered)
    return weights, optimizer, gen_step, critic_step


@contextlib.contextmanager
def _routed_on_meta(tsm, batch: int, t: float, dtype: torch.dtype = torch.long):
    """``tsm.timesteps`` for meta activations: routing is decided on the CPU (it reads the timestep values,
    which meta tensors do not have), then its tensors move to meta. DMD2 shares one student step per
    iteration, so every layer takes the shared-expert path, as in training."""
    state = tsm.context.push(torch.full((batch,), t, dtype=dtype))
    meta = torch.device("meta")
    state.t, state.router_rows = state.t.to(meta), state.router_rows.to(meta)
    state.index = {n: i.to(meta) for n, i in state.index.items()}
    try:
        yield
    finally:
        tsm.context.pop()


class _Passes:
    """The tensor work of one DMD2 iteration's two updates, as `DMD2Trainer` does it, on meta inputs:
    the generator forward with grad, the fake and real scores (no grad; the real one under the family's
    guidance: CFG's 2B rows, Flux's one pass), D on the generator's output in GAN phases, backward; then the
    fake score's denoising forward with grad and D on fakes and reals, backward."""

    def __init__(self, teacher, tsm, critic, batch, dtype, gan, t, guidance_scale, encode_batch=None):
        self.teacher, self.tsm, self.critic, self.gan = teacher, tsm, critic, gan
        self.critic_trainable = [p for p in critic.parameters() if p.requires_grad]
        self.dtype = dtype
        meta = torch.device("meta")
        self.x = torch.empty(teacher.noise_shape(batch, teacher.latent_size), device=meta, dtype=dtype)
        self.t = torch.full((batch,), t, device=meta, dtype=teacher.timestep_dtype)
        self.t_value = t
        self.cond = teacher.meta_cond(batch, dtype)
        self.uncond = teacher.meta_cond(1, dtype)
        self.guidance_scale = guidance_scale
        self.encode_batch = encode_batch

    @contextlib.contextmanager
    def cast(self, *modules):
        """Run with these modules' weights in the compute dtype (the planner's stand-in for autocast)."""
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its "keep these modules in float32" note is about loading
        if self.dtype is not torch.float32:
            for m in modules:
                m.to(self.dtype)
        try:
            yield
        finally:
            if self.dtype is not torch.float32:
                for m in modules:
                    m.to(torch.float32)
            diffusers_logging.set_verbosity(verbosity)

    def generator_update(self) -> None:
        self.critic.requires_grad_(False)  # D's and the fake score's weights are constants here (DMD2)
        try:
            self._generator_update()
        finally:
            for p in self.critic_trainable:
                p.requires_grad_(True)

    def _generator_update(self) -> None:
        # The generator and the real score run under autocast (the caller cast the UNet); the fake score's
        # DMD pass runs in fp32 (DMD2), and so does D here (under autocast in training: an overestimate).
        from tsm_core.models import cond_map

        with _routed_on_meta(self.tsm, self.t.shape[0], self.t_value, self.teacher.timestep_dtype):
            x0 = self.teacher.predict(self.x, self.t, self.cond)
            with torch.no_grad(), self.tsm.bypass():  # the real score is the plain teacher
                fake = self.critic.predict(x0.float(), self.t, cond_map(self.cond, torch.Tensor.float))  # fp32, like DMD2
                # The family's guidance, as the trainer's real score: CFG's 2B rows, or Flux's one guided pass.
                real = self.teacher.guided_predict(x0, self.t, self.cond, self.uncond, self.guidance_scale)
                target = (x0 - (fake - real)).detach()
            loss = (x0.float() - target.float()).pow(2).mean()
            if self.gan:
                loss = loss + self.critic.discriminate(x0.float(), torch.zeros_like(self.t),
                                                       cond_map(self.cond, torch.Tensor.float)).mean()
            loss.backward()
            _optimizer_temporaries(self.tsm.trainable_parameters())
            for p in self.tsm.trainable_parameters():
                p.grad = None

    @torch.no_grad()
    def encode_reals(self) -> tuple[torch.Tensor, dict]:
        """The reals of a GAN critic update and their captions' conditioning, as `RealSource` and the trainer
        make them: the stacked pixels through the VAE (fp32, no autocast) ``encode_batch`` at a time, when the
        source is encoded; then the captions through the family's own ``encode_prompts`` (fp32)."""
        B, teacher = self.x.shape[0], self.teacher
        if self.encode_batch is None:  # a latent cache: its latents are copied in
            real = torch.empty_like(self.x, dtype=torch.float32)
        else:
            side = teacher.latent_size * teacher.vae_scale  # the trainer checks data.resolution gives this size
            pixels = torch.empty(B, 3, side, side, device=torch.device("meta"))
            # A CPU generator, as the trainer's: the posterior noise is drawn on the CPU and moved.
            real = torch.cat([teacher.vae_encode(chunk, torch.Generator()) for chunk in pixels.split(self.encode_batch)])
            del pixels  # RealSource.sample returns the latents only
        return real.to(self.x.dtype), teacher.encode_prompts([""] * B)

    def critic_update(self) -> None:
        x0 = self.x.detach()
        cond = self.cond
        if self.gan:  # first, as in the trainer: the reals and their captions
            real, real_cond = self.encode_reals()
        loss = (self.critic.predict(x0, self.t, cond) - x0).pow(2).mean()
        if self.gan:  # D on the fakes and on as many reals
            zero = torch.zeros_like(self.t)
            loss = (loss + self.critic.discriminate(x0, zero, cond).mean()
                    + self.critic.discriminate(real, zero, real_cond).mean())
        loss.backward()
        _optimizer_temporaries(self.critic_trainable)
        for p in self.critic_trainable:
            p.grad = None


def _optimizer_temporaries(params) -> None:
    """What the update's AdamW step allocates while the gradients are still held: on a GPU (foreach AdamW,
    torch's default there) one fp32 list the size of the parameters. Measured: a second
    ``AdamW(foreach=True)`` step on meta tensors under `LiveBytes` allocates exactly 1x their bytes; for a
    full-copy fake score (2.6B parameters on SDXL) that is 10 GB, so it is part of the step peak."""
    temporaries = [torch.empty(p.shape, device="meta", dtype=torch.float32) for p in params]
    del temporaries


def format_plan(plans: list[PhasePlan], recipe_path: str, model_path: str, num_processes: int) -> str:
    """The table ``--plan`` prints."""
    lines = [f"memory plan of {recipe_path} (model {model_path}), per process with {num_processes} process(es); "
             "GB = 2^30 bytes", "",
             "| phase | batch/process | GAN | trainable generator (M) | trainable critic (M) | weights GB | "
             "optimizer GB | generator step GB | critic step GB | total GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.name} | {p.batch_per_process} | {'yes' if p.gan else 'no'} | "
                     f"{p.trainable_generator / 1e6:.2f} | {p.trainable_critic / 1e6:.2f} | "
                     f"{(p.weights + p.core_cache) / GB:.2f} | "
                     f"{p.optimizer / GB:.2f} | {p.generator_step / GB:.2f} | {p.critic_step / GB:.2f} | "
                     f"**{p.total / GB:.2f}** |")
    cache = max(p.core_cache for p in plans)
    if cache:
        lines += ["", f"Weights of assembling phases include train.cache_core_merge's merged copies of the frozen "
                  f"core: at most {cache / GB:.2f} GB."]
    encoding = max(p.real_encoding for p in plans)
    if encoding:
        lines += ["", f"The critic step of GAN phases includes encoding the real images (VAE in fp32, "
                  f"data.encode_batch at a time) and their captions first: at most {encoding / GB:.2f} GB."]
    lines += ["", "Not counted: CUDA context and allocator fragmentation (add 1-2 GB), train.ema_decay's copy of "
              "the adapter, the no-grad rollout. Step peaks are measured on meta tensors (no compute)."]
    return "\n".join(lines)
