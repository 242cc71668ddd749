"""``tsm-distill RECIPE --plan``: the memory a DMD2 recipe needs per process, per phase, before any download.

The recipe's models are built from their config files alone, on the meta device (no weights are read or
allocated), so a pipeline folder that holds only ``model_index.json`` and the ``config.json`` files is
enough (``tsm_distill/assets/configs/sd15`` is SD1.5's). Per phase it reports, for one process:

* **weights**: teacher UNet (real score and generator base), text encoder, VAE, the fake score's copy
  of the UNet, the TSM experts and router, the GAN head; at the training dtype (fp32 master weights:
  mixed precision autocasts the compute, not the weights);
* **optimizer**: AdamW's two fp32 moments of every trainable tensor (generator and critic);
* **step peak**: the most bytes the generator update or the critic update allocates on top (activations
  kept for backward, transient outputs, the gradients), measured by running both updates' passes on
  meta tensors under `LiveBytes` at the phase's per-process batch and the teacher's sample size;
* **total** = weights + optimizer + step peak.

What it leaves out: the CUDA context and allocator fragmentation (add 1-2 GB on a GPU), the EMA copy
(``train.ema_decay``: one more fp32 copy of the adapter), data loading. Under bf16/fp16 autocast the
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
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._ids:
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

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.generator_step, self.critic_step)


def _meta_teacher(path: Path):
    """The teacher's parts built from config files on the meta device (no weight file is opened)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tsm_core.train.backbones import UNetBackbone

    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'unet' / 'config.json'} does not exist: --plan needs a local pipeline "
                                "folder with at least model_index.json and the config.json files (no weights); "
                                "e.g. tsm_distill/assets/configs/sd15, or `huggingface-cli download REPO "
                                "--include '*.json' '*.txt'`")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
        vae = (AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
               if (path / "vae" / "config.json").is_file() else None)
    schedule = DDPMScheduler.from_config(DDPMScheduler.load_config(path / "scheduler"))
    return UNetBackbone(unet, [text], [None], vae, schedule, path=str(path))


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

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return _FusedAttention.apply(q, k, v)

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

    teacher = _meta_teacher(Path(recipe.model.path))
    unet, text, vae = teacher.denoiser, teacher.text_encoders[0], teacher.vae
    dtype = DTYPES[recipe.train.mixed_precision]
    uses_gan = any(ph.gan for ph in recipe.phases)
    ec, cc = recipe.experts, recipe.critic
    T = teacher.num_timesteps
    with init_empty_weights():
        critic = Critic(teacher, cc.lora_rank, tuple(cc.lora_targets), uses_gan)
        tsm = attach(unet, ec.tsm_config(ec.scales, T))
    if recipe.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        critic.fake.enable_gradient_checkpointing()
    size, channels = unet.config.sample_size, unet.config.in_channels
    seq, width = text.config.max_position_embeddings, text.config.hidden_size
    frozen = [*text.parameters(), *(vae.parameters() if vae is not None else [])]
    plans = []
    for i, ph in enumerate(recipe.phases):
        B = per_process_batch(ph.batch_size, num_processes, f"phases[{i}] ({ph.name!r}).batch_size")
        with init_empty_weights():  # the router's parameters appear with the first mixture phase
            set_phase_mode(tsm, ph)
        # A timestep the phase trains (its expert's), so the generator pass has the phase's gradients.
        t = recipe.student_timesteps[phase_student_steps(ph, list(recipe.student_timesteps), tsm.intervals)[0]]
        passes = _Passes(unet, tsm, critic, B, channels, size, seq, width, dtype, ph.gan, t)
        gen = sum(p.numel() for p in tsm.trainable_parameters())
        crit = sum(p.numel() for p in passes.critic_trainable)
        weights = _bytes([*unet.parameters(), *critic.parameters(), *frozen])  # unet holds the experts too
        optimizer = 2 * 4 * (gen + crit)  # AdamW: two fp32 moments per element
        # The GAN head stays fp32 in the critic update (DMD2 runs it outside autocast).
        plans.append(PhasePlan(ph.name, B, ph.gan, gen, crit, weights, optimizer,
                               _step_peak(passes, passes.generator_update, unet),
                               _step_peak(passes, passes.critic_update, critic.fake)))
    return plans


