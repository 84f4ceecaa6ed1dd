"""CondInst's dynamic mask heads, taken apart on a trained model: the numbers (Tian, Shen, Chen, arXiv 2003.05664).

``onestage.viz.condinst`` draws them; everything here is computed from the model's own tensors
(``model.forward_parts`` / ``model.detect(..., with_origin=True)``) with the library's reference functions.

* :func:`condinst_trace` → :class:`CondInstTrace` — one detected instance through its head: the shared ``Fmask``,
  its coordinate channels, every layer's output, the logits, the upsampled mask and the mask in the image, layer by
  layer with ``parse_dynamic_params``, ``coordinate_maps`` and ``aligned_bilinear`` (not by hooking the model); at
  the default knobs it reproduces the model's own output. Knobs: zero the coordinate channels (an inference-time
  probe), the upsampling factor, the mask threshold. :func:`dynamic_head_layers` runs the 1×1 convs (§2.2),
  :func:`head_input_names` names the first layer's input channels.
* :func:`find_look_alike_pair` — an image with two detected instances of the same category (§1: two instances of
  one class that a fixed-weight head could not tell apart get different filters).
* :func:`probe_rows` / :func:`probe_markdown` — one instance's mask under each knob, as a table;
  :func:`best_gt_iou`, :func:`mask_iou`.
* :func:`table1_timing_settings`, :func:`mask_head_timing_markdown` — Table 1's "time" column beside
  ``onestage.bench.time_mask_heads``'s measurement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_area, box_iou

from onestage.modeling.condinst import aligned_bilinear
from onestage.modeling.parts import parts_for_display
from onestage.ops.dynamic_mask_head import coordinate_maps, mask_head_input_channels, parse_dynamic_params

__all__ = [
    "PAPER_MASK_RCNN_MS",
    "CondInstTrace",
    "condinst_trace",
    "dynamic_head_layers",
    "head_input_names",
    "find_look_alike_pair",
    "mask_iou",
    "best_gt_iou",
    "probe_rows",
    "probe_markdown",
    "table1_timing_settings",
    "mask_head_timing_markdown",
]

#: Mask R-CNN's mask head on 100 instances, ms on a V100 (CondInst §3.2, text under Table 1: "11.4 ms per 100
#: instances"); Table 1's own rows are in ``data/paper_tables/condinst_table1.json``.
PAPER_MASK_RCNN_MS = 11.4


def mask_iou(a: Tensor, b: Tensor) -> float:
    """IoU of two boolean masks of one shape (NaN when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# 1. One instance's head, layer by layer
# ---------------------------------------------------------------------------------------------------------------

def head_input_names(mask_channels: int = 8, coords: str = "rel") -> List[str]:
    """Names of the first dynamic layer's input channels, in order (coordinates first, x then y)."""
    names = []
    if coords != "none":
        names += ["rel. x", "rel. y"] if coords != "abs" else ["abs. x", "abs. y"]
    if coords != "coords_only":
        names += [f"Fmask {k + 1}" for k in range(mask_channels)]
    return names


def dynamic_head_layers(head_input: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]):
    """Run one instance's head on its ``C_in×h×w`` input: 1×1 convs with ``weights[l]`` (``C_out×C_in``) and
    ``biases[l]``, ReLU between layers (as ``dynamic_mask_head_reference``). Returns ``(hidden, logits)``: the
    outputs of every layer but the last, after the ReLU, and the ``h×w`` logits of the last."""
    x = head_input[None]
    hidden = []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w[:, :, None, None], b)
        if layer < len(weights) - 1:
            x = F.relu(x)
            hidden.append(x[0])
    return hidden, x[0, 0]


