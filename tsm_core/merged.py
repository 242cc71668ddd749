"""Merged-weight training: one matmul / convolution on ``W + s * sum_j c_j B_j A_j`` for a batch whose
samples share their experts (paper eq. 3 and eq. 5 with the sums folded into the weight).

Unmerged, every expert costs a down-projection ``A x`` and an up-projection ``B z`` in the forward, and
their transposes in the backward: about ``r (in*k + out)`` per output position per pass, next to the
base layer's ``in*k*out`` (k: kernel size). When the whole batch uses the same expert (every DMD2
generator step, a fine-tuning batch inside one interval, stage 2's core) the forward can instead run on
the merged weight ``W' = W + s B A``, built on the fly (the base weight is never modified), and the
backward can compute

  * ``grad_x`` through ``W'`` (one transposed op, as cheap as the base's own),
  * the experts' gradients from the layer input and ``grad_y``, either through the activations
    (``z = A x``, ``grad_B = s c grad_y^T z``, ``grad_A = s c (B^T grad_y)^T x``, ``grad_c = s <B^T grad_y, z>``)
    or through the full weight gradient ``G = grad_y^T x`` (``grad_B = s c G A^T``, ``grad_A = s c B^T G``),
    whichever costs fewer multiply-adds for this layer's shape.

That trades the forward's ``B z`` and the backward's ``A^T (B^T grad_y)`` for two merges of ``out*in*k*r``
each (forward, and again in backward instead of keeping ``W'`` alive: memory stays at the unmerged
path's). :func:`merge_pays` counts both and the layer takes the merged path only where it is cheaper
(large layers at low resolution, e.g. SD1.5's 1280-channel 8x8 convolutions, stay unmerged).

The values equal the unmerged path's within float rounding (tests/test_merged_path.py); where the merge
would not be exact, or would bypass someone else's management of the base weight, the layer keeps the
unmerged path (:func:`merge_blocker` says why).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MergePolicy = Literal["auto", "always", "never"]
MERGE_POLICIES = ("auto", "always", "never")
_BASE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def merge_blocker(base: nn.Module, dropout: nn.Module) -> str | None:
    """Why this layer must keep the unmerged path, or None when merging is exact and safe.

    * dropout on the experts' input in training mode: ``B A drop(x)`` is not ``(B A) x``;
    * a base weight or bias that trains (full fine-tuning): the merged op returns no grad for them;
    * a subclass of Linear/Conv, or hooks on the base layer: someone else owns its forward or its weight
      (quantised layers, accelerate's offload hooks, DeepSpeed ZeRO-3 and per-layer FSDP2 gather the
      weight in a pre-forward hook; calling our op instead of ``base_layer(x)`` would skip that);
    * a weight that is a tensor subclass (a DTensor of FSDP2 / tensor parallelism outside the owner's
      forward): the merge would mix shards with full experts;
    * string padding (``"same"``): the backward's transposed convolution needs explicit padding.
    DDP needs nothing: the experts still get their gradients through autograd, which its hooks watch.
    """
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return "dropout on the experts' input"
    if type(base) not in _BASE_TYPES:
        return f"{type(base).__name__} is not a plain Linear/Conv"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks"
    w, b = base.weight, base.bias
    if w.requires_grad or (b is not None and b.requires_grad):
        return "the base layer trains"
    if type(w.data) is not torch.Tensor:
        return f"the base weight is a {type(w.data).__name__}"
    if isinstance(getattr(base, "padding", 0), str):
        return "string padding"
    return None


@dataclass(frozen=True)
class MergedOp:
    """The base op's geometry (``conv_dims`` 0 for Linear) and the backward's choice of expert gradients."""

    conv_dims: int
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    full_weight_grad: bool = False  # experts' grads through G = grad_y^T x instead of the activations

    @classmethod
    def of(cls, base: nn.Module, full_weight_grad: bool = False) -> MergedOp:
        if isinstance(base, nn.Linear):
            return cls(0, full_weight_grad=full_weight_grad)
        return cls(base.weight.ndim - 2, tuple(base.stride), tuple(base.padding), tuple(base.dilation),
                   full_weight_grad)

    @property
    def cdim(self) -> int:
        """Where channels live: last for Linear, dim 1 for convolutions."""
        return -1 if self.conv_dims == 0 else 1

    def out_positions(self, x: torch.Tensor, kernel: tuple[int, ...]) -> int:
        """Output positions of the op on ``x``, summed over the batch (the N of the cost model)."""
        if self.conv_dims == 0:
            return x.numel() // x.shape[-1]
        n = x.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], kernel, self.stride, self.padding, self.dilation):
            n *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        return n

    def apply(self, x, w, b=None):
        if self.conv_dims == 0:
            return F.linear(x, w, b)
        return _CONV[self.conv_dims](x, w, b, self.stride, self.padding, self.dilation)

    def input_grad(self, gy, x, w):
        if self.conv_dims == 0:
            return gy @ w
        return _CONV_INPUT[self.conv_dims](x.shape, w, gy, self.stride, self.padding, self.dilation)

    def weight_grad(self, gy, x, shape):
        """dL/dW for a weight of ``shape`` that produced ``gy`` from ``x``."""
        if self.conv_dims == 0:
            return gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return _CONV_WEIGHT[self.conv_dims](x, shape, gy, self.stride, self.padding, self.dilation)

    def down_t(self, gy, B):
        """``B^T grad_y``: (rows, r) for Linear, (n, r, *spatial) for convolutions."""
        if self.conv_dims == 0:
            return gy @ B
        return _CONV[self.conv_dims](gy, B.t().reshape(*B.t().shape, *([1] * self.conv_dims)))

    def up_weight_grad(self, gy, z):
        """``grad_y^T z`` summed over every position: the (out, r) gradient of an up-projection."""
        if self.conv_dims == 0:
            return gy.reshape(-1, gy.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        return torch.einsum("bo...,br...->or", gy, z)


# Fixed cost of one merged call in multiply-adds (the Python and dispatch work of the autograd Function,
# the concatenations, the merge's own launch): about 50-100 us on one CPU thread. It keeps tiny layers
# (test-sized UNets, 32 channels at rank 4) on the unmerged path, where it measured faster.
CALL_OVERHEAD = 4_000_000


def merge_pays(op: MergedOp, n: int, out: int, in_k: int, ranks: list[int], trained: list[bool],
               grad_x: bool, backward: bool) -> tuple[bool, bool]:
    """(merge?, full weight grad?) by multiply-add count for N = ``n`` output positions.

    Per expert of rank r: ``P = r N (in*k + out)`` (a down- plus an up-projection over the activations),
    ``M = out * in*k * r`` (one merge). Unmerged: P forward, P backward for grad_x, P more for the
    expert's own grads. Merged: M forward, M again in backward for grad_x, and the expert's grads either
    through the activations (2P: z recomputed, B^T grad_y, then the two products) or through the full
    weight gradient (``out * in*k * N`` once, then 2M per expert). Memory-bound passes are not counted.
    """
    unmerged, merged = 0, CALL_OVERHEAD
    lowrank = full = 0
    for r, t in zip(ranks, trained):
        p, m = r * n * (in_k + out), out * in_k * r
        unmerged += p + (p if backward and grad_x else 0) + (p if backward and t else 0)
        merged += m + (m if backward and grad_x else 0)
        if backward and t:
            lowrank += 2 * p
            full += 2 * m
    use_full = full > 0 and out * in_k * n + full < lowrank
    merged += out * in_k * n + full if use_full else lowrank
    return merged < unmerged, use_full


def merged_weight(weight: torch.Tensor, As, Bs, coefs, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """``W + s * sum_j c_j B_j A_j`` in ``dtype``: accumulated in fp32 when the weights are half precision,
    as one ``addmm`` over the concatenated ranks (for convolutions over the flattened kxk kernel: the merged
    kernel is the 1x1 B composed with the kxk A)."""
    acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    out = weight.shape[0]
    Bc = torch.cat([B.to(acc) * (scaling if c is None else scaling * c.to(acc)) for B, c in zip(Bs, coefs)], dim=1)
    Ac = torch.cat([A.to(acc).reshape(A.shape[0], -1) for A in As])
    return torch.addmm(weight.to(acc).reshape(out, -1), Bc, Ac).view(weight.shape).to(dtype)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for a device without autocast (``"meta"``, on which
    the planner runs the experts, raises there)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a base layer's op would run in on ``x``: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if autocast_enabled(dev) else x.dtype


def _autocast_off(device_type: str):
    # Both passes cast explicitly: autocast would run the merge's addmm itself in bf16.
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else contextlib.nullcontext()


class MergedFunction(torch.autograd.Function):
    """``y = op(x, W + s * sum_j c_j B_j A_j) + b`` with the gradients of x, every A_j, B_j and gate c_j.

    Inputs: ``x, weight, bias, op, scaling, dtype, n`` then ``A_0..A_{n-1}, B_0..B_{n-1}, c_0..c_{n-1}``
    (``c_j`` None for an ungated expert, else a scalar gate). ``dtype``: the compute dtype (autocast's when
    it is on, as the unmerged path's ops would use). The base weight and bias get no gradient.

    Skinny products (r = 64 columns next to 320) run well below a GEMM's peak on a CPU, so the trained
    experts' ``z = A x`` rides in the forward's op as r extra output channels (``[W'; A]``, about the
    price of ``W'`` alone) and is kept for the backward (r channels per position); for Linear the
    backward's ``B^T grad_y`` rides in the grad_x product the same way (``grad_y [W' | B]``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, op: MergedOp, scaling: float, dtype: torch.dtype, n: int, *terms):
        As, Bs, cs = terms[:n], terms[n:2 * n], terms[2 * n:]
        need = ctx.needs_input_grad
        trained = [j for j in range(n) if need[7 + j] or need[7 + n + j] or need[7 + 2 * n + j]]
        want_z = bool(trained) and not op.full_weight_grad and any(need[7 + n + j] or need[7 + 2 * n + j] for j in trained)
        z = None
        with _autocast_off(x.device.type):
            xc = x.to(dtype)
            w = merged_weight(weight, As, Bs, cs, scaling, dtype)
            b = None if bias is None else bias.to(dtype)
            if want_z:
                Ac = torch.cat([As[j].to(dtype) for j in trained])
                out = w.shape[0]
                if b is not None:
                    b = torch.cat([b, b.new_zeros(Ac.shape[0])])
                yz = op.apply(xc, torch.cat([w, Ac]), b)
                y, z = yz.narrow(op.cdim, 0, out).contiguous(), yz.narrow(op.cdim, out, Ac.shape[0]).contiguous()
            else:
                y = op.apply(xc, w, b)
        ctx.op, ctx.scaling, ctx.dtype, ctx.n, ctx.trained = op, scaling, dtype, n, trained
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xc, weight, z, *terms)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, weight, z, *terms = ctx.saved_tensors
        op, s, dt, n, trained = ctx.op, ctx.scaling, ctx.dtype, ctx.n, ctx.trained
        As, Bs, cs = terms[:n], terms[n:2 * n], terms[2 * n:]
        need = ctx.needs_input_grad
        need_A, need_B, need_c = need[7:7 + n], need[7 + n:7 + 2 * n], need[7 + 2 * n:]
        gx = gz = None
        gA, gB, gc = [None] * n, [None] * n, [None] * n
        with _autocast_off(gy.device.type):
            gy = gy.to(dt)
            want_gz = not op.full_weight_grad and any(need_A[j] or need_c[j] for j in trained)
            Bc = torch.cat([Bs[j].to(dt) for j in trained], dim=1) if want_gz else None
            if need[0]:
                w = merged_weight(weight, As, Bs, cs, s, dt)
                if want_gz and op.conv_dims == 0:
                    g = gy @ torch.cat([w, Bc], dim=1)  # (.., in + R): grad_x and B^T grad_y in one GEMM
                    gx, gz = g[..., :w.shape[1]], g[..., w.shape[1]:]
                else:
                    gx = op.input_grad(gy, xc, w)
                gx = gx.to(ctx.x_dtype)
                del w
            if trained:
                coef = [s if cs[j] is None else s * cs[j].to(dt) for j in range(n)]
                if op.full_weight_grad:
                    G = op.weight_grad(gy, xc, weight.shape).reshape(weight.shape[0], -1)  # (out, in*k)
                    for j in trained:
                        A2, B = As[j].to(dt).reshape(As[j].shape[0], -1), Bs[j].to(dt)
                        BtG = B.t() @ G  # (r, in*k)
                        gA[j] = (BtG * coef[j]).view(As[j].shape) if need_A[j] else None
                        gB[j] = (G @ A2.t()) * coef[j] if need_B[j] else None
                        gc[j] = s * (BtG * A2).sum() if need_c[j] else None
                else:
                    if want_gz and gz is None:
                        gz = op.down_t(gy, Bc)
                    _lowrank_grads(op, gy, xc, z, gz, [As[j] for j in trained], trained, need_A, need_B, need_c,
                                   coef, s, gA, gB, gc)
        gA = [None if g is None else g.to(A.dtype) for g, A in zip(gA, As)]
        gB = [None if g is None else g.to(B.dtype) for g, B in zip(gB, Bs)]
        gc = [None if g is None else g.to(c.dtype).reshape(c.shape) for g, c in zip(gc, cs)]
        return (gx, None, None, None, None, None, None, *gA, *gB, *gc)


def _lowrank_grads(op, gy, xc, z, gz, As, trained, need_A, need_B, need_c, coef, s, gA, gB, gc):
    """The trained experts' grads through the activations, their ranks concatenated: ``z = A x`` (from the
    forward) and ``B^T grad_y``, then one weight grad of each (results written into gA, gB, gc)."""
    gBc = op.up_weight_grad(gy, z) if any(need_B[j] for j in trained) else None  # (out, R)
    gAc = None
    if any(need_A[j] for j in trained):
        shape = (gz.shape[op.cdim], *As[0].shape[1:])
        gAc = op.weight_grad(gz, xc, shape)  # (R, in, k..)
    start = 0
    for j, A in zip(trained, As):
        r = A.shape[0]
        if need_A[j]:
            gA[j] = gAc[start:start + r] * coef[j]
        if need_B[j]:
            gB[j] = gBc[:, start:start + r] * coef[j]
        if need_c[j]:
            gc[j] = s * (gz.narrow(op.cdim, start, r) * z.narrow(op.cdim, start, r)).sum()
        start += r
