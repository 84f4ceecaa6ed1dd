"""BlendMask: Top-Down Meets Bottom-Up for Instance Segmentation (Chen et al., arXiv 2001.00309), read top to bottom.

BlendMask is FCOS (``onestage.modeling.fcos``) plus a mask branch of three parts (paper §3.1, Fig. 2):

1. ``BlendMaskConfig`` — the published configuration (AdelaiDet ``MODEL.BLENDMASK.*`` / ``MODEL.BASIS_MODULE.*``,
   ``adet/config/defaults.py``) and the ``paper`` / ``cpu`` / ``smoke`` presets.
2. ``BasisModule`` — the **bottom module**: ``K`` bases at stride 4 from P3–P5 (refine, upsample, sum, conv tower,
   ×2 upsample), with the optional auxiliary "thing" semantic segmentation loss (AdelaiDet
   ``adet/modeling/blendmask/basis_module.py``).
3. The **top layer** — one 3×3 conv on every level's box tower giving each location a ``K×M×M`` attention.
4. The **blender** — RoIAlign of the bases to ``R×R`` per instance (ground-truth boxes in training, detected boxes
   at inference), attention interpolated to ``R×R``, softmax over ``K``, weighted sum (``onestage.ops.blender``).
5. ``mask_targets`` / ``blendmask_mask_loss`` — ground-truth masks cropped and resized to each box, per-pixel BCE
   weighted by the FCOS center-ness target and divided by FCOS's ``loss_denorm`` (AdelaiDet
   ``adet/modeling/blendmask/blender.py``).
6. ``paste_masks`` — the ``R×R`` mask probabilities pasted into the image (detectron2 ``paste_masks_in_image``).
7. ``BlendMask`` — the ``FCOS`` subclass tying them together.

The blender's generalisations (paper §4.1, Table 1: "the blender with 1 × 1 top-level resolution degenerates to
YOLACT; and FCIS is the case where we use fixed one-hot blending attentions and nearest neighbour top-level
interpolation") are configurations of the same model: ``blender="yolact"`` (attention ``K×1×1``: one coefficient per
basis) and ``blender="fcis"`` (no attention is predicted; ``K = M²`` bases, basis ``i·M + j`` fills tile ``(i, j)``),
each trainable and usable at inference.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from onestage.modeling.backbone import level_stride
from onestage.modeling.fcos import FCOS, FCOSConfig, FCOSPositives, flatten_levels
from onestage.modeling.parts import ForwardParts
from onestage.ops.blender import INTERPOLATIONS, blend, fcis_attention

__all__ = [
    "BlendMaskConfig",
    "BlendMask",
    "BasisModule",
    "BLENDER_MODES",
    "pool_bases",
    "mask_targets",
    "thing_semantic_targets",
    "blendmask_mask_loss",
    "paste_masks",
]

BLENDER_MODES = ("blender", "yolact", "fcis")
BOTTOM_POOLERS = ("roi_align", "roi_pool")


# ---------------------------------------------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BlendMaskConfig(FCOSConfig):
    """FCOS's fields (``FCOSConfig``) plus the mask branch. Defaults are the published BlendMask R-50 configuration
    (AdelaiDet ``configs/BlendMask/Base-BlendMask.yaml`` on top of ``MODEL.BLENDMASK.*`` / ``MODEL.BASIS_MODULE.*``
    defaults in ``adet/config/defaults.py``), with the two FCOS overrides of Base-BlendMask:
    ``thresh_with_ctr=True`` and ``use_scale=False``.

    Names of the knobs of the paper's ablations (§3.3 "Configurations and baselines", Tables 1–6): ``num_bases``
    (K), ``attn_size`` (M), ``bottom_resolution`` (R), ``top_interp`` (attention interpolation), ``bottom_pooler``
    (bilinear RoIAlign vs RoIPool), ``blender`` (blender / YOLACT / FCIS merging).
    """

    # FCOS overrides of AdelaiDet configs/BlendMask/Base-BlendMask.yaml
    thresh_with_ctr: bool = True
    use_scale: bool = False
    # --- bottom module (BASIS_MODULE.*; ProtoNet of AdelaiDet adet/modeling/blendmask/basis_module.py) ---
    num_bases: int = 4                          # K (NUM_BASES; paper Table 3: 4 is enough)
    basis_in_features: tuple = ("p3", "p4", "p5")
    basis_channels: int = 128                   # CONVS_DIM
    basis_num_convs: int = 3                    # NUM_CONVS (2 in the 550/RT configs)
    basis_norm: str = "BN"                      # "BN" (AdelaiDet: SyncBN; convert for multi-GPU), "GN", "none"
    basis_loss_on: bool = True                  # LOSS_ON: True in Base-BlendMask.yaml (auxiliary semantic loss)
    basis_loss_weight: float = 0.3              # LOSS_WEIGHT
    # --- top layer (BLENDMASK.ATTN_SIZE) ---
    attn_size: int = 14                         # M
    # --- blender (BLENDMASK.*) ---
    bottom_resolution: int = 56                 # R (BOTTOM_RESOLUTION)
    bottom_pooler: str = "roi_align"            # ROIAlignV2 (aligned, sampling ratio 1); "roi_pool" = Table 6 "nearest"
    top_interp: str = "bilinear"                # TOP_INTERP; the paper's early ablations use "nearest"
    attn_normalize: str = "softmax"             # "sigmoid" for the one-basis model of Table 3
    blender: str = "blender"                    # "blender" | "yolact" (M = 1) | "fcis" (fixed one-hot, nearest)
    instance_loss_weight: float = 1.0           # INSTANCE_LOSS_WEIGHT
    mask_thresh: float = 0.5                    # paste threshold (detectron2 paste_masks_in_image)

    INFERENCE_ONLY: ClassVar[tuple] = FCOSConfig.INFERENCE_ONLY + ("mask_thresh",)

    def __post_init__(self):
        if self.blender not in BLENDER_MODES:
            raise ValueError(f"blender must be one of {BLENDER_MODES}, got {self.blender!r}")
        if self.bottom_pooler not in BOTTOM_POOLERS:
            raise ValueError(f"bottom_pooler must be one of {BOTTOM_POOLERS}, got {self.bottom_pooler!r}")
        if self.top_interp not in INTERPOLATIONS:
            raise ValueError(f"top_interp must be one of {INTERPOLATIONS}, got {self.top_interp!r}")
        if self.attn_normalize not in ("softmax", "sigmoid"):
            raise ValueError(f"attn_normalize must be 'softmax' or 'sigmoid', got {self.attn_normalize!r}")
        if self.num_bases < 1 or self.attn_size < 1 or self.bottom_resolution < 1:
            raise ValueError("num_bases, attn_size and bottom_resolution must be positive")
        if self.blender != "fcis" and self.num_bases == 1 and self.attn_normalize == "softmax":
            raise ValueError("a softmax over one basis is the constant 1; the one-basis model of BlendMask Table 3 "
                             "uses attn_normalize='sigmoid'")
        if self.attn_normalize == "sigmoid" and self.num_bases != 1:
            raise ValueError("attn_normalize='sigmoid' is the one-basis variant (BlendMask Table 3): num_bases=1")
        if self.blender == "fcis" and self.num_bases != self.attn_size ** 2:
            raise ValueError(f"blender='fcis' assembles an M×M grid of crops from K = M² bases; got num_bases="
                             f"{self.num_bases}, attn_size={self.attn_size} (e.g. num_bases=16, attn_size=4 as in "
                             "BlendMask Table 1)")
        missing = [f for f in self.basis_in_features if f not in self.in_features]
        if missing:
            raise ValueError(f"basis_in_features {missing} are not among the FPN levels {self.in_features}")

    @property
    def effective_attn_size(self) -> int:
        """Attention resolution the top layer predicts: 1 for YOLACT, ``attn_size`` otherwise."""
        return 1 if self.blender == "yolact" else self.attn_size

    @property
    def effective_top_interp(self) -> str:
        return "nearest" if self.blender == "fcis" else self.top_interp

    @property
    def basis_stride(self) -> int:
        """Stride of the bases: the first bottom input's stride, halved by the tower's ×2 upsampling (8 → 4)."""
        return level_stride(self.basis_in_features[0]) // 2

    @classmethod
    def preset(cls, name: str) -> "BlendMaskConfig":
        """``paper``: BlendMask R-50 as published. ``cpu``: the FCOS ``cpu`` preset's backbone and head with a
        smaller bottom module (64 channels, 2 convs, as light as the 550/RT configs' tower depth) and attention size
        M = 7 instead of 14. ``smoke``: tiny. K, R and every algorithmic choice stay the paper's in every preset.

        Why M = 7 at ``cpu``: the top layer is a 3×3 conv to K·M² channels, 0.9 M parameters at M = 14 on the 128-ch
        tower — alone it would push the shipped fp16 checkpoint past its 10 MB budget (10.9 MiB); M = 7 makes it
        0.23 M. At the preset's 320-px inputs objects are ~2.5× smaller than at 800 px, so 7×7 attention cells cover
        about as many pixels as 14×14 do in the paper, and M is an ablated capacity knob (paper Table 2, override
        ``attn_size``), not a change of algorithm."""
        base = super().preset(name)  # FCOSConfig.preset builds cls(...), so this is a BlendMaskConfig
        if name == "paper":
            return base
        if name == "cpu":
            return dataclasses.replace(base, basis_channels=64, basis_num_convs=2, attn_size=7)
        return dataclasses.replace(base, basis_channels=16, basis_num_convs=1)


# ---------------------------------------------------------------------------------------------------------------
# 2. Bottom module
# ---------------------------------------------------------------------------------------------------------------

def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"basis_norm must be 'BN', 'GN' or 'none', got {kind!r}")


def _conv_block(cin: int, cout: int, norm: str) -> nn.Sequential:
    """3×3 conv → norm → ReLU, initialised like AdelaiDet's ``conv_with_kaiming_uniform``: kaiming_uniform(a=1),
    a bias only when there is no norm."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none")
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0)
    return nn.Sequential(conv, _norm(norm, cout), nn.ReLU())


