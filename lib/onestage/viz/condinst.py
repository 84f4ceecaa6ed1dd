"""CondInst's dynamic mask heads, drawn (Tian, Shen, Chen, arXiv 2003.05664). The numbers — the instance trace,
the look-alike pair, the probes, Table 1's time column — are computed in :mod:`onestage.analysis.condinst` and
re-exported here for the walkthrough's imports.

* :func:`plot_roi_vs_full_mask` — why ROI-based mask heads are coarse and box-bound: the best a 28×28 RoI mask
  (Mask R-CNN) can do for a non-convex object, against a mask at 1/2 of the image resolution (CondInst, Table 4's
  factor 4), and what a slightly-too-small box does to the RoI mask.
* :func:`plot_dynamic_params` — the ``P`` numbers the controller outputs at one location, read as the weights and
  biases of the instance's 1×1 conv layers (169 = 8×10 + 8 + 8×8 + 8 + 1×8 + 1 at the defaults, §2.2).
* :func:`plot_instance_layers`, :func:`plot_two_instances` — one :class:`~onestage.analysis.condinst.CondInstTrace`
  (or two) layer by layer; :func:`condinst_explorer` — the widgets around them.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from onestage.analysis.condinst import (  # noqa: F401  (re-exported for the walkthrough)
    PAPER_MASK_RCNN_MS,
    CondInstTrace,
    best_gt_iou,
    condinst_trace,
    dynamic_head_layers,
    find_look_alike_pair,
    head_input_names,
    mask_head_timing_markdown,
    mask_iou,
    probe_markdown,
    probe_rows,
    table1_timing_settings,
)
from onestage.modeling.condinst import aligned_bilinear, sample_gt_masks
from onestage.ops.dynamic_mask_head import parse_dynamic_params
from onestage.viz.widgets import figure_explorer

__all__ = [
    "plot_roi_vs_full_mask",
    "plot_dynamic_params",
    "plot_instance_layers",
    "plot_two_instances",
    "condinst_explorer",
    # computed in onestage.analysis.condinst
    "PAPER_MASK_RCNN_MS",
    "CondInstTrace",
    "condinst_trace",
    "dynamic_head_layers",
    "head_input_names",
    "find_look_alike_pair",
    "probe_rows",
    "probe_markdown",
    "table1_timing_settings",
    "mask_head_timing_markdown",
]

_A_COLOR, _B_COLOR = (255, 220, 0), (0, 220, 255)


# ---------------------------------------------------------------------------------------------------------------
# 1. ROI masks vs full-image masks
# ---------------------------------------------------------------------------------------------------------------

def _toy_scene(size: int):
    """A crescent (non-convex: a disc minus an offset disc, the hollow opening to the right) and a small disc
    sitting in its hollow — inside the crescent's box but not part of it. Boolean ``size×size`` masks."""
    c, r = size / 2, 0.36 * size
    cut_r, cut_d = 0.9 * r, 0.25 * r  # a thin crescent with sharp tips
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    crescent = ((xs - c) ** 2 + (ys - c) ** 2 <= r * r) & ((xs - c - cut_d) ** 2 + (ys - c) ** 2 > cut_r * cut_r)
    neighbour = (xs - c - 0.5 * r) ** 2 + (ys - c) ** 2 <= (0.2 * r) ** 2
    return crescent, neighbour


