"""The prediction explorer: any shipped model on any image, and for one detection, *where it came from*.

Every model of the suite predicts an instance from one place in a feature map, and the place is the model's idea:

* **FCOS** (Tian et al., ICCV 2019, §3.1–3.2): one *location* ``(x, y)`` of one FPN level regresses the distances
  ``l, t, r, b`` to the box sides (in units of the level's stride) and classifies; the score is
  ``sqrt(cls · ctr)`` (§3.3). ``model.detect(parts, with_origin=True)`` names the location of each detection.
* **CondInst** (Tian, Shen, Chen, arXiv 2003.05664, §2.2): the same location's *controller* output is read as the
  weights of a small per-instance mask head (169 numbers at the defaults), which runs on the shared mask features
  with two relative-coordinate channels ``(location − pixel) / size of interest`` in front.
* **BlendMask** (Chen et al., CVPR 2020, §3.2–3.3): the same location's *top layer* output is a ``K×M×M``
  attention that blends ``K`` whole-image *bases* cropped to the detection's box.
* **SOLO / SOLOv2** (Wang et al., ECCV 2020 §3; NeurIPS 2020 §3.2): a *grid cell* ``(i, j)`` of an ``S×S`` grid
  over the image predicts the category and (SOLOv2) a dynamic kernel that, convolved with the mask features, gives
  the mask. ``model.detect(parts, with_origin=True)`` names the cell and level.

:func:`explain` runs a model once on one image and keeps those internals for all its detections;
:func:`describe` turns one detection into numbers, :func:`plot_provenance` into panels, :func:`plot_comparison`
draws several models side by side, and :func:`prediction_explorer` puts it all behind widgets (``ipywidgets`` is
imported only there). Models come from :func:`find_checkpoints` / :func:`load_models`: the shipped checkpoints
``data/checkpoints/<model>_<preset>_<data>.pt``, or an *untrained* ``smoke``-preset model standing in (and saying
so) when a checkpoint is missing, so that the notebook always runs.

An untrained model scores nothing above its threshold; then its best candidates at threshold 0 are explained
instead (as :mod:`onestage.viz.blendmask` does), with a note.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from onestage.modeling.solo import cell_levels
from onestage.modeling.parts import parts_for_display
from onestage.viz.draw import class_colors

__all__ = [
    "FAMILIES",
    "DEFAULT_MODELS",
    "Explanation",
    "find_checkpoints",
    "load_models",
    "image_sources",
    "image_from_bytes",
    "resize_image",
    "model_family",
    "explain",
    "describe",
    "describe_text",
    "shown_detections",
    "plot_provenance",
    "plot_comparison",
    "prediction_explorer",
]

#: Model families whose provenance the explorer knows how to draw.
FAMILIES = ("fcos", "condinst", "blendmask", "solo")
#: The models the explorer offers when no checkpoint narrows the choice (one per family; SOLOv2 for SOLO).
DEFAULT_MODELS = ("fcos", "condinst", "blendmask", "solov2")
_HIGHLIGHT = (255, 255, 255)


# ------------------------------------------------------------------------------------------------------ models
def find_checkpoints(directory: Optional[Path] = None, data: Optional[str] = "synthetic",
                     preset: Optional[str] = "fast") -> Dict[str, Path]:
    """Shipped checkpoints ``<model>_<preset>_<data>.pt`` in ``directory`` (default the checkout's
    ``data/checkpoints``) by model name, sorted by name. ``data=None`` or ``preset=None`` match any; the key is then
    the file's stem so that two data sets of one model stay apart."""
    if directory is None:
        from onestage.engine.shipped import shipped_dir

        directory = shipped_dir()
    found = {}
    for path in sorted(Path(directory).glob("*.pt")):
        parts = path.stem.rsplit("_", 2)  # model names may contain "_" (decoupled_solo); preset and data do not
        if len(parts) != 3:
            continue
        model, p, d = parts
        if (preset is None or p == preset) and (data is None or d == data):
            found[model if preset is not None and data is not None else path.stem] = path
    return found


def load_models(names: Sequence[str], checkpoints: Dict[str, Path], num_classes: int,
                class_names: Optional[Sequence[str]] = None, fallback_preset: str = "smoke",
                seed: int = 0) -> Dict[str, torch.nn.Module]:
    """``names`` → models in eval mode: the checkpoint when ``checkpoints`` has one (``onestage.load_model``), else
    a freshly initialised model at ``fallback_preset`` (seeded, so its pictures are reproducible). Each model
    carries ``source`` (one line saying which, printed by the notebook) and ``class_names``."""
    import onestage

    models = {}
    for name in names:
        path = checkpoints.get(name)
        if path is not None:
            model = onestage.load_model(path).eval()
            model.source = f"{name}: trained checkpoint {Path(path).name}"
        else:
            torch.manual_seed(seed)
            model = onestage.build_model(name, preset=fallback_preset, num_classes=num_classes).eval()
            model.class_names = list(class_names) if class_names else None
            model.source = (f"{name}: no checkpoint found, so an UNTRAINED {fallback_preset}-preset model stands in "
                            f"(its detections are meaningless; the provenance machinery is the same)")
        model.name = getattr(model, "name", None) or name
        if getattr(model, "class_names", None) is None and class_names:
            model.class_names = list(class_names)
        models[name] = model
    return models


