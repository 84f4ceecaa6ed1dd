"""Small pieces the model walkthroughs (viz.centerness, viz.condinst, viz.blendmask) share."""
from __future__ import annotations

import torch

#: Shown when :func:`detections_for_display` falls back to candidates below the score threshold.
BEST_CANDIDATES_NOTE = "no detection passes the model's score threshold; showing its best candidates"


def model_device(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def detections_for_display(model, head_out, locations, sizes):
    """``(detections of image 0 with location indices, note)`` for an FCOS-family model in eval mode.

    An under-trained model (a fresh one in a tutorial) often has no detection above its score threshold; rather than
    showing an empty figure, the walkthroughs then show its best candidates (threshold 0, same NMS and top-k) and say
    so in ``note`` (empty otherwise).
    """
    det = model.postprocess(head_out, locations, sizes, return_indices=True)[0]
    if len(det["boxes"]):
        return det, ""
    from onestage.modeling.fcos import postprocess, postprocess_kwargs

    det = postprocess(head_out, locations, model.strides, sizes,
                      **postprocess_kwargs(model.cfg, score_thresh=0.0, return_indices=True))[0]
    return det, BEST_CANDIDATES_NOTE
