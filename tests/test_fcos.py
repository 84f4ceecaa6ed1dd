"""FCOS: locations, hand-computed target assignment, center-ness, and the model (train / eval / empty GT)."""
from __future__ import annotations

import pytest
import torch

import onestage
from onestage.modeling.fcos import (FCOSConfig, FCOSHead, assign_targets, centerness_target, compute_locations,
                                    flatten_levels)

STRIDES = (8, 16, 32, 64, 128)


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels}


def _locations(h=1024, w=1024):
    return compute_locations([(-(-h // s), -(-w // s)) for s in STRIDES], STRIDES)


def _index(locs, level, x, y):
    """Flat index (over all levels) of the location at pixel (x, y) on ``level``."""
    offset = sum(len(l) for l in locs[:level])
    hit = ((locs[level][:, 0] == x) & (locs[level][:, 1] == y)).nonzero()
    assert len(hit) == 1, (level, x, y)
    return offset + int(hit)


def test_compute_locations_formula():
    feat = torch.zeros(1, 4, 2, 3)
    (locs,) = compute_locations([feat], [16])
    # row-major over (h, w), x first; x·s + s//2
    expected = torch.tensor([[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]], dtype=torch.float32)
    torch.testing.assert_close(locs, expected)
    (odd,) = compute_locations([(1, 2)], [7])
    torch.testing.assert_close(odd, torch.tensor([[3.0, 3.0], [10.0, 3.0]]))


def test_nested_boxes_smaller_box_wins():
    locs = _locations(256, 256)
    # location (100, 100) on P3 (stride 8 → 12·8 + 4). Both boxes are centred there, both have max(ltrb) ≤ 64.
    big = [52.0, 52.0, 148.0, 148.0]     # ltrb 48 each side, area 96²
    small = [80.0, 80.0, 120.0, 120.0]   # ltrb 20, area 40²
    t = assign_targets(locs, [_target([big, small], [3, 5])], num_classes=6)
    i = _index(locs, 0, 100, 100)
    assert t.labels[0, i] == 5 and t.gt_inds[0, i] == 1
    torch.testing.assert_close(t.reg_targets[0, i], torch.tensor([20.0, 20.0, 20.0, 20.0]) / 8)
    assert t.fpn_levels[i] == 0 and t.strides[i] == 8


def test_box_size_to_level_uses_max_distance():
    """Levels are chosen by max(l, t, r, b) at the location (paper §3.2), i.e. about half the box size near its
    centre: a 600×600 box (max ≈ 300 ∈ [256, 512]) trains P6; an 1100×1100 box (max ≥ 550 > 512) trains P7."""
    t = assign_targets(_locations(1024, 1024), [_target([[100.0, 100.0, 700.0, 700.0]])], num_classes=1)
    assert set(t.fpn_levels[t.labels[0] == 0].tolist()) == {3}
    t = assign_targets(_locations(1152, 1152), [_target([[0.0, 0.0, 1100.0, 1100.0]])], num_classes=1)
    assert set(t.fpn_levels[t.labels[0] == 0].tolist()) == {4}


def test_600px_wide_box_goes_to_p7():
    # A 600×600-px box is "600 px" by side, but FCOS assigns by max(l,t,r,b), the half-size at the centre.
    # A box 600 px *from the location* (e.g. a wide box whose centre region sees r ≈ 600) goes to P7.
    locs = _locations(1024, 1024)
    t = assign_targets(locs, [_target([[-540.0, 300.0, 660.0, 400.0]])], num_classes=1)
    # centre (60, 350); P7 location (64, 320): l = 604, r = 596 → max 604 > 512 → P7; centre box ±192 contains it.
    i = _index(locs, 4, 64, 320)
    assert t.labels[0, i] == 0
    assert set(t.fpn_levels[t.labels[0] == 0].tolist()) == {4}


def test_center_sampling_radius():
    locs = _locations(256, 256)
    box = [0.0, 0.0, 96.0, 96.0]  # centre (48, 48), radius 1.5·8 = 12 → centre box (36, 36)..(60, 60) on P3
    t = assign_targets(locs, [_target([box])], num_classes=1)
    inside = _index(locs, 0, 44, 52)   # |dx| = 4, |dy| = 4
    outside = _index(locs, 0, 60, 44)  # |dx| = 12, not < 12 (strict); inside the box, max(ltrb) = 60 ≤ 64
    assert t.labels[0, inside] == 0 and t.labels[0, outside] == 1
    # without center sampling every location strictly inside the box (with max(ltrb) in range) is positive
    t2 = assign_targets(locs, [_target([box])], num_classes=1, center_sampling=False)
    assert t2.labels[0, outside] == 0
    # radius is in strides: a larger radius reaches (60, 44)
    t3 = assign_targets(locs, [_target([box])], num_classes=1, center_sampling_radius=3.0)
    assert t3.labels[0, outside] == 0


def test_center_box_is_clipped_to_gt_box_strictly():
    locs = _locations(256, 256)
    # thin box: centre box (±12 px) would reach x = 28..52 but the box only spans x ∈ (37, 43]
    box = [37.0, 10.0, 44.0, 90.0]
    t = assign_targets(locs, [_target([box])], num_classes=1)
    assert t.labels[0, _index(locs, 0, 36, 44)] == 1  # left of the box
    assert t.labels[0, _index(locs, 0, 44, 44)] == 1  # on the right edge: r = 0 is not > 0
    t_edge = assign_targets(locs, [_target([[36.0, 10.0, 45.0, 90.0]])], num_classes=1)
    assert t_edge.labels[0, _index(locs, 0, 36, 44)] == 1  # l = 0 → strict test rejects it
    assert t_edge.labels[0, _index(locs, 0, 44, 44)] == 0


def test_size_ranges_are_inclusive_and_custom():
    locs = _locations(512, 512)
    # P4's location (200, 200) sees max(ltrb) = 64 exactly: positive on P4 (lo = 64 is inclusive)
    box = [136.0, 180.0, 264.0, 220.0]  # at (200, 200): l = 64, r = 64, t = b = 20 → max = 64: in P3 *and* P4 range
    t = assign_targets(locs, [_target([box])], num_classes=1, center_sampling=False)
    assert t.labels[0, _index(locs, 1, 200, 200)] == 0  # lo = 64 ≤ 64 on P4
    assert t.labels[0, _index(locs, 0, 196, 196)] == 1  # l = 60, r = 68 → max 68 > 64: not P3
    # P3's location (196, 196) with l = 56, r = 64: max = 64 = hi, still P3 (inclusive); P4's (200, 200) sees 60
    t_p3 = assign_targets(locs, [_target([[140.0, 180.0, 260.0, 220.0]])], num_classes=1, center_sampling=False)
    assert t_p3.labels[0, _index(locs, 0, 196, 196)] == 0 and t_p3.labels[0, _index(locs, 1, 200, 200)] == 1
    # custom sizes of interest move the box to another level
    t_custom = assign_targets(locs, [_target([box])], num_classes=1, center_sampling=False,
                              sizes_of_interest=(32, 48, 256, 512))
    assert t_custom.labels[0, _index(locs, 2, 208, 208)] == 0
    with pytest.raises(ValueError):
        assign_targets(locs, [_target([box])], num_classes=1, sizes_of_interest=(64, 128))


def test_box_centered_at_x0_is_not_dropped():
    """AdelaiDet's get_sample_region zeroes an image whose first GT centre has x == 0; we do not."""
    locs = _locations(128, 128)
    t = assign_targets(locs, [_target([[-20.0, 10.0, 20.0, 50.0]])], num_classes=1)
    assert t.labels[0, _index(locs, 0, 4, 28)] == 0


def test_batch_gt_inds_offset_and_empty_image():
    locs = _locations(128, 128)
    targets = [_target([[10.0, 10.0, 50.0, 50.0]]), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()},
               _target([[60.0, 60.0, 100.0, 100.0], [8.0, 8.0, 40.0, 40.0]], [2, 4])]
    t = assign_targets(locs, targets, num_classes=5)
    assert t.labels.shape == t.gt_inds.shape == (3, sum(len(l) for l in locs))
    assert set(t.gt_inds[0].unique().tolist()) == {-1, 0}
    assert (t.labels[1] == 5).all() and (t.gt_inds[1] == -1).all()
    assert set(t.gt_inds[2].unique().tolist()) == {-1, 1, 2}
    assert ((t.gt_inds == -1) == (t.labels == 5)).all()


def test_centerness_target_values():
    # exact centre → 1; a point on an edge (l = 0) → 0; hand value sqrt(1/3 · 1/1)
    torch.testing.assert_close(centerness_target(torch.tensor([[5.0, 2.0, 5.0, 2.0]])), torch.tensor([1.0]))
    torch.testing.assert_close(centerness_target(torch.tensor([[0.0, 3.0, 8.0, 3.0]])), torch.tensor([0.0]))
    torch.testing.assert_close(centerness_target(torch.tensor([[1.0, 4.0, 3.0, 4.0]])),
                               torch.tensor([(1 / 3) ** 0.5]))


def test_head_shapes_init_and_centerness_branch():
    torch.manual_seed(0)
    feats = [torch.randn(2, 32, s, s) for s in (8, 4, 2)]
    head = FCOSHead(32, num_classes=3, num_levels=3, num_cls_convs=1, num_box_convs=1, gn_groups=8)
    out = head(feats)
    assert [tuple(t.shape) for t in out.logits] == [(2, 3, s, s) for s in (8, 4, 2)]
    assert all((r >= 0).all() for r in out.bbox_reg) and len(out.ctrness) == 3 and len(out.bbox_towers) == 3
    torch.testing.assert_close(head.cls_logits.bias, torch.full((3,), -torch.log(torch.tensor(99.0)).item()))
    assert flatten_levels(out.logits).shape == (2, 64 + 16 + 4, 3)
    none = FCOSHead(32, 3, 3, 1, 1, gn_groups=8, centerness_on="none")
    assert none.ctrness is None and none(feats).ctrness is None
    # "cls": center-ness reads the classification tower
    cls = FCOSHead(32, 3, 3, 1, 1, gn_groups=8, centerness_on="cls")
    o = cls(feats)
    torch.testing.assert_close(o.ctrness[0], cls.ctrness(cls.cls_tower(feats[0])))


# --------------------------------------------------------------------------- model


def _batch():
    images = [torch.rand(3, 120, 150), torch.rand(3, 96, 128)]
    targets = [_target([[10.0, 12.0, 70.0, 90.0], [60.0, 20.0, 140.0, 110.0]], [0, 2]), _target([[5.0, 5.0, 40.0, 30.0]], [1])]
    return images, targets


@pytest.mark.parametrize("empty", [False, True])
@pytest.mark.parametrize("centerness_on", ["reg", "cls", "none", "computed"])
def test_train_every_param_gets_gradient_no_nan(empty, centerness_on):
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=3, centerness_on=centerness_on)
    model.train()
    images, targets = _batch()
    if empty:
        targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in images]
    losses = model(images, targets)
    expected = {"loss_cls", "loss_box_reg"} | ({"loss_ctr"} if centerness_on in ("reg", "cls") else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    if empty:
        assert losses["loss_box_reg"].item() == 0.0
    else:
        assert losses["loss_box_reg"].item() > 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_eval_outputs_are_clipped_and_shaped():
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=3, score_thresh=0.0, detections_per_img=7)
    # raise the class prior so that random init yields detections to check
    torch.nn.init.constant_(model.head.cls_logits.bias, 2.0)
    torch.nn.init.constant_(model.head.bbox_pred.bias, 2.0)  # boxes of ±2 strides, not degenerate
    with torch.no_grad():
        model.head.scales[0].scale.fill_(50.0)  # big boxes that must be clipped
    model.eval()
    images, _ = _batch()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2
    for p, img in zip(preds, images):
        h, w = img.shape[-2:]
        n = len(p["boxes"])
        assert 0 < n <= 7 and p["boxes"].shape == (n, 4) and p["scores"].shape == (n,) and p["labels"].shape == (n,)
        assert p["labels"].dtype == torch.int64 and p["labels"].max() < 3
        assert (p["boxes"][:, 0::2] >= 0).all() and (p["boxes"][:, 0::2] <= w).all()
        assert (p["boxes"][:, 1::2] >= 0).all() and (p["boxes"][:, 1::2] <= h).all()
        assert (p["boxes"][:, 2] > p["boxes"][:, 0]).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all() and ((p["scores"] > 0) & (p["scores"] <= 1)).all()


def test_default_prior_gives_no_detections_above_threshold():
    # π = 0.01 < score_thresh 0.05: an untrained model predicts nothing, which is what the prior is for
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=3).eval()
    with torch.no_grad():
        preds = model([torch.rand(3, 64, 64)])
    assert len(preds[0]["boxes"]) == 0


