"""Pictures of FCOS's target assignment: locations per FPN level, the positives each object gets, dataset statistics.

FCOS (Tian et al., arXiv 1904.01355) labels every feature-map location. §3.1 places location ``(x, y)`` of a level
with stride ``s`` at ``(⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s)`` in the image; §3.2 ("Multi-level prediction with FPN") sends an
object to level ``i`` only when ``m_{i-1} ≤ max(l*, t*, r*, b*) ≤ m_i`` (sizes of interest ``m2..m7 = 0, 64, 128,
256, 512, ∞`` for P3..P7), and a location still inside several boxes takes the box of smallest area. Center
sampling (AdelaiDet ``MODEL.FCOS.CENTER_SAMPLE`` / ``POS_RADIUS = 1.5``, kept in the journal version of the paper)
further keeps only locations within ``1.5·stride`` of the box centre, clipped to the box.

Nothing here re-implements those rules: :func:`image_assignment` calls ``onestage.modeling.fcos.assign_targets``
(the function training uses) for the winner of every location and ``location_candidates`` for how many boxes
competed for it, so the figures show exactly what the loss sees. Every plotting function returns a
``matplotlib.figure.Figure`` (no pyplot state); :func:`assignment_explorer` wraps :func:`plot_assignment` in
ipywidgets controls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from onestage.analysis.fcos_assignment import (
    ANCHOR_SETTINGS,
    FCOS_SETTINGS,
    AssignmentCounts,
    AssignmentSetting,
    fcos_image_counts,
    feature_size,
    resize_scale,
)
from onestage.modeling.fcos import _size_ranges, assign_targets, compute_locations, location_candidates
from onestage.viz.widgets import figure_explorer

__all__ = [
    "ImageAssignment",
    "image_assignment",
    "box_assignment_summary",
    "resize_for_detector",
    "published_assignment_numbers",
    "plot_level_locations",
    "plot_assignment",
    "plot_statistics",
    "assignment_explorer",
]

STRIDES = (8, 16, 32, 64, 128)
SIZES_OF_INTEREST = (64, 128, 256, 512)


# ---------------------------------------------------------------------------------------------------------------
# Computing the assignment of one image
# ---------------------------------------------------------------------------------------------------------------

def _level_name(stride: int) -> str:
    return f"P{int(round(math.log2(stride)))}"


def _as_hwc(image) -> np.ndarray:
    """``3×H×W`` float 0..1 / uint8 tensor, or ``H×W×3`` array → ``H×W×3`` float array in 0..1 for ``imshow``."""
    if isinstance(image, Tensor):
        arr = image.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = np.asarray(image)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.clip(arr, 0.0, 1.0)


def resize_for_detector(image, boxes: Tensor, min_size: Optional[int] = 800, max_size: Optional[int] = 1333):
    """Resize an image and its boxes as the detector's test transform does (short side ``min_size``, long side at
    most ``max_size``; ``min_size=None`` keeps the native size). Returns ``(3×H×W float tensor, boxes)``."""
    hwc = _as_hwc(image)
    h, w = hwc.shape[:2]
    scale = resize_scale(h, w, min_size, max_size)
    img = torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)
    if scale != 1.0:
        size = (round(h * scale), round(w * scale))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return img, torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale


@dataclass
class ImageAssignment:
    """FCOS's labels for one image, per level (lists indexed like ``strides``).

    ``locations[i]`` ``Li×2`` image coordinates; ``gt_inds[i]`` ``Li`` index of the box the location is a positive
    of after the min-area rule (−1: background); ``num_candidates[i]`` ``Li`` how many boxes passed both tests of
    §3.2 there (≥ 2: an *ambiguous* location); ``ranges[i]`` the level's ``(lo, hi)`` on ``max(l, t, r, b)``.
    """

    height: int
    width: int
    strides: tuple
    ranges: list
    locations: list
    gt_inds: list
    num_candidates: list
    boxes: Tensor
    labels: Tensor

    def positives(self, level: Optional[int] = None) -> int:
        levels = range(len(self.strides)) if level is None else [level]
        return int(sum(int((self.gt_inds[i] >= 0).sum()) for i in levels))

    def ambiguous(self, level: Optional[int] = None) -> int:
        levels = range(len(self.strides)) if level is None else [level]
        return int(sum(int((self.num_candidates[i] >= 2).sum()) for i in levels))

    def positives_per_box(self) -> Tensor:
        """``M×num_levels`` int: positives each box wins on each level."""
        out = torch.zeros(self.boxes.shape[0], len(self.strides), dtype=torch.long)
        for i, g in enumerate(self.gt_inds):
            if self.boxes.shape[0]:
                out[:, i] = torch.bincount(g[g >= 0], minlength=self.boxes.shape[0])
        return out


def image_assignment(height: int, width: int, boxes: Tensor, labels: Tensor, strides: Sequence[int] = STRIDES,
                     sizes_of_interest: Sequence[float] = SIZES_OF_INTEREST, center_sampling: bool = True,
                     radius: float = 1.5) -> ImageAssignment:
    """Label every location of an ``height×width`` image with FCOS's own functions.

    Feature maps have the sizes the model produces for the image padded to a multiple of 32 (``feature_size``), and
    their locations come from ``compute_locations``. ``sizes_of_interest`` has one boundary fewer than ``strides``:
    ``strides=(16,), sizes_of_interest=()`` is the paper's "without FPN" setting (one level takes every object).
    """
    strides = tuple(int(s) for s in strides)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    shapes = [(feature_size(height, s), feature_size(width, s)) for s in strides]
    locations = compute_locations(shapes, strides)
    ranges = _size_ranges(tuple(sizes_of_interest), len(strides))
    targets = assign_targets(locations, [{"boxes": boxes, "labels": labels}], num_classes=1_000_000,
                             strides=strides, sizes_of_interest=tuple(sizes_of_interest),
                             center_sampling=center_sampling, center_sampling_radius=radius)
    gt_all = targets.gt_inds[0]
    sizes = [len(loc) for loc in locations]
    gt_inds = list(gt_all.split(sizes))
    num_candidates = []
    for locs, s, (lo, hi) in zip(locations, strides, ranges):
        if boxes.shape[0] == 0:
            num_candidates.append(torch.zeros(len(locs), dtype=torch.long))
            continue
        _, cand = location_candidates(locs, boxes, float(s), lo, hi, center_sampling, radius)
        num_candidates.append(cand.sum(dim=1))
    return ImageAssignment(int(height), int(width), strides, ranges, locations, gt_inds, num_candidates, boxes,
                           labels)


def _range_text(lo: float, hi: float) -> str:
    lo_t = "0" if lo < 0 else f"{lo:g}"
    hi_t = "∞" if math.isinf(hi) or hi >= 1e7 else f"{hi:g}"
    return f"[{lo_t}, {hi_t}]"


def box_assignment_summary(assignment: ImageAssignment, class_names: Optional[Sequence[str]] = None) -> str:
    """A markdown table: for every box its class, size, ``max(l,t,r,b)`` at its centre and the positives it wins
    on each level (an empty row of positives means the box can never be detected: it lowers the BPR)."""
    a = assignment
    names = [_level_name(s) for s in a.strides]
    per = a.positives_per_box()
    lines = ["| # | class | w × h | max(l,t,r,b) at centre | " + " | ".join(names) + " | total |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for k, (box, lab) in enumerate(zip(a.boxes.tolist(), a.labels.tolist())):
        w, h = box[2] - box[0], box[3] - box[1]
        name = class_names[lab] if class_names and 0 <= lab < len(class_names) else str(lab)
        counts = " | ".join(str(int(c)) if c else "·" for c in per[k].tolist())
        total = int(per[k].sum())
        lines.append(f"| {k} | {name} | {w:.0f} × {h:.0f} | {max(w, h) / 2:.0f} | {counts} | "
                     f"{total if total else '**0 (missed)**'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------

def _box_colors(n: int) -> list:
    cmap = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # saturated colours first
    return [cmap(order[k % 20]) for k in range(n)]


def _grid(n: int, ncols: Optional[int], panel: float, aspect: float):
    ncols = max(1, min(n, ncols or 3))
    nrows = int(math.ceil(n / ncols))
    fig = Figure(figsize=(panel * ncols, panel * aspect * nrows + 0.6 * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, k + 1) for k in range(n)]
    return fig, axes, ncols


def _show_image(ax, img: np.ndarray, dim: float) -> None:
    ax.imshow(img * (1 - dim) + dim, interpolation="bilinear")  # washed out so dots stand out
    ax.set_xticks([])
    ax.set_yticks([])


def _marker_size(stride: int, width: int, panel_in: float, scale: float = 0.55) -> float:
    """Marker area (pt²) so a dot covers about ``scale`` of a cell's width on the panel."""
    points = stride / max(width, 1) * panel_in * 72 * scale
    return float(np.clip(points, 2.5, 11.0) ** 2)


