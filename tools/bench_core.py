#!/usr/bin/env python
"""Benchmark the tsm_core expert layers against peft LoRA and the base model (prints one JSON object).

Every ratio is measured side by side in one run: the candidates of a group are warmed up, then
called in interleaved rounds (the starting candidate rotates each round, so each one takes every
position equally often), and each candidate's median over the rounds is compared. The per-round
ratio's median and spread are reported too, because they cancel slow drifts in machine load.

Groups (targets from issue 2):
  * stage-1 training step (forward + backward), TSM ``expert`` mode at scale 4 vs one peft LoRA of
    the same rank: a mixed batch routed over 4 experts (target <= 1.05) and a batch sharing one
    interval (DMD2's case, the fast path);
  * stage-2 forward (``mixture``: core n=4 + gated context n=1) vs peft LoRA unmerged (<= 1.15);
  * merged TSM forward (``tsm.merged(t)``) vs the base model without any wrapper (<= 1.03);
  * the same three on one SD1.5-sized attention projection: Linear 320->320 over 4096 tokens, batch 2.

The tiny UNet is the test fixture's (tests/tiny.py), batch 8 at 16x16, experts on
to_q/to_k/to_v/to_out.0 at rank 4. Prototypes of other layer forwards (``PROTOTYPES``: a "fused" forward that scales and gates the rank-r intermediate and folds the add into
addmm/baddbmm) are checked against the library's outputs and gradients, then timed in the same
rounds to show what a change to tsm_core/layers.py would buy (``--no-proto`` skips them).

Run: ``python tools/bench_core.py`` (a few minutes), ``--quick`` (about a minute). One thread by
default because the machine is shared: the ratios matter, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tsm_core import TSMConfig, attach  # noqa: E402
from tsm_core.layers import expert_key  # noqa: E402
from tsm_core.testing import tiny  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 4
MIXED_T = [100, 300, 600, 900]  # one timestep in each of the 4 intervals of scale 4
SHARED_T = 600
TARGET_RATIO = {"stage1": 1.05, "stage2": 1.15, "merged": 1.03}


# ---------------------------------------------------------------------------- timing
def interleaved(cands: dict[str, Callable[[], object]], rounds: int, warmup: int,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Time each candidate once per round, rotating the order each round; returns seconds per call.

    ``cpu``, when given, is filled with each call's CPU seconds of this process as well: on a machine
    shared with other jobs, wall time counts the time the scheduler gave to them, CPU time does not."""
    names = list(cands)
    for _ in range(warmup):
        for n in names:
            cands[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu is not None:
        cpu.update({n: [] for n in names})
    gc.collect()
    gc.disable()  # a collection inside one candidate's call would bias that candidate
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                t0, c0 = time.perf_counter(), time.process_time()
                cands[n]()
                times[n].append(time.perf_counter() - t0)
                if cpu is not None:
                    cpu[n].append(time.process_time() - c0)
    finally:
        gc.enable()
    return times


def compare(times: dict[str, list[float]], num: str, den: str, target: float | None = None) -> dict:
    """Ratio of medians num/den, plus the median and quartiles of the per-round ratios."""
    a, b = times[num], times[den]
    paired = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(paired, n=4) if len(paired) >= 4 else [paired[0], paired[-1], paired[-1]]
    out = {
        "ratio": round(statistics.median(a) / statistics.median(b), 4),
        "paired_median": round(statistics.median(paired), 4),
        "paired_iqr": [round(q[0], 4), round(q[2], 4)],
        "num": num,
        "den": den,
    }
    if target is not None:
        out["target"] = target
        out["meets_target"] = out["ratio"] <= target
    return out


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {n: round(1000 * statistics.median(v), 3) for n, v in times.items()}


# ---------------------------------------------------------------------------- prototypes
# Alternative Linear forwards for TSMLayer, installed per instance
# on a separate model copy so the library code stays untouched. Each computes the same value.
def _fused_forward(self, x, *args, **kwargs):
    """Scale and gate the rank-r intermediate, and fuse the LoRA add into one addmm / baddbmm.

    peft and the library both apply ``* scaling``, the gate and ``out + delta`` to full (tokens, out)
    tensors: memory-bound passes that cost as much as a small matmul. Here those multiply a
    (tokens, r) tensor instead, the experts' and router's input matrices are concatenated into one
    matmul, and the final add rides in the B matmul (``beta=1``): one full-size pass per layer.
    Handles Linear in expert mode (shared or mixed batch) and mixture mode with shared timesteps;
    everything else falls back to the library's forward.
    """
    lib = type(self).forward
    if (self.kind != "linear" or self.mode not in ("expert", "mixture") or self.merged or args or kwargs
            or not isinstance(self.dropout, nn.Identity) or self.gate_log is not None):
        return lib(self, x, *args, **kwargs)
    state = self.context.current(self.name) if self._needs_context() else self.context.peek()
    if state is not None and state.batch not in (1, x.shape[0]):
        return lib(self, x, *args, **kwargs)  # the library raises the helpful error
    W, b = self.base_layer.weight, self.base_layer.bias
    lead = x.shape[:-1]

    def shared(scale):
        return 0 if scale == 1 else state.shared[scale]

    if self.mode == "expert":
        s = self.active_scale
        k = shared(s)
        if k is None:  # mixed batch: gathered experts, bmm, add fused into baddbmm
            A, B = self._expert_weights(s, state.index[s])
            xb = x.reshape(x.shape[0], -1, self.in_features)
            z = torch.bmm(xb, A.transpose(1, 2)) * self.scaling  # (B, tokens, r)
            y = torch.baddbmm(F.linear(xb, W, b), z, B.transpose(1, 2))
            return y.reshape(*lead, self.out_features)
        A, B = self.lora_A[expert_key(s, k)], self.lora_B[expert_key(s, k)]
        x2 = x.reshape(-1, self.in_features)
        z = F.linear(x2, A) * self.scaling  # (tokens, r)
        return torch.addmm(F.linear(x2, W, b), z, B.t()).reshape(*lead, self.out_features)
    scales = ([self.core_scale] if self.core_scale is not None else []) + list(self.gated_scales)
    ks = [shared(s) for s in scales]
    if any(k is None for k in ks):
        return lib(self, x)
    As = [self.lora_A[expert_key(s, k)] for s, k in zip(scales, ks)]
    Bs = [self.lora_B[expert_key(s, k)] for s, k in zip(scales, ks)]
    r, m = As[0].shape[0], len(scales)
    rows = As + ([self.router_fc] if self.router_fc is not None else [])
    x2 = x.reshape(-1, self.in_features)
    z = F.linear(x2, torch.cat(rows))  # (tokens, m*r [+ gates]): one pass over x
    g = z[:, m * r:] if self.router_fc is not None else None
    if self.router_emb is not None:
        e = self.router_emb[state.router_rows[:1].to(x.device)]  # (1, gates): timesteps are shared
        g = e if g is None else g + e
    if self.router_activation == "sigmoid":
        g = torch.sigmoid(g)
    elif self.router_activation == "softmax":
        g = torch.softmax(g, dim=-1)
    first = 1 if self.core_scale is not None else 0
    parts = [z[:, :r]] if first else []
    for j in range(len(self.gated_scales)):
        parts.append(z[:, (first + j) * r:(first + j + 1) * r] * g[:, j:j + 1])
    zz = torch.cat(parts, dim=1) * self.scaling  # (tokens, m*r)
    return torch.addmm(F.linear(x2, W, b), zz, torch.cat(Bs, dim=1).t()).reshape(*lead, self.out_features)


PROTOTYPES = {"fused": ("forward", _fused_forward)}


def check_prototypes() -> None:
    """Each prototype must give the library's outputs and gradients (perturbed experts and router)."""
    torch.manual_seed(0)
    base = Projection(16)
    x0 = torch.randn(4, 5, 16)
    for mode, t in (("expert", torch.tensor([100, 300, 600, 900])), ("expert", torch.full((4,), 600)),
                    ("mixture", torch.full((4,), 600))):
        ref_m, ref = tsm_projection(base, mode)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in ref.layers.values():
                for p in [*layer.lora_B.values(), layer.router_fc, layer.router_emb]:
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = x0.clone().requires_grad_(True)
        with ref.timesteps(t):
            want = ref_m(x)
            want.square().sum().backward()
        want_grad = x.grad
        for name, (attr, fn) in PROTOTYPES.items():
            m, tsm = tsm_projection(base, mode)
            tsm.load_state_dict(ref.state_dict())
            install(tsm, attr, fn)
            x = x0.clone().requires_grad_(True)
            with tsm.timesteps(t):
                got = m(x)
                got.square().sum().backward()
            if not (torch.allclose(got, want, atol=1e-5) and torch.allclose(x.grad, want_grad, atol=1e-4)):
                raise RuntimeError(f"prototype {name!r} disagrees with the library in mode {mode} for t={t.tolist()}")


def install(tsm, attr: str, fn) -> None:
    """Replace ``attr`` (a TSMLayer method) on every layer instance of this adapter only."""
    for layer in tsm.layers.values():
        object.__setattr__(layer, attr, types.MethodType(fn, layer))


def prototype_params(tsm, name: str, scale: int) -> list[nn.Parameter]:
    return list(tsm.trainable_parameters())


# ---------------------------------------------------------------------------- models
class Projection(nn.Module):
    """One SD1.5 attention projection (320 -> 320), named like diffusers' to_q."""

    def __init__(self, dim: int = 320):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)

    def forward(self, x):
        return self.to_q(x)


