"""Reliability round 2 (issue 28): a saved adapter that ``experts.init_from`` (or a loader) is pointed at is
checked for what it is and for its shape before anything trains, and a mistake is one clear error.

Case 3: ``init_from`` at a text file used to end in ``SafetensorError: header too large``. Case 15: ``init_from``
an adapter of another rank used to end in ``RuntimeError: The size of tensor a (4) must match ...``.
"""

import pytest
import torch

from tests.test_distill import phase, recipe
from tests.test_reliability import one_line_error, write_recipe
from tsm_core import TSMConfig, attach, load_adapter
from tsm_core.serialization import read_adapter_file
from tsm_core.testing import tiny
from tsm_distill import DMD2Trainer, cli
from tsm_distill import trainer as distill_trainer

TARGETS = ["to_q", "to_v", "conv1"]  # the targets of tests.test_distill.recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """tests.test_reliability's set-up: a tiny pixel-space teacher, prompts and real images."""
    d = tmp_path_factory.mktemp("reliability_adapters")
    pipe = tiny.build_sd_pipeline(d, with_vae=False)
    (d / "prompts.txt").write_text("a cat\na dog\na red cat\na big dog\n")
    torch.save(torch.rand(16, 3, 16, 16) * 2 - 1, d / "real.pt")
    return d, pipe


def saved_adapter(folder, unet_dir, rank=2, alpha=2, scales=(1,), targets=TARGETS, **unet):
    """Save a TSM adapter of a tiny pixel-space UNet (the distillation teacher's shape unless ``unet`` says)."""
    model = tiny.build_unet(unet_dir, in_channels=3, sample_size=16, **unet)
    tsm = attach(model, TSMConfig(rank=rank, alpha=alpha, scales=scales, target_modules=targets))
    with torch.no_grad():
        for p in tsm.adapter_parameters():
            p.normal_()
    tsm.set_mode("expert", scale=max(scales))
    tsm.save(folder)
    return folder


def no_teacher_load(monkeypatch):
    """Make loading the teacher fail loudly: the checks must run before any model loads."""
    def refuse(*a, **kw):
        raise AssertionError("the teacher was loaded before init_from was checked")

    monkeypatch.setattr(distill_trainer, "load_teacher", refuse)


def init_from_recipe(env, tmp_path, init_from, init_scales=(1,)):
    path = write_recipe(env, tmp_path / "r.yaml", [phase("e3", scale=4, experts=[3])])
    return [str(path), "--run-dir", str(tmp_path / "run"), "--set", f"experts.init_from={init_from}",
            "--set", f"experts.init_scales={list(init_scales)}"]


# ---------------------------------------------------------------------------- case 3: not an adapter
def test_init_from_a_text_file_is_one_line_error_before_the_teacher_loads(env, tmp_path, capsys, monkeypatch):
    """Case 3: a text file given as init_from says what it is and what was expected, exit 2, nothing trained."""
    text = tmp_path / "notes.txt"
    text.write_text("model: runs/sd15_dmd2_lora\nthis is not an adapter\n")
    no_teacher_load(monkeypatch)
    assert cli.main(init_from_recipe(env, tmp_path, text)) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: experts.init_from: ") and "notes.txt is not a TSM adapter" in err and "a text file" in err and "'model: runs/sd15_dmd2_lora'" in err
    assert "expected a TSM adapter" in err and "tsm_adapter.safetensors" in err
    assert "SafetensorError" not in err and not (tmp_path / "run" / "stats.jsonl").exists()


@pytest.mark.parametrize("what", ["missing", "empty folder", "run folder", "exported lora", "empty file"])
def test_every_loader_names_what_it_found_instead_of_an_adapter(env, tmp_path, what):
    """read_adapter_header, read_adapter_file and load_adapter share one check: what was found, what was expected."""
    from tsm_core.serialization import read_adapter_header

    good = saved_adapter(tmp_path / "run" / "adapter", tmp_path / "unet")
    if what == "missing":
        path, error, message = tmp_path / "nope", FileNotFoundError, "found nothing"
    elif what == "empty folder":
        (tmp_path / "empty").mkdir()
        path, error, message = tmp_path / "empty", FileNotFoundError, "found an empty folder"
    elif what == "run folder":
        path, error, message = tmp_path / "run", FileNotFoundError, f"final adapter is {good}"
    elif what == "exported lora":
        model = tiny.build_unet(tmp_path / "unet2", in_channels=3, sample_size=16)
        lora = load_adapter(model, good)
        path = lora.export_lora(tmp_path / "lora", scale=1, expert=0, prefix="unet")
        error, message = ValueError, r"not a TSM adapter \(metadata format='pt': an exported standard LoRA"
    else:
        path = tmp_path / "empty.safetensors"
        path.write_bytes(b"")
        error, message = ValueError, "it is an empty file"
    for load in (read_adapter_header, read_adapter_file,
                 lambda p: load_adapter(tiny.build_unet(tmp_path / "fresh", in_channels=3, sample_size=16), p)):
        with pytest.raises(error, match=message) as e:
            load(path)
        assert "expected a TSM adapter" in str(e.value)


