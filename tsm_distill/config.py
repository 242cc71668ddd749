"""The DMD2 distillation recipe: nested dataclasses loaded from YAML by ``tsm_core.train.recipe``.

One recipe = one run. ``phases`` lists the schedule; the paper's A.3 schedule is
``recipes/sd15_dmd2_tsm.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from tsm_core.train.sections import (
    ExpertsSection,
    ModelSection,
    RunSection,
    check_folder_name,
    require_at_least,
    require_positive,
)

MAX_TIMESTEP = 1000
"""The training timesteps T of every supported teacher (DDPM and flow-matching alike)."""


@dataclass
class DistillExperts(ExpertsSection):
    """The generator's experts: the shared settings (`ExpertsSection`; A.3 uses rank 64, alpha 8 and 14
    target layers, see ``recipes/sd15_dmd2_lora.yaml``), the scales to build, and experts to copy in."""

    scales: list[int] = field(default_factory=lambda: [1, 4])
    """Interval counts n whose experts exist (paper eq. 3); the router phase's core is the finest."""
    init_from: str | None = None
    """A saved TSM adapter (e.g. the vanilla-LoRA run's final adapter) to copy experts from."""
    init_scales: list[int] = field(default_factory=list)
    """Which scales to copy from ``init_from`` (e.g. [1]: the LoRA run as the n = 1 context expert)."""


