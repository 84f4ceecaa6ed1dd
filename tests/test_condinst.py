"""CondInst: parameter layout and count, dynamic heads vs plain convs, aligned upsampling, targets, model I/O."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import onestage
from onestage.modeling.condinst import CondInst, CondInstConfig, aligned_bilinear, sample_gt_masks
from onestage.modeling.losses import dice_loss
from onestage.ops.dynamic_mask_head import (coordinate_maps, dynamic_mask_head_reference, num_dynamic_params,
                                            parse_dynamic_params)
from onestage.modeling.fast_inference import plain_inference


def _count_by_hand(cmask, width, depth, coords=True):
    c_in = cmask + 2 if coords else cmask
    if depth == 1:
        return c_in + 1
    return (c_in * width + width) + (depth - 2) * (width * width + width) + (width + 1)


@pytest.mark.parametrize("cmask,width,depth", [(8, 8, 3), (8, 8, 1), (8, 8, 2), (8, 8, 4), (8, 2, 3), (8, 16, 3),
                                               (1, 8, 3), (16, 8, 3), (4, 4, 2)])
def test_param_count_formula(cmask, width, depth):
    assert num_dynamic_params(cmask, width, depth) == _count_by_hand(cmask, width, depth)
    assert num_dynamic_params(cmask, width, depth, "none") == _count_by_hand(cmask, width, depth, coords=False)
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), mask_branch_out_channels=cmask, mask_head_width=width,
                              mask_head_depth=depth)
    model = CondInst(cfg, num_classes=3)
    assert model.controller.out_channels == _count_by_hand(cmask, width, depth)


def test_paper_numbers_169_153_233():
    """§2.2: 169 parameters at Cmask 8, width 8, depth 3; 153 without coordinates; 233 with Cmask 16 (BoxInst)."""
    assert num_dynamic_params() == 169
    assert num_dynamic_params(coords="none") == 153
    assert num_dynamic_params(16) == 233
    assert num_dynamic_params(coords="coords_only") == (2 * 8 + 8) + (8 * 8 + 8) + 9


def test_parse_layout_is_all_weights_then_all_biases():
    params = torch.arange(169.0)[None]
    weights, biases = parse_dynamic_params(params, 10, 8, 3)
    assert [tuple(w.shape) for w in weights] == [(1, 8, 10), (1, 8, 8), (1, 1, 8)]
    assert weights[0][0, 0, :3].tolist() == [0, 1, 2]           # W0 row-major (out, in)
    assert weights[1][0, 0, 0].item() == 80 and weights[2][0, 0, 0].item() == 144
    assert [b.shape[1] for b in biases] == [8, 8, 1]
    assert biases[0][0, 0].item() == 152 and biases[2][0, 0].item() == 168


def test_relative_coordinates_by_hand():
    """(instance − pixel) / soi, x first; pixel (i, j) of a stride-8 map sits at (8j + 4, 8i + 4)."""
    loc = torch.tensor([[20.0, 12.0]])
    maps = coordinate_maps(loc, torch.tensor([64.0]), height=3, width=4, stride=8)
    assert maps.shape == (1, 2, 3, 4)
    assert maps[0, 0, 0, 0].item() == pytest.approx((20 - 4) / 64)
    assert maps[0, 1, 0, 0].item() == pytest.approx((12 - 4) / 64)
    assert maps[0, 0, 2, 3].item() == pytest.approx((20 - 28) / 64)
    assert maps[0, 1, 2, 3].item() == pytest.approx((12 - 20) / 64)


@pytest.mark.parametrize("coords", ["rel", "abs", "none", "coords_only"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_dynamic_head_equals_a_loop_of_plain_convs(coords, depth):
    torch.manual_seed(depth)
    b, cmask, h, w, width, n = 2, 5, 7, 9, 6, 4
    feats = torch.randn(b, cmask, h, w)
    params = torch.randn(n, num_dynamic_params(cmask, width, depth, coords))
    im_inds = torch.tensor([0, 1, 1, 0])
    locs = torch.rand(n, 2) * 70
    soi = torch.tensor([64.0, 128.0, 64.0, 256.0])
    out = dynamic_mask_head_reference(feats, params, im_inds, locs, soi, 8, width, depth, coords)
    c_in = {"rel": cmask + 2, "abs": cmask + 2, "none": cmask, "coords_only": 2}[coords]
    for k in range(n):
        parts = []
        if coords != "none":
            parts.append(coordinate_maps(locs[k:k + 1], soi[k:k + 1], h, w, 8, coords))
        if coords != "coords_only":
            parts.append(feats[im_inds[k]][None])
        x = torch.cat(parts, 1)
        dims = [c_in] + [width] * (depth - 1) + [1]
        offset = 0
        ws = []
        for i in range(depth):
            ws.append(params[k, offset: offset + dims[i + 1] * dims[i]].reshape(dims[i + 1], dims[i], 1, 1))
            offset += dims[i + 1] * dims[i]
        for i in range(depth):
            bias = params[k, offset: offset + dims[i + 1]]
            offset += dims[i + 1]
            x = F.conv2d(x, ws[i], bias)
            if i < depth - 1:
                x = F.relu(x)
        assert torch.allclose(out[k], x[0, 0], atol=1e-5), k


def test_dynamic_head_with_no_instances_keeps_the_graph():
    feats = torch.randn(1, 8, 4, 4, requires_grad=True)
    params = torch.zeros(0, 169, requires_grad=True)
    out = dynamic_mask_head_reference(feats, params, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2),
                                      torch.zeros(0))
    assert out.shape == (0, 4, 4)
    out.sum().backward()
    assert params.grad is not None


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_aligned_bilinear_puts_an_impulse_where_its_pixel_centre_is(factor):
    """Input pixel k (image coordinate k·s + s/2) must land on output index f·k + f//2 with its full value."""
    x = torch.zeros(1, 1, 5, 6)
    x[0, 0, 2, 3] = 1.0
    y = aligned_bilinear(x, factor)
    assert y.shape == (1, 1, 5 * factor, 6 * factor)
    peak = divmod(int(y.flatten().argmax()), 6 * factor)
    assert peak == (2 * factor + factor // 2, 3 * factor + factor // 2)
    assert y.max().item() == pytest.approx(1.0)
    # a constant map stays constant (no border darkening) and a ramp stays exact along its direction
    assert torch.allclose(aligned_bilinear(torch.ones(1, 1, 3, 3), factor), torch.ones(1, 1, 3 * factor, 3 * factor))
    ramp = torch.arange(6.0).expand(1, 1, 4, 6)
    up = aligned_bilinear(ramp, factor)
    cols = torch.arange(factor * 6)
    expected = ((cols - factor // 2) / factor).clamp(0, 5)
    assert torch.allclose(up[0, 0, 0], expected, atol=1e-5)


def test_aligned_bilinear_factor_one_is_identity():
    x = torch.randn(2, 3, 4, 5)
    assert aligned_bilinear(x, 1) is x


def test_gt_masks_sampled_at_offset_half_stride():
    m = torch.zeros(1, 16, 16)
    m[0, 2, 6] = 1  # sampled by stride 4 (rows/cols 2, 6, 10, 14)
    m[0, 3, 3] = 1  # not sampled
    s = sample_gt_masks(m, 4)
    assert s.shape == (1, 4, 4)
    assert s.sum().item() == 1 and s[0, 0, 1].item() == 1


def test_dice_loss_hand_cases():
    p = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(p, torch.tensor([[1, 1, 0, 0]])).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(p, torch.tensor([[0, 0, 1, 1]])).item() == pytest.approx(1.0)
    # 1 − 2·1 / (2 + 1) = 1/3
    assert dice_loss(p, torch.tensor([[1, 0, 0, 0]])).item() == pytest.approx(1 / 3, abs=1e-5)
    # soft prediction 0.5 everywhere on a half-foreground target: 1 − 2·1 / (1 + 2) = 1/3
    assert dice_loss(torch.full((1, 4), 0.5), torch.tensor([[1, 1, 0, 0]])).item() == pytest.approx(1 / 3, abs=1e-5)


def _toy_batch(size=64):
    torch.manual_seed(0)
    images = [torch.rand(3, size, size), torch.rand(3, size - 16, size)]
    targets = []
    for img in images:
        h, w = img.shape[-2:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 8:30, 10:40] = 1
        masks[1, 30:44, 4:20] = 1
        boxes = torch.tensor([[10.0, 8, 40, 30], [4.0, 30, 20, 44]])
        targets.append({"boxes": boxes, "labels": torch.tensor([0, 2]), "masks": masks})
    return images, targets


def test_train_step_gives_finite_losses_and_gradients_everywhere():
    model = onestage.build_model("condinst", "smoke", num_classes=3)
    model.train()
    images, targets = _toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_ctr", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < losses["loss_mask"].item() <= 1
    sum(losses.values()).backward()
    assert model.controller.weight.grad.abs().sum() > 0
    assert model.mask_branch.out.weight.grad.abs().sum() > 0
    assert model.mask_branch.refine[0][0].weight.grad.abs().sum() > 0


def test_mask_loss_uses_at_most_max_proposals_and_handles_no_positives():
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), max_proposals=3)
    model = CondInst(cfg, num_classes=3).train()
    images, targets = _toy_batch()
    seen = []
    original = model.mask_logits
    model.mask_logits = lambda *a: seen.append(a[1].shape[0]) or original(*a)
    model(images, targets)
    assert seen == [3]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "masks": torch.zeros(0, *img.shape[-2:], dtype=torch.uint8)} for img in images]
    losses = model(images, empty)
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad


@pytest.mark.parametrize("mask_nms", [False, True])
def test_eval_returns_boolean_masks_at_input_size(mask_nms):
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), score_thresh=0.0, detections_per_img=7,
                              mask_nms=mask_nms, mask_nms_max_candidates=40)
    model = CondInst(cfg, num_classes=3).eval()
    images, _ = _toy_batch()
    with torch.no_grad():
        preds = model(images)
    for img, p in zip(images, preds):
        n = p["boxes"].shape[0]
        assert 0 < n <= 7
        assert p["masks"].shape == (n, *img.shape[-2:]) and p["masks"].dtype == torch.bool
        assert set(p) == {"boxes", "scores", "labels", "masks"}
        assert torch.all(p["scores"][:-1] >= p["scores"][1:])


def test_inference_mask_equals_the_dynamic_head_of_the_detecting_location():
    """The mask of a detection is the head generated at the location that produced its box."""
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), score_thresh=0.0, detections_per_img=3)
    torch.manual_seed(1)
    model = CondInst(cfg, num_classes=3).eval()
    torch.nn.init.normal_(model.controller.weight, std=0.3)  # trained-like magnitudes → a non-trivial mask
    torch.nn.init.normal_(model.controller.bias, std=0.3)
    images, _ = _toy_batch()
    with torch.no_grad():
        batch, sizes = model.preprocess(images[:1])
        feats = model.features(batch)
        head_out = model.head(feats)
        locs = onestage.modeling.fcos.compute_locations(feats, model.strides)
        dets = model.postprocess(head_out, locs, sizes, return_indices=True)[0]
        mask_feats = model.mask_branch([feats[i] for i in model.mask_in_indices])
        k = dets["location_inds"][0]
        params = model.controller_params(head_out)[0, k][None]
        level = dets["fpn_levels"][:1]
        logits = dynamic_mask_head_reference(mask_feats, params, torch.zeros(1, dtype=torch.long),
                                             dets["locations"][:1], model.level_soi[level], 8, 8, 3, "rel")
        probs = aligned_bilinear(aligned_bilinear(logits, 4).sigmoid(), 2)[0, :64, :64]
        with plain_inference(model):
            preds = model(images[:1])[0]
    assert 0 < (probs > 0.5).sum() < probs.numel()  # a non-trivial mask
    assert torch.equal(preds["masks"][0], probs > 0.5)


