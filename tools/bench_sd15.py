#!/usr/bin/env python
"""Benchmark a full-size SD1.5 UNet training step: frozen base vs peft LoRA vs TSM (prints one JSON object).

The SD1.5 UNet is built from the shipped config-only folder (``tsm_distill/assets/configs/sd15/unet``)
with random weights, once; every candidate model is built on the meta device and takes *those* tensors
(``load_state_dict(assign=True)``), so all candidates share one set of base weights in memory. The
adapter is paper appendix A.3's: rank 64, alpha 8, the 14 target module types of the SD1.5 recipes.

Candidates (each a forward + backward through the activations; the input latent requires grad, so the
frozen base also runs its full backward):
  * ``base``: the UNet with nothing attached;
  * ``peft_lora``: one peft LoRA adapter (DMD2+LoRA's generator);
  * ``tsm_s1_shared``: TSM stage 1 (``expert`` mode at scale 4), the batch sharing one expert (DMD2's
    generator step): the merged-weight path when the library chooses it;
  * ``tsm_s1_mixed``: the same with one timestep per interval (gathered experts);
  * ``tsm_s2``: TSM stage 2 (``mixture``: core n = 4 + gated context n = 1, router trainable), shared t;
  * ``tsm_s2_cached``: the same with the frozen core's merge kept across steps
    (``set_merged_training(cache_core=True)``; one more copy of the targeted weights per core expert used);
  * ``*_unmerged``: the shared-expert candidates with the merged path turned off
    (``set_merged_training("never")``), i.e. the library's path before merged training existed;
  * ``floor_s1``: the frozen base's step plus only the work no exact stage-1 step can skip, the gradients
    of one rank-64 expert per targeted layer from that step's own activations (`LoraGradFloor`): no adapter
    forward, no grad_x term, nothing merged. Its **multiply-add count** (``--flops``) is the least any exact
    implementation does; its time is not a floor, because its skinny rank-64 products run as separate ops,
    below a GEMM's speed, where the library's merged path rides them in the base's GEMMs.

``--flops`` also counts each candidate's floating-point operations once (``torch.utils.flop_counter``:
matmuls, convolutions and attention, forward and backward; elementwise work is not counted) and reports
their ratios (``flop_ratios``), which do not depend on the machine or its load.

Timing is bench_core's: warm-up calls, then interleaved rounds with the starting candidate rotating, and
ratios of medians (plus the median and quartiles of per-round ratios), of wall time (``ratios``) and of
this process's CPU time (``cpu_ratios``: on a machine shared with other jobs the wall time also counts
the time slices given to them; with one thread, CPU time is the work of the step).

    python tools/bench_sd15.py                      # 32x32 latents, batch 2, 4 rounds: a few minutes here
    python tools/bench_sd15.py --size 64 --rounds 3 # the issue's 512 px setting (about 40 s per step here)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_core import compare, emit, interleaved, medians_ms  # noqa: E402

from tsm_core import TSMConfig, attach  # noqa: E402

UNET_CONFIG = ROOT / "tsm_distill" / "assets" / "configs" / "sd15" / "unet"
RANK, ALPHA = 64, 8  # paper appendix A.3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # recipes/sd15_*
SHARED_T, MIXED_T = 600, [100, 300, 600, 900]
TARGET_VS_BASE = {"tsm_s1_shared": 1.10, "floor_s1": 1.10, "tsm_s2": 1.15, "tsm_s2_cached": 1.15}  # issue 29's done-when targets


class LoraGradFloor:
    """The frozen base's step plus the gradients of one rank-r expert on every targeted layer, and nothing
    else: the least work an exact LoRA step does whatever its forward (merged or not).

    For y = W x + s B A x, with x and dL/dy given by the base step, the expert's gradients need
    z = A x and dL/dA = s (B^T dL/dy) x^T, dL/dB = s dL/dy z^T: 2 r (in k + out) multiply-adds per
    output position (k: kernel size). The other order, through the full dL/dW (out x in k per position),
    costs more at every SD1.5 layer at rank 64. A forward hook keeps each targeted layer's input, and a
    hook on its output does the gradient work in the backward, when dL/dy exists."""

    def __init__(self, model: torch.nn.Module, targets: list[str], rank: int, scaling: float, std: float = 1e-3,
                 dtype: torch.dtype = torch.float32):
        self.scaling, self.handles = scaling, []
        self.experts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer name -> (A, B)
        self.grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer name -> (dL/dA, dL/dB), as a step keeps them
        # Outputs that do not depend on the latent (cross-attention's to_k/to_v, time_emb_proj) have no
        # dL/dy in the base step; an expert there would give them one. Adding this zero scalar does, at
        # the cost of one pass over those small outputs.
        self.anchor = torch.zeros((), requires_grad=True)
        for name, mod in model.named_modules():
            if not any(name == t or name.endswith("." + t) for t in targets):
                continue
            if isinstance(mod, torch.nn.Conv2d):
                shape_a, shape_b = (rank, *mod.weight.shape[1:]), (mod.out_channels, rank)  # B: a 1x1 conv
            elif isinstance(mod, torch.nn.Linear):
                shape_a, shape_b = (rank, mod.in_features), (mod.out_features, rank)
            else:
                continue
            A, B = (torch.randn(shape, dtype=dtype) * std for shape in (shape_a, shape_b))  # non-zero: no skipped work
            self.experts[name] = (A, B)
            self.handles.append(mod.register_forward_hook(self._hook(name, mod, A, B)))

    def _hook(self, name, mod, A, B):
        def forward_hook(_mod, inputs, out):
            x = inputs[0].detach()
            if not out.requires_grad:
                out = out + self.anchor
            out.register_hook(lambda gy: self._grads(name, mod, x, gy, A, B))
            return out
        return forward_hook

    def _grads(self, name, mod, x, gy, A, B):
        s = self.scaling
        with torch.no_grad():
            if isinstance(mod, torch.nn.Conv2d):
                kw = {"stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation}
                z = F.conv2d(x, A, **kw)  # (b, r, h, w)
                gB = s * torch.einsum("bohw,brhw->or", gy, z)
                gz = s * torch.einsum("bohw,or->brhw", gy, B)
                gA = torch.nn.grad.conv2d_weight(x, A.shape, gz, **kw)
            else:
                xf, gf = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
                gB = (gf.t() @ (xf @ A.t())).mul_(s)  # scale the rank-r products, never a full-size tensor
                gA = (gf @ B).mul_(s).t() @ xf
        self.grads[name] = (gA, gB)
        return None


class SD15Work:
    """One set of random SD1.5 UNet weights and the inputs of a training step at ``size`` x ``size`` latents."""

    def __init__(self, size: int, batch: int, seed: int = 0):
        from diffusers import UNet2DConditionModel

        self.cls = UNet2DConditionModel
        self.config = UNet2DConditionModel.load_config(str(UNET_CONFIG))
        torch.manual_seed(seed)
        ref = UNet2DConditionModel.from_config(self.config)
        ref.requires_grad_(False)
        self.weights = ref.state_dict()  # shared by every candidate
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, 4, size, size, generator=g).requires_grad_(True)
        self.c = torch.randn(batch, 77, 768, generator=g)
        self.target = torch.randn(batch, 4, size, size, generator=g)
        self.t_shared = torch.full((batch,), SHARED_T)
        self.t_mixed = torch.tensor([MIXED_T[i % 4] for i in range(batch)])

    def base(self):
        with torch.device("meta"):
            m = self.cls.from_config(self.config)
        m.load_state_dict(self.weights, assign=True)  # the shared tensors, not copies
        m.requires_grad_(False)
        return m

    def peft(self):
        from peft import LoraConfig

        m = self.base()
        m.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=True))
        params = [p for n, p in m.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return m, params

    def tsm(self, mode: str):
        m = self.base()
        tsm = attach(m, TSMConfig(rank=RANK, alpha=ALPHA, scales=(1, 4), target_modules=TARGETS))
        if mode == "expert":
            tsm.set_mode("expert", scale=4)
        else:
            tsm.set_mode("mixture", core_scale=4, context_scales=(1,))
        with torch.no_grad():  # non-zero B, so no path can skip work on zero experts
            for p in tsm.adapter_parameters():
                if p.ndim == 2 and p.shape[1] == RANK:
                    p.normal_(std=1e-3)
        return m, tsm

    def step(self, m, params, t, tsm=None, merged: str | None = None):
        def run():
            for p in params:
                p.grad = None
            self.x.grad = None
            if merged is not None:
                tsm.set_merged_training(merged)
            with tsm.timesteps(t) if tsm is not None else contextlib.nullcontext():
                out = m(self.x, t, encoder_hidden_states=self.c).sample
                F.mse_loss(out, self.target).backward()  # inside the block: routing must outlive backward
        return run


def ratio_table(times: dict[str, list[float]], cands) -> dict:
    """Every TSM candidate against the frozen base and against peft; merged against unmerged."""
    ratios = {}
    for name in cands:
        if name in ("base", "peft_lora"):
            continue
        ratios[f"{name}_vs_base"] = compare(times, name, "base", TARGET_VS_BASE.get(name))
        ratios[f"{name}_vs_peft"] = compare(times, name, "peft_lora")
        if name.endswith("_unmerged") and name[:-len("_unmerged")] in cands:
            ratios[f"{name[:-len('_unmerged')]}_merged_vs_unmerged"] = compare(times, name[:-len("_unmerged")], name)
    if "floor_s1" in cands and "tsm_s1_shared" in cands:  # how far stage 1 is from what exactness allows
        ratios["tsm_s1_shared_vs_floor_s1"] = compare(times, "tsm_s1_shared", "floor_s1")
    ratios["peft_lora_vs_base"] = compare(times, "peft_lora", "base")
    return ratios


def count_flops(cands) -> dict[str, int]:
    """Each candidate's floating-point operations in one call (matmuls, convolutions, attention; forward and
    backward), counted by torch's FlopCounterMode: what a machine must do at the least, whatever its speed."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for name, run in cands.items():
        with FlopCounterMode(display=False) as counter:
            run()
        out[name] = int(counter.get_total_flops())
    return out


