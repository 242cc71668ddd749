"""Model cards: a ``README.md`` beside every saved adapter that says what it is and how to load it.

Written offline with huggingface_hub's `ModelCard`: a YAML metadata block (``base_model``, ``library_name``,
``tags``, ``license`` when the base model's is known) that the Hub indexes, then a markdown body: the base
model, the method (TSM stage 1 or 2, its scales and which timesteps each expert serves), the recipe,
the training steps, the code that loads it, and its measured scores (or "not measured").

* `write_run_card`: a finished run's ``adapter/`` (fine-tuning or distillation); the adapter's own header
  gives its settings and mode, `RunCard` what only the trainer knows.
* `write_lora_card`: a folder written by ``export_lora`` (one expert as a standard LoRA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import ModelCard, ModelCardData

from .config import TSMConfig
from .intervals import TimestepIntervals
from .serialization import atomic_write_text, read_adapter_header

CARD_FILE = "README.md"

# Licenses of the base models the shipped recipes name (their Hub cards); a card inherits its base's.
# Any other base model, a local folder included, gets no license line.
BASE_LICENSES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2": "openrail++",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "PixArt-alpha/PixArt-XL-2-512x512": "openrail++",
    "ali-vilab/text-to-video-ms-1.7b": "cc-by-nc-4.0",
}

NOT_MEASURED = ("Not measured: no FID, KID or CLIP score was computed for this adapter. Score its samples with "
                "`python tools/fid.py score GEN_DIR --ref REF` (docs/evaluation.md).")


@dataclass
class RunCard:
    """What a finished run tells its adapter's card beyond the adapter file (settings, mode) itself."""

    trainer: Literal["finetune", "distill"]
    """Which trainer wrote the adapter: the diffusion-loss fine-tuner or DMD2 distillation."""
    base_model: str
    """The recipe's ``model.path``: the base model (fine-tuning) or the teacher (distillation)."""
    kind: str = "unet"
    """The backbone family (``model.kind``)."""
    component: str = "unet"
    """The pipeline component the adapter sits on (``unet`` or ``transformer``)."""
    run_dir: str = "."
    """The run folder, as the load code should name it."""
    recipe_file: str | None = "../recipe.yaml"
    """The resolved recipe, relative to the adapter folder."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Key recipe settings, shown as a list (``{"experts.rank": 4, ...}``)."""
    phases: list[tuple[str, int, str]] = field(default_factory=list)
    """One row per phase: (name, steps, what it trained)."""
    steps: int = 0
    """Steps trained in all (optimizer steps; DMD2 iterations for distillation)."""
    student_timesteps: list[float] | None = None
    """Distillation: the student's timesteps, noisiest first (as its denoiser receives them)."""
    pipeline_class: str | None = None
    """The stock diffusers pipeline the adapter loads into (None: only tsm's own loader works)."""
    text_adapters: list[str] = field(default_factory=list)
    """Sibling folders with text-encoder adapters (fine-tuning), e.g. ``adapter_text_encoder0``."""
    video: bool = False
    """A text-to-video model."""
    scores: dict[str, float] | None = None
    """Measured scores (``{"FID": 45.3, ...}``); None writes "not measured"."""


# ---------------------------------------------------------------------------- shared pieces
def _card_data(base_model: str | None, library: str, tags: list[str], video: bool) -> ModelCardData:
    task = "text-to-video" if video else "text-to-image"
    license_ = BASE_LICENSES.get(base_model or "")
    return ModelCardData(base_model=base_model, library_name=library, license=license_, pipeline_tag=task,
                         tags=[*tags, "diffusers", task])


def _write(directory: str | os.PathLike, data: ModelCardData, body: str) -> Path:
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")
    return atomic_write_text(Path(directory) / CARD_FILE, str(card))


def _span(intervals: TimestepIntervals, scale: int, expert: int) -> str:
    """Expert ``expert``'s interval at ``scale``: ``k T / n <= t < (k + 1) T / n`` (paper eq. 3)."""
    T = intervals.num_timesteps
    return f"[{expert * T / scale:g}, {(expert + 1) * T / scale:g})"


def _targets(config: TSMConfig) -> str:
    t = config.target_modules
    return f"the regex `{t}`" if isinstance(t, str) else ", ".join(f"`{x}`" for x in t)


def _code(text: str) -> str:
    return f"```python\n{text.strip()}\n```"


