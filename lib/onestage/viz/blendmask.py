"""BlendMask's blender, step by step on a trained model, its YOLACT / FCIS special cases, and its cost.

* :func:`blender_trace` — every intermediate of one detected instance: the ``K`` bases, the instance's ``K×M×M``
  attention, the attention interpolated to ``R×R``, the softmax, the ``K`` RoI crops of the bases, their products,
  the blended logits, the mask and the mask pasted into the image. Knobs for the lesson: keep only the first ``k``
  bases, average-pool the attention to a coarser ``M``, switch the interpolation, or replace the attention by the
  YOLACT (``M = 1``) or FCIS (fixed one-hot grid, nearest) settings (BlendMask §4.1, "Merging methods").
* :func:`plot_blender_steps`, :func:`plot_blender_settings` — the figures; :func:`blender_explorer` — the widgets.
* :func:`blender_cost`, :func:`mask_rcnn_head_cost`, :func:`cost_markdown` — FLOPs and parameters per RoI measured
  with ``torch.utils.flop_counter.FlopCounterMode``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from onestage.modeling.blendmask import paste_masks, pool_bases
from onestage.ops.blender import blend_reference, fcis_attention, interpolate_attention
from onestage.modeling.parts import parts_for_display
from onestage.viz.widgets import figure_explorer

__all__ = [
    "SETTINGS",
    "BlenderTrace",
    "blender_trace",
    "plot_blender_steps",
    "plot_blender_settings",
    "blender_explorer",
    "blender_cost",
    "mask_rcnn_head_cost",
    "cost_markdown",
    "elementwise_flop_formulas",
]

#: How the attention is formed (BlendMask §4.1): the model's own ("blender"), one coefficient per basis averaged
#: over the attention map ("yolact", M = 1), FCIS's fixed one-hot grid with nearest interpolation ("fcis").
SETTINGS = ("blender", "yolact", "fcis")
_BASIS_COLORS = torch.tensor([[230, 60, 60], [60, 110, 230], [240, 200, 40], [50, 180, 80], [170, 80, 200],
                              [240, 140, 40], [40, 190, 200], [200, 200, 200]], dtype=torch.float32) / 255


@dataclass
class BlenderTrace:
    """One instance through the blender. Tensors on the CPU; ``K`` = bases used, ``M`` = attention size used."""

    image: Tensor            # 3×H×W, 0..1
    box: Tensor              # 4, xyxy input pixels (the detection's box)
    score: float
    label: int
    instance: int            # index among the image's detections (sorted by score)
    num_detections: int
    bases: Tensor            # K×h×w, the whole image's bases at stride ``stride``
    stride: int
    attn: Tensor             # K×M×M attention as used (logits; FCIS: the one-hot weights)
    attn_interp: Tensor      # K×R×R after interpolation
    weights: Tensor          # K×R×R after the normalisation (softmax; FCIS: the one-hot weights)
    rois: Tensor             # K×R×R RoI crops of the bases
    products: Tensor         # K×R×R weights · crops
    logits: Tensor           # R×R mask logits (Σ of the products)
    prob: Tensor             # R×R sigmoid
    pasted: Tensor           # H×W bool, the mask in the image
    setting: str
    interpolation: str
    normalize: str
    note: str = ""

    @property
    def num_bases(self) -> int:
        return self.rois.shape[0]

    @property
    def attn_size(self) -> int:
        return self.attn.shape[-1]


def _forward_parts(model, image: Tensor):
    """Bases, flat attentions and detections (with location indices) of one image, from ``model.forward_parts`` and
    ``model.detect(..., with_origin=True)``, the model in eval mode."""
    parts, det, note = parts_for_display(model, image)
    attns = parts.mask_inputs["attentions"]
    det = {k: v for k, v in det.items() if k not in ("masks", "attentions")}
    return parts.mask_inputs["bases"][0], (attns[0] if attns is not None else None), det, parts.image_sizes[0], note


def blender_trace(model, image: Tensor, instance: int = 0, keep_bases: Optional[int] = None,
                  attn_size: Optional[int] = None, interpolation: Optional[str] = None, setting: str = "blender",
                  cache: Optional[dict] = None, key=None) -> BlenderTrace:
    """Run ``image`` through ``model`` (a ``BlendMask``) and blend detection number ``instance`` (by score,
    wrapping around) step by step, as ``BlendMask.detect`` does, with optional changes:

    * ``keep_bases`` — use only the first ``k`` bases (the softmax then runs over those ``k``);
    * ``attn_size`` — average-pool the predicted attention logits to ``attn_size×attn_size`` first (``1`` is the
      YOLACT setting);
    * ``interpolation`` — ``"bilinear"`` / ``"nearest"`` instead of the model's ``top_interp``;
    * ``setting`` — ``"blender"`` (the model's attention), ``"yolact"`` (attention averaged to one coefficient per
      basis, softmax) or ``"fcis"`` (fixed one-hot ``g×g`` grid over ``K = g²`` bases, nearest, no softmax; the
      model's own attention is ignored; with a non-square ``K`` the first ``g²`` bases are used).

    ``cache`` (a dict) with ``key`` keeps the network outputs of an image between calls (the explorer uses it).
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if cache is not None and key in cache:
        parts = cache[key]
    else:
        parts = _forward_parts(model, image)
        if cache is not None:
            cache[key] = parts
    bases, attns, det, (h, w), note = parts
    cfg = model.cfg
    n_det = len(det["boxes"])
    if n_det == 0:
        raise ValueError("the model made no candidate at all on this image")
    instance = int(instance) % n_det
    box = det["boxes"][instance]
    rois = pool_bases(bases[None], [box[None]], cfg.bottom_resolution, cfg.basis_stride, cfg.bottom_pooler)[0]
    k_all = rois.shape[0]
    if attns is None:  # a model trained with blender="fcis": its attention is the fixed one-hot grid
        attn = fcis_attention(cfg.attn_size, 1, rois.device, rois.dtype)[0]
    else:
        m = cfg.effective_attn_size
        attn = attns[det["location_inds"][instance]].reshape(k_all, m, m)
    k = k_all if keep_bases is None else max(1, min(int(keep_bases), k_all))
    rois, attn = rois[:k], attn[:k]
    interp = interpolation or cfg.effective_top_interp
    normalize = "none" if cfg.blender == "fcis" else cfg.attn_normalize
    if setting == "yolact":
        attn = attn.mean(dim=(-2, -1), keepdim=True) if attns is not None else attn.new_zeros(k, 1, 1)
        normalize = "softmax" if k > 1 else normalize
    elif setting == "fcis":
        grid = math.isqrt(k)
        if grid * grid != k:  # FCIS needs K = g² bases: use the first g²
            note = (note + "; " if note else "") + f"FCIS setting: K = {k} is not a square, using the first {grid ** 2}"
            k, rois = grid * grid, rois[: grid * grid]
        attn, interp, normalize = fcis_attention(grid, 1, rois.device, rois.dtype)[0], "nearest", "none"
    elif attn_size is not None and attns is not None and int(attn_size) < attn.shape[-1]:
        attn = F.adaptive_avg_pool2d(attn[None], int(attn_size))[0]
    if k == 1 and normalize == "softmax":
        normalize = "sigmoid"  # a softmax over one basis is the constant 1 (BlendMask Table 3 uses sigmoids)
    r = rois.shape[-1]
    attn_interp = interpolate_attention(attn[None], (r, r), interp)[0]
    if normalize == "softmax":
        weights = attn_interp.softmax(0)
    elif normalize == "sigmoid":
        weights = attn_interp.sigmoid()
    else:
        weights = attn_interp
    logits = blend_reference(rois[None], attn[None], interp, normalize)[0]
    products = weights * (rois.sigmoid() if normalize == "sigmoid" else rois)
    prob = logits.sigmoid()
    pasted = paste_masks(prob[None], box[None], h, w, cfg.mask_thresh)[0]
    hb, wb = math.ceil(h / cfg.basis_stride), math.ceil(w / cfg.basis_stride)
    return BlenderTrace(image=image.detach().cpu()[:, :h, :w], box=box.cpu(), score=float(det["scores"][instance]),
                        label=int(det["labels"][instance]), instance=instance, num_detections=n_det,
                        bases=bases[:k, :hb, :wb].cpu(), stride=cfg.basis_stride, attn=attn.cpu(),
                        attn_interp=attn_interp.cpu(), weights=weights.cpu(), rois=rois.cpu(),
                        products=products.cpu(), logits=logits.cpu(), prob=prob.cpu(), pasted=pasted.cpu(),
                        setting=setting, interpolation=interp, normalize=normalize, note=note)


# ------------------------------------------------------------------------------------------------------ figures
def _uint8(image: Tensor) -> Tensor:
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _overlay(trace: BlenderTrace, with_mask: bool = True) -> Tensor:
    img = _uint8(trace.image)
    if with_mask and trace.pasted.any():
        img = draw_segmentation_masks(img, trace.pasted[None], alpha=0.5, colors=[(255, 60, 200)])
    return draw_bounding_boxes(img, trace.box[None].float(), colors=[(255, 255, 0)], width=2)


def _show(ax, data: Tensor, title: str, cmap="viridis", vmin=None, vmax=None, box: Optional[Tensor] = None):
    ax.imshow(data.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    if box is not None:
        x0, y0, x1, y1 = box.tolist()
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="yellow", lw=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _sym(t: Tensor) -> float:
    return float(t.abs().max().clamp(min=1e-6))


def plot_blender_steps(model_or_trace, image: Optional[Tensor] = None, instance: int = 0,
                       show_basis: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                       panel: float = 1.7, **trace_kwargs) -> Figure:
    """The blender on one instance, one column per basis (``show_basis``: only that one) and a first column with
    the result. Rows: the bases over the whole image (box in yellow) · the attention ``a_k`` (M×M, logits) ·
    interpolated to R×R (eq. 2) · after the softmax over K (eq. 3) · the RoI crop ``r_k`` of the basis ·
    ``s_k ∘ r_k``, whose sum over k is the mask logit (eq. 4). First column: the image with the box, the logits,
    the mask (sigmoid) and the mask pasted into the image. Pass a :class:`BlenderTrace`, or a model and an image
    (and :func:`blender_trace`'s keyword arguments)."""
    t = model_or_trace if isinstance(model_or_trace, BlenderTrace) else \
        blender_trace(model_or_trace, image, instance, **trace_kwargs)
    cols = list(range(t.num_bases)) if show_basis is None else [int(show_basis) % t.num_bases]
    rows = 6
    fig = Figure(figsize=(panel * (len(cols) + 1) + 0.3, panel * rows), layout="constrained")
    axes = fig.subplots(rows, len(cols) + 1, squeeze=False)
    name = (class_names[t.label] if class_names and t.label < len(class_names) else str(t.label))
    axes[0, 0].imshow(_overlay(t, with_mask=False).permute(1, 2, 0).numpy())
    axes[0, 0].set_title(f"detection {t.instance + 1}/{t.num_detections}\n{name} {t.score:.2f}", fontsize=8)
    axes[0, 0].set_axis_off()
    m = _sym(t.logits)
    _show(axes[1, 0], t.logits, "mask logits\nΣ_k s_k∘r_k", "RdBu_r", -m, m)
    _show(axes[2, 0], t.prob, "mask = σ(logits)", "gray", 0, 1)
    axes[3, 0].imshow(_overlay(t).permute(1, 2, 0).numpy())
    axes[3, 0].set_title("pasted into the image", fontsize=8)
    axes[3, 0].set_axis_off()
    for r in (4, 5):
        axes[r, 0].set_axis_off()
    axes[4, 0].text(0, 0.5, f"K = {t.num_bases}, M = {t.attn_size}\nR = {t.rois.shape[-1]}\n{t.interpolation}, "
                    f"{t.normalize}\nsetting: {t.setting}", fontsize=8, va="center")
    box_b = t.box / t.stride - 0.5
    mb, ma, mr, mp = _sym(t.bases), _sym(t.attn), _sym(t.rois), _sym(t.products)
    wmax = 1.0 if t.normalize != "none" else max(float(t.weights.max()), 1e-6)
    for c, k in enumerate(cols, start=1):
        _show(axes[0, c], t.bases[k], f"basis {k + 1} (stride {t.stride})", "RdBu_r", -mb, mb, box=box_b)
        _show(axes[1, c], t.attn[k], f"attention a_{k + 1} ({t.attn_size}×{t.attn_size})", "RdBu_r", -ma, ma)
        _show(axes[2, c], t.attn_interp[k], f"{t.interpolation} → {t.rois.shape[-1]}²", "RdBu_r", -ma, ma)
        title = {"softmax": "softmax over K: s", "sigmoid": "sigmoid: s", "none": "weights (no softmax): s"}
        _show(axes[3, c], t.weights[k], f"{title[t.normalize]}_{k + 1}", "magma", 0, wmax)
        _show(axes[4, c], t.rois[k], f"RoI crop r_{k + 1}", "RdBu_r", -mr, mr)
        _show(axes[5, c], t.products[k], f"s_{k + 1}∘r_{k + 1}", "RdBu_r", -mp, mp)
    if t.note:
        fig.suptitle(t.note, fontsize=8)
    fig.trace = t
    return fig


def _weight_composite(weights: Tensor) -> Tensor:
    """K×R×R weights → R×R×3 colours: each basis has a colour, a pixel mixes them by its weights."""
    colors = _BASIS_COLORS[torch.arange(weights.shape[0]) % len(_BASIS_COLORS)]
    w = weights.clamp(min=0)
    w = w / w.sum(0, keepdim=True).clamp(min=1e-6)
    return torch.einsum("khw,kc->hwc", w, colors)


def plot_blender_settings(model, image: Tensor, instance: int = 0, class_names: Optional[Sequence[str]] = None,
                          panel: float = 2.2, cache: Optional[dict] = None, key=None, **trace_kwargs) -> Figure:
    """The same instance blended three ways (BlendMask §4.1): the model's blender, the YOLACT setting (its
    attention averaged to one coefficient per basis, M = 1) and the FCIS setting (fixed one-hot ``g×g`` grid,
    nearest interpolation, no softmax). Rows: which basis each pixel takes (colour = basis, mixed by weight), the
    mask and the pasted result. The weights of the last two columns are not what a model *trained* that way would
    predict — train with ``blender="yolact"`` / ``"fcis"`` for that (the ``blendmask_table1`` reproduction)."""
    cache = {} if cache is None else cache
    traces = [blender_trace(model, image, instance, setting=s, cache=cache, key=key, **trace_kwargs)
              for s in SETTINGS]
    fig = Figure(figsize=(panel * 3, panel * 3 + 0.4), layout="constrained")
    axes = fig.subplots(3, 3, squeeze=False)
    titles = {"blender": "BlendMask blender", "yolact": "YOLACT setting (M = 1)", "fcis": "FCIS setting (one-hot)"}
    for c, t in enumerate(traces):
        axes[0, c].imshow(_weight_composite(t.weights).numpy(), interpolation="nearest")
        axes[0, c].set_title(f"{titles[t.setting]}\nK = {t.num_bases}, M = {t.attn_size}, {t.interpolation}",
                             fontsize=8)
        _show(axes[1, c], t.prob, "mask σ(Σ s_k∘r_k)", "gray", 0, 1)
        axes[2, c].imshow(_overlay(t).permute(1, 2, 0).numpy())
        axes[2, c].set_title(f"pasted: {int(t.pasted.sum())} px", fontsize=8)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    t = traces[0]
    name = (class_names[t.label] if class_names and t.label < len(class_names) else str(t.label))
    fig.suptitle(f"detection {t.instance + 1}/{t.num_detections}: {name} {t.score:.2f}. Row 1 colour = basis "
                 f"(red, blue, yellow, green, …) mixed by its weight", fontsize=8)
    fig.traces = traces
    return fig


def blender_explorer(model, dataset, class_names: Optional[Sequence[str]] = None, image_index: int = 0,
                     instance: int = 0, dpi: int = 70):
    """Widgets around :func:`plot_blender_steps`: image, instance (detection by score), ``K`` (bases kept),
    ``M`` (attention pooled to M×M), interpolation, setting (blender / YOLACT / FCIS) and show-one-basis. Network
    outputs are cached per image, so every control but the image only re-runs the blender. The widget carries
    ``controls``, ``state`` (``trace``, ``redraws``, ``figure``, ``error``) and ``update``."""
    import ipywidgets as widgets

    names = class_names or getattr(model, "class_names", None) or getattr(dataset, "class_names", None)
    cfg = model.cfg
    k = cfg.num_bases
    controls = {
        "image_index": widgets.IntSlider(value=int(image_index), min=0, max=max(len(dataset) - 1, 0),
                                         description="image", continuous_update=False),
        "instance": widgets.IntSlider(value=int(instance), min=0, max=max(cfg.detections_per_img - 1, 0),
                                      description="instance", continuous_update=False),
        "keep_bases": widgets.IntSlider(value=k, min=1, max=k, description="K (bases kept)",
                                        continuous_update=False),
        "attn_size": widgets.IntSlider(value=cfg.effective_attn_size, min=1, max=cfg.effective_attn_size,
                                       description="M", continuous_update=False),
        "interpolation": widgets.Dropdown(options=["bilinear", "nearest"], value=cfg.effective_top_interp,
                                          description="interp."),
        "setting": widgets.Dropdown(options=list(SETTINGS), value="blender", description="setting"),
        "show_basis": widgets.Dropdown(options=[("all", -1)] + [(f"basis {i + 1}", i) for i in range(k)], value=-1,
                                       description="show"),
    }
    state = SimpleNamespace(trace=None)
    cache: dict = {}

    def render():
        i = controls["image_index"].value
        image, _ = dataset[i]
        trace = blender_trace(model, image, controls["instance"].value, controls["keep_bases"].value,
                              controls["attn_size"].value, controls["interpolation"].value,
                              controls["setting"].value, cache=cache, key=i)
        show = controls["show_basis"].value
        fig = plot_blender_steps(trace, show_basis=None if show < 0 or show >= trace.num_bases else show,
                                 class_names=names)
        state.trace = trace
        caption = (f"<b>image {i}</b>, detection {trace.instance + 1} of {trace.num_detections}: K = "
                   f"{trace.num_bases}, M = {trace.attn_size}, {trace.interpolation}, {trace.setting}; mask "
                   f"{int(trace.pasted.sum())} px")
        return fig, caption

    return figure_explorer(controls, [["image_index", "instance", "setting"],
                                      ["keep_bases", "attn_size", "interpolation", "show_basis"]], render, state, dpi)


# ------------------------------------------------------------------------------------------------------ cost
def elementwise_flop_formulas() -> dict:
    """FLOP formulas for the ops ``FlopCounterMode`` does not count by default (it counts matmuls and convs only),
    one FLOP per multiply / add / exp / divide / max: elementwise ``mul``/``add`` 1 per output, ``sum`` 1 per
    input, ``_softmax`` 5 per value (max, subtract, exp, sum, divide), bilinear upsampling 7 per output (4
    multiplies + 3 adds), nearest 0 (a copy), ``sigmoid`` 3 per value, RoIAlign with one sampling point per bin
    8 per output (a bilinear sample + the average)."""
    aten = torch.ops.aten
    numel = math.prod

    def per_out(c):
        return lambda *args, out_shape=None, **kw: c * numel(out_shape)

    def per_in(c):
        return lambda x, *args, out_shape=None, **kw: c * numel(x)

    formulas = {aten.mul: per_out(1), aten.add: per_out(1), aten.sub: per_out(1), aten.sum: per_in(1),
                aten._softmax: per_in(5), aten.sigmoid: per_in(3), aten.upsample_bilinear2d: per_out(7),
                aten.upsample_nearest2d: per_out(0)}
    if hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "roi_align"):
        formulas[torch.ops.torchvision.roi_align] = per_out(8)
    return formulas


def _count(fn, *args, custom: bool = True) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=elementwise_flop_formulas() if custom else None) as counter:
        with torch.no_grad():
            fn(*args)
    return int(counter.get_total_flops())


