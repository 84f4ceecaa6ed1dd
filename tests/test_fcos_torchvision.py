"""Oracle: torchvision's ``fcos_resnet50_fpn`` (written by others) against our FCOS.

Same (random) weights → same backbone/FPN features and same head outputs. On the same head outputs, images and
targets, torchvision's matching and losses agree with ours where the two implementations mean the same thing.
Documented paper-vs-torchvision differences, made equal here by construction:

* **locations**: torchvision's anchor centres are ``x·s`` (AnchorGenerator), ours ``x·s + ⌊s/2⌋`` (AdelaiDet);
  we feed torchvision's points to our ``assign_targets`` for the comparison.
* **scale ranges**: torchvision tests ``4s < max(ltrb) < 8s`` strictly, AdelaiDet ``lo ≤ max ≤ hi``; boxes here
  avoid exact boundary values. Center sampling is equivalent (``|Δ| < 1.5s`` and inside the box = the centre box
  clipped to the GT box with a strict test).
* **box loss**: torchvision sums plain GIoU over positives / #pos; AdelaiDet weights by the center-ness target,
  divides by Σ ctr targets and smooths IoU with +1. ``iou_loss_ltrb(..., weight=None, smooth=0) / #pos`` is
  torchvision's number, checked below.
* **no per-level Scale** in torchvision (ours init 1 → identical outputs at init), score threshold 0.2 (ours 0.05).
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

from onestage.modeling.fcos import (FCOS, FCOSConfig, FCOSHead, assign_targets, compute_locations, fcos_losses,
                                    flatten_levels)
from onestage.modeling.losses import iou_loss_ltrb

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    m = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    return m.eval()


def _copy_head(tv_head, ours: FCOSHead):
    mapping = {"classification_head.conv.": "cls_tower.", "classification_head.cls_logits.": "cls_logits.",
               "regression_head.conv.": "bbox_tower.", "regression_head.bbox_reg.": "bbox_pred.",
               "regression_head.bbox_ctrness.": "ctrness."}
    state = {}
    for k, v in tv_head.state_dict().items():
        prefix = next(p for p in mapping if k.startswith(p))
        state[mapping[prefix] + k[len(prefix):]] = v
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("scales.") for k in missing)


def _our_model(tv_model):
    """Our paper-preset FCOS with trainable BN (torchvision's BN without pretrained weights) and its weights."""
    cfg = FCOSConfig.preset("paper")
    cfg.backbone_norm, cfg.freeze_at = "bn", 0
    ours = FCOS(cfg, num_classes=NUM_CLASSES).eval()
    body = {k[len("body."):]: v for k, v in tv_model.backbone.state_dict().items() if k.startswith("body.")}
    ours.backbone.body.load_state_dict(body)
    fpn = {}
    for k, v in tv_model.backbone.fpn.state_dict().items():
        i, rest = k.split(".")[1], k.split(".", 3)[-1]
        if k.startswith("inner_blocks."):
            fpn[f"lateral.p{int(i) + 3}.{rest}"] = v
        elif k.startswith("layer_blocks."):
            fpn[f"output.p{int(i) + 3}.{rest}"] = v
        else:  # extra_blocks.p6.weight → p6.weight
            fpn[k[len("extra_blocks."):]] = v
    ours.backbone.fpn.load_state_dict(fpn)
    _copy_head(tv_model.head, ours.head)
    return ours


def _inputs():
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 256, 224, generator=g), torch.rand(3, 224, 256, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.3, 20.7, 60.1, 90.9], [30.2, 25.6, 210.4, 240.3], [100.5, 100.2, 130.7, 150.1]]),
         "labels": torch.tensor([1, 3, 0])},
        {"boxes": torch.tensor([[5.5, 8.25, 250.5, 215.5], [40.3, 40.4, 70.9, 58.2]]), "labels": torch.tensor([4, 2])},
    ]
    return images, targets


