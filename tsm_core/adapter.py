"""attach(model, config) -> TSMAdapter: wrap target layers with timestep experts and drive them.

The adapter is the one object trainers talk to: it switches modes (stage 1 ``expert``, stage 2
``mixture``, the ``symmetric`` ablation, ``off``), owns the timestep context, lists trainable
parameters, fuses weights for inference, and saves/loads/exports the experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .config import TSMConfig
from .context import TimestepContext
from .intervals import TimestepIntervals
from .layers import TARGET_TYPES, Mode, TSMLayer, expert_key, tsm_layer
from .merged import MERGE_POLICIES, MergePolicy

_MODES = ("off", "expert", "mixture", "symmetric")


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


class TSMAdapter:
    """Handle on the TSM layers attached to one model. Create it with :func:`attach`."""

    def __init__(self, model: nn.Module, config: TSMConfig, layers: dict[str, TSMLayer], context: TimestepContext):
        self.model = model
        self.config = config
        self.layers = layers
        self.context = context
        self.intervals = context.intervals
        self.mode: Mode = "off"
        self.mode_args: dict = {}

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: Mode, scale: int | None = None, core_scale: int | None = None,
                 context_scales: Iterable[int] | None = None, experts: Iterable[int] | None = None) -> TSMAdapter:
        """Switch every layer's mode and which parameters are trainable.

        * ``"expert"`` (stage 1, eq. 3-4): each sample uses its interval's expert at ``scale``. Only
          that scale's experts are trainable, or only ``experts`` (indices) of it when given.
        * ``"mixture"`` (stage 2, eq. 5-7): core = ``core_scale`` (the finest), gated contexts =
          ``context_scales``. Only the router is trainable; experts are frozen.
        * ``"symmetric"``: every listed scale gated (ablation baseline); only the router trains.
        * ``"off"``: the base model exactly; nothing trainable.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        cfg = self.config
        for p in self.adapter_parameters():
            p.requires_grad_(False)
        args: dict = {}
        if mode == "expert":
            if scale is None:
                scale = cfg.scales[0] if len(cfg.scales) == 1 else None
            if scale not in cfg.scales:
                raise ValueError(f"set_mode('expert') needs scale= one of the fostered scales {cfg.scales}, got {scale!r}")
            train = list(range(scale)) if experts is None else sorted(set(int(e) for e in experts))
            bad = [e for e in train if not 0 <= e < scale]
            if bad:
                raise ValueError(f"scale {scale} has experts 0..{scale - 1}; cannot train expert(s) {bad}")
            for layer in self.layers.values():
                layer.mode, layer.active_scale = "expert", scale
                layer.core_scale, layer.gated_scales = None, ()
                for e in train:
                    layer.lora_A[expert_key(scale, e)].requires_grad_(True)
                    layer.lora_B[expert_key(scale, e)].requires_grad_(True)
            args = {"scale": scale, "experts": train}
        elif mode in ("mixture", "symmetric"):
            core, ctx = cfg.resolve_mixture(core_scale, None if context_scales is None else tuple(context_scales))
            if mode == "mixture" and not ctx:
                raise ValueError(f"mixture needs at least one context scale besides the core {core}; scales={cfg.scales}")
            gated = ctx if mode == "mixture" else tuple(sorted((core, *ctx)))
            for layer in self.layers.values():
                if layer.router_scales != gated:  # keep a trained router across mode switches
                    layer.init_router(gated, zero_init=cfg.router_zero_init)
                layer.mode, layer.active_scale = mode, None
                layer.core_scale = core if mode == "mixture" else None
                layer.gated_scales = gated
                for p in (layer.router_fc, layer.router_emb):
                    if p is not None:
                        p.requires_grad_(True)
            args = {"core_scale": core, "context_scales": list(ctx)}
        else:
            for layer in self.layers.values():
                layer.mode, layer.active_scale, layer.core_scale, layer.gated_scales = "off", None, None, ()
        for layer in self.layers.values():
            layer._core_cache = {}  # a cached core merge belongs to the mode it was built in
        self.mode, self.mode_args = mode, args
        return self

    def set_merged_training(self, policy: MergePolicy = "auto", cache_core: bool = False) -> TSMAdapter:
        """How layers run experts that the whole batch shares (``tsm_core.merged``).

        * ``"auto"`` (the default): one matmul / convolution on ``W + s B A`` (built on the fly; the base
          weight is never modified) with the experts' gradients computed in the backward, in every layer
          where that costs fewer multiply-adds than the unmerged path (large activations, e.g. SD1.5's
          64x64 and 32x32 levels); the other layers stay unmerged. In stage 2 the core merges, and a gated
          context too when its gate is one number for the batch (``router_input="timestep"``).
        * ``"always"``: merge wherever it is exact, whatever it costs (tests, measurements).
        * ``"never"``: the unmerged path everywhere.

        ``cache_core=True`` (stage 2, eq. 5 and 7: the core is frozen while the router trains) keeps each
        layer's ``W + s B_core A_core`` from one step to the next instead of building it in every forward and
        backward: the core then costs what the base layer costs, in every layer (the low-resolution ones
        too, where an on-the-fly merge does not pay). The price is memory: one more copy of every targeted
        layer's weight, in the compute dtype (bf16 under autocast), per core expert the batches have used
        (a 4-step student's router phase uses all four), held until the mode or this setting changes. Not
        with ``policy="never"``, nor where a layer cannot merge (above), nor while the batch spans several
        core intervals.

        Outputs and gradients equal the unmerged path's within float rounding. Layers with dropout in
        training mode, trainable base weights, or a base weight managed by hooks (ZeRO-3, per-layer FSDP2,
        offloading) stay unmerged under every policy.
        """
        if policy not in MERGE_POLICIES:
            raise ValueError(f"merged training policy must be one of {MERGE_POLICIES}, got {policy!r}")
        for layer in self.layers.values():
            layer.merge_policy = policy
            layer.cache_core = bool(cache_core)
            layer._core_cache = {}
        return self

    # ------------------------------------------------------------------ parameters
    def named_adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(key, parameter) for every expert and router, keyed ``<layer>.lora_A.s4_e3`` / ``<layer>.router_emb``."""
        for name, layer in self.layers.items():
            for k, p in layer.lora_A.items():
                yield f"{name}.lora_A.{k}", p
            for k, p in layer.lora_B.items():
                yield f"{name}.lora_B.{k}", p
            for k in ("router_fc", "router_emb"):
                if getattr(layer, k) is not None:
                    yield f"{name}.{k}", getattr(layer, k)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        """Every expert and router parameter, trainable or not."""
        return (p for _, p in self.named_adapter_parameters())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the current mode trains (pass these to the optimizer)."""
        return (p for p in self.adapter_parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Expert and router tensors (detached views that share storage with the parameters)."""
        return {k: p.detach() for k, p in self.named_adapter_parameters()}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors from :meth:`state_dict` back in; every key must match a parameter of the same shape."""
        own = {k: p for k, p in self.named_adapter_parameters() if not k.endswith((".router_fc", ".router_emb"))}
        routers = {k for k in tensors if k.endswith((".router_fc", ".router_emb"))}
        for key in routers:
            name, attr = key.rsplit(".", 1)
            if name not in self.layers:
                raise ValueError(f"router tensor {key!r} names no TSM layer of this model")
            layer = self.layers[name]
            if getattr(layer, attr) is None:
                raise ValueError(f"router tensor {key!r} has no router to load into: call set_mode('mixture', ...) "
                                 "with the scales it was trained with first (load_adapter does this)")
            own[key] = getattr(layer, attr)
        missing = sorted(set(own) - set(tensors) - routers)
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Was it saved from a model with the same "
                "architecture, target_modules and scales?"
            )
        for k, t in tensors.items():
            if own[k].shape != t.shape:
                raise ValueError(f"shape mismatch for {k}: saved {tuple(t.shape)}, model {tuple(own[k].shape)}")
            own[k].copy_(t.to(own[k].dtype))

    # ------------------------------------------------------------------ timesteps
    @contextmanager
    def timesteps(self, t):
        """Route every sample by its own timestep until the block exits (keep ``backward()`` inside).

        ``t`` is a scalar or a (B,) tensor of int timesteps in [0, T) or float timesteps in [0, T].
        """
        self.context.push(t)
        try:
            yield self
        finally:
            self.context.pop()

    @contextmanager
    def merged(self, t):
        """Fuse the active experts into the base weights for a batch sharing one timestep ``t``.

        Inside the block the model runs at base-model cost; on exit the original weights are restored
        bit for bit. The timestep context is set to ``t`` inside the block as well.
        """
        tt = torch.as_tensor(t).reshape(-1)
        if tt.numel() != 1 and not bool((tt == tt[0]).all()):
            raise ValueError("merged(t) fuses one expert per layer, so t must be one timestep shared by the batch")
        state = self.context.push(tt[:1])
        try:
            for layer in self.layers.values():
                layer.merge(state)
            yield self
        finally:
            for layer in self.layers.values():
                layer.unmerge()
            self.context.pop()

    @contextmanager
    def bypass(self):
        """Run the base model inside the block, leaving modes and trainable flags untouched.

        DMD2 uses this to evaluate the frozen teacher (the *real* score) with the generator's own
        weights, so the teacher is not held in memory twice.
        """
        saved = {name: layer.mode for name, layer in self.layers.items()}
        # The bypassed forward (e.g. the real score's CFG pass at 2B rows) must not become the block's
        # recorded model batch: gradient checkpointing re-runs the routed forward's layers in backward
        # and checks their rows against it.
        state = self.context.peek()
        model_batch = state.model_batch if state is not None else None
        for layer in self.layers.values():
            layer.mode = "off"
        try:
            yield self
        finally:
            for name, layer in self.layers.items():
                layer.mode = saved[name]
            if state is not None:
                state.model_batch = model_batch

    # ------------------------------------------------------------------ gates
    @contextmanager
    def record_gates(self):
        """Collect per-sample mean gates of every routed layer: yields {layer: [(t, gate), ...]}."""
        logs = {name: [] for name in self.layers}
        for name, layer in self.layers.items():
            layer.gate_log = logs[name]
        try:
            yield logs
        finally:
            for layer in self.layers.values():
                layer.gate_log = None

    # ------------------------------------------------------------------ I/O (see serialization.py / export.py)
    def save(self, directory: str | Path) -> Path:
        """Write ``tsm_adapter.safetensors`` with the config, intervals and mode in its metadata."""
        from .serialization import save_adapter

        return save_adapter(self, directory)

    def export_lora(self, directory: str | Path, scale: int, expert: int = 0,
                    format: str = "diffusers", prefix: str | None = None, base_model: str | None = None) -> Path:
        """Write one expert as a standard LoRA file (diffusers/peft keys or kohya keys) and its model card
        (``README.md``); ``base_model`` names the model it loads into (default: where this model came from)."""
        from .export import export_lora

        return export_lora(self, directory, scale=scale, expert=expert, format=format, prefix=prefix,
                           base_model=base_model)