def peft_projection(base: nn.Module):
    from peft import LoraConfig, inject_adapter_in_model

    m = Projection(base.to_q.in_features)
    m.load_state_dict(base.state_dict())
    m.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q"]), m)
    return m, _lora_params(m)


def tsm_projection(base: nn.Module, mode: str):
    m = Projection(base.to_q.in_features)
    m.load_state_dict(base.state_dict())
    tsm = attach(m, TSMConfig(rank=RANK, alpha=RANK, scales=(1, 4), target_modules=["to_q"]))
    tsm.set_mode("expert", scale=4) if mode == "expert" else tsm.set_mode("mixture")
    return m, tsm


# ---------------------------------------------------------------------------- workloads
class UNetWork:
    """The test-fixture tiny UNet at 16x16: builds model copies and their step functions."""

    def __init__(self, folder: Path, batch: int):
        self.folder = folder
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 4, 16, 16, generator=g)
        self.c = torch.randn(batch, 6, 32, generator=g)
        self.target = torch.randn(batch, 4, 16, 16, generator=g)
        self.t_mixed = torch.tensor([MIXED_T[i % 4] for i in range(batch)])
        self.t_shared = torch.full((batch,), SHARED_T)

    def base(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(self.folder))

    def peft(self):
        from peft import LoraConfig

        m = self.base()
        m.requires_grad_(False)
        m.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True))
        return m, _lora_params(m)

    def tsm(self, mode: str):
        m = self.base()
        tsm = attach(m, TSMConfig(rank=RANK, alpha=RANK, scales=(1, 4), target_modules=TARGETS))
        tsm.set_mode("expert", scale=4) if mode == "expert" else tsm.set_mode("mixture")
        return m, tsm

    def train_step(self, m, params, t, tsm=None):
        def step():
            _clear(params)
            with tsm.timesteps(t) if tsm is not None else contextlib.nullcontext():
                out = m(self.x, t, encoder_hidden_states=self.c).sample
                F.mse_loss(out, self.target).backward()  # inside the block: routing must outlive backward
        return step

    def forward(self, m, t, tsm=None):
        @torch.no_grad()
        def fwd():
            with tsm.timesteps(t) if tsm is not None else contextlib.nullcontext():
                return m(self.x, t, encoder_hidden_states=self.c).sample
        return fwd


