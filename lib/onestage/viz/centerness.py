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

from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from onestage.modeling.fcos import centerness_target
from onestage.analysis.centerness import (  # noqa: F401  (the numbers behind the figures; re-exported)
    RerankTable,
    detect,
    find_demo,
    head_outputs,
    match_detections,
    nms_effect,
    rerank_candidates,
    rerank_summary,
    rerank_table,
    rerank_tables,
    spearman,
)
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