def test_deterministic_under_seed():
    images, targets = _batch()
    out = []
    for _ in range(2):
        torch.manual_seed(123)
        model = onestage.build_model("fcos", preset="smoke", num_classes=3).train()
        out.append({k: v.item() for k, v in model(images, targets).items()})
    assert out[0] == out[1]


def test_presets_and_overrides():
    paper = FCOSConfig.preset("paper")
    assert paper.strides == [8, 16, 32, 64, 128] and paper.sizes_of_interest == (64, 128, 256, 512)
    assert (paper.backbone, paper.backbone_norm, paper.freeze_at, paper.fpn_channels) == ("resnet50", "frozen_bn", 2, 256)
    assert (paper.num_cls_convs, paper.num_box_convs, paper.center_sampling_radius) == (4, 4, 1.5)
    assert (paper.score_thresh, paper.pre_nms_topk, paper.nms_thresh, paper.detections_per_img) == (0.05, 1000, 0.6, 100)
    cpu = FCOSConfig.preset("cpu")
    assert cpu.backbone == "efficientnet_lite0" and cpu.freeze_at == 0
    # the cpu preset changes capacity, never the algorithm
    for field in ("in_features", "sizes_of_interest", "center_sampling", "center_sampling_radius", "centerness_on",
                  "focal_alpha", "focal_gamma", "loc_loss_type", "score_thresh", "pre_nms_topk", "nms_thresh",
                  "detections_per_img", "thresh_with_ctr", "use_scale", "prior_prob"):
        assert getattr(cpu, field) == getattr(paper, field), field
    with pytest.raises(TypeError):
        onestage.build_model("fcos", preset="smoke", num_classes=2, no_such_option=1)
    with pytest.raises(ValueError):
        FCOSConfig.preset("huge")


