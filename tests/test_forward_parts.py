"""One interface for every model's intermediate results (``onestage.modeling.parts``): ``forward`` is
``detect(forward_parts(...))``, each detection is rebuilt from its origin with the model's public pieces, candidates
come before suppression, and training losses are the same either way."""
import math

import pytest
import torch
import torch.nn.functional as F

import onestage
from onestage.modeling.blendmask import paste_masks, pool_bases
from onestage.modeling.condinst import aligned_bilinear
from onestage.modeling.fast_inference import plain_inference
from onestage.modeling.fcos import flatten_levels
from onestage.modeling.parts import ForwardParts, low_thresholds
from onestage.modeling.solo import dynamic_masks

MODELS = ["fcos", "condinst", "blendmask", "solo", "decoupled_solo", "solov2"]
FCOS_FAMILY = {"fcos", "condinst", "blendmask"}


def _awake(name: str, seed: int = 0):
    """A smoke model whose untrained outputs pass the thresholds: classifier and (SOLO) mask priors at 0.5 or
    above, so that detections and masks exist without training."""
    torch.manual_seed(seed)
    model = onestage.build_model(name, preset="smoke", num_classes=3).eval()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Conv2d) or mod.bias is None:
                continue
            if mod_name.endswith(("cls_logits", "cate_pred")):
                mod.bias.fill_(0.0)
            elif ".mask_preds" in mod_name:
                mod.bias.fill_(2.0)
    return model


def _images(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 96, 80, generator=g), torch.rand(3, 64, 96, generator=g)]


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_detect_of_parts(name):
    model = _awake(name)
    images = _images()
    with torch.no_grad():
        parts = model.forward_parts(images)
        with plain_inference(model):  # the identity holds for the plain path; tests/test_fast_inference.py the rest
            plain = model(images)
        rebuilt = model.detect(parts)
        origin = model.detect(parts, with_origin=True)
    assert isinstance(parts, ForwardParts)
    assert parts.image_sizes == [(96, 80), (64, 96)] and parts.canvas_hw == tuple(parts.batch.shape[-2:])
    assert list(parts.features) == list(model.cfg.in_features)
    assert sum(len(d["scores"]) for d in plain) > 0, "the awake model should detect something"
    for a, b, c in zip(plain, rebuilt, origin):
        _same(a, b)
        _same(a, {k: v for k, v in c.items() if k in a})     # the origin keys add, they change nothing
        assert set(c) - set(a)


def _flat(maps, b):
    return flatten_levels([m[b: b + 1] for m in maps])[0]


@pytest.mark.parametrize("name", sorted(FCOS_FAMILY))
def test_fcos_family_detection_rebuilt_from_its_location(name):
    """Box = location ∓ ltrb·stride (§3.1), score = sqrt(σ(cls)·σ(ctr)) (§3.3), from the head at ``location_inds``."""
    model = _awake(name)
    with torch.no_grad():
        parts = model.forward_parts(_images())
        dets = model.detect(parts, with_origin=True)
    strides = torch.tensor(model.strides, dtype=torch.float32)
    for b, det in enumerate(dets):
        h, w = parts.image_sizes[b]
        inds = det["location_inds"]
        assert torch.equal(torch.cat(parts.locations)[inds], det["locations"])
        reg = _flat(parts.head.bbox_reg, b)[inds] * strides[det["fpn_levels"]][:, None]
        x, y = det["locations"].unbind(1)
        boxes = torch.stack([(x - reg[:, 0]).clamp(0, w), (y - reg[:, 1]).clamp(0, h),
                             (x + reg[:, 2]).clamp(0, w), (y + reg[:, 3]).clamp(0, h)], 1)
        torch.testing.assert_close(boxes, det["boxes"])
        cls = _flat(parts.head.logits, b)[inds, det["labels"]].sigmoid()
        ctr = _flat(parts.head.ctrness, b)[inds, 0].sigmoid()
        torch.testing.assert_close(torch.sqrt(cls * ctr), det["scores"])


def test_condinst_mask_rebuilt_from_its_params():
    model = _awake("condinst")
    with torch.no_grad():
        parts = model.forward_parts(_images())
        dets = model.detect(parts, with_origin=True)
        for b, det in enumerate(dets):
            assert torch.equal(det["params"], parts.mask_inputs["params"][b][det["location_inds"]])
            logits = model.mask_logits(parts.mask_inputs["mask_feats"], det["params"],
                                       torch.full_like(det["location_inds"], b), det["locations"], det["fpn_levels"])
            h, w = parts.image_sizes[b]
            masks = aligned_bilinear(logits.sigmoid(), model.mask_out_stride)[:, :h, :w] > model.cfg.mask_threshold
            assert torch.equal(masks, det["masks"])