class BasisModule(nn.Module):
    """The bottom module (YOLACT's ProtoNet on FPN features, as AdelaiDet's ``ProtoNet`` in
    ``adet/modeling/blendmask/basis_module.py``):

    * refine P3, P4, P5 each with a 3×3 conv → norm → ReLU to ``channels``, upsample P4/P5 bilinearly
      (``align_corners=False``) to P3's size and **sum**;
    * tower: ``num_convs`` × (3×3, norm, ReLU) → ×2 bilinear upsample → 3×3, norm, ReLU → 1×1 conv to ``K`` bases,
      so the bases sit at stride 4;
    * with ``loss_on``, an auxiliary semantic head on P3 (conv-norm-ReLU ×2, then 1×1 to ``num_classes + 1``;
      class 0 = background) trained with cross-entropy against the "thing" map at stride 8 (§4.1 "Other
      improvements": "+semantic", Table 7).

    ``forward(features dict)`` → ``(bases B×K×H/4×W/4, semantic logits B×(C+1)×H/8×W/8 or None)``.
    """

    def __init__(self, in_channels: int, num_bases: int, in_features: Sequence[str], channels: int = 128,
                 num_convs: int = 3, norm: str = "BN", loss_on: bool = True, num_classes: int = 80):
        super().__init__()
        self.in_features = tuple(in_features)
        self.refine = nn.ModuleList([_conv_block(in_channels, channels, norm) for _ in self.in_features])
        tower = [_conv_block(channels, channels, norm) for _ in range(num_convs)]
        tower += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                  _conv_block(channels, channels, norm), nn.Conv2d(channels, num_bases, 1)]
        self.tower = nn.Sequential(*tower)
        self.seg_head = None
        if loss_on:
            self.seg_head = nn.Sequential(_conv_block(in_channels, channels, norm),
                                          _conv_block(channels, channels, norm),
                                          nn.Conv2d(channels, num_classes + 1, 1))

    def forward(self, features: dict):
        x = None
        for name, refine in zip(self.in_features, self.refine):
            y = refine(features[name])
            if x is None:
                x = y
            else:
                x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        bases = self.tower(x)
        sem = self.seg_head(features[self.in_features[0]]) if self.seg_head is not None and self.training else None
        return bases, sem