class ProjectionWork:
    """One SD1.5 attention projection, Linear 320->320 over 4096 tokens at batch 2."""

    def __init__(self, dim: int = 320, tokens: int = 4096, batch: int = 2):
        torch.manual_seed(0)
        self.ref = Projection(dim)
        self.ref.requires_grad_(False)
        self.x = torch.randn(batch, tokens, dim, requires_grad=True)  # inside a network dL/dx is needed
        self.gout = torch.randn(batch, tokens, dim)
        self.t_mixed = torch.tensor([MIXED_T[i % 4] for i in range(batch)])  # batch 2: two experts
        self.t_shared = torch.full((batch,), SHARED_T)

    def base(self):
        m = Projection(self.ref.to_q.in_features)
        m.load_state_dict(self.ref.state_dict())
        return m

    def peft(self):
        return peft_projection(self.ref)

    def tsm(self, mode: str):
        return tsm_projection(self.ref, mode)

    def train_step(self, m, params, t, tsm=None):
        def step():
            _clear(params)
            self.x.grad = None
            with tsm.timesteps(t) if tsm is not None else contextlib.nullcontext():
                m(self.x).backward(self.gout)
        return step

    def forward(self, m, t, tsm=None):
        xi = self.x.detach()

        @torch.no_grad()
        def fwd():
            with tsm.timesteps(t) if tsm is not None else contextlib.nullcontext():
                return m(xi)
        return fwd


