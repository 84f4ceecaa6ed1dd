"""Draw predictions (boxes, labels, scores, masks) on an image with torchvision's drawing utilities."""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_predictions", "save_figure", "class_colors"]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, stable RGB colours per class (evenly spaced hues), so a class keeps its colour across figures."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95))
            for i in range(max(num_classes, 1))]


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def draw_predictions(
    image: torch.Tensor,
    preds: dict,
    class_names: Optional[Sequence[str]] = None,
    score_thresh: float = 0.3,
    title: Optional[str] = None,
    mask_alpha: float = 0.45,
    figsize: Optional[tuple] = None,
) -> Figure:
    """Overlay the predictions scoring at least ``score_thresh`` on ``image`` (``3×H×W`` float 0..1 or uint8).

    ``preds`` is one entry of a model's eval output (``boxes``, ``scores``, ``labels``, optional ``masks``), or a
    target dict (no ``scores``: everything is drawn). Colours follow the class.
    """
    img = _to_uint8(image)
    scores = preds.get("scores")
    keep = (scores.detach().cpu() >= score_thresh) if scores is not None else torch.ones(len(preds["boxes"]), dtype=bool)
    boxes = preds["boxes"].detach().float().cpu()[keep]
    labels = preds["labels"].detach().cpu()[keep]
    n_cls = max(len(class_names) if class_names else 0, int(labels.max()) + 1 if len(labels) else 1)
    palette = class_colors(n_cls)
    colors = [palette[int(c)] for c in labels]
    if "masks" in preds and len(boxes):
        masks = preds["masks"].detach().cpu()[keep].bool()
        img = draw_segmentation_masks(img, masks, alpha=mask_alpha, colors=colors)
    if len(boxes):
        texts = []
        for i, c in enumerate(labels.tolist()):
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            texts.append(f"{name} {float(scores[keep][i]):.2f}" if scores is not None else name)
        img = draw_bounding_boxes(img, boxes, labels=texts, colors=colors, width=2)
    h, w = img.shape[-2:]
    fig = Figure(figsize=figsize or (max(4.0, w / 100), max(4.0, w / 100) * h / w))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_axis_off()
    ax.set_title(title or f"{len(boxes)} detections (score ≥ {score_thresh:g})", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` atomically (temporary file + rename): a reader never sees a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
