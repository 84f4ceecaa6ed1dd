"""Shared by tests/test_export.py (FCOS family) and tests/test_export_solo.py (SOLO family): the shipped
checkpoints with their test sizes, the PyTorch reference detections, and the parity check of issue 19 — same
detection count, boxes within 1 px, scores within 1e-3, labels equal, mask IoU ≥ 0.99 per instance. Instances are
matched in order (both lists are sorted by score); only if that fails (a reordering of exactly tied scores), each
graph instance is matched to the unused reference instance of the same label and a score within 1e-3 with the best
mask IoU, and a warning says so."""
from __future__ import annotations

import warnings

import pytest
import torch

import onestage
from onestage import export
from onestage.engine.checkpoint import checkpoint_card
from onestage.engine.shipped import shipped_checkpoint
from onestage.modeling.fast_inference import plain_inference


def reference(model, image) -> dict:
    """The plain (fp32, unfolded) PyTorch detections: what the exported graph computes."""
    with torch.no_grad(), plain_inference(model):
        return model([image])[0]


def shipped_models(names) -> dict:
    """name → (the shipped checkpoint in float32, its card's test size); skips the test without the files."""
    out = {}
    for name in names:
        path = shipped_checkpoint(name)
        if not path.is_file():
            pytest.skip(f"no shipped checkpoint at {path}")
        out[name] = (onestage.load_model(path).eval().float(), int(checkpoint_card(path)["train_cfg"]["test_min_size"]))
    return out


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``N×M`` mask IoU of ``N×H×W`` and ``M×H×W`` bool masks (1 for two empty masks)."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def assert_parity(ours: dict, ref: dict, what: str) -> dict:
    """The tolerances of the module docstring; returns :func:`onestage.export.compare_detections`' figures."""
    assert list(ours) == list(ref), what
    assert ours["labels"].dtype == torch.int64, what
    if "masks" in ref:
        assert ours["masks"].dtype == torch.bool and tuple(ours["masks"].shape[1:]) == tuple(ref["masks"].shape[1:])
    cmp = export.compare_detections(ours, ref)
    assert cmp["detections_onnx"] == cmp["detections"], f"{what}: {cmp}"
    if (cmp["max_box_diff"] <= 1.0 and cmp["max_score_diff"] <= 1e-3 and cmp["label_mismatches"] == 0
            and (cmp["min_mask_iou"] is None or cmp["min_mask_iou"] >= 0.99)):
        return cmp
    assert "masks" in ref, f"{what}: {cmp}"
    iou = _iou(ours["masks"], ref["masks"])
    compatible = ((ours["labels"][:, None] == ref["labels"][None])
                  & ((ours["scores"][:, None] - ref["scores"][None]).abs() <= 1e-3))
    iou = torch.where(compatible, iou, torch.full_like(iou, -1.0))
    match = []
    for i in range(iou.shape[0]):
        j = int(iou[i].argmax())
        assert iou[i, j] >= 0.99, f"{what}: graph instance {i} has no reference match (in order: {cmp})"
        match.append(j)
        iou[:, j] = -1.0
    match = torch.tensor(match, dtype=torch.long)
    box_diff = float((ours["boxes"] - ref["boxes"][match]).abs().max())
    assert box_diff <= 1.0, f"{what}: boxes of the matched instances differ by {box_diff}"
    warnings.warn(f"{what}: instances matched by mask IoU, not in order (tied scores): {match.tolist()}")
    return dict(cmp, max_box_diff=box_diff, matched_by_iou=True)
