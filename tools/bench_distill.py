"""Benchmark: one DMD2 iteration (generator + critic) with TSM experts vs with a vanilla LoRA.

Both trainers run the same teacher, rank, batch and student step; the TSM generator routes through
scale-4 experts, the LoRA generator through one scale-1 expert. Times are interleaved (ABAB...) in one
process and the median ratio printed; peak memory is measured per candidate in a fresh subprocess
(CUDA: ``max_memory_allocated``; CPU: the iteration's peak RSS growth over the set-up).

    python tools/bench_distill.py [--quick] [--teacher PIPELINE_DIR] [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_trainer(kind: str, teacher: str, prompts: Path, run_dir: Path, batch: int, rank: int):
    from tsm_core.train.recipe import load_recipe
    from tsm_distill import DistillRecipe, DMD2Trainer

    scales, phase = ([1], {"scale": 1}) if kind == "lora" else ([1, 4], {"scale": 4, "experts": [1]})
    recipe = load_recipe({
        "model": {"path": teacher},
        "experts": {"rank": rank, "alpha": rank, "scales": scales,
                    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]},
        "data": {"prompts": str(prompts)},
        "train": {"sample_every": 0, "checkpoint_every": 10**9, "log_every": 10**9},
        # student step 2 (t = 499) for both: the same rollout length; expert 1 of scale 4 owns t = 499
        "phases": [{"name": "bench", "steps": 10**6, "batch_size": batch, "student_steps": [2],
                    "fake_updates_per_generator_update": 1, **phase}],
    }, DistillRecipe)
    tr = DMD2Trainer(recipe, run_dir)
    tr.enter_phase(0)
    return tr


def setup(args):
    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    teacher = args.teacher
    if teacher is None:
        from tsm_core.testing import tiny

        teacher = str(tiny.build_sd_pipeline(work / "teacher", with_vae=False))
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na dog on the grass\na bowl of fruit\n")
    return work, teacher, prompts


def memory_child(args) -> None:
    """Run in a subprocess: peak memory of iterations of one candidate, printed as JSON."""
    torch.set_num_threads(args.threads)
    work, teacher, prompts = setup(args)
    tr = make_trainer(args.memory_child, teacher, prompts, work / "run", args.batch, args.rank)
    cuda = torch.cuda.is_available()
    tr.train_step()  # warm-up: allocator pools, lazy inits
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Tensors autograd keeps for backward (activation memory), counted once per storage: on the CPU
    # the allocator has no peak counter, so this plus the trained state is the comparable quantity.
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(args.mem_iters):
            tr.train_step()
    adapter = sum(p.numel() * p.element_size() for p in tr.tsm.adapter_parameters())
    optim = sum(v.numel() * v.element_size() for st in tr.gen_opt.state.values() for v in st.values()
                if torch.is_tensor(v))
    if cuda:
        torch.cuda.synchronize()
        peak, total = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
    else:
        total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = total - base
    print(json.dumps({"iteration_peak_bytes": peak, "process_peak_bytes": total, "device": "cuda" if cuda else "cpu",
                      "saved_activation_bytes": sum(saved.values()), "adapter_bytes": adapter,
                      "generator_optimizer_bytes": optim}))


def _state_bytes(m: dict) -> int:
    return m["saved_activation_bytes"] + m["adapter_bytes"] + m["generator_optimizer_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (about a minute on the tiny teacher)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--teacher", default=None, help="pipeline folder (default: a tiny pixel-space test teacher)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mem-iters", type=int, default=3)
    p.add_argument("--memory-child", choices=["lora", "tsm"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (8 if args.quick else 30)
    work, teacher, prompts = setup(args)
    trainers = {k: make_trainer(k, teacher, prompts, work / k, args.batch, args.rank) for k in ("lora", "tsm")}
    for tr in trainers.values():
        tr.train_step()  # warm-up
    times = {k: [] for k in trainers}
    for r in range(rounds):
        order = ("lora", "tsm") if r % 2 == 0 else ("tsm", "lora")
        for k in order:
            t0 = time.perf_counter()
            trainers[k].train_step()
            times[k].append(time.perf_counter() - t0)
    per_round = [t / lo for t, lo in zip(times["tsm"], times["lora"])]
    mem = {}
    for k in ("lora", "tsm"):
        cmd = [sys.executable, __file__, "--memory-child", k, "--batch", str(args.batch), "--rank", str(args.rank),
               "--threads", str(args.threads), "--mem-iters", str(args.mem_iters)]
        if args.teacher:
            cmd += ["--teacher", args.teacher]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
        mem[k] = json.loads(out.strip().splitlines()[-1])
    result = {
        "time_ratio_tsm_over_lora": statistics.median(times["tsm"]) / statistics.median(times["lora"]),
        "time_ratio_per_round_median": statistics.median(per_round),
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        # None where the iterations did not grow the process's peak (the CPU case with tiny models)
        "iteration_peak_memory_ratio": (mem["tsm"]["iteration_peak_bytes"] / mem["lora"]["iteration_peak_bytes"]
                                        if mem["lora"]["iteration_peak_bytes"] > 0 else None),
        "process_peak_memory_ratio": mem["tsm"]["process_peak_bytes"] / mem["lora"]["process_peak_bytes"],
        "activation_plus_trained_state_ratio": _state_bytes(mem["tsm"]) / _state_bytes(mem["lora"]),
        "memory": mem,
        "targets": {"time_ratio": 1.05, "memory_ratio": 1.05},
        "settings": {"rounds": rounds, "batch": args.batch, "rank": args.rank, "threads": args.threads,
                     "teacher": args.teacher or "tiny pixel-space test pipeline", "torch": torch.__version__},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
