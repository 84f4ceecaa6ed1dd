"""onestage.viz.blendmask: the blender trace agrees with the model, the knobs do what they say, the figures and the
explorer draw, and the per-RoI costs match hand counts."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from matplotlib.figure import Figure

from onestage.modeling.blendmask import BlendMask, BlendMaskConfig
from onestage.ops.blender import blend_reference
from onestage.viz.blendmask import (blender_cost, blender_explorer, blender_trace, cost_markdown, mask_rcnn_head_cost,
                                    plot_blender_settings, plot_blender_steps)
from onestage.modeling.fast_inference import plain_inference



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(BlendMaskConfig.preset("smoke"), score_thresh=0.0, pre_nms_topk=30,
                              detections_per_img=8)
    m = BlendMask(cfg, num_classes=3).eval()
    torch.nn.init.constant_(m.head.bbox_pred.bias, 2.0)  # untrained: boxes two strides a side instead of empty
    torch.nn.init.normal_(m.top_layer.weight, std=0.5)   # attentions that differ from basis to basis
    return m


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [(torch.rand(3, 96, 112), {}) for _ in range(2)]


def test_trace_reproduces_the_models_own_masks(model, images):
    image = images[0][0]
    with torch.no_grad(), plain_inference(model):
        pred = model([image])[0]
    for i in (0, 3):
        t = blender_trace(model, image, i)
        assert t.note == ""
        torch.testing.assert_close(t.box, pred["boxes"][i])
        assert torch.equal(t.pasted, pred["masks"][i])
        assert t.pasted.shape == image.shape[-2:]
    assert t.rois.shape == (4, 56, 56) and t.attn.shape == (4, 14, 14) and t.bases.shape == (4, 24, 28)
    torch.testing.assert_close(t.weights.sum(0), torch.ones(56, 56))
    torch.testing.assert_close(t.products.sum(0), t.logits)
    torch.testing.assert_close(t.logits, blend_reference(t.rois[None], t.attn[None])[0])


def test_trace_knobs(model, images):
    image = images[0][0]
    cache = {}
    two = blender_trace(model, image, 0, keep_bases=2, cache=cache, key=0)
    assert two.num_bases == 2 and torch.allclose(two.weights.sum(0), torch.ones(56, 56))
    coarse = blender_trace(model, image, 0, attn_size=3, interpolation="nearest", cache=cache, key=0)
    assert coarse.attn.shape == (4, 3, 3) and coarse.interpolation == "nearest"
    # nearest 3 → 56: piecewise constant, so at most 3 distinct values per row of a weight map
    assert len(torch.unique(coarse.weights[0, 0])) <= 3
    yolact = blender_trace(model, image, 0, setting="yolact", cache=cache, key=0)
    assert yolact.attn.shape == (4, 1, 1)
    assert torch.allclose(yolact.weights, yolact.weights[:, :1, :1].expand_as(yolact.weights))
    fcis = blender_trace(model, image, 0, setting="fcis", cache=cache, key=0)
    assert fcis.normalize == "none" and fcis.interpolation == "nearest"
    assert fcis.weights[0, :28, :28].eq(1).all() and fcis.weights[0, 28:].eq(0).all()
    assert fcis.weights[3, 28:, 28:].eq(1).all()
    odd = blender_trace(model, image, 0, keep_bases=3, setting="fcis", cache=cache, key=0)
    assert odd.num_bases == 1 and "not a square" in odd.note
    one = blender_trace(model, image, 0, keep_bases=1, cache=cache, key=0)
    assert one.normalize == "sigmoid" and torch.allclose(one.prob, one.products[0], atol=1e-5)
    with pytest.raises(ValueError, match="setting"):
        blender_trace(model, image, 0, setting="solo")


def test_steps_figure_layout(model, images):
    fig = plot_blender_steps(model, images[0][0], instance=1)
    assert isinstance(fig, Figure) and len(fig.axes) == 6 * 5
    one = plot_blender_steps(fig.trace, show_basis=2)
    assert len(one.axes) == 6 * 2 and "basis 3" in one.axes[1].get_title()


def test_settings_figure(model, images):
    fig = plot_blender_settings(model, images[1][0], instance=0, class_names=["a", "b", "c"])
    assert len(fig.axes) == 9 and [t.setting for t in fig.traces] == ["blender", "yolact", "fcis"]
    assert "FCIS" in fig.axes[2].get_title()


def test_explorer_redraws_on_every_control(model, images):
    w = blender_explorer(model, images, dpi=20)
    assert w.state.redraws == 1 and w.state.error is None
    changes = [("instance", 2), ("keep_bases", 2), ("attn_size", 4), ("interpolation", "nearest"),
               ("show_basis", 1), ("setting", "fcis"), ("image_index", 1)]
    for n, (name, value) in enumerate(changes, start=2):
        w.controls[name].value = value
        assert w.state.redraws == n and w.state.error is None, (name, w.state.error)
    assert w.state.trace.setting == "fcis" and w.state.trace.instance == 2
    assert len(w.state.figure.axes) == 6 * 2  # one basis shown


def test_costs_match_hand_counts():
    b = blender_cost(num_bases=4, attn_size=14, resolution=56)
    # interpolate 7 + softmax 5 + multiply 1 + sum 1 FLOPs per K·R² value (ops/blender.py docstring)
    assert b["flops_blend"] == 14 * 4 * 56 * 56
    assert b["flops_pool"] == 8 * 4 * 56 * 56
    assert b["flops_default"] == 0  # FlopCounterMode's own table counts no elementwise op
    assert b["params_per_roi"] == 0 and b["params_shared"] == 256 * 784 * 9 + 784
    m = mask_rcnn_head_cost()
    convs = 4 * 2 * 256 * 256 * 9 * 14 * 14
    deconv = 2 * 256 * 256 * 4 * 14 * 14
    predictor = 2 * 256 * 80 * 28 * 28
    assert m["flops_default"] == convs + deconv + predictor
    assert m["params_per_roi"] == 4 * (256 * 256 * 9 + 256) + (256 * 256 * 4 + 256) + (256 * 80 + 80)
    table = cost_markdown([b, m])
    assert "| BlendMask blender" in table and "1,059,717,120" in table
