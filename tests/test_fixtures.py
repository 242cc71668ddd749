"""The shared tiny fixtures load by path and run a forward pass of the right shape."""

import torch

from tsm_core.testing import tiny


def test_tokenizer_tokenizes_words_not_bytes(tokenizer):
    ids = tokenizer("a photo of a cat").input_ids
    # bos + 5 words + eos: whole-word merges exist, so no word splits into bytes.
    assert len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a photo of a cat"


def test_unet_and_text_encoder_forward(unet, text_encoder, tokenizer):
    ids = tokenizer(["a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    emb = text_encoder(ids)[0]
    assert emb.shape == (1, 16, 32)
    out = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), encoder_hidden_states=emb).sample
    assert out.shape == (1, 4, 16, 16)


def test_transformers_forward(pixart, sd3):
    x = torch.randn(2, 4, 8, 8)
    out = pixart(x, encoder_hidden_states=torch.randn(2, 5, 32), timestep=torch.tensor([1, 500]),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert out.shape == (2, 8, 8, 8)
    out = sd3(x, encoder_hidden_states=torch.randn(2, 5, 32), pooled_projections=torch.randn(2, 16),
              timestep=torch.tensor([1.0, 500.0])).sample
    assert out.shape == (2, 4, 8, 8)


def test_pipeline_round_trip(sd_pipeline_path, pixel_pipeline_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_path), safety_checker=None)
    assert pipe.unet is not None and pipe.vae is not None
    # A pixel-space pipeline has no VAE; diffusers needs vae=None spelled out to load it.
    pipe = StableDiffusionPipeline.from_pretrained(str(pixel_pipeline_path), vae=None, safety_checker=None)
    assert pipe.vae is None and pipe.unet.config.in_channels == 3
    assert tiny.tiny_unet_config()["block_out_channels"] == (32, 64)