def method_section(config: TSMConfig, mode: str, mode_args: dict, student_timesteps=None) -> str:
    """The method in words (stage 1 or 2 and its scales) and a table of which timesteps each expert serves."""
    intervals = TimestepIntervals(config.num_timesteps, config.scales)
    T = config.num_timesteps
    lora = (f"Every expert is a LoRA of rank {config.rank} and alpha {config.alpha:g} (update scaled by alpha / rank "
            f"= {config.scaling:g}) on the layers {_targets(config)}. The T = {T} training timesteps are split into "
            f"n equal intervals at each scale n of {list(config.scales)}; interval k of scale n covers "
            f"k T / n <= t < (k + 1) T / n and has its own expert.")
    roles: dict[int, str] = {}
    if mode == "expert":
        scale = mode_args["scale"]
        text = (f"**TSM stage 1 (fostering).** A sample at timestep t runs through the expert of its interval at "
                f"scale n = {scale} only" + (" (n = 1 is vanilla LoRA)." if scale == 1 else "."))
        roles[scale] = "active: the expert of t's interval"
    elif mode in ("mixture", "symmetric"):
        core, ctx = mode_args["core_scale"], list(mode_args["context_scales"])
        gate = (f"the router g(x, t) = FC(x) + E[t] (paper eq. 5-6; input `{config.router_input}`, activation "
                f"`{config.router_activation}`)")
        if mode == "mixture":
            text = (f"**TSM stage 2 (assembling).** The core scale n = {core} is always on: its expert of t's "
                    f"interval adds with no gate. The context scales n = {ctx} add their expert of t's interval "
                    f"through {gate}, per sample and per token. This stage trains only the router; the experts stay "
                    "as stage 1 left them.")
            roles[core] = "core: always on"
            roles.update({s: "context: gated by the router" for s in ctx})
        else:
            text = (f"**TSM symmetric mixture (the paper's ablation baseline).** Every scale of {sorted({core, *ctx})} "
                    f"adds its expert of t's interval through {gate}.")
            roles.update({s: "gated by the router" for s in (core, *ctx)})
    else:
        text = "Saved in mode `off`: the model runs as the base model until a mode is set."
    rows = ["| scale n | expert | timesteps t | role in the saved mode |" + (" student steps |" if student_timesteps else ""),
            "|---|---|---|---|" + ("---|" if student_timesteps else "")]
    for n in config.scales:
        served = intervals.index(student_timesteps, n).tolist() if student_timesteps else []
        for k in range(n):
            row = f"| {n} | {k} | {_span(intervals, n, k)} | {roles.get(n, 'stored, not used in this mode')} |"
            if student_timesteps:
                steps = [f"{t:g}" for t, e in zip(student_timesteps, served) if e == k]
                row += f" {', '.join(steps) or '-'} |"
            rows.append(row)
    return "\n\n".join([text, lora, "\n".join(rows)])


def _scores(scores: dict[str, float] | None) -> str:
    if not scores:
        return NOT_MEASURED
    return "\n".join(["| score | value |", "|---|---|", *(f"| {k} | {v:g} |" for k, v in scores.items())])


# ---------------------------------------------------------------------------- a run's adapter
def _load_finetuned(run: RunCard, adapter_dir: str) -> str:
    code = _code(f"""
from tsm_core.finetune import load_finetuned

# The run folder (this adapter/ and any adapter_text_encoder*/ beside it), in the mode it was saved in.
backbone, tsm, text_adapters = load_finetuned("{run.kind}", "{run.base_model}", "{run.run_dir}")
images = backbone.sample(["a photo of a cat"], tsm=tsm, reencode_prompts=bool(text_adapters))  # [-1, 1]
""")
    if run.pipeline_class is None or run.text_adapters:
        return code
    return code + "\n\nIn a stock diffusers pipeline, each denoiser call routed by its own timestep:\n\n" + _code(f"""
from diffusers import {run.pipeline_class}
from tsm_core import load_adapter
from tsm_core.routing import route_by_timestep

pipe = {run.pipeline_class}.from_pretrained("{run.base_model}")
tsm = load_adapter(pipe.{run.component}, "{adapter_dir}")
with route_by_timestep(pipe.{run.component}, tsm):
    image = pipe("a photo of a cat").images[0]
""")


def _load_student(run: RunCard, adapter_dir: str) -> str:
    steps = [int(t) if float(t).is_integer() else t for t in run.student_timesteps or []]
    own = _code(f"""
from tsm_distill.sampler import generate
from tsm_distill.trainer import load_student

teacher, tsm = load_student("{run.base_model}", "{adapter_dir}", kind="{run.kind}")
images = generate(teacher, tsm, ["a photo of a cat"], seeds=[0], timesteps={steps})  # (N, 3, H, W) in [-1, 1]
""")
    if run.pipeline_class is None:
        return own
    stock = _code(f"""
from diffusers import {run.pipeline_class}
from tsm_core import load_adapter
from tsm_distill.sampler import use_student_in_pipeline

pipe = {run.pipeline_class}.from_pretrained("{run.base_model}")
tsm = load_adapter(pipe.unet, "{adapter_dir}")
kwargs = use_student_in_pipeline(pipe, tsm, timesteps={steps})  # the student's {len(steps)}-step schedule, routed per step
image = pipe("a photo of a cat", **kwargs).images[0]
""")
    return stock + "\n\nOr with tsm's own few-step sampler (the rollout it was trained with):\n\n" + own