# ---------------------------------------------------------------------------- case 15: another shape
def test_init_from_an_adapter_of_another_rank_is_one_line_error_naming_both(env, tmp_path, capsys, monkeypatch):
    """Case 15: the recipe's experts have rank 2; the saved adapter rank 4. Refused before the teacher loads,
    with both ranks named, instead of a RuntimeError about tensor sizes."""
    other = saved_adapter(tmp_path / "rank4", tmp_path / "unet", rank=4)
    no_teacher_load(monkeypatch)
    assert cli.main(init_from_recipe(env, tmp_path, other)) == 2
    err = one_line_error(capsys)
    assert "experts.init_from" in err and "does not fit" in err
    assert "rank 4 (saved) vs 2 (expected)" in err
    assert not (tmp_path / "run" / "stats.jsonl").exists()


@pytest.mark.parametrize("saved,init_scales,message", [
    ({"alpha": 8}, [1], r"alpha 8 \(saved\) vs 2 \(expected\)"),
    ({"targets": ["to_q"]}, [1], r"target_modules \['to_q'\] \(saved\) vs \['to_q', 'to_v', 'conv1'\]"),
    ({}, [4], r"scale\(s\) \[4\] asked for, but it holds only scales \[1\]"),
    ({"scales": (1, 2)}, [2], r"scale\(s\) \[2\] asked for, but the experts built are of scales \[1, 4\]"),
    ({}, [], "no scales to copy"),
], ids=["alpha", "targets", "scale not saved", "scale not built", "no scales"])
def test_init_from_shape_mismatches_are_refused_before_the_teacher_loads(env, tmp_path, monkeypatch, saved,
                                                                          init_scales, message):
    other = saved_adapter(tmp_path / "other", tmp_path / "unet", **saved)
    r = recipe(env, [phase("e3", scale=4, experts=[3])])
    r.experts.init_from, r.experts.init_scales = str(other), init_scales
    no_teacher_load(monkeypatch)
    with pytest.raises(ValueError, match=message):
        DMD2Trainer(r, tmp_path / "run")


def test_init_from_another_teachers_adapter_names_both_tensor_shapes(env, tmp_path):
    """Same settings, a teacher of other widths: found once the teacher loads, still before any step."""
    other = saved_adapter(tmp_path / "wide", tmp_path / "unet", block_out_channels=(16, 32))
    r = recipe(env, [phase("e3", scale=4, experts=[3])])
    r.experts.init_from, r.experts.init_scales = str(other), [1]
    with pytest.raises(ValueError, match=r"lora_[AB]\.s1_e0: saved \(\d+, \d+.*\), this generator's \(\d+, \d+"):
        DMD2Trainer(r, tmp_path / "run")
    assert not (tmp_path / "run" / "stats.jsonl").exists()


def test_a_fitting_init_from_copies_exactly_its_scales(env, tmp_path):
    good = saved_adapter(tmp_path / "lora", tmp_path / "unet", scales=(1,))
    r = recipe(env, [phase("e3", scale=4, experts=[3])])
    r.experts.init_from, r.experts.init_scales = str(good), [1]
    tr = DMD2Trainer(r, tmp_path / "run")
    saved, _ = read_adapter_file(good)
    own = tr.tsm.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())
    assert not any(torch.equal(own[k], own[k].new_zeros(own[k].shape)) for k in own if ".lora_A.s4" in k)


def test_check_adapter_fits_compares_only_the_keys_asked(tmp_path):
    """The early check leaves T out (it is the teacher's, known once it loads); the full check compares it."""
    from tsm_core.serialization import check_adapter_fits

    good = saved_adapter(tmp_path / "a", tmp_path / "unet")
    other_t = TSMConfig(rank=2, alpha=2, scales=(1, 4), target_modules=TARGETS, num_timesteps=500)
    with pytest.raises(ValueError, match=r"num_timesteps 1000 \(saved\) vs 500 \(expected\)"):
        check_adapter_fits(good, other_t, scales=[1])
    header = check_adapter_fits(good, other_t, scales=[1], keys=("rank", "alpha", "target_modules"))
    assert header.config.rank == 2 and header.mode == "expert" and header.mode_args["scale"] == 1