# ---------------------------------------------------------------------------------------------------------------
# 3./4. Pooling the bases, targets, loss
# ---------------------------------------------------------------------------------------------------------------

def pool_bases(bases: Tensor, boxes: Sequence[Tensor], resolution: int, stride: int,
               pooler: str = "roi_align") -> Tensor:
    """Crop every image's boxes (``xyxy`` input pixels) out of its bases and resize to ``resolution²``.

    ``roi_align``: torchvision ``roi_align(aligned=True, sampling_ratio=1)`` — AdelaiDet's ROIAlignV2 with one
    sampling point per bin (paper §3.2: "we use sampling ratio 1 for RoIAlign"); ``aligned=True`` shifts the box by
    half a pixel so that a box edge at pixel coordinate ``x`` samples the bases at ``x/stride − 0.5``, the
    continuous coordinate of pixel centres. ``roi_pool``: Fast R-CNN's quantised RoIPool (Table 6 "nearest").
    Returns ``ΣN×K×R×R`` in the order of the boxes, image after image, in the dtype of ``bases``.

    Both poolers compute in fp32, with the box coordinates in fp32, whatever the dtype of the bases — under bf16
    autocast the bases arrive in bf16, and rounding the boxes to bf16 would move a coordinate near 200 px by up to
    half a pixel; torchvision's CPU RoIPool has no bf16 kernel at all. This is what the reference does under mixed
    precision (detectron2's ``ROIPooler`` passes the fp32 boxes as they are, and torchvision's autocast wrapper of
    ``roi_align`` computes in fp32); RoIPool selects values, so its bf16 result is exact.
    """
    boxes = [b.to(torch.float32) for b in boxes]
    # full_like, not new_full(len(b)): the batch index column stays traceable for the ONNX export
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1)
                      for i, b in enumerate(boxes)]) if len(boxes) else bases.new_zeros((0, 5), dtype=torch.float32)
    x = bases.to(torch.float32)
    if pooler == "roi_pool":
        out = roi_pool(x, rois, output_size=resolution, spatial_scale=1.0 / stride)
    else:
        out = roi_align(x, rois, output_size=resolution, spatial_scale=1.0 / stride, sampling_ratio=1, aligned=True)
    return out.to(bases.dtype)


