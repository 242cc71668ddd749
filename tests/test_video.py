"""Video: frame-aware routing on diffusers' 3D UNets, experts on Conv3d, export to a stock text-to-video pipeline.

Inside a video UNet a batch of B videos becomes B*F rows in the spatial layers and B*H*W rows in the
temporal ones; every row must be routed by its own video's timestep (``RoutingState.rows``).
"""

import pytest
import torch

from tests.numerics import assert_close, close
from tests.test_core import assert_batch_routes_per_sample, perturb
from tsm_core import TSMConfig, attach
from tsm_core.testing.tiny_video import build_unet3d, build_unet_motion, build_video_pipeline

# spatial + temporal attention (Linear), resnet convs (Conv2d), time embedding projections (Linear on B*F
# rows) and the temporal convolutions (Conv3d inside TemporalConvLayer's Sequentials)
UNET3D_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                  "conv1.2", "conv2.3", "conv3.3", "conv4.3"]
FRAMES = 3


@pytest.fixture(scope="module")
def unet3d_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet3d")
    build_unet3d(folder)
    return folder


@pytest.fixture
def unet3d(unet3d_dir):
    from diffusers import UNet3DConditionModel

    return UNet3DConditionModel.from_pretrained(str(unet3d_dir)).eval()


def video_inputs(batch=3, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, frames, 8, 8, generator=g), torch.randn(batch, 5, 32, generator=g)


def run(unet, tsm, x, c, t, **kw):
    with tsm.timesteps(t), torch.no_grad():
        return unet(x, t, encoder_hidden_states=c, **kw).sample


def test_targets_cover_conv3d_and_temporal_layers(unet3d):
    tsm = attach(unet3d, TSMConfig(scales=(1, 4), target_modules=UNET3D_TARGETS))
    kinds = {type(layer.base_layer).__name__ for layer in tsm.layers.values()}
    assert kinds == {"Linear", "Conv2d", "Conv3d"}
    assert any(".temp_attentions." in n for n in tsm.layers) and any(".temp_convs." in n for n in tsm.layers)


def test_a_mixed_timestep_video_batch_equals_each_video_alone_in_every_mode(unet3d):
    tsm = attach(unet3d, TSMConfig(scales=(1, 4), target_modules=UNET3D_TARGETS))
    perturb(tsm)
    x, c = video_inputs()
    t = torch.tensor([999, 499, 10])  # three experts of scale 4, three router rows
    base = run(unet3d, tsm, x, c, t)  # mode "off"
    # each video equals itself alone, and really uses its own expert (not every video on expert 0)
    for mode, batched in assert_batch_routes_per_sample(unet3d, tsm, x, c, t, rel=1e-5, run=run).items():
        assert not close(batched, base, rel=1e-3), mode  # the experts act


def test_merged_video_batch_equals_the_routed_one(unet3d):
    tsm = attach(unet3d, TSMConfig(scales=(1, 4), target_modules=UNET3D_TARGETS, router_input="timestep"))
    perturb(tsm)
    x, c = video_inputs(batch=2)
    for mode in ("expert", "mixture"):
        tsm.set_mode(mode, **({"scale": 4} if mode == "expert" else {}))
        if mode == "mixture":
            perturb(tsm, seed=7, router=True)
        tt = torch.tensor([700, 700])
        routed = run(unet3d, tsm, x, c, tt)
        with tsm.merged(700), torch.no_grad():
            fused = unet3d(x, tt, encoder_hidden_states=c).sample
        assert_close(fused, routed, rel=1e-4, msg=mode)


def test_a_video_model_still_needs_one_timestep_per_video(unet3d):
    tsm = attach(unet3d, TSMConfig(scales=(4,), target_modules=UNET3D_TARGETS))
    tsm.set_mode("expert", scale=4)
    perturb(tsm)
    x, c = video_inputs(batch=4)
    # 4 videos, 2 timesteps: the frames inside are a multiple of 2, but the model's own batch is 4
    with pytest.raises(ValueError, match="the model got a batch of 4 but 2 timesteps"):
        with tsm.timesteps(torch.tensor([1, 900])), torch.no_grad():
            unet3d(x, 500, encoder_hidden_states=c)
    # a layer whose rows cannot be mapped to the samples says so
    layer = next(iter(tsm.layers.values()))
    with pytest.raises(ValueError, match="5 rows but 2 timesteps"):
        with tsm.timesteps(torch.tensor([1, 900])):
            layer(torch.randn(5, 7, layer.in_features))