@dataclass
class CondInstTrace:
    """One detected instance through its dynamic mask head. Tensors on the CPU; maps at the mask-feature stride
    cover the padded batch (``h×w``), ``pasted`` the input image (``H×W``)."""

    image: Tensor            # 3×H×W, 0..1
    box: Tensor              # 4, xyxy (the detection's box; the head never sees it)
    score: float
    label: int
    instance: int            # index among the image's detections (by score)
    num_detections: int
    location: Tensor         # 2, (x, y) input pixels of the location whose controller output is this head
    fpn_level: int           # 0 = P3
    size_of_interest: float  # normalises the relative coordinates (64 · 2^level)
    mask_stride: int         # stride of Fmask (8)
    mask_feats: Tensor       # Cmask×h×w, Fmask, shared by every instance of the image
    coords: Tensor           # 2×h×w coordinate channels as fed to the head (zeros when rel_coords=False; 0×h×w
                             # when the model has none)
    params: Tensor           # P, the controller's output at ``location``
    weights: list            # per layer C_out×C_in
    biases: list             # per layer C_out
    hidden: list             # depth − 1 maps width×h×w, after ReLU
    logits: Tensor           # h×w, the last layer's output
    logits_up: Tensor        # (f·h)×(f·w), aligned_bilinear by ``upsample_factor``
    prob: Tensor             # sigmoid(logits_up)
    pasted: Tensor           # H×W bool: the mask in the image at ``threshold``
    coords_mode: str         # the model's ``rel_coords`` ("rel", "abs", "none", "coords_only")
    rel_coords: bool         # False: the coordinate channels were zeroed (inference-time probe)
    upsample_factor: int
    threshold: float
    note: str = ""

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def input_names(self) -> List[str]:
        return head_input_names(self.mask_feats.shape[0], self.coords_mode)

    @property
    def head_input(self) -> Tensor:
        """``C_in×h×w``: what the first layer reads."""
        parts = [self.coords] if self.coords_mode != "none" else []
        if self.coords_mode != "coords_only":
            parts.append(self.mask_feats)
        return torch.cat(parts)

    @property
    def out_stride(self) -> int:
        return self.mask_stride // self.upsample_factor


def _image_outputs(model, image: Tensor) -> SimpleNamespace:
    """Fmask, the controller's parameters at every location and the detections (with their locations) of one
    image — from ``model.forward_parts`` and ``model.detect(..., with_origin=True)``, the model in eval mode."""
    parts, det, note = parts_for_display(model, image)
    det = {k: v.cpu() for k, v in det.items() if k not in ("masks", "params")}
    return SimpleNamespace(mask_feats=parts.mask_inputs["mask_feats"][0].float().cpu(),
                           params=parts.mask_inputs["params"][0].float().cpu(), det=det,
                           size=tuple(int(v) for v in parts.image_sizes[0]), note=note)


def _cached_outputs(model, image, cache, key):
    if cache is not None and key in cache:
        return cache[key]
    parts = _image_outputs(model, image)
    if cache is not None:
        cache[key] = parts
    return parts