def mask_targets(masks: Tensor, boxes: Tensor, resolution: int) -> Tensor:
    """Ground-truth masks ``N×H×W`` cropped to their boxes and resized to ``N×R×R`` in {0, 1} (detectron2
    ``BitMasks.crop_and_resize``: RoIAlign of the mask as a float image, aligned, then ``≥ 0.5``)."""
    if len(boxes) == 0:
        return masks.new_zeros((0, resolution, resolution), dtype=torch.float32)
    m = masks[:, None].to(torch.float32)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=torch.float32)[:, None],
                      boxes.to(torch.float32)], dim=1)
    out = roi_align(m, rois, output_size=resolution, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (out[:, 0] >= 0.5).to(torch.float32)


def thing_semantic_targets(targets: Sequence[dict], height: int, width: int, stride: int) -> Tensor:
    """The auxiliary loss's target: per image a ``(height/stride)×(width/stride)`` map of ``label + 1`` under each
    instance mask, 0 for background and padding (AdelaiDet ``prepare_thing_sem_from_instance``, then the nearest
    1/8 downsampling of the basis module: the top-left pixel of each ``stride×stride`` block). Instances are
    painted in annotation order, so where masks overlap the *later* annotation wins: that script paints them so
    (``output[mask == 1] = category + 1`` for each annotation in turn), and BlendMask was trained on its output.
    (Painting large instances first would let the occluding, usually smaller one win — arguably a better target,
    but not the published one.)"""
    maps = []
    for tgt in targets:
        masks = tgt["masks"]
        sem = torch.zeros((height, width), dtype=torch.long, device=masks.device)
        if len(masks):
            h, w = masks.shape[-2:]
            region = sem[:h, :w]
            for i in range(len(masks)):
                region[masks[i].bool()] = int(tgt["labels"][i]) + 1
        maps.append(sem[::stride, ::stride])
    return torch.stack(maps)


def blendmask_mask_loss(mask_logits: Tensor, gt_masks: Tensor, ctr_targets: Tensor, loss_denorm: float) -> Tensor:
    """AdelaiDet ``Blender.__call__`` (``adet/modeling/blendmask/blender.py``): per-pixel BCE-with-logits, mean over the
    ``R²`` pixels of each instance, weighted by that positive's center-ness target, summed, divided by FCOS's
    ``loss_denorm`` (Σ center-ness targets) — the same normalisation as the box loss, so central positives count
    most."""
    per_instance = F.binary_cross_entropy_with_logits(mask_logits, gt_masks, reduction="none").flatten(1).mean(1)
    return (per_instance * ctr_targets).sum() / loss_denorm


# ---------------------------------------------------------------------------------------------------------------
# 6. Pasting masks into the image
# ---------------------------------------------------------------------------------------------------------------

def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """``N×R×R`` mask probabilities → ``N×height×width`` bool, each resampled into its box (detectron2
    ``paste_masks_in_image``: pixel centre ``(x + 0.5, y + 0.5)`` mapped to the box's ``[-1, 1]`` grid,
    ``grid_sample`` with ``align_corners=False``, ``≥ threshold``; only the pixels of the box's integer bounding
    rectangle are computed, as detectron2 does on CPU)."""
    out = torch.zeros((len(masks), height, width), dtype=torch.bool, device=masks.device)
    for i, (mask, box) in enumerate(zip(masks, boxes.to(torch.float32))):
        x0, y0, x1, y1 = box.tolist()
        if x1 <= x0 or y1 <= y0:
            continue
        c0, r0 = max(int(x0), 0), max(int(y0), 0)
        c1, r1 = min(int(x1) + 1, width), min(int(y1) + 1, height)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = (torch.arange(c0, c1, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(r0, r1, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]
        pasted = F.grid_sample(mask[None, None].to(torch.float32), grid, mode="bilinear", align_corners=False)
        out[i, r0:r1, c0:c1] = pasted[0, 0] >= threshold
    return out


# ---------------------------------------------------------------------------------------------------------------
# 7. The model
# ---------------------------------------------------------------------------------------------------------------

class BlendMask(FCOS):
    """BlendMask. ``model(images, targets)`` in train mode → FCOS's losses + ``loss_mask`` (+ ``loss_basis_sem``);
    ``model(images)`` in eval mode → ``[{"boxes", "scores", "labels", "masks" N×H×W bool at the input size}]``.

    ``targets`` need ``masks`` (``N×H×W``, the image's size). Reuses FCOS's preprocessing, backbone, head, target
    assignment, losses and post-processing; adds the bottom module, the top layer and the blender.
    """

    #: training reads the instance masks
    needs_masks = True

    def __init__(self, cfg: Optional[BlendMaskConfig] = None, num_classes: int = 80):
        cfg = cfg if cfg is not None else BlendMaskConfig()
        super().__init__(cfg, num_classes)
        self.basis_module = BasisModule(self.backbone.out_channels, cfg.num_bases, cfg.basis_in_features,
                                        cfg.basis_channels, cfg.basis_num_convs, cfg.basis_norm, cfg.basis_loss_on,
                                        num_classes)
        self.top_layer = None
        if cfg.blender != "fcis":  # FCIS assembles with fixed attentions: nothing to predict
            m = cfg.effective_attn_size
            self.top_layer = nn.Conv2d(self.backbone.out_channels, cfg.num_bases * m * m, 3, padding=1)
            # N(0, 0.01) weights, bias 0, as in AdelaiDet adet/modeling/blendmask/blendmask.py
            nn.init.normal_(self.top_layer.weight, std=0.01)
            nn.init.constant_(self.top_layer.bias, 0)

    # --- pieces, public so notebooks and tests can look inside ---
    def top_attentions(self, bbox_towers: Sequence[Tensor]) -> Optional[Tensor]:
        """``B×L×(K·M·M)`` attentions for all locations (``flatten_levels`` order), or ``None`` for FCIS."""
        if self.top_layer is None:
            return None
        return flatten_levels([self.top_layer(t) for t in bbox_towers])

    def attention_maps(self, attns: Optional[Tensor], count: int, like: Tensor) -> Tensor:
        """Flat per-instance attentions ``N×(K·M·M)`` → ``N×K×M×M``; FCIS's fixed one-hot attention when ``None``."""
        c = self.cfg
        if attns is None:
            return fcis_attention(c.attn_size, count, like.device, like.dtype)
        m = c.effective_attn_size
        return attns.reshape(count, c.num_bases, m, m)

    def blend(self, bases_rois: Tensor, attn_maps: Tensor) -> Tensor:
        c = self.cfg
        normalize = "none" if c.blender == "fcis" else c.attn_normalize
        return blend(bases_rois, attn_maps, c.effective_top_interp, normalize)

    # --- training ---
    def mask_losses(self, bases: Tensor, sem_logits: Optional[Tensor], attns: Optional[Tensor],
                    positives: FCOSPositives, targets: Sequence[dict], padded_size: tuple) -> dict:
        c = self.cfg
        for t in targets:
            if "masks" not in t:
                raise ValueError("BlendMask needs instance masks in its targets (target['masks'] N×H×W)")
        losses = {}
        pos_inds = positives.pos_inds
        gt_inds = positives.targets.gt_inds.reshape(-1)[pos_inds]
        gt_boxes = [t["boxes"].to(bases.device, torch.float32).reshape(-1, 4) for t in targets]
        if pos_inds.numel() == 0:
            # zero, but connected to the bases and attentions, so every parameter gets a (zero) gradient (DDP)
            zero = bases.sum() * 0
            if attns is not None:
                zero = zero + attns.sum() * 0
            losses["loss_mask"] = zero
        else:
            # Pool every ground-truth box once, then index by each positive's box (AdelaiDet pools GT boxes, §3.2:
            # "during training, we simply use ground truth boxes as the proposals").
            rois = pool_bases(bases, gt_boxes, c.bottom_resolution, c.basis_stride, c.bottom_pooler)[gt_inds]
            flat_attn = attns.reshape(-1, attns.shape[-1])[pos_inds] if attns is not None else None
            logits = self.blend(rois, self.attention_maps(flat_attn, len(pos_inds), rois))
            gt = torch.cat([mask_targets(t["masks"].to(bases.device), b, c.bottom_resolution)
                            for t, b in zip(targets, gt_boxes)])[gt_inds]
            loss = blendmask_mask_loss(logits, gt, positives.ctr_targets, positives.loss_denorm)
            losses["loss_mask"] = c.instance_loss_weight * loss
        if sem_logits is not None:
            stride = level_stride(c.basis_in_features[0])
            sem_t = thing_semantic_targets([{k: v.to(bases.device) if torch.is_tensor(v) else v
                                             for k, v in t.items()} for t in targets], *padded_size, stride)
            sem_t = sem_t[:, : sem_logits.shape[-2], : sem_logits.shape[-1]]
            losses["loss_basis_sem"] = c.basis_loss_weight * F.cross_entropy(sem_logits, sem_t)
        return losses

    # --- inference ---
    def detect(self, parts: ForwardParts, with_origin: bool = False) -> List[dict]:
        """FCOS detections; each one's attention blended with the bases pooled in its *predicted* box, sigmoid,
        pasted into the image. ``with_origin`` keeps ``location_inds``, ``fpn_levels``, ``locations`` and adds
        ``attentions`` (``N×K×M×M``, FCIS's fixed one-hot ones for ``blender="fcis"``)."""
        c = self.cfg
        bases, attns = parts.mask_inputs["bases"], parts.mask_inputs["attentions"]
        out = []
        for i, det in enumerate(self.postprocess(parts.head, parts.locations, parts.image_sizes, return_indices=True)):
            h, w = parts.image_sizes[i]
            boxes = det["boxes"]
            flat = attns[i][det["location_inds"]] if attns is not None else None
            rois = pool_bases(bases[i: i + 1], [boxes], c.bottom_resolution, c.basis_stride, c.bottom_pooler)
            attn_maps = self.attention_maps(flat, len(boxes), rois)
            probs = self.blend(rois, attn_maps).sigmoid()
            if with_origin:
                det["attentions"] = attn_maps
            else:
                det = {k: v for k, v in det.items() if k not in ("location_inds", "fpn_levels", "locations")}
            det["masks"] = paste_masks(probs, boxes, h, w, c.mask_thresh)
            out.append(det)
        return out

    def fp32_layers(self) -> tuple:
        """FCOS's prediction layers plus the attentions' conv and the bases' last conv."""
        extra = ("top_layer",) if self.top_layer is not None else ()
        return super().fp32_layers() + extra + (f"basis_module.tower.{len(self.basis_module.tower) - 1}",)

    def forward_parts(self, images: Sequence[Tensor]) -> ForwardParts:
        """FCOS's parts, and the mask inputs: ``bases`` (``B×K×h×w`` at ``basis_stride``), ``sem_logits`` (the
        auxiliary semantic head's, ``None`` without it) and ``attentions`` (``B×L×(K·M·M)`` at every location,
        ``flatten_levels`` order; ``None`` for FCIS)."""
        parts = super().forward_parts(images)
        bases, sem_logits = self.basis_module(parts.features)
        parts.mask_inputs = {"bases": bases, "sem_logits": sem_logits,
                             "attentions": self.top_attentions(parts.head.bbox_towers)}
        return parts

    def losses_from_parts(self, parts: ForwardParts, targets: Sequence[dict]) -> dict:
        losses, positives = self.losses_and_positives(parts.head, parts.locations, targets)
        m = parts.mask_inputs
        losses.update(self.mask_losses(m["bases"], m["sem_logits"], m["attentions"], positives, targets,
                                       parts.canvas_hw))
        return losses