def test_animatediff_motion_unet_routes_each_video_by_its_timestep(tmp_path):
    unet = build_unet_motion(tmp_path / "motion").eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
    tsm = attach(unet, TSMConfig(scales=(1, 4), target_modules=targets))
    assert any(".motion_modules." in n for n in tsm.layers)
    perturb(tsm)
    x, c = video_inputs(batch=2)
    c = c.repeat_interleave(FRAMES, dim=0)  # AnimateDiff's pipeline gives the text states per frame
    t = torch.tensor([999, 10])
    tsm.set_mode("mixture")
    perturb(tsm, seed=2, router=True)
    batched = run(unet, tsm, x, c, t)
    alone = torch.cat([run(unet, tsm, x[i:i + 1], c[i * FRAMES:(i + 1) * FRAMES], t[i:i + 1]) for i in range(2)])
    assert_close(batched, alone, rel=1e-5)


def routed_and_exported(unet, targets, tmp_path, frames_cond=False):
    """The routed scale-4 expert 2's output on one video, and that expert exported in diffusers format."""
    tsm = attach(unet, TSMConfig(scales=(4,), target_modules=targets))
    perturb(tsm)
    tsm.set_mode("expert", scale=4)
    x, c = video_inputs(batch=1)
    if frames_cond:
        c = c.repeat_interleave(FRAMES, dim=0)
    t = torch.tensor([600])  # interval 2 of scale 4
    routed = run(unet, tsm, x, c, t)
    tsm.export_lora(tmp_path / "lora", scale=4, expert=2)
    return routed, (x, t, c)