def test_postprocess_return_indices_point_at_the_detecting_location():
    import torch
    from onestage.modeling.fcos import FCOSHeadOutputs, compute_locations, flatten_levels, postprocess
    torch.manual_seed(0)
    strides = [8, 16]
    feats = [torch.zeros(1, 1, 6, 5), torch.zeros(1, 1, 3, 3)]
    locs = compute_locations(feats, strides)
    logits = [torch.randn(1, 3, 6, 5), torch.randn(1, 3, 3, 3)]
    reg = [torch.rand(1, 4, 6, 5) + 0.5, torch.rand(1, 4, 3, 3) + 0.5]
    ctr = [torch.randn(1, 1, 6, 5), torch.randn(1, 1, 3, 3)]
    out = FCOSHeadOutputs(logits, reg, ctr, None)
    res = postprocess(out, locs, strides, [(48, 40)], score_thresh=0.05, return_indices=True)[0]
    plain = postprocess(out, locs, strides, [(48, 40)], score_thresh=0.05)[0]
    assert torch.equal(res["boxes"], plain["boxes"]) and "location_inds" not in plain
    flat_logits = flatten_levels(logits)[0]
    flat_ctr = flatten_levels(ctr)[0, :, 0]
    expect = torch.sqrt(flat_logits[res["location_inds"], res["labels"]].sigmoid()
                        * flat_ctr[res["location_inds"]].sigmoid())
    assert torch.allclose(res["scores"], expect)
    assert torch.equal(res["locations"], torch.cat(locs)[res["location_inds"]])
    assert torch.equal(res["fpn_levels"], (res["location_inds"] >= 30).long())