@dataclass
class CriticConfig:
    """The fake score model and GAN head."""

    lora_rank: int | None = None
    """None: train a full copy of the teacher (DMD2's default); int: a peft LoRA of that rank."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    diffusion_gan: bool = False
    """Noise real and fake inputs of D at a random timestep (DMD2's diffusion-GAN option)."""
    diffusion_gan_max_timestep: int = MAX_TIMESTEP
    """With ``diffusion_gan``: D's inputs are noised at a timestep drawn from ``[0, this)``."""

    def __post_init__(self):
        require_at_least(1, lora_rank=self.lora_rank)
        # Checked here, not when first used: 0 used to be a traceback at the first GAN step.
        if not 1 <= self.diffusion_gan_max_timestep <= MAX_TIMESTEP:
            raise ValueError(f"diffusion_gan_max_timestep must lie in [1, {MAX_TIMESTEP}] (D's noise timestep is "
                             f"drawn from [0, this); DMD2: {MAX_TIMESTEP}), got {self.diffusion_gan_max_timestep}")


@dataclass
class DataConfig:
    prompts: str = ""
    """Prompt file (.txt, one per line, or .jsonl with text/prompt/caption), or 'builtin:fmnist'."""
    real_images: str | None = None
    """Real images for the GAN: a .pt/.safetensors latent cache, an image folder with metadata.jsonl,
    webdataset shards (.tar pattern), or 'builtin:fmnist'. Needed only by GAN phases."""
    resolution: int = 512
    encode_batch: int = 4
    """Real images per VAE encode call (folders and shards; a latent cache is not encoded). The critic update
    encodes its reals in chunks of this many, before its forward: the encoder's fp32 activations peak near
    2.5 GB per 1024 px image, so a GPU's whole share at once (16 on SDXL: 40 GB) would cost twice the
    update itself. Chunks change nothing but rounding: the posterior noise comes from the same CPU generator in
    the same order; ``--plan`` counts the chunk."""

    renamed_keys: ClassVar[dict[str, str]] = {"sample_prompts": "train.sample_prompts"}

    def __post_init__(self):
        require_at_least(1, resolution=self.resolution, encode_batch=self.encode_batch)


@dataclass
class PhaseConfig:
    """One phase of the schedule (paper A.3: each expert without, then with, the GAN; then the router).

    Units follow DMD2's ``main/train_sd.py``:

    * ``steps`` counts DMD2 *iterations*. Every iteration updates the fake score (and D); every
      ``fake_updates_per_generator_update``-th iteration also updates the generator.
    * ``warmup_steps`` counts *iterations* too, for both optimizers: both learning-rate schedules
      (diffusers' ``constant_with_warmup``) step once per iteration, whether or not the generator
      updated. Deviation kept: DMD2's schedulers go through ``accelerator.prepare``, which steps them
      once per process per iteration, so its ``--warmup_step 500`` ends after 500 / world_size
      iterations; ours does not depend on the number of processes. Recipes state the iteration count
      (see ``recipes/sd15_dmd2_lora.yaml``).
    * ``batch_size`` is the *global* batch, summed over processes (the paper's numbers are global).
      Each process draws ``batch_size / num_processes`` samples; a batch that does not divide is an
      error at start-up.
    """

    name: str
    steps: int
    """DMD2 iterations of this phase."""
    type: Literal["foster", "assemble"] = "foster"
    """foster (stage 1): train experts of ``scale``; assemble (stage 2): train only the router."""
    scale: int | None = None
    """foster: the scale whose experts route the generator."""
    experts: list[int] | None = None
    """foster: the experts of ``scale`` this phase trains (None: all)."""
    student_steps: list[int] | None = None
    """Student step indices k trained in this phase (None: those whose timestep falls in a trained
    expert's interval; every step when assembling)."""
    core_scale: int | None = None
    context_scales: list[int] | None = None
    gan: bool = False
    batch_size: int = 32
    """Global batch (all processes together)."""
    lr: float = 1e-5
    """The generator's (experts' or router's) learning rate."""
    lr_critic: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 500
    """Linear learning-rate warm-up, in iterations (not generator updates), for both optimizers."""
    fake_updates_per_generator_update: int = 10
    gan_generator_weight: float = 1e-3
    gan_critic_weight: float = 1e-2

    renamed_keys: ClassVar[dict[str, str]] = {
        "iterations": "steps (it counts DMD2 iterations, as iterations did)",
        "lr_generator": "lr",
        "mode": "type (expert -> foster, mixture -> assemble)",
    }

    def __post_init__(self):
        # The name becomes the folder phases/NN_<name>: "../../x" used to write the adapter outside the run.
        check_folder_name(self.name, "name", "phases/NN_<name>")
        require_positive(lr=self.lr, lr_critic=self.lr_critic)
        require_at_least(0, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                         gan_generator_weight=self.gan_generator_weight, gan_critic_weight=self.gan_critic_weight)


FSDP_MODULES = ("critic", "generator", "text_encoders")


@dataclass
class TrainConfig(RunSection):
    """The shared run settings (`tsm_core.train.sections.RunSection`) plus DMD2's own."""

    ema_decay: float | None = None
    real_guidance_scale: float = 1.75
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a red car on a road"])
    sample_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    threads: int | None = None
    fsdp: bool = False
    """Shard the modules of ``fsdp_modules`` over the processes with FSDP2 (``tsm_core.train.fsdp``), so each
    holds 1/N of their weights (and of the critic's gradients and AdamW moments); needs ``accelerate launch``
    with N processes. Checkpoints stay full tensors and resume on any number of processes."""
    fsdp_modules: list[str] = field(default_factory=lambda: list(FSDP_MODULES))
    """What ``fsdp`` shards: ``critic`` (the fake score + GAN head: DMD2's full trainable copy of the
    teacher), ``generator`` (the frozen base the experts sit on, which is also the real score; the experts
    and router stay whole on every process), ``text_encoders`` (frozen, fp32). Every sharded module costs
    an all-gather of its weights per call: drop the frozen ones when they fit and the interconnect is slow."""

    def __post_init__(self):
        super().__post_init__()
        if self.threads is not None and self.threads < 0:  # torch.set_num_threads raised mid-set-up
            raise ValueError(f"train.threads must be >= 1 (torch's CPU threads), or 0 or null for torch's default; "
                             f"got {self.threads}")
        if self.ema_decay and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in (0, 1) (e.g. 0.999), or be null or 0 for no EMA; "
                             f"got {self.ema_decay}")
        # Checked here, not when first used: max_step_percent = 2 used to index past the schedule mid-run.
        unknown = sorted(set(self.fsdp_modules) - set(FSDP_MODULES))
        if unknown:
            raise ValueError(f"train.fsdp_modules: unknown module(s) {unknown}; choose from {list(FSDP_MODULES)}")
        if self.fsdp and not self.fsdp_modules:
            # It used to be accepted and shard nothing: a run planned as sharded would run out of memory.
            raise ValueError("train.fsdp is true but train.fsdp_modules is empty, so nothing would be sharded; "
                             f"list the modules to shard (from {list(FSDP_MODULES)}) or set train.fsdp: false")
        lo, hi = self.min_step_percent, self.max_step_percent
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0 and lo <= hi):
            raise ValueError(f"train.min_step_percent {lo} and max_step_percent {hi} must satisfy "
                             "0 <= min <= max <= 1 (fractions of the teacher's timesteps; DMD2: 0.02 and 0.98)")