def unet_output(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def test_an_exported_expert_loads_in_the_stock_animatediff_pipeline(tmp_path):
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    pipe_dir = build_video_pipeline(tmp_path / "video", kind="animatediff")
    unet = UNetMotionModel.from_pretrained(str(pipe_dir / "unet")).eval()
    # Not proj_in/proj_out: the motion modules call proj_in(input=...), which peft's LoRA layer (peft 0.21)
    # cannot take, so a stock pipeline with a LoRA there fails for any LoRA; TSM's own layers accept it.
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    routed, inputs = routed_and_exported(unet, targets, tmp_path, frames_cond=True)
    pipe = AnimateDiffPipeline.from_pretrained(str(pipe_dir))
    plain = unet_output(pipe.unet, *inputs)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = unet_output(pipe.unet, *inputs)
    assert_close(loaded, routed, rel=1e-4)  # the stock pipeline's UNet now is the routed expert
    assert not close(loaded, plain, rel=1e-3)


def test_an_exported_expert_with_conv3d_loads_into_the_text_to_video_pipeline(tmp_path):
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from tsm_core.export import load_lora

    pipe_dir = build_video_pipeline(tmp_path / "video")
    unet = UNet3DConditionModel.from_pretrained(str(pipe_dir / "unet")).eval()
    routed, inputs = routed_and_exported(unet, UNET3D_TARGETS, tmp_path)
    pipe = TextToVideoSDPipeline.from_pretrained(str(pipe_dir))
    plain = unet_output(pipe.unet, *inputs)
    # diffusers 0.42 gives UNet3DConditionModel no LoRA loader: pipe.load_lora_weights fails for any LoRA
    with pytest.raises(AttributeError, match="load_lora_adapter"):
        pipe.load_lora_weights(str(tmp_path / "lora"))
    load_lora(pipe.unet, tmp_path / "lora")  # the same file through peft's public API
    assert any(type(m).__name__ == "Conv3d" and hasattr(m, "lora_A") for m in pipe.unet.modules())
    loaded = unet_output(pipe.unet, *inputs)
    assert_close(loaded, routed, rel=1e-4)
    assert not close(loaded, plain, rel=1e-3)


# ---------------------------------------------------------------------------- the video fine-tuning recipes
RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"


def test_the_a22_video_recipes_hold_the_papers_values():
    from tsm_core.finetune import FinetuneRecipe, plan_phases
    from tsm_core.train.recipe import load_recipe

    for name in ("video_posttrain_lora.yaml", "video_posttrain_tsm.yaml"):
        r = load_recipe(RECIPES / name, FinetuneRecipe)
        assert (r.model.kind, r.data.source) == ("unet3d", "video_folder")
        assert r.experts.target_modules == ["to_k", "to_v"] and r.experts.text_encoder_targets == ["out_proj"]
        assert r.train.batch_size == 32 and r.recipe_version == 2  # the global batch
        assert all((s.steps, s.lr, s.weight_decay, s.text_encoder_lr, s.text_encoder_weight_decay)
                   == (5000, 2e-4, 1e-2, 2e-4, 1e-2) for s in r.stages)
    tsm = load_recipe(RECIPES / "video_posttrain_tsm.yaml", FinetuneRecipe)
    assert tsm.experts.text_encoder_experts == "plain"  # "TSM only in the 3D-UNet"
    assert [(p.mode, p.scale, p.core_scale) for p in plan_phases(tsm)] == [("expert", 8, None), ("expert", 1, None),
                                                                          ("mixture", None, 8)]


def test_a_video_model_needs_video_data_and_back():
    from tsm_core.finetune import FinetuneRecipe
    from tsm_core.train.recipe import load_recipe

    with pytest.raises(ValueError, match="video backbones"):
        load_recipe(RECIPES / "video_posttrain_lora.yaml", FinetuneRecipe, overrides=["data.source=folder"])
    with pytest.raises(ValueError, match="video backbones"):
        load_recipe(RECIPES / "sd15_domain_lora.yaml", FinetuneRecipe, overrides=["data.source=video_folder"])
    with pytest.raises(ValueError, match="video backbones"):
        load_recipe(RECIPES / "sd15_domain_lora.yaml", FinetuneRecipe, overrides=["data.source=video_webdataset"])
    r = load_recipe(RECIPES / "video_posttrain_lora.yaml", FinetuneRecipe, overrides=["data.source=video_webdataset"])
    assert r.data.source == "video_webdataset"


def test_a_video_model_trains_from_clip_shards(tmp_path, video_data):
    from safetensors.torch import load_file

    from tsm_core.data.video import write_clip_shards
    from tsm_core.finetune.cli import main

    write_clip_shards(video_data, tmp_path / "shards" / "clips", maxcount=2)
    pipe = build_video_pipeline(tmp_path / "video")
    run = tmp_path / "run"
    args = video_run_args("video_posttrain_lora.yaml", pipe, tmp_path / "shards" / "clips-{000000..000001}.tar", run,
                          "--set", "data.source=video_webdataset", "--set", "data.shuffle_buffer=0",
                          "--set", "stages.0.steps=2", "--set", "train.checkpoint_every=2")
    assert main(args) == 0
    trained = load_file(str(run / "adapter" / "tsm_adapter.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B." in k)  # the LoRA moved off zero


def video_run_args(recipe, pipe, data, run, *extra):
    return [str(RECIPES / recipe), "--run-dir", str(run), "--set", f"model.path={pipe}", "--set", f"data.path={data}",
            "--set", "data.resolution=16", "--set", "data.num_frames=4", "--set", "data.frame_stride=1",
            "--set", "train.batch_size=2", "--set", "train.mixed_precision=no", "--set", "train.gradient_checkpointing=false",
            "--set", "train.sample_steps=2", "--set", "train.sample_every=0", "--set", "train.keep_last=null",
            "--set", "train.sample_prompts=[\"a photo of a bag moving left\"]", *extra]


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    from tsm_core.data.video import moving_fmnist_clips

    return moving_fmnist_clips(tmp_path_factory.mktemp("clips"), n=4, num_frames=4, size=16)


def test_the_tsm_video_recipe_runs_stage_1_then_stage_2_on_a_tiny_3d_unet(tmp_path, video_data):
    from safetensors.torch import load_file

    from tsm_core.finetune.cli import main

    pipe = build_video_pipeline(tmp_path / "video")
    run = tmp_path / "run"
    steps = ["--set", "stages.0.steps=3", "--set", "stages.1.steps=3", "--set", "stages.2.steps=3",
             "--set", "train.checkpoint_every=3"]
    assert main(video_run_args("video_posttrain_tsm.yaml", pipe, video_data, run, *steps)) == 0

    def adapter(step):
        return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "adapter.safetensors"))

    s3, s6, s9 = adapter(3), adapter(6), adapter(9)

    def changed_experts(a, b):
        return {k.rsplit(".", 1)[-1] for k in a if ".lora_" in k and not torch.equal(a[k], b[k])}

    # stage 1: the scale-8 experts trained (their B left zero), then the scale-1 LoRA alone
    assert any(s3[k].abs().sum() > 0 for k in s3 if ".lora_B.s8_" in k)
    assert changed_experts(s3, s6) == {"s1_e0"}
    # stage 2: the router alone (created at assembling, zero-initialised, then trained); experts frozen
    routers = [k for k in s9 if k.endswith((".router_fc", ".router_emb"))]
    assert routers and not any(k in s6 for k in routers)
    assert all(torch.equal(s9[k], s6[k]) for k in s6)
    assert any(s9[k].abs().sum() > 0 for k in routers)
    # the temporal layers and the text encoder's out_proj carry experts too
    assert any(".temp_attentions." in k for k in s3)
    assert (run / "adapter_text_encoder0" / "tsm_adapter.safetensors").is_file()
    # sample videos: a strip per prompt in the grid and a GIF
    assert list((run / "images" / "samples").glob("*.png"))
    from PIL import Image

    with Image.open(run / "samples" / "final" / "00.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (16, 16)


def test_the_animatediff_backbone_trains_through_the_same_recipe(tmp_path, video_data):
    from tsm_core.finetune.cli import main

    pipe = build_video_pipeline(tmp_path / "video", kind="animatediff")
    run = tmp_path / "run"
    assert main(video_run_args("video_posttrain_lora.yaml", pipe, video_data, run, "--set", "model.kind=animatediff",
                               "--set", "stages.0.steps=2", "--set", "experts.target_modules=[to_k,to_v,proj_in]")) == 0
    from diffusers import UNetMotionModel

    from tsm_core import load_adapter

    tsm = load_adapter(UNetMotionModel.from_pretrained(str(pipe / "unet")), run / "adapter")
    assert any(".motion_modules." in n for n in tsm.layers)
    assert any(p.abs().sum() > 0 for k, p in tsm.state_dict().items() if "lora_B" in k)  # trained


def test_an_inflated_image_unet_draws_each_frame_as_the_image_model_until_trained(tmp_path):
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    from tsm_core.testing.tiny import tiny_unet_config
    from tsm_core.testing.tiny_video import inflate_unet2d

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**tiny_unet_config(sample_size=8)).eval()
    for p in unet2d.parameters():  # a trained-looking image model: no zero-initialised layer left
        torch.nn.init.normal_(p, std=0.05)
    inflated = inflate_unet2d(unet2d)
    inflated.save_pretrained(tmp_path / "unet3d")  # the saved model is the one the trainers load
    unet3d = UNet3DConditionModel.from_pretrained(tmp_path / "unet3d").eval()
    g = torch.Generator().manual_seed(1)
    frames, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([30, 800])
    with torch.no_grad():
        image = unet2d(frames, t, encoder_hidden_states=c).sample
        video = unet3d(frames[:, :, None].expand(-1, -1, FRAMES, -1, -1), t, encoder_hidden_states=c).sample
        for f in range(FRAMES):
            assert_close(video[:, :, f], image)
        # The temporal layers are there and trainable: a nonzero temporal output projection mixes frames.
        moving = torch.randn(2, 4, FRAMES, 8, 8, generator=g)
        before = unet3d(moving, t, encoder_hidden_states=c).sample
        torch.nn.init.normal_(unet3d.down_blocks[1].temp_attentions[0].proj_out.weight, std=0.5)
        after = unet3d(moving, t, encoder_hidden_states=c).sample
    assert not close(before, after)
    with pytest.raises(ValueError, match="cannot inflate block types"):
        inflate_unet2d(UNet2DConditionModel(**tiny_unet_config(sample_size=8, down_block_types=(
            "DownBlock2D", "AttnDownBlock2D"))))
