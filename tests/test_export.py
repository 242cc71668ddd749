"""A TSM expert exported as a standard LoRA loads in a stock diffusers pipeline and matches routing."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from tests.numerics import assert_close, close
from tests.test_core import perturb
from tsm_core import TSMConfig, attach

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
           "downsamplers.0.conv", "upsamplers.0.conv", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def load(path):
    return StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_expert_reproduces_routing_in_stock_pipeline(sd_pipeline_path, tmp_path, fmt):
    pipe = load(sd_pipeline_path)
    tsm = attach(pipe.unet, TSMConfig(rank=4, alpha=8, scales=(1, 4), target_modules=TARGETS))
    # diffusers can only infer a kohya text-encoder file's layout when out_proj is in it, so the
    # kohya case targets all four CLIP projections (ComfyUI reads q/v-only files too).
    te_targets = ["q_proj", "v_proj"] if fmt == "diffusers" else ["q_proj", "k_proj", "v_proj", "out_proj"]
    tsm_te = attach(pipe.text_encoder, TSMConfig(rank=4, alpha=8, scales=(1, 4), target_modules=te_targets),
                    context=tsm.context)
    perturb(tsm)
    perturb(tsm_te, seed=1)
    tsm.set_mode("expert", scale=4)
    tsm_te.set_mode("expert", scale=4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a cat", "a dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    t = torch.tensor([600, 700])  # expert 2 at scale 4
    with tsm.timesteps(t), torch.no_grad():
        routed = pipe.unet(x, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    tsm.export_lora(tmp_path / "lora", scale=4, expert=2, format=fmt)
    tsm_te.export_lora(tmp_path / "lora_te", scale=4, expert=2, format=fmt)
    from safetensors.torch import load_file, save_file

    both = {**load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"),
            **load_file(tmp_path / "lora_te" / "pytorch_lora_weights.safetensors")}
    save_file(both, tmp_path / "merged.safetensors")

    stock = load(sd_pipeline_path)
    with torch.no_grad():
        base = stock.unet(x, t, encoder_hidden_states=stock.text_encoder(ids)[0]).sample
    stock.load_lora_weights(str(tmp_path), weight_name="merged.safetensors")
    with torch.no_grad():
        lora = stock.unet(x, t, encoder_hidden_states=stock.text_encoder(ids)[0]).sample
    assert not close(base, routed, rel=1e-3)
    assert_close(lora, routed, rel=1e-4, msg=fmt)


def test_export_rejects_unknown_expert(sd_pipeline_path, tmp_path):
    pipe = load(sd_pipeline_path)
    tsm = attach(pipe.unet, TSMConfig(scales=(4,), target_modules=["to_q"]))
    with pytest.raises(ValueError, match="experts 0..3"):
        tsm.export_lora(tmp_path, scale=4, expert=4)
    with pytest.raises(ValueError, match="format"):
        tsm.export_lora(tmp_path, scale=4, expert=0, format="ckpt")
