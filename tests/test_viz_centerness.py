"""Center-ness figures, re-ranking and explorer: the eq. 3 target by hand, a hand-built head output whose order
flips when center-ness is multiplied in, detections matched by hand, and the widget redrawing on ``.value``."""
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import onestage
from onestage.modeling.fcos import FCOSHeadOutputs, compute_locations, postprocess
from onestage.viz import (
    centerness_explorer,
    centerness_map,
    match_detections,
    nms_effect,
    nms_effect_markdown,
    plot_centerness_heatmaps,
    plot_detections,
    plot_rerank,
    rerank_candidates,
    rerank_table,
    spearman,
)
from onestage.viz.centerness import find_demo, plot_quality_vs_location, rerank_summary, rerank_summary_markdown
from onestage.modeling.fast_inference import plain_inference


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_centerness_map_values():
    xs, ys, ctr = centerness_map(64, 64)
    assert ctr.shape == (65, 65)
    assert ctr[32, 32] == pytest.approx(1.0)  # the centre
    assert float(ctr[0].abs().max()) == 0.0 and float(ctr[:, -1].abs().max()) == 0.0  # the border
    assert float(ctr[1, 32]) < 0.2  # one pixel inside the top border
    assert torch.allclose(ctr, ctr.flip(0)) and torch.allclose(ctr, ctr.flip(1)) and torch.allclose(ctr, ctr.T)
    # by hand: at (16, 32) l=16, r=48, t=b=32 → sqrt(16/48 · 1)
    assert float(ctr[32, 16]) == pytest.approx(math.sqrt(1 / 3), abs=1e-6)
    _, _, wide = centerness_map(128, 32, stride=8)  # a stride-8 grid: 17 × 5 points, still 1 at the centre
    assert wide.shape == (5, 17) and wide[2, 8] == pytest.approx(1.0)
    assert torch.allclose(wide, wide.flip(0)) and torch.allclose(wide, wide.flip(1))


def test_heatmap_figure():
    fig = plot_centerness_heatmaps()
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4
    img = np.asarray(panels[1].images[0].get_array())  # 128 × 32 box
    assert img.shape == (33, 129) and img.max() == pytest.approx(1.0) and img.min() == 0.0
    assert "centerness" in fig.get_suptitle()


def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # monotone but not linear: still 1
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 8, 27])) == pytest.approx(1.0)
    # ties: ranks (1.5, 1.5, 3) vs (1, 2, 3) → Pearson = √3/2
    assert spearman(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))


def _fake_head():
    """One level, stride 8, a 4×4 map over a 32×32 image; locations at 4, 12, 20, 28 on each axis. Ground truth:
    the whole image. Location (12, 12), near the centre, predicts the box exactly with cls 0.5 and ctr 0.9;
    location (28, 28), in the corner, predicts [4, 4, 32, 32] (IoU 0.77) with cls 0.8 but ctr 0.1. Every other
    location is background."""
    logits = torch.full((1, 1, 4, 4), -10.0)
    reg = torch.zeros(1, 4, 4, 4)
    ctr = torch.full((1, 1, 4, 4), -5.0)
    near, far = (1, 1), (3, 3)  # (row, col) = (y, x) indices
    logits[0, 0, near[0], near[1]] = _logit(0.5)
    ctr[0, 0, near[0], near[1]] = _logit(0.9)
    reg[0, :, near[0], near[1]] = torch.tensor([12.0, 12.0, 20.0, 20.0]) / 8
    logits[0, 0, far[0], far[1]] = _logit(0.8)
    ctr[0, 0, far[0], far[1]] = _logit(0.1)
    reg[0, :, far[0], far[1]] = torch.tensor([24.0, 24.0, 4.0, 4.0]) / 8
    head = FCOSHeadOutputs([logits], [reg], [ctr], [])
    return head, compute_locations([(4, 4)], [8])


def test_rerank_flips_a_far_high_cls_candidate_below_a_central_one():
    head, locs = _fake_head()
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    t = rerank_candidates(head, locs, [8], gt, torch.tensor([0]))
    assert len(t) == 2
    far = int(torch.argmax(t.cls))
    near = 1 - far
    assert t.locations[far].tolist() == [28.0, 28.0] and t.locations[near].tolist() == [12.0, 12.0]
    assert t.cls[far] == pytest.approx(0.8) and t.ctr[far] == pytest.approx(0.1)
    assert t.iou[near] == pytest.approx(1.0) and t.iou[far] == pytest.approx(28 * 28 / 32 ** 2)
    assert torch.allclose(t.score, torch.sqrt(t.cls * t.ctr))
    assert t.center_dist[far] == pytest.approx(12 * math.sqrt(2)) and t.center_dist[near] == pytest.approx(
        4 * math.sqrt(2))
    assert t.ctr_target[near] > t.ctr_target[far]
    # by cls the far box wins, by sqrt(cls·ctr) the central one
    assert int(t.top(0, "cls")[0]) == far and int(t.top(0, "score")[0]) == near
    assert t.demo_gt == 0 and t.demo["changed"] and t.demo["iou_top_by_score"] > t.demo["iou_top_by_cls"]
    assert t.demo["rank_by_score_of_top_by_cls"] == 2
    rho = t.spearman()
    assert rho["cls"] == pytest.approx(-1.0) and rho["score"] == pytest.approx(1.0)
    assert "| 1 | 2 |" in t.markdown()
    # the same ordering survives NMS: postprocess keeps the central box first (the boxes overlap with IoU 0.77)
    det = postprocess(head, locs, [8], [(32, 32)], nms_thresh=0.6)[0]
    assert len(det["boxes"]) == 1 and det["boxes"][0].tolist() == [0.0, 0.0, 32.0, 32.0]
    # a ground truth of another class matches nothing
    other = rerank_candidates(head, locs, [8], gt, torch.tensor([3]))
    assert other.gt_index.tolist() == [-1, -1] and other.demo_gt == -1
    fig = plot_rerank(t, torch.rand(3, 32, 32))
    assert isinstance(fig, Figure) and len([ax for ax in fig.axes if ax.images]) == 2
    s = rerank_summary([t, other], min_candidates=2)
    assert s["objects"] == 1 and s["changed"] == 1 and s["better"] == 1 and s["rho_score"] == pytest.approx(1.0)
    assert "IoU up in 1" in rerank_summary_markdown(s)
    assert find_demo([other, t]) == 1
    assert isinstance(plot_quality_vs_location([t]), Figure)