def flop_ratios(flops: dict[str, int]) -> dict[str, float]:
    """Every candidate's FLOPs against the frozen base's and peft's; stage 1 against the floor."""
    out = {f"{n}_vs_base": round(f / flops["base"], 4) for n, f in flops.items() if n != "base"}
    out.update({f"{n}_vs_peft": round(f / flops["peft_lora"], 4) for n, f in flops.items()
                if n not in ("base", "peft_lora")})
    if "floor_s1" in flops and "tsm_s1_shared" in flops:
        out["tsm_s1_shared_vs_floor_s1"] = round(flops["tsm_s1_shared"] / flops["floor_s1"], 4)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32, help="latent side (64 = 512 px, the issue's setting; default 32)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--rounds", type=int, default=4, help="timed interleaved rounds (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--skip", nargs="*", default=[], help="candidates to leave out (e.g. tsm_s1_mixed)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--flops", action="store_true", help="also count each candidate's FLOPs once (flop_ratios)")
    args = p.parse_args(argv)
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a multiple of 8 (three downsamplings), got {args.size}")
    if args.rounds < 2 or args.batch < 1 or args.threads < 1 or args.warmup < 0:
        p.error("--rounds >= 2, --batch >= 1, --threads >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import peft

    t0 = time.perf_counter()
    w = SD15Work(args.size, args.batch)
    optional = ["tsm_s1_shared", "tsm_s1_mixed", "tsm_s2", "tsm_s2_cached", "tsm_s1_shared_unmerged", "tsm_s2_unmerged",
                "floor_s1"]
    bad = sorted(set(args.skip) - set(optional))
    if bad:
        raise SystemExit(f"--skip: {bad} not among the optional candidates {optional}")
    want = [name for name in optional if name not in args.skip]
    # Models are built only for the candidates kept: at 64x64 each adapted copy, the cached core and one
    # step's activations add up (all seven candidates need about 19 GB).
    peft_m, peft_p = w.peft()
    cands = {"base": w.step(w.base(), [], w.t_shared), "peft_lora": w.step(peft_m, peft_p, w.t_shared)}
    s1 = s2 = None
    if any(name.startswith("tsm_s1") for name in want):
        s1_m, s1 = w.tsm("expert")
        s1_p = list(s1.trainable_parameters())
    if any(name in ("tsm_s2", "tsm_s2_unmerged") for name in want):
        s2_m, s2 = w.tsm("mixture")
        s2_p = list(s2.trainable_parameters())
    probe = s1 or s2
    has_merged = probe is None or hasattr(probe, "set_merged_training")  # absent before merged training existed
    on = "auto" if has_merged else None
    for name in want:
        if name == "tsm_s1_shared":
            cands[name] = w.step(s1_m, s1_p, w.t_shared, s1, on)
        elif name == "tsm_s1_mixed":
            cands[name] = w.step(s1_m, s1_p, w.t_mixed, s1, on)
        elif name == "tsm_s2":
            cands[name] = w.step(s2_m, s2_p, w.t_shared, s2, on)
        elif name == "tsm_s2_cached":
            # Its own adapter (on the shared base weights), set once: switching the setting drops the cache,
            # and the candidate is the warm cache of a run's later steps (the warm-up call builds it).
            s2c_m, s2c = w.tsm("mixture")
            if hasattr(next(iter(s2c.layers.values())), "cache_core"):  # absent before the cached core existed
                s2c.set_merged_training("auto", cache_core=True)
                cands[name] = w.step(s2c_m, list(s2c.trainable_parameters()), w.t_shared, s2c)
            s2 = s2 or s2c
        elif name == "floor_s1":
            floor_m = w.base()
            LoraGradFloor(floor_m, TARGETS, RANK, ALPHA / RANK)
            cands[name] = w.step(floor_m, [], w.t_shared)
        elif has_merged and name == "tsm_s1_shared_unmerged":
            cands[name] = w.step(s1_m, s1_p, w.t_shared, s1, "never")
        elif has_merged and name == "tsm_s2_unmerged":
            cands[name] = w.step(s2_m, s2_p, w.t_shared, s2, "never")
    setup_s = time.perf_counter() - t0
    flops = count_flops(cands) if args.flops else None
    cpu: dict[str, list[float]] = {}
    wall = interleaved(cands, args.rounds, args.warmup, cpu)
    result = {
        "ratios": ratio_table(wall, cands),
        "cpu_ratios": ratio_table(cpu, cands),  # CPU seconds of this process: what other jobs' load leaves out
        **({"flops": flops, "flop_ratios": flop_ratios(flops)} if flops else {}),
        "medians_ms": medians_ms(wall),
        "cpu_medians_ms": medians_ms(cpu),
        "settings": {"size": args.size, "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup,
                     "threads": torch.get_num_threads(), "rank": RANK, "alpha": ALPHA, "target_modules": TARGETS,
                     "scales": [1, 4], "timestep_shared": SHARED_T, "timesteps_mixed": w.t_mixed.tolist(),
                     "stage2": {"core_scale": 4, "context_scales": [1],
                                "router_input": None if s2 is None else s2.config.router_input},
                     "merged_training": "auto" if has_merged else "absent"},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "load_average": list(os.getloadavg()),
        "setup_s": round(setup_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
