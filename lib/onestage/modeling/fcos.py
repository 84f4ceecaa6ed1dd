"""FCOS: Fully Convolutional One-Stage object detection (Tian et al., arXiv 1904.01355), read top to bottom.

1. ``FCOSConfig`` — the paper / AdelaiDet defaults (``MODEL.FCOS.*``) and the ``paper`` / ``cpu`` / ``smoke`` presets.
2. ``compute_locations`` — the image point each feature-map cell stands for.
3. ``FCOSHead`` — shared towers over P3..P7: class logits, ltrb regression (stride units), center-ness.
4. ``assign_targets`` / ``centerness_target`` — which locations are positives for which box (§3.1–3.3).
5. ``fcos_losses`` — focal + GIoU (center-ness weighted) + center-ness BCE.
6. ``postprocess`` — threshold, top-k per level, decode, sqrt(cls·ctr), class-aware NMS, top 100.
7. ``FCOS`` — the ``nn.Module`` tying them together (``model(images, targets)`` → losses; ``model(images)`` →
   detections).

Where AdelaiDet (the authors' reference code) refines the first arXiv version, we follow AdelaiDet, as its numbers are
the published ones (FCOS R-50 1x: 38.7 box AP, AdelaiDet ``configs/FCOS-Detection/README.md``): center sampling, GIoU,
center-ness on the regression branch, stride-normalised targets with ReLU instead of ``exp`` (the "improvements"
ablation of the later arXiv versions; AdelaiDet ``MODEL.FCOS.*`` defaults in ``adet/config/defaults.py``;
``adet/modeling/fcos/fcos.py``, ``fcos_outputs.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

import onestage.ops
from onestage.modeling.backbone import (CPU_BACKBONE_PRESET, SMOKE_BACKBONE_PRESET, BackboneConfig, build_backbone,
                                        level_stride)
from onestage.modeling.losses import iou_loss_ltrb
from onestage.modeling import fast_inference
from onestage.modeling.parts import ForwardParts
from onestage.structures import normalize_and_pad

__all__ = [
    "FCOSConfig",
    "FCOS",
    "FCOSHead",
    "FCOSHeadOutputs",
    "FCOSTargets",
    "FCOSPositives",
    "Scale",
    "compute_locations",
    "assign_targets",
    "location_candidates",
    "centerness_target",
    "fcos_losses",
    "postprocess",
    "flatten_levels",
]

INF = float("inf")


# ---------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FCOSConfig(BackboneConfig):
    """FCOS hyper-parameters; the defaults are the paper's (arXiv 1904.01355 §4) / AdelaiDet's ``MODEL.FCOS.*``.
    The backbone and input fields (``backbone`` … ``pixel_mean``, ``pixel_std``, ``size_divisibility``) come from
    :class:`~onestage.modeling.backbone.BackboneConfig`."""

    # --- FPN levels (paper §3.2, Fig. 2) ---
    in_features: tuple = ("p3", "p4", "p5", "p6", "p7")  # strides 8..128
    fpn_top_from: str = "p5"              # P6 from the FPN's P5 (FCOS), not C5 (RetinaNet)
    fpn_extra_block: str = "conv"
    # --- head (§3.1, Fig. 2) ---
    num_cls_convs: int = 4
    num_box_convs: int = 4
    num_share_convs: int = 0
    head_norm: str = "GN"                 # "GN" (32 groups) or "none"
    gn_groups: int = 32
    use_scale: bool = True                # learnable scalar per level, init 1 (§3.2 "exp(s_i x)")
    prior_prob: float = 0.01              # cls bias -log((1-π)/π), RetinaNet §4.1
    centerness_on: str = "reg"            # "reg" (AdelaiDet), "cls" (first arXiv version), "none" (ablation),
    #                                       "computed" (no branch; eq. 3 of the predicted ltrb at inference, Table 4 †)
    # --- targets (§3.2 multi-level assignment, center sampling) ---
    sizes_of_interest: tuple = (64, 128, 256, 512)  # m2..m5 of §3.2; P3 [0,64], ..., P7 [512, ∞)
    center_sampling: bool = True
    center_sampling_radius: float = 1.5   # × stride
    # --- losses (§3.1 eq. 2) ---
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_weight_cls: float = 1.0
    loc_loss_type: str = "giou"           # "giou" | "iou" | "linear_iou"
    iou_smooth: float = 1.0               # AdelaiDet's (I+1)/(U+1); see losses.ltrb_ious
    # --- inference (§3.1 "Inference", AdelaiDet INFERENCE_TH_TEST...) ---
    score_thresh: float = 0.05
    pre_nms_topk: int = 1000              # per level
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    thresh_with_ctr: bool = False

    #: fields that change inference only, and values that train as another (``onestage.modeling.training_view``)
    INFERENCE_ONLY: ClassVar[tuple] = ("score_thresh", "pre_nms_topk", "nms_thresh", "detections_per_img",
                                       "thresh_with_ctr")
    TRAINS_AS: ClassVar[dict] = {"centerness_on": {"computed": "none"}}

    @property
    def strides(self) -> List[int]:
        return [level_stride(f) for f in self.in_features]

    @classmethod
    def preset(cls, name: str) -> "FCOSConfig":
        """``paper``: R-50-FPN exactly as published. ``cpu``: same algorithm, small and trainable from scratch on 2
        cores. ``smoke``: tiny, for tests."""
        if name == "paper":
            return cls()
        if name == "cpu":
            # the shared cpu backbone (CPU_BACKBONE_PRESET: pretrained EfficientNet-Lite0, 128-channel FPN); 2-conv
            # GN towers keep a 320-px, batch-8 step at ~1.5 s on two cores; all five levels and the paper's sizes of
            # interest stay, so assignment and losses are the paper's.
            return cls(**CPU_BACKBONE_PRESET, num_cls_convs=2, num_box_convs=2)
        if name == "smoke":
            return cls(**SMOKE_BACKBONE_PRESET, num_cls_convs=1, num_box_convs=1, gn_groups=8)
        raise ValueError(f"unknown preset {name!r}; choose from 'paper', 'cpu', 'smoke'")


# ---------------------------------------------------------------------------------------------------------------
# 2. Locations
# ---------------------------------------------------------------------------------------------------------------

def compute_locations(features: Sequence, strides: Sequence[int], device=None) -> List[Tensor]:
    """Image coordinates of every feature cell, per level: ``(x·s + ⌊s/2⌋, y·s + ⌊s/2⌋)``.

    ``features``: per-level tensors (``...×H×W``) or ``(H, W)`` pairs. Returns per-level ``(H·W)×2`` float tensors,
    row-major (x varies fastest), ``x`` first — the order a ``permute(0, 2, 3, 1).reshape(N, -1, C)`` of the head
    outputs has. The ``⌊s/2⌋`` puts the point near the centre of the cell's receptive field (paper §3.1:
    "⌊s/2⌋ + xs").
    """
    out = []
    for feat, s in zip(features, strides):
        if isinstance(feat, Tensor):
            h, w = feat.shape[-2:]
            dev = feat.device if device is None else device
        else:
            h, w = feat
            dev = device
        xs = torch.arange(0, w * s, step=s, dtype=torch.float32, device=dev) + s // 2
        ys = torch.arange(0, h * s, step=s, dtype=torch.float32, device=dev) + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. Head
# ---------------------------------------------------------------------------------------------------------------

class Scale(nn.Module):
    """One learnable scalar multiplying a level's regression (paper §3.2: shared heads, per-level scale)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSHeadOutputs(NamedTuple):
    """Per-level lists of ``N×C×H×W`` tensors. ``bbox_reg`` is ``relu(scale·conv)`` in **stride units** (multiply by
    the stride to get pixels). ``ctrness`` is ``None`` with ``centerness_on="none"``. ``bbox_towers`` are the
    bbox-tower features that CondInst's controller and BlendMask's attention read."""

    logits: List[Tensor]
    bbox_reg: List[Tensor]
    ctrness: Optional[List[Tensor]]
    bbox_towers: List[Tensor]