def attach(model: nn.Module, config: TSMConfig, context: TimestepContext | None = None) -> TSMAdapter:
    """Wrap every layer of ``model`` matching ``config.target_modules`` with :class:`TSMLayer`.

    The base model's own parameters are frozen; the adapter starts in mode ``"off"``. Pass the
    ``context`` of another adapter (e.g. the UNet's, when attaching to the text encoder) to route
    both models from one ``with tsm.timesteps(t):`` block.
    """
    if not isinstance(config, TSMConfig):
        raise ValueError(f"attach() needs a TSMConfig, got {type(config).__name__}")
    if any(isinstance(m, TSMLayer) for m in model.modules()):
        raise ValueError("this model already has TSM layers attached; load into a fresh model instead")
    if context is None:
        context = TimestepContext(TimestepIntervals(config.num_timesteps, config.scales))
    elif context.intervals.num_timesteps != config.num_timesteps or not set(config.scales) <= set(context.intervals.scales):
        raise ValueError(f"a shared context must cover this config's scales {config.scales} and num_timesteps")
    names = [n for n, m in model.named_modules() if n and _matches(n, config.target_modules)]
    if not names:
        sample = [n for n, m in model.named_modules() if isinstance(m, TARGET_TYPES)][:8]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no layer of {type(model).__name__}. "
            f"Linear/Conv layers look like: {sample}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, TSMLayer] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        if not isinstance(base, TARGET_TYPES):
            continue  # a container whose name ends like a target (e.g. "to_out"); its children may match
        layer = tsm_layer(base, config, context, name=name)
        if child.isdigit():
            parent[int(child)] = layer
        else:
            setattr(parent, child, layer)
        layers[name] = layer
    if not layers:
        raise ValueError(f"target_modules={config.target_modules!r} matched {names[:5]} but none is nn.Linear or nn.Conv1d/2d/3d")
    # The model's input batch, recorded on entry: layers inside may see B*F or B*H*W rows (video), but
    # the model itself must get one timestep per sample (RoutingState.rows).
    model.register_forward_pre_hook(partial(_enter_model, context), with_kwargs=True)
    return TSMAdapter(model, config, layers, context)


