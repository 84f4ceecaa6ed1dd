"""BlendMask's blender: merge per-RoI crops of the bases with per-instance attentions into mask logits.

BlendMask (Chen et al., arXiv 2001.00309) §3.2, eqs. 2–4, for each of ``N`` instances:

1. ``a' = interpolate_{M×M→R×R}(a)`` — the ``K×M×M`` top-level attention is resized to the RoI resolution ``R``
   (eq. 2; bilinear by default, ``MODEL.BLENDMASK.TOP_INTERP``; nearest in the paper's early ablations);
2. ``s = softmax_K(a')`` — normalised over the ``K`` bases (eq. 3). **The interpolation comes before the softmax**
   (AdelaiDet ``adet/modeling/blendmask/blender.py``), so the softmax sees the R×R values;
3. ``m = Σ_k s_k ∘ r_k`` — weighted sum of the ``K×R×R`` RoI crops ``r`` of the bases (eq. 4): the mask logits.

The blender generalises two earlier assemblers (paper §4.1 "Merging methods: Blender vs. YOLACT vs. FCIS"):

* **YOLACT** (weighted sum): attention size ``M = 1`` — one scalar per basis for the whole RoI;
* **FCIS** (assembler): *fixed one-hot* attentions and *nearest* interpolation — with ``K = g²`` bases and a
  ``g×g`` grid, tile ``(i, j)`` of the RoI is copied from basis ``k = i·g + j``. No softmax (``normalize="none"``):
  the one-hot weights are used as they are. :func:`fcis_attention` builds that attention.

A fourth normalisation follows Table 3's one-basis model (§4.1 "Number of bases": *"the one-basis version uses
sigmoid activation on both the base and the attention map"*): ``normalize="sigmoid"`` with ``K = 1`` returns the
logit of ``σ(a')·σ(r)``, so the loss can stay BCE-with-logits. (A softmax over one basis is the constant 1.)

Two implementations with the same semantics:

* :func:`blend_reference` — plain PyTorch, every setting; the CPU path and the test oracle. Each step is a separate
  kernel that writes its ``N×K×R×R`` result to memory (cost in its docstring).
* Triton kernels for the BlendMask setting (``interpolation="bilinear"``, ``normalize="softmax"``), GPU (CPU through
  ``TRITON_INTERPRET=1`` in the tests). **Forward**: one program per (block of ``BLOCK`` output pixels, RoI) computes,
  in registers and in fp32 whatever the input dtype, for all ``K`` bases at once: the bilinear source cells and
  weights of each pixel (``F.interpolate(mode="bilinear", align_corners=False)``: source coordinate
  ``max(M/R·(dst + ½) − ½, 0)``, lower cell ``⌊·⌋``, upper cell one further except at the last row/column), the
  4-tap interpolation of the attention, the softmax over ``K`` (max-subtracted) and the weighted sum with the crops;
  only the ``N×R×R`` logits are written. **Backward** (``g = ∂L/∂m``, ``s`` the softmax, ``m = Σ_k s_k r_k``): one
  program per (pixel block, RoI) recomputes ``s`` and ``m`` and writes ``∂L/∂r_k = g·s_k`` and the gradient of the
  interpolated attention ``∂L/∂a'_k = g·s_k·(r_k − m)`` (fp32); the latter goes back through the interpolation as
  the exact adjoint ``∂L/∂a = W_yᵀ · ∂L/∂a' · W_x`` with the ``R×M`` bilinear matrices ``W_y``, ``W_x`` (two small
  batched matmuls; deterministic — the scatter-add of ``F.interpolate``'s own CUDA backward uses atomics).

  Cost per RoI (``e`` bytes per element of the inputs, fp32 intermediates; FLOPs counted as in
  :func:`blend_reference`):

  - forward: ≈ ``14·K·R²`` FLOPs (the same math); bytes ``e·(K·M² + K·R² + R²)`` — attention and crops read once,
    the logits written once (the 4 taps per pixel re-read the ``K·M²`` attention from L1/L2, not DRAM). K = 4,
    M = 14, R = 56, fp32: ≈ 66 kB per RoI, 6.6 MB for 100 RoIs (the reference: ≈ 367 kB per RoI).
  - backward: recompute (≈ ``14·K·R²``) + ≈ ``6·K·R²`` for the two gradients + ``2·K·R·M·(R + M)`` for the adjoint
    matmuls; bytes: read ``e·(K·M² + K·R² + R²)`` (inputs and ``g``), write ``e·K·R²`` (``∂L/∂r``) and
    ``4·K·R²`` (``∂L/∂a'``), which the matmuls read back (``4·K·R²``) before writing ``e·K·M²``. K = 4, M = 14,
    R = 56, fp32: ≈ 220 kB per RoI.

Dispatch: :func:`blend` (the entry point the models call) uses the custom op ``torch.ops.onestage.blend``
(autograd through ``torch.library.register_autograd``; opaque to ``torch.compile``) for CUDA tensors with
``interpolation="bilinear"``, ``normalize="softmax"`` and ``K ≤ MAX_KERNEL_BASES``, and :func:`blend_reference`
for everything else (CPU, nearest/FCIS, ``normalize="none"``/``"sigmoid"``), or always with ``force_reference=True``
or ``ONESTAGE_FORCE_REFERENCE=1``. With ``TRITON_INTERPRET=1`` set before this module is imported, CPU tensors also
take the kernels (through Triton's interpreter: how the tests check them without a GPU). The kernel returns the
crops' dtype (as the reference, which casts the attention to it) and gives each input its gradient in its own dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.ops._triton import (HAS_TRITON, TRITON_INTERPRET, force_reference_from_env, tl, triton,
                                   triton_supported)

__all__ = ["blend", "blend_reference", "bilinear_matrix", "fcis_attention", "INTERPOLATIONS", "NORMALIZATIONS",
           "kernel_supports", "triton_supported", "HAS_TRITON", "TRITON_INTERPRET"]

INTERPOLATIONS = ("bilinear", "nearest")
NORMALIZATIONS = ("softmax", "none", "sigmoid")


def _check(bases_rois: Tensor, attns: Tensor, interpolation: str, normalize: str) -> None:
    if bases_rois.dim() != 4 or attns.dim() != 4:
        raise ValueError(f"expected bases_rois N×K×R×R and attns N×K×M×M, got {tuple(bases_rois.shape)} and "
                         f"{tuple(attns.shape)}")
    if bases_rois.shape[:2] != attns.shape[:2]:
        raise ValueError(f"bases_rois {tuple(bases_rois.shape)} and attns {tuple(attns.shape)} disagree on N or K")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "sigmoid" and bases_rois.shape[1] != 1:
        raise ValueError("normalize='sigmoid' is the one-basis variant of BlendMask Table 3 and needs K = 1, "
                         f"got K = {bases_rois.shape[1]}")


def interpolate_attention(attns: Tensor, size, interpolation: str = "bilinear") -> Tensor:
    """``N×K×M×M`` → ``N×K×size`` with ``F.interpolate`` (bilinear: ``align_corners=False``, as AdelaiDet's
    ``F.interpolate(coeffs, (H, W), mode=top_interp)``; nearest: source index ``⌊dst·M/R⌋``, so with ``R`` a
    multiple of ``M`` every attention cell covers an exact ``R/M×R/M`` tile)."""
    if interpolation == "bilinear":
        return F.interpolate(attns, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(attns, size=size, mode="nearest")


def blend_reference(bases_rois: Tensor, attns: Tensor, interpolation: str = "bilinear",
                    normalize: str = "softmax") -> Tensor:
    """Mask logits ``N×R×R`` from RoI crops of the bases ``N×K×R×R`` and attentions ``N×K×M×M`` (module docstring).

    ``interpolation``: ``"bilinear"`` | ``"nearest"`` (attention M×M → R×R). ``normalize``: ``"softmax"`` over K
    (BlendMask, YOLACT-as-M=1), ``"none"`` (weights used as given: FCIS's fixed one-hot attention), ``"sigmoid"``
    (K = 1 only: logit of σ(a')·σ(r), BlendMask Table 3). ``N = 0`` gives an empty ``0×R×R`` tensor.

    Cost per RoI, softmax + bilinear, ``K`` bases, ``M×M`` attention, ``R×R`` output, counting a multiply, an add,
    an exp, a divide or a max as one FLOP each:

    * FLOPs ≈ ``K·R²·(7 + 5 + 2) = 14·K·R²`` — bilinear resize 7 per output value (4 multiplies, 3 adds with
      precomputed weights), softmax ≈ 5 per value (max, subtract, exp, sum, divide), weighted sum 2 per value
      (multiply + add). K = 4, R = 56: ≈ 176 k FLOPs; the eq. 4 weighted sum alone is ``2·K·R²`` ≈ 25 k
      (``K·R²`` ≈ 12.5 k multiply-adds, the "less than 10K FLOPs per RoI" order of magnitude of the authors'
      slides, seed file line 143).
    * Bytes moved, this implementation (fp32, every step a separate kernel that writes its result to memory):
      read the attention ``4·K·M²``; write the interpolated attention ``4·K·R²``; softmax reads and writes
      ``2·4·K·R²``; the product reads softmax and crops and writes ``3·4·K·R²``; the sum reads ``4·K·R²`` and writes
      the logits ``4·R²``: in all ``4·(K·M² + 7·K·R² + R²)`` ≈ 367 kB per RoI at K = 4, M = 14, R = 56.
      A fused kernel reads the attention and the crops once and writes only the logits:
      ``4·(K·M² + K·R² + R²)`` ≈ 66 kB — about 5.5× less traffic for the same FLOPs.
    """
    _check(bases_rois, attns, interpolation, normalize)
    n, k, r_h, r_w = bases_rois.shape
    if n == 0:
        return bases_rois.new_zeros((0, r_h, r_w)) + attns.sum() * 0
    attns = interpolate_attention(attns.to(bases_rois.dtype), (r_h, r_w), interpolation)  # eq. 2
    if normalize == "sigmoid":
        # log σ(a') + log σ(r) = log p; logit(p) = log p − log(1 − p), with 1 − p = −expm1(log p). Clamping log p
        # below 0 keeps the logit finite (≤ ~16) where both sigmoids round to 1.
        log_p = (F.logsigmoid(attns) + F.logsigmoid(bases_rois)).clamp(max=-1e-7)
        return (log_p - torch.log(-torch.expm1(log_p)))[:, 0]
    if normalize == "softmax":
        attns = attns.softmax(dim=1)  # eq. 3, over the K bases, after the interpolation
    return (attns * bases_rois).sum(dim=1)  # eq. 4


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (bilinear interpolation + softmax over K + weighted sum, fused)
# ----------------------------------------------------------------------------------------------------------------

MAX_KERNEL_BASES = 32
#: register tile of a program: next_power_of_2(K) × BLOCK values (BLOCK = TILE // K_P output pixels, at most 256)
TILE = 1024
NUM_WARPS = 4
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (RoIs)


def kernel_supports(num_bases: int, interpolation: str = "bilinear", normalize: str = "softmax") -> bool:
    """Whether the fused kernel handles this blender setting (otherwise the reference runs)."""
    return interpolation == "bilinear" and normalize == "softmax" and 1 <= num_bases <= MAX_KERNEL_BASES


if HAS_TRITON:
    @triton.jit
    def _source_taps(dst, in_size, scale):
        """F.interpolate(bilinear, align_corners=False) along one axis: lower/upper source index and weights."""
        src = tl.maximum(scale * (dst.to(tl.float32) + 0.5) - 0.5, 0.0)
        i0 = src.to(tl.int32)  # truncation = floor, src ≥ 0
        i1 = i0 + (i0 < in_size - 1).to(tl.int32)
        w1 = src - i0.to(tl.float32)
        return i0, i1, 1.0 - w1, w1

    @triton.jit
    def _softmax_blend(bases_ptr, attns_ptr, n, pix, pix_ok, num_bases, RH, RW, MH, MW, scale_h, scale_w,
                       K_P: tl.constexpr):
        """Recompute, for the pixels ``pix`` of RoI ``n``: crops r (K_P×BLOCK), softmax s, logits m (BLOCK)."""
        y = pix // RW
        x = pix % RW
        y0, y1, wy0, wy1 = _source_taps(y, MH, scale_h)
        x0, x1, wx0, wx1 = _source_taps(x, MW, scale_w)
        k = tl.arange(0, K_P)
        k_ok = k < num_bases
        ok = k_ok[:, None] & pix_ok[None, :]
        rows = (n * num_bases + k).to(tl.int64)
        a_row = attns_ptr + rows[:, None] * (MH * MW)
        a00 = tl.load(a_row + (y0 * MW + x0)[None, :], mask=ok, other=0.0).to(tl.float32)
        a01 = tl.load(a_row + (y0 * MW + x1)[None, :], mask=ok, other=0.0).to(tl.float32)
        a10 = tl.load(a_row + (y1 * MW + x0)[None, :], mask=ok, other=0.0).to(tl.float32)
        a11 = tl.load(a_row + (y1 * MW + x1)[None, :], mask=ok, other=0.0).to(tl.float32)
        # the association order of PyTorch's kernels: wy0·(wx0·a00 + wx1·a01) + wy1·(wx0·a10 + wx1·a11)
        a = wy0[None, :] * (wx0[None, :] * a00 + wx1[None, :] * a01) \
            + wy1[None, :] * (wx0[None, :] * a10 + wx1[None, :] * a11)
        a = tl.where(k_ok[:, None], a, float("-inf"))  # padded bases get exp(-inf) = 0
        e = tl.exp(a - tl.max(a, axis=0)[None, :])
        s = e / tl.sum(e, axis=0)[None, :]
        r = tl.load(bases_ptr + rows[:, None] * (RH * RW) + pix[None, :], mask=ok, other=0.0).to(tl.float32)
        return r, s, tl.sum(s * r, axis=0)

    @triton.jit
    def _blend_fwd_kernel(bases_ptr, attns_ptr, out_ptr, first_roi, num_bases, RH, RW, MH, MW, scale_h, scale_w,
                          K_P: tl.constexpr, BLOCK: tl.constexpr):
        n = (tl.program_id(1) + first_roi).to(tl.int64)
        pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        pix_ok = pix < RH * RW
        _, _, m = _softmax_blend(bases_ptr, attns_ptr, n, pix, pix_ok, num_bases, RH, RW, MH, MW, scale_h, scale_w,
                                 K_P)
        tl.store(out_ptr + n * (RH * RW) + pix, m.to(out_ptr.dtype.element_ty), mask=pix_ok)

    @triton.jit
    def _blend_bwd_kernel(bases_ptr, attns_ptr, grad_out_ptr, grad_bases_ptr, grad_up_ptr, first_roi, num_bases,
                          RH, RW, MH, MW, scale_h, scale_w, K_P: tl.constexpr, BLOCK: tl.constexpr):
        n = (tl.program_id(1) + first_roi).to(tl.int64)
        pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        pix_ok = pix < RH * RW
        r, s, m = _softmax_blend(bases_ptr, attns_ptr, n, pix, pix_ok, num_bases, RH, RW, MH, MW, scale_h,
                                 scale_w, K_P)
        g = tl.load(grad_out_ptr + n * (RH * RW) + pix, mask=pix_ok, other=0.0).to(tl.float32)
        k = tl.arange(0, K_P)
        ok = (k < num_bases)[:, None] & pix_ok[None, :]
        offs = (n * num_bases + k).to(tl.int64)[:, None] * (RH * RW) + pix[None, :]
        gs = g[None, :] * s
        tl.store(grad_bases_ptr + offs, gs.to(grad_bases_ptr.dtype.element_ty), mask=ok)  # ∂L/∂r_k = g·s_k
        tl.store(grad_up_ptr + offs, gs * (r - m[None, :]), mask=ok)  # ∂L/∂a'_k = g·s_k·(r_k − m), fp32


def _scale(in_size: int, out_size: int) -> float:
    """``in/out`` rounded to fp32 as PyTorch's kernels compute it (``(float)in / out``); exact as a Python float."""
    return float(torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size),
                                                                                 dtype=torch.float32))


def bilinear_matrix(in_size: int, out_size: int, device=None, dtype=torch.float32) -> Tensor:
    """``out×in`` matrix ``W`` of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis:
    ``interpolate(a) = W_y · a · W_xᵀ`` for an ``M_h×M_w`` map ``a``. Built with the kernel's fp32 arithmetic,
    directly on ``device`` (no host-to-device copy in the backward)."""
    scale = torch.tensor(_scale(in_size, out_size), dtype=torch.float32, device=device)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.long()
    i1 = i0 + (i0 < in_size - 1).long()
    w1 = (src - i0.float())[:, None]
    cols = torch.arange(in_size, device=device)[None, :]
    # both taps land on the same cell at the clamped last row: the weights add up to 1 there
    matrix = (1.0 - w1) * (cols == i0[:, None]) + w1 * (cols == i1[:, None])
    return matrix.to(dtype)


def _launch_config(num_bases: int) -> Tuple[int, int]:
    k_pad = max(2, triton.next_power_of_2(num_bases))  # a tile dimension of at least 2
    return k_pad, max(16, min(256, TILE // k_pad))


def _forward_triton(bases_rois: Tensor, attns: Tensor) -> Tensor:
    bases_rois, attns = bases_rois.contiguous(), attns.contiguous()
    n, k, r_h, r_w = bases_rois.shape
    m_h, m_w = attns.shape[2:]
    out = torch.empty((n, r_h, r_w), device=bases_rois.device, dtype=bases_rois.dtype)
    if out.numel() == 0:
        return out
    k_pad, block = _launch_config(k)
    blocks = triton.cdiv(r_h * r_w, block)
    for first in range(0, n, _MAX_GRID_Y):
        _blend_fwd_kernel[(blocks, min(_MAX_GRID_Y, n - first))](
            bases_rois, attns, out, first, k, r_h, r_w, m_h, m_w, _scale(m_h, r_h), _scale(m_w, r_w),
            K_P=k_pad, BLOCK=block, num_warps=NUM_WARPS)
    return out


def _backward_triton(grad_out: Tensor, bases_rois: Tensor, attns: Tensor) -> Tuple[Tensor, Tensor]:
    bases_rois, attns, grad_out = bases_rois.contiguous(), attns.contiguous(), grad_out.contiguous()
    n, k, r_h, r_w = bases_rois.shape
    m_h, m_w = attns.shape[2:]
    if n == 0 or r_h * r_w == 0:
        return torch.zeros_like(bases_rois), torch.zeros_like(attns)
    grad_bases = torch.empty_like(bases_rois)
    grad_up = torch.empty(bases_rois.shape, device=bases_rois.device, dtype=torch.float32)  # ∂L/∂a' at R×R
    k_pad, block = _launch_config(k)
    blocks = triton.cdiv(r_h * r_w, block)
    for first in range(0, n, _MAX_GRID_Y):
        _blend_bwd_kernel[(blocks, min(_MAX_GRID_Y, n - first))](
            bases_rois, attns, grad_out, grad_bases, grad_up, first, k, r_h, r_w, m_h, m_w, _scale(m_h, r_h),
            _scale(m_w, r_w), K_P=k_pad, BLOCK=block, num_warps=NUM_WARPS)
    # the adjoint of a' = W_y·a·W_xᵀ: ∂L/∂a = W_yᵀ·∂L/∂a'·W_x (deterministic, unlike a scatter with atomics)
    w_y = bilinear_matrix(m_h, r_h, bases_rois.device)
    w_x = bilinear_matrix(m_w, r_w, bases_rois.device)
    grad_attns = torch.matmul(torch.matmul(w_y.t(), grad_up), w_x)
    return grad_bases, grad_attns.to(attns.dtype)


def _backward_reference(grad_out: Tensor, bases_rois: Tensor, attns: Tensor) -> Tuple[Tensor, Tensor]:
    # torch.func.vjp, not torch.autograd.grad: inside a custom op's implementation the autograd keys are excluded
    out, vjp = torch.func.vjp(lambda b, a: blend_reference(b, a, "bilinear", "softmax"), bases_rois.detach(),
                              attns.detach())
    return vjp(grad_out.to(out.dtype))


# --- the custom ops: Triton where it can run, the reference otherwise (so the ops are valid on any device) ---

@torch.library.custom_op("onestage::blend", mutates_args=())
def _blend_op(bases_rois: Tensor, attns: Tensor) -> Tensor:
    """Bilinear + softmax blender (``blend_reference(bases_rois, attns, "bilinear", "softmax")``)."""
    if triton_supported(bases_rois):
        return _forward_triton(bases_rois, attns)
    with torch.no_grad():
        return blend_reference(bases_rois, attns, "bilinear", "softmax").clone()


@_blend_op.register_fake
def _(bases_rois, attns):
    return bases_rois.new_empty((bases_rois.shape[0],) + tuple(bases_rois.shape[2:]))


@torch.library.custom_op("onestage::blend_backward", mutates_args=())
def _blend_backward_op(grad_out: Tensor, bases_rois: Tensor, attns: Tensor) -> Tuple[Tensor, Tensor]:
    if triton_supported(bases_rois):
        return _backward_triton(grad_out, bases_rois, attns)
    return _backward_reference(grad_out, bases_rois, attns)


@_blend_backward_op.register_fake
def _(grad_out, bases_rois, attns):
    return (torch.empty_like(bases_rois, memory_format=torch.contiguous_format),
            torch.empty_like(attns, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    bases_rois, attns = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None
    return _blend_backward_op(grad_out, bases_rois, attns)


_blend_op.register_autograd(_backward, setup_context=_setup_context)


def blend(bases_rois: Tensor, attns: Tensor, interpolation: str = "bilinear", normalize: str = "softmax",
          force_reference: bool = False) -> Tensor:
    """The blender (module docstring): same arguments, result and gradients as :func:`blend_reference`.

    Runs the fused Triton kernels for CUDA tensors with ``interpolation="bilinear"``, ``normalize="softmax"`` and
    ``K ≤ MAX_KERNEL_BASES``; :func:`blend_reference` otherwise, or always with ``force_reference=True`` or
    ``ONESTAGE_FORCE_REFERENCE=1``.
    """
    _check(bases_rois, attns, interpolation, normalize)
    if (force_reference or force_reference_from_env() or not triton_supported(bases_rois)
            or not kernel_supports(bases_rois.shape[1], interpolation, normalize)):
        return blend_reference(bases_rois, attns, interpolation, normalize)
    return _blend_op(bases_rois, attns)


def fcis_attention(grid: int, num_instances: int = 1, device=None, dtype=torch.float32) -> Tensor:
    """FCIS's fixed one-hot attention as a blender input: ``num_instances×grid²×grid×grid`` with
    ``A[:, i·grid + j, i, j] = 1`` — basis ``k = i·grid + j`` owns tile ``(i, j)`` (row ``i``, column ``j``) of the
    RoI. With ``interpolation="nearest"`` and ``normalize="none"`` the blender then assembles position-sensitive
    crops exactly as FCIS does (BlendMask §4.1: "fixed one-hot blending attentions and nearest neighbour top-level
    interpolation")."""
    eye = torch.eye(grid * grid, device=device, dtype=dtype).reshape(grid * grid, grid, grid)
    return eye.unsqueeze(0).expand(num_instances, -1, -1, -1)
