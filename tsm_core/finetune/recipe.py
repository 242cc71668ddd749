"""The fine-tuning recipe (one YAML file = one run) and its expansion into training phases.

A recipe lists ``stages`` run in order:

- ``foster`` (stage 1) at one ``scale``: ``schedule: joint`` draws t uniformly and routes each sample
  to its interval's expert, so all n experts train in ``steps`` steps; ``schedule: sequential`` trains
  expert k alone for ``steps`` steps on timesteps of its own interval, k = 0..n-1 (paper Tab. 8).
  ``scale: 1`` is vanilla LoRA.
- ``assemble`` (stage 2): experts frozen, only the router trains (core = finest scale, contexts from
  the stage or the default: every other fostered scale).

Each stage becomes one or more `Phase` objects; the trainer runs the phases back to back on one
global step counter, which is what checkpoints and ``--resume`` count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..intervals import TimestepIntervals
from ..train.sections import ExpertsSection, ModelSection, RunSection, require_at_least, require_positive


@dataclass
class FinetuneExperts(ExpertsSection):
    """The shared expert settings (`ExpertsSection`), plus experts on the text encoders."""

    text_encoder_targets: list[str] = field(default_factory=list)
    """Text-encoder layers that get experts (e.g. [q_proj, v_proj] for CLIP, [q, v] for T5); empty: none."""
    text_encoder_experts: Literal["timestep", "plain"] = "timestep"
    """"timestep": the text-encoder layers get timestep experts at the stages' scales, routed by the same t
    as the denoiser (the prompts are re-encoded at every sampling step). "plain": one LoRA per layer for
    every timestep (A.2.2 adopts TSM "only in the 3D-UNet"); it trains in every foster stage, continuing,
    and stays frozen while the router assembles (stage 2 trains only the router)."""


@dataclass
class DataSection:
    """Training images with captions."""

    source: Literal["folder", "webdataset", "video_folder", "video_webdataset"]
    """"folder": an imagefolder with metadata.jsonl; "webdataset": tar shards of (image, caption);
    "video_folder": mp4 clips with metadata.jsonl; "video_webdataset": tar shards of (mp4, caption) (the
    two video sources are for the video backbones "unet3d" / "animatediff", and only they take them)."""
    path: str
    """The folder, or a shard pattern like data/shard-{000..009}.tar."""
    resolution: int = 512
    num_frames: int = 16
    """Video sources: frames per training clip (also the length of sampled videos)."""
    frame_stride: int = 1
    """Video sources: take every frame_stride-th frame from the clip's start."""
    crop: Literal["center", "random", "resize"] = "center"
    """Resize the short side then crop (center/random), or resize to a square (folders only)."""
    random_flip: bool = False
    caption_column: str = "text"
    num_workers: int = 0
    shuffle_buffer: int = 1000
    """Sample shuffle buffer for webdataset shards."""
    cache_latents: bool = False
    """Encode each image with the VAE once (its mean latent) and reuse it (folders only)."""
    cache_text: bool = False
    """Encode each caption once; not allowed with text-encoder experts (their output changes)."""

    def __post_init__(self):
        require_at_least(1, resolution=self.resolution, num_frames=self.num_frames, frame_stride=self.frame_stride)
        require_at_least(0, num_workers=self.num_workers, shuffle_buffer=self.shuffle_buffer)


@dataclass
class StageSection:
    """One stage: fostering at one scale, or assembling."""

    type: Literal["foster", "assemble"]
    steps: int
    """Optimizer steps: for the whole stage (joint, assemble) or per expert (sequential)."""
    scale: int = 1
    schedule: Literal["joint", "sequential"] = "joint"
    lr: float = 1e-4
    weight_decay: float = 1e-2
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder experts (default: lr)."""
    text_encoder_weight_decay: float | None = None
    core_scale: int | None = None
    """assemble: the core (finest) scale; default the finest fostered scale."""
    context_scales: list[int] | None = None
    """assemble: the gated context scales; default every other fostered scale."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps (diffusers' constant_with_warmup)."""

    renamed_keys: ClassVar[dict[str, str]] = {"lr_warmup_steps": "warmup_steps"}

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"stage steps must be >= 1, got {self.steps}")
        if self.scale < 1:
            raise ValueError(f"stage scale must be >= 1, got {self.scale}")
        if self.lr <= 0:
            raise ValueError(f"stage lr must be positive, got {self.lr}")
        require_positive(text_encoder_lr=self.text_encoder_lr)
        require_at_least(0, weight_decay=self.weight_decay, text_encoder_weight_decay=self.text_encoder_weight_decay,
                         warmup_steps=self.warmup_steps)


@dataclass
class TrainSection(RunSection):
    """The shared run settings (`tsm_core.train.sections.RunSection`) plus the diffusion-loss trainer's own."""

    batch_size: int = 64
    """The *global* batch of one optimizer step: summed over processes and gradient-accumulation
    micro-batches (A.1: 64). Each process draws batch_size / (processes x gradient_accumulation_steps)
    per micro-batch. Until December 2026 it was the per-process batch: see ``recipe_version``."""
    gradient_accumulation_steps: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    tensorboard: bool = True
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    guidance_scale: float = 1.0
    sample_size: int | None = None
    """Sample image size (default: the model's native size)."""

    def __post_init__(self):
        super().__post_init__()
        # Checked here, not when first used: each used to fail only at the first step or sample.
        require_at_least(1, batch_size=self.batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
                         sample_steps=self.sample_steps, sample_size=self.sample_size)
        require_positive(adam_eps=self.adam_eps)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must lie in [0, 1) (AdamW's moment decay; diffusers: 0.9 and "
                                 f"0.999), got {getattr(self, name)}")