def _tower(num_convs: int, channels: int, norm: str, gn_groups: int) -> nn.Sequential:
    """3×3 conv (bias kept even with GN, as AdelaiDet) → GN → ReLU, repeated. Layout [conv, norm, relu]×n matches
    torchvision's FCOS head so its weights map index for index."""
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=True))
        if norm == "GN":
            layers.append(nn.GroupNorm(gn_groups, channels))
        elif norm != "none":
            raise ValueError(f"head_norm must be 'GN' or 'none', got {norm!r}")
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """The FCOS head (paper Fig. 2), shared by all levels: a classification tower and a box tower of
    ``num_*_convs`` 3×3 convs, then 3×3 convs to ``num_classes`` logits, 4 ltrb distances and 1 center-ness logit.

    Center-ness sits on the box tower (``"reg"``, AdelaiDet and the "ctr. on reg." improvement of the later arXiv
    versions) or on the classification tower (``"cls"``, paper Fig. 2 of the first version), or is absent
    (``"none"``, the paper's "w/o center-ness" ablation, §4.1.2). ``"computed"`` has no branch either and trains
    exactly as ``"none"``; its inference computes center-ness from the predicted regression vector instead
    (:func:`postprocess` with ``ctr_from_reg``), the "center-ness†" row of FCOS Table 4 (arXiv 1904.01355 §4.1.2),
    which the paper shows does not replace the learned branch.
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, num_cls_convs: int = 4,
                 num_box_convs: int = 4, num_share_convs: int = 0, norm: str = "GN", gn_groups: int = 32,
                 use_scale: bool = True, prior_prob: float = 0.01, centerness_on: str = "reg"):
        super().__init__()
        if centerness_on not in ("reg", "cls", "none", "computed"):
            raise ValueError(f"centerness_on must be 'reg', 'cls', 'none' or 'computed', got {centerness_on!r}")
        self.num_classes = num_classes
        self.centerness_on = centerness_on
        self.share_tower = _tower(num_share_convs, in_channels, norm, gn_groups)
        self.cls_tower = _tower(num_cls_convs, in_channels, norm, gn_groups)
        self.bbox_tower = _tower(num_box_convs, in_channels, norm, gn_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1) if centerness_on in ("reg", "cls") else None
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)]) if use_scale else None
        # All head convs N(0, 0.01), bias 0 (paper §4 "initialized as in RetinaNet").
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)
        # Prior π = 0.01 so that at the start every location predicts background with confidence ~0.99 and the
        # huge number of easy negatives does not swamp the first iterations (RetinaNet §4.1).
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> FCOSHeadOutputs:
        logits, bbox_reg, ctrness, towers = [], [], [], []
        for lvl, feat in enumerate(features):
            feat = self.share_tower(feat)
            cls_t = self.cls_tower(feat)
            box_t = self.bbox_tower(feat)
            towers.append(box_t)
            logits.append(self.cls_logits(cls_t))
            if self.ctrness is not None:
                ctrness.append(self.ctrness(box_t if self.centerness_on == "reg" else cls_t))
            reg = self.bbox_pred(box_t)
            if self.scales is not None:
                reg = self.scales[lvl](reg)
            # ReLU keeps distances ≥ 0; with stride-normalised targets it replaced the paper's exp(s·x).
            bbox_reg.append(F.relu(reg))
        return FCOSHeadOutputs(logits, bbox_reg, ctrness if self.ctrness is not None else None, towers)


def flatten_levels(per_level: Sequence[Tensor]) -> Tensor:
    """Per-level ``N×C×H×W`` → ``N×(ΣHW)×C``, levels concatenated in order, each row-major like the locations."""
    n = per_level[0].shape[0]
    return torch.cat([t.permute(0, 2, 3, 1).reshape(n, -1, t.shape[1]) for t in per_level], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# 4. Targets
# ---------------------------------------------------------------------------------------------------------------

class FCOSTargets(NamedTuple):
    """Training targets of a batch, ``L`` = number of locations over all levels (the order of ``flatten_levels``).

    * ``labels`` ``B×L`` int64, class of the assigned box, ``num_classes`` for background;
    * ``reg_targets`` ``B×L×4`` (l, t, r, b) divided by the level's stride (meaningful at positives only);
    * ``gt_inds`` ``B×L`` int64, index of the assigned box in the batch's boxes concatenated image after image
      (what CondInst/BlendMask use to fetch masks), −1 for background;
    * ``fpn_levels`` ``L`` int64 level index; ``strides`` ``L`` float stride of each location.
    """

    labels: Tensor
    reg_targets: Tensor
    gt_inds: Tensor
    fpn_levels: Tensor
    strides: Tensor


def _size_ranges(sizes_of_interest: Sequence[float], num_levels: int) -> List[tuple]:
    """(64, 128, 256, 512) → [(-1, 64), (64, 128), (128, 256), (256, 512), (512, ∞)] (paper §3.2, m2..m7)."""
    if len(sizes_of_interest) != num_levels - 1:
        raise ValueError(f"{num_levels} levels need {num_levels - 1} sizes_of_interest, got {sizes_of_interest}")
    bounds = [-1.0, *[float(s) for s in sizes_of_interest], INF]
    return list(zip(bounds[:-1], bounds[1:]))


def location_candidates(locs: Tensor, boxes: Tensor, strides, lo, hi, center_sampling: bool = True,
                        center_sampling_radius: float = 1.5, centers: Optional[Tensor] = None):
    """The two tests of §3.2 for every (location, box) pair, before ambiguity is resolved.

    ``locs`` ``L×2``; ``boxes`` ``M×4`` xyxy pixels; ``strides``, ``lo``, ``hi``: each location's stride and size
    range (scalars or ``L`` tensors). Returns ``ltrb`` ``L×M×4`` (pixels) and ``candidates`` ``L×M`` bool: the
    location is **inside** (with center sampling: inside ``centre ± radius·stride`` clipped to the box, strictly;
    without: strictly inside the box) and the box's **scale** fits the level (``lo ≤ max(l,t,r,b) ≤ hi``).
    ``centers`` ``M×2`` replaces the box centres (CondInst uses mask centroids). Shared by :func:`assign_targets`
    and the assignment statistics of ``onestage.analysis``.
    """
    xs, ys = locs[:, 0], locs[:, 1]
    as_column = lambda v: torch.as_tensor(v, dtype=torch.float32, device=locs.device).reshape(-1, 1)  # noqa: E731
    strides, lo, hi = as_column(strides), as_column(lo), as_column(hi)
    x0, y0, x1, y1 = boxes.unbind(1)  # each M
    ltrb = torch.stack([xs[:, None] - x0, ys[:, None] - y0, x1 - xs[:, None], y1 - ys[:, None]], dim=2)  # L×M×4
    if center_sampling:
        if centers is None:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        else:
            cx, cy = centers.to(device=locs.device, dtype=torch.float32).unbind(1)
        radius = strides * center_sampling_radius  # L×1
        # centre box, clipped to the GT box so it never reaches outside the object
        cx0 = torch.maximum(cx - radius, x0)
        cy0 = torch.maximum(cy - radius, y0)
        cx1 = torch.minimum(cx + radius, x1)
        cy1 = torch.minimum(cy + radius, y1)
        dist = torch.stack([xs[:, None] - cx0, ys[:, None] - cy0, cx1 - xs[:, None], cy1 - ys[:, None]], dim=2)
        inside = dist.min(dim=2).values > 0
    else:
        inside = ltrb.min(dim=2).values > 0
    max_reg = ltrb.max(dim=2).values
    in_level = (max_reg >= lo) & (max_reg <= hi)
    return ltrb, inside & in_level


def assign_targets(locations: Sequence[Tensor], targets: Sequence[dict], num_classes: int,
                   strides: Sequence[int] = (8, 16, 32, 64, 128),
                   sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                   center_sampling: bool = True, center_sampling_radius: float = 1.5) -> FCOSTargets:
    """Label every location (paper §3.1–3.2; AdelaiDet ``compute_targets_for_locations``).

    For location (x, y) and box (x0, y0, x1, y1) the regression target is ``l, t, r, b = x−x0, y−y0, x1−x, y1−y``
    (pixels). A location is a positive of a box when both hold:

    1. **inside** — with center sampling: inside the box ``centre ± radius·stride`` *clipped to the box*, strictly
       (``> 0`` on all four sides); without: strictly inside the box (``min(l,t,r,b) > 0``). The centre is the box
       centre, or ``target["centers"]`` (``M×2``) when given (CondInst uses mask centroids);
    2. **scale** — ``lo ≤ max(l,t,r,b) ≤ hi`` for the level's range from ``sizes_of_interest`` (inclusive both ends).

    A location that is a positive of several boxes takes the one of **smallest box area** (paper §3.2: "simply
    choose the bounding box with minimal area"); ties go to the first box. Unlike AdelaiDet we do not zero an image's
    center-sampling mask when its first box centre has x == 0 (a quirk of ``get_sample_region``).

    ``locations``: per-level ``Li×2`` (``compute_locations``); ``targets``: per-image dicts with ``boxes`` ``M×4``
    xyxy pixels and ``labels`` ``M``. Vectorised over locations × boxes; loops only over images.
    """
    if len(locations) != len(strides):
        raise ValueError(f"{len(locations)} location levels but {len(strides)} strides")
    ranges = _size_ranges(sizes_of_interest, len(locations))
    device = locations[0].device
    locs = torch.cat(list(locations), dim=0)
    sizes = [len(lv) for lv in locations]
    fpn_levels = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(sizes)])
    loc_strides = torch.cat([torch.full((n,), float(s), device=device) for n, s in zip(sizes, strides)])
    lo = torch.cat([torch.full((n,), r[0], device=device) for n, r in zip(sizes, ranges)])
    hi = torch.cat([torch.full((n,), r[1], device=device) for n, r in zip(sizes, ranges)])
    num_locs = locs.shape[0]

    labels_all, reg_all, inds_all = [], [], []
    offset = 0
    for tgt in targets:
        boxes = tgt["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
        gt_labels = tgt["labels"].to(device)
        m = boxes.shape[0]
        if m == 0:
            labels_all.append(torch.full((num_locs,), num_classes, dtype=torch.long, device=device))
            reg_all.append(locs.new_zeros((num_locs, 4)))
            inds_all.append(torch.full((num_locs,), -1, dtype=torch.long, device=device))
            continue
        ltrb, candidates = location_candidates(locs, boxes, loc_strides, lo, hi, center_sampling,
                                               center_sampling_radius, tgt.get("centers"))
        x0, y0, x1, y1 = boxes.unbind(1)
        area = ((x1 - x0) * (y1 - y0))[None, :].expand(num_locs, m).clone()
        area[~candidates] = INF
        min_area, idx = area.min(dim=1)  # min() returns the first index on ties
        pos = min_area < INF

        labels = gt_labels[idx].clone()
        labels[~pos] = num_classes
        reg = ltrb[torch.arange(num_locs, device=device), idx] / loc_strides[:, None]
        inds = torch.where(pos, idx + offset, torch.full_like(idx, -1))
        labels_all.append(labels)
        reg_all.append(reg)
        inds_all.append(inds)
        offset += m

    return FCOSTargets(torch.stack(labels_all), torch.stack(reg_all), torch.stack(inds_all), fpn_levels,
                       loc_strides)


def centerness_target(ltrb: Tensor) -> Tensor:
    """Center-ness (paper eq. 3): ``sqrt( min(l,r)/max(l,r) · min(t,b)/max(t,b) )``, in [0, 1]; 1 at the box centre,
    0 on its border. Scale-free, so stride-normalised ltrb give the same value as pixels."""
    lr = ltrb[..., [0, 2]]
    tb = ltrb[..., [1, 3]]
    # clamp: a degenerate target (max = 0) would divide 0/0; positives always have max > 0
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values.clamp(min=1e-12)) * (
        tb.min(dim=-1).values / tb.max(dim=-1).values.clamp(min=1e-12))
    return torch.sqrt(ratio.clamp(min=0))


# ---------------------------------------------------------------------------------------------------------------
# 5. Losses
# ---------------------------------------------------------------------------------------------------------------

def _reduce_mean(t: Tensor) -> Tensor:
    """Mean over distributed workers (AdelaiDet normalises by the all-reduced number of positives)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


class FCOSPositives(NamedTuple):
    """What :func:`fcos_losses` found and normalised by, for the losses built on top of FCOS's (CondInst's mask loss
    over the positives, BlendMask's ``loss_denorm``-normalised mask loss)."""

    targets: FCOSTargets   # the assignment the losses were computed against
    pos_inds: Tensor       # flat indices into B·L of the positive locations
    num_pos_avg: float     # max(#positives averaged over workers, 1): the cls / ctr normaliser
    loss_denorm: float     # Σ center-ness targets of the positives (averaged over workers): the box-loss normaliser
    ctr_targets: Tensor    # center-ness target of each positive
    logits: Tensor         # (B·L)×C class logits, flattened in ``flatten_levels`` order
    bbox_reg: Tensor       # (B·L)×4 regression (stride units)
    ctrness: Optional[Tensor]  # B·L center-ness logits (None without the branch)


def fcos_losses(head_out: FCOSHeadOutputs, assigned: FCOSTargets, num_classes: int, focal_alpha: float = 0.25,
                focal_gamma: float = 2.0, loc_loss_type: str = "giou", iou_smooth: float = 1.0,
                loss_weight_cls: float = 1.0):
    """FCOS training losses (paper eq. 2, AdelaiDet ``fcos_losses``). Returns ``(losses, positives)``: the loss dict
    and an :class:`FCOSPositives`.

    * ``loss_cls`` — sigmoid focal (α .25, γ 2) summed over all locations × classes / max(#pos, 1);
    * ``loss_box_reg`` — IoU-family loss at positives, each weighted by its center-ness target, / Σ ctr targets
      (so low-quality border positives count less); with ``centerness_on="none"`` unweighted / max(#pos, 1);
    * ``loss_ctr`` — BCE-with-logits against the (soft) center-ness targets, summed / max(#pos, 1). It plateaus
      near 0.6 by design because the targets are soft (AdelaiDet issue #395).

    With no positive in the batch the box and center-ness losses are ``0 · Σ(prediction)``: zero, but connected to
    the graph so every parameter still receives a (zero) gradient — DDP needs that.

    ``positives``: ``pos_inds`` (flat indices into B·L), ``num_pos_avg``, ``loss_denorm`` (Σ ctr targets, reused by
    BlendMask's mask loss), ``ctr_targets`` at positives, and the flattened predictions.
    """
    logits = flatten_levels(head_out.logits).reshape(-1, num_classes)
    reg = flatten_levels(head_out.bbox_reg).reshape(-1, 4)
    ctr = flatten_levels(head_out.ctrness).reshape(-1) if head_out.ctrness is not None else None
    labels = assigned.labels.reshape(-1)
    reg_t = assigned.reg_targets.reshape(-1, 4)

    pos_inds = torch.nonzero(labels != num_classes).squeeze(1)
    num_pos = torch.tensor(float(pos_inds.numel()), device=logits.device)
    num_pos_avg = max(_reduce_mean(num_pos).item(), 1.0)

    # fused Triton kernel on GPU, the reference (losses.sigmoid_focal_loss, sum reduction) on CPU
    loss_cls = onestage.ops.sigmoid_focal_loss(logits, labels, focal_alpha, focal_gamma)
    loss_cls = loss_weight_cls * loss_cls / num_pos_avg

    losses = {"loss_cls": loss_cls}
    pos_reg, pos_reg_t = reg[pos_inds], reg_t[pos_inds]
    ctr_t = centerness_target(pos_reg_t)
    loss_denorm = max(_reduce_mean(ctr_t.sum().detach()).item(), 1e-6)
    if pos_inds.numel() > 0:
        if ctr is not None:
            losses["loss_box_reg"] = iou_loss_ltrb(pos_reg, pos_reg_t, ctr_t, loc_loss_type, iou_smooth) / loss_denorm
            losses["loss_ctr"] = F.binary_cross_entropy_with_logits(ctr[pos_inds], ctr_t, reduction="sum") / num_pos_avg
        else:
            losses["loss_box_reg"] = iou_loss_ltrb(pos_reg, pos_reg_t, None, loc_loss_type, iou_smooth) / num_pos_avg
    else:
        losses["loss_box_reg"] = reg.sum() * 0.0
        if ctr is not None:
            losses["loss_ctr"] = ctr.sum() * 0.0
    return losses, FCOSPositives(assigned, pos_inds, num_pos_avg, loss_denorm, ctr_t, logits, reg, ctr)


# ---------------------------------------------------------------------------------------------------------------
# 6. Inference
# ---------------------------------------------------------------------------------------------------------------

def postprocess_kwargs(cfg, **changes) -> dict:
    """The keyword arguments of :func:`postprocess` a config (FCOS, CondInst, BlendMask: the FCOS inference
    fields) asks for, with ``changes`` on top — one place that spells them, for the models and for viz."""
    kwargs = dict(score_thresh=cfg.score_thresh, pre_nms_topk=cfg.pre_nms_topk, nms_thresh=cfg.nms_thresh,
                  detections_per_img=cfg.detections_per_img, thresh_with_ctr=cfg.thresh_with_ctr,
                  ctr_from_reg=getattr(cfg, "centerness_on", None) == "computed")
    unknown = sorted(set(changes) - set(kwargs) - {"return_indices"})
    if unknown:
        raise TypeError(f"postprocess_kwargs: unknown postprocess argument(s) {unknown}")
    return {**kwargs, **changes}


def postprocess(head_out: FCOSHeadOutputs, locations: Sequence[Tensor], strides: Sequence[int],
                image_sizes: Sequence[tuple], score_thresh: float = 0.05, pre_nms_topk: int = 1000,
                nms_thresh: float = 0.6, detections_per_img: int = 100, thresh_with_ctr: bool = False,
                return_indices: bool = False, ctr_from_reg: bool = False) -> List[dict]:
    """Detections per image (paper §3.1 "Inference"; AdelaiDet ``forward_for_single_feature_map`` +
    ``select_over_all_levels`` + d2 ``detector_postprocess``).

    Per level: sigmoid class scores; keep (location, class) pairs with score > ``score_thresh`` (by default on the
    class score alone; ``thresh_with_ctr`` multiplies center-ness in first, as BlendMask/CondInst do); keep the
    ``pre_nms_topk`` best by cls·ctr; decode ``x − l·s, y − t·s, x + r·s, y + b·s``; score = sqrt(cls·ctr) (a
    geometric mean, which keeps scores on the classifier's scale), or cls alone without a center-ness branch.
    ``ctr_from_reg`` (a head without a branch) takes ctr from the predicted ltrb by eq. 3 instead (FCOS Table 4 †).
    Then over all levels: class-aware NMS at ``nms_thresh``, keep the ``detections_per_img`` best (AdelaiDet's
    ``kthvalue`` cut can keep more on exact ties; we keep exactly that many), clip to the image and drop empty boxes.

    ``return_indices=True`` adds, per detection, ``location_inds`` (index into the image's locations flattened over
    all levels, the order of ``flatten_levels``), ``fpn_levels`` and ``locations`` (x, y in input pixels): what the
    mask heads (CondInst's controller, BlendMask's attentions) need to fetch the detection's per-location outputs.
    """
    level_offsets = [0]
    for locs in locations:
        level_offsets.append(level_offsets[-1] + locs.shape[0])
    num_images = head_out.logits[0].shape[0]
    results = []
    for i in range(num_images):
        all_boxes, all_scores, all_labels, all_inds, all_levels = [], [], [], [], []
        for lvl, (locs, s) in enumerate(zip(locations, strides)):
            logit = head_out.logits[lvl][i]
            num_classes = logit.shape[0]
            cls = logit.permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
            reg = head_out.bbox_reg[lvl][i].permute(1, 2, 0).reshape(-1, 4)
            if head_out.ctrness is not None:
                ctr = head_out.ctrness[lvl][i].permute(1, 2, 0).reshape(-1).sigmoid()
            elif ctr_from_reg:
                ctr = centerness_target(reg.float())
            else:
                ctr = None
            if ctr is not None and thresh_with_ctr:
                cls = cls * ctr[:, None]
            candidates = cls > score_thresh
            if ctr is not None and not thresh_with_ctr:
                cls = cls * ctr[:, None]
            scores = cls[candidates]
            loc_idx, labels = candidates.nonzero(as_tuple=True)
            if scores.numel() > pre_nms_topk:
                scores, top = scores.topk(pre_nms_topk)
                loc_idx, labels = loc_idx[top], labels[top]
            d = reg[loc_idx] * s
            p = locs[loc_idx]
            boxes = torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], dim=1)
            all_boxes.append(boxes)
            all_scores.append(torch.sqrt(scores) if ctr is not None else scores)
            all_labels.append(labels)
            all_inds.append(loc_idx + level_offsets[lvl])
            all_levels.append(torch.full_like(loc_idx, lvl))
        boxes = torch.cat(all_boxes)
        scores = torch.cat(all_scores)
        labels = torch.cat(all_labels)
        inds, levels = torch.cat(all_inds), torch.cat(all_levels)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]  # sorted by decreasing score
        boxes, scores, labels, inds, levels = boxes[keep], scores[keep], labels[keep], inds[keep], levels[keep]
        h, w = image_sizes[i]
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
        nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        result = {"boxes": boxes[nonempty], "scores": scores[nonempty], "labels": labels[nonempty]}
        if return_indices:
            inds = inds[nonempty]
            result.update(location_inds=inds, fpn_levels=levels[nonempty], locations=torch.cat(locations)[inds])
        results.append(result)
    return results