def _lora_params(m: nn.Module) -> list[nn.Parameter]:
    params = [p for n, p in m.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _clear(params) -> None:
    for p in params:
        p.grad = None


def run_workload(w, rounds: int, warmup: int, proto: bool) -> dict:
    """Stage-1 training group, then the inference group (stage 2, merged, base), then merge cost."""
    # One model copy per candidate, identical weights; B = 0 everywhere (timing ignores values).
    peft_m, peft_p = w.peft()
    tsm_m, tsm = w.tsm("expert")
    tsm_p = list(tsm.trainable_parameters())
    train = {
        "peft_lora": w.train_step(peft_m, peft_p, w.t_mixed),
        "tsm_mixed": w.train_step(tsm_m, tsm_p, w.t_mixed, tsm),
        "tsm_shared": w.train_step(tsm_m, tsm_p, w.t_shared, tsm),
    }
    protos = {}
    if proto:
        for name, (attr, fn) in PROTOTYPES.items():
            pm, pt = w.tsm("expert")
            install(pt, attr, fn)
            params = prototype_params(pt, name, 4)
            train[f"proto_{name}_mixed"] = w.train_step(pm, params, w.t_mixed, pt)
            if name == "fused":
                train["proto_fused_shared"] = w.train_step(pm, params, w.t_shared, pt)
        fm, ft = w.tsm("mixture")
        install(ft, *PROTOTYPES["fused"])
        protos["fused"] = (fm, ft)
    t_train = interleaved(train, rounds, warmup)
    del train

    base_m = w.base()
    mix_m, mix = w.tsm("mixture")
    mrg_m, mrg = w.tsm("mixture")
    for m in (peft_m, base_m, mix_m, mrg_m, *[v[0] for v in protos.values()]):
        m.eval()
    with mrg.merged(SHARED_T):  # merged once, outside the timed calls: a sampler fuses once per step
        fwd = {
            "peft_lora": w.forward(peft_m, w.t_shared),
            "tsm_mixture_shared": w.forward(mix_m, w.t_shared, mix),
            "tsm_mixture_mixed": w.forward(mix_m, w.t_mixed, mix),
            "base": w.forward(base_m, w.t_shared),
            "tsm_merged": w.forward(mrg_m, w.t_shared),
        }
        if "fused" in protos:
            fm, ft = protos["fused"]
            fwd["proto_fused_mixture_shared"] = w.forward(fm, w.t_shared, ft)
        t_fwd = interleaved(fwd, rounds, warmup)

    def merge_cycle():
        with mrg.merged(SHARED_T):
            pass
    t_merge = interleaved({"merge_unmerge": merge_cycle}, max(2, rounds // 4), 1)

    r = {
        "stage1_train_mixed_vs_peft": compare(t_train, "tsm_mixed", "peft_lora", TARGET_RATIO["stage1"]),
        "stage1_train_shared_vs_peft": compare(t_train, "tsm_shared", "peft_lora", TARGET_RATIO["stage1"]),
        "stage2_forward_shared_vs_peft": compare(t_fwd, "tsm_mixture_shared", "peft_lora", TARGET_RATIO["stage2"]),
        "stage2_forward_mixed_vs_peft": compare(t_fwd, "tsm_mixture_mixed", "peft_lora", TARGET_RATIO["stage2"]),
        "merged_forward_vs_base": compare(t_fwd, "tsm_merged", "base", TARGET_RATIO["merged"]),
        "peft_forward_vs_base": compare(t_fwd, "peft_lora", "base"),
    }
    if proto:
        r["proto_fused_train_mixed_vs_peft"] = compare(t_train, "proto_fused_mixed", "peft_lora")
        r["proto_fused_train_shared_vs_peft"] = compare(t_train, "proto_fused_shared", "peft_lora")
        r["proto_fused_stage2_forward_shared_vs_peft"] = compare(t_fwd, "proto_fused_mixture_shared", "peft_lora")
    return {
        "ratios": r,
        "medians_ms": {"train": medians_ms(t_train), "forward": medians_ms(t_fwd),
                       "merge_unmerge": medians_ms(t_merge)["merge_unmerge"]},
        "timesteps_mixed": w.t_mixed.tolist(),
    }


# ---------------------------------------------------------------------------- entry point
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds: about a minute")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per group (default 120, quick 40)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate first (default 5, quick 2)")
    p.add_argument("--batch", type=int, default=8, help="tiny-UNet batch size (default 8)")
    p.add_argument("--proto", action=argparse.BooleanOptionalAction, default=True,
                   help="also time prototype mixed-batch routings (default on)")
    p.add_argument("--only", choices=("unet", "projection"), default=None, help="run one of the two benchmarks")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 2:
        p.error(f"--rounds must be >= 2, got {args.rounds}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (40 if args.quick else 120)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    import diffusers
    import peft

    result: dict = {
        "settings": {
            "mode": "quick" if args.quick else "default", "threads": args.threads, "rounds": rounds,
            "warmup": warmup, "rank": RANK, "alpha": RANK, "scales": [1, 4], "target_modules": TARGETS,
            "unet": {"config": "tests/tiny.py tiny_unet_config()", "batch": args.batch, "size": 16},
            "projection": {"dim": 320, "tokens": 4096, "batch": 2},
            "timesteps_mixed": [MIXED_T[i % 4] for i in range(args.batch)], "timestep_shared": SHARED_T,
        },
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "threads": torch.get_num_threads(),
    }
    if args.proto:
        check_prototypes()  # a prototype is only worth timing if it computes the library's values
    t0 = time.perf_counter()
    if args.only in (None, "unet"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "unet"
            tiny.build_unet(folder)
            result["tiny_unet"] = run_workload(UNetWork(folder, args.batch), rounds, warmup, args.proto)
    if args.only in (None, "projection"):
        result["sd15_projection"] = run_workload(ProjectionWork(), rounds, warmup, args.proto)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return emit(result, args.json)


def emit(result: dict, path: Path | None) -> dict:
    """Print the result as JSON, and write it to ``path`` too when one is given."""
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