def plot_level_locations(image, strides: Sequence[int] = STRIDES, level: Optional[int] = None,
                         panel: float = 3.6, ncols: Optional[int] = 3) -> Figure:
    """The locations ``(⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s)`` of each level over the image (paper §3.1), one panel per level
    (``level``: only that index of ``strides``). The grid covers the image padded to a multiple of 32, as the
    model's feature maps do; the dashed line is the image border. One cell of each grid is outlined."""
    img = _as_hwc(image)
    h, w = img.shape[:2]
    strides = tuple(int(s) for s in strides)
    chosen = list(range(len(strides))) if level is None else [int(level)]
    fig, axes, cols = _grid(len(chosen), ncols, panel, h / w)
    panel_in = panel
    for ax, i in zip(axes, chosen):
        s = strides[i]
        fh, fw = feature_size(h, s), feature_size(w, s)
        (locs,) = compute_locations([(fh, fw)], [s])
        _show_image(ax, img, 0.35)
        ax.scatter(locs[:, 0].numpy(), locs[:, 1].numpy(), s=_marker_size(s, w, panel_in, 0.3), c="black",
                   linewidths=0, gid="locations")
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, ls="--", lw=0.8, ec="0.3"))
        # outline the cell of the location nearest the image centre: the point sits at its middle
        cx, cy = (w // 2) // s * s, (h // 2) // s * s
        ax.add_patch(Rectangle((cx, cy), s, s, fill=False, lw=1.5, ec="tab:red"))
        ax.set_xlim(-0.5, max(w, fw * s) - 0.5)
        ax.set_ylim(max(h, fh * s) - 0.5, -0.5)
        ax.set_title(f"{_level_name(s)}: stride {s}, {fw}×{fh} = {fw * fh} locations", fontsize=9)
    fig.suptitle(f"FCOS locations on a {w}×{h} image (red: one cell, its location at the centre)", fontsize=10)
    return fig


def plot_assignment(image, boxes, labels, class_names: Optional[Sequence[str]] = None,
                    strides: Sequence[int] = STRIDES, sizes_of_interest: Sequence[float] = SIZES_OF_INTEREST,
                    center_sampling: bool = True, radius: float = 1.5, levels: Optional[Sequence[int]] = None,
                    panel: float = 3.6, ncols: Optional[int] = 3, assignment: Optional[ImageAssignment] = None,
                    title: Optional[str] = None) -> Figure:
    """One panel per level: the image, the ground-truth boxes, and every positive location as a dot in the colour
    of the box it is assigned to (after the min-area rule). Black rings mark *ambiguous* locations — candidates of
    ≥ 2 boxes before the min-area rule picked one. Boxes with positives on the level are drawn solid and named,
    the others thin and dashed. Titles give the level's range on ``max(l, t, r, b)`` and the counts.

    ``levels``: indices into ``strides`` to draw (default all). The labels come from :func:`image_assignment`
    (pass ``assignment`` to reuse one), i.e. from ``assign_targets`` itself.
    """
    img = _as_hwc(image)
    h, w = img.shape[:2]
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    a = assignment or image_assignment(h, w, boxes, labels, strides, sizes_of_interest, center_sampling, radius)
    chosen = list(range(len(a.strides))) if levels is None else [int(i) for i in levels]
    colors = _box_colors(boxes.shape[0])
    fig, axes, _ = _grid(len(chosen), ncols, panel, h / w)
    for ax, i in zip(axes, chosen):
        s = a.strides[i]
        _show_image(ax, img, 0.45)
        g, ncand, locs = a.gt_inds[i], a.num_candidates[i], a.locations[i]
        pos = g >= 0
        won = set(torch.unique(g[pos]).tolist())
        for k, box in enumerate(boxes.tolist()):
            x0, y0, x1, y1 = box
            on_level = k in won
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colors[k],
                                   lw=1.6 if on_level else 0.7, ls="-" if on_level else "--",
                                   alpha=1.0 if on_level else 0.6))
            if on_level and class_names is not None:
                lab = int(labels[k])
                name = class_names[lab] if 0 <= lab < len(class_names) else str(lab)
                ax.text(x0, y0, f"{k}:{name}", fontsize=5.5, color="white", va="bottom",
                        bbox=dict(fc=colors[k], ec="none", pad=0.6, alpha=0.9))
        size = _marker_size(s, w, panel)
        xy = locs[pos].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=[colors[k] for k in g[pos].tolist()], edgecolors="white",
                   linewidths=0.3, gid="positives", zorder=3)
        amb = ncand >= 2
        xa = locs[amb].numpy()
        ax.scatter(xa[:, 0], xa[:, 1], s=size * 2.6, facecolors="none", edgecolors="black", linewidths=0.8,
                   gid="ambiguous", zorder=4)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        lo, hi = a.ranges[i]
        ax.set_title(f"{_level_name(s)} (stride {s}): max(l,t,r,b) ∈ {_range_text(lo, hi)}\n"
                     f"{int(pos.sum())} positives · {len(won)} boxes · {int(amb.sum())} ambiguous", fontsize=8.5)
    cs = f"center sampling r = {radius:g}·stride" if center_sampling else "no center sampling"
    fig.suptitle(title or f"FCOS positives per level ({cs}); ring = inside ≥ 2 candidate boxes", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Dataset statistics (FCOS Tables 1 and 2)
# ---------------------------------------------------------------------------------------------------------------

#: ``data/paper_tables/fcos_ambiguity_bpr.json`` row name → setting name of ``onestage.analysis.fcos_assignment``.
PAPER_ROW_TO_SETTING = {
    "fcos_P4_only": "FCOS w/o FPN (P4 only)",
    "fcos_fpn": "FCOS w/ FPN",
    "retinanet_lq_none": "RetinaNet anchors (IoU ≥ 0.5)",
    "retinanet_lq_0.4": "RetinaNet anchors + low-quality ≥ 0.4",
    "retinanet_lq_all": "RetinaNet anchors + all low-quality",
}
_PAPER_METRIC = {"BPR": "BPR", "amb_ratio": "ambiguous", "amb_ratio_diff": "ambiguous_diff_class"}


def published_assignment_numbers(table: Mapping) -> dict:
    """The paper's numbers of ``fcos_ambiguity_bpr.json`` keyed like :func:`assignment_statistics` rows (setting
    name → ``{"BPR", "ambiguous", "ambiguous_diff_class"}``), ready for ``format_table`` / :func:`plot_statistics`.
    The center-sampling row has no published counterpart (the tables predate center sampling)."""
    known = {s.name for s in (*FCOS_SETTINGS, *ANCHOR_SETTINGS)}
    out = {}
    for row in table["rows"]:
        name = PAPER_ROW_TO_SETTING.get(row["name"])
        if name is None or name not in known:
            continue
        out[name] = {_PAPER_METRIC[k]: float(v) for k, v in row.get("published", {}).items() if k in _PAPER_METRIC}
    return out


def plot_statistics(rows: Sequence[Mapping], published: Optional[Mapping] = None, panel: float = 4.2) -> Figure:
    """Bars of BPR, ambiguous % and ambiguous-between-classes % per setting: measured (solid) beside the paper
    (hatched) where it has a number. ``rows``: ``assignment_statistics`` output; ``published``: setting name →
    metrics (:func:`published_assignment_numbers`)."""
    published = published or {}
    metrics = [("BPR", "best possible recall (%)"), ("ambiguous", "ambiguous positives (%)"),
               ("ambiguous_diff_class", "ambiguous, different classes (%)")]
    names = [r["setting"] for r in rows]
    fig = Figure(figsize=(panel * 3, 0.45 * len(names) + 1.6), layout="constrained")
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    y = np.arange(len(names))
    hgt = 0.38
    for ax, (key, label) in zip(axes, metrics):
        ours = np.array([float(r.get(key, float("nan"))) for r in rows])
        paper = np.array([float(published.get(n, {}).get(key, float("nan"))) for n in names])
        ax.barh(y - hgt / 2, np.nan_to_num(ours), height=hgt, color="tab:blue", label="measured here")
        ax.barh(y + hgt / 2, np.nan_to_num(paper), height=hgt, color="white", edgecolor="tab:orange",
                hatch="///", label="FCOS paper (COCO)")
        for yy, v in zip(y - hgt / 2, ours):
            ax.text(0 if math.isnan(v) else v, yy, " –" if math.isnan(v) else f" {v:.1f}", va="center", fontsize=7)
        for yy, v in zip(y + hgt / 2, paper):
            if not math.isnan(v):
                ax.text(v, yy, f" {v:.1f}", va="center", fontsize=7, color="tab:orange")
        ax.set_title(label, fontsize=9)
        ax.set_yticks(y)
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
        values = np.concatenate([ours[~np.isnan(ours)], paper[~np.isnan(paper)]])
        top = float(values.max()) if values.size else 1.0
        ax.set_xlim(0, (105 if key == "BPR" else max(top * 1.25, 1.0)))
        ax.tick_params(axis="x", labelsize=7)
    handles, texts = axes[0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle("Target-assignment statistics (FCOS Tables 1 and 2); '–': not defined for anchors", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Widget
# ---------------------------------------------------------------------------------------------------------------

def _counts_html(counts: AssignmentCounts, a: ImageAssignment, class_names) -> str:
    s = counts.summary()
    per = a.positives_per_box()
    missed = [k for k in range(per.shape[0]) if int(per[k].sum()) == 0]
    name = lambda k: class_names[int(a.labels[k])] if class_names else str(int(a.labels[k]))  # noqa: E731
    levels = ", ".join(f"{_level_name(st)} {a.positives(i)}" for i, st in enumerate(a.strides))
    rows = [
        ("boxes assigned ≥ 1 location (BPR)", f"{counts.recalled_boxes} / {counts.boxes} = {s['BPR']:.1f} %"),
        ("positive locations", f"{counts.positives} ({levels})"),
        ("ambiguous (≥ 2 candidate boxes)", f"{counts.ambiguous} = {s['ambiguous']:.1f} %"),
        ("… of which boxes of different classes", f"{counts.ambiguous_diff_class} = {s['ambiguous_diff_class']:.1f} %"),
        ("missed boxes", ", ".join(f"{k}:{name(k)}" for k in missed) or "none"),
    ]
    body = "".join(f"<tr><td style='text-align:left'>{k}</td><td style='text-align:left'>{v}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def assignment_explorer(image, boxes, labels, class_names: Optional[Sequence[str]] = None,
                        strides: Sequence[int] = STRIDES, sizes_of_interest: Sequence[float] = SIZES_OF_INTEREST,
                        center_sampling: bool = True, radius: float = 1.5, dpi: int = 80):
    """An ipywidgets ``VBox`` around :func:`plot_assignment`: sliders for the four size-of-interest boundaries
    (m2..m5 of §3.2) and the center-sampling radius, a center-sampling checkbox, a level dropdown; every change
    redraws the figure (a PNG in an ``Image`` widget, so it renders anywhere) and the per-image statistics
    (``fcos_image_counts``, the same counts as the dataset table).

    The returned widget carries ``controls`` (name → widget: ``m2``..``m5``, ``center_sampling``, ``radius``,
    ``level``) and ``state`` (``redraws``, the last ``counts``, ``assignment``, ``figure``, ``error``) so tests can
    set ``.value`` and check the effect. Boundaries that are not increasing are allowed (a level then takes
    nothing) and flagged in the statistics.
    """
    import ipywidgets as widgets

    img = _as_hwc(image)
    h, w = img.shape[:2]
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    strides = tuple(int(s) for s in strides)
    if len(strides) != 5 or len(sizes_of_interest) != 4:
        raise ValueError("the explorer has sliders for P3..P7: 5 strides and 4 sizes of interest")
    slider = dict(min=0, max=1024, step=8, continuous_update=False, style={"description_width": "initial"},
                  layout=widgets.Layout(width="260px"))
    controls = {
        f"m{k + 2}": widgets.IntSlider(value=int(v), description=f"m{k + 2} ({_level_name(strides[k])}|"
                                       f"{_level_name(strides[k + 1])})", **slider)
        for k, v in enumerate(sizes_of_interest)
    }
    controls["center_sampling"] = widgets.Checkbox(value=bool(center_sampling), description="center sampling")
    controls["radius"] = widgets.FloatSlider(value=float(radius), min=0.25, max=4.0, step=0.25,
                                             description="radius (× stride)", continuous_update=False,
                                             style={"description_width": "initial"})
    controls["level"] = widgets.Dropdown(options=[("all levels", -1)] + [(_level_name(s), i)
                                                                          for i, s in enumerate(strides)],
                                         value=-1, description="show")
    state = SimpleNamespace(counts=None, assignment=None)

    def render():
        soi = tuple(controls[f"m{k + 2}"].value for k in range(4))
        cs, r = controls["center_sampling"].value, controls["radius"].value
        controls["radius"].disabled = not cs
        level = controls["level"].value
        a = image_assignment(h, w, boxes, labels, strides, soi, cs, r)
        counts = fcos_image_counts(boxes, labels, h, w, AssignmentSetting(
            "explorer", strides=strides, sizes_of_interest=soi, center_sampling=cs, center_sampling_radius=r))
        fig = plot_assignment(img, boxes, labels, class_names, strides, soi, cs, r,
                              levels=None if level < 0 else [level], assignment=a,
                              panel=3.6 if level < 0 else 7.0)
        warn = "" if all(lo < hi for lo, hi in zip(soi, soi[1:])) else (
            "<p style='color:#b00'>Boundaries are not increasing: some levels take no objects.</p>")
        state.counts, state.assignment = counts, a
        return fig, warn + _counts_html(counts, a, class_names)

    return figure_explorer(controls, [["m2", "m3", "m4", "m5"], ["center_sampling", "radius", "level"]], render,
                           state, dpi)