def blender_cost(num_bases: int = 4, attn_size: int = 14, resolution: int = 56, interpolation: str = "bilinear",
                 fpn_channels: int = 256, include_pooling: bool = True) -> dict:
    """Per-RoI cost of BlendMask's mask prediction, measured with ``FlopCounterMode``: the blender
    (``blend_reference``: interpolate, softmax, weighted sum) and, with ``include_pooling``, the RoIAlign of the
    ``K`` bases to ``R×R``. Parameters: the blender has none per RoI; the top layer (a 3×3 conv, ``fpn_channels`` →
    ``K·M²``) is shared by all locations and reported separately. ``flops_default`` is what ``FlopCounterMode``
    reports without custom formulas (0: it counts only matmuls/convolutions)."""
    rois = torch.randn(1, num_bases, resolution, resolution)
    attn = torch.randn(1, num_bases, attn_size, attn_size)
    flops_blend = _count(blend_reference, rois, attn, interpolation)
    flops_pool = 0
    if include_pooling:
        bases = torch.randn(1, num_bases, 64, 64)
        box = [torch.tensor([[10.0, 12.0, 150.0, 200.0]])]
        flops_pool = _count(lambda: pool_bases(bases, box, resolution, 4))
    top_params = fpn_channels * num_bases * attn_size ** 2 * 9 + num_bases * attn_size ** 2
    return {"name": f"BlendMask blender (K={num_bases}, M={attn_size}, R={resolution}, {interpolation})",
            "flops": flops_blend + flops_pool, "flops_blend": flops_blend, "flops_pool": flops_pool,
            "flops_default": _count(blend_reference, rois, attn, interpolation, custom=False),
            "params_per_roi": 0, "params_shared": top_params, "mask_size": resolution}