# ------------------------------------------------------------------------------------------------------ images
def resize_image(image: Tensor, min_size: int = 320, max_size: int = 352) -> Tensor:
    """A ``3×H×W`` float image resized like a test image (short side ``min_size``, long side at most ``max_size``)."""
    from onestage.data.coco import resized_size

    h, w = image.shape[-2:]
    nh, nw = resized_size(h, w, min_size, max_size)
    if (nh, nw) == (h, w):
        return image
    return F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def image_from_bytes(data: bytes, min_size: int = 320, max_size: int = 352) -> Tensor:
    """An uploaded image file (PNG, JPEG, ...) as a ``3×H×W`` float RGB tensor at the test size."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data))) as im:
        rgb = np.asarray(im.convert("RGB")).copy()
    return resize_image(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0, min_size, max_size)


def image_sources(min_size: int = 320, max_size: int = 352, synthetic: str = "synthetic",
                  names: Sequence[str] = ("synthetic", "nuclei", "voc")) -> Dict[str, object]:
    """Validation datasets by name at the test size: the synthetic shapes (``synthetic`` is the
    :func:`onestage.data.get_dataset` spec, e.g. ``synthetic:DIR``), the DSB-2018 nuclei tiles and the VOC photo.
    A source whose wheel is not installed is left out (with a printed note) instead of failing."""
    from onestage.data import get_dataset

    specs = {"synthetic": synthetic, "nuclei": "nuclei", "voc": "voc"}
    out = {}
    for name in names:
        try:
            out[name] = get_dataset(specs.get(name, name), split="val", min_size=(min_size,), max_size=max_size)
        except (ImportError, FileNotFoundError) as e:
            print(f"image source {name!r} unavailable: {e}")
    return out


# ------------------------------------------------------------------------------------------------- explanation
@dataclass
class Explanation:
    """One model's detections on one image and the internals that produced them (tensors on the CPU).

    ``detections`` holds ``boxes``, ``scores``, ``labels``, ``masks`` (mask models) and the provenance keys:
    ``location_inds``, ``fpn_levels``, ``locations`` (FCOS family) or ``cells``, ``fpn_levels`` (SOLO family).
    ``parts`` holds what the panels read (head outputs, mask features, dynamic parameters, bases, ...)."""

    model: torch.nn.Module
    family: str
    image: Tensor
    detections: dict
    parts: SimpleNamespace
    note: str = ""
    class_names: Optional[List[str]] = None
    cache: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return getattr(self.model, "name", None) or type(self.model).__name__.lower()

    def __len__(self) -> int:
        return len(self.detections["boxes"])


def model_family(model) -> str:
    """``"condinst"``, ``"blendmask"``, ``"fcos"`` or ``"solo"`` (SOLO, Decoupled SOLO, SOLOv2)."""
    from onestage.modeling.blendmask import BlendMask
    from onestage.modeling.condinst import CondInst
    from onestage.modeling.fcos import FCOS
    from onestage.modeling.solo import SOLO
    from onestage.modeling.solov2 import SOLOv2

    for cls, family in ((CondInst, "condinst"), (BlendMask, "blendmask"), (FCOS, "fcos"), (SOLO, "solo"),
                        (SOLOv2, "solo")):
        if isinstance(model, cls):
            return family
    raise TypeError(f"the explorer knows FCOS, CondInst, BlendMask and SOLO models, not {type(model).__name__}")


def _cpu(d: dict) -> dict:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in d.items()}


@torch.no_grad()
def explain(model, image: Tensor, class_names: Optional[Sequence[str]] = None) -> Explanation:
    """Run ``model`` on one ``3×H×W`` image (eval mode, restored after) and keep its detections with their origin.

    The detections, masks included, are the model's own: ``model.detect(model.forward_parts([image]),
    with_origin=True)`` (:mod:`onestage.modeling.parts`), the same as ``model([image])`` on the plain path
    (:func:`onestage.modeling.fast_inference.plain_inference`; the default fast path's bf16 may move scores by
    rounding). Work done here once serves every detection's panels."""
    family = model_family(model)
    names = list(class_names or getattr(model, "class_names", None) or []) or None
    parts, det, note = parts_for_display(model, image)
    h, w = parts.image_sizes[0]
    head = parts.head
    first = lambda maps: [m[0].detach().cpu() for m in maps] if maps is not None else None  # noqa: E731
    if family == "solo":
        _, within, _ = cell_levels(model.grid_numbers)
        shown = SimpleNamespace(cate=first(head.cate_logits), canvas=parts.canvas_hw,
                                grid_numbers=list(model.grid_numbers), strides=list(model.strides),
                                level_names=[f"level {i} (S={s})" for i, s in enumerate(model.grid_numbers)],
                                within=within, size=(h, w))
        if "kernels" in det:  # SOLOv2: the dynamic kernel of each detection's cell, and the mask features
            shown.kernels = det.pop("kernels").detach().cpu()
            shown.mask_features = parts.mask_inputs["mask_features"][0].detach().cpu()
        else:  # SOLO / Decoupled SOLO: the mask probabilities of the cell, at stride 4
            shown.kernels = None
            shown.cell_probs = model.cell_mask_probs(parts, 0, det["cells"]).detach().cpu()
    else:
        shown = SimpleNamespace(logits=first(head.logits), bbox_reg=first(head.bbox_reg),
                                ctrness=first(head.ctrness), strides=list(model.strides),
                                level_names=[f.upper() for f in model.cfg.in_features],
                                level_offsets=_offsets([len(loc) for loc in parts.locations]), size=(h, w))
        if family == "condinst":
            shown.mask_feats = parts.mask_inputs["mask_feats"].detach().cpu()
            shown.params = det.pop("params").detach().cpu()
            shown.level_soi = model.level_soi.detach().cpu()
            shown.mask_stride = model.mask_branch.out_stride
        det.pop("attentions", None)
    return Explanation(model, family, image.detach().cpu()[:, :h, :w], _cpu(det), shown, note, names)


