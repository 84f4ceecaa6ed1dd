"""BlendMask: the blender on hand-made inputs, its YOLACT / FCIS special cases, RoI pooling geometry, targets, loss,
pasting, the config and presets, and the model end to end at the smoke preset."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from onestage.modeling.blendmask import (BlendMask, BlendMaskConfig, blendmask_mask_loss, mask_targets, paste_masks,
                                         pool_bases, thing_semantic_targets)
from onestage.ops.blender import blend, blend_reference, fcis_attention



# ------------------------------------------------------------------------------------------------------ blender
def test_one_hot_attention_reproduces_one_basis():
    torch.manual_seed(0)
    rois = torch.randn(3, 4, 8, 8)
    attn = torch.full((3, 4, 2, 2), -1e4)
    attn[0, 2], attn[1, 0], attn[2, 3] = 0, 0, 0  # after the softmax: one-hot on basis 2 / 0 / 3
    out = blend(rois, attn)
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out, torch.stack([rois[0, 2], rois[1, 0], rois[2, 3]]))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_uniform_attention_averages_the_bases(interpolation):
    rois = torch.randn(2, 4, 6, 6)
    attn = torch.full((2, 4, 3, 3), 0.7)  # any constant: softmax gives 1/K everywhere
    torch.testing.assert_close(blend(rois, attn, interpolation), rois.mean(1))


def test_blend_hand_computed_two_bases():
    # K = 2, M = 1, R = 1: logits = softmax([a0, a1]) · [r0, r1]
    rois = torch.tensor([[[[2.0]], [[-1.0]]]])
    attn = torch.tensor([[[[0.0]], [[torch.log(torch.tensor(3.0))]]]])  # weights 1/4, 3/4
    torch.testing.assert_close(blend(rois, attn), torch.tensor([[[2.0 / 4 - 3.0 / 4]]]))


def test_interpolation_comes_before_the_softmax():
    # bilinear interpolation then softmax differs from softmax then interpolation (AdelaiDet
    # adet/modeling/blendmask/blender.py interpolates first)
    torch.manual_seed(1)
    rois, attn = torch.randn(1, 3, 8, 8), 4 * torch.randn(1, 3, 2, 2)
    ours = blend_reference(rois, attn, "bilinear")
    expected = (F.interpolate(attn, (8, 8), mode="bilinear", align_corners=False).softmax(1) * rois).sum(1)
    wrong = (F.interpolate(attn.softmax(1), (8, 8), mode="bilinear", align_corners=False) * rois).sum(1)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, wrong, atol=1e-3)


def test_yolact_setting_is_a_weighted_sum_of_whole_crops():
    # BlendMask §4.1: attention 1×1 ⇒ one coefficient per basis for the whole RoI (YOLACT's linear combination)
    torch.manual_seed(2)
    rois, coeff = torch.randn(5, 4, 7, 7), torch.randn(5, 4, 1, 1)
    for interp in ("bilinear", "nearest"):
        out = blend(rois, coeff, interp)
        torch.testing.assert_close(out, torch.einsum("nk,nkhw->nhw", coeff.flatten(1).softmax(1), rois))


def test_fcis_setting_assembles_position_sensitive_tiles():
    # fixed one-hot attention + nearest interpolation: tile (i, j) of the RoI comes from basis i·g + j
    g, r = 3, 12
    torch.manual_seed(3)
    rois = torch.randn(2, g * g, r, r)
    out = blend(rois, fcis_attention(g, 2), interpolation="nearest", normalize="none")
    t = r // g
    expected = torch.empty(2, r, r)
    for i in range(g):
        for j in range(g):
            expected[:, i * t:(i + 1) * t, j * t:(j + 1) * t] = rois[:, i * g + j, i * t:(i + 1) * t, j * t:(j + 1) * t]
    torch.testing.assert_close(out, expected)
    assert fcis_attention(2).shape == (1, 4, 2, 2) and fcis_attention(2)[0, 1, 0, 1] == 1


def test_sigmoid_one_basis_variant():
    # BlendMask Table 3: with K = 1 the top and bottom go through sigmoids; the result is returned as a logit
    torch.manual_seed(4)
    rois, attn = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    out = blend(rois, attn, "nearest", "sigmoid")
    torch.testing.assert_close(out.sigmoid(), (attn.sigmoid() * rois.sigmoid())[:, 0], atol=1e-5, rtol=1e-4)
    saturated = blend(torch.full((1, 1, 2, 2), 50.0), torch.full((1, 1, 1, 1), 50.0), normalize="sigmoid")
    assert torch.isfinite(saturated).all() and (saturated > 10).all()
    with pytest.raises(ValueError, match="K = 1"):
        blend(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2), normalize="sigmoid")


def test_blend_shapes_empty_and_errors():
    assert blend(torch.zeros(0, 4, 56, 56), torch.zeros(0, 4, 14, 14)).shape == (0, 56, 56)
    with pytest.raises(ValueError, match="disagree"):
        blend(torch.zeros(2, 4, 8, 8), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="interpolation"):
        blend(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 2, 2), interpolation="bicubic")


def test_blend_gradients_reach_bases_and_attentions():
    rois = torch.randn(2, 4, 8, 8, requires_grad=True)
    attn = torch.randn(2, 4, 3, 3, requires_grad=True)
    blend(rois, attn).sum().backward()
    assert rois.grad.abs().sum() > 0 and attn.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ pooling
def test_roi_align_crop_of_a_basis_that_is_one_inside_the_box_is_all_ones():
    # bases at stride 4 over a 64×64 image; basis 0 is 1 exactly on the stride-4 cells inside the box (16, 8)-(48, 40)
    stride = 4
    bases = torch.zeros(1, 2, 16, 16)
    bases[0, 0, 8 // stride:40 // stride, 16 // stride:48 // stride] = 1
    box = torch.tensor([[16.0, 8.0, 48.0, 40.0]])
    crop = pool_bases(bases, [box], resolution=8, stride=stride)
    assert crop.shape == (1, 2, 8, 8)
    torch.testing.assert_close(crop[0, 0], torch.ones(8, 8))
    torch.testing.assert_close(crop[0, 1], torch.zeros(8, 8))
    # a box shifted by one cell sees the edge of the region: no longer all ones
    shifted = pool_bases(bases, [box + stride], resolution=8, stride=stride)
    assert shifted[0, 0].min() < 0.5


def test_pool_bases_indexes_the_right_image_and_roi_pool_option():
    bases = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 0.0, 8.0, 8.0]])]
    for pooler in ("roi_align", "roi_pool"):
        out = pool_bases(bases, boxes, resolution=4, stride=4, pooler=pooler)
        assert out.shape == (3, 1, 4, 4)
        assert out[0].abs().sum() == 0 and torch.allclose(out[1:], torch.ones(2, 1, 4, 4))


def test_pool_bases_under_cpu_bf16_autocast_pools_in_fp32_with_fp32_boxes():
    """The fast training path runs under bf16 autocast, where the bases arrive in bf16: both poolers must work (the
    CPU RoIPool kernel has no bf16) and equal fp32 pooling of the same bf16 values at the unrounded boxes, returned
    in bf16 — RoIPool exactly so, since it only selects values."""
    g = torch.Generator().manual_seed(0)
    bases = torch.rand(2, 4, 64, 64, generator=g).to(torch.bfloat16)
    # coordinates near 200 px are not representable in bf16 (spacing 1.0 there): rounding them would move the crop
    boxes = [torch.tensor([[3.3, 10.7, 200.7, 180.3]]), torch.tensor([[130.6, 2.2, 251.4, 201.6]])]
    for pooler in ("roi_align", "roi_pool"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pool_bases(bases, boxes, resolution=28, stride=4, pooler=pooler)
        assert out.dtype == torch.bfloat16
        ref = pool_bases(bases.float(), boxes, resolution=28, stride=4, pooler=pooler)
        torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)
        rounded = pool_bases(bases.float(), [b.to(torch.bfloat16).float() for b in boxes], resolution=28, stride=4,
                             pooler=pooler)
        assert not torch.equal(rounded, ref)  # the box rounding this avoids does change the crops


def test_mask_targets_crop_and_resize():
    masks = torch.zeros(2, 32, 32, dtype=torch.uint8)
    masks[0, 8:24, 8:16] = 1  # left half of its box (8, 8)-(24, 24) is the object
    masks[1, 0:16, 0:16] = 1
    boxes = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 16.0, 16.0]])
    t = mask_targets(masks, boxes, 4)
    torch.testing.assert_close(t[0], torch.tensor([[1.0, 1, 0, 0]] * 4))
    torch.testing.assert_close(t[1], torch.ones(4, 4))


def test_thing_semantic_targets_label_plus_one_at_stride():
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, :8, :8] = 1
    masks[1, 4:8, 4:8] = 1  # the later annotation: wins where both are set
    sem = thing_semantic_targets([{"masks": masks, "labels": torch.tensor([2, 5])}], 32, 32, stride=4)
    assert sem.shape == (1, 8, 8)
    assert sem[0, 0, 0] == 3 and sem[0, 1, 1] == 6 and sem[0, 0, 2] == 0 and sem[0, 5:, :].sum() == 0
    # annotation order decides overlaps, as AdelaiDet's prepare_thing_sem_from_instance: the later one wins even
    # when it is the larger
    flipped = thing_semantic_targets([{"masks": masks.flip(0), "labels": torch.tensor([5, 2])}], 32, 32, stride=4)
    assert flipped[0, 1, 1] == 3 and flipped[0, 0, 0] == 3


def test_mask_loss_is_centerness_weighted_bce_over_loss_denorm():
    logits = torch.tensor([[[0.0, 0.0]], [[2.0, -2.0]]])
    gt = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    ctr = torch.tensor([0.5, 1.0])
    bce0 = torch.log(torch.tensor(2.0))
    bce1 = F.softplus(torch.tensor(-2.0))
    expected = (0.5 * bce0 + 1.0 * bce1) / 1.5
    torch.testing.assert_close(blendmask_mask_loss(logits, gt, ctr, 1.5), expected)


def test_paste_masks_fills_the_box_at_input_size():
    probs = torch.zeros(2, 4, 4)
    probs[0] = 1.0
    probs[1, :, :2] = 1.0  # left half
    boxes = torch.tensor([[2.0, 3.0, 10.0, 7.0], [0.0, 0.0, 8.0, 8.0]])
    out = paste_masks(probs, boxes, 12, 16)
    assert out.shape == (2, 12, 16) and out.dtype == torch.bool
    expected = torch.zeros(12, 16, dtype=torch.bool)
    expected[3:7, 2:10] = True
    assert torch.equal(out[0], expected)
    assert out[1, :8, :4].all() and not out[1, :, 4:].any()
    assert paste_masks(torch.zeros(0, 4, 4), torch.zeros(0, 4), 5, 6).shape == (0, 5, 6)


# ------------------------------------------------------------------------------------------------------ config
def test_paper_preset_is_the_published_configuration():
    c = BlendMaskConfig.preset("paper")
    assert (c.num_bases, c.attn_size, c.bottom_resolution) == (4, 14, 56)
    # the FCOS overrides of AdelaiDet configs/BlendMask/Base-BlendMask.yaml
    assert c.thresh_with_ctr is True and c.use_scale is False
    assert c.top_interp == "bilinear" and c.bottom_pooler == "roi_align" and c.blender == "blender"
    assert (c.basis_channels, c.basis_num_convs, c.basis_in_features) == (128, 3, ("p3", "p4", "p5"))
    assert c.basis_loss_on and c.basis_loss_weight == 0.3 and c.instance_loss_weight == 1.0
    assert c.backbone == "resnet50" and c.basis_stride == 4


def test_presets_change_capacity_only():
    paper, cpu, smoke = (BlendMaskConfig.preset(n) for n in ("paper", "cpu", "smoke"))
    algo = ("num_bases", "bottom_resolution", "top_interp", "bottom_pooler", "blender",
            "attn_normalize", "thresh_with_ctr", "use_scale", "basis_loss_on", "sizes_of_interest")
    for c in (cpu, smoke):
        assert isinstance(c, BlendMaskConfig)
        assert all(getattr(c, f) == getattr(paper, f) for f in algo)
    assert cpu.backbone == "efficientnet_lite0" and cpu.basis_channels < paper.basis_channels
    # attention size: the paper's 14 except at cpu (7, a Table 2 capacity setting, keeps the checkpoint < 10 MiB)
    assert paper.attn_size == smoke.attn_size == 14 and cpu.attn_size == 7
    with pytest.raises(ValueError, match="unknown preset"):
        BlendMaskConfig.preset("huge")


@pytest.mark.parametrize("changes, match", [
    (dict(blender="solo"), "blender must be"),
    (dict(blender="fcis"), "K = M²"),
    (dict(num_bases=1), "constant 1"),
    (dict(attn_normalize="sigmoid"), "num_bases=1"),
    (dict(top_interp="area"), "top_interp"),
    (dict(bottom_pooler="max"), "bottom_pooler"),
    (dict(basis_in_features=("p2", "p3")), "basis_in_features"),
])
def test_config_rejects_inconsistent_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BlendMaskConfig.preset("smoke"), **changes)


def test_top_layer_and_basis_shapes_and_params():
    model = BlendMask(BlendMaskConfig.preset("smoke"), num_classes=7)
    c = model.cfg
    # K·M² channels, as the top layer of AdelaiDet adet/modeling/blendmask/blendmask.py
    assert model.top_layer.out_channels == c.num_bases * c.attn_size ** 2 == 784
    assert model.top_layer.kernel_size == (3, 3)
    assert sum(p.numel() for p in model.top_layer.parameters()) == c.fpn_channels * 784 * 9 + 784
    assert model.basis_module.tower[-1].out_channels == 4
    assert model.basis_module.seg_head[-1].out_channels == 8  # 7 classes + background
    yolact = BlendMask(dataclasses.replace(c, blender="yolact"), num_classes=7)
    assert yolact.top_layer.out_channels == 4
    fcis = BlendMask(dataclasses.replace(c, blender="fcis", num_bases=16, attn_size=4), num_classes=7)
    assert fcis.top_layer is None and fcis.basis_module.tower[-1].out_channels == 16
    no_sem = BlendMask(dataclasses.replace(c, basis_loss_on=False), num_classes=7)
    assert no_sem.basis_module.seg_head is None

    images = [torch.rand(3, 96, 128)]
    model.eval()
    with torch.no_grad():
        bases, sem = model.basis_module(model.forward_parts(images).features)
    assert bases.shape == (1, 4, 96 // 4, 128 // 4) and sem is None


# ------------------------------------------------------------------------------------------------------ model
def _toy_batch():
    """Two 128×128 images with two and one rectangles/discs, as torchvision-style targets."""
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    images, targets = [], []
    for shapes in ([(20, 30, 70, 90), (80, 10, 120, 50)], [(30, 30, 100, 110)]):
        img = torch.rand(3, 128, 128) * 0.2
        masks, boxes = [], []
        for x0, y0, x1, y1 in shapes:
            cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
            m = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2) <= 1
            img[:, m] = 0.9
            masks.append(m.to(torch.uint8))
            boxes.append([x0, y0, x1, y1])
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.arange(len(boxes)),
                        "masks": torch.stack(masks)})
    return images, targets


@pytest.mark.parametrize("mode, extra", [("blender", {}), ("yolact", {}), ("fcis", dict(num_bases=16, attn_size=4))])
def test_train_step_finite_losses_and_gradients_reach_bottom_and_top(mode, extra):
    torch.manual_seed(0)
    cfg = dataclasses.replace(BlendMaskConfig.preset("smoke"), blender=mode, **extra)
    model = BlendMask(cfg, num_classes=3).train()
    images, targets = _toy_batch()
    losses = model(images, targets)
    assert {"loss_cls", "loss_box_reg", "loss_ctr", "loss_mask", "loss_basis_sem"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert model.basis_module.tower[-1].weight.grad.abs().sum() > 0
    assert model.basis_module.refine[2][0].weight.grad.abs().sum() > 0  # P5 feeds the bases
    if model.top_layer is not None:
        assert model.top_layer.weight.grad.abs().sum() > 0
    # every parameter receives a gradient (DDP needs it)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_no_positives_gives_connected_zero_mask_loss():
    torch.manual_seed(0)
    model = BlendMask(BlendMaskConfig.preset("smoke"), num_classes=3).train()
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]
    losses = model(images, targets)
    assert losses["loss_mask"] == 0 and losses["loss_mask"].requires_grad
    sum(losses.values()).backward()
    assert model.top_layer.weight.grad is not None


def test_targets_without_masks_are_an_error():
    model = BlendMask(BlendMaskConfig.preset("smoke"), num_classes=3).train()
    images, targets = _toy_batch()
    with pytest.raises(ValueError, match="masks"):
        model(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])


@pytest.mark.parametrize("mode, extra", [("blender", {}), ("fcis", dict(num_bases=4, attn_size=2))])
def test_eval_returns_bool_masks_at_input_size(mode, extra):
    torch.manual_seed(0)
    cfg = dataclasses.replace(BlendMaskConfig.preset("smoke"), blender=mode, score_thresh=0.0, pre_nms_topk=20,
                              detections_per_img=10, **extra)
    model = BlendMask(cfg, num_classes=3).eval()
    torch.nn.init.constant_(model.head.bbox_pred.bias, 2.0)  # untrained: boxes of 2 strides a side, not empty
    images = [torch.rand(3, 100, 120), torch.rand(3, 64, 80)]
    with torch.no_grad():
        preds = model(images)
    for img, p in zip(images, preds):
        assert set(p) == {"boxes", "scores", "labels", "masks"}
        assert len(p["boxes"]) > 0
        assert p["masks"].dtype == torch.bool and p["masks"].shape == (len(p["boxes"]), *img.shape[-2:])


def test_overfits_one_image():
    """40 AdamW steps on one synthetic-like image: the mask loss falls well below its start (≈ ln 2)."""
    torch.manual_seed(0)
    model = BlendMask(BlendMaskConfig.preset("smoke"), num_classes=3).train()
    images, targets = _toy_batch()
    images, targets = images[:1], targets[:1]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        losses = model(images, targets)
        first = losses["loss_mask"].item() if first is None else first
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert first > 0.5 and losses["loss_mask"].item() < 0.25 * first
