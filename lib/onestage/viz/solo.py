"""SOLO figures: "location as category" on the grid, the scale ranges, category heat maps, mask channels, the
decoupled X/Y maps, SOLOv2's kernels and masks, Matrix NMS decays, and a grid explorer.

Every plot returns a matplotlib ``Figure`` (no pyplot state). The grid is drawn over the *padded* canvas (the image
zero-padded to a multiple of 32) because that is what the grid tiles in the model (``SOLO.preprocess``).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import List, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from onestage.modeling.solo import (
    PAPER_GRIDS,
    cate_scores,
    cell_levels,
    PAPER_SCALE_RANGES,
    PAPER_STRIDES,
    assign_levels,
    center_region_cells,
    downsample_masks,
    matrix_nms,
    matrix_nms_decay,
)
from onestage.viz.draw import class_colors

__all__ = [
    "canvas_size",
    "grid_assignment_rows",
    "grid_assignment_markdown",
    "plot_grid_assignment",
    "plot_scale_ranges",
    "plot_category_maps",
    "plot_mask_maps",
    "plot_decoupled_maps",
    "plot_kernels_and_masks",
    "plot_matrix_nms",
    "memory_markdown",
    "solo_grid_explorer",
    "model_outputs",
    "top_candidates",
]

LEVEL_NAMES = ("P2↓ (s8)", "P3 (s8)", "P4 (s16)", "P5 (s32)", "P6↑ (s32)")


def canvas_size(image_hw: Sequence[int], divisibility: int = 32) -> tuple:
    """The padded canvas the model's grid tiles: each side rounded up to a multiple of ``divisibility``."""
    return tuple(int(math.ceil(int(v) / divisibility) * divisibility) for v in image_hw)


def _image_np(image: torch.Tensor, canvas_hw) -> np.ndarray:
    img = image.detach().float().cpu().clamp(0, 1)
    out = torch.zeros(3, *canvas_hw)
    out[:, : img.shape[1], : img.shape[2]] = img
    return out.permute(1, 2, 0).numpy()


def _name(label: int, class_names) -> str:
    return class_names[label] if class_names and label < len(class_names) else str(label)


def grid_assignment_rows(target: dict, canvas_hw: Sequence[int], grid_numbers: Sequence[int] = PAPER_GRIDS,
                         scale_ranges=PAPER_SCALE_RANGES, sigma: float = 0.2, class_names=None,
                         min_mask_area: int = 10) -> List[dict]:
    """One row per (object, level it trains): scale, centre cell (i, j), the claimed cells' k = i·S + j. Objects of
    fewer than ``min_mask_area`` pixels train nothing (SOLO's rule)."""
    rows = []
    boxes = target["boxes"].reshape(-1, 4).float()
    levels = assign_levels(boxes, scale_ranges)
    for m in range(boxes.shape[0]):
        scale = float(((boxes[m, 2] - boxes[m, 0]) * (boxes[m, 3] - boxes[m, 1])).clamp(min=0).sqrt())
        if int(target["masks"][m].sum()) < min_mask_area:
            continue
        for lvl in levels[m].nonzero().flatten().tolist():
            s = grid_numbers[lvl]
            r = center_region_cells(target["masks"][m], boxes[m], canvas_hw, s, sigma)
            rows.append(dict(instance=m, label=int(target["labels"][m]), name=_name(int(target["labels"][m]),
                                                                                    class_names),
                             scale=scale, level=lvl, grid=s, center_cell=r.center_cell, cells=r.cells(s),
                             region=(r.top, r.bottom, r.left, r.right)))
    return rows


def grid_assignment_markdown(rows: Sequence[dict]) -> str:
    lines = ["| object | class | √(wh) px | level | S | centre cell (i, j) | channels k = i·S + j |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| #{r['instance']} | {r['name']} | {r['scale']:.0f} | {r['level']} | {r['grid']} | "
                     f"{r['center_cell']} | {', '.join(map(str, r['cells']))} |")
    return "\n".join(lines)


