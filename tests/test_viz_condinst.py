"""onestage.viz.condinst: the ROI-vs-full-image figure's masks, the parameter layout, the layer-by-layer trace against
the model's own dynamic head, the knobs (zeroed coordinates = W0 without its coordinate columns), the two-instance
swaps, the look-alike search, the explorer's wiring and the timing table beside Table 1."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from onestage.experiments.tables import load_table
from onestage.modeling.condinst import CondInst, CondInstConfig
from onestage.ops.dynamic_mask_head import dynamic_mask_head_reference, parse_dynamic_params
from onestage.viz.condinst import (PAPER_MASK_RCNN_MS, condinst_explorer, condinst_trace, find_look_alike_pair,
                                   head_input_names, mask_head_timing_markdown, plot_dynamic_params,
                                   plot_instance_layers, plot_roi_vs_full_mask, plot_two_instances,
                                   probe_markdown, probe_rows, table1_timing_settings)
from onestage.analysis.condinst import _two_heads
from onestage.modeling.fast_inference import plain_inference



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), score_thresh=0.0, pre_nms_topk=30,
                              detections_per_img=8)
    m = CondInst(cfg, num_classes=3).eval()
    torch.nn.init.constant_(m.head.bbox_pred.bias, 2.0)    # untrained: boxes two strides a side instead of empty
    torch.nn.init.normal_(m.controller.weight, std=0.3)    # heads that differ from location to location
    return m


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [torch.rand(3, 90, 100), torch.rand(3, 90, 100)]  # not multiples of 8: padding is cropped


def test_roi_vs_full_mask_figure():
    fig = plot_roi_vs_full_mask(size=160, box_shrink=0.2)
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    m, box, small = fig.masks, fig.boxes["tight"], fig.boxes["small"]
    true = m["true"]
    x0, y0, x1, y1 = box.int().tolist()
    assert true[:, :x0].sum() == 0 and true[:, x1:].sum() == 0 and true[:y0].sum() == 0 and true[y1:].sum() == 0
    assert true[y0:y1, x0:x1].float().mean() < 0.5  # a crescent fills less than half its box
    assert np.asarray(fig.axes[1].images[0].get_array()).shape == (28, 28)
    # box-bound: nothing of the small box's RoI mask lies outside that box, though the object does
    sx0, sy0, sx1, sy1 = small.tolist()
    ys, xs = torch.nonzero(m["roi_small_box"], as_tuple=True)
    assert xs.min() >= int(sx0) - 1 and xs.max() <= int(sx1) and ys.min() >= int(sy0) - 1 and ys.max() <= int(sy1)
    assert true[:, : int(sx0) - 1].any()
    ious = fig.ious
    assert ious["roi_small_box"] < ious["roi"] < ious["full"] <= 1.0
    assert ious["full"] > 0.9


def test_head_input_names():
    assert head_input_names(8) == ["rel. x", "rel. y"] + [f"Fmask {k}" for k in range(1, 9)]
    assert head_input_names(2, "none") == ["Fmask 1", "Fmask 2"]
    assert head_input_names(2, "coords_only") == ["rel. x", "rel. y"]
    assert head_input_names(1, "abs") == ["abs. x", "abs. y", "Fmask 1"]


def test_dynamic_params_figure_layout():
    fig = plot_dynamic_params(torch.arange(169.0))
    weights, biases = fig.parsed
    assert [tuple(w.shape) for w in weights] == [(8, 10), (8, 8), (1, 8)]
    assert weights[0][0, :3].tolist() == [0, 1, 2] and biases[0][0] == 152 and biases[2][0] == 168
    grid = np.asarray(fig.axes[0].images[0].get_array())
    assert grid.shape == (8, 12)  # 10 inputs, a gap, the bias
    assert grid[0, 0] == 0 and grid[7, 9] == 79 and np.isnan(grid[0, 10]) and grid[0, 11] == 152
    assert "88 + 72 + 9 = 169" in fig.get_suptitle()
    assert "W0 8×10 = 80" in fig.axes[0].get_title()
    two = plot_dynamic_params(torch.zeros(17), mask_channels=2, width=4, depth=2, coords="none")
    assert [tuple(w.shape) for w in two.parsed[0]] == [(4, 2), (1, 4)] and "12 + 5 = 17" in two.get_suptitle()


def test_trace_reproduces_the_models_own_head(model, images):
    image = images[0]
    with torch.no_grad(), plain_inference(model):
        pred = model([image])[0]
        mask_feats = model.forward_parts([image]).mask_inputs["mask_feats"]
    assert len(pred["boxes"]) == 8
    for k in (0, 5):
        t = condinst_trace(model, image, k)
        assert t.note == "" and t.instance == k
        torch.testing.assert_close(t.box, pred["boxes"][k])
        assert torch.equal(t.pasted, pred["masks"][k]) and t.pasted.shape == image.shape[-2:]
        with torch.no_grad():
            own = model.mask_logits(mask_feats, t.params[None], torch.zeros(1, dtype=torch.long), t.location[None],
                                    torch.tensor([t.fpn_level]))[0]
        torch.testing.assert_close(t.logits_up, own)
        torch.testing.assert_close(t.mask_feats, mask_feats[0])
    # 169 parameters; two hidden layers of 8 channels after the ReLU; maps at stride 8 of the padded batch
    h, w = mask_feats.shape[-2:]
    assert t.params.shape == (169,) and [tuple(x.shape) for x in t.hidden] == [(8, h, w), (8, h, w)]
    assert all(float(x.min()) >= 0 for x in t.hidden)
    assert t.logits.shape == (h, w) and t.logits_up.shape == (4 * h, 4 * w) and t.out_stride == 2
    # relative coordinates by hand: pixel (0, 0) sits at (4, 4)
    assert t.coords[0, 0, 0] == pytest.approx((float(t.location[0]) - 4) / t.size_of_interest)
    assert t.coords[1, 2, 1] == pytest.approx((float(t.location[1]) - 20) / t.size_of_interest)
    assert t.input_names[:3] == ["rel. x", "rel. y", "Fmask 1"] and t.head_input.shape == (10, h, w)


def test_zeroed_coordinates_equal_a_head_without_its_coordinate_columns(model, images):
    cache = {}
    t = condinst_trace(model, images[0], 2, cache=cache, key=0)
    off = condinst_trace(model, images[0], 2, rel_coords=False, cache=cache, key=0)
    assert off.coords.abs().max() == 0 and not off.rel_coords
    assert not torch.allclose(off.logits, t.logits)
    weights, biases = parse_dynamic_params(t.params[None], 10, 8, 3)
    no_coords = torch.cat([weights[0][:, :, 2:].flatten(1), weights[1].flatten(1), weights[2].flatten(1), *biases],
                          dim=1)
    assert no_coords.shape == (1, 153)
    by_hand = dynamic_mask_head_reference(t.mask_feats[None], no_coords, torch.zeros(1, dtype=torch.long),
                                          t.location[None], torch.tensor([t.size_of_interest]), 8, 8, 3, "none")[0]
    torch.testing.assert_close(off.logits, by_hand)


def test_upsample_and_threshold_knobs(model, images):
    cache = {}
    t = condinst_trace(model, images[0], 1, cache=cache, key=0)
    one = condinst_trace(model, images[0], 1, upsample_factor=1, cache=cache, key=0)
    assert torch.equal(one.logits_up, one.logits) and one.out_stride == 8
    eight = condinst_trace(model, images[0], 1, upsample_factor=8, cache=cache, key=0)
    assert eight.logits_up.shape == (8 * t.logits.shape[0], 8 * t.logits.shape[1]) and eight.out_stride == 1
    assert eight.pasted.shape == t.pasted.shape == images[0].shape[-2:]
    # aligned upsampling keeps pixel k's value at index f·k + f//2
    torch.testing.assert_close(eight.logits_up[4::8, 4::8], t.logits)
    strict = condinst_trace(model, images[0], 1, threshold=0.9, cache=cache, key=0)
    assert not (strict.pasted & ~t.pasted).any()
    with pytest.raises(ValueError, match="upsample_factor"):
        condinst_trace(model, images[0], 1, upsample_factor=3, cache=cache, key=0)


def test_probe_rows(model, images):
    cache = {}
    base = condinst_trace(model, images[0], 0, cache=cache, key=0)
    target = {"masks": torch.stack([torch.zeros(90, 100, dtype=torch.uint8), base.pasted.to(torch.uint8)])}
    rows = probe_rows(model, images[0], target, 0, cache=cache, key=0)
    assert [r["setting"] for r in rows][:2] == ["model as trained", "coordinate channels zeroed"]
    assert len(rows) == 2 + 4 + 2 and [r["upsample_factor"] for r in rows[2:6]] == [1, 2, 4, 8]
    assert "(model's)" in rows[4]["setting"] and rows[4]["pixels"] == rows[0]["pixels"]
    assert rows[0]["gt"] == 1 and rows[0]["iou"] == pytest.approx(1.0) and rows[0]["pixels"] == int(base.pasted.sum())
    off = condinst_trace(model, images[0], 0, rel_coords=False, cache=cache, key=0)
    assert rows[1]["pixels"] == int(off.pasted.sum()) and rows[1]["rel_coords"] is False
    assert rows[-1]["threshold"] == pytest.approx(0.7) and rows[-1]["pixels"] <= rows[0]["pixels"]
    md = probe_markdown(rows)
    assert len(md.splitlines()) == 2 + len(rows) and "| coordinate channels zeroed | zeroed | ×4 | 0.5 |" in md
    assert all(r["iou"] != r["iou"] for r in probe_rows(model, images[0], {}, 0, cache=cache, key=0))  # NaN


def test_instance_layers_figure(model, images):
    t = condinst_trace(model, images[0], 0)
    fig = plot_instance_layers(t, class_names=["a", "b", "c"])
    assert isinstance(fig, Figure) and len(fig.axes) == 4 * 11  # 4 rows (input, 2 hidden, output) × (1 + 10)
    assert fig.axes[1].get_title() == "rel. x" and fig.axes[3].get_title() == "Fmask 1"
    assert fig.axes[12].get_title() == "layer 1 ch 1"
    assert np.asarray(fig.axes[12].images[0].get_array()).shape == tuple(t.hidden[0][0].shape)
    off = plot_instance_layers(condinst_trace(model, images[0], 0, rel_coords=False))
    assert "(zeroed)" in off.axes[1].get_title() and "ZEROED" in off.get_suptitle()


def test_two_instances_share_features_and_swap_coordinates(model, images):
    cache = {}
    a = condinst_trace(model, images[0], 0, cache=cache, key=0)
    b = condinst_trace(model, images[0], 3, cache=cache, key=0)
    fig = plot_two_instances(a, b)
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * 9
    assert not torch.allclose(a.params, b.params) and -1 <= fig.cosine <= 1
    swap = condinst_trace(model, images[0], 0, coords_from=3, cache=cache, key=0)
    torch.testing.assert_close(swap.coords, b.coords)
    assert torch.equal(fig.swapped["a_filters_b_coords"], swap.pasted)
    assert torch.equal(fig.swapped["b_filters_a_coords"],
                       condinst_trace(model, images[0], 3, coords_from=0, cache=cache, key=0).pasted)
    other = condinst_trace(model, images[1], 0)
    with pytest.raises(ValueError, match="same image"):
        plot_two_instances(a, other)


def test_find_look_alike_pair(model, images):
    cache = {}
    with torch.no_grad():
        preds = [model([im])[0] for im in images]
    first = condinst_trace(model, images[1], 0, cache=cache, key=1)  # fills the cache
    location_inds = cache[1].det["location_inds"]
    labels = preds[1]["labels"].tolist()
    # two detections of one class from two different locations (FCOS may emit several classes at one location)
    pair, label = None, None
    for c in sorted(set(labels)):
        ks = [k for k, lab in enumerate(labels) if lab == c]
        elsewhere = [k for k in ks if int(location_inds[k]) != int(location_inds[ks[0]])]
        if elsewhere:
            pair, label = [ks[0], elsewhere[0]], c
            break
    assert pair is not None and first.num_detections == 8
    other = next(c for c in range(3) if c != label)
    data = [
        # image 0: two objects of different categories → no look-alike pair there
        (images[0], {"boxes": preds[0]["boxes"][:2], "labels": torch.tensor([label, other])}),
        # image 1: two objects of one category exactly where two of its detections are
        (images[1], {"boxes": preds[1]["boxes"][pair], "labels": torch.tensor([label, label])}),
    ]
    found = find_look_alike_pair(model, data, [0, 1], cache=cache)
    assert found["image_index"] == 1 and found["instances"] == tuple(pair) and found["category"] == label
    areas = [float((bx[2] - bx[0]) * (bx[3] - bx[1])) for bx in preds[1]["boxes"][pair]]
    similar = find_look_alike_pair(model, data, [0, 1], min_area_ratio=0.999 * min(areas) / max(areas),
                                   cache=cache)
    assert similar["instances"] == tuple(pair) and "similar size" not in similar["note"]
    too_strict = find_look_alike_pair(model, data, [0, 1], min_area_ratio=1.01, cache=cache)
    assert too_strict["instances"] == tuple(pair) and "no pair of similar size" in too_strict["note"]
    fallback = find_look_alike_pair(model, data[:1], [0])
    a, b = fallback["instances"]
    assert fallback["image_index"] == 0 and fallback["category"] is None and "no image" in fallback["note"]
    t_a, t_b = condinst_trace(model, images[0], a), condinst_trace(model, images[0], b)
    assert a == 0 and not torch.equal(t_a.location, t_b.location) and not torch.equal(t_a.params, t_b.params)


def test_two_heads_skips_detections_from_the_same_location():
    assert _two_heads([3, 0, 1], torch.tensor([7, 9, 5, 7])) == (3, 1)  # 0 shares location 7 with 3
    assert _two_heads([0, 1], torch.tensor([4, 4])) is None


def test_explorer_redraws_on_every_control(model, images):
    data = [(im, {"masks": torch.zeros(1, *im.shape[-2:], dtype=torch.uint8)}) for im in images]
    w = condinst_explorer(model, data, dpi=20)
    st = w.state
    assert st.redraws == 1 and st.error is None and isinstance(st.figure, Figure) and st.trace.rel_coords
    changes = [("instance", 2), ("rel_coords", False), ("upsample_factor", 8), ("threshold", 0.8),
               ("image_index", 1)]
    for n, (name, value) in enumerate(changes, start=2):
        w.controls[name].value = value
        assert st.redraws == n and st.error is None, (name, st.error)
    t = st.trace
    assert t.instance == 2 and not t.rel_coords and t.upsample_factor == 8 and t.threshold == pytest.approx(0.8)
    assert t.coords.abs().max() == 0 and "zeroed" in w.children[-2].value and "image 1" in w.children[-2].value
    assert torch.equal(t.pasted, condinst_trace(model, images[1], 2, False, 8, 0.8).pasted)


def test_timing_table_beside_table1():
    table = load_table("condinst_table1")
    settings = table1_timing_settings(table)
    assert settings == [(1, 8, 8), (2, 8, 8), (3, 8, 8), (4, 8, 8), (3, 2, 8), (3, 4, 8), (3, 16, 8)]
    result = {"maskrcnn_ms": 10.0, "maskrcnn_params": 2643537,
              "condinst": [{"depth": d, "width": w, "cmask": c, "params": 169, "ms": 2.0, "ms_with_upsample": 3.0}
                           for d, w, c in [(3, 8, 8), (1, 8, 8), (3, 8, 16)]]}
    md = mask_head_timing_markdown(result, table)
    lines = md.splitlines()
    assert len(lines) == 2 + 3 + 1
    assert lines[2] == "| CondInst depth 3, width 8 (`depth=3`) | 169 | 2.0 | 0.20 | 4.5 | 0.39 |"  # 4.5 / 11.4
    assert lines[3].endswith("| 2.2 | 0.19 |")  # depth 1: 2.2 / 11.4
    assert lines[4].endswith("| – | – |")       # Cmask 16 is not in Table 1
    assert lines[5] == f"| Mask R-CNN mask head (28×28) | 2,643,537 | 10.0 | 1.00 | {PAPER_MASK_RCNN_MS:g} | 1.00 |"


@pytest.mark.parametrize("overrides", [{"mask_head_depth": 1, "rel_coords": "none"},
                                       {"mask_head_width": 4, "mask_head_depth": 2, "rel_coords": "coords_only"},
                                       {"rel_coords": "abs", "mask_branch_out_channels": 2}])
def test_other_head_configurations(overrides, images):
    torch.manual_seed(0)
    cfg = dataclasses.replace(CondInstConfig.preset("smoke"), score_thresh=0.0, pre_nms_topk=10,
                              detections_per_img=4, **overrides)
    m = CondInst(cfg, num_classes=2).eval()
    torch.nn.init.constant_(m.head.bbox_pred.bias, 2.0)
    torch.nn.init.normal_(m.controller.weight, std=0.3)
    with torch.no_grad(), plain_inference(m):
        pred = m([images[0]])[0]
    cache = {}
    a = condinst_trace(m, images[0], 0, cache=cache, key=0)
    b = condinst_trace(m, images[0], 1, cache=cache, key=0)
    assert torch.equal(a.pasted, pred["masks"][0]) and torch.equal(b.pasted, pred["masks"][1])
    assert len(a.hidden) == cfg.mask_head_depth - 1 and a.params.numel() == cfg.num_dynamic_params
    assert a.head_input.shape[0] == len(a.input_names)
    assert {"none": 0, "coords_only": 2, "abs": 2}[cfg.rel_coords] == a.coords.shape[0]
    layers = plot_instance_layers(a)
    assert len(layers.axes) == (1 + cfg.mask_head_depth) * (1 + max(len(a.input_names), cfg.mask_head_width, 4))
    assert len(plot_dynamic_params(a).parsed[0]) == cfg.mask_head_depth
    plot_two_instances(a, b)
    if cfg.rel_coords == "none":
        assert "nothing to zero" in condinst_trace(m, images[0], 0, rel_coords=False, cache=cache, key=0).note
