"""FCOS Table 1/2 statistics (ambiguous samples, best possible recall) on hand-computed cases."""
import json

import pytest
import torch

from onestage.analysis.fcos_assignment import (
    ANCHOR_SETTINGS,
    FCOS_SETTINGS,
    AnchorSetting,
    AssignmentSetting,
    anchor_image_counts,
    assignment_statistics,
    fcos_image_counts,
    format_table,
    iter_coco_boxes,
    level_locations,
)

NO_FPN = AssignmentSetting("P4 only", strides=(16,), sizes_of_interest=None)


def test_level_locations_match_fcos_formula():
    (p4,) = level_locations(64, 96, (16,))
    assert p4.shape == (4 * 6, 2)
    assert p4[0].tolist() == [8.0, 8.0]
    assert p4[1].tolist() == [24.0, 8.0]  # x first, row-major
    assert p4[-1].tolist() == [88.0, 56.0]


def test_single_box_counts_every_inside_location_once():
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    c = fcos_image_counts(boxes, torch.tensor([0]), 256, 256, NO_FPN)
    # x, y ∈ {8, 24, ..., 88}: 6 × 6 locations strictly inside
    assert (c.positives, c.ambiguous, c.ambiguous_diff_class, c.recalled_boxes) == (36, 0, 0, 1)


@pytest.mark.parametrize("labels, diff", [([0, 1], 9), ([2, 2], 0)])
def test_overlap_is_ambiguous_and_class_aware(labels, diff):
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 50.0, 150.0, 150.0]])
    c = fcos_image_counts(boxes, torch.tensor(labels), 256, 256, NO_FPN)
    # the overlap (50, 100)² holds x, y ∈ {56, 72, 88}: 9 locations; each box alone has 36
    assert c.ambiguous == 9
    assert c.ambiguous_diff_class == diff
    assert c.positives == 36 + 36 - 9
    assert c.recalled_boxes == 2


def test_identical_boxes_lose_one_to_the_min_area_rule():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]])
    c = fcos_image_counts(boxes, torch.tensor([0, 1]), 128, 128, NO_FPN)
    assert c.recalled_boxes == 1 and c.boxes == 2


def test_fpn_moves_a_nested_small_box_to_another_level():
    # a 200-px box and a 40-px box inside it: on one level they compete; with FPN the big one goes to P5/P6
    boxes = torch.tensor([[0.0, 0.0, 200.0, 200.0], [80.0, 80.0, 120.0, 120.0]])
    labels = torch.tensor([0, 1])
    no_fpn = fcos_image_counts(boxes, labels, 256, 256, NO_FPN)
    fpn = fcos_image_counts(boxes, labels, 256, 256, AssignmentSetting("fpn"))
    assert no_fpn.ambiguous > 0
    assert fpn.ambiguous == 0
    assert fpn.recalled_boxes == 2


def test_center_sampling_only_removes_positives():
    torch.manual_seed(0)
    xy = torch.rand(12, 2) * 400
    wh = torch.rand(12, 2) * 300 + 8
    boxes = torch.cat([xy, (xy + wh).clamp(max=511)], dim=1)
    labels = torch.randint(0, 3, (12,))
    plain = fcos_image_counts(boxes, labels, 512, 512, AssignmentSetting("fpn"))
    centre = fcos_image_counts(boxes, labels, 512, 512, AssignmentSetting("cs", center_sampling=True))
    assert centre.positives <= plain.positives
    assert centre.ambiguous <= plain.ambiguous


def test_anchor_bpr_rules():
    # a 4×4 box: the smallest anchor is 32×32 (IoU 1/64), so only the "all low-quality" rule recalls it;
    # a 32×32 box centred on a P3 location equals an anchor exactly
    tiny = torch.tensor([[10.0, 10.0, 14.0, 14.0]])
    exact = torch.tensor([[20.0 - 16, 20.0 - 16, 20.0 + 16, 20.0 + 16]])
    none, lq04, allq = (AnchorSetting("n"), AnchorSetting("a", low_quality=0.4), AnchorSetting("b", low_quality=0.0))
    assert anchor_image_counts(tiny, 128, 128, none).recalled_boxes == 0
    assert anchor_image_counts(tiny, 128, 128, lq04).recalled_boxes == 0
    assert anchor_image_counts(tiny, 128, 128, allq).recalled_boxes == 1
    assert anchor_image_counts(exact, 128, 128, none).recalled_boxes == 1


def test_statistics_over_a_coco_file(tmp_path):
    ann = {
        "images": [{"id": 1, "width": 400, "height": 200}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 0, "area": 2500},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [25, 25, 50, 50], "iscrowd": 0, "area": 2500},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [0, 0, 400, 200], "iscrowd": 1, "area": 1},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [10, 10, 0, 5], "iscrowd": 0, "area": 0},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    samples = list(iter_coco_boxes(path, min_size=400, max_size=1000))
    boxes, labels, h, w = samples[0]
    assert (h, w) == (400, 800)  # short side 200 → 400
    assert torch.equal(boxes[1], torch.tensor([50.0, 50.0, 150.0, 150.0]))
    assert labels.tolist() == [0, 1]
    assert samples[1][0].shape == (0, 4)  # the zero-width box is skipped, crowd too
    rows = assignment_statistics(samples)
    assert [r["setting"] for r in rows] == [s.name for s in (*FCOS_SETTINGS, *ANCHOR_SETTINGS)]
    for r in rows:
        assert r["boxes"] == 2 and 0 <= r["BPR"] <= 100
    table = format_table(rows, {FCOS_SETTINGS[1].name: {"BPR": 98.40}})
    assert "98.40" in table and table.count("\n") == len(rows) + 1