# ---------------------------------------------------------------------------------------------------------------
# 7. The model
# ---------------------------------------------------------------------------------------------------------------

class FCOS(nn.Module):
    """FCOS detector. ``model(images, targets)`` in train mode → ``{"loss_cls", "loss_box_reg", "loss_ctr"}``;
    ``model(images)`` in eval mode → ``[{"boxes" N×4 xyxy in input pixels, "scores" N, "labels" N}]``.

    ``images``: list of ``3×H×W`` RGB float 0..1 (any sizes); normalisation and padding happen inside. Subclasses
    (CondInst, BlendMask) reuse ``preprocess``, ``features``, ``head``, ``assign`` and ``losses``.
    """

    #: boxes only: training reads no instance masks (a box whose polygon is invalid still trains)
    needs_masks = False

    def __init__(self, cfg: Optional[FCOSConfig] = None, num_classes: int = 80):
        super().__init__()
        cfg = cfg if cfg is not None else FCOSConfig()
        self.cfg = cfg
        self.num_classes = num_classes
        self.backbone = build_backbone(cfg)
        self.strides = list(self.backbone.strides)
        self.head = FCOSHead(self.backbone.out_channels, num_classes, num_levels=len(self.strides),
                             num_cls_convs=cfg.num_cls_convs, num_box_convs=cfg.num_box_convs,
                             num_share_convs=cfg.num_share_convs, norm=cfg.head_norm, gn_groups=cfg.gn_groups,
                             use_scale=cfg.use_scale, prior_prob=cfg.prior_prob, centerness_on=cfg.centerness_on)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    def preprocess(self, images: Sequence[Tensor]):
        """Normalise each image, then zero-pad the batch (zero = the mean colour after normalising, as d2 does)."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def features(self, batch: Tensor) -> List[Tensor]:
        return list(self.backbone(batch).values())

    def assign(self, locations: Sequence[Tensor], targets: Sequence[dict]) -> FCOSTargets:
        c = self.cfg
        return assign_targets(locations, targets, self.num_classes, self.strides, c.sizes_of_interest,
                              c.center_sampling, c.center_sampling_radius)

    def losses(self, head_out: FCOSHeadOutputs, locations: Sequence[Tensor], targets: Sequence[dict]) -> dict:
        return self.losses_and_positives(head_out, locations, targets)[0]

    def losses_and_positives(self, head_out: FCOSHeadOutputs, locations: Sequence[Tensor],
                             targets: Sequence[dict]) -> Tuple[dict, FCOSPositives]:
        """The assignment and :func:`fcos_losses`: ``(losses, FCOSPositives)`` (CondInst and BlendMask build their
        mask losses on the positives)."""
        c = self.cfg
        return fcos_losses(head_out, self.assign(locations, targets), self.num_classes, c.focal_alpha, c.focal_gamma,
                           c.loc_loss_type, c.iou_smooth, c.loss_weight_cls)

    def postprocess(self, head_out: FCOSHeadOutputs, locations: Sequence[Tensor], image_sizes: Sequence[tuple],
                    return_indices: bool = False):
        return postprocess(head_out, locations, self.strides, image_sizes,
                           **postprocess_kwargs(self.cfg, return_indices=return_indices))

    # -- one forward pass, in parts (onestage.modeling.parts) -------------------------------------------------
    def forward_parts(self, images: Sequence[Tensor]) -> ForwardParts:
        """Preprocess, backbone + FPN, head, locations: everything ``forward`` computes before losses or inference."""
        batch, sizes = self.preprocess(images)
        named = dict(self.backbone(batch))
        feats = list(named.values())
        return ForwardParts(batch, [tuple(s) for s in sizes], named, self.head(feats),
                            compute_locations(feats, self.strides))

    def losses_from_parts(self, parts: ForwardParts, targets: Sequence[dict]) -> dict:
        return self.losses(parts.head, parts.locations, targets)

    def detect(self, parts: ForwardParts, with_origin: bool = False) -> List[dict]:
        """The detections of ``model(images)`` in eval mode; ``with_origin`` adds ``location_inds``, ``fpn_levels``
        and ``locations`` per detection (see :func:`postprocess`)."""
        return self.postprocess(parts.head, parts.locations, parts.image_sizes, return_indices=with_origin)

    def candidates(self, parts: ForwardParts) -> List[dict]:
        """Per image, the boxes inference ranks before NMS — score threshold and per-level top-k as in
        :func:`postprocess`, no suppression — best first, with their origin keys."""
        most = self.cfg.pre_nms_topk * len(self.strides)
        return postprocess(parts.head, parts.locations, self.strides, parts.image_sizes, **postprocess_kwargs(
            self.cfg, nms_thresh=1.0, detections_per_img=most, return_indices=True))

    def fp32_layers(self) -> tuple:
        """The prediction layers the bf16 inference fast path keeps in fp32 (:mod:`onestage.modeling.fast_inference`):
        scores, box distances, center-ness — the outputs inference decodes directly."""
        return tuple(n for n in ("head.cls_logits", "head.bbox_pred", "head.ctrness") if getattr(self.head, n[5:]))

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} needs targets in training mode")
        if not self.training:  # detect(forward_parts(...)), on the fast path where it applies
            return fast_inference.inference(self, images)
        return self.losses_from_parts(self.forward_parts(images), targets)