def _offsets(sizes: Sequence[int]) -> List[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


# -------------------------------------------------------------------------------------------------- describing
def _class_name(label: int, names) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def describe(expl: Explanation, k: int) -> dict:
    """Detection ``k`` (by score, wrapping around) of ``expl`` as numbers: class, score, box, and its origin.

    FCOS family: ``level`` (e.g. ``"P4"``), ``stride``, ``location`` (x, y in input pixels), ``cell`` (row, col in
    the level's feature map), ``cls`` (class probability there), ``ctr`` (center-ness, if the model has it) and
    ``ltrb`` (the regressed distances in pixels, §3.1). CondInst adds ``num_params`` and ``size_of_interest`` (the
    relative-coordinate normaliser); BlendMask ``num_bases`` and ``attn_size``. SOLO family: ``level``, ``grid``
    (S), ``cell`` (i, j), ``channel`` (k = i·S + j), ``stride``, ``cate`` (category probability of the cell) and,
    for SOLOv2, ``kernel_size`` (E)."""
    n = len(expl)
    if n == 0:
        raise ValueError(f"{expl.name} made no detection on this image")
    k = int(k) % n
    det, p = expl.detections, expl.parts
    label = int(det["labels"][k])
    out = {"model": expl.name, "family": expl.family, "index": k, "label": label,
           "class": _class_name(label, expl.class_names), "score": float(det["scores"][k]),
           "box": [round(float(v), 1) for v in det["boxes"][k]]}
    lvl = int(det["fpn_levels"][k])
    if expl.family == "solo":
        s = p.grid_numbers[lvl]
        ch = int(p.within[int(det["cells"][k])])
        i, j = divmod(ch, s)
        out.update(level=p.level_names[lvl], level_index=lvl, grid=s, cell=(i, j), channel=ch, stride=p.strides[lvl],
                   cate=float(p.cate[lvl][label, i, j].sigmoid()))
        if p.kernels is not None:
            out["kernel_size"] = int(p.kernels.shape[1])
        return out
    local = int(det["location_inds"][k]) - p.level_offsets[lvl]
    _, fw = p.logits[lvl].shape[-2:]
    row, col = divmod(local, fw)
    stride = p.strides[lvl]
    x, y = (float(v) for v in det["locations"][k])
    out.update(level=p.level_names[lvl], level_index=lvl, stride=stride, location=(x, y), cell=(row, col),
               cls=float(p.logits[lvl][label, row, col].sigmoid()),
               ltrb=[round(float(v) * stride, 1) for v in p.bbox_reg[lvl][:, row, col]])
    if p.ctrness is not None:
        out["ctr"] = float(p.ctrness[lvl][0, row, col].sigmoid())
    if expl.family == "condinst":
        out.update(num_params=int(p.params.shape[1]), size_of_interest=float(p.level_soi[lvl]))
    if expl.family == "blendmask":
        c = expl.model.cfg
        out.update(num_bases=c.num_bases, attn_size=c.effective_attn_size)
    return out


def describe_text(expl: Explanation, k: int) -> str:
    """One line for captions: ``fcos #0 circle 0.75: P4 (stride 16) location (120, 88), cell (5, 7), ...``."""
    if len(expl) == 0:
        return f"{expl.name}: no detection"
    d = describe(expl, k)
    head = f"{d['model']} #{d['index']} {d['class']} {d['score']:.2f}: "
    if d["family"] == "solo":
        text = (f"{d['level']}, stride {d['stride']}, grid cell (i, j) = {d['cell']}, channel k = {d['channel']}, "
                f"category prob {d['cate']:.2f}")
        if "kernel_size" in d:
            text += f", kernel of {d['kernel_size']} numbers"
        return head + text
    x, y = d["location"]
    text = (f"{d['level']} (stride {d['stride']}) location ({x:.0f}, {y:.0f}) = feature cell {d['cell']}, "
            f"cls {d['cls']:.2f}" + (f", ctr {d['ctr']:.2f}" if "ctr" in d else "")
            + f", l t r b = {', '.join(f'{v:.0f}' for v in d['ltrb'])} px")
    if d["family"] == "condinst":
        text += f"; {d['num_params']} generated filter numbers, coordinates / {d['size_of_interest']:.0f}"
    if d["family"] == "blendmask":
        text += f"; attention {d['num_bases']}×{d['attn_size']}×{d['attn_size']} over {d['num_bases']} bases"
    return head + text


def shown_detections(expl: Explanation, score_thresh: float) -> Tensor:
    """Indices (by score) of the detections scoring at least ``score_thresh``."""
    return (expl.detections["scores"] >= score_thresh).nonzero().squeeze(1)


# ------------------------------------------------------------------------------------------------------ panels
def _uint8(image: Tensor) -> Tensor:
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _style(ax, title: str):
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def error_outcomes(expl: Explanation, target: dict) -> tuple[list, list]:
    """``(types, missed)`` of :func:`onestage.analysis.errors.image_error_types` for ``expl``'s detections against
    ``target`` (the image's ground truth, in the same frame), masks when both have them; cached on ``expl``."""
    from onestage.analysis.errors import image_error_types

    key = ("errors", id(target))
    if key not in expl.cache:
        iou_type = "segm" if "masks" in expl.detections and "masks" in target else "bbox"
        expl.cache[key] = image_error_types(target, expl.detections, iou_type)
    return expl.cache[key]


def _draw_detections(ax, expl: Explanation, score_thresh: float, highlight: Optional[int] = None,
                     target: Optional[dict] = None):
    """Detections scoring ≥ ``score_thresh`` (masks, boxes, labels; colour = class, or with ``target`` — the
    image's ground truth — colour = TIDE outcome (:data:`onestage.viz.errors.ERROR_COLORS`) and the missed objects
    drawn in the "miss" colour); ``highlight`` (an index into all detections) gets a thick white box."""
    from onestage.viz.errors import ERROR_COLORS

    det = expl.detections
    keep = shown_detections(expl, score_thresh)
    img = _uint8(expl.image)
    names = expl.class_names
    palette = class_colors(max(len(names) if names else 0, int(det["labels"].max()) + 1 if len(det["labels"]) else 1))
    types, missed = error_outcomes(expl, target) if target is not None else (None, [])
    if types is None:
        colors = [palette[int(c)] for c in det["labels"][keep]]
    else:
        colors = [ERROR_COLORS[types[int(i)]] for i in keep]
    if "masks" in det and len(keep):
        img = draw_segmentation_masks(img, det["masks"][keep].bool(), alpha=0.45, colors=colors)
    if len(keep):
        texts = [(f"{types[int(i)]} " if types is not None else "")
                 + f"{_class_name(int(det['labels'][i]), names)} {float(det['scores'][i]):.2f}" for i in keep]
        img = draw_bounding_boxes(img, det["boxes"][keep].float(), labels=texts, colors=colors, width=2)
    if missed:
        img = draw_bounding_boxes(img, target["boxes"][missed].float(), colors=ERROR_COLORS["miss"], width=3,
                                  labels=[f"missed {_class_name(int(target['labels'][j]), names)}" for j in missed])
    if highlight is not None and len(det["boxes"]):
        img = draw_bounding_boxes(img, det["boxes"][highlight][None].float(), colors=[_HIGHLIGHT], width=4)
    ax.imshow(img.permute(1, 2, 0).numpy())
    title = f"{expl.name}: {len(keep)} detections (score ≥ {score_thresh:.2f})"
    if types is not None:
        counts = {}
        for i in keep:
            counts[types[int(i)]] = counts.get(types[int(i)], 0) + 1
        title += "\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + (
            f", {len(missed)} missed" if missed else "")
    if expl.note:
        title += "\n(none passes the model's own threshold: best candidates)"
    _style(ax, title)


