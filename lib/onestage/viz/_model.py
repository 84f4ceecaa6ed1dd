"""Small pieces the model walkthroughs (viz.centerness, viz.condinst, viz.blendmask, viz.solo, the explorer) share."""
from __future__ import annotations

import torch
from torch import Tensor

from onestage.modeling.parts import ForwardParts, low_thresholds

#: Shown when :func:`parts_for_display` falls back to candidates below the score threshold.
BEST_CANDIDATES_NOTE = "no detection passes the model's score threshold; showing its best candidates"


def model_device(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def parts_for_display(model, image: Tensor) -> tuple:
    """``(parts, detections, note)`` of one ``3×H×W`` image: the model's :class:`ForwardParts` (eval mode, restored
    after) and its detections with their origin (``model.detect(parts, with_origin=True)[0]``).

    An under-trained model (a fresh one in a tutorial) often has no detection above its score threshold; rather than
    showing an empty figure, the walkthroughs then show its best candidates (the same inference with the score
    thresholds at 0, :func:`onestage.modeling.parts.low_thresholds`) and say so in ``note`` (empty otherwise).
    """
    was_training = model.training
    model.eval()
    try:
        parts: ForwardParts = model.forward_parts([image.to(model_device(model))])
        det = model.detect(parts, with_origin=True)[0]
        note = ""
        if len(det["boxes"]) == 0:
            with low_thresholds(model):
                det = model.detect(parts, with_origin=True)[0]
            note = BEST_CANDIDATES_NOTE
    finally:
        model.train(was_training)
    return parts, det, note
