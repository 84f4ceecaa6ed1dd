"""Center-ness (FCOS §3.3): what the target looks like, how it re-ranks a trained model's boxes, what it does to NMS.

FCOS (Tian et al., arXiv 1904.01355) lets every location inside an object regress a box. Locations far from the
object's centre see only a part of it and tend to predict poor boxes, yet their classification score can be high.
§3.3 adds a one-channel branch trained (BCE) towards eq. 3,

    centerness* = sqrt( min(l*, r*) / max(l*, r*) · min(t*, b*) / max(t*, b*) ),

1 at the box centre and 0 on its border. At test time the class score is multiplied by the predicted center-ness
(here, as in AdelaiDet, the geometric mean ``sqrt(cls · ctr)``), so those far-off boxes sink in the ranking and NMS
removes them. AdelaiDet (the authors' code, and the later arXiv/TPAMI versions) moves the branch from the
classification tower to the regression tower (``centerness_on="reg"``).

Nothing here re-implements FCOS: targets come from ``centerness_target``, candidate boxes from the model's own
``FCOSHead`` outputs decoded exactly as ``postprocess`` does (same threshold, same per-level top-k), detections from
``postprocess`` itself — run once with the center-ness map and once with it removed (``ctrness=None``, which makes
``postprocess`` rank by the class score alone). Every plotting function returns a ``matplotlib.figure.Figure``
(no pyplot state); :func:`centerness_explorer` wraps :func:`plot_detections` in ipywidgets controls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor
from torchvision.ops import box_iou
from torchvision.utils import draw_bounding_boxes

from onestage.modeling.fcos import (FCOSHeadOutputs, centerness_target, compute_locations, postprocess,
                                    postprocess_kwargs)
from onestage.viz._model import model_device
from onestage.viz.widgets import figure_explorer

__all__ = [
    "CENTERNESS_FORMULA",
    "centerness_map",
    "plot_centerness_heatmaps",
    "RerankTable",
    "head_outputs",
    "rerank_candidates",
    "rerank_table",
    "spearman",
    "plot_rerank",
    "rerank_tables",
    "find_demo",
    "rerank_summary",
    "rerank_summary_markdown",
    "plot_quality_vs_location",
    "match_detections",
    "detect",
    "nms_effect",
    "nms_effect_markdown",
    "plot_detections",
    "centerness_explorer",
]

CENTERNESS_FORMULA = (r"$\mathrm{centerness}^* = "
                      r"\sqrt{\frac{\min(l^*, r^*)}{\max(l^*, r^*)}"
                      r"\cdot\frac{\min(t^*, b^*)}{\max(t^*, b^*)}}$")


# ---------------------------------------------------------------------------------------------------------------
# 1. The target (eq. 3)
# ---------------------------------------------------------------------------------------------------------------

def centerness_map(width: float, height: float, stride: float = 1.0):
    """Eq. 3 at the points ``0, s, 2s, … ≤ width`` × ``0, s, … ≤ height`` of a box ``[0, width] × [0, height]``.

    Returns ``(xs, ys, ctr)`` with ``ctr[j, i]`` the target at ``(xs[i], ys[j])``, from ``centerness_target``. The
    grid includes the border (value 0) and, when ``width / (2·stride)`` is whole, the centre (value 1).
    """
    xs = torch.arange(0.0, float(width) + 1e-6, float(stride))
    ys = torch.arange(0.0, float(height) + 1e-6, float(stride))
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    ltrb = torch.stack([xx, yy, float(width) - xx, float(height) - yy], dim=-1)
    return xs, ys, centerness_target(ltrb)


def plot_centerness_heatmaps(box_sizes: Sequence[Sequence[float]] = ((64, 64), (128, 32), (32, 128), (96, 48)),
                             stride: float = 1.0, levels: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
                             panel: float = 3.0) -> Figure:
    """One heatmap of the center-ness target per ``(width, height)`` box, on a common pixel scale, with contour
    lines at ``levels``. The formula is the figure's title, with the share of a box where the target exceeds 0.5
    (the same for every shape). ``stride`` spaces the sample points (1: every pixel; 8: the P3 grid)."""
    sizes = [(float(w), float(h)) for w, h in box_sizes]
    big = max(max(w, h) for w, h in sizes)
    fig = Figure(figsize=(panel * len(sizes) + 0.8, panel + 0.9), layout="constrained")
    axes = [fig.add_subplot(1, len(sizes), k + 1) for k in range(len(sizes))]
    im, share = None, 0.0
    for ax, (w, h) in zip(axes, sizes):
        xs, ys, ctr = centerness_map(w, h, stride)
        im = ax.imshow(ctr.numpy(), extent=(-stride / 2, w + stride / 2, h + stride / 2, -stride / 2),
                       cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        if len(xs) > 2 and len(ys) > 2:
            cs = ax.contour(xs.numpy(), ys.numpy(), ctr.numpy(), levels=list(levels), colors="white",
                            linewidths=0.8)
            ax.clabel(cs, fontsize=7, fmt="%.1f")
        ax.plot([w / 2], [h / 2], "+", color="red", ms=8, mew=1.5)
        ax.set_xlim(-(big - w) / 2 - stride, w + (big - w) / 2 + stride)
        ax.set_ylim(h + (big - h) / 2 + stride, -(big - h) / 2 - stride)
        share = float((ctr > 0.5).float().mean()) * 100
        ax.set_title(f"{w:g} × {h:g} box", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="center-ness target")
    fig.suptitle(f"FCOS eq. 3: {CENTERNESS_FORMULA}  (1 at the centre +, 0 on the border)\n"
                 f"scale-free in each direction: the target exceeds 0.5 on the same {share:.0f} % of every box, "
                 f"whatever its shape", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 2. Candidates before NMS, and how center-ness re-ranks them
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RerankTable:
    """Candidate boxes of one image *before NMS* (the (location, class) pairs ``postprocess`` would feed to NMS).

    ``cls``: the class probability; ``ctr``: the predicted center-ness (sigmoid); ``score = sqrt(cls·ctr)``;
    ``gt_index``: the ground-truth box of the same class with the highest IoU (−1: none overlaps); ``iou``: that IoU;
    ``center_dist``: distance (px) from the candidate's *location* to that box's centre; ``ctr_target``: eq. 3 of the
    location for that box (0 outside it). ``demo_gt`` is the ground truth where re-ranking changes the top box most
    (see :func:`rerank_candidates`), ``demo`` a summary of it.
    """

    boxes: Tensor
    labels: Tensor
    cls: Tensor
    ctr: Tensor
    score: Tensor
    level: Tensor
    stride: Tensor
    locations: Tensor
    gt_index: Tensor
    iou: Tensor
    center_dist: Tensor
    ctr_target: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    demo_gt: int = -1
    demo: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def spearman(self) -> dict:
        """Rank correlation with the IoU of the class score alone and of ``sqrt(cls·ctr)``, over all candidates."""
        return {"cls": spearman(self.cls, self.iou), "score": spearman(self.score, self.iou)}

    def of_gt(self, g: int) -> Tensor:
        """Indices of the candidates matched to ground truth ``g``."""
        return torch.nonzero(self.gt_index == g).flatten()

    def top(self, g: int, by: str = "score", k: int = 1) -> Tensor:
        """Indices of the ``k`` best candidates of ground truth ``g`` ranked ``by`` ``"cls"`` or ``"score"``."""
        idx = self.of_gt(g)
        key = getattr(self, by)[idx]
        return idx[torch.argsort(key, descending=True, stable=True)[:k]]

    def markdown(self, g: Optional[int] = None, k: int = 5, class_names: Optional[Sequence[str]] = None) -> str:
        """The ``k`` best candidates of ground truth ``g`` (default ``demo_gt``) by class score, with their rank by
        ``sqrt(cls·ctr)`` among the same candidates."""
        g = self.demo_gt if g is None else g
        idx = self.of_gt(g)
        if g < 0 or len(idx) == 0:
            return "(no candidate overlaps a ground-truth box)"
        by_score = idx[torch.argsort(self.score[idx], descending=True, stable=True)].tolist()
        lines = ["| rank by cls | rank by √(cls·ctr) | level | location → centre (px) | cls | ctr (pred) "
                 "| ctr* (eq. 3) | √(cls·ctr) | IoU |", "|---|---|---|---|---|---|---|---|---|"]
        for r, i in enumerate(self.top(g, "cls", k).tolist()):
            lines.append(f"| {r + 1} | {by_score.index(i) + 1} | P{int(round(math.log2(int(self.stride[i]))))} | "
                         f"{self.center_dist[i]:.0f} | {self.cls[i]:.2f} | {self.ctr[i]:.2f} | "
                         f"{self.ctr_target[i]:.2f} | {self.score[i]:.2f} | {self.iou[i]:.2f} |")
        return "\n".join(lines)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson correlation of their ranks, ties get the average
    rank), with torch only. NaN for fewer than 2 values or a constant input."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() < 2:
        return float("nan")

    def ranks(x: Tensor) -> Tensor:
        # average rank: (number of smaller values) + (number of equal values + 1) / 2, O(n²) but n is small
        less = (x[None, :] < x[:, None]).sum(dim=1).double()
        equal = (x[None, :] == x[:, None]).sum(dim=1).double()
        return less + (equal + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


@torch.inference_mode()
def head_outputs(model, image: Tensor):
    """Run ``model``'s backbone and head on one ``3×H×W`` image (RGB 0..1), as ``FCOS.forward`` does.

    Returns ``(head_out, locations, (H, W))`` (batch of one, on the CPU)."""
    if getattr(model, "head", None) is None or not hasattr(model, "preprocess"):
        raise TypeError(f"{type(model).__name__} is not an FCOS-style model (no .head / .preprocess)")
    was_training = model.training
    model.eval()
    try:
        batch, sizes = model.preprocess([image.to(model_device(model))])
        feats = model.features(batch)
        out = model.head(feats)
        locations = [loc.cpu() for loc in compute_locations(feats, model.strides)]
    finally:
        model.train(was_training)
    cpu = lambda xs: None if xs is None else [x.float().cpu() for x in xs]  # noqa: E731
    out = FCOSHeadOutputs(cpu(out.logits), cpu(out.bbox_reg), cpu(out.ctrness), [])
    return out, locations, tuple(int(v) for v in sizes[0])


def rerank_candidates(head_out: FCOSHeadOutputs, locations: Sequence[Tensor], strides: Sequence[int],
                      gt_boxes: Tensor, gt_labels: Optional[Tensor] = None, score_thresh: float = 0.05,
                      pre_nms_topk: int = 1000, image_index: int = 0) -> RerankTable:
    """The candidates ``postprocess`` would send to NMS for image ``image_index`` of ``head_out`` — (location,
    class) pairs with class score > ``score_thresh``, the ``pre_nms_topk`` best by cls·ctr per level, boxes decoded
    as ``x − l·s, y − t·s, x + r·s, y + b·s`` — each matched to the ground truth of its class it overlaps most.

    The demonstration ground truth is picked automatically: for every ground-truth box, compare its best candidate
    by class score with its best by ``sqrt(cls·ctr)``; ``demo_gt`` is the one where re-ranking raises the top box's
    IoU most (if re-ranking never changes a top box, the one with the most candidates).
    """
    if head_out.ctrness is None:
        raise ValueError("this model has no center-ness branch (centerness_on='none'): nothing to re-rank")
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    gt_labels = (torch.zeros(len(gt_boxes), dtype=torch.long) if gt_labels is None
                 else torch.as_tensor(gt_labels, dtype=torch.long).reshape(-1))
    cols = {k: [] for k in ("boxes", "labels", "cls", "ctr", "level", "stride", "locations")}
    for lvl, (locs, s) in enumerate(zip(locations, strides)):
        logit = head_out.logits[lvl][image_index]
        c = logit.shape[0]
        cls = logit.permute(1, 2, 0).reshape(-1, c).float().sigmoid()
        reg = head_out.bbox_reg[lvl][image_index].permute(1, 2, 0).reshape(-1, 4).float()
        ctr = head_out.ctrness[lvl][image_index].permute(1, 2, 0).reshape(-1).float().sigmoid()
        loc_idx, labels = (cls > score_thresh).nonzero(as_tuple=True)
        if loc_idx.numel() > pre_nms_topk:  # as postprocess: keep the best by cls·ctr
            top = (cls[loc_idx, labels] * ctr[loc_idx]).topk(pre_nms_topk).indices
            loc_idx, labels = loc_idx[top], labels[top]
        d = reg[loc_idx] * s
        p = locs[loc_idx].float()
        cols["boxes"].append(torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2],
                                          p[:, 1] + d[:, 3]], dim=1))
        cols["labels"].append(labels)
        cols["cls"].append(cls[loc_idx, labels])
        cols["ctr"].append(ctr[loc_idx])
        cols["level"].append(torch.full_like(labels, lvl))
        cols["stride"].append(torch.full_like(labels, int(s)))
        cols["locations"].append(p)
    t = {k: torch.cat(v) if v else torch.zeros(0) for k, v in cols.items()}
    n = len(t["labels"])
    boxes, labels = t["boxes"].reshape(-1, 4), t["labels"].long()
    score = torch.sqrt(t["cls"] * t["ctr"])
    if len(gt_boxes) and n:
        ious = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :])
        iou, gt_index = ious.max(dim=1)
        gt_index = torch.where(iou > 0, gt_index, torch.full_like(gt_index, -1))
    else:
        iou, gt_index = torch.zeros(n), torch.full((n,), -1, dtype=torch.long)
    g = gt_boxes[gt_index.clamp(min=0)] if len(gt_boxes) else torch.zeros(n, 4)
    loc = t["locations"].reshape(-1, 2)
    centre = (g[:, :2] + g[:, 2:]) / 2
    center_dist = torch.where(gt_index >= 0, (loc - centre).norm(dim=1), torch.full((n,), float("nan")))
    ltrb = torch.stack([loc[:, 0] - g[:, 0], loc[:, 1] - g[:, 1], g[:, 2] - loc[:, 0], g[:, 3] - loc[:, 1]], dim=1)
    inside = (ltrb.min(dim=1).values > 0) & (gt_index >= 0)
    ctr_target = torch.where(inside, centerness_target(ltrb.clamp(min=0)), torch.zeros(n))
    table = RerankTable(boxes, labels, t["cls"], t["ctr"], score, t["level"].long(), t["stride"].long(), loc,
                        gt_index, iou, center_dist, ctr_target, gt_boxes, gt_labels)
    _pick_demo(table)
    return table


def _pick_demo(t: RerankTable) -> None:
    best, best_key = -1, None
    for g in range(len(t.gt_boxes)):
        idx = t.of_gt(g)
        if len(idx) == 0:
            continue
        by_cls, by_score = int(t.top(g, "cls")[0]), int(t.top(g, "score")[0])
        gain = float(t.iou[by_score] - t.iou[by_cls])
        key = (gain, float(t.cls[by_cls] - t.cls[by_score]), len(idx))
        if best_key is None or key > best_key:
            best, best_key = g, key
    t.demo_gt = best
    if best >= 0:
        by_cls, by_score = int(t.top(best, "cls")[0]), int(t.top(best, "score")[0])
        idx = t.of_gt(best).tolist()
        rank_of = lambda key, i: sorted(idx, key=lambda j: -float(getattr(t, key)[j])).index(i) + 1  # noqa: E731
        t.demo = {"gt": best, "candidates": len(idx), "changed": by_cls != by_score,
                  "top_by_cls": by_cls, "top_by_score": by_score,
                  "iou_top_by_cls": float(t.iou[by_cls]), "iou_top_by_score": float(t.iou[by_score]),
                  "cls_top_by_cls": float(t.cls[by_cls]), "ctr_top_by_cls": float(t.ctr[by_cls]),
                  "cls_top_by_score": float(t.cls[by_score]), "ctr_top_by_score": float(t.ctr[by_score]),
                  "dist_top_by_cls": float(t.center_dist[by_cls]), "dist_top_by_score": float(t.center_dist[by_score]),
                  "rank_by_score_of_top_by_cls": rank_of("score", by_cls)}


def rerank_table(model, image: Tensor, target: dict, score_thresh: Optional[float] = None) -> RerankTable:
    """:func:`rerank_candidates` on ``model``'s head outputs for one image; ``target`` holds the ground truth
    (``boxes`` in the image's pixels, ``labels``). ``score_thresh`` defaults to the model's (0.05)."""
    head_out, locations, _ = head_outputs(model, image)
    cfg = getattr(model, "cfg", None)
    thresh = getattr(cfg, "score_thresh", 0.05) if score_thresh is None else score_thresh
    return rerank_candidates(head_out, locations, model.strides, target["boxes"], target.get("labels"),
                             thresh, getattr(cfg, "pre_nms_topk", 1000))


def _as_uint8(image: Tensor) -> Tensor:
    image = torch.as_tensor(image)
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _crop_box(box: Tensor, h: int, w: int, margin: float = 0.6):
    x0, y0, x1, y1 = box.tolist()
    mx, my = (x1 - x0) * margin + 16, (y1 - y0) * margin + 16
    return max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)


def plot_rerank(model_or_table, image: Tensor, target: Optional[dict] = None,
                class_names: Optional[Sequence[str]] = None, top_k: int = 3, gt: Optional[int] = None,
                panel: float = 3.8) -> Figure:
    """Four panels: IoU of every candidate against its class score (top left) and against ``sqrt(cls·ctr)`` (top
    right), with Spearman's ρ in the titles and points coloured by their location's distance from the object's
    centre; then the demonstration object with its ``top_k`` candidates by class score alone (bottom left) and by
    ``sqrt(cls·ctr)`` (bottom right), each with the location that predicted it.

    ``model_or_table``: a model (then ``target`` is needed) or a :class:`RerankTable` already computed for
    ``image``. ``gt`` overrides the automatically picked object.
    """
    t = model_or_table if isinstance(model_or_table, RerankTable) else rerank_table(model_or_table, image, target)
    g = t.demo_gt if gt is None else int(gt)
    img = _as_uint8(image)
    h, w = img.shape[-2:]
    fig = Figure(figsize=(2 * panel + 0.8, 2 * panel + 0.6), layout="constrained")
    ax_a, ax_b = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2)
    rho = t.spearman()
    matched = t.gt_index >= 0
    dist = torch.where(matched, t.center_dist, torch.zeros_like(t.center_dist))
    sc = None
    for ax, key, label in ((ax_a, "cls", "class score  cls"), (ax_b, "score", r"$\sqrt{cls \cdot ctr}$")):
        x = getattr(t, key)
        ax.scatter(x[~matched].numpy(), t.iou[~matched].numpy(), s=10, c="0.7", marker="x", linewidths=0.8,
                   label="overlaps no box of its class", gid="unmatched")
        sc = ax.scatter(x[matched].numpy(), t.iou[matched].numpy(), s=12, c=dist[matched].numpy(), cmap="plasma",
                        vmin=0, vmax=max(float(dist.max()) if len(dist) else 1.0, 1.0), linewidths=0,
                        gid="candidates")
        if g >= 0:
            for idx, color in ((t.top(g, "cls"), "tab:red"), (t.top(g, "score"), "tab:green")):
                ax.scatter(x[idx].numpy(), t.iou[idx].numpy(), s=90, facecolors="none", edgecolors=color,
                           linewidths=1.8)
        ax.set_xlabel(label)
        ax.set_ylabel("IoU with its ground-truth box")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.0)
        ax.grid(alpha=0.3)
        ax.set_title(f"ranked by {'cls' if key == 'cls' else '√(cls·ctr)'}: Spearman ρ = {rho[key]:.2f}",
                     fontsize=9)
    ax_a.legend(fontsize=7, loc="lower right")
    if sc is not None:
        fig.colorbar(sc, ax=[ax_a, ax_b], shrink=0.8, label="location → object centre (px)")
    ax_c, ax_d = fig.add_subplot(2, 2, 3), fig.add_subplot(2, 2, 4)
    hwc = img.permute(1, 2, 0).numpy()
    for ax, key, color, name in ((ax_c, "cls", "tab:red", "cls alone"),
                                 (ax_d, "score", "tab:green", "√(cls·ctr)")):
        ax.imshow(hwc)
        ax.set_xticks([])
        ax.set_yticks([])
        if g < 0:
            ax.set_title("no candidate overlaps a ground-truth box", fontsize=9)
            continue
        gb = t.gt_boxes[g]
        ax.add_patch(Rectangle((gb[0], gb[1]), gb[2] - gb[0], gb[3] - gb[1], fill=False, ec="white", lw=2, ls="--"))
        cx, cy = float(gb[0] + gb[2]) / 2, float(gb[1] + gb[3]) / 2
        ax.plot([cx], [cy], "+", color="white", ms=10, mew=2)
        idx = t.top(g, key, top_k).tolist()
        for r, i in enumerate(idx):
            b = t.boxes[i].tolist()
            lw = 2.4 if r == 0 else 1.0
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec=color, lw=lw,
                                   alpha=1.0 if r == 0 else 0.7, gid=f"top_{key}"))
            lx, ly = t.locations[i].tolist()
            ax.plot([lx], [ly], "o", color=color, ms=7 if r == 0 else 4, mec="white", mew=0.8)
            ax.annotate(str(r + 1), (lx, ly), xytext=(4, 4), textcoords="offset points", color=color, fontsize=8,
                        weight="bold")
        x0, y0, x1, y1 = _crop_box(gb, h, w)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        top = idx[0]
        ax.set_title(f"top {len(idx)} by {name}; #1: cls {t.cls[top]:.2f}, ctr {t.ctr[top]:.2f}, "
                     f"IoU {t.iou[top]:.2f}", fontsize=9, color=color)
    name = ""
    if g >= 0:
        lab = int(t.gt_labels[g])
        name = class_names[lab] if class_names and 0 <= lab < len(class_names) else f"class {lab}"
        name = f" — demo object #{g} ({name}, {len(t.of_gt(g))} candidates; dots: predicting locations, + centre)"
    fig.suptitle(f"{len(t)} candidates before NMS{name}", fontsize=10)
    return fig



def rerank_tables(model, dataset, indices: Sequence[int]) -> list:
    """:func:`rerank_table` for ``dataset[i]`` for every ``i`` in ``indices``."""
    out = []
    for i in indices:
        image, target = dataset[i]
        out.append(rerank_table(model, image, target))
    return out


def _gain(t: RerankTable) -> float:
    if t.demo_gt < 0:
        return float("-inf")
    return t.demo["iou_top_by_score"] - t.demo["iou_top_by_cls"]


def find_demo(tables: Sequence[RerankTable]) -> int:
    """Position in ``tables`` of the image whose demonstration object gains most IoU from re-ranking (the first on
    ties) — chosen by a rule, not by hand."""
    gains = [_gain(t) for t in tables]
    return int(max(range(len(gains)), key=lambda k: (gains[k], -k))) if gains else -1


def rerank_summary(tables: Sequence[RerankTable], min_candidates: int = 3) -> dict:
    """Per object (ground truth with ≥ ``min_candidates`` candidates) over all ``tables``: does ranking by
    ``sqrt(cls·ctr)`` instead of cls pick a better box? Returns the number of objects, how often the top box
    changes and whether its IoU then rises or falls, the mean IoU of the top box either way, and the mean
    within-object Spearman ρ(score, IoU) either way (how well each score orders one object's boxes — what NMS
    relies on: it keeps the top one and suppresses the rest)."""
    objects = changed = better = worse = 0
    iou_cls, iou_score, rho_cls, rho_score = [], [], [], []
    for t in tables:
        for g in range(len(t.gt_boxes)):
            idx = t.of_gt(g)
            if len(idx) < min_candidates:
                continue
            objects += 1
            a, b = int(t.top(g, "cls")[0]), int(t.top(g, "score")[0])
            iou_cls.append(float(t.iou[a]))
            iou_score.append(float(t.iou[b]))
            if a != b:
                changed += 1
                better += int(t.iou[b] > t.iou[a])
                worse += int(t.iou[b] < t.iou[a])
            for key, acc in (("cls", rho_cls), ("score", rho_score)):
                r = spearman(getattr(t, key)[idx], t.iou[idx])
                if not math.isnan(r):
                    acc.append(r)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {"images": len(tables), "objects": objects, "changed": changed, "better": better, "worse": worse,
            "top_iou_cls": mean(iou_cls), "top_iou_score": mean(iou_score),
            "rho_cls": mean(rho_cls), "rho_score": mean(rho_score)}


def rerank_summary_markdown(s: dict) -> str:
    """:func:`rerank_summary` as a markdown table."""
    return "\n".join([
        f"| over {s['objects']} objects of {s['images']} images | cls alone | √(cls·ctr) |", "|---|---|---|",
        f"| mean IoU of each object's top candidate | {s['top_iou_cls']:.3f} | {s['top_iou_score']:.3f} |",
        f"| mean within-object Spearman ρ(score, IoU) | {s['rho_cls']:.3f} | {s['rho_score']:.3f} |",
        f"| top candidate changes when ctr is multiplied in | {s['changed']} objects: IoU up in {s['better']}, "
        f"down in {s['worse']} | |"])


def plot_quality_vs_location(tables: Sequence[RerankTable], bins: int = 8, panel: float = 4.0) -> Figure:
    """Where low-quality boxes come from, on a trained model. All candidates that overlap a box of their class are
    binned by their location's *true* center-ness ``ctr*`` for that box (eq. 3: 0 on the border, 1 at the centre).
    Left: IoU of the predicted box (every candidate as a dot, the bin means as a line). Right: per bin, the mean
    class score, the mean predicted center-ness and the mean ``sqrt(cls·ctr)`` — if the classifier fired as
    strongly at the border as at the centre, only the center-ness curve could tell them apart."""
    ct = torch.cat([t.ctr_target[t.gt_index >= 0] for t in tables]) if tables else torch.zeros(0)
    get = lambda k: torch.cat([getattr(t, k)[t.gt_index >= 0] for t in tables]) if tables else torch.zeros(0)  # noqa
    iou, cls, ctr, score = get("iou"), get("cls"), get("ctr"), get("score")
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(ct.clamp(0, 1 - 1e-6), edges[1:-1], right=True)
    centres = ((edges[:-1] + edges[1:]) / 2).numpy()
    fig = Figure(figsize=(2 * panel + 0.4, panel), layout="constrained")
    ax_a, ax_b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_a.scatter(ct.numpy(), iou.numpy(), s=5, alpha=0.35, c="0.4", linewidths=0, gid="candidates")

    def binned(v):
        return np.array([float(v[which == b].mean()) if (which == b).any() else np.nan for b in range(bins)])

    ax_a.plot(centres, binned(iou), "o-", color="tab:blue", lw=2, label="mean IoU per bin")
    ax_a.set_xlabel("true center-ness ctr* of the predicting location\n(0: on or outside the object's border)")
    ax_a.set_ylabel("IoU of its box with the object")
    ax_a.set_xlim(0, 1)
    ax_a.set_ylim(0, 1)
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=8, loc="lower right")
    ax_a.set_title(f"{len(ct)} candidates: box quality against where they were predicted", fontsize=9)
    for v, name, color in ((cls, "class score cls", "tab:red"), (ctr, "predicted ctr", "tab:purple"),
                           (score, "√(cls·ctr)", "tab:green")):
        ax_b.plot(centres, binned(v), "o-", color=color, label=name)
    counts = np.array([int((which == b).sum()) for b in range(bins)])
    ax_b.set_xlabel("true center-ness ctr* of the predicting location\n(0: on or outside the object's border)")
    ax_b.set_ylabel("mean per bin")
    ax_b.set_xlim(0, 1)
    ax_b.set_ylim(0, 1)
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=8, loc="upper left")
    ax_b.set_title("what each score says about the location", fontsize=9)
    for x, n in zip(centres, counts):
        ax_b.annotate(str(n), (x, 0.02), ha="center", fontsize=7, color="0.4")
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 3. After NMS: with and without center-ness in the score
# ---------------------------------------------------------------------------------------------------------------

def match_detections(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     iou_thresh: float = 0.5) -> list:
    """Label each detection, in order of decreasing score, as ``"tp"`` (matches a not yet matched ground truth of
    its class at IoU ≥ ``iou_thresh``), ``"dup"`` (its best such ground truth was already taken by a higher-scored
    detection: a duplicate NMS let through) or ``"fp"`` (no ground truth of its class at that IoU) — the greedy
    matching of COCO / PASCAL evaluation. Returned in the input order."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    out = ["fp"] * n
    if n == 0 or len(gt_boxes) == 0:
        return out
    ious = box_iou(boxes, gt_boxes) * (torch.as_tensor(labels)[:, None] == torch.as_tensor(gt_labels)[None, :])
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in torch.argsort(torch.as_tensor(scores), descending=True, stable=True).tolist():
        ok = ious[i] >= iou_thresh
        if not ok.any():
            continue
        free = ok & ~taken
        if free.any():
            j = int(torch.where(free, ious[i], torch.full_like(ious[i], -1)).argmax())
            taken[j] = True
            out[i] = "tp"
        else:
            out[i] = "dup"
    return out


def detect(model, image: Tensor, use_centerness: bool = True, cache: Optional[dict] = None, key=None) -> dict:
    """The model's detections for one image through ``postprocess`` itself, with the model's settings. With
    ``use_centerness=False`` the center-ness map is removed from the head outputs, so ``postprocess`` thresholds,
    pre-selects, NMS-es and scores by the class score alone — the same trained weights, only inference changes.
    ``cache`` (a dict) keeps head outputs under ``key`` for repeated calls."""
    if cache is not None and key in cache:
        head_out, locations, size = cache[key]
    else:
        head_out, locations, size = head_outputs(model, image)
        if cache is not None:
            cache[key] = (head_out, locations, size)
    if not use_centerness:
        head_out = head_out._replace(ctrness=None)
    kwargs = postprocess_kwargs(model.cfg) if use_centerness else postprocess_kwargs(model.cfg, ctr_from_reg=False)
    return postprocess(head_out, locations, model.strides, [size], **kwargs)[0]


def nms_effect(model, dataset, num_images: int = 50, count_thresh: Optional[float] = None,
               iou_thresh: float = 0.5, progress: bool = False) -> dict:
    """Detections after NMS on the first ``num_images`` of ``dataset``, scored with and without center-ness (the
    same trained weights; see :func:`detect`).

    Returns ``{"with": {...}, "without": {...}, "num_images", "num_gt", "count_thresh", "iou_thresh"}``. Each side
    holds COCO box AP (``coco_eval`` on ``dataset.coco`` when the dataset has one — threshold-free, the honest
    comparison) and counts from :func:`match_detections`: ``tp`` / ``dup`` / ``fp`` among the detections kept and
    ``missed`` ground truths. Kept are, by default (``count_thresh=None``), each image's *k best detections, k = its
    number of objects* — the same budget for both scores, which live on different scales (``sqrt(cls·ctr)`` lifts
    a weak class score, so one fixed threshold would keep many more boxes on that side) — or those scoring ≥
    ``count_thresh``.
    """
    from onestage.engine.evaluate import _label_to_cat, coco_eval, predictions_to_coco

    n = min(int(num_images), len(dataset))
    sides = {s: {"tp": 0, "dup": 0, "fp": 0, "missed": 0, "results": []} for s in ("with", "without")}
    image_ids, num_gt = [], 0
    to_cat = _label_to_cat(dataset)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="images", unit="img")
    for i in it:
        image, target = dataset[i]
        cache: dict = {}
        m = len(target["boxes"])
        num_gt += m
        if "image_id" in target:
            image_ids.append(int(target["image_id"]))
        for side, use in (("with", True), ("without", False)):
            det = detect(model, image, use, cache, i)
            s = sides[side]
            if count_thresh is None:
                keep = torch.arange(len(det["scores"])) < m  # postprocess returns them sorted by score
            else:
                keep = det["scores"] >= count_thresh
            outcome = match_detections(det["boxes"][keep], det["scores"][keep], det["labels"][keep],
                                       target["boxes"], target["labels"], iou_thresh)
            for o in ("tp", "dup", "fp"):
                s[o] += outcome.count(o)
            s["missed"] += m - outcome.count("tp")
            if "image_id" in target and "orig_size" in target:
                s["results"].extend(predictions_to_coco(det, target, to_cat, with_masks=False))
    coco = getattr(dataset, "coco", None)
    out = {"num_images": n, "num_gt": num_gt, "count_thresh": count_thresh, "iou_thresh": iou_thresh}
    for side, s in sides.items():
        results = s.pop("results")
        if coco is not None and image_ids:
            s.update(coco_eval(coco, results, "bbox", image_ids))
        out[side] = s
    return out


