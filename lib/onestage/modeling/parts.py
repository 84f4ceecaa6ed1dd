"""What one forward pass computed, the same record for every model of the family.

Every model has the same three methods, and its own ``forward`` is written with them:

* ``model.forward_parts(images)`` → :class:`ForwardParts`: the normalised padded batch, the named feature levels the
  heads read, the head outputs (the model's own typed record, e.g. ``FCOSHeadOutputs``), the FCOS family's
  locations and ``mask_inputs`` — what the model's masks are made from (CondInst: ``mask_feats`` F_mask and the
  controller's ``params`` at every location; BlendMask: ``bases``, ``sem_logits`` and the top layer's
  ``attentions``; SOLOv2: ``mask_features`` F; SOLO: none, its masks are head outputs).
* ``model.detect(parts, with_origin=False)`` → one dict per image (``boxes``, ``scores``, ``labels`` and, for the
  instance models, ``masks``): exactly ``model(images)`` in eval mode on the plain path (the default fast path,
  :mod:`onestage.modeling.fast_inference`, computes the same on folded weights, in bf16 where the CPU has it). ``with_origin=True`` adds where each
  detection came from — FCOS family: ``location_inds`` (index over all levels' locations, the order of
  ``flatten_levels``), ``fpn_levels`` and ``locations`` (x, y px); CondInst also ``params`` (its dynamic head);
  BlendMask ``attentions`` (``N×K×M×M``); SOLO family: ``cells`` (index over all levels' cells), ``fpn_levels``;
  SOLOv2 also ``kernels`` (``N×E``).
* ``model.candidates(parts)`` → per image, what inference ranks *before* suppression, best first, with the same
  origin keys — FCOS family: the thresholded, per-level top-k boxes before NMS; SOLO family: the (cell, class)
  pairs above the score threshold after point NMS, before masks and Matrix NMS.

The SOLO family adds ``model.cell_mask_probs(parts, image, cells)``: the mask probabilities of any cells at stride 4 of
the canvas (vanilla: the cell's channel; decoupled: σ(y_i)·σ(x_j); SOLOv2: the cell's kernel ∗ F).

:func:`parts_for_display` is the one call the walkthroughs make: parts and detections with their origin of one image,
falling back to the best candidates (and saying so) when an under-trained model detects nothing.

Notebooks, ``viz`` and ``analysis`` read these instead of calling a model's pieces in their own order; one test per
model (``tests/test_forward_parts.py``) checks that ``forward`` equals ``detect(forward_parts(...))`` and that
each detection is rebuilt from its origin.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ForwardParts", "low_thresholds", "parts_for_display", "model_device", "flat_tensors", "BEST_CANDIDATES_NOTE"]


@dataclass
class ForwardParts:
    """One forward pass of a batch (see the module docstring). Tensors keep their graph in train mode."""

    #: the normalised, zero-padded batch ``B×3×H×W``
    batch: Tensor
    #: each image's ``(h, w)`` before padding
    image_sizes: List[Tuple[int, int]]
    #: feature level name (``"p3"`` …) → ``B×C×h×w``, the levels the heads read, in order
    features: Dict[str, Tensor]
    #: the model's head outputs (``FCOSHeadOutputs``, ``SOLOHeadOutputs``, ``SOLOv2HeadOutputs``)
    head: Any
    #: FCOS family: per level, ``HW×2`` (x, y) image points of the feature cells; ``None`` for the SOLO family
    locations: Optional[List[Tensor]] = None
    #: what the masks are made from (see the module docstring); empty for FCOS and SOLO
    mask_inputs: Dict[str, Optional[Tensor]] = field(default_factory=dict)

    @property
    def canvas_hw(self) -> Tuple[int, int]:
        """``(H, W)`` of the padded batch."""
        return int(self.batch.shape[-2]), int(self.batch.shape[-1])

    @property
    def feature_list(self) -> List[Tensor]:
        return list(self.features.values())


@contextlib.contextmanager
def low_thresholds(model):
    """Within the block, ``model`` keeps every candidate: its score thresholds (``score_thresh``, and SOLO's
    ``update_thresh``) are 0 — for showing an under-trained model's best guesses instead of an empty figure. The
    config is restored on exit."""
    cfg = model.cfg
    changes = {k: 0.0 for k in ("score_thresh", "update_thresh") if hasattr(cfg, k)}
    model.cfg = dataclasses.replace(cfg, **changes)
    try:
        yield model
    finally:
        model.cfg = cfg


#: Shown when :func:`parts_for_display` falls back to candidates below the score threshold.
BEST_CANDIDATES_NOTE = "no detection passes the model's score threshold; showing its best candidates"


def model_device(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def flat_tensors(obj) -> List[Tensor]:
    """Every tensor inside ``obj`` — a tensor, or lists / tuples (NamedTuples) / dicts / dataclasses (a
    :class:`ForwardParts`, a head's output record) of them — in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in flat_tensors(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in flat_tensors(x)]
    return []


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
        parts = model.forward_parts([image.to(model_device(model))])
        det = model.detect(parts, with_origin=True)[0]
        note = ""
        if len(det["boxes"]) == 0:
            with low_thresholds(model):
                det = model.detect(parts, with_origin=True)[0]
            note = BEST_CANDIDATES_NOTE
    finally:
        model.train(was_training)
    return parts, det, note
