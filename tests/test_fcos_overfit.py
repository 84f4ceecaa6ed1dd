"""Sanity overfit: FCOS (smoke preset) learns two drawn boxes in a few dozen steps (its own file: ~20-40 s on 2 cores)."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

import onestage


def test_overfits_two_boxes():
    """A few dozen AdamW steps on one drawn image: losses fall and the two best detections find the two boxes."""
    torch.manual_seed(0)
    model = onestage.build_model("fcos", preset="smoke", num_classes=2).train()
    img = torch.full((3, 96, 96), 0.2)
    img[:, 10:50, 8:50] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    img[:, 52:92, 44:90] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    tgt = {"boxes": torch.tensor([[8.0, 10.0, 50.0, 50.0], [44.0, 52.0, 90.0, 92.0]]), "labels": torch.tensor([0, 1])}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model([img], [tgt])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["loss_cls"] < 0.2 * history[0]["loss_cls"]
    assert history[-1]["loss_box_reg"] < 0.5 * history[0]["loss_box_reg"]
    model.eval()
    with torch.no_grad():
        pred = model([img])[0]
    for cls in (0, 1):
        best = pred["boxes"][pred["labels"] == cls][:1]
        assert len(best) == 1 and box_iou(best, tgt["boxes"][cls : cls + 1]).item() > 0.5
