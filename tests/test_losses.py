"""Shared losses: focal against torchvision's, IoU/GIoU on hand-computed ltrb cases, dice."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss as tv_focal

from onestage.modeling.losses import dice_loss, iou_loss_ltrb, ltrb_ious, sigmoid_focal_loss


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_equals_torchvision_on_one_hot(alpha):
    g = torch.Generator().manual_seed(0)
    n, c = 50, 7
    logits = (torch.randn(n, c, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, c + 1, (n,), generator=g)  # c = background
    targets[:5] = c
    one_hot = F.one_hot(targets, c + 1)[:, :c].float()

    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=2.0, reduction="sum")
    ref = tv_focal(logits, one_hot, alpha=alpha, gamma=2.0, reduction="sum")
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)

    none = sigmoid_focal_loss(logits, targets, alpha=alpha, reduction="none")
    torch.testing.assert_close(none, tv_focal(logits, one_hot, alpha=alpha, reduction="none"))
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha=alpha, reduction="mean"), none.mean())


def test_focal_all_background_is_negative_term_only():
    logits = torch.tensor([[0.0, 2.0]])
    loss = sigmoid_focal_loss(logits, torch.tensor([2]), alpha=0.25, gamma=2.0)
    p = torch.sigmoid(logits)
    expected = (0.75 * p**2 * -torch.log(1 - p)).sum()
    torch.testing.assert_close(loss, expected)


def test_giou_hand_cases():
    # nested: pred is a 2×2 square, target a 4×4 square around the same point. I = 4, U = 16, C = 16.
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    tgt = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    iou, giou = ltrb_ious(pred, tgt, smooth=0.0)
    torch.testing.assert_close(iou, torch.tensor([0.25]))
    torch.testing.assert_close(giou, torch.tensor([0.25]))
    # AdelaiDet's smoothing: (I + 1) / (U + 1)
    iou_s, _ = ltrb_ious(pred, tgt, smooth=1.0)
    torch.testing.assert_close(iou_s, torch.tensor([5.0 / 17.0]))
    # disjoint: pred [-1,0]², target [0,1]² (both touch the point). I = 0, U = 2, C = 4 → GIoU = -(4-2)/4 = -0.5
    pred = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    loss = iou_loss_ltrb(pred, tgt, loss_type="giou", smooth=0.0)
    torch.testing.assert_close(loss, torch.tensor(1.5))
    # other loss types on the nested case
    pred, tgt = torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    torch.testing.assert_close(iou_loss_ltrb(pred, tgt, loss_type="iou", smooth=0.0), -torch.log(torch.tensor(0.25)))
    torch.testing.assert_close(iou_loss_ltrb(pred, tgt, loss_type="linear_iou", smooth=0.0), torch.tensor(0.75))
    # weights multiply per box before the sum
    two_p, two_t = pred.repeat(2, 1), tgt.repeat(2, 1)
    w = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(iou_loss_ltrb(two_p, two_t, w, "linear_iou", 0.0), torch.tensor(0.75 * 2.5))


def test_giou_matches_torchvision_box_giou_without_smoothing():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(64, 2, generator=g) * 100
    pred = torch.rand(64, 4, generator=g) * 30 + 0.5
    tgt = torch.rand(64, 4, generator=g) * 30 + 0.5

    def to_xyxy(ltrb):
        return torch.stack([pts[:, 0] - ltrb[:, 0], pts[:, 1] - ltrb[:, 1],
                            pts[:, 0] + ltrb[:, 2], pts[:, 1] + ltrb[:, 3]], 1)

    ours = iou_loss_ltrb(pred, tgt, loss_type="giou", smooth=0.0)
    ref = generalized_box_iou_loss(to_xyxy(pred), to_xyxy(tgt), reduction="sum")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_iou_loss_zero_overlap_is_finite():
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    tgt = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    for kind in ("giou", "iou", "linear_iou"):
        loss = iou_loss_ltrb(pred, tgt, loss_type=kind, smooth=0.0)
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    with pytest.raises(ValueError):
        iou_loss_ltrb(pred, tgt, loss_type="l1")


def test_dice_loss_per_instance():
    t = torch.zeros(3, 4, 4)
    t[:, :2] = 1
    p = torch.zeros(3, 4, 4)
    p[0] = t[0]          # perfect → ~0
    p[1, 2:] = 1         # disjoint → 1
    p[2] = 0.5           # Σxy = 4, Σx² = 4, Σy² = 8 → 1 - 8/12
    loss = dice_loss(p, t, eps=0.0)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0, 1 - 8 / 12]))
    assert dice_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)).item() == pytest.approx(1.0)  # eps avoids 0/0


def test_mask_nms_removes_a_duplicate_and_keeps_a_distinct_mask():
    import torch
    from onestage.structures import mask_iou, mask_nms
    m = torch.zeros(4, 10, 10, dtype=torch.bool)
    m[0, 2:6, 2:6] = True          # 16 px
    m[1, 2:6, 2:5] = True          # inside m0: IoU 12/16 = .75 -> duplicate of m0
    m[2, 6:9, 6:9] = True          # disjoint
    m[3, 2:6, 2:6] = True          # same mask as m0 but another class: kept
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    assert torch.isclose(mask_iou(m[:1], m[1:2])[0, 0], torch.tensor(0.75))
    assert mask_nms(m, scores, labels, 0.5).tolist() == [0, 2, 3]
    assert mask_nms(m, scores, labels, 0.8).tolist() == [0, 1, 2, 3]
    # the lower-scored duplicate is removed whichever comes first in memory
    assert mask_nms(m.flip(0), scores.flip(0), labels.flip(0), 0.5).tolist() == [3, 1, 0]