def _tight_box(mask: Tensor) -> Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def _roi_mask(mask: Tensor, box: Tensor, roi_size: int):
    """Mask R-CNN's mask for ``box`` at its best: the ground truth resampled into the ``roi_size²`` RoI exactly as
    torchvision builds the training target (``roi_align``, not aligned; ``project_masks_on_boxes``), pasted back
    into the image as at inference (``paste_masks_in_image``, threshold 0.5)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    rois = torch.cat([torch.zeros(1, 1), box[None]], dim=1)
    roi = roi_align(mask[None, None].float(), rois, (roi_size, roi_size), 1.0)[0, 0]
    pasted = paste_masks_in_image(roi[None, None], box[None], tuple(mask.shape), padding=1)[0, 0] > 0.5
    return roi, pasted


def _error_rgb(pred: Tensor, gt: Tensor) -> Tensor:
    """H×W×3: correct pixels light grey, missed pixels red, extra pixels blue, background black."""
    rgb = torch.zeros(*gt.shape, 3)
    rgb[pred & gt] = torch.tensor([0.85, 0.85, 0.85])
    rgb[gt & ~pred] = torch.tensor([0.9, 0.1, 0.1])
    rgb[pred & ~gt] = torch.tensor([0.15, 0.35, 1.0])
    return rgb


def _draw_box(ax, box, color="yellow", ls="-", lw=1.5, shift: float = 0.0):
    x0, y0, x1, y1 = (float(v) - shift for v in box)
    ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color=color, ls=ls, lw=lw)


def plot_roi_vs_full_mask(size: int = 320, roi_size: int = 28, out_stride: int = 2, box_shrink: float = 0.1,
                          panel: float = 2.8) -> Figure:
    """Five panels on a synthetic crescent (non-convex) with a small disc in its hollow:

    1. the scene, the crescent's tight box (yellow) and a box ``box_shrink`` too small (dashed, a typical
       detection error of a few pixels per side);
    2. the ``roi_size²`` RoI mask of the tight box — the best Mask R-CNN's head can output (its training target);
    3. that RoI mask pasted back into the image, errors coloured (red: missed, blue: extra);
    4. the mask sampled at ``1/out_stride`` of the image (CondInst: stride 8 upsampled ×4, Table 4) and upsampled
       to the image with ``aligned_bilinear`` — the best CondInst can output, whatever the box;
    5. the RoI mask of the too-small box: everything outside the box is lost.

    These are *upper bounds*, computed from the ground truth, not predictions. The RoI's resolution follows the
    box (here a ~230-px box: 8-px cells), so it is coarse for large objects and fine for small ones (a 28-px box
    gets 1-px cells); CondInst's is fixed by the image. ``fig.ious`` holds the IoU of each
    with the true mask (``"roi"``, ``"full"``, ``"roi_small_box"``), ``fig.masks`` the pasted masks, ``fig.boxes``
    the two boxes.
    """
    if size % out_stride:
        raise ValueError("size must be a multiple of out_stride")
    crescent, neighbour = _toy_scene(size)
    box = _tight_box(crescent)
    wh = box[2:] - box[:2]
    small = torch.cat([box[:2] + wh * box_shrink / 2, box[2:] - wh * box_shrink / 2])
    roi, roi_pasted = _roi_mask(crescent, box, roi_size)
    _, small_pasted = _roi_mask(crescent, small, roi_size)
    sampled = sample_gt_masks(crescent.float(), out_stride)
    full = aligned_bilinear(sampled[None], out_stride)[0][:size, :size] > 0.5
    ious = {"roi": mask_iou(roi_pasted, crescent), "full": mask_iou(full, crescent),
            "roi_small_box": mask_iou(small_pasted, crescent)}

    scene = torch.full((size, size, 3), 0.35)
    scene[crescent] = torch.tensor([0.95, 0.55, 0.15])
    scene[neighbour] = torch.tensor([0.25, 0.55, 0.95])
    fig = Figure(figsize=(panel * 5, panel + 0.9), layout="constrained")
    axes = fig.subplots(1, 5)
    axes[0].imshow(scene.numpy(), extent=(0, size, size, 0))
    _draw_box(axes[0], box)
    _draw_box(axes[0], small, ls="--", lw=1.2)
    inside = float(crescent[int(box[1]):int(box[3]), int(box[0]):int(box[2])].float().mean())
    axes[0].set_title(f"a crescent and its box: only {inside:.0%} of\nthe box is the object; a disc sits inside it",
                      fontsize=8)
    axes[1].imshow(roi.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[1].set_title(f"Mask R-CNN: the {roi_size}×{roi_size} RoI mask\n(one cell = "
                      f"{float(wh[0]) / roi_size:.1f}×{float(wh[1]) / roi_size:.1f} px here)", fontsize=8)
    axes[2].imshow(_error_rgb(roi_pasted, crescent).numpy(), extent=(0, size, size, 0))
    _draw_box(axes[2], box)
    axes[2].set_title(f"RoI mask pasted into the image\nIoU {ious['roi']:.3f}", fontsize=8)
    axes[3].imshow(_error_rgb(full, crescent).numpy(), extent=(0, size, size, 0))
    axes[3].set_title(f"CondInst: mask at 1/{out_stride} resolution\n(no box involved) IoU {ious['full']:.3f}",
                      fontsize=8)
    axes[4].imshow(_error_rgb(small_pasted, crescent).numpy(), extent=(0, size, size, 0))
    _draw_box(axes[4], small, ls="--")
    axes[4].set_title(f"RoI mask of a box {box_shrink:.0%} too small:\ncut at the box, IoU "
                      f"{ious['roi_small_box']:.3f}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Best possible masks (computed from the ground truth), errors: red = missed, blue = extra. "
                 f"A {size}×{size} image", fontsize=9)
    fig.ious = ious
    fig.masks = {"true": crescent, "roi": roi_pasted, "full": full, "roi_small_box": small_pasted}
    fig.boxes = {"tight": box, "small": small}
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 4. Figures
# ---------------------------------------------------------------------------------------------------------------

def _uint8(image: Tensor) -> Tensor:
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _overlay(image: Tensor, traces: Sequence[CondInstTrace], colors=(_A_COLOR, _B_COLOR), masks: bool = True):
    img = _uint8(image)
    for t, color in zip(traces, colors):
        if masks and t.pasted.any():
            img = draw_segmentation_masks(img, t.pasted[None], alpha=0.45, colors=[color])
    boxes = torch.stack([t.box for t in traces]).float()
    img = draw_bounding_boxes(img, boxes, colors=list(colors[: len(traces)]), width=2)
    return img.permute(1, 2, 0).numpy()


def _show(ax, data: Tensor, title: str, cmap="viridis", vmin=None, vmax=None, point=None, stride: int = 8):
    ax.imshow(data.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if point is not None:  # an input-pixel (x, y) at this map's stride (pixel k's centre is at k·s + s//2)
        ax.plot([(float(point[0]) - stride // 2) / stride], [(float(point[1]) - stride // 2) / stride], "+",
                color="lime", ms=7, mew=1.5)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _sym(t: Tensor) -> float:
    return float(t.abs().max().clamp(min=1e-6)) if t.numel() else 1.0


def _name(label: int, class_names) -> str:
    return class_names[label] if class_names and label < len(class_names) else str(label)


def _weights_panel(ax, w: Tensor, b: Tensor, title: str, in_names: Sequence[str], numbers: bool = False):
    """``W`` (C_out×C_in) and ``b`` as one heat map, the bias as a last column after a gap."""
    c_out, c_in = w.shape
    grid = torch.full((c_out, c_in + 2), float("nan"))
    grid[:, :c_in] = w
    grid[:, c_in + 1] = b
    m = _sym(torch.cat([w.flatten(), b.flatten()]))
    ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest", aspect="auto")
    ax.set_xticks(list(range(c_in)) + [c_in + 1])
    ax.set_xticklabels(list(in_names) + ["bias"], rotation=90, fontsize=6)
    ax.set_yticks(range(c_out))
    ax.set_yticklabels([str(o + 1) for o in range(c_out)], fontsize=6)
    ax.set_ylabel("output channel", fontsize=7)
    ax.set_title(title, fontsize=8)
    if numbers:
        for o in range(c_out):
            for i in list(range(c_in)) + [c_in + 1]:
                v = float(grid[o, i])
                ax.text(i, o, f"{v:.1f}", ha="center", va="center", fontsize=4.5,
                        color="white" if abs(v) > 0.6 * m else "black")


def plot_dynamic_params(params_or_trace, mask_channels: int = 8, width: int = 8, depth: int = 3,
                        coords: str = "rel", numbers: bool = True, panel: float = 2.6, title: str = "") -> Figure:
    """The ``P`` numbers of one instance's head (a 1-D tensor, or a :class:`CondInstTrace`, whose configuration is
    then used) read as ``depth`` 1×1 conv layers by ``parse_dynamic_params``: one heat map per layer, the weight
    matrix ``W_l`` (output channel × input channel) with the bias as a last column, the count in the title.
    ``fig.parsed`` holds ``(weights, biases)``."""
    if isinstance(params_or_trace, CondInstTrace):
        t = params_or_trace
        params, mask_channels, coords = t.params, t.mask_feats.shape[0], t.coords_mode
        depth, width = t.depth, (t.weights[0].shape[0] if t.depth > 1 else width)
    else:
        params = torch.as_tensor(params_or_trace).detach().float().cpu().flatten()
    in_names = head_input_names(mask_channels, coords)
    weights, biases = parse_dynamic_params(params[None], len(in_names), width, depth)
    weights, biases = [x[0] for x in weights], [x[0] for x in biases]
    ratios = [w.shape[1] + 2 for w in weights]
    fig = Figure(figsize=(panel * depth + 1.0, panel + 1.2), layout="constrained")
    axes = fig.subplots(1, depth, squeeze=False, width_ratios=ratios)[0]
    counts = []
    for layer, (ax, w, b) in enumerate(zip(axes, weights, biases)):
        names = in_names if layer == 0 else [f"h{i + 1}" for i in range(w.shape[1])]
        o, i = w.shape
        counts.append(o * i + o)
        last = "  (logit)" if layer == depth - 1 else "  → ReLU"
        _weights_panel(ax, w, b, f"layer {layer + 1}: W{layer} {o}×{i} = {o * i}, b{layer} {o}{last}", names,
                       numbers and o * (i + 1) <= 128)
    total = sum(counts)
    fig.suptitle((title + "\n" if title else "") + f"{' + '.join(map(str, counts))} = {total} numbers from one "
                 f"location of the controller (weights first, then biases)", fontsize=9)
    fig.parsed = (weights, biases)
    return fig


def plot_instance_layers(trace: CondInstTrace, class_names: Optional[Sequence[str]] = None,
                         panel: float = 1.25) -> Figure:
    """One instance's head, row by row. Row 1: the image (box yellow, the instance's location +) and the head's
    input channels — the two coordinate channels, then the ``Cmask`` channels of ``Fmask``. Each next row: in the
    first column the weights ``W_l`` (output × input, bias last) that map the row above to this row, then this
    layer's output channels after the ReLU. Last row: ``W`` of the last layer, the logits at stride 8, upsampled
    (``aligned_bilinear``), the sigmoid, and the mask in the image at the threshold."""
    t = trace
    inp = t.head_input
    names = t.input_names
    ncols = 1 + max(inp.shape[0], max((hid.shape[0] for hid in t.hidden), default=0), 4)
    nrows = 2 + len(t.hidden)
    fig = Figure(figsize=(panel * ncols + 0.3, panel * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    ax0 = axes[0, 0]
    ax0.set_axis_on()
    ax0.imshow(_overlay(t.image, [t], masks=False))
    ax0.plot([float(t.location[0])], [float(t.location[1])], "+", color="lime", ms=8, mew=2)
    ax0.set_xticks([])
    ax0.set_yticks([])
    ax0.set_title(f"det. {t.instance + 1}/{t.num_detections}: {_name(t.label, class_names)} {t.score:.2f}",
                  fontsize=7)
    cm = _sym(t.coords) if t.coords.numel() and t.coords.abs().max() > 0 else 1.0
    fm = _sym(t.mask_feats)
    for c, (name, ch) in enumerate(zip(names, inp), start=1):
        axes[0, c].set_axis_on()
        is_coord = c <= t.coords.shape[0]
        title = name + (" (zeroed)" if is_coord and not t.rel_coords else "")
        _show(axes[0, c], ch, title, "PuOr_r" if is_coord else "RdBu_r", -(cm if is_coord else fm),
              cm if is_coord else fm, point=t.location, stride=t.mask_stride)
    prev_names = names
    for r, hid in enumerate(t.hidden, start=1):
        axes[r, 0].set_axis_on()
        _weights_panel(axes[r, 0], t.weights[r - 1], t.biases[r - 1], f"W{r - 1}, b{r - 1}", prev_names)
        axes[r, 0].set_ylabel("")
        hm = max(float(hid.max()), 1e-6)
        for c in range(hid.shape[0]):
            axes[r, c + 1].set_axis_on()
            _show(axes[r, c + 1], hid[c], f"layer {r} ch {c + 1}", "magma", 0, hm)
        prev_names = [f"h{i + 1}" for i in range(hid.shape[0])]
    last = nrows - 1
    axes[last, 0].set_axis_on()
    _weights_panel(axes[last, 0], t.weights[-1], t.biases[-1], f"W{t.depth - 1}, b{t.depth - 1}", prev_names)
    axes[last, 0].set_ylabel("")
    lm = _sym(t.logits)
    for ax in axes[last, 1:5]:
        ax.set_axis_on()
    _show(axes[last, 1], t.logits, f"layer {t.depth}: logits\n(stride {t.mask_stride})", "RdBu_r", -lm, lm,
          point=t.location, stride=t.mask_stride)
    _show(axes[last, 2], t.logits_up, f"×{t.upsample_factor} aligned\n(stride {t.out_stride})", "RdBu_r", -lm, lm)
    _show(axes[last, 3], t.prob, "sigmoid", "gray", 0, 1)
    axes[last, 4].imshow(_overlay(t.image, [t]))
    axes[last, 4].set_xticks([])
    axes[last, 4].set_yticks([])
    axes[last, 4].set_title(f"mask > {t.threshold:g}: {int(t.pasted.sum())} px", fontsize=7)
    coords = {"rel": "relative", "abs": "absolute", "none": "no", "coords_only": "relative (no Fmask)"}[t.coords_mode]
    fig.suptitle(f"level P{t.fpn_level + 3}, location ({float(t.location[0]):.0f}, {float(t.location[1]):.0f}), "
                 f"coordinates / {t.size_of_interest:g}; {coords} coordinates"
                 + ("" if t.rel_coords else " ZEROED (inference-time probe)")
                 + f"; {len(t.params)} parameters, depth {t.depth}"
                 + (f"\n{t.note}" if t.note else ""), fontsize=8)
    return fig


def _param_grid(params: Tensor) -> Tensor:
    side = math.ceil(math.sqrt(params.numel()))
    grid = torch.full((side * side,), float("nan"))
    grid[: params.numel()] = params
    return grid.reshape(side, side)


def plot_two_instances(trace_a: CondInstTrace, trace_b: CondInstTrace, class_names: Optional[Sequence[str]] = None,
                       panel: float = 1.45) -> Figure:
    """Two instances of one image: the same ``Fmask`` (row 1), different heads (rows 2–3). Per instance: its two
    coordinate channels, its ``P`` parameters (row-major in a square, in ``parse_dynamic_params`` order), its
    logits, its mask and the mask in the image; then its filters run with the *other* instance's coordinates.

    ``fig.swapped`` holds the masks (input size) of those swaps: ``"a_filters_b_coords"``, ``"b_filters_a_coords"``.
    """
    a, b = trace_a, trace_b
    if a.mask_feats.shape != b.mask_feats.shape or not torch.equal(a.mask_feats, b.mask_feats):
        raise ValueError("the two traces must come from the same image (the same Fmask)")
    cmask = a.mask_feats.shape[0]
    ncols = max(1 + cmask, 8)
    fig = Figure(figsize=(panel * ncols + 0.3, panel * 3 + 0.8), layout="constrained")
    axes = fig.subplots(3, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].set_axis_on()
    axes[0, 0].imshow(_overlay(a.image, [a, b], masks=False))
    for t, color in ((a, _A_COLOR), (b, _B_COLOR)):
        axes[0, 0].plot([float(t.location[0])], [float(t.location[1])], "+", ms=8, mew=2,
                        color=[v / 255 for v in color])
    axes[0, 0].set_title("A (yellow), B (cyan)", fontsize=7)
    axes[0, 0].set_xticks([])
    axes[0, 0].set_yticks([])
    fm = _sym(a.mask_feats)
    for c in range(cmask):
        axes[0, c + 1].set_axis_on()
        _show(axes[0, c + 1], a.mask_feats[c], f"Fmask {c + 1} (shared)", "RdBu_r", -fm, fm)

    def swapped(t_filters: CondInstTrace, t_coords: CondInstTrace) -> Tensor:
        parts = ([t_coords.coords] if t_filters.coords_mode != "none" else []) + \
                ([t_filters.mask_feats] if t_filters.coords_mode != "coords_only" else [])
        _, logits = dynamic_head_layers(torch.cat(parts), t_filters.weights, t_filters.biases)
        prob = aligned_bilinear(logits[None], t_filters.upsample_factor)[0].sigmoid()
        h, w = t_filters.pasted.shape
        return aligned_bilinear(prob[None], t_filters.out_stride)[0][:h, :w] > t_filters.threshold

    swaps = {"a_filters_b_coords": swapped(a, b), "b_filters_a_coords": swapped(b, a)}
    cm = max(_sym(a.coords), _sym(b.coords))
    pm = max(_sym(a.params), _sym(b.params))
    lm = max(_sym(a.logits), _sym(b.logits))
    for r, (t, other, tag, otag, swap) in enumerate(((a, b, "A", "B", swaps["a_filters_b_coords"]),
                                                     (b, a, "B", "A", swaps["b_filters_a_coords"])), start=1):
        for ax in axes[r, :8]:
            ax.set_axis_on()
        name = f"{tag}: {_name(t.label, class_names)} {t.score:.2f}"
        if t.coords.shape[0]:
            _show(axes[r, 0], t.coords[0], f"{name}\n{t.input_names[0]}", "PuOr_r", -cm, cm, point=t.location,
                  stride=t.mask_stride)
            _show(axes[r, 1], t.coords[1], t.input_names[1], "PuOr_r", -cm, cm, point=t.location,
                  stride=t.mask_stride)
        _show(axes[r, 2], _param_grid(t.params), f"its {len(t.params)} parameters", "RdBu_r", -pm, pm)
        _show(axes[r, 3], t.logits, "logits (stride 8)", "RdBu_r", -lm, lm, point=t.location, stride=t.mask_stride)
        _show(axes[r, 4], t.prob, f"mask (stride {t.out_stride})", "gray", 0, 1)
        axes[r, 5].imshow(_overlay(t.image, [t], colors=(_A_COLOR if tag == "A" else _B_COLOR,)))
        axes[r, 5].set_title(f"{tag}'s mask: {int(t.pasted.sum())} px", fontsize=7)
        axes[r, 6].imshow(_error_rgb(swap, t.pasted).numpy())
        axes[r, 6].set_title(f"{tag}'s filters, {otag}'s coords\n(grey/red: {tag}'s mask)", fontsize=7)
        axes[r, 7].imshow(_error_rgb(swap, other.pasted).numpy())
        axes[r, 7].set_title(f"same, against {otag}'s mask\nIoU {mask_iou(swap, other.pasted):.2f}", fontsize=7)
        for ax in axes[r, 5:8]:
            ax.set_xticks([])
            ax.set_yticks([])
    cos = float(F.cosine_similarity(a.params, b.params, dim=0))
    fig.suptitle(f"Same features, different heads: cosine similarity of the two parameter vectors {cos:.2f}. "
                 "Swaps: grey = in both, red = only in the reference mask, blue = only in the swap", fontsize=8)
    fig.swapped = swaps
    fig.cosine = cos
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 3. Explorer
# ---------------------------------------------------------------------------------------------------------------

def condinst_explorer(model, dataset, class_names: Optional[Sequence[str]] = None, image_index: int = 0,
                      instance: int = 0, rel_coords: bool = True, upsample_factor: Optional[int] = None,
                      threshold: Optional[float] = None, dpi: int = 70):
    """Widgets around :func:`plot_instance_layers`: image, instance (detection by score), a "relative coordinates"
    checkbox (off: the coordinate channels are zeroed — an inference-time probe of the trained model, not Table 3's
    retrained one), the upsampling factor (1/2/4/8) and the mask threshold. Network outputs are cached per image, so
    every control but the image only re-runs the tiny head. The widget carries ``controls``, ``state`` (``trace``,
    ``iou``, ``redraws``, ``figure``, ``error``) and ``update``."""
    import ipywidgets as widgets

    names = class_names or getattr(model, "class_names", None) or getattr(dataset, "class_names", None)
    cfg = model.cfg
    controls = {
        "image_index": widgets.IntSlider(value=int(image_index), min=0, max=max(len(dataset) - 1, 0),
                                         description="image", continuous_update=False),
        "instance": widgets.IntSlider(value=int(instance), min=0, max=max(cfg.detections_per_img - 1, 0),
                                      description="instance", continuous_update=False),
        "rel_coords": widgets.Checkbox(value=bool(rel_coords), description="coordinate channels"),
        "upsample_factor": widgets.Dropdown(options=[1, 2, 4, 8], description="upsample ×",
                                            value=int(cfg.mask_upsample_factor if upsample_factor is None
                                                      else upsample_factor)),
        "threshold": widgets.FloatSlider(value=float(cfg.mask_threshold if threshold is None else threshold),
                                         min=0.05, max=0.95, step=0.05, description="threshold",
                                         continuous_update=False),
    }
    state = SimpleNamespace(trace=None, iou=None)
    cache: dict = {}

    def render():
        i = controls["image_index"].value
        image, target = dataset[i]
        trace = condinst_trace(model, image, controls["instance"].value, controls["rel_coords"].value,
                               controls["upsample_factor"].value, controls["threshold"].value, cache=cache, key=i)
        fig = plot_instance_layers(trace, class_names=names)
        state.trace, state.iou = trace, best_gt_iou(trace.pasted, target)
        caption = (f"<b>image {i}</b>, detection {trace.instance + 1} of {trace.num_detections} "
                   f"({_name(trace.label, names)} {trace.score:.2f}): coordinate channels "
                   f"{'on' if trace.rel_coords else '<b>zeroed</b>'}, ×{trace.upsample_factor} (stride "
                   f"{trace.out_stride}), threshold {trace.threshold:g}; mask {int(trace.pasted.sum())} px, best "
                   f"IoU with a ground-truth mask {state.iou:.2f}")
        return fig, caption

    return figure_explorer(controls, [["image_index", "instance"], ["rel_coords", "upsample_factor", "threshold"]],
                           render, state, dpi)
