"""FCOS assignment figures and explorer: the dots drawn are exactly the positives ``assign_targets`` makes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from onestage.analysis.fcos_assignment import ANCHOR_SETTINGS, FCOS_SETTINGS, assignment_statistics
from onestage.modeling.fcos import assign_targets, compute_locations
from onestage.viz import (
    assignment_explorer,
    box_assignment_summary,
    image_assignment,
    plot_assignment,
    plot_level_locations,
    plot_statistics,
    published_assignment_numbers,
)

REPO = Path(__file__).resolve().parents[1]
NO_FPN = dict(strides=(16,), sizes_of_interest=(), center_sampling=False)
# On a 64×64 image P4 has locations 8, 24, 40, 56 on each axis. Box 0 strictly contains x, y ∈ {8, 24} (4
# locations; 40 lies on its border), box 1 x, y ∈ {24, 40, 56} (9); they share (24, 24). Equal areas: the tie goes
# to box 0.
BOXES = torch.tensor([[0.0, 0.0, 40.0, 40.0], [20.0, 20.0, 60.0, 60.0]])
LABELS = torch.tensor([0, 1])
NAMES = ["ring", "star"]


def _offsets(fig: Figure, gid: str) -> np.ndarray:
    parts = [c.get_offsets() for ax in fig.axes for c in ax.collections if c.get_gid() == gid]
    return np.concatenate([np.asarray(p).reshape(-1, 2) for p in parts]) if parts else np.zeros((0, 2))


def test_two_box_image_by_hand():
    fig = plot_assignment(torch.zeros(3, 64, 64), BOXES, LABELS, NAMES, **NO_FPN)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    dots, rings = _offsets(fig, "positives"), _offsets(fig, "ambiguous")
    assert len(dots) == 4 + 9 - 1
    assert rings.tolist() == [[24.0, 24.0]]
    a = image_assignment(64, 64, BOXES, LABELS, **NO_FPN)
    (g,) = a.gt_inds
    assert a.positives() == 12 and a.ambiguous() == 1
    assert g[1 * 4 + 1] == 0  # (24, 24) → box 0 (min-area tie → first box)
    assert a.positives_per_box()[:, 0].tolist() == [4, 8]
    # the shared location is coloured like box 0
    coll = next(c for c in fig.axes[0].collections if c.get_gid() == "positives")
    k = int(np.flatnonzero((coll.get_offsets() == [24.0, 24.0]).all(axis=1))[0])
    box0 = next(p for p in fig.axes[0].patches if tuple(p.get_xy()) == (0.0, 0.0))
    assert np.allclose(coll.get_facecolors()[k][:3], box0.get_edgecolor()[:3])


@pytest.mark.parametrize("center_sampling", [True, False])
def test_dots_equal_the_positives_of_assign_targets_on_every_level(center_sampling):
    boxes = torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 250.0, 230.0], [100.0, 90.0, 140.0, 200.0]])
    labels = torch.tensor([0, 1, 0])
    fig = plot_assignment(torch.rand(3, 256, 320), boxes, labels, NAMES, center_sampling=center_sampling)
    assert len(fig.axes) == 5
    # independently: the model's own locations (feature maps of the 256×320 image) through assign_targets
    shapes = [(256 // s, 320 // s) for s in (8, 16, 32)] + [(2, 3), (1, 2)]
    t = assign_targets(compute_locations(shapes, (8, 16, 32, 64, 128)), [{"boxes": boxes, "labels": labels}], 2,
                       center_sampling=center_sampling)
    assert len(_offsets(fig, "positives")) == int((t.gt_inds[0] >= 0).sum()) > 0
    per_panel = [sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == "positives") for ax in fig.axes]
    assert per_panel == [int(((t.gt_inds[0] >= 0) & (t.fpn_levels == i)).sum()) for i in range(5)]
    assert len(plot_assignment(torch.rand(3, 256, 320), boxes, labels, levels=[0, 2]).axes) == 2


def test_level_locations_figure():
    fig = plot_level_locations(torch.rand(3, 100, 150))  # padded to 128×160
    assert len(fig.axes) == 5
    p4 = [c for c in fig.axes[1].collections if c.get_gid() == "locations"][0].get_offsets()
    assert len(p4) == 8 * 10 and np.asarray(p4)[0].tolist() == [8.0, 8.0]
    one = plot_level_locations(np.zeros((64, 64, 3), dtype=np.uint8), level=4)
    assert len(one.axes) == 1 and "P7" in one.axes[0].get_title()


def test_statistics_figure_and_published_numbers():
    table = json.loads((REPO / "data" / "paper_tables" / "fcos_ambiguity_bpr.json").read_text())
    published = published_assignment_numbers(table)
    names = {s.name for s in (*FCOS_SETTINGS, *ANCHOR_SETTINGS)}
    assert set(published) <= names and len(published) == 5
    assert published["FCOS w/ FPN"] == {"BPR": 98.40, "ambiguous": 7.14, "ambiguous_diff_class": 3.75}
    rows = assignment_statistics([(BOXES * 4, LABELS, 256, 256)])
    fig = plot_statistics(rows, published)
    assert isinstance(fig, Figure) and len(fig.axes) == 3


def test_box_summary_reports_a_box_lost_to_the_min_area_rule():
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]])
    text = box_assignment_summary(image_assignment(64, 64, boxes, LABELS, **NO_FPN), NAMES)
    lines = text.splitlines()
    assert len(lines) == 2 + 2
    assert "| 0 | ring |" in lines[2] and lines[2].endswith("| 4 |")
    assert "| 1 | star |" in lines[3] and "0 (missed)" in lines[3]


def test_explorer_redraws_when_a_control_changes():
    img = torch.rand(3, 256, 320)
    boxes = torch.tensor([[10.0, 10.0, 120.0, 110.0], [60.0, 40.0, 300.0, 240.0], [40.0, 50.0, 80.0, 90.0]])
    labels = torch.tensor([0, 1, 1])
    w = assignment_explorer(img, boxes, labels, NAMES, dpi=30)
    c, st = w.controls, w.state
    assert set(c) == {"m2", "m3", "m4", "m5", "center_sampling", "radius", "level"}
    assert st.redraws == 1 and st.error is None and len(st.figure.axes) == 5
    before = (st.counts.positives, st.counts.ambiguous)
    reference = image_assignment(256, 320, boxes, labels)
    assert st.counts.positives == reference.positives() and st.counts.ambiguous == reference.ambiguous()

    c["radius"].value = 3.0  # a wider center region: more positives
    assert st.redraws == 2 and st.error is None
    assert st.counts.positives > before[0]
    assert st.counts.positives == image_assignment(256, 320, boxes, labels, radius=3.0).positives()
    assert "positive locations" in w.children[2].value

    png = w.children[3].value
    c["m3"].value = 256  # P4 now also takes the mid-sized box
    assert st.redraws == 3 and w.children[3].value != png
    assert st.assignment.ranges[1] == (64.0, 256.0)

    c["center_sampling"].value = False
    assert st.redraws == 4 and c["radius"].disabled
    assert st.counts.positives == image_assignment(256, 320, boxes, labels, sizes_of_interest=(64, 256, 256, 512),
                                                   center_sampling=False).positives()
    c["level"].value = 1
    assert st.redraws == 5 and len(st.figure.axes) == 1 and "P4" in st.figure.axes[0].get_title()

    c["m2"].value = 512  # not increasing any more: allowed, flagged
    assert st.error is None and "not increasing" in w.children[2].value