_BATCH_INPUTS = ("sample", "hidden_states", "input_ids", "inputs_embeds", "x")


def _enter_model(context: TimestepContext, module: nn.Module, args: tuple, kwargs: dict) -> None:
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        first = next((kwargs[k] for k in _BATCH_INPUTS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if first is not None and first.ndim > 0:
        context.enter_model(first.shape[0])


def load_adapter(model: nn.Module, directory: str | Path, context: TimestepContext | None = None) -> TSMAdapter:
    """Attach and load an adapter written by :meth:`TSMAdapter.save`: its config (the metadata), the router
    shapes, the weights and its mode, so the outputs equal the saved adapter's."""
    import json

    from .serialization import read_adapter_file

    tensors, meta = read_adapter_file(directory)
    tsm = attach(model, TSMConfig.from_json(meta["tsm_config"]), context=context)
    router_scales = tuple(json.loads(meta.get("router_scales", "[]")))
    if router_scales:
        for layer in tsm.layers.values():
            layer.init_router(router_scales)
    tsm.load_state_dict(tensors)
    mode, args = meta.get("mode", "off"), json.loads(meta.get("mode_args", "{}"))
    if mode == "expert":
        tsm.set_mode("expert", scale=args["scale"], experts=args.get("experts"))
    elif mode in ("mixture", "symmetric"):
        tsm.set_mode(mode, core_scale=args["core_scale"], context_scales=args["context_scales"])
    return tsm