def test_computed_centerness_hand_case_and_training_equals_none():
    """FCOS Table 4 †: no branch; at inference ctr = eq. 3 of the predicted ltrb, score = sqrt(cls · ctr)."""
    from onestage.modeling.fcos import FCOSHeadOutputs, compute_locations, postprocess
    locs = compute_locations([torch.zeros(1, 1, 1, 2)], [8])  # two locations, (4, 4) and (12, 4)
    logits = [torch.tensor([[[[0.0, 2.0]]]])]  # one class; sigmoid 0.5 and 0.881
    # location 0: l, t, r, b = 1, 3, 2, 2 (strides) → ctr = sqrt(1/2 · 2/3) = 0.5774; location 1: centred → 1
    reg = [torch.tensor([[[[1.0, 1.0]], [[3.0, 1.0]], [[2.0, 1.0]], [[2.0, 1.0]]]])]
    out = FCOSHeadOutputs(logits, reg, None, None)
    res = postprocess(out, locs, [8], [(64, 64)], score_thresh=0.05, nms_thresh=1.0, ctr_from_reg=True)[0]
    s0, s1 = torch.tensor(0.0).sigmoid(), torch.tensor(2.0).sigmoid()
    torch.testing.assert_close(res["scores"], torch.stack([torch.sqrt(s1), torch.sqrt(s0 * (1 / 3) ** 0.5)]))
    plain = postprocess(out, locs, [8], [(64, 64)], score_thresh=0.05, nms_thresh=1.0)[0]  # "none": cls alone
    torch.testing.assert_close(plain["scores"], torch.stack([s1, s0]))
    # training: "computed" is "none" to the bit (same parameters, same losses); only inference differs
    images, targets = _batch()
    models = {}
    for on in ("none", "computed"):
        torch.manual_seed(0)
        models[on] = onestage.build_model("fcos", preset="smoke", num_classes=3, centerness_on=on).train()
    a, b = models["none"](images, targets), models["computed"](images, targets)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="computed"):
        FCOSHead(32, 3, centerness_on="regression")
