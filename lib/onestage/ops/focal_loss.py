"""Fused sigmoid focal loss (RetinaNet, arXiv 1708.02002 eq. 5) with integer targets: a Triton kernel per direction.

Convention of :func:`sigmoid_focal_loss_reference` (the reference, the CPU path and the test oracle, exported to the
models as :func:`onestage.modeling.losses.sigmoid_focal_loss`):
``logits`` ``L×C``, ``targets`` ``L`` integers where ``C`` (or any value outside ``0..C-1``) means background,
``alpha`` weighs positives and ``1 - alpha`` negatives (``alpha < 0``: no weighting), sum reduction (FCOS divides by
the number of positives itself, AdelaiDet ``adet/modeling/fcos/fcos_outputs.py``).

Per logit ``x`` with ``p = σ(x)`` the kernel evaluates, in fp32 whatever the input dtype, and without ever building the
one-hot target matrix (the target of a row is compared with the column index in registers)::

    negative:  (1-α) · p^γ · softplus(x)          d/dx = (1-α) · p^γ · (γ(1-p)·softplus(x) + p)
    positive:   α · (1-p)^γ · softplus(-x)        d/dx = -α · (1-p)^γ · (γ·p·softplus(-x) + (1-p))

with ``p^γ = exp(-γ·softplus(-x))`` and ``(1-p)^γ = exp(-γ·softplus(x))``, finite for every finite ``x`` and for
``γ = 0`` (no ``0^0``, no ``log 0``).

Cost (``L`` locations, ``C`` classes, ``e`` bytes per logit, ``t`` bytes per target):

* forward: ≈ 12 FLOPs + 3 transcendental ops per logit (sigmoid, softplus, power); reads ``L·C·e + L·t`` bytes and
  writes one fp32 partial sum per row block (the partials are summed by ``torch.sum``: deterministic, no atomics).
  At COCO scale (20k × 80, fp32) that is 6.4 MB read.
* backward: recomputes the forward terms (no activation saved besides the inputs) and writes the gradient:
  reads ``L·C·e + L·t``, writes ``L·C·e`` bytes; the upstream gradient is read from device memory (no host sync).

The reference makes ~10 full ``L×C`` temporaries in the forward and as many again in autograd's
backward; the kernels touch each logit once per direction.

Dispatch: :func:`sigmoid_focal_loss` sends CUDA tensors to the custom op ``torch.ops.onestage.sigmoid_focal_loss``
(Triton forward, Triton backward through ``torch.library.register_autograd``; works under ``torch.compile``) and CPU
tensors to the reference. ``ONESTAGE_FORCE_REFERENCE=1`` or ``force_reference=True`` forces the reference anywhere.
With ``TRITON_INTERPRET=1`` set *before* this module is imported, the kernels also run on CPU tensors through
Triton's interpreter (how the tests check them on machines without a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.ops._triton import (HAS_TRITON, TRITON_INTERPRET, force_reference_from_env, tl, triton,
                                   triton_supported)

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_reference", "triton_supported", "HAS_TRITON",
           "TRITON_INTERPRET"]

BLOCK_ROWS = 64
BLOCK_COLS = 32
NUM_WARPS = 4


if HAS_TRITON:
    @triton.jit
    def _softplus(x):
        # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), z = exp(-|x|) in (0, 1]. log(1 + z) alone loses the
        # low bits of a small z (relative error eps/z); Kahan's log1p(z) = log(u)·z/(u − 1), u = 1 + z, cancels the
        # rounding of u and stays within a few ulps (z where u rounds to 1).
        z = tl.exp(-tl.abs(x))
        u = 1.0 + z
        d = u - 1.0
        log1p_z = tl.where(d == 0.0, z, tl.log(u) * (z / tl.where(d == 0.0, 1.0, d)))
        return tl.maximum(x, 0.0) + log1p_z

    @triton.jit
    def _focal_fwd_kernel(logits_ptr, targets_ptr, partial_ptr, num_rows, num_cols, stride_row, stride_col,
                          alpha_pos, alpha_neg, gamma,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        rows64 = rows.to(tl.int64)
        target = tl.load(targets_ptr + rows64, mask=row_ok, other=-1).to(tl.int32)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, num_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < num_cols)[None, :]
            x = tl.load(logits_ptr + rows64[:, None] * stride_row + cols[None, :] * stride_col, mask=ok,
                        other=0.0).to(tl.float32)
            sp_pos = _softplus(x)     # -log(1 - p)
            sp_neg = _softplus(-x)    # -log(p)
            is_pos = cols[None, :] == target[:, None]
            neg = alpha_neg * tl.exp(-gamma * sp_neg) * sp_pos
            pos = alpha_pos * tl.exp(-gamma * sp_pos) * sp_neg
            acc += tl.where(ok, tl.where(is_pos, pos, neg), 0.0)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))

    @triton.jit
    def _focal_bwd_kernel(logits_ptr, targets_ptr, grad_out_ptr, grad_ptr, num_rows, num_cols, stride_row,
                          stride_col, alpha_pos, alpha_neg, gamma,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < num_rows
        rows64 = rows.to(tl.int64)
        target = tl.load(targets_ptr + rows64, mask=row_ok, other=-1).to(tl.int32)
        g = tl.load(grad_out_ptr).to(tl.float32)
        for c0 in range(0, num_cols, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < num_cols)[None, :]
            x = tl.load(logits_ptr + rows64[:, None] * stride_row + cols[None, :] * stride_col, mask=ok,
                        other=0.0).to(tl.float32)
            sp_pos = _softplus(x)
            sp_neg = _softplus(-x)
            p = tl.exp(-sp_neg)       # σ(x)
            q = tl.exp(-sp_pos)       # 1 - σ(x), without the cancellation of 1 - p
            is_pos = cols[None, :] == target[:, None]
            d_neg = alpha_neg * tl.exp(-gamma * sp_neg) * (gamma * q * sp_pos + p)
            d_pos = -alpha_pos * tl.exp(-gamma * sp_pos) * (gamma * p * sp_neg + q)
            d = g * tl.where(is_pos, d_pos, d_neg)
            # grad is a fresh contiguous L×C tensor
            tl.store(grad_ptr + rows64[:, None] * num_cols + cols[None, :], d.to(grad_ptr.dtype.element_ty),
                     mask=ok)


def sigmoid_focal_loss_reference(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                                 reduction: str = "sum") -> Tensor:
    """Sigmoid focal loss (Lin et al., RetinaNet, arXiv 1708.02002 eq. 5) with *integer* class targets.

    ``logits``: ``N×C``; ``targets``: ``N`` int64 in ``0..C`` where ``C`` (= ``num_classes``) means background,
    the convention of AdelaiDet/detectron2. It equals torchvision's ``sigmoid_focal_loss`` on the one-hot targets
    (tested); the one-hot matrix is never built: the loss of every logit is computed as a negative, and the
    positive (location, class) entries, one per foreground location, are then corrected in place of it.
    This keeps memory at one ``N×C`` tensor, which matters for 80 classes × ~20k locations × batch.

    ``alpha`` weighs positives (``1 - alpha`` negatives); ``alpha < 0`` disables the weighting, as in fvcore.
    ``reduction``: ``"sum"`` (FCOS divides by #positives itself), ``"mean"`` or ``"none"`` (``N×C``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be N×C, got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    targets = targets.long()
    p = torch.sigmoid(logits)
    # negative term for every entry: -(1-alpha) * p^gamma * log(1-p);  BCE(x, 0) = softplus(x) = -log(1-p)
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * p.pow(gamma)
    if alpha >= 0:
        loss = loss * (1 - alpha)
    fg = (targets >= 0) & (targets < num_classes)
    if fg.any():
        rows = fg.nonzero().squeeze(1)
        cols = targets[rows]
        x = logits[rows, cols]
        pt = p[rows, cols]
        pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none") * (1 - pt).pow(gamma)
        if alpha >= 0:
            pos = pos * alpha
        # index_put (not in-place on a view of a graph tensor) keeps autograd exact for the replaced entries
        loss = loss.index_put((rows, cols), pos)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


def _alpha_weights(alpha: float):
    return (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)


def _check(logits: Tensor, targets: Tensor):
    if logits.dim() != 2:
        raise ValueError(f"logits must be L×C, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be ({logits.shape[0]},), got {tuple(targets.shape)}")


def _forward_triton(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    num_rows, num_cols = logits.shape
    if num_rows == 0 or num_cols == 0:
        return logits.new_zeros(())
    grid = triton.cdiv(num_rows, BLOCK_ROWS)
    partial = torch.empty(grid, device=logits.device, dtype=torch.float32)
    alpha_pos, alpha_neg = _alpha_weights(alpha)
    _focal_fwd_kernel[(grid,)](logits, targets, partial, num_rows, num_cols, logits.stride(0), logits.stride(1),
                               alpha_pos, alpha_neg, float(gamma), BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS,
                               num_warps=NUM_WARPS)
    return partial.sum().to(logits.dtype)


def _backward_triton(grad_out: Tensor, logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    num_rows, num_cols = logits.shape
    grad = torch.empty((num_rows, num_cols), device=logits.device, dtype=logits.dtype)
    if grad.numel() == 0:
        return grad
    alpha_pos, alpha_neg = _alpha_weights(alpha)
    grid = triton.cdiv(num_rows, BLOCK_ROWS)
    _focal_bwd_kernel[(grid,)](logits, targets, grad_out.reshape(1), grad, num_rows, num_cols, logits.stride(0),
                               logits.stride(1), alpha_pos, alpha_neg, float(gamma), BLOCK_R=BLOCK_ROWS,
                               BLOCK_C=BLOCK_COLS, num_warps=NUM_WARPS)
    return grad


def _backward_reference(grad_out: Tensor, logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    # torch.func.vjp, not torch.autograd.grad: inside a custom op's implementation the autograd keys are excluded
    loss, vjp = torch.func.vjp(lambda x: sigmoid_focal_loss_reference(x, targets, alpha, gamma, reduction="sum"),
                               logits.detach())
    (grad,) = vjp(grad_out.to(loss.dtype))
    return grad


# --- the custom op: Triton where it can run, the reference otherwise (so the op itself is valid on any device) ---

@torch.library.custom_op("onestage::sigmoid_focal_loss", mutates_args=())
def _focal_op(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    if triton_supported(logits):
        return _forward_triton(logits, targets, alpha, gamma)
    with torch.no_grad():
        return sigmoid_focal_loss_reference(logits, targets, alpha, gamma, reduction="sum")


@_focal_op.register_fake
def _(logits, targets, alpha, gamma):
    return logits.new_empty(())


@torch.library.custom_op("onestage::sigmoid_focal_loss_backward", mutates_args=())
def _focal_backward_op(grad_out: Tensor, logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    if triton_supported(logits):
        return _backward_triton(grad_out, logits, targets, alpha, gamma)
    return _backward_reference(grad_out, logits, targets, alpha, gamma)


@_focal_backward_op.register_fake
def _(grad_out, logits, targets, alpha, gamma):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, targets, alpha, gamma = inputs
    ctx.save_for_backward(logits, targets)
    ctx.alpha, ctx.gamma = alpha, gamma


def _backward(ctx, grad_out):
    logits, targets = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _focal_backward_op(grad_out, logits, targets, ctx.alpha, ctx.gamma)
    return grad, None, None, None


_focal_op.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       force_reference: bool = False) -> Tensor:
    """Summed sigmoid focal loss of ``L×C`` logits against integer ``targets`` (``C`` = background).

    Same value and gradient as :func:`onestage.modeling.losses.sigmoid_focal_loss` with ``reduction="sum"``
    (to float rounding); runs the fused Triton kernels for CUDA tensors, the reference otherwise.
    """
    _check(logits, targets)
    if force_reference or force_reference_from_env() or not triton_supported(logits):
        return sigmoid_focal_loss_reference(logits, targets, alpha, gamma, reduction="sum")
    return _focal_op(logits, targets, float(alpha), float(gamma))