@contextlib.contextmanager
def _routed_on_meta(tsm, batch: int, t: int):
    """``tsm.timesteps`` for meta activations: routing is decided on the CPU (it reads the timestep values,
    which meta tensors do not have), then its tensors move to meta. DMD2 shares one student step per
    iteration, so every layer takes the shared-expert path, as in training."""
    state = tsm.context.push(torch.full((batch,), t, dtype=torch.long))
    meta = torch.device("meta")
    state.t, state.router_rows = state.t.to(meta), state.router_rows.to(meta)
    state.index = {n: i.to(meta) for n, i in state.index.items()}
    try:
        yield
    finally:
        tsm.context.pop()


class _Passes:
    """The tensor work of one DMD2 iteration's two updates, as `DMD2Trainer` does it, on meta inputs:
    the generator forward with grad, the fake and real scores (no grad; the real one with CFG, 2B rows),
    D on the generator's output in GAN phases, backward; then the fake score's denoising forward with
    grad and D on fakes and reals, backward."""

    def __init__(self, unet, tsm, critic, batch, channels, size, seq, width, dtype, gan, t):
        self.unet, self.tsm, self.critic, self.gan = unet, tsm, critic, gan
        self.critic_trainable = [p for p in critic.parameters() if p.requires_grad]
        self.dtype = dtype
        meta = torch.device("meta")
        self.x = torch.empty(batch, channels, size, size, device=meta, dtype=dtype)
        self.t = torch.full((batch,), t, device=meta, dtype=torch.long)
        self.t_value = t
        self.cond = torch.empty(batch, seq, width, device=meta, dtype=dtype)
        self.cond_dict = {"encoder_hidden_states": self.cond}  # the critic takes the backbone's conditioning

    def _critic_cond(self, dtype=None) -> dict:
        return {k: v if dtype is None else v.to(dtype) for k, v in self.cond_dict.items()}

    @contextlib.contextmanager
    def cast(self, *modules):
        """Run with these modules' weights in the compute dtype (the planner's stand-in for autocast)."""
        if self.dtype is not torch.float32:
            for m in modules:
                m.to(self.dtype)
        try:
            yield
        finally:
            if self.dtype is not torch.float32:
                for m in modules:
                    m.to(torch.float32)

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
        with _routed_on_meta(self.tsm, self.t.shape[0], self.t_value):
            x0 = self.unet(self.x, self.t, encoder_hidden_states=self.cond).sample
            with torch.no_grad(), self.tsm.bypass():  # the real score is the plain teacher
                fake = self.critic.predict(x0.float(), self.t, self._critic_cond(torch.float32))  # fp32, like DMD2
                real = self.unet(torch.cat([x0, x0]), torch.cat([self.t, self.t]),
                                 encoder_hidden_states=torch.cat([self.cond, self.cond])).sample
                target = (x0 - (fake - real.chunk(2)[0])).detach()
            loss = (x0.float() - target.float()).pow(2).mean()
            if self.gan:
                loss = loss + self.critic.discriminate(x0.float(), torch.zeros_like(self.t),
                                                         self._critic_cond(torch.float32)).mean()
            loss.backward()
            for p in self.tsm.trainable_parameters():
                p.grad = None

    def critic_update(self) -> None:
        x0 = self.x.detach()
        cond = self._critic_cond()
        loss = (self.critic.predict(x0, self.t, cond) - x0).pow(2).mean()
        if self.gan:  # D on the fakes and on as many reals
            zero = torch.zeros_like(self.t)
            loss = loss + self.critic.discriminate(x0, zero, cond).mean() + self.critic.discriminate(x0, zero, cond).mean()
        loss.backward()
        for p in self.critic_trainable:
            p.grad = None


def format_plan(plans: list[PhasePlan], recipe_path: str, model_path: str, num_processes: int) -> str:
    """The table ``--plan`` prints."""
    lines = [f"memory plan of {recipe_path} (model {model_path}), per process with {num_processes} process(es); "
             "GB = 2^30 bytes", "",
             "| phase | batch/process | GAN | trainable generator (M) | trainable critic (M) | weights GB | "
             "optimizer GB | generator step GB | critic step GB | total GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        lines.append(f"| {p.name} | {p.batch_per_process} | {'yes' if p.gan else 'no'} | "
                     f"{p.trainable_generator / 1e6:.2f} | {p.trainable_critic / 1e6:.2f} | {p.weights / GB:.2f} | "
                     f"{p.optimizer / GB:.2f} | {p.generator_step / GB:.2f} | {p.critic_step / GB:.2f} | "
                     f"**{p.total / GB:.2f}** |")
    lines += ["", "Not counted: CUDA context and allocator fragmentation (add 1-2 GB), train.ema_decay's copy of "
              "the adapter, data loading. Step peaks are measured on meta tensors (no compute)."]
    return "\n".join(lines)
