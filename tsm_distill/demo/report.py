"""Outputs of ``tsm-demo``: results.json / results.md, the sample grid and the gate-vs-timestep plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

COLUMNS = ("row", "steps", "fid", "kid_mean", "kid_std", "n", "generator_steps", "source")


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of the result rows (FID, KID x 1e3, N, budget, where the number came from)."""
    fidelity = any("fid_teacher" in r for r in rows)
    lines = ["| row | steps | FID | KID x1e3 (+- std) | N | generator steps | source |"
             + (" FID / KID x1e3 vs teacher 50 |" if fidelity else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if fidelity else "")]
    for r in rows:
        budget = r.get("generator_steps")
        budget = "" if budget is None else (f"{budget}" if not isinstance(budget, dict)
                                            else " + ".join(f"{v} {k}" for k, v in budget.items()))
        extra = (f" {r['fid_teacher']:.2f} / {1e3 * r['kid_teacher']:.2f} |" if "fid_teacher" in r else " |") \
            if fidelity else ""
        lines.append(f"| {r['row']} | {r.get('steps', '')} | {r['fid']:.2f} | {1e3 * r['kid_mean']:.2f} "
                     f"(+- {1e3 * r['kid_std']:.2f}) | {r['n']} | {budget} | {r.get('source', '')} |{extra}")
    return "\n".join(lines)


def _protocol_line(meta: dict) -> str:
    """'Seed 3; protocol: equal compute (...)' above the table; empty for results without the fields."""
    parts = []
    if "seed" in meta:
        parts.append(f"Seed {meta['seed']}")
    if "protocol" in meta:
        proto = meta["protocol"]
        parts.append(f"protocol: {proto['label']} (LoRA batch x{proto['lora_batch_multiplier']} of TSM's)")
    return "; ".join(parts) + ".\n\n" if parts else ""


def budget_definition(meta: dict) -> str:
    """results.md's budget paragraph: the run's own, except for the A.3-proportional protocol, whose
    seeds run before December 2026 recorded the equal-budget wording that does not apply to them."""
    from .protocol import A3P_BUDGET_DEFINITION

    if meta.get("protocol", {}).get("name") == "a3p":
        return A3P_BUDGET_DEFINITION
    return meta.get("budget_definition", "")


def write_results(run_dir: str | Path, rows: Sequence[dict], meta: dict) -> tuple[Path, Path]:
    """Write results.json (rows + meta) and results.md (the table + the settings) into ``run_dir``."""
    run_dir = Path(run_dir)
    js = run_dir / "results.json"
    js.write_text(json.dumps({"rows": list(rows), **meta}, indent=2) + "\n")
    md = run_dir / "results.md"
    seconds = "\n".join(f"- {k}: {v:.1f} s" for k, v in meta.get("seconds", {}).items())
    notes = "\n".join(f"- {n}" for n in meta.get("notes", []))
    md.write_text(f"# tsm-demo results ({meta.get('mode', '')})\n\n{_protocol_line(meta)}{format_table(rows)}\n\n"
                  f"## Budget\n\n{budget_definition(meta)}\n\n```\n{json.dumps(meta.get('budget', {}), indent=2)}\n```\n\n"
                  f"## Seconds per stage\n\n{seconds}\n\n## Notes\n\n{notes}\n\n"
                  f"Command: `{meta.get('command', '')}`\n")
    return js, md


def save_sample_grid(images_by_row: dict[str, torch.Tensor], path: str | Path) -> Path:
    """One grid row per model (same prompts and seeds in every row), labelled in a side column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    names = list(images_by_row)
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 1.2 * len(names) + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        imgs = images_by_row[name].float().clamp(-1, 1).add(1).div(2)
        grid = make_grid(imgs, nrow=len(imgs), padding=1, pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.98, bottom=0.02, hspace=0.15)  # room for the row labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def gate_curves(teacher, tsm, timesteps: Sequence[int], n_images: int = 8, seed: int = 0) -> dict[str, dict[int, list[float]]]:
    """Mean router gate per layer and context expert at each timestep, on noised real images.

    The adapter must be in mixture mode. Returns {layer: {t: [gate per context expert]}}.
    """
    from tsm_core.data.fmnist import load_fashion_mnist, prompt_for, to_model_space

    images, labels = load_fashion_mnist("test")
    from ..teacher import encode

    x0 = to_model_space(images[:n_images]).to(teacher.device)
    cond = encode(teacher, [prompt_for(int(c)) for c in labels[:n_images]])
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    curves: dict[str, dict[int, list[float]]] = {}
    for t in timesteps:
        tt = torch.full((n_images,), int(t), device=x0.device, dtype=torch.long)
        x_t = teacher.add_noise(x0, noise, tt)
        with tsm.timesteps(tt), tsm.record_gates() as logs:
            teacher.predict(x_t, tt, cond)
        for layer, recs in logs.items():
            if recs:
                g = torch.cat([gate for _, gate in recs]).mean(0)
                curves.setdefault(layer, {})[int(t)] = [float(v) for v in g.reshape(-1)]
    return curves


def save_gate_plot(curves: dict[str, dict[int, list[float]]], student_timesteps: Sequence[int], path: str | Path,
                   max_layers: int = 6) -> Path:
    """Plot gate(t) for a few layers (spread over the UNet) plus the mean over all layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("no gates were recorded: is the adapter in mixture mode with a context scale?")
    layers = list(curves)
    pick = [layers[round(i * (len(layers) - 1) / max(1, max_layers - 1))] for i in range(min(max_layers, len(layers)))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ts = sorted(next(iter(curves.values())))
    for name in dict.fromkeys(pick):
        ax.plot(ts, [curves[name][t][0] for t in ts], marker=".", lw=1, label=name)
    mean = [sum(curves[n][t][0] for n in layers) / len(layers) for t in ts]
    ax.plot(ts, mean, color="black", lw=2.5, label=f"mean over {len(layers)} layers")
    for t in student_timesteps:
        ax.axvline(t, color="grey", ls=":", lw=1)
    ax.set_xlabel("timestep t (dotted: the student's steps, the only ones the router trained on)")
    ax.set_ylabel("gate of the n = 1 context expert (LoRA)")
    ax.set_title("TSM router: gate vs timestep")
    ax.legend(fontsize=6, loc="best")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out ``fig``, write it to ``path`` (folders made) at 100 dpi, close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