def mask_rcnn_head_cost(num_classes: int = 80, channels: int = 256, pooled: int = 14) -> dict:
    """Per-RoI cost of Mask R-CNN's mask head, measured the same way: torchvision ``MaskRCNNHeads`` (4 × 3×3 conv,
    256 ch, ReLU) + ``MaskRCNNPredictor`` (2×2 deconv ×2 + ReLU + 1×1 to the classes) on one 256×14×14 RoI
    feature, output 28×28."""
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    head = torch.nn.Sequential(MaskRCNNHeads(channels, [channels] * 4, 1),
                               MaskRCNNPredictor(channels, channels, num_classes)).eval()
    x = torch.randn(1, channels, pooled, pooled)
    params = sum(p.numel() for p in head.parameters())
    return {"name": f"Mask R-CNN mask head ({channels}×{pooled}² → {num_classes}×{2 * pooled}²)",
            "flops": _count(head, x), "flops_default": _count(head, x, custom=False), "params_per_roi": params,
            "params_shared": 0, "mask_size": 2 * pooled}


def cost_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of :func:`blender_cost` / :func:`mask_rcnn_head_cost` rows."""
    lines = ["| per RoI | FLOPs (all ops) | FLOPs (FlopCounterMode default) | parameters used per RoI | mask |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        shared = f" (+ {r['params_shared']:,} shared top layer)" if r.get("params_shared") else ""
        lines.append(f"| {r['name']} | {r['flops']:,} | {r['flops_default']:,} | {r['params_per_roi']:,}{shared} "
                     f"| {r['mask_size']}² |")
    return "\n".join(lines)
