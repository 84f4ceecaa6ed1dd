"""Losses shared by every head: sigmoid focal loss, IoU/GIoU loss in ltrb space, dice loss.

All return un-normalised sums (or per-instance values for dice); each model divides by its own normaliser
(FCOS: number of positives, or the sum of center-ness targets), because that choice is part of the algorithm.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The focal loss lives with its kernel (onestage.ops.focal_loss), as every op's reference does; this is that reference.
from onestage.ops.focal_loss import sigmoid_focal_loss_reference as sigmoid_focal_loss

__all__ = ["sigmoid_focal_loss", "iou_loss_ltrb", "ltrb_ious", "dice_loss"]


def ltrb_ious(pred: Tensor, target: Tensor, smooth: float = 1.0, eps: float = 1e-7):
    """IoU and GIoU of boxes given as distances ``(l, t, r, b)`` from the same point (FCOS's ``compute_ious``).

    Because both boxes share the anchor point, the intersection is ``(min l + min r)(min t + min b)`` and the
    smallest enclosing box ``(max l + max r)(max t + max b)``; no coordinates are needed.

    ``smooth``: AdelaiDet computes ``iou = (I + 1) / (U + 1)``. Its targets are stride-normalised, so that +1
    is one stride² — a 2-stride-wide box on P3 gets a very different amount of smoothing than on P7 in pixel terms
    but the same in stride units. We keep ``smooth=1`` as the default of :func:`iou_loss_ltrb` (it is what the
    published AdelaiDet numbers were trained with) and ``smooth=0`` gives the plain IoU (torchvision's choice).
    Returns ``(iou, giou)``, each of shape ``N``.
    """
    pl, pt, pr, pb = pred.unbind(-1)
    tl, tt, tr, tb = target.unbind(-1)
    area_p = (pl + pr) * (pt + pb)
    area_t = (tl + tr) * (tt + tb)
    w_i = torch.min(pl, tl) + torch.min(pr, tr)
    h_i = torch.min(pt, tt) + torch.min(pb, tb)
    inter = w_i * h_i
    union = area_p + area_t - inter
    iou = (inter + smooth) / (union + smooth).clamp(min=eps)
    w_c = torch.max(pl, tl) + torch.max(pr, tr)
    h_c = torch.max(pt, tt) + torch.max(pb, tb)
    enclose = w_c * h_c + eps
    giou = iou - (enclose - union) / enclose
    return iou, giou


def iou_loss_ltrb(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None, loss_type: str = "giou",
                  smooth: float = 1.0, reduction: str = "sum") -> Tensor:
    """IoU-family box loss on ltrb distances (UnitBox IoU loss, FCOS paper §3.1 eq. 2; GIoU of Rezatofighi et al.).

    ``loss_type``: ``"giou"`` → 1 − GIoU (AdelaiDet default ``LOC_LOSS_TYPE``), ``"iou"`` → −log IoU (the
    paper's UnitBox loss), ``"linear_iou"`` → 1 − IoU. ``weight`` (``N``) multiplies each box's loss — FCOS passes
    the center-ness targets. ``smooth`` is explained in :func:`ltrb_ious`.
    """
    iou, giou = ltrb_ious(pred, target, smooth=smooth)
    if loss_type == "giou":
        losses = 1 - giou
    elif loss_type == "iou":
        losses = -torch.log(iou.clamp(min=1e-7))  # clamp: a zero-overlap box would give log 0 = -inf
    elif loss_type == "linear_iou":
        losses = 1 - iou
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'giou', 'iou' or 'linear_iou'")
    if weight is not None:
        losses = losses * weight
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    if reduction == "none":
        return losses
    raise ValueError(f"unknown reduction {reduction!r}")


def dice_loss(pred_probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """Dice loss per instance (V-Net, Milletari et al. 2016), the form CondInst (arXiv 2003.05664 eq. 3) and
    SOLO use: ``1 − 2Σxy / (Σx² + Σy² + eps)``.

    ``pred_probs``, ``targets``: ``N×...`` (probabilities after sigmoid; binary or soft targets). Returns ``N``
    losses; the caller averages (CondInst: mean over instances) or weights them. ``eps``: CondInst's 1e-5;
    SOLO writes ``Σx² + 0.001 + Σy² + 0.001``, i.e. ``eps=2e-3``.
    """
    n = pred_probs.shape[0]
    x = pred_probs.reshape(n, -1)
    y = targets.reshape(n, -1).to(x.dtype)
    inter = (x * y).sum(dim=1)
    denom = (x * x).sum(dim=1) + (y * y).sum(dim=1) + eps
    return 1.0 - 2.0 * inter / denom
