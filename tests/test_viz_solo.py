"""SOLO figures: the grid picture of a hand-placed object, the assignment table, scale ranges, the model-output plots
on a tiny model, Matrix NMS matrices by hand, and the explorer redrawing when a control's ``.value`` changes."""
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from onestage.analysis.solo_memory import mask_branch_memory
from onestage.modeling.solo import SOLO, DecoupledSOLO, DecoupledSOLOConfig, SOLOConfig
from onestage.modeling.solov2 import SOLOv2, SOLOv2Config, dynamic_masks
from onestage.viz.solo import (
    canvas_size,
    grid_assignment_markdown,
    grid_assignment_rows,
    memory_markdown,
    model_outputs,
    top_candidates,
    plot_category_maps,
    plot_decoupled_maps,
    plot_grid_assignment,
    plot_kernels_and_masks,
    plot_mask_maps,
    plot_matrix_nms,
    plot_scale_ranges,
    solo_grid_explorer,
)



def _scene():
    """A 120×128 image (canvas 128×128): a 20×20 square (level 0) and a 100×100 square (levels 1 and 2)."""
    image = torch.rand(3, 120, 128)
    masks = torch.zeros(2, 120, 128, dtype=torch.uint8)
    masks[0, 40:60, 60:80] = 1
    masks[1, 0:100, 0:100] = 1
    target = dict(boxes=torch.tensor([[60.0, 40, 80, 60], [0, 0, 100, 100]]), labels=torch.tensor([2, 5]), masks=masks)
    return image, target


def test_canvas_size():
    assert canvas_size((120, 128)) == (128, 128) and canvas_size((320, 321)) == (320, 352)


def test_assignment_rows_by_hand():
    image, target = _scene()
    rows = grid_assignment_rows(target, canvas_size(image.shape[-2:]), class_names=["a", "b", "c", "d", "e", "f"])
    assert [(r["instance"], r["level"]) for r in rows] == [(0, 0), (1, 1), (1, 2)]
    assert rows[0]["cells"] == [581, 582, 621, 622, 661, 662] and rows[0]["center_cell"] == (15, 21)
    assert rows[0]["name"] == "c" and rows[0]["scale"] == pytest.approx(20)
    assert rows[1]["center_cell"] == (13, 13) and len(rows[1]["cells"]) == 9
    md = grid_assignment_markdown(rows)
    assert "| #0 | c | 20 | 0 | 40 | (15, 21) | 581, 582, 621, 622, 661, 662 |" in md


def test_grid_figure_shades_the_claimed_cells():
    image, target = _scene()
    fig = plot_grid_assignment(image, target, level=0)
    assert isinstance(fig, Figure)
    ax, right = fig.axes[0], fig.axes[1]
    cell = 128 / 40
    filled = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_fill() and p.get_alpha() == 0.45]
    corners = sorted((round(p.get_y() / cell), round(p.get_x() / cell)) for p in filled)
    assert corners == [(i, j) for i in (14, 15, 16) for j in (21, 22)]
    assert "k = 15·40 + 21 = 621" in right.get_title()
    target_img = right.images[0].get_array()
    assert target_img.shape == (32, 32)  # stride 4 of the 128×128 canvas
    assert float(np.asarray(target_img).sum()) == 25  # the 20×20 square at stride 4
    # the big object is on level 1, not 0: drawn dotted grey, no filled cell
    fig1 = plot_grid_assignment(image, target, level=1)
    assert len([p for p in fig1.axes[0].patches if p.get_fill()]) == 9
    empty = plot_grid_assignment(image, target, level=4)
    assert "no object" in empty.axes[1].texts[0].get_text()


def test_scale_range_figure_counts():
    _, target = _scene()
    fig = plot_scale_ranges([target])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("S=40" in t and "1 objects" in t for t in texts)
    assert "2 objects, 1 of them train two levels" in fig.axes[0].get_title()