def test_blendmask_mask_rebuilt_from_its_attentions():
    model = _awake("blendmask")
    c = model.cfg
    with torch.no_grad():
        parts = model.forward_parts(_images())
        dets = model.detect(parts, with_origin=True)
        for b, det in enumerate(dets):
            k, m = c.num_bases, c.effective_attn_size
            flat = parts.mask_inputs["attentions"][b][det["location_inds"]]
            assert torch.equal(det["attentions"], flat.reshape(-1, k, m, m))
            rois = pool_bases(parts.mask_inputs["bases"][b: b + 1], [det["boxes"]], c.bottom_resolution,
                              c.basis_stride, c.bottom_pooler)
            h, w = parts.image_sizes[b]
            masks = paste_masks(model.blend(rois, det["attentions"]).sigmoid(), det["boxes"], h, w, c.mask_thresh)
            assert torch.equal(masks, det["masks"])


@pytest.mark.parametrize("name", ["solo", "decoupled_solo", "solov2"])
def test_solo_family_mask_rebuilt_from_its_cell(name):
    """The mask of a detection is its cell's mask probabilities (stride 4) upsampled to the canvas, cropped,
    binarised; SOLOv2's also equals its kernel ∗ F."""
    model = _awake(name)
    with torch.no_grad():
        parts = model.forward_parts(_images())
        dets = model.detect(parts, with_origin=True)
        levels = torch.repeat_interleave(torch.arange(len(model.grid_numbers)),
                                         torch.tensor([s * s for s in model.grid_numbers]))
        for b, det in enumerate(dets):
            assert torch.equal(det["fpn_levels"], levels[det["cells"]])
            probs = model.cell_mask_probs(parts, b, det["cells"])
            if name == "solov2":
                torch.testing.assert_close(dynamic_masks(det["kernels"], parts.mask_inputs["mask_features"][b])
                                           .sigmoid(), probs)
            h, w = parts.image_sizes[b]
            full = F.interpolate(probs[None], size=parts.canvas_hw, mode="bilinear", align_corners=False)[0]
            assert torch.equal(full[:, :h, :w] > model.cfg.mask_thresh, det["masks"])


@pytest.mark.parametrize("name", MODELS)
def test_candidates_come_before_suppression(name):
    """Best first; every detection's origin is among the image's candidates (FCOS family: the same location and
    class; SOLO family: the same cell and class, its category score ≥ the detection's score, which maskness and
    Matrix NMS only lower)."""
    model = _awake(name)
    with torch.no_grad():
        parts = model.forward_parts(_images())
        dets = model.detect(parts, with_origin=True)
        cands = model.candidates(parts)
    key = "location_inds" if name in FCOS_FAMILY else "cells"
    for det, cand in zip(dets, cands):
        assert len(cand["scores"]) >= len(det["scores"]) > 0
        assert bool((cand["scores"][:-1] >= cand["scores"][1:]).all())
        pairs = {(int(i), int(c)): float(s) for i, c, s in zip(cand[key], cand["labels"], cand["scores"])}
        for i, c, s in zip(det[key], det["labels"], det["scores"]):
            assert (int(i), int(c)) in pairs
            if key == "cells":
                assert pairs[(int(i), int(c))] >= float(s) - 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_training_losses_from_parts_equal_forward(name):
    model = _awake(name).train()
    images = _images()
    boxes = torch.tensor([[10.0, 12.0, 50.0, 70.0], [30.0, 5.0, 75.0, 40.0]])
    targets = []
    for img in images:
        masks = torch.zeros(2, *img.shape[-2:], dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            masks[k, int(y0): int(min(y1, img.shape[1])), int(x0): int(min(x1, img.shape[2]))] = 1
        targets.append({"boxes": boxes.clone(), "labels": torch.tensor([0, 2]), "masks": masks})
    torch.manual_seed(5)
    a = model(images, targets)
    torch.manual_seed(5)
    b = model.losses_from_parts(model.forward_parts(images), targets)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert math.isfinite(float(a[k].detach()))


def test_low_thresholds_keeps_every_candidate_and_restores_the_config():
    model = onestage.build_model("fcos", preset="smoke", num_classes=3).eval()
    cfg = model.cfg
    with torch.no_grad():
        parts = model.forward_parts(_images())
        assert sum(len(d["scores"]) for d in model.detect(parts)) == 0   # prior 0.01 < score_thresh 0.05
        with low_thresholds(model):
            assert model.cfg.score_thresh == 0.0
            assert sum(len(d["scores"]) for d in model.detect(parts)) > 0
    assert model.cfg is cfg