def condinst_trace(model, image: Tensor, instance: int = 0, rel_coords: bool = True,
                   upsample_factor: Optional[int] = None, threshold: Optional[float] = None,
                   cache: Optional[dict] = None, key=None, coords_from: Optional[int] = None) -> CondInstTrace:
    """Run ``image`` through ``model`` (a ``CondInst``) and detection number ``instance`` (by score, wrapping
    around) through its dynamic mask head step by step, as ``CondInst.detect`` does:

    its parameters are the controller's output at the location that produced the detection, parsed into layers by
    ``parse_dynamic_params``; its input is ``Fmask`` with the coordinate channels of ``coordinate_maps`` in front
    (that location minus each pixel, divided by the level's size of interest, §2.2); 1×1 convs with ReLUs give the
    logits at stride 8, ``aligned_bilinear`` upsamples them by the factor, the sigmoid of that is upsampled to the
    input size and thresholded. At the defaults ``pasted`` equals the model's own mask.

    Knobs (inference-time probes of the *trained* model — not the paper's retrained ablations):

    * ``rel_coords=False`` — zero the coordinate channels (Table 3 instead *trains* a model without them);
    * ``upsample_factor`` — 1, 2, 4 or 8 instead of the model's (Table 4 trains each factor);
    * ``threshold`` — the mask threshold (default the model's, 0.5);
    * ``coords_from`` — use the coordinate channels of detection ``coords_from`` with this instance's filters.

    ``cache`` (a dict) with ``key`` keeps the network outputs of an image between calls (the explorer uses it).
    """
    cfg = model.cfg
    factor = int(cfg.mask_upsample_factor if upsample_factor is None else upsample_factor)
    if factor not in (1, 2, 4, 8):
        raise ValueError(f"upsample_factor must be 1, 2, 4 or 8, got {factor}")
    thresh = float(cfg.mask_threshold if threshold is None else threshold)
    p = _cached_outputs(model, image, cache, key)
    det = p.det
    n_det = len(det["boxes"])
    if n_det == 0:
        raise ValueError("the model made no candidate at all on this image")
    k = int(instance) % n_det
    level = int(det["fpn_levels"][k])
    soi = float(model.level_soi[level])
    stride = model.mask_branch.out_stride
    cmask, h, w = p.mask_feats.shape
    mode = cfg.rel_coords
    params = p.params[int(det["location_inds"][k])]
    weights, biases = parse_dynamic_params(params[None], mask_head_input_channels(cmask, mode),
                                           cfg.mask_head_width, cfg.mask_head_depth)
    weights, biases = [t[0] for t in weights], [t[0] for t in biases]
    src = k if coords_from is None else int(coords_from) % n_det
    if mode == "none":
        coords = p.mask_feats.new_zeros(0, h, w)
    else:
        src_soi = model.level_soi[int(det["fpn_levels"][src])].cpu()
        coords = coordinate_maps(det["locations"][src][None].float(), src_soi[None], h, w, stride, mode)[0]
        if not rel_coords:
            coords = torch.zeros_like(coords)
    parts = ([coords] if mode != "none" else []) + ([p.mask_feats] if mode != "coords_only" else [])
    hidden, logits = dynamic_head_layers(torch.cat(parts), weights, biases)
    logits_up = aligned_bilinear(logits[None], factor)[0]
    prob = logits_up.sigmoid()
    ih, iw = p.size
    pasted = aligned_bilinear(prob[None], stride // factor)[0][:ih, :iw] > thresh
    note = p.note
    if mode == "none" and not rel_coords:
        note = (note + "; " if note else "") + "this model has no coordinate channels: nothing to zero"
    if coords_from is not None and src != k:
        note = (note + "; " if note else "") + f"coordinates of detection {src + 1}"
    return CondInstTrace(image=image.detach().float().cpu(), box=det["boxes"][k].float(),
                         score=float(det["scores"][k]), label=int(det["labels"][k]), instance=k,
                         num_detections=n_det, location=det["locations"][k].float(), fpn_level=level,
                         size_of_interest=soi, mask_stride=stride, mask_feats=p.mask_feats, coords=coords,
                         params=params, weights=weights, biases=biases, hidden=hidden, logits=logits,
                         logits_up=logits_up, prob=prob, pasted=pasted, coords_mode=mode,
                         rel_coords=bool(rel_coords), upsample_factor=factor, threshold=thresh, note=note)


# ---------------------------------------------------------------------------------------------------------------
# 2. Finding two look-alike instances
# ---------------------------------------------------------------------------------------------------------------

def _match(det: dict, target: dict, iou_thresh: float) -> dict:
    """Greedy (by score) one-to-one matching of detections to ground truth of the same class: {gt: detection}."""
    gt_boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
    gt_labels = torch.as_tensor(target["labels"]).reshape(-1)
    if len(det["boxes"]) == 0 or len(gt_boxes) == 0:
        return {}
    ious = box_iou(det["boxes"].float(), gt_boxes) * (det["labels"][:, None] == gt_labels[None, :])
    taken = {}
    for d in torch.argsort(det["scores"], descending=True).tolist():
        row = ious[d].clone()
        for g in taken:
            row[g] = 0
        g = int(row.argmax())
        if row[g] >= iou_thresh:
            taken[g] = d
    return taken


def _two_heads(dets: Sequence[int], location_inds: Tensor):
    """The first two of ``dets`` (in order) that come from different locations — FCOS keeps one detection per
    (location, class), so two detections can share a location and hence the very same head."""
    for j in dets[1:]:
        if int(location_inds[j]) != int(location_inds[dets[0]]):
            return dets[0], j
    return None


def find_look_alike_pair(model, dataset, indices: Sequence[int], iou_thresh: float = 0.5,
                         min_area_ratio: float = 0.25, cache: Optional[dict] = None) -> dict:
    """The first image among ``indices`` where two ground-truth objects *of the same category* and of similar size
    (box areas within ``min_area_ratio``) are both detected (box IoU ≥ ``iou_thresh``, same class) from two
    different locations: ``{"image_index", "instances": (a, b)`` (detection indices by score, the best-scoring such
    pair), ``"category"``, ``"note"}``. If no pair is of similar size, the first same-category pair; if there is
    none, the first image with detections from two different locations and its best two (``category`` None, and
    a note saying so). ``cache`` is keyed by image index (share it with :func:`condinst_trace`)."""
    fallback, first_pair = None, None
    for i in indices:
        image, target = dataset[i]
        det = _cached_outputs(model, image, cache, i).det
        by_score = torch.argsort(det["scores"], descending=True, stable=True).tolist()
        if fallback is None:
            two = _two_heads(by_score, det["location_inds"])
            fallback = (i, two) if two is not None else None
        matched = _match(det, target, iou_thresh)
        labels = torch.as_tensor(target["labels"]).reshape(-1)
        by_category: dict = {}
        for g, d in matched.items():
            by_category.setdefault(int(labels[g]), []).append(d)
        pairs = []
        for c, ds in by_category.items():
            ds = sorted(ds, key=by_score.index)
            for x in range(len(ds)):
                for y in range(x + 1, len(ds)):
                    a, b = ds[x], ds[y]
                    if int(det["location_inds"][a]) != int(det["location_inds"][b]):
                        pairs.append((by_score.index(a), by_score.index(b), c, (a, b)))
        pairs.sort()
        areas = box_area(det["boxes"].float())
        for _, _, c, (a, b) in pairs:
            ratio = float(torch.minimum(areas[a], areas[b]) / torch.maximum(areas[a], areas[b]).clamp(min=1e-6))
            if ratio >= min_area_ratio:
                return {"image_index": int(i), "instances": (a, b), "category": c,
                        "note": f"two detected objects of category {c}"}
        if pairs and first_pair is None:
            first_pair = (i, pairs[0])
    if first_pair is not None:
        i, (_, _, c, (a, b)) = first_pair
        return {"image_index": int(i), "instances": (a, b), "category": c,
                "note": f"two detected objects of category {c} (no pair of similar size found)"}
    if fallback is None:
        raise ValueError("no image among the given indices has detections from two different locations")
    i, (a, b) = fallback
    return {"image_index": int(i), "instances": (a, b), "category": None,
            "note": "no image with two detected objects of one category: showing its two best detections from two "
                    "different locations"}



# ---------------------------------------------------------------------------------------------------------------
# 3. Inference-time probes of one instance
# ---------------------------------------------------------------------------------------------------------------

def best_gt_iou(mask: Tensor, target: dict) -> float:
    gt = _gt_masks(target, mask.shape)
    if gt is None:
        return float("nan")
    return max(mask_iou(mask, g) for g in gt)


def _gt_masks(target, shape) -> Optional[Tensor]:
    gt = target.get("masks") if isinstance(target, dict) else None
    if gt is None or len(gt) == 0:
        return None
    return torch.as_tensor(gt).bool()[:, : shape[0], : shape[1]]


def probe_rows(model, image: Tensor, target: Optional[dict] = None, instance: int = 0,
               thresholds: Sequence[float] = (0.3, 0.7), cache: Optional[dict] = None, key=None) -> List[dict]:
    """One instance's mask under each inference-time probe of :func:`condinst_trace`: the model as trained, the
    coordinate channels zeroed, every upsampling factor (1, 2, 4, 8) and the ``thresholds``. Each row:
    ``setting``, ``rel_coords``, ``upsample_factor``, ``threshold``, ``pixels`` (mask area), ``iou`` with the
    ground-truth mask that best matches the *unchanged* mask (the same object for every row; NaN without masks in
    ``target``), and ``gt`` (its index)."""
    cfg = model.cfg
    base = condinst_trace(model, image, instance, cache=cache, key=key)
    gt = _gt_masks(target, base.pasted.shape)
    g = -1
    if gt is not None:
        ious = [mask_iou(base.pasted, m) for m in gt]
        g = int(torch.tensor([0.0 if math.isnan(v) else v for v in ious]).argmax())
    settings = [("model as trained", True, None, None), ("coordinate channels zeroed", False, None, None)]
    for f in (1, 2, 4, 8):
        mark = " (model's)" if f == cfg.mask_upsample_factor else ""
        settings.append((f"upsample ×{f} → stride {base.mask_stride // f}{mark}", True, f, None))
    settings += [(f"threshold {th:g}", True, None, th) for th in thresholds]
    rows = []
    for name, rel, f, th in settings:
        t = condinst_trace(model, image, instance, rel, f, th, cache=cache, key=key)
        rows.append({"setting": name, "rel_coords": rel, "upsample_factor": t.upsample_factor,
                     "threshold": t.threshold, "pixels": int(t.pasted.sum()),
                     "iou": mask_iou(t.pasted, gt[g]) if g >= 0 else float("nan"), "gt": g})
    return rows


def probe_markdown(rows: Sequence[dict]) -> str:
    """:func:`probe_rows` as a Markdown table."""
    lines = ["| probe (inference only, same weights) | coordinates | upsample | threshold | mask px | IoU with "
             "its object |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {'on' if r['rel_coords'] else 'zeroed'} | ×{r['upsample_factor']} | "
                     f"{r['threshold']:g} | {r['pixels']} | {r['iou']:.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# 4. Table 1's time column
# ---------------------------------------------------------------------------------------------------------------

def _row_setting(row, baseline: dict):
    o = {**baseline, **row.overrides}
    return int(o.get("mask_head_depth", 3)), int(o.get("mask_head_width", 8)), int(o.get("mask_branch_out_channels", 8))


def table1_timing_settings(table) -> list:
    """``(depth, width, Cmask)`` of every row of CondInst Table 1 (a ``PaperTable``), in the table's order — the
    ``settings`` argument of ``onestage.bench.time_mask_heads``."""
    return [_row_setting(row, table.baseline) for row in table.rows]


def mask_head_timing_markdown(result: dict, table) -> str:
    """A Markdown table of ``time_mask_heads``'s ``result`` beside Table 1's published "time" column
    (``published.time_ms_per_100_instances``, V100) and Mask R-CNN's 11.4 ms (§3.2), each as ms and as a ratio to
    Mask R-CNN's head measured the same way. Settings not in the table get "–" for the paper."""
    paper = {}
    for row in table.rows:
        ms = (row.published or {}).get("time_ms_per_100_instances")
        setting = _row_setting(row, table.baseline)
        if ms is not None:
            paper.setdefault(setting, (row.name, ms))
    ref = result["maskrcnn_ms"]
    lines = ["| head (100 instances) | params | ours: ms | ours ÷ Mask R-CNN | paper (V100): ms "
             "| paper ÷ Mask R-CNN |", "|---|---|---|---|---|---|"]
    for r in result["condinst"]:
        name, ms = paper.get((r["depth"], r["width"], r["cmask"]), ("", None))
        label = f"CondInst depth {r['depth']}, width {r['width']}" + (f" (`{name}`)" if name else "")
        paper_cells = f"{ms:g} | {ms / PAPER_MASK_RCNN_MS:.2f}" if ms is not None else "– | –"
        lines.append(f"| {label} | {r['params']} | {r['ms']:.1f} | {r['ms'] / ref:.2f} | {paper_cells} |")
    lines.append(f"| Mask R-CNN mask head (28×28) | {result['maskrcnn_params']:,} | {ref:.1f} | 1.00 | "
                 f"{PAPER_MASK_RCNN_MS:g} | 1.00 |")
    return "\n".join(lines)
