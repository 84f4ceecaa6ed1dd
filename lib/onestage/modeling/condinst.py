"""CondInst: FCOS + instance-conditioned dynamic mask heads (Tian, Shen, Chen, arXiv 2003.05664).

One readable file: config (§3–4 of the paper, AdelaiDet ``MODEL.CONDINST.*``), the mask branch, the controller,
targets (ground-truth masks sampled at the mask-output stride), the dice loss, and inference.

How it works (paper §2, Fig. 3):

1. FCOS runs unchanged: classification, boxes, center-ness. Its positives (training) or its detections (inference)
   are the *instances*.
2. A **controller** — one 3×3 conv on the FCOS box tower — outputs at every location the ``P`` parameters of a tiny
   fully convolutional mask head: ``depth`` 1×1 conv layers of ``width`` channels (169 numbers by default).
3. A **mask branch** on P3 (with P4, P5 fused in) produces shared features ``Fmask`` (``Cmask`` = 8 channels, stride 8).
4. For each instance, its own head runs on ``Fmask`` with two **relative-coordinate** channels in front (instance
   location minus pixel location, normalised by the level's size of interest) — the head knows *where* its instance
   is, and its filters encode *what* it looks like. All instances run at once (``onestage.ops.dynamic_mask_head``).
5. Mask logits are upsampled with ``aligned_bilinear`` (factor 4 → 1/2 of the input; Table 4) and trained with the
   dice loss against the ground-truth mask sampled at the same stride.

Inference: FCOS detections (box NMS, §2.4) → their dynamic heads → masks at input size, threshold 0.5. With
``mask_nms=True`` the box NMS is skipped: every candidate gets a mask and duplicates are removed on mask IoU (§3.5,
Table 5 — CondInst without box NMS).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.modeling.backbone import level_stride
from onestage.modeling.fcos import FCOS, FCOSConfig, FCOSHeadOutputs, FCOSPositives, flatten_levels
from onestage.modeling.losses import dice_loss
from onestage.modeling.parts import ForwardParts
from onestage.ops.dynamic_mask_head import COORD_MODES, dynamic_mask_head, num_dynamic_params
from onestage.structures import mask_centers, mask_nms as greedy_mask_nms

__all__ = ["CondInstConfig", "CondInst", "MaskBranch", "aligned_bilinear", "sample_gt_masks"]


@dataclass
class CondInstConfig(FCOSConfig):
    """CondInst hyper-parameters. FCOS fields are inherited (with CondInst's overrides: ``thresh_with_ctr=True``,
    AdelaiDet ``configs/CondInst/Base-CondInst.yaml``); the defaults below are the paper's (§2–3) and AdelaiDet's
    ``MODEL.CONDINST.*``."""

    # --- mask branch (§2.2 "the mask branch has four 3×3 convolutions with 128 channels ... Cmask = 8") ---
    mask_branch_in_features: tuple = ("p3", "p4", "p5")
    mask_branch_channels: int = 128
    mask_branch_num_convs: int = 4
    mask_branch_out_channels: int = 8      # Cmask, Table 2
    mask_branch_norm: str = "BN"           # "BN" | "GN" | "none"
    # --- dynamic mask head (§2.2, Table 1: depth 3, width 8 → 169 parameters) ---
    mask_head_depth: int = 3
    mask_head_width: int = 8
    rel_coords: str = "rel"                # Table 3: "rel" | "abs" | "none" (Fmask only) | "coords_only"
    # --- output resolution (Table 4: factor 4 → 1/2 of the input; AdelaiDet's code uses MASK_OUT_STRIDE 4 = factor 2)
    mask_upsample_factor: int = 4
    # --- training: random subset of positives used for the mask loss (Base-CondInst MAX_PROPOSALS 500 per GPU) ---
    max_proposals: int = 500
    # --- inference ---
    mask_threshold: float = 0.5
    mask_nms: bool = False                 # Table 5: NMS on masks instead of boxes
    mask_nms_thresh: float = 0.5           # mask-IoU threshold of that NMS (the paper does not state it; SOLO's 0.5)
    mask_nms_max_candidates: int = 500     # candidates given masks before mask NMS (bounds time and memory)
    thresh_with_ctr: bool = True           # AdelaiDet Base-CondInst FCOS override

    INFERENCE_ONLY: ClassVar[tuple] = FCOSConfig.INFERENCE_ONLY + (
        "mask_threshold", "mask_nms", "mask_nms_thresh", "mask_nms_max_candidates")

    def __post_init__(self):
        if self.rel_coords not in COORD_MODES:
            raise ValueError(f"rel_coords must be one of {COORD_MODES}, got {self.rel_coords!r}")
        if self.mask_upsample_factor not in (1, 2, 4, 8):
            raise ValueError("mask_upsample_factor must be 1, 2, 4 or 8 (the mask-feature stride is 8)")
        if self.mask_head_depth < 1:
            raise ValueError("mask_head_depth must be ≥ 1")

    @property
    def num_dynamic_params(self) -> int:
        return num_dynamic_params(self.mask_branch_out_channels, self.mask_head_width, self.mask_head_depth,
                                  self.rel_coords)

    @classmethod
    def preset(cls, name: str) -> "CondInstConfig":
        """``paper``: R-50-FPN as published. ``cpu``: FCOS's cpu preset (EfficientNet-Lite0, 128-ch FPN) with a
        64-channel, 2-conv mask branch — capacity only; Cmask, the dynamic head and the upsampling stay the paper's.
        ``smoke``: tiny, for tests."""
        base = super().preset(name)  # an instance of cls carrying FCOS's preset values
        if name == "cpu":
            return dataclasses.replace(base, mask_branch_channels=64, mask_branch_num_convs=2)
        if name == "smoke":
            return dataclasses.replace(base, mask_branch_channels=16, mask_branch_num_convs=1, max_proposals=64)
        return base


# ---------------------------------------------------------------------------------------------------------------
# Aligned upsampling
# ---------------------------------------------------------------------------------------------------------------

def aligned_bilinear(x: Tensor, factor: int) -> Tensor:
    """Bilinear upsampling by an integer ``factor`` that keeps the ``k·s + s//2`` pixel-centre convention.

    Input pixel ``k`` of a stride-``s`` map sits at image coordinate ``k·s + s//2``; after upsampling by ``f`` the
    output (stride ``s/f``) must hold it at index ``f·k + f//2``. ``F.interpolate`` (either ``align_corners``) shifts
    it, which misplaces mask boundaries by up to half a feature pixel (hence AdelaiDet's ``aligned_bilinear``,
    ``adet/utils/comm.py``). Here: replicate-pad one pixel right/bottom, interpolate with ``align_corners=True`` to
    ``f·h + 1`` (so input ``k`` lands exactly on ``f·k``), shift by ``f//2`` with replicate padding, crop to
    ``f·h × f·w``.
    """
    if factor == 1:
        return x
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    squeeze = x.dim() == 3
    if squeeze:
        x = x[:, None]
    h, w = x.shape[-2:]
    x = F.pad(x, (0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, (factor // 2, 0, factor // 2, 0), mode="replicate")
    x = x[..., : factor * h, : factor * w]
    return x[:, 0] if squeeze else x


def sample_gt_masks(masks: Tensor, stride: int) -> Tensor:
    """Ground-truth masks at the prediction stride: pixel ``(s//2 + s·i, s//2 + s·j)`` of the padded full-resolution
    mask, the same sample points as the predictions (AdelaiDet ``bitmasks[start::stride, start::stride]``)."""
    if stride == 1:
        return masks
    return masks[..., stride // 2::stride, stride // 2::stride]


# ---------------------------------------------------------------------------------------------------------------
# Mask branch
# ---------------------------------------------------------------------------------------------------------------

def _conv_norm_relu(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=norm == "none")]
    if norm == "BN":
        layers.append(nn.BatchNorm2d(out_ch))
    elif norm == "GN":
        layers.append(nn.GroupNorm(min(32, out_ch), out_ch))
    elif norm != "none":
        raise ValueError(f"unknown norm {norm!r}")
    layers.append(nn.ReLU(inplace=True))
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class MaskBranch(nn.Module):
    """``Fmask``: refine each input level (3×3 conv), bring P4/P5 to P3's size with ``aligned_bilinear`` and sum,
    then ``num_convs`` 3×3 convs and a 1×1 conv to ``out_channels`` (paper §2.2; AdelaiDet
    ``adet/modeling/condinst/mask_branch.py``)."""

    def __init__(self, in_channels: int, in_strides: Sequence[int], channels: int = 128, num_convs: int = 4,
                 out_channels: int = 8, norm: str = "BN"):
        super().__init__()
        self.in_strides = list(in_strides)
        self.refine = nn.ModuleList(_conv_norm_relu(in_channels, channels, norm) for _ in in_strides)
        self.tower = nn.Sequential(*[_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)])
        self.out = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.out.weight, a=1)
        nn.init.zeros_(self.out.bias)

    @property
    def out_stride(self) -> int:
        return self.in_strides[0]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self.refine[0](features[0])
        for refine, feat, stride in zip(self.refine[1:], features[1:], self.in_strides[1:]):
            y = refine(feat)
            factor = stride // self.in_strides[0]
            y = aligned_bilinear(y, factor)[..., : x.shape[-2], : x.shape[-1]]
            x = x + y
        return self.out(self.tower(x))


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

class CondInst(FCOS):
    """CondInst instance segmentation. Train mode → FCOS losses + ``loss_mask`` (dice); eval mode → FCOS detections
    with ``masks`` (``N×H×W`` bool at the input image size)."""

    #: training reads the instance masks
    needs_masks = True

    def __init__(self, cfg: Optional[CondInstConfig] = None, num_classes: int = 80):
        cfg = cfg if cfg is not None else CondInstConfig()
        super().__init__(cfg, num_classes)
        missing = [f for f in cfg.mask_branch_in_features if f not in cfg.in_features]
        if missing:
            raise ValueError(f"mask branch features {missing} are not among the FPN outputs {cfg.in_features}")
        self.mask_in_indices = [cfg.in_features.index(f) for f in cfg.mask_branch_in_features]
        self.mask_branch = MaskBranch(self.backbone.out_channels,
                                      [level_stride(f) for f in cfg.mask_branch_in_features],
                                      cfg.mask_branch_channels, cfg.mask_branch_num_convs,
                                      cfg.mask_branch_out_channels, cfg.mask_branch_norm)
        # Controller: 3×3 conv on the box tower, N(0, 0.01) weights, zero bias (AdelaiDet
        # adet/modeling/condinst/condinst.py).
        self.controller = nn.Conv2d(self.backbone.out_channels, cfg.num_dynamic_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)
        # Size of interest per FPN level used to normalise relative coordinates: 64, 128, ..., 1024 (P3–P7).
        soi = [float(s) for s in cfg.sizes_of_interest] + [float(cfg.sizes_of_interest[-1]) * 2]
        self.register_buffer("level_soi", torch.tensor(soi[: len(self.strides)]), persistent=False)
        self.use_reference_ops = False  # force the plain-PyTorch dynamic head even on CUDA

    # -- pieces -------------------------------------------------------------------------------------------------
    @property
    def mask_out_stride(self) -> int:
        return self.mask_branch.out_stride // self.cfg.mask_upsample_factor

    def controller_params(self, head_out: FCOSHeadOutputs) -> Tensor:
        """``B×L×P`` dynamic parameters at every location (``flatten_levels`` order)."""
        return flatten_levels([self.controller(t) for t in head_out.bbox_towers])

    def mask_logits(self, mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor,
                    fpn_levels: Tensor) -> Tensor:
        """Run every instance's dynamic head at once, then upsample: ``N×(f·h)×(f·w)`` logits at stride
        ``mask_out_stride`` of the padded batch."""
        c = self.cfg
        logits = dynamic_mask_head(mask_feats, params, im_inds, locations, self.level_soi[fpn_levels],
                                   self.mask_branch.out_stride, c.mask_head_width, c.mask_head_depth, c.rel_coords,
                                   **({"force_reference": True} if self.use_reference_ops else {}))
        return aligned_bilinear(logits, c.mask_upsample_factor)

    # -- training -----------------------------------------------------------------------------------------------
    def mask_loss(self, mask_feats: Tensor, params: Tensor, positives: FCOSPositives, locations: Sequence[Tensor],
                  targets: Sequence[dict], padded_size: tuple) -> Tensor:
        """Dice loss (eq. 3, mean over instances, weight 1) of the FCOS positives' masks (a random subset of at
        most ``max_proposals``) against their ground-truth masks sampled at the output stride."""
        assigned, pos_inds = positives.targets, positives.pos_inds
        num_locations = params.shape[1]
        if self.cfg.max_proposals > 0 and pos_inds.numel() > self.cfg.max_proposals:
            pick = torch.randperm(pos_inds.numel(), device=pos_inds.device)[: self.cfg.max_proposals]
            pos_inds = pos_inds[pick]
        flat_params = params.reshape(-1, params.shape[-1])
        if pos_inds.numel() == 0:  # zero loss still connected to the graph (DDP needs every parameter used)
            return flat_params.sum() * 0 + mask_feats.sum() * 0
        im_inds = torch.div(pos_inds, num_locations, rounding_mode="floor")
        loc_inds = pos_inds % num_locations
        all_locations = torch.cat(list(locations))
        logits = self.mask_logits(mask_feats, flat_params[pos_inds], im_inds, all_locations[loc_inds],
                                  assigned.fpn_levels[loc_inds])
        gt = self._padded_gt_masks(targets, padded_size, logits.device)
        gt = sample_gt_masks(gt, self.mask_out_stride)[assigned.gt_inds.reshape(-1)[pos_inds]]
        gt = gt[:, : logits.shape[-2], : logits.shape[-1]]
        return dice_loss(logits.sigmoid(), gt).mean()

    @staticmethod
    def _padded_gt_masks(targets: Sequence[dict], padded_size: tuple, device) -> Tensor:
        h, w = padded_size
        out = []
        for t in targets:
            if "masks" not in t:
                raise ValueError("CondInst needs targets[i]['masks'] (N×H×W) for training")
            m = t["masks"].to(device)
            if m.shape[0] != t["boxes"].shape[0]:
                raise ValueError(f"{m.shape[0]} masks for {t['boxes'].shape[0]} boxes")
            out.append(F.pad(m.float(), (0, w - m.shape[-1], 0, h - m.shape[-2])))
        return torch.cat(out) if out else torch.zeros(0, h, w, device=device)

    # -- inference ----------------------------------------------------------------------------------------------
    def detect(self, parts: ForwardParts, with_origin: bool = False) -> List[dict]:
        """FCOS detections (box NMS, §2.4) → each one's dynamic head on F_mask → masks at the input size. With
        ``mask_nms`` no box NMS: every candidate gets a mask, then NMS on the masks (§3.5). ``with_origin`` keeps
        ``location_inds``, ``fpn_levels``, ``locations`` and adds ``params`` (``N×P``, the detection's head)."""
        c = self.cfg
        head_out, locations, image_sizes = parts.head, parts.locations, parts.image_sizes
        mask_feats, params = parts.mask_inputs["mask_feats"], parts.mask_inputs["params"]
        if c.mask_nms:
            dets = self._candidates(head_out, locations, image_sizes)
        else:
            dets = self.postprocess(head_out, locations, image_sizes, return_indices=True)
        results = []
        for i, det in enumerate(dets):
            inds, levels, points = det["location_inds"], det["fpn_levels"], det["locations"]
            det["params"] = params[i][inds]
            logits = self.mask_logits(mask_feats, det["params"], torch.full_like(inds, i), points, levels)
            probs = logits.sigmoid()
            if c.mask_nms:
                keep = greedy_mask_nms(probs > c.mask_threshold, det["scores"], det["labels"], c.mask_nms_thresh)
                keep = keep[: c.detections_per_img]
                det = {k: v[keep] for k, v in det.items()}
                probs = probs[keep]
            det["masks"] = self.paste_masks(probs, image_sizes[i], parts.canvas_hw)
            if not with_origin:
                for k in ("location_inds", "fpn_levels", "locations", "params"):
                    det.pop(k)
            results.append(det)
        return results

    def _candidates(self, head_out, locations, image_sizes) -> List[dict]:
        """Pre-NMS candidates (FCOS thresholding and per-level top-k, no suppression), best first."""
        from onestage.modeling.fcos import postprocess, postprocess_kwargs

        return postprocess(head_out, locations, self.strides, image_sizes, **postprocess_kwargs(
            self.cfg, nms_thresh=1.0, detections_per_img=self.cfg.mask_nms_max_candidates, return_indices=True))

    def paste_masks(self, probs: Tensor, image_size: tuple, padded_size: tuple) -> Tensor:
        """Probabilities at the output stride → boolean masks at the input size: aligned upsampling to stride 1 of the
        padded batch, crop to the image (AdelaiDet inference, ``postprocess`` in
        ``adet/modeling/condinst/condinst.py``)."""
        h, w = image_size
        if probs.shape[0] == 0:
            return torch.zeros(0, h, w, dtype=torch.bool, device=probs.device)
        full = aligned_bilinear(probs, self.mask_out_stride)[:, :h, :w]
        return full > self.cfg.mask_threshold

    # -- forward ------------------------------------------------------------------------------------------------
    def fp32_layers(self) -> tuple:
        """FCOS's prediction layers plus the controller (the dynamic heads' parameters) and F_mask's last conv."""
        return super().fp32_layers() + ("controller", "mask_branch.out")

    def forward_parts(self, images: Sequence[Tensor]) -> ForwardParts:
        """FCOS's parts, and the mask inputs: ``mask_feats`` (F_mask, ``B×Cmask×h×w`` at the mask branch's stride)
        and ``params`` (``B×L×P``, the controller's dynamic head at every location)."""
        parts = super().forward_parts(images)
        feats = parts.feature_list
        parts.mask_inputs = {"mask_feats": self.mask_branch([feats[i] for i in self.mask_in_indices]),
                             "params": self.controller_params(parts.head)}
        return parts

    def losses_from_parts(self, parts: ForwardParts, targets: Sequence[dict]) -> dict:
        # center sampling around each instance's mask centre of mass, not its box centre (AdelaiDet passes the
        # masks to FCOS's get_sample_region, which then uses their centroids)
        targets = [{**t, "centers": mask_centers(t["masks"], t["boxes"])} if "centers" not in t else t
                   for t in targets]
        losses, positives = self.losses_and_positives(parts.head, parts.locations, targets)
        losses["loss_mask"] = self.mask_loss(parts.mask_inputs["mask_feats"], parts.mask_inputs["params"], positives,
                                             parts.locations, targets, parts.canvas_hw)
        return losses