def test_features_and_head_match_torchvision(tv_model):
    ours = _our_model(tv_model)
    images, _ = _inputs()
    with torch.no_grad():
        batch, _ = ours.preprocess(images)
        tv_feats = list(tv_model.backbone(batch).values())
        our_feats = ours.features(batch)
        assert len(tv_feats) == len(our_feats) == 5
        for a, b in zip(our_feats, tv_feats):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        tv_out = tv_model.head(tv_feats)
        out = ours.head(tv_feats)
    torch.testing.assert_close(flatten_levels(out.logits), tv_out["cls_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flatten_levels(out.bbox_reg), tv_out["bbox_regression"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flatten_levels(out.ctrness), tv_out["bbox_ctrness"], rtol=1e-4, atol=1e-5)


def test_assignment_and_losses_match_torchvision_compute_loss(tv_model):
    torch.manual_seed(1)
    head = FCOSHead(256, NUM_CLASSES)
    _copy_head(tv_model.head, head)
    with torch.no_grad():  # make the predictions less trivial than the N(0, 0.01) init
        head.bbox_pred.bias.fill_(1.5)
        head.ctrness.bias.fill_(0.3)
    images, targets = _inputs()
    batch = torch.stack(images[:1] * 2)  # same padded size for both; targets differ per image
    feats = [torch.randn(2, 256, -(-256 // s), -(-224 // s)) for s in (8, 16, 32, 64, 128)]
    head_out = head(feats)
    tv_head_out = {"cls_logits": flatten_levels(head_out.logits), "bbox_regression": flatten_levels(head_out.bbox_reg),
                   "bbox_ctrness": flatten_levels(head_out.ctrness)}
    anchors = tv_model.anchor_generator(ImageList(batch, [(256, 224)] * 2), feats)
    num_per_level = [f.shape[-2] * f.shape[-1] for f in feats]

    captured = {}
    original = tv_model.head.compute_loss

    def capture(targets_, head_outputs_, anchors_, matched_idxs_):
        captured["matched"] = matched_idxs_
        return original(targets_, head_outputs_, anchors_, matched_idxs_)

    tv_model.head.compute_loss = capture
    try:
        tv_losses = tv_model.compute_loss(targets, tv_head_out, anchors, num_per_level)
    finally:
        del tv_model.head.compute_loss

    # torchvision's points are the anchor centres x·s (ours would be x·s + s//2)
    centres = (anchors[0][:, :2] + anchors[0][:, 2:]) / 2
    locations = list(centres.split(num_per_level))
    assert torch.equal(locations[1][1], torch.tensor([16.0, 0.0]))
    assert torch.equal(compute_locations(feats, [8, 16, 32, 64, 128])[1][1], torch.tensor([24.0, 8.0]))
    assigned = assign_targets(locations, targets, NUM_CLASSES)

    for i, matched in enumerate(captured["matched"]):
        ours_local = torch.where(assigned.gt_inds[i] >= 0, assigned.gt_inds[i] - (3 if i else 0), -1)
        assert torch.equal(ours_local, matched)
    assert (assigned.labels != NUM_CLASSES).sum() > 20
    assert len(set(assigned.fpn_levels[assigned.labels[0] != NUM_CLASSES].tolist())) >= 3

    losses, positives = fcos_losses(head_out, assigned, NUM_CLASSES, iou_smooth=0.0)
    torch.testing.assert_close(losses["loss_cls"], tv_losses["classification"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss_ctr"], tv_losses["bbox_ctrness"], rtol=1e-5, atol=1e-6)
    pos = positives.pos_inds
    plain_giou = iou_loss_ltrb(positives.bbox_reg[pos], assigned.reg_targets.reshape(-1, 4)[pos], None, "giou",
                               smooth=0.0) / positives.num_pos_avg
    torch.testing.assert_close(plain_giou, tv_losses["bbox_regression"], rtol=1e-4, atol=1e-5)
    # ... and AdelaiDet's center-ness-weighted, smoothed version is a different number
    assert not torch.allclose(losses["loss_box_reg"], tv_losses["bbox_regression"], rtol=1e-2)


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_paper_preset_parameter_count_vs_torchvision():
    """torchvision's fcos_resnet50_fpn(num_classes=91) has 32,322,720 parameters. Ours, same classes:

    * with trainable BN (``backbone_norm="bn"``, ``freeze_at=0``): exactly 5 more — the per-level Scale scalars torchvision omits;
    * ``paper`` preset (FrozenBN, as AdelaiDet/d2 with an ImageNet checkpoint): FrozenBatchNorm2d keeps γ/β as
      buffers, so the 2 × 26,560 = 53,120 BN affine values of the R-50 body are not parameters → 32,269,605.
    """
    torch.manual_seed(0)
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    n_tv = _num_params(tv)
    assert n_tv == 32_322_720
    bn_affine = sum(_num_params(m) for m in tv.backbone.body.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn_affine == 53_120
    del tv
    paper = FCOS(FCOSConfig.preset("paper"), num_classes=91)
    assert _num_params(paper) == n_tv - bn_affine + 5 == 32_269_605
    del paper
    cfg = FCOSConfig.preset("paper")
    cfg.backbone_norm, cfg.freeze_at = "bn", 0  # freeze_at 2 would turn stem/res2 BNs into FrozenBN buffers
    assert _num_params(FCOS(cfg, num_classes=91)) == n_tv + 5