def write_run_card(adapter_dir: str | os.PathLike, run: RunCard) -> Path:
    """Write ``adapter_dir/README.md`` for the adapter a finished run saved there; returns its path."""
    header = read_adapter_header(adapter_dir)
    config, mode = header.config, header.mode
    what = "fine-tuned with the diffusion loss" if run.trainer == "finetune" else "distilled with DMD2 into a few-step student"
    stage = {"expert": "TSM stage 1 (fostering)", "mixture": "TSM stage 2 (assembling)"}.get(mode, f"TSM, mode {mode}")
    if config.scales == (1,):
        stage = "Vanilla LoRA (TSM with one interval, n = 1)"
    title = f"{stage}: {'a DMD2 student' if run.trainer == 'distill' else 'fine-tuned experts'} of {run.base_model}"
    tags = ["lora", "tsm", "timestep-experts"] + (["dmd2", "distillation"] if run.trainer == "distill" else [])
    data = _card_data(run.base_model, "tsm", tags, run.video)
    student = run.student_timesteps if run.trainer == "distill" else None
    settings = "\n".join(f"- `{k}`: {v}" for k, v in run.settings.items())
    recipe = (f"The resolved recipe is [`{run.recipe_file}`]({run.recipe_file}) (the run folder's recipe.yaml). "
              if run.recipe_file else "")
    phases = "\n".join(["| phase | steps | trained |", "|---|---|---|",
                        *(f"| {name} | {steps} | {trained} |" for name, steps, trained in run.phases)])
    unit = "DMD2 iterations" if run.trainer == "distill" else "optimizer steps"
    texts = (f"\n\nText-encoder adapters of this run sit beside this folder: {', '.join(run.text_adapters)}; "
             "`load_finetuned` loads them too.") if run.text_adapters else ""
    load = _load_student(run, str(adapter_dir)) if run.trainer == "distill" else _load_finetuned(run, str(adapter_dir))
    body = f"""
# {title}

Timestep LoRA experts (TimeStep Master, TSM) {what} by tsm, saved as one
`tsm_adapter.safetensors` with its settings, intervals and mode in the metadata. Stock LoRA loaders cannot
read it (it holds many experts and a timestep router); load it with tsm as shown below, or export one expert
as a standard LoRA with `tsm.export_lora(dir, scale, expert)`.

## Base model

`{run.base_model}` (tsm backbone family `{run.kind}`; the adapter sits on the pipeline's `{run.component}`).

## Method

{method_section(config, mode, header.mode_args, student)}

## Recipe

{recipe}Key settings:

{settings}

## Training

{run.steps} {unit} in all:

{phases}{texts}

## How to load

{load}

## Scores

{_scores(run.scores)}
"""
    return _write(adapter_dir, data, body)


# ---------------------------------------------------------------------------- an exported expert
def write_lora_card(directory: str | os.PathLike, config: TSMConfig, scale: int, expert: int, layout: str,
                    base_model: str | None = None, component: str = "unet", loader: str = "pipeline",
                    video: bool = False) -> Path:
    """Write ``directory/README.md`` for one expert exported as a standard LoRA (``export_lora``).

    ``layout`` is ``diffusers`` or ``kohya``; ``loader`` ``pipeline`` (``pipe.load_lora_weights``) or
    ``load_lora`` (tsm's peft loader, for denoisers without diffusers' LoRA loader); ``video``: a
    text-to-video model.
    """
    intervals = TimestepIntervals(config.num_timesteps, config.scales)
    span = _span(intervals, scale, expert)
    base = base_model or "BASE_MODEL"
    if loader == "load_lora":
        load = _code(f"""
from diffusers import DiffusionPipeline
from tsm_core.export import load_lora

pipe = DiffusionPipeline.from_pretrained("{base}")
load_lora(pipe.{component}, "{directory}")
""")
    else:
        load = _code(f"""
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{directory}")
""")
    reach = ("With one interval it is a vanilla LoRA that serves every timestep." if scale == 1 else
             "On its own it reproduces the TSM adapter's stage-1 model only at timesteps in that interval (e.g. that "
             "step of a few-step student); elsewhere the adapter uses other experts.")
    method = (f"TSM stage 1 (fostering): the T = {config.num_timesteps} training timesteps are split into n = {scale} "
              f"equal intervals, and this expert (k = {expert}) was trained only on timesteps t in {span}. {reach} "
              f"LoRA rank {config.rank}, alpha {config.alpha:g}, on the layers {_targets(config)}; the adapter's "
              f"scales were {list(config.scales)}.")
    fmt = ("diffusers / peft keys; alpha / rank is folded into lora_B, so it loads exactly with the default "
           "alpha = rank" if layout == "diffusers" else
           "kohya keys (`lora_down`, `lora_up`, `alpha`), which ComfyUI and A1111 read and diffusers converts on load")
    body = f"""
# LoRA: expert {expert} of scale n = {scale} of a TSM adapter

One timestep expert of a TimeStep Master (TSM) adapter, exported by tsm's `export_lora` as a standard LoRA
(`pytorch_lora_weights.safetensors`, {fmt}).

## Base model

`{base}`{"" if base_model else " (not recorded: load it into the model the adapter was trained on)"}; the
LoRA sits on the pipeline's `{component}`.

## Method

{method}

## How to load

{load}

## Scores

{NOT_MEASURED}
"""
    data = _card_data(base_model, "diffusers", ["lora", "tsm", "timestep-experts"], video)
    return _write(directory, data, body)