def nms_effect_markdown(effect: dict) -> str:
    """A markdown table of :func:`nms_effect`: AP columns (when measured) and the counts of kept detections."""
    aps = [k for k in ("AP", "AP50", "AP75") if k in effect["with"]]
    t = effect["count_thresh"]
    kept = "top k per image (k = #objects)" if t is None else f"score ≥ {t:g}"
    head = ["inference score"] + [f"box {k}" for k in aps] + [
        f"TP in {kept}", "duplicates", "false positives", f"missed (of {effect['num_gt']})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, name in (("without", "cls alone"), ("with", "√(cls·ctr) (FCOS)")):
        s = effect[side]
        cells = [name] + [f"{s[k]:.1f}" for k in aps] + [str(s["tp"]), str(s["dup"]), str(s["fp"]), str(s["missed"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_OUTCOME_COLORS = {"tp": (40, 200, 60), "dup": (255, 150, 0), "fp": (230, 30, 30)}


def plot_detections(model, image: Tensor, target: Optional[dict] = None, score_thresh: float = 0.3,
                    use_centerness: bool = True, class_names: Optional[Sequence[str]] = None,
                    detections: Optional[dict] = None, iou_thresh: float = 0.5, figsize=(6.0, 6.0),
                    title: Optional[str] = None, max_detections: Optional[int] = None) -> Figure:
    """The detections after NMS scoring ≥ ``score_thresh`` (``detections`` from :func:`detect`, or computed),
    drawn with ``draw_bounding_boxes``: green true positives, orange duplicates, red false positives against the
    ground truth (white, thin) when ``target`` is given. The title counts each kind. ``max_detections``: keep at
    most that many of the best (e.g. as many as there are objects, to compare two scores on different scales)."""
    det = detections if detections is not None else detect(model, image, use_centerness)
    keep = det["scores"] >= score_thresh
    if max_detections is not None:
        keep &= torch.arange(len(keep)) < int(max_detections)  # postprocess sorts by decreasing score
    boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
    img = _as_uint8(image)
    counts = {}
    if target is not None:
        outcome = match_detections(boxes, scores, labels, target["boxes"], target["labels"], iou_thresh)
        counts = {o: outcome.count(o) for o in ("tp", "dup", "fp")}
        counts["missed"] = len(target["boxes"]) - counts["tp"]
        if len(target["boxes"]):
            img = draw_bounding_boxes(img, torch.as_tensor(target["boxes"]).float(), colors="white", width=1)
    else:
        outcome = ["tp"] * len(boxes)
    if len(boxes):
        names = [(class_names[c] if class_names and c < len(class_names) else str(c)) for c in labels.tolist()]
        texts = [f"{nm} {s:.2f}" for nm, s in zip(names, scores.tolist())]
        img = draw_bounding_boxes(img, boxes, labels=texts, colors=[_OUTCOME_COLORS[o] for o in outcome], width=2)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_axis_off()
    how = "√(cls·ctr)" if use_centerness else "cls alone"
    text = f"score = {how} ≥ {score_thresh:g}: {len(boxes)} detections"
    if max_detections is not None:
        text = f"score = {how}: the best {len(boxes)} detections (≥ {score_thresh:g})"
    if counts:
        text += (f"\n{counts['tp']} TP (green), {counts['dup']} duplicates (orange), {counts['fp']} false "
                 f"positives (red), {counts['missed']} missed; white: ground truth")
    ax.set_title(title or text, fontsize=9)
    fig.counts = counts  # for tests and the explorer
    return fig


def centerness_explorer(model, dataset, class_names: Optional[Sequence[str]] = None, image_index: int = 0,
                        score_thresh: float = 0.3, use_centerness: bool = True, dpi: int = 80):
    """An ipywidgets ``VBox`` around :func:`plot_detections`: an image-index slider, a score-threshold slider and a
    "use center-ness" checkbox; each change redraws the detections (a PNG in an ``Image`` widget) and the counts.
    Head outputs are cached per image, so toggling center-ness or the threshold only re-runs ``postprocess``.

    ``dataset``: anything indexable giving ``(image, target)``. The widget carries ``controls`` (``image_index``,
    ``score_thresh``, ``use_centerness``) and ``state`` (``redraws``, ``detections``, ``counts``, ``figure``,
    ``error``) so tests can set ``.value`` and check the effect.
    """
    import ipywidgets as widgets

    names = class_names or getattr(model, "class_names", None) or getattr(dataset, "class_names", None)
    controls = {
        "image_index": widgets.IntSlider(value=int(image_index), min=0, max=max(len(dataset) - 1, 0),
                                         description="image", continuous_update=False),
        "score_thresh": widgets.FloatSlider(value=float(score_thresh), min=0.05, max=0.95, step=0.05,
                                            description="score ≥", continuous_update=False),
        "use_centerness": widgets.Checkbox(value=bool(use_centerness), description="use center-ness (√(cls·ctr))"),
    }
    state = SimpleNamespace(detections=None, counts=None)
    cache: dict = {}

    def render():
        i = controls["image_index"].value
        use = controls["use_centerness"].value
        image, target = dataset[i]
        det = detect(model, image, use, cache, i)
        fig = plot_detections(model, image, target, controls["score_thresh"].value, use, names, detections=det)
        c = fig.counts
        state.detections, state.counts = det, c
        return fig, (f"<b>image {i}</b>: {c['tp']} true positives, {c['dup']} duplicates, {c['fp']} false "
                     f"positives, {c['missed']} missed of {len(target['boxes'])} objects")

    return figure_explorer(controls, [["image_index", "score_thresh", "use_centerness"]], render, state, dpi)
