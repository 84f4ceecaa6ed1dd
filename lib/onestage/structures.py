"""Small structures shared by every model: batching images and box conversions."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor], size_divisibility: int = 32, pad_value: float = 0.0):
    """Stack ``C×H×W`` images into one ``B×C×Hp×Wp`` tensor, zero-padded at the right/bottom.

    ``Hp``/``Wp`` are the largest height/width rounded up to a multiple of ``size_divisibility``
    (detectron2's ``SIZE_DIVISIBILITY = 32``: every backbone stage then divides the input exactly).
    Returns the batch and the list of original ``(h, w)`` sizes.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for img in images:
        if img.dim() != 3:
            raise ValueError(f"expected C×H×W images, got shape {tuple(img.shape)}")
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 1:
        max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
        max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)
    batch = images[0].new_full((len(images), images[0].shape[0], max_h, max_w), pad_value)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch, sizes


def normalize_and_pad(images: Sequence[Tensor], mean: Tensor, std: Tensor, size_divisibility: int = 32):
    """``(img − mean) / std`` for each 0..1 image (moved to ``mean``'s device, float32), then :func:`pad_images` —
    zero padding is the mean colour after normalising, as detectron2 does. Returns the batch and the sizes."""
    normed = [(img.to(mean.device, torch.float32) - mean) / std for img in images]
    return pad_images(normed, size_divisibility)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``[x, y, w, h]`` → ``[x0, y0, x1, y1]``."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``[x0, y0, x1, y1]`` → COCO ``[x, y, w, h]``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes (pixel edges, so a single pixel at (x, y) gives ``[x, y, x+1, y+1]``) of ``N×H×W`` masks.

    Empty masks give an all-zero box. Written without a branch on the number of masks or an in-place masked
    assignment, so that it traces into an ONNX graph as it is (``onestage.export``).
    """
    m = masks.bool()
    rows = m.any(dim=2)  # N×H
    cols = m.any(dim=1)  # N×W
    h, w = m.shape[-2:]
    ys = torch.arange(h, device=m.device)
    xs = torch.arange(w, device=m.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ys, big).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x0 = torch.where(cols, xs, big).min(dim=1).values
    x1 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


def mask_centers(masks: Tensor, boxes: Optional[Tensor] = None) -> Tensor:
    """Centres of mass ``N×2`` (x, y) of ``N×H×W`` masks, in pixel *indices* as the CondInst reference computes them
    (AdelaiDet ``FCOSOutputs.get_sample_region``: ``Σ x·m / Σ m`` with ``x = 0 … W−1``), so a mask covering pixels
    0…9 has its centre at 4.5, half a pixel left of its box centre 5.0 (the reference's convention, kept for
    equality). An empty mask (the reference would give (0, 0)) falls back to the centre of its ``boxes`` row when
    given, else (0, 0)."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, 2), dtype=torch.float32)
    m = masks.float()
    h, w = m.shape[-2:]
    xs = torch.arange(w, dtype=torch.float32, device=m.device)
    ys = torch.arange(h, dtype=torch.float32, device=m.device)
    area = m.sum(dim=(1, 2))
    centers = torch.stack([(m.sum(dim=1) * xs).sum(dim=1), (m.sum(dim=2) * ys).sum(dim=1)], dim=1)
    centers = centers / area.clamp(min=1e-6)[:, None]
    if boxes is not None:
        empty = area == 0
        box_centers = torch.stack([boxes[:, [0, 2]].mean(dim=1), boxes[:, [1, 3]].mean(dim=1)], dim=1).float()
        centers[empty] = box_centers.to(centers.device)[empty]
    return centers


def mask_iou(masks_a: Tensor, masks_b: Tensor) -> Tensor:
    """IoU matrix ``A×B`` of binary masks ``A×H×W`` and ``B×H×W`` (one matrix product; empty masks give IoU 0)."""
    a = masks_a.reshape(masks_a.shape[0], -1).float()
    b = masks_b.reshape(masks_b.shape[0], -1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def mask_nms(masks: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Greedy class-aware NMS on mask IoU (no boxes involved): indices kept, by decreasing score.

    The classic sequential algorithm: visit masks by decreasing score; drop one that overlaps an already kept mask of
    the same class by more than ``iou_threshold``. Used by CondInst Table 5 ("mask NMS") and as SOLO's baseline to
    Matrix NMS. O(n²) IoUs are computed at once; only the keep/drop sweep is sequential.
    """
    if masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    order = scores.argsort(descending=True)
    ious = mask_iou(masks[order], masks[order])
    same_class = labels[order][:, None] == labels[order][None, :]
    suppresses = (ious > iou_threshold) & same_class
    keep = torch.ones(order.numel(), dtype=torch.bool, device=masks.device)
    for i in range(order.numel()):
        if keep[i]:
            later = suppresses[i].clone()
            later[: i + 1] = False
            keep &= ~later
    return order[keep]