@dataclass
class FinetuneRecipe:
    """A whole fine-tuning run: model, experts, data, stages and run settings."""

    model: ModelSection
    data: DataSection
    stages: list[StageSection]
    experts: FinetuneExperts = field(default_factory=FinetuneExperts)
    train: TrainSection = field(default_factory=TrainSection)
    recipe_version: int = 1
    """2: ``train.batch_size`` is the global batch (December 2026 on; the shipped recipes say 2). A recipe
    without it was written when batch_size counted one process's samples: it runs unchanged where the two
    meanings agree (one process, no gradient accumulation) and is refused elsewhere (`check_batch_meaning`)."""

    renamed_keys: ClassVar[dict[str, str]] = {"lora": "experts (same keys: rank, alpha, target_modules, ...)"}

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a recipe needs at least one stage, e.g. stages: [{type: foster, scale: 4, steps: 1000}]")
        fostered: list[int] = []
        for i, st in enumerate(self.stages):
            if st.type == "foster":
                fostered.append(st.scale)
            elif len(set(fostered)) < 2:
                raise ValueError(f"stages[{i}] assembles, but it needs experts of at least two scales fostered "
                                 f"before it (core and context); fostered so far: {fostered}")
        from ..models import backbone_class

        video = backbone_class(self.model.kind).video
        if video != (self.data.source in ("video_folder", "video_webdataset")):
            raise ValueError(f"model.kind {self.model.kind!r} with data.source {self.data.source!r}: the video "
                             "backbones (unet3d, animatediff) train on data.source video_folder or video_webdataset, "
                             "and only they do")
        if video and (self.data.cache_latents or self.data.crop == "resize"):
            raise ValueError("data.cache_latents and data.crop 'resize' are for image folders; video clips are "
                             "center- or random-cropped and encoded every step")
        if self.experts.text_encoder_experts == "plain" and not self.experts.text_encoder_targets:
            raise ValueError("experts.text_encoder_experts 'plain' needs experts.text_encoder_targets (the text-encoder "
                             "layers that get the LoRA), e.g. [out_proj]")
        if self.data.cache_text and self.experts.text_encoder_targets:
            raise ValueError("data.cache_text cannot be used with experts.text_encoder_targets: text-encoder experts "
                             "change the embeddings every step; turn one of them off")

    @property
    def scales(self) -> tuple[int, ...]:
        """Every fostered scale."""
        return tuple(sorted({s.scale for s in self.stages if s.type == "foster"}))


@dataclass
class Phase:
    """A stretch of steps with one mode, one trainable set and one timestep range."""

    index: int
    stage: int
    mode: Literal["expert", "mixture"]
    start: int
    """Global step before this phase's first step."""
    steps: int
    scale: int | None = None
    experts: list[int] | None = None
    t_range: tuple[int, int] = (0, 1000)
    core_scale: int | None = None
    context_scales: tuple[int, ...] | None = None

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def name(self) -> str:
        if self.mode == "mixture":
            return f"stage{self.stage}_assemble"
        sub = "" if self.experts is None else f"_expert{self.experts[0]}"
        return f"stage{self.stage}_foster_n{self.scale}{sub}"


def plan_phases(recipe: FinetuneRecipe, num_timesteps: int = 1000) -> list[Phase]:
    """Expand the recipe's stages into phases (sequential fostering: one phase per expert)."""
    intervals = TimestepIntervals(num_timesteps, recipe.scales)
    phases: list[Phase] = []
    start = 0

    def add(**kw):
        nonlocal start
        ph = Phase(index=len(phases), start=start, **kw)
        phases.append(ph)
        start = ph.end

    for i, st in enumerate(recipe.stages):
        if st.type == "assemble":
            add(stage=i, mode="mixture", steps=st.steps, t_range=(0, num_timesteps), core_scale=st.core_scale,
                context_scales=None if st.context_scales is None else tuple(st.context_scales))
        elif st.schedule == "joint":
            add(stage=i, mode="expert", steps=st.steps, scale=st.scale, t_range=(0, num_timesteps))
        else:
            for k in range(st.scale):
                add(stage=i, mode="expert", steps=st.steps, scale=st.scale, experts=[k],
                    t_range=intervals.bounds(st.scale, k))
    return phases


BATCH_MEANING_VERSION = 2
"""The first recipe_version whose train.batch_size is the global batch."""


def per_process_micro_batch(recipe: FinetuneRecipe, num_processes: int) -> int:
    """The samples each process draws per micro-batch: ``train.batch_size / (processes x accumulation)``.

    Raises:
        ValueError: the global batch does not divide; or a recipe from before ``recipe_version`` 2 (whose
            batch_size counted one process's samples) would now train with another batch.
    """
    tr = recipe.train
    parts = num_processes * tr.gradient_accumulation_steps
    if recipe.recipe_version < BATCH_MEANING_VERSION and parts > 1:
        raise ValueError(
            f"train.batch_size is now the global batch (summed over processes and gradient accumulation, as the "
            f"paper states it); it used to be the batch of one process. This recipe has no recipe_version: "
            f"{BATCH_MEANING_VERSION}, so it was written for the old meaning: on {num_processes} process(es) x "
            f"{tr.gradient_accumulation_steps} accumulation step(s) it would now train with a global batch of "
            f"{tr.batch_size} instead of {tr.batch_size * parts}. Set train.batch_size to the global batch you want "
            f"(e.g. {tr.batch_size * parts}) and add recipe_version: {BATCH_MEANING_VERSION} at the top of the recipe")
    if tr.batch_size % parts:
        raise ValueError(f"train.batch_size {tr.batch_size} (the global batch) does not divide over {num_processes} "
                         f"process(es) x {tr.gradient_accumulation_steps} accumulation step(s); use a multiple of "
                         f"{parts}")
    return tr.batch_size // parts
