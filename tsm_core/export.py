"""Export one timestep expert as a standard LoRA file that stock tools load.

* ``format="diffusers"``: peft-style keys ``<prefix>.<layer>.lora_A.weight`` / ``lora_B.weight`` in
  ``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_lora_weights(dir)``. The expert's
  ``alpha / rank`` factor is folded into B, so it loads exactly with diffusers' default alpha = rank.
* ``format="kohya"``: ``lora_unet_<layer_with_underscores>.lora_down.weight`` / ``lora_up.weight`` /
  ``alpha`` keys, the layout ComfyUI and A1111 read (and diffusers converts on load).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .card import write_lora_card
from .layers import expert_key
from .serialization import atomic_save_file

LORA_FILE = "pytorch_lora_weights.safetensors"

_PREFIXES = {
    "UNet2DConditionModel": ("unet", "lora_unet"),
    "UNet3DConditionModel": ("unet", "lora_unet"),
    "UNetMotionModel": ("unet", "lora_unet"),
    "CLIPTextModel": ("text_encoder", "lora_te"),
    "CLIPTextModelWithProjection": ("text_encoder", "lora_te"),
    "T5EncoderModel": ("text_encoder", "lora_te"),
    "PixArtTransformer2DModel": ("transformer", "lora_transformer"),
    "SD3Transformer2DModel": ("transformer", "lora_transformer"),
}


def _prefixes(model, prefix: str | None) -> tuple[str, str]:
    if prefix is not None:
        return prefix, {"unet": "lora_unet", "text_encoder": "lora_te"}.get(prefix, f"lora_{prefix}")
    name = type(model).__name__
    if name not in _PREFIXES:
        raise ValueError(f"cannot tell which pipeline component a {name} is; pass prefix='unet'|'text_encoder'|'transformer'")
    return _PREFIXES[name]


def expert_lora_state_dict(tsm, scale: int, expert: int, format: str = "diffusers",
                           prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one expert in a standard LoRA layout (see module docstring)."""
    if scale not in tsm.config.scales:
        raise ValueError(f"scale {scale} is not one of the fostered scales {tsm.config.scales}")
    if not 0 <= expert < scale:
        raise ValueError(f"scale {scale} has experts 0..{scale - 1}, got expert {expert}")
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    peft_prefix, kohya_prefix = _prefixes(tsm.model, prefix)
    out = {}
    for name, layer in tsm.layers.items():
        A = layer.lora_A[expert_key(scale, expert)].detach().float().cpu()
        B = layer.lora_B[expert_key(scale, expert)].detach().float().cpu()
        up = B.view(*B.shape, *([1] * layer.conv_dims))  # a conv's LoRA-B is a 1x1(x1) conv
        if format == "diffusers":
            out[f"{peft_prefix}.{name}.lora_A.weight"] = A.contiguous()
            out[f"{peft_prefix}.{name}.lora_B.weight"] = (up * layer.scaling).contiguous()
        else:
            key = f"{kohya_prefix}_{name.replace('.', '_')}"
            out[f"{key}.lora_down.weight"] = A.contiguous()
            out[f"{key}.lora_up.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(tsm.config.alpha))
    return out


def export_lora(tsm, directory: str | Path, scale: int, expert: int = 0, format: str = "diffusers",
                prefix: str | None = None, base_model: str | None = None) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` for one expert (atomically), and its model card
    ``directory/README.md`` (`tsm_core.card`). ``base_model`` (a hub id or folder) names the model it loads
    into; default: the folder or hub id the wrapped model was loaded from, when its config records one."""
    tensors = expert_lora_state_dict(tsm, scale, expert, format=format, prefix=prefix)
    meta = {"format": "pt", "tsm_scale": str(scale), "tsm_expert": str(expert), "tsm_layout": format}
    path = atomic_save_file(tensors, Path(directory) / LORA_FILE, meta)
    name = type(tsm.model).__name__
    write_lora_card(directory, tsm.config, scale, expert, format, base_model or _loaded_from(tsm.model),
                    component=_prefixes(tsm.model, prefix)[0],
                    loader="load_lora" if name in _NO_PIPELINE_LOADER else "pipeline", video=name in _VIDEO)
    return path


# Denoisers whose pipelines diffusers 0.42 gives no LoRA loader (`load_lora` fills the gap), and video models.
_NO_PIPELINE_LOADER = ("UNet3DConditionModel",)
_VIDEO = ("UNet3DConditionModel", "UNetMotionModel")


def _loaded_from(model) -> str | None:
    """The pipeline folder or hub id ``model`` was loaded from, as its config records it (a component loaded
    from a local pipeline records ``<pipeline>/<component>``: the pipeline is the base model)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if name and (Path(name).parent / "model_index.json").is_file():
        name = str(Path(name).parent)
    return name


def load_lora(model, directory: str | Path, prefix: str | None = None, adapter_name: str = "default"):
    """Load a diffusers-format LoRA file (``export_lora``'s) into ``model`` with peft's public API.

    ``pipe.load_lora_weights`` does this for models that have diffusers' LoRA loader. diffusers 0.42's
    ``UNet3DConditionModel`` (ModelScope / zeroscope, ``TextToVideoSDPipeline``) has none, so its
    pipeline refuses every LoRA; ``load_lora(pipe.unet, dir)`` fills the gap with the same file.
    Ranks come from the tensors; alpha = rank, as the export folds alpha / rank into B.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write it with tsm.export_lora(directory, scale, expert)")
    peft_prefix = _prefixes(model, prefix)[0] + "."
    tensors = {k[len(peft_prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(peft_prefix)}
    if not tensors:
        raise ValueError(f"{path} holds no '{peft_prefix}*' tensors for this {type(model).__name__}; pass prefix=")
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: the LoRA layers have different ranks {sorted(ranks)}; load_lora needs one")
    rank = ranks.pop()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: tensors with no place in {type(model).__name__}: {result.unexpected_keys[:5]}")
    return model