def test_config_rejects_unknown_coordinate_mode():
    with pytest.raises(ValueError, match="rel_coords"):
        CondInstConfig(rel_coords="polar")
    with pytest.raises(TypeError):
        onestage.build_model("condinst", "smoke", num_classes=3, mask_head_depthh=2)


def test_mask_centers_by_hand_and_empty_mask_falls_back_to_the_box():
    from onestage.structures import mask_centers

    m = torch.zeros(2, 6, 8, dtype=torch.uint8)
    m[0, 1:3, 2:6] = 1  # pixels x 2..5, y 1..2 (alone: centre (3.5, 1.5), in pixel indices as the reference)
    m[0, 5, 7] = 1      # plus one pixel at (7, 5): x = ((2+3+4+5)·2 + 7) / 9 = 35/9, y = (1·4 + 2·4 + 5) / 9 = 17/9
    boxes = torch.tensor([[2.0, 1.0, 8.0, 6.0], [0.0, 0.0, 4.0, 2.0]])
    c = mask_centers(m, boxes)
    torch.testing.assert_close(c, torch.tensor([[35 / 9, 17 / 9], [2.0, 1.0]]))  # mask 1 empty → box centre
    assert mask_centers(m[:0]).shape == (0, 2)


def test_center_sampling_is_around_the_mask_centre_of_mass():
    """CondInst samples positives around the mask's centroid (AdelaiDet get_sample_region with gt_bitmasks_full):
    for an L-shaped mask that is far from the box centre, so the positives move with it."""
    from onestage.modeling.fcos import compute_locations

    model = onestage.build_model("condinst", "smoke", num_classes=2).train()
    mask = torch.zeros(1, 256, 256, dtype=torch.uint8)
    mask[0, 20:200, 20:60] = 1
    mask[0, 160:200, 20:200] = 1  # an L: centroid (78.9, 140.1), box centre (110, 110)
    target = {"boxes": torch.tensor([[20.0, 20.0, 200.0, 200.0]]), "labels": torch.tensor([1]), "masks": mask}
    seen = {}
    real_assign = model.assign

    def spy(locations, targets):
        seen["targets"] = targets
        seen["assigned"] = real_assign(locations, targets)
        return seen["assigned"]

    model.assign = spy
    model([torch.rand(3, 256, 256)], [target])
    torch.testing.assert_close(seen["targets"][0]["centers"], torch.tensor([[78.875, 140.125]]))
    a = seen["assigned"]
    pos = (a.labels.reshape(-1) != 2).nonzero().squeeze(1)
    strides = model.strides
    locs = torch.cat(compute_locations([(-(-256 // s), -(-256 // s)) for s in strides], strides))
    radius = 1.5 * torch.tensor([float(strides[int(l)]) for l in a.fpn_levels.reshape(-1)[pos]])
    assert len(pos) > 0
    assert ((locs[pos] - torch.tensor([78.875, 140.125])).abs().max(dim=1).values < radius).all()
    assert ((locs[pos] - torch.tensor([110.0, 110.0])).abs().max(dim=1).values >= radius).any()
