"""Fully sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): a trainer's large modules split
over the processes.

DMD2's fake score is a full trainable copy of the teacher: on SDXL 2.6B parameters, whose fp32 weights,
gradients and AdamW moments (16 bytes per parameter, 43 GB) dominate a GPU's memory. `shard` splits
them over the processes: each holds 1/N of every tensor (a DTensor), all-gathers a block's weights just
before the block runs and frees them after, and reduce-scatters the gradients (their mean over the
processes, which is what `tsm_core.train.optim.sync_gradients` computes for unsharded tensors, so
sharded and unsharded parameters follow one rule).

Frozen modules shard the same way, weights only: the generator's base (the teacher's denoiser, which is
also the real score) with the timestep experts on it left out of the shards (``ignored``: they stay
whole on every process and are synced by ``sync_gradients``, which handles the experts that some
processes did not use this step), and the text encoders (fp32; SD3's T5-XXL alone is 17.7 GB).

Checkpoints stay one set of full tensors, whatever the number of processes: `ShardedState` and
`ShardedOptimizer` are checkpoint entries that `CheckpointManager` gathers on every process before the
main one writes (``gather``) and scatters back after every process read the files (``scatter``).
DMD2 itself saves no optimizer state under FSDP and cannot resume such a run; here it resumes exactly.

Deviations kept:
- The trainer calls ``fully_shard`` itself, under the process group ``accelerate launch`` set up, instead of
  accelerate's FSDP plugin: the plugin shards the one model given to ``prepare`` with an auto-wrap policy,
  and a DMD2 run needs three separately called modules sharded, the experts left out of the base's shards,
  and frozen text encoders that are never prepared.
- A sharded N-process run is checked against the replicated N-process run, not against one process:
  with DMD2's per-process draws (seed + process index) no N-process run equals a 1-process run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no shards
    DTensor = ()


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an FSDP2 shard (a DTensor). Called per parameter per step: no import here."""
    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's full value (collective: every process must call it); others as they are."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def denoiser_units(denoiser: nn.Module) -> list[nn.Module]:
    """FSDP units of a UNet or MM-DiT, innermost first: the layers of every block (a UNet block's resnets
    and attention stacks; an MM-DiT's joint blocks, and Flux's single-stream blocks after them), each block,
    then the denoiser itself (the rest of it: embeddings, conv in/out). Units of a few hundred million
    parameters keep the weights gathered at any time small (SDXL's largest block alone is 1.1B)."""
    mid = [denoiser.mid_block] if getattr(denoiser, "mid_block", None) is not None else []
    blocks = [*getattr(denoiser, "down_blocks", []), *mid, *getattr(denoiser, "up_blocks", []),
              *getattr(denoiser, "transformer_blocks", []), *getattr(denoiser, "single_transformer_blocks", [])]
    units = []
    for block in blocks:
        units += [layer for child in block.children() if isinstance(child, nn.ModuleList) for layer in child]
        units.append(block)
    return [*units, denoiser]


def encoder_units(encoder: nn.Module) -> list[nn.Module]:
    """FSDP units of a text encoder, innermost first: every layer of its outermost layer stacks (CLIP's
    ``text_model.encoder.layers``, T5's ``encoder.block``), then the encoder (embeddings, final norm),
    the module a backbone calls."""
    stacks, inside = [], set()
    for module in encoder.modules():  # parents before children: a stack inside a stack's layer is skipped
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            stacks.append(module)
            inside.update(id(m) for m in module.modules())
    return [layer for stack in stacks for layer in stack if any(True for _ in layer.parameters())] + [encoder]


def shard(units: Iterable[nn.Module], ignored: Iterable[nn.Parameter] = (), reshard_root: bool = False) -> None:
    """Shard every module of ``units`` over all processes, innermost first: each is one FSDP2 unit (its
    weights not in an earlier unit are gathered only while it runs). The outermost units must be the
    modules the trainer calls (FSDP2 gathers on a unit's own forward), e.g. a critic's fake denoiser and
    its GAN head, not the critic object around them. Parameters in ``ignored`` stay whole, unsharded and
    outside FSDP's gradient reduction (a frozen base's trainable experts). ``reshard_root``: free the
    outermost unit's gathered weights after its forward too (FSDP2 keeps a root's weights gathered until its
    backward, which a module run only under ``no_grad``, a text encoder, never has).

    Raises:
        ValueError: no process group (FSDP needs ``accelerate launch`` / ``torchrun`` with N processes).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("train.fsdp shards over processes, but this run has no process group: launch it with "
                         "`accelerate launch --num_processes N -m tsm_distill.cli ...` (or torchrun), or set "
                         "train.fsdp: false")
    ignored = set(ignored)
    for unit in units:
        fully_shard(unit, ignored_params=ignored or None, reshard_after_forward=True if reshard_root else None)


class ShardedEntry:
    """A checkpoint entry whose tensors are sharded over the processes: `CheckpointManager` calls
    ``gather()`` on every process before writing and ``scatter(saved)`` on every process after reading
    (a marker class, not duck typing: DDP modules have a ``gather`` method of their own)."""

    def gather(self) -> dict:
        raise NotImplementedError

    def scatter(self, saved: dict) -> None:
        raise NotImplementedError


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


class ShardedState(ShardedEntry):
    """Checkpoint entry for the tensors ``keys`` of a sharded module, written as full tensors.

    ``gather()`` (every process) returns them whole on the main process (empty elsewhere: moved to
    the CPU there only); ``scatter(saved)`` (every process, each with the saved dict) loads them back
    into the shards.
    """

    def __init__(self, module: nn.Module, keys: Iterable[str]):
        self.module, self.keys = module, set(keys)

    def gather(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module, options=_options(cpu_offload=True))
        return {k: v for k, v in state.items() if k in self.keys}

    def scatter(self, saved: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        unknown = sorted(set(saved) - self.keys)
        if unknown:
            raise ValueError(f"the checkpoint holds {len(unknown)} tensor(s) this sharded module does not train, "
                             f"e.g. {unknown[:3]}; was it written by the same recipe?")
        set_model_state_dict(self.module, saved, options=_options(strict=False))


class ShardedOptimizer(ShardedEntry):
    """Checkpoint entry for the optimizer of a sharded module (its moments are shards too)."""

    def __init__(self, module: nn.Module, optimizer):
        self.module = module
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one

    def gather(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=_options(cpu_offload=True))

    def scatter(self, saved: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, saved, options=_options())