@dataclass
class DistillRecipe:
    """A whole distillation run: the teacher (``model``), the student's experts, critic, data, phases."""

    model: ModelSection
    """The teacher: a diffusers pipeline folder or hub id; ``kind`` unet (the SD1.5/SD2 family; a
    pixel-space pipeline without VAE works too), sdxl, or sd3 (flow matching)."""
    phases: list[PhaseConfig]
    student_timesteps: list[int] = field(default_factory=lambda: [999, 749, 499, 249])
    """DDPM teachers (unet, sdxl): the student's timesteps, noisiest first (DMD2's 4-step students)."""
    student_sigmas: list[float] | None = None
    """Flow-matching teachers (sd3): the student's sigmas, noisiest first, e.g. [1.0, 0.749, 0.499, 0.249]
    (``recipes/sd3_dmd2_tsm.yaml``: one n = 4 expert per step); step k runs at ``t = sigma_k * T`` and is
    routed onto the expert intervals by that t, as the fine-tuning trainer routes SD3. Required for sd3,
    refused for DDPM teachers."""
    experts: DistillExperts = field(default_factory=DistillExperts)
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    renamed_keys: ClassVar[dict[str, str]] = {"teacher": "model: {path: ...} (the teacher pipeline)"}

    def __post_init__(self):
        from .rollout import check_student_sigmas, check_student_timesteps
        from .teacher import check_teacher_kind

        check_teacher_kind(self.model.kind)
        if self.flow:
            if self.student_sigmas is None:
                raise ValueError(f"model.kind {self.model.kind} is a flow-matching teacher: give the student's steps as student_sigmas "
                                 "(e.g. [1.0, 0.749, 0.499, 0.249], one n = 4 expert per step), not student_timesteps")
            check_student_sigmas(self.student_sigmas)
        elif self.student_sigmas is not None:
            raise ValueError(f"student_sigmas is for flow-matching teachers (e.g. model.kind sd3); a {self.model.kind} "
                             "teacher is DDPM: give student_timesteps (e.g. [999, 749, 499, 249])")
        else:
            check_student_timesteps(self.student_timesteps)
        if not self.phases:
            raise ValueError("a recipe needs at least one phase")
        if all(ph.steps == 0 for ph in self.phases):
            raise ValueError("every phase has 0 steps, so the run would write an untrained adapter; "
                             "give at least one phase steps > 0")
        if not self.experts.scales:
            raise ValueError("experts.scales is empty; list the interval counts, e.g. [1, 4]")
        scales = set(self.experts.scales)
        for i, ph in enumerate(self.phases):
            where = f"phases[{i}] ({ph.name!r})"
            if ph.steps < 0 or ph.batch_size < 1 or ph.fake_updates_per_generator_update < 1:
                raise ValueError(f"{where}: steps >= 0, batch_size >= 1 and fake_updates_per_generator_update >= 1")
            if ph.type == "foster":
                if ph.scale not in scales:
                    raise ValueError(f"{where}: scale {ph.scale!r} is not one of experts.scales {sorted(scales)}")
                bad = [e for e in (ph.experts or []) if not 0 <= e < ph.scale]
                if bad:
                    raise ValueError(f"{where}: scale {ph.scale} has experts 0..{ph.scale - 1}; no expert {bad}")
            else:
                _check_router_phase(where, ph, sorted(scales))
            if ph.student_steps is not None:
                steps = self.student_sigmas if self.flow else self.student_timesteps
                bad = [k for k in ph.student_steps if not 0 <= k < len(steps)]
                if bad or not ph.student_steps:
                    raise ValueError(f"{where}: student_steps must be non-empty indices into {steps}; bad: {bad}")

    @property
    def flow(self) -> bool:
        """Whether the teacher is a flow-matching model (its student steps are sigmas)."""
        from tsm_core.models import backbone_class

        return backbone_class(self.model.kind).flow

    def timesteps(self, num_timesteps: int = 1000) -> list[float]:
        """The student's timesteps as its denoiser receives them: ``student_timesteps`` (DDPM), or
        ``sigma * T`` for every student sigma (flow matching)."""
        if self.flow:
            return [s * num_timesteps for s in self.student_sigmas]
        return list(self.student_timesteps)


def _check_router_phase(where: str, ph: PhaseConfig, scales: list[int]) -> None:
    """A mixture (router) phase's scales (paper eq. 5), checked at load: the phase itself may start only
    after every expert phase has trained. Core: the finest scale; context: other scales, at least one."""
    finest = max(scales)
    core = finest if ph.core_scale is None else ph.core_scale
    if core != finest:
        what = "is not the finest of" if core in scales else "is not one of"
        raise ValueError(f"{where}: core_scale {core} {what} experts.scales {scales}; the core must be the finest "
                         f"scale (paper eq. 5): set core_scale: {finest} or leave it out")
    ctx = [s for s in scales if s != core] if ph.context_scales is None else list(ph.context_scales)
    if not ctx:
        raise ValueError(f"{where}: a router phase needs at least one context scale besides the core {core}; "
                         f"add a scale to experts.scales (e.g. 1) and to context_scales")
    if core in ctx:
        raise ValueError(f"{where}: context_scales {ctx} contain the core scale {core}; list only other scales")
    bad = [s for s in ctx if s not in scales]
    if bad:
        raise ValueError(f"{where}: context scale(s) {bad} are not among experts.scales {scales}")
    if len(set(ctx)) != len(ctx):
        raise ValueError(f"{where}: context_scales {ctx} repeat a scale")


def per_process_batch(global_batch: int, num_processes: int, where: str = "batch_size") -> int:
    """The batch each process draws: ``global_batch / num_processes``, which must divide exactly."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if global_batch % num_processes:
        raise ValueError(
            f"{where}: the global batch {global_batch} does not divide over {num_processes} processes; "
            f"batch_size is the global batch (as in the paper), so use a multiple of {num_processes} "
            f"(e.g. {max(num_processes, global_batch - global_batch % num_processes)}) or change --num_processes")
    return global_batch // num_processes