def _level_map(ax, data: Tensor, title: str, cell, cmap="magma", vmin=0.0, vmax=1.0):
    ax.imshow(data.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.plot([cell[1]], [cell[0]], marker="s", ms=7, mfc="none", mec="cyan", mew=1.5)
    _style(ax, title)


def _location_panel(ax, expl: Explanation, k: int, d: dict):
    """The image around the box, the level's locations (dots, one per stride), the chosen one (star) and the four
    regressed distances as arrows to the box sides."""
    h, w = expl.image.shape[-2:]
    x0, y0, x1, y1 = d["box"]
    x, y = d["location"]
    s = d["stride"]
    pad = max(2 * s, 0.25 * max(x1 - x0, y1 - y0))
    cx0, cy0 = int(max(0, min(x0, x) - pad)), int(max(0, min(y0, y) - pad))
    cx1, cy1 = int(min(w, max(x1, x) + pad)), int(min(h, max(y1, y) + pad))
    crop = expl.image[:, cy0:max(cy1, cy0 + 1), cx0:max(cx1, cx0 + 1)]
    ax.imshow(crop.permute(1, 2, 0).clamp(0, 1).numpy(), extent=(cx0, cx0 + crop.shape[-1], cy0 + crop.shape[-2], cy0))
    gx = torch.arange(s // 2, w, s, dtype=torch.float32)
    gy = torch.arange(s // 2, h, s, dtype=torch.float32)
    gx, gy = gx[(gx >= cx0) & (gx < cx1)], gy[(gy >= cy0) & (gy < cy1)]
    if len(gx) * len(gy) <= 4000:
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        ax.scatter(xx.flatten().numpy(), yy.flatten().numpy(), s=2, c="white", alpha=0.6, linewidths=0)
    ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="yellow", lw=1.2)
    l, t, r, b = d["ltrb"]
    for dx, dy, color in ((-l, 0, "red"), (0, -t, "lime"), (r, 0, "orange"), (0, b, "deepskyblue")):
        ax.annotate("", xy=(x + dx, y + dy), xytext=(x, y), arrowprops=dict(arrowstyle="->", color=color, lw=1.2))
    ax.plot([x], [y], marker="*", ms=10, color="cyan", mec="black", mew=0.5)
    ax.set_xlim(cx0, cx0 + crop.shape[-1])
    ax.set_ylim(cy0 + crop.shape[-2], cy0)
    _style(ax, f"{d['level']} location ({x:.0f}, {y:.0f}), stride {s}\narrows: l t r b")


def _tile(maps: Tensor, cols: int, gap: int = 1) -> Tensor:
    """``N×h×w`` → one image with the maps in ``cols`` columns, NaN between them."""
    n, mh, mw = maps.shape
    rows = -(-n // cols)
    out = torch.full((rows * (mh + gap) - gap, cols * (mw + gap) - gap), float("nan"))
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (mh + gap): r * (mh + gap) + mh, c * (mw + gap): c * (mw + gap) + mw] = maps[i]
    return out


def _sym(t: Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return float(finite.abs().max().clamp(min=1e-6)) if finite.numel() else 1.0


def _mask_panel(ax, expl: Explanation, k: int, title: str = "the mask in the image"):
    img = _uint8(expl.image)
    det = expl.detections
    if "masks" in det and det["masks"][k].any():
        img = draw_segmentation_masks(img, det["masks"][k][None].bool(), alpha=0.55, colors=[(255, 60, 200)])
    img = draw_bounding_boxes(img, det["boxes"][k][None].float(), colors=[(255, 255, 0)], width=2)
    ax.imshow(img.permute(1, 2, 0).numpy())
    _style(ax, title)


def _fcos_panels(expl: Explanation, k: int, d: dict) -> List[tuple]:
    """(compact?, draw(ax)) for the FCOS part: the location, the class probability and center-ness maps."""
    p, lvl, cell = expl.parts, d["level_index"], d["cell"]
    panels = [(True, lambda ax: _location_panel(ax, expl, k, d)),
              (expl.family == "fcos",
               lambda ax: _level_map(ax, p.logits[lvl][d["label"]].sigmoid(),
                                     f"P({d['class']}) on {d['level']}: {d['cls']:.2f}", cell))]
    if p.ctrness is not None:
        panels.append((expl.family == "fcos",
                       lambda ax: _level_map(ax, p.ctrness[lvl][0].sigmoid(),
                                             f"center-ness on {d['level']}: {d['ctr']:.2f}", cell, "viridis")))
    return panels


def _condinst_panels(expl: Explanation, k: int, d: dict) -> List[tuple]:
    """The generated filters, the relative-coordinate channels, the mask logits and the mask."""
    from onestage.ops.dynamic_mask_head import (coordinate_maps, dynamic_mask_head_reference,
                                                mask_head_input_channels, parse_dynamic_params)

    c, p, lvl = expl.model.cfg, expl.parts, d["level_index"]
    params = p.params[k][None].float()
    in_ch = mask_head_input_channels(c.mask_branch_out_channels, c.rel_coords)
    weights, biases = parse_dynamic_params(params, in_ch, c.mask_head_width, c.mask_head_depth)
    hm, wm = p.mask_feats.shape[-2:]
    loc = torch.tensor([d["location"]], dtype=torch.float32)
    soi = p.level_soi[lvl][None]
    coords = coordinate_maps(loc, soi, hm, wm, p.mask_stride, c.rel_coords)[0] if c.rel_coords != "none" else None
    logits = dynamic_mask_head_reference(p.mask_feats.float(), params, torch.zeros(1, dtype=torch.long), loc, soi,
                                         p.mask_stride, c.mask_head_width, c.mask_head_depth, c.rel_coords)[0]
    blocks = [torch.cat([w_[0], b_[0][:, None]], 1) for w_, b_ in zip(weights, biases)]  # C_out × (C_in + bias)
    width = max(b.shape[1] for b in blocks)
    filt = torch.full((sum(b.shape[0] + 1 for b in blocks) - 1, width), float("nan"))
    row = 0
    for b in blocks:
        filt[row:row + b.shape[0], : b.shape[1]] = b
        row += b.shape[0] + 1
    shapes = " + ".join(f"{w_.shape[1]}×{w_.shape[2]}+{w_.shape[1]}" for w_ in weights)
    cell = (d["location"][1] - p.mask_stride // 2) / p.mask_stride, (d["location"][0] - p.mask_stride // 2) / p.mask_stride
    m = _sym(filt)

    def filters(ax):
        ax.imshow(filt.numpy(), cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest", aspect="auto")
        _style(ax, f"generated filters: {d['num_params']} numbers\n(rows: layers {shapes})")

    def coord(ax, axis: int):
        name = ("Δx", "Δy")[axis]
        mm = _sym(coords[axis])
        _level_map(ax, coords[axis], f"{name} = (loc − pixel) / {d['size_of_interest']:.0f}", cell,
                   "RdBu_r", -mm, mm)

    panels = [(True, filters)]
    if coords is not None:
        panels += [(True, lambda ax: coord(ax, 0)), (False, lambda ax: coord(ax, 1))]
    ml = _sym(logits)
    panels += [(True, lambda ax: _level_map(ax, logits, f"mask logits (stride {p.mask_stride})",
                                            cell, "RdBu_r", -ml, ml)),
               (False, lambda ax: _mask_panel(ax, expl, k))]
    return panels


def _blendmask_panels(expl: Explanation, k: int, d: dict) -> List[tuple]:
    """The instance's attention (K maps M×M), the bases cropped to its box, the blended mask (blender_trace)."""
    from onestage.viz.blendmask import blender_trace

    t = blender_trace(expl.model, expl.image, k, cache=expl.cache, key="blender")
    kk = t.num_bases
    ma, mb = _sym(t.attn), _sym(t.bases)
    box = t.box / t.stride - 0.5

    def attention(ax):
        ax.imshow(_tile(t.attn, kk).numpy(), cmap="RdBu_r", vmin=-ma, vmax=ma, interpolation="nearest")
        _style(ax, f"attention {kk}×{t.attn_size}×{t.attn_size} at the location")

    def bases(ax):
        ax.imshow(_tile(t.bases, min(kk, 2)).numpy(), cmap="RdBu_r", vmin=-mb, vmax=mb, interpolation="nearest")
        cols = min(kk, 2)
        hb, wb = t.bases.shape[-2:]
        for i in range(kk):
            r, c = divmod(i, cols)
            x0, y0, x1, y1 = (box + torch.tensor([c * (wb + 1), r * (hb + 1)] * 2)).tolist()
            ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="yellow", lw=0.8)
        _style(ax, f"{kk} bases (stride {t.stride}), box in yellow")

    def mask(ax):
        ax.imshow(t.prob.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        _style(ax, f"blended mask ({t.rois.shape[-1]}×{t.rois.shape[-1]})")

    return [(True, attention), (True, bases), (True, mask), (False, lambda ax: _mask_panel(ax, expl, k))]


def _solo_panels(expl: Explanation, k: int, d: dict) -> List[tuple]:
    """The grid over the (padded) canvas with the cell, the category map of the level, the kernel (SOLOv2) or the
    cell's mask channel, and the mask."""
    p, lvl, (i, j), s = expl.parts, d["level_index"], d["cell"], d["grid"]
    ch, cw = p.canvas

    def grid(ax):
        canvas = torch.zeros(3, ch, cw)
        canvas[:, : expl.image.shape[1], : expl.image.shape[2]] = expl.image
        ax.imshow(canvas.permute(1, 2, 0).numpy())
        for n in range(s + 1):
            ax.axhline(n * ch / s, color="white", lw=0.3, alpha=0.6)
            ax.axvline(n * cw / s, color="white", lw=0.3, alpha=0.6)
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((j * cw / s, i * ch / s), cw / s, ch / s, fill=False, ec="cyan", lw=2))
        x0, y0, x1, y1 = d["box"]
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="yellow", lw=1)
        _style(ax, f"{s}×{s} grid, cell (i, j) = ({i}, {j})")

    panels = [(True, grid),
              (True, lambda ax: _level_map(ax, p.cate[lvl][d["label"]].sigmoid(),
                                           f"P({d['class']}) on the grid: {d['cate']:.2f}", (i, j)))]
    if p.kernels is not None:
        from onestage.modeling.solov2 import dynamic_masks

        kern = p.kernels[k].float()
        side = int(torch.ceil(torch.tensor(kern.numel() ** 0.5)))
        sq = torch.full((side * side,), float("nan"))
        sq[: kern.numel()] = kern
        prob = dynamic_masks(kern[None], p.mask_features.float())[0].sigmoid()
        mk = _sym(kern)

        def kernel(ax):
            ax.imshow(sq.reshape(side, side).numpy(), cmap="RdBu_r", vmin=-mk, vmax=mk, interpolation="nearest")
            _style(ax, f"the cell's kernel: {kern.numel()} numbers")

        def mask_prob(ax):
            ax.imshow(prob.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            _style(ax, "σ(kernel ∗ mask features)")

        panels += [(True, kernel), (True, mask_prob)]
    else:
        prob = p.cell_probs[k]
        panels.append((True, lambda ax: (ax.imshow(prob.numpy(), cmap="gray", vmin=0, vmax=1),
                                         _style(ax, f"mask channel k = {d['channel']} (stride 4)"))))
    panels.append((False, lambda ax: _mask_panel(ax, expl, k)))
    return panels


def provenance_panels(expl: Explanation, k: int, compact: bool = False) -> List[Callable]:
    """Functions ``draw(ax)``, one per panel, that show where detection ``k`` came from. ``compact``: the four
    that tell the story of the family (used side by side), else all of them."""
    d = describe(expl, k)
    k = d["index"]
    if expl.family == "solo":
        panels = _solo_panels(expl, k, d)
    else:
        panels = _fcos_panels(expl, k, d)
        if expl.family == "condinst":
            panels += _condinst_panels(expl, k, d)
        elif expl.family == "blendmask":
            panels += _blendmask_panels(expl, k, d)
    chosen = [draw for is_compact, draw in panels if is_compact or not compact]
    return chosen[:4] if compact else chosen


def plot_provenance(expl: Explanation, k: int = 0, cols: int = 4, panel: float = 2.4) -> Figure:
    """Every panel of detection ``k``'s origin (see :func:`provenance_panels`), with the one-line description as
    title. The figure carries ``description`` (:func:`describe`)."""
    if len(expl) == 0:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, f"{expl.name}: no detection on this image", ha="center", va="center")
        fig.description = None
        return fig
    panels = provenance_panels(expl, k)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(panel * cols, panel * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, draw in zip(axes, panels):
        draw(ax)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(describe_text(expl, k), fontsize=8)
    fig.description = describe(expl, k)
    return fig


def plot_comparison(expls: Sequence[Explanation], score_thresh: float = 0.3, instance: int = 0,
                    panel: float = 2.2, target: Optional[dict] = None) -> Figure:
    """Models side by side, one column each: the detections scoring ≥ ``score_thresh`` on top (the selected one
    boxed in white), below it the four panels of where detection number ``instance`` *among those shown* came
    from. With ``target`` (the image's ground truth) the detections are coloured by error type and the missed
    objects drawn. The figure carries ``selected`` (per model, the index into its detections, or ``None``)."""
    n = max(len(expls), 1)
    fig = Figure(figsize=(2 * panel * n, 4 * panel + 0.2), layout="constrained")
    subs = fig.subfigures(1, n, squeeze=False)[0]
    fig.selected = []
    for sub, expl in zip(subs, expls):
        shown = shown_detections(expl, score_thresh)
        k = int(shown[int(instance) % len(shown)]) if len(shown) else None
        fig.selected.append(k)
        grid = sub.add_gridspec(4, 2)
        _draw_detections(sub.add_subplot(grid[:2, :]), expl, score_thresh, highlight=k, target=target)
        axes = [sub.add_subplot(grid[2 + r, c]) for r in range(2) for c in range(2)]
        if k is None:
            axes[0].text(0.0, 0.5, f"no detection ≥ {score_thresh:.2f}:\nlower the threshold", fontsize=8)
            for ax in axes:
                ax.set_axis_off()
            continue
        panels = provenance_panels(expl, k, compact=True)
        for ax, draw in zip(axes, panels):
            draw(ax)
        for ax in axes[len(panels):]:
            ax.set_axis_off()
    return fig


# ------------------------------------------------------------------------------------------------------ widget
def _upload_content(value):
    """The bytes of the first uploaded file (ipywidgets 8: a tuple of dicts; 7: a dict by name), or ``None``."""
    if not value:
        return None, None
    item = value[0] if isinstance(value, (tuple, list)) else next(iter(value.values()))
    return bytes(item["content"]), item.get("name") or item.get("metadata", {}).get("name", "upload")


def prediction_explorer(models: Dict[str, torch.nn.Module], sources: Dict[str, object],
                        selected: Optional[Sequence[str]] = None, source: Optional[str] = None, image_index: int = 0,
                        score_thresh: float = 0.3, instance: int = 0, min_size: int = 320, max_size: int = 352,
                        dpi: int = 80, cache_size: int = 24, color_by: str = "class"):
    """Widgets around :func:`plot_comparison`: which models (several side by side), which image (a validation
    image of one of ``sources``, or an uploaded file: uploading switches the source to it), the score threshold,
    and which detection to explain (by score among those shown). Every model runs once per image (cached).

    ``color_by="error"`` colours the detections of a validation image by their TIDE outcome against its ground truth
    and draws the missed objects (uploads have no ground truth: by class).

    The widget carries ``controls`` (``models``, ``source``, ``image_index``, ``score_thresh``, ``instance``,
    ``upload``, ``color_by``), ``state`` (``explanations``, ``redraws``, ``figure``, ``error``) and ``update``."""
    import ipywidgets as widgets

    from onestage.viz.widgets import figure_explorer

    names = list(models)
    if not names:
        raise ValueError("no model to explore")
    picked = [n for n in (selected or names[:1]) if n in models] or names[:1]
    source_names = list(sources) + ["upload"]
    source = source if source in source_names else source_names[0]
    longest = max((len(ds) for ds in sources.values()), default=1)
    controls = {
        "models": widgets.SelectMultiple(options=names, value=tuple(picked), description="models",
                                         rows=min(len(names), 5)),
        "source": widgets.Dropdown(options=source_names, value=source, description="image"),
        "image_index": widgets.IntSlider(value=int(image_index), min=0, max=max(longest - 1, 0), description="index",
                                         continuous_update=False),
        "score_thresh": widgets.FloatSlider(value=float(score_thresh), min=0.0, max=0.95, step=0.05,
                                            description="score ≥", continuous_update=False, readout_format=".2f"),
        "instance": widgets.IntSlider(value=int(instance), min=0, max=19, description="detection #",
                                      continuous_update=False),
        "upload": widgets.FileUpload(accept="image/*", multiple=False, description="your image"),
        "color_by": widgets.ToggleButtons(options=[("class", "class"), ("error type", "error")],
                                          value=color_by, description="colour",
                                          tooltip="error type: TP, duplicate, localisation, class, background "
                                                  "(TIDE), and the missed objects; validation images only"),
    }
    state = SimpleNamespace(explanations=[], uploaded=None)
    cache: dict = {}
    targets: dict = {}

    def current_image():
        src = controls["source"].value
        if src == "upload":
            data, name = _upload_content(controls["upload"].value)
            if data is None:
                raise ValueError("no file uploaded yet: use the 'your image' button")
            return (image_from_bytes(data, min_size, max_size), ("upload", name, hash(data)), None, f"upload {name}",
                    None)
        ds = sources[src]
        i = controls["image_index"].value % len(ds)
        image, target = ds[i]
        return image, (src, i), getattr(ds, "class_names", None), f"{src} val image {i}", target

    def render():
        image, key, _, title, target = current_image()
        if key not in targets:
            if len(targets) >= cache_size:
                targets.pop(next(iter(targets)))
            targets[key] = target  # one object per image: the error outcomes cache on its identity
        expls = []
        for name in controls["models"].value or tuple(names[:1]):
            ck = (name, key)
            if ck not in cache:
                if len(cache) >= cache_size:
                    cache.pop(next(iter(cache)))
                cache[ck] = explain(models[name], image)
            expls.append(cache[ck])
        thresh, inst = controls["score_thresh"].value, controls["instance"].value
        by_error = controls["color_by"].value == "error" and "boxes" in (targets[key] or {})
        fig = plot_comparison(expls, thresh, inst, target=targets[key] if by_error else None)
        state.explanations = expls
        lines = []
        for expl, k in zip(expls, fig.selected):
            line = describe_text(expl, k) if k is not None else f"{expl.name}: no detection ≥ {thresh:.2f}"
            lines.append(line.replace("&", "&amp;").replace("<", "&lt;"))
        return fig, (f"<b>{title}</b>, score ≥ {thresh:.2f}, detection #{inst} among those shown<br>"
                     + "<br>".join(lines))

    def on_upload(change):
        if change["new"]:
            controls["source"].value = "upload"  # renders (and the upload's own change rendered too)

    box = figure_explorer(controls, [["models", "source", "image_index", "upload"],
                                     ["score_thresh", "instance", "color_by"]], render, state, dpi)
    controls["upload"].observe(on_upload, names="value")
    box.children[-1].layout.align_self = "flex-start"  # natural size: a VBox would stretch (and blur) the picture
    return box