def test_match_detections_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [50.0, 50.0, 60.0, 60.0],
                          [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    gt_labels = torch.tensor([0, 1])
    assert match_detections(boxes, scores, labels, gt, gt_labels) == ["tp", "dup", "fp", "tp"]
    # IoU of the second box with the first ground truth is 100/110: below 0.95 it is a plain false positive
    assert match_detections(boxes, scores, labels, gt, gt_labels, iou_thresh=0.95) == ["tp", "fp", "fp", "tp"]
    assert match_detections(boxes, scores, labels, gt, torch.tensor([0, 0]))[3] == "fp"  # wrong class


@pytest.fixture(scope="module")
def smoke_model():
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=3).eval()
    # an untrained head scores every location at the prior 0.01: raise the class bias so candidates exist
    torch.nn.init.constant_(model.head.cls_logits.bias, 0.0)
    torch.nn.init.constant_(model.head.ctrness.bias, -1.0)  # ctr ≈ 0.27, so √(cls·ctr) differs from cls
    return model


def _sample(seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, 64, 96, generator=g)
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 56.0], [50.0, 10.0, 90.0, 40.0]]),
              "labels": torch.tensor([0, 2])}
    return image, target


def test_rerank_table_on_a_model_matches_postprocess(smoke_model):
    image, target = _sample(0)
    t = rerank_table(smoke_model, image, target)
    assert len(t) > 0 and torch.allclose(t.score, torch.sqrt(t.cls * t.ctr))
    with torch.no_grad(), plain_inference(smoke_model):
        det = smoke_model([image])[0]
    # every detection after NMS is one of the candidates: its score is one of theirs
    assert len(det["scores"]) > 0
    for score in det["scores"][:20]:
        assert float((t.score - score).abs().min()) < 1e-6
    assert isinstance(plot_rerank(smoke_model, image, target, class_names=["a", "b", "c"]), Figure)


def test_nms_effect_counts_on_a_list_dataset(smoke_model):
    data = [_sample(0), _sample(1)]
    e = nms_effect(smoke_model, data, num_images=2)
    assert e["num_images"] == 2 and e["num_gt"] == 4 and "AP" not in e["with"]  # no .coco: counts only
    for side in ("with", "without"):
        s = e[side]
        assert s["tp"] + s["dup"] + s["fp"] <= 4 and s["tp"] + s["missed"] == 4
    assert "cls alone" in nms_effect_markdown(e)


def test_explorer_redraws_when_a_control_changes(smoke_model):
    data = [_sample(0), _sample(1)]
    w = centerness_explorer(smoke_model, data, class_names=["a", "b", "c"], score_thresh=0.05, dpi=30)
    c, st = w.controls, w.state
    assert set(c) == {"image_index", "score_thresh", "use_centerness"}
    assert st.redraws == 1 and st.error is None and isinstance(st.figure, Figure)
    with_ctr = st.detections["scores"].clone()
    png = w.children[2].value

    c["use_centerness"].value = False  # the same head outputs, scored by cls alone
    assert st.redraws == 2 and st.error is None
    assert not torch.equal(st.detections["scores"], with_ctr) and "cls alone" in st.figure.axes[0].get_title()
    assert w.children[2].value != png

    c["score_thresh"].value = 0.95  # nothing that confident in an untrained model
    assert st.redraws == 3 and st.counts["tp"] + st.counts["dup"] + st.counts["fp"] == 0
    assert st.counts["missed"] == 2

    c["image_index"].value = 1
    assert st.redraws == 4 and st.error is None and "image 1" in w.children[1].value
    assert plot_detections(smoke_model, *data[1], score_thresh=0.95).counts == st.counts


def test_detections_figure_keeps_the_best_n(smoke_model):
    image, target = _sample(0)
    fig = plot_detections(smoke_model, image, target, score_thresh=0.05, max_detections=2)
    assert sum(fig.counts[k] for k in ("tp", "dup", "fp")) == 2 and "best 2" in fig.axes[0].get_title()