def test_model_plots_on_tiny_models():
    torch.manual_seed(0)
    image, _ = _scene()
    v2 = SOLOv2(SOLOv2Config.preset("smoke"), num_classes=7)
    out = model_outputs(v2, image)
    assert out.canvas == (128, 128) and v2.training  # mode restored
    fig = plot_category_maps(out.head.cate_logits, image)
    assert len([a for a in fig.axes if a.images]) == 5
    cells = torch.tensor([0, 5, 1700])
    kernels = torch.cat([k[0].permute(1, 2, 0).reshape(-1, k.shape[1]) for k in out.head.kernels])[cells]
    probs = dynamic_masks(kernels, out.head.mask_features[0]).sigmoid()
    fig = plot_kernels_and_masks(kernels, probs, ["a", "b", "c"])
    assert fig.axes[0].images[0].get_array().shape == (3, 16)
    fig = plot_mask_maps(image, list(probs), ["a", "b", "c"])
    assert len([a for a in fig.axes if a.images]) == 4

    dec = DecoupledSOLO(DecoupledSOLOConfig.preset("smoke"), num_classes=7)
    head = model_outputs(dec, image).head
    x, y = head.mask_logits_x[0][0], head.mask_logits_y[0][0]
    fig = plot_decoupled_maps(image, x, y, i=3, j=7)
    prod = np.asarray(fig.axes[3].images[0].get_array())
    assert np.allclose(prod, (x[7].sigmoid() * y[3].sigmoid()).numpy(), atol=1e-6)
    assert "k = 127" in fig.axes[3].get_title()  # 3·40 + 7
    solo = SOLO(SOLOConfig.preset("smoke"), num_classes=7)
    vanilla = model_outputs(solo, image)
    # the dense oracle: all S² mask channels of every level, as the vanilla head computes them on request
    with torch.no_grad():
        dense = solo.eval().forward_parts([image], dense_masks=True).head
    solo.train()
    assert dense.mask_logits[0].shape[1] == 1600  # S² channels at level 0
    for model, outs in ((solo, vanilla), (v2, out)):
        cand = top_candidates(model, outs, k=5)
        assert cand.probs.shape == (5, 32, 32) and len(cand.titles) == 5
        assert (cand.scores[:-1] <= 1).all() and (cand.kernels is None) == (model is solo)
        s = [model.grid_numbers[int(lv)] for lv in cand.levels]
        assert all(0 <= int(k) < g * g for k, g in zip(cand.channels, s))
    # the vanilla candidate's mask is its channel k, upsampled to stride 4 (level 0 already is)
    lvl0 = (cand_solo := top_candidates(solo, vanilla, k=40)).levels == 0
    assert lvl0.any()
    n = int(lvl0.nonzero()[0])
    ref = dense.mask_logits[0][0, int(cand_solo.channels[n])].sigmoid()
    assert torch.allclose(cand_solo.probs[n], ref, atol=1e-6)


def test_matrix_nms_figure_by_hand():
    a = torch.zeros(3, 12, 12, dtype=torch.bool)
    a[0, :10, :10] = True
    a[1, :10, :8] = True     # IoU .8 with mask 0
    a[2, 10:, 10:] = True
    fig = plot_matrix_nms(a, torch.tensor([0, 0, 0]), torch.tensor([0.9, 0.8, 0.7]))
    iou = np.asarray(fig.axes[0].images[0].get_array())
    decay = np.asarray(fig.axes[1].images[0].get_array())
    assert iou[0, 1] == pytest.approx(0.8) and iou[1, 0] == 0
    assert decay[0, 1] == pytest.approx(math.exp(-2 * 0.64), rel=1e-5)
    assert fig.axes[2].get_title() == "3 of 3 kept"  # .8·exp(−1.28) = .22 stays above the .05 update threshold


def test_memory_markdown():
    md = memory_markdown({"tiny": mask_branch_memory([4], [8], (32, 32))})
    assert "| tiny | 0.0 MiB | 0.0 MiB | 2.0× |" in md


def test_explorer_redraws_on_value_changes():
    pytest.importorskip("ipywidgets")
    image, target = _scene()
    box = solo_grid_explorer(image, target)
    st = box.state
    assert st.error is None and st.redraws == 1
    box.controls["level"].value = 1
    assert box.controls["grid"].value == 36  # the level's published S
    assert st.error is None and st.redraws >= 2
    box.controls["grid"].value = 12
    assert [r["grid"] for r in st.rows if r["level"] == 1] == [12]
    box.controls["instance"].value = 1
    box.controls["sigma"].value = 0.5
    assert st.error is None
    assert isinstance(st.figure, Figure)