def plot_grid_assignment(image: torch.Tensor, target: dict, level: int = 0, grid_number: Optional[int] = None,
                         sigma: float = 0.2, instance: Optional[int] = None, grid_numbers=PAPER_GRIDS,
                         strides=PAPER_STRIDES, scale_ranges=PAPER_SCALE_RANGES, class_names=None,
                         figsize=(11, 5.2)) -> Figure:
    """Left: the S×S grid of ``level`` over the padded image; every object this level is responsible for (its scale
    is in the level's range) shows its mask outline, mass centre, σ centre region (dashed) and the cells it claims
    (filled, with their channel index k); other objects are grey. Right: the mask target that the chosen object's
    centre cell trains — channel k of the mask branch, at the level's mask resolution (stride/2)."""
    h, w = image.shape[-2:]
    canvas = canvas_size((h, w))
    s = int(grid_number or grid_numbers[level])
    boxes = target["boxes"].reshape(-1, 4).float()
    masks = target["masks"]
    in_level = assign_levels(boxes, scale_ranges)[:, level]
    colors = class_colors(max(int(target["labels"].max()) + 1 if len(boxes) else 1, len(class_names or [])))
    fig = Figure(figsize=figsize)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.imshow(_image_np(image, canvas), extent=(0, canvas[1], canvas[0], 0))
    cell_h, cell_w = canvas[0] / s, canvas[1] / s
    for t in range(s + 1):
        ax.axhline(t * cell_h, color="white", lw=0.4, alpha=0.6)
        ax.axvline(t * cell_w, color="white", lw=0.4, alpha=0.6)
    chosen = None
    for m in range(boxes.shape[0]):
        x0, y0, x1, y1 = boxes[m].tolist()
        if not bool(in_level[m]) or int(masks[m].sum()) == 0:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="0.6", lw=0.8, ls=":"))
            continue
        if instance is not None and m != instance:
            continue
        col = np.array(colors[int(target["labels"][m])]) / 255
        r = center_region_cells(masks[m], boxes[m], canvas, s, sigma)
        ax.contour(np.pad(masks[m].float().numpy(), ((0, canvas[0] - h), (0, canvas[1] - w))), levels=[0.5],
                   colors=[col], linewidths=1.2)
        for i in range(r.top, r.bottom + 1):
            for j in range(r.left, r.right + 1):
                ax.add_patch(Rectangle((j * cell_w, i * cell_h), cell_w, cell_h, fc=col, alpha=0.45, ec=col))
                if s <= 24 or (i, j) == r.center_cell:
                    ax.text((j + 0.5) * cell_w, (i + 0.5) * cell_h, str(i * s + j), ha="center", va="center",
                            fontsize=6 if s > 16 else 7, color="white")
        cy, cx = r.mass_center
        ax.plot([cx], [cy], "+", color="white", ms=8, mew=1.5)
        hw_, hh_ = 0.5 * (x1 - x0) * sigma, 0.5 * (y1 - y0) * sigma
        ax.add_patch(Rectangle((cx - hw_, cy - hh_), 2 * hw_, 2 * hh_, fill=False, ec="white", ls="--", lw=1))
        if chosen is None:
            chosen = (m, r)
    lo, hi = scale_ranges[level]
    ax.set_xlim(0, canvas[1])
    ax.set_ylim(canvas[0], 0)
    ax.set_title(f"level {level} {LEVEL_NAMES[level] if level < 5 else ''}: S = {s}, σ = {sigma:g}, "
                 f"objects with √(wh) in [{lo}, {hi}]", fontsize=9)
    ax.set_axis_off()
    if chosen is None:
        ax2.text(0.5, 0.5, "no object of this level\n(its scale range routes none here)", ha="center",
                 va="center", transform=ax2.transAxes)
        ax2.set_axis_off()
    else:
        m, r = chosen
        i, j = r.center_cell
        mask_stride = max(strides[level] // 2, 1)
        small = downsample_masks(masks[m][None], canvas, (canvas[0] // mask_stride, canvas[1] // mask_stride))[0]
        ax2.imshow(small.numpy(), cmap="gray", extent=(0, canvas[1], canvas[0], 0))
        ax2.set_title(f"object #{m} ({_name(int(target['labels'][m]), class_names)}): cell (i, j) = ({i}, {j}) → "
                      f"mask channel k = {i}·{s} + {j} = {i * s + j}\ntarget at stride {mask_stride} "
                      f"({small.shape[0]}×{small.shape[1]}); the same target for all {len(r.cells(s))} claimed cells",
                      fontsize=8)
        ax2.set_axis_off()
    fig.tight_layout()
    return fig


def plot_scale_ranges(targets: Sequence[dict], scale_ranges=PAPER_SCALE_RANGES, grid_numbers=PAPER_GRIDS,
                      figsize=(9, 3.2)) -> Figure:
    """The five overlapping scale ranges (on √(wh) of the box, log axis) and the objects of ``targets`` as ticks:
    an object inside two ranges trains two levels."""
    scales = torch.cat([((t["boxes"][:, 2] - t["boxes"][:, 0]) * (t["boxes"][:, 3] - t["boxes"][:, 1]))
                        .clamp(min=0).sqrt() for t in targets]) if targets else torch.zeros(0)
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 1, 1)
    for lvl, (lo, hi) in enumerate(scale_ranges):
        n = int(((scales >= lo) & (scales <= hi)).sum())
        ax.barh(lvl, hi - lo, left=lo, height=0.6, alpha=0.5, color=f"C{lvl}")
        ax.text(lo * 1.05, lvl, f"S={grid_numbers[lvl]}  [{lo}, {hi}]  {n} objects", va="center", fontsize=8)
    ax.plot(scales.numpy(), np.full(len(scales), -0.8), "|", color="k", ms=12, alpha=0.5)
    two = int((assign_levels(torch.stack([torch.zeros_like(scales), torch.zeros_like(scales), scales, scales], 1),
                             scale_ranges).sum(1) >= 2).sum()) if len(scales) else 0
    ax.set_xscale("log")
    ax.set_yticks(range(-1, len(scale_ranges)), ["objects"] + [f"level {i}" for i in range(len(scale_ranges))])
    ax.invert_yaxis()
    ax.set_xlabel("object scale √(w·h), pixels")
    ax.set_title(f"scale ranges route objects to levels: {len(scales)} objects, {two} of them train two levels",
                 fontsize=9)
    fig.tight_layout()
    return fig


def plot_category_maps(cate_logits: Sequence[torch.Tensor], image: torch.Tensor, class_names=None,
                       threshold: float = 0.1, figsize=None) -> Figure:
    """Per level, the best class probability of every grid cell (sigmoid of ``C×S×S`` logits, max over classes),
    stretched over the padded image; cells above ``threshold`` (the inference score threshold) are outlined."""
    canvas = canvas_size(image.shape[-2:])
    n = len(cate_logits)
    fig = Figure(figsize=figsize or (3.2 * n, 3.6))
    img = _image_np(image, canvas)
    for lvl, logits in enumerate(cate_logits):
        probs = logits.detach().float().cpu().reshape(-1, *logits.shape[-2:]).sigmoid()
        best, cls = probs.max(0)
        s = best.shape[0]
        ax = fig.add_subplot(1, n, lvl + 1)
        ax.imshow(img, extent=(0, canvas[1], canvas[0], 0))
        im = ax.imshow(best.numpy(), extent=(0, canvas[1], canvas[0], 0), cmap="magma", alpha=0.65, vmin=0, vmax=1)
        ch, cw = canvas[0] / s, canvas[1] / s
        for i, j in (best > threshold).nonzero().tolist():
            ax.add_patch(Rectangle((j * cw, i * ch), cw, ch, fill=False, ec="cyan", lw=0.8))
        top = (best > threshold).sum()
        ax.set_title(f"level {lvl}, S={s}: {int(top)} cells > {threshold:g}", fontsize=8)
        ax.set_axis_off()
    fig.colorbar(im, ax=fig.axes, shrink=0.7, label="max class probability")
    return fig


def plot_mask_maps(image: torch.Tensor, maps: Sequence[torch.Tensor], titles: Sequence[str], ncols: int = 4,
                   figsize=None, suptitle: str = "") -> Figure:
    """Probability maps (each ``h×w`` over the padded canvas at any stride) beside the image, one panel each."""
    canvas = canvas_size(image.shape[-2:])
    n = len(maps) + 1
    rows = int(math.ceil(n / ncols))
    fig = Figure(figsize=figsize or (3 * min(n, ncols), 3 * rows))
    ax = fig.add_subplot(rows, ncols, 1)
    ax.imshow(_image_np(image, canvas))
    ax.set_title("image (padded canvas)", fontsize=8)
    ax.set_axis_off()
    for p, (m, t) in enumerate(zip(maps, titles)):
        ax = fig.add_subplot(rows, ncols, p + 2)
        ax.imshow(m.detach().float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1,
                  extent=(0, canvas[1], canvas[0], 0))
        ax.set_title(t, fontsize=8)
        ax.set_axis_off()
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_decoupled_maps(image: torch.Tensor, x_logits: torch.Tensor, y_logits: torch.Tensor, i: int, j: int,
                        figsize=(12, 3.4)) -> Figure:
    """Decoupled SOLO for cell (i, j) of one level: σ(X_j) (column map), σ(Y_i) (row map) and their product — the
    mask of cell k = i·S + j (paper §4). ``x_logits`` / ``y_logits``: ``S×h×w`` of one image."""
    canvas = canvas_size(image.shape[-2:])
    s = x_logits.shape[0]
    px, py = x_logits[j].detach().float().cpu().sigmoid(), y_logits[i].detach().float().cpu().sigmoid()
    panels = [(px, f"σ(X_j), j = {j}"), (py, f"σ(Y_i), i = {i}"), (px * py, f"σ(Y_i)·σ(X_j) = mask of k = {i * s + j}")]
    fig = Figure(figsize=figsize)
    ax = fig.add_subplot(1, 4, 1)
    ax.imshow(_image_np(image, canvas), extent=(0, canvas[1], canvas[0], 0))
    ch, cw = canvas[0] / s, canvas[1] / s
    ax.add_patch(Rectangle((j * cw, i * ch), cw, ch, fill=False, ec="red", lw=1.5))
    ax.axhspan(i * ch, (i + 1) * ch, color="red", alpha=0.15)
    ax.axvspan(j * cw, (j + 1) * cw, color="blue", alpha=0.15)
    ax.set_title(f"cell (i, j) = ({i}, {j}) of S = {s}", fontsize=8)
    ax.set_axis_off()
    for p, (m, t) in enumerate(panels):
        a = fig.add_subplot(1, 4, p + 2)
        a.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=1, extent=(0, canvas[1], canvas[0], 0))
        a.set_title(t, fontsize=8)
        a.set_axis_off()
    fig.tight_layout()
    return fig


def plot_kernels_and_masks(kernels: torch.Tensor, masks: torch.Tensor, titles: Sequence[str],
                           figsize=None) -> Figure:
    """SOLOv2: the dynamic 1×1 kernels of some cells (rows of an ``N×E`` heat map) and the masks they produce on the
    shared mask feature (``N×h×w`` probabilities)."""
    n = kernels.shape[0]
    fig = Figure(figsize=figsize or (3 + 1.8 * n, 2.8))
    ax = fig.add_subplot(1, n + 1, 1)
    k = kernels.detach().float().cpu()
    lim = float(k.abs().max()) or 1.0
    ax.imshow(k.numpy(), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(n), [str(t).split("\n")[0] for t in titles], fontsize=7)
    ax.set_xlabel(f"kernel weight (E = {k.shape[1]})", fontsize=8)
    ax.set_title("kernels G (one row per cell)", fontsize=8)
    for p in range(n):
        a = fig.add_subplot(1, n + 1, p + 2)
        a.imshow(masks[p].detach().float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        a.set_title(titles[p], fontsize=7)
        a.set_axis_off()
    fig.tight_layout()
    return fig


def plot_matrix_nms(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, kernel: str = "gaussian",
                    sigma: float = 2.0, update_thresh: float = 0.05, names: Optional[Sequence[str]] = None,
                    figsize=(13, 3.8)) -> Figure:
    """Matrix NMS as matrices, masks sorted by score: the same-class IoU (upper triangle), the decay
    f(IoU_ij)/f(comp_i), and each mask's score before and after (decay = column minimum)."""
    order = scores.argsort(descending=True)
    m, lab, sc = masks[order].bool(), labels[order], scores[order].float()
    iou, decay = matrix_nms_decay(m, lab, kernel, sigma)
    new = matrix_nms(m, lab, sc, kernel, sigma)
    n = len(sc)
    names = [names[int(o)] for o in order] if names is not None else [f"#{int(o)}" for o in order]
    fig = Figure(figsize=figsize)
    a1, a2, a3 = fig.add_subplot(1, 3, 1), fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3)
    im = a1.imshow(iou.numpy(), cmap="Reds", vmin=0, vmax=1)
    a1.set_title("IoU_ij, same class, i < j", fontsize=9)
    shown = decay.clamp(max=1.0)  # values > 1 never win the minimum (row 0 is ≤ 1)
    im2 = a2.imshow(shown.numpy(), cmap="viridis", vmin=0, vmax=1)
    a2.set_title(f"decay f(IoU_ij)/f(comp_i) ({kernel}{', σ=%g' % sigma if kernel == 'gaussian' else ''}),\n"
                 "clipped at 1; column min = decay of j", fontsize=8)
    for a in (a1, a2):
        a.set_xticks(range(n), names, rotation=90, fontsize=6)
        a.set_yticks(range(n), names, fontsize=6)
        a.set_xlabel("j (suppressed)", fontsize=8)
        a.set_ylabel("i (higher score)", fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if iou[i, j] > 0:
                    a2.text(j, i, f"{float(decay[i, j]):.2f}", ha="center", va="center", fontsize=6, color="white")
    fig.colorbar(im, ax=a1, shrink=0.7)
    fig.colorbar(im2, ax=a2, shrink=0.7)
    x = np.arange(n)
    a3.bar(x - 0.2, sc.numpy(), 0.4, label="score", color="0.6")
    a3.bar(x + 0.2, new.numpy(), 0.4, label="after Matrix NMS", color="C2")
    a3.axhline(update_thresh, color="C3", ls="--", lw=1, label=f"update thr {update_thresh:g}")
    a3.set_xticks(x, names, rotation=90, fontsize=6)
    a3.legend(fontsize=7)
    a3.set_title(f"{int((new >= update_thresh).sum())} of {n} kept", fontsize=9)
    fig.tight_layout()
    return fig


def memory_markdown(memories: dict) -> str:
    """``{"label": mask_branch_memory(...)}`` → a Markdown table in MiB."""
    mib = 2 ** 20
    lines = ["| input | vanilla S² maps | decoupled 2S maps | ratio |", "|---|---|---|---|"]
    for name, mem in memories.items():
        lines.append(f"| {name} | {mem['vanilla'] / mib:.1f} MiB | {mem['decoupled'] / mib:.1f} MiB | "
                     f"{mem['ratio']:.1f}× |")
    return "\n".join(lines)


def solo_grid_explorer(image: torch.Tensor, target: dict, class_names=None, grid_numbers=PAPER_GRIDS,
                       strides=PAPER_STRIDES, scale_ranges=PAPER_SCALE_RANGES, level: int = 0, sigma: float = 0.2):
    """Widgets over :func:`plot_grid_assignment`: level (sets S to its published grid), S, σ, and an instance
    picker ("all" or one object). Returns the ``figure_explorer`` VBox (``.controls``, ``.state``)."""
    import ipywidgets as widgets

    from onestage.viz.widgets import figure_explorer

    n = target["boxes"].shape[0]
    options = [("all", -1)] + [(f"#{m} {_name(int(target['labels'][m]), class_names)}", m) for m in range(n)]
    controls = {
        "level": widgets.Dropdown(options=[(f"{lvl}: {LEVEL_NAMES[lvl]} S={g}", lvl)
                                           for lvl, g in enumerate(grid_numbers)], value=level, description="level"),
        "grid": widgets.IntSlider(value=grid_numbers[level], min=2, max=48, description="S"),
        "sigma": widgets.FloatSlider(value=sigma, min=0.05, max=1.0, step=0.05, description="σ"),
        "instance": widgets.Dropdown(options=options, value=-1, description="object"),
    }
    state = SimpleNamespace()

    def on_level(change):  # a new level starts from its published S
        controls["grid"].value = grid_numbers[change["new"]]

    controls["level"].observe(on_level, names="value")

    def render():
        lvl, s = controls["level"].value, controls["grid"].value
        inst = controls["instance"].value
        state.rows = grid_assignment_rows(target, canvas_size(image.shape[-2:]),
                                          [s if i == lvl else g for i, g in enumerate(grid_numbers)], scale_ranges,
                                          controls["sigma"].value, class_names)
        fig = plot_grid_assignment(image, target, lvl, s, controls["sigma"].value, None if inst < 0 else inst,
                                   grid_numbers, strides, scale_ranges, class_names)
        mine = [r for r in state.rows if r["level"] == lvl and (inst < 0 or r["instance"] == inst)]
        html = "<br>".join(f"object #{r['instance']} ({r['name']}, √(wh) = {r['scale']:.0f}): cells k = "
                           f"{', '.join(map(str, r['cells']))}" for r in mine) or "no object at this level"
        return fig, html

    return figure_explorer(controls, [["level", "grid"], ["sigma", "instance"]], render, state)



@torch.no_grad()
def model_outputs(model, image: torch.Tensor) -> SimpleNamespace:
    """Run a SOLO / Decoupled SOLO / SOLOv2 model on one image (eval mode, restored after) and keep what the figures
    need: ``parts`` (``model.forward_parts``), ``canvas`` (padded h, w), ``head`` (its head outputs:
    ``cate_logits``, the mask outputs or ``kernels`` + ``mask_features``) and ``detections`` (with ``cells`` and
    ``fpn_levels``: ``model.detect(parts, with_origin=True)``)."""
    was_training = model.training
    model.eval()
    try:
        parts = model.forward_parts([image])
        det = model.detect(parts, with_origin=True)[0]
    finally:
        model.train(was_training)
    return SimpleNamespace(parts=parts, canvas=parts.canvas_hw, head=parts.head, detections=det)


@torch.no_grad()
def top_candidates(model, outputs: SimpleNamespace, k: int = 8, class_names=None) -> SimpleNamespace:
    """The ``k`` best (cell, class) pairs of one image *before* NMS (after point NMS, as inference ranks them), with
    their masks at stride 4: ``cells`` (over all levels), ``levels``, ``channels`` (k = i·S + j within the level),
    ``labels``, ``scores`` (category score × maskness, what Matrix NMS receives), ``probs``, ``binary``,
    ``kernels`` (SOLOv2 only, else ``None``) and panel ``titles``."""
    parts = outputs.parts
    cate = cate_scores(parts.head.cate_logits, 0)
    top, idx = cate.reshape(-1).topk(min(k, cate.numel()))
    cells, labels = idx // model.num_classes, idx % model.num_classes
    kernels = model.flat_kernels(parts.head, 0)[cells] if "mask_features" in parts.mask_inputs else None
    probs = model.cell_mask_probs(parts, 0, cells)
    binary = probs > model.cfg.mask_thresh
    area = binary.flatten(1).sum(1).clamp(min=1)
    scores = top * (probs * binary).flatten(1).sum(1) / area
    levels, within, _ = cell_levels(model.grid_numbers)
    lv, ch = levels[cells], within[cells]
    titles = []
    for n in range(len(cells)):
        s = model.grid_numbers[int(lv[n])]
        titles.append(f"L{int(lv[n])} k={int(ch[n])} (i,j)=({int(ch[n]) // s},{int(ch[n]) % s})\n"
                      f"{_name(int(labels[n]), class_names)} cate {float(top[n]):.2f} → {float(scores[n]):.2f}")
    return SimpleNamespace(cells=cells, levels=lv, channels=ch, labels=labels, scores=scores, probs=probs,
                           binary=binary, kernels=kernels, titles=titles)
