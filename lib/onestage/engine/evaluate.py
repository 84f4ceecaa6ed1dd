"""COCO evaluation with pycocotools' COCOeval — the official metric, not a re-implementation.

The model sees images already resized by the dataset; COCO ground truth lives at the original size. Predictions are
therefore mapped back before scoring: boxes scaled by ``orig_size / size``, masks resized (bilinear on the 0/1 mask,
then threshold 0.5) and RLE-encoded, contiguous labels mapped to COCO category ids with ``dataset.label_to_cat_id``.
Only the evaluated images are scored (``params.imgIds``), so ``max_images`` gives a valid partial evaluation.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from onestage.structures import xyxy_to_xywh

log = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

__all__ = ["evaluate", "predictions_to_coco", "coco_eval", "format_metrics", "METRIC_NAMES", "NoGroundTruthError",
           "require_ground_truth"]


class NoGroundTruthError(ValueError):
    """The evaluation data has no (non-crowd) annotation: COCOeval would print -1 everywhere, so nothing is run."""


def require_ground_truth(dataset) -> None:
    """Raise :class:`NoGroundTruthError` when ``dataset.coco`` holds no non-crowd annotation of ``dataset``'s images
    (an unlabelled JSON given to ``eval``, or a training run's val split without labels)."""
    coco_gt = getattr(dataset, "coco", None)
    if coco_gt is None:
        return
    ids = set(int(i) for i in getattr(dataset, "ids", coco_gt.imgs))
    if not any(int(a.get("image_id", -1)) in ids and not a.get("iscrowd", 0)
               for a in coco_gt.dataset.get("annotations", [])):
        source = getattr(dataset, "ann_file", "the evaluation data")
        raise NoGroundTruthError(f"{source}: no annotations for its {len(ids)} image(s): there is nothing to compute "
                                 f"AP against (use `predict` to look at predictions on unlabelled images)")


def _as_hw(v) -> tuple[int, int]:
    if torch.is_tensor(v):
        v = v.tolist()
    return int(v[0]), int(v[1])


def _label_to_cat(dataset, model=None):
    """Model label → the dataset's COCO category id; the model's classes are matched to the dataset's by name
    (:func:`onestage.engine.checkpoint.class_mapping`: same order, reordered, or a clear error)."""
    from onestage.engine.checkpoint import check_num_classes, class_mapping

    names = getattr(model, "class_names", None) if model is not None else None
    remap = class_mapping(names, getattr(dataset, "class_names", None))
    if names is None:  # nothing to match by name: the counts at least must agree
        check_num_classes(model, dataset)
    if remap is not None:
        log.warning("the model's classes are the dataset's in another order: its labels are mapped by class name")
    mapping = getattr(dataset, "label_to_cat_id", None)
    if mapping is None:
        return (lambda label: int(label)) if remap is None else (lambda label: int(remap[int(label)]))
    if remap is None:
        return lambda label: int(mapping[int(label)])  # dict or list, both indexed by the contiguous label
    return lambda label: int(mapping[remap[int(label)]])


def predictions_to_coco(pred: dict, target: dict, label_to_cat, with_masks: bool) -> list[dict]:
    """One image's predictions (at the resized input size) → COCO result dicts at the original image size."""
    image_id = int(target["image_id"])
    oh, ow = _as_hw(target["orig_size"])
    h, w = _as_hw(target.get("size", target["orig_size"]))
    boxes = pred["boxes"].detach().float().cpu()
    scores = pred["scores"].detach().float().cpu()
    labels = pred["labels"].detach().cpu()
    if len(boxes) == 0:
        return []
    scale = torch.tensor([ow / w, oh / h, ow / w, oh / h])
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
    xywh = xyxy_to_xywh(boxes).tolist()
    rles = None
    if with_masks and "masks" in pred:
        masks = pred["masks"].detach().cpu()
        if masks.dim() == 4:  # N×1×H×W
            masks = masks[:, 0]
        if masks.shape[-2:] != (oh, ow):
            masks = F.interpolate(masks[:, None].float(), size=(oh, ow), mode="bilinear", align_corners=False)[:, 0]
            masks = masks > 0.5
        masks = masks.bool().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable; pycocotools accepts str
    results = []
    for i in range(len(boxes)):
        r = {"image_id": image_id, "category_id": label_to_cat(labels[i]), "bbox": xywh[i], "score": float(scores[i])}
        if rles is not None:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


def coco_eval(coco_gt, results: list[dict], iou_type: str, image_ids: Sequence[int], verbose: bool = False) -> dict:
    """Run COCOeval on ``results`` restricted to ``image_ids``; metrics in percent (NaN where COCO gives -1,
    e.g. APs when there are no small objects — as detectron2 reports it). No results at all → zeros."""
    if not results:
        log.info("no %s detections: every metric is 0", iou_type)
        return {k: 0.0 for k in METRIC_NAMES}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    text = buf.getvalue()
    if verbose:
        print(text, end="")
    log.debug("COCOeval %s:\n%s", iou_type, text)
    return {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(METRIC_NAMES, ev.stats[:6])}


@torch.inference_mode()
def evaluate(
    model,
    dataset,
    batch_size: int = 2,
    iou_types: Optional[Sequence[str]] = None,
    max_images: Optional[int] = None,
    progress: bool = True,
    return_predictions: bool = False,
    verbose: bool = False,
    device=None,
):
    """COCO AP of ``model`` on ``dataset`` (which must expose ``.coco``, a pycocotools ``COCO``).

    ``iou_types`` defaults to ``["bbox"]`` plus ``"segm"`` if the model returns masks. Returns
    ``{"bbox": {AP, AP50, AP75, APs, APm, APl}, "segm": {...}}`` in percent; with ``return_predictions`` a tuple
    ``(metrics, coco_results)``. ``verbose`` prints COCOeval's own summary. The model's train/eval mode is restored.
    """
    coco_gt = getattr(dataset, "coco", None)
    if coco_gt is None:
        raise TypeError(f"{type(dataset).__name__} has no `.coco` ground truth; evaluate needs a COCO-format dataset")
    require_ground_truth(dataset)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    label_to_cat = _label_to_cat(dataset, model)
    was_training = model.training
    model.eval()
    results, image_ids, saw_masks = [], [], False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="eval", unit="img", dynamic_ncols=True)
    want_masks = iou_types is None or "segm" in iou_types
    try:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, n))]
            images = [im.to(device) for im, _ in items]
            preds = model(images)
            for (_, target), pred in zip(items, preds):
                saw_masks = saw_masks or "masks" in pred
                image_ids.append(int(target["image_id"]))
                results.extend(predictions_to_coco(pred, target, label_to_cat, with_masks=want_masks))
            if bar is not None:
                bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    if iou_types is None:
        iou_types = ["bbox", "segm"] if saw_masks else ["bbox"]
    if "segm" in iou_types and results and "segmentation" not in results[0]:
        raise ValueError("iou_types includes 'segm' but the model returned no masks")
    metrics = {}
    for iou_type in iou_types:
        res = results
        if iou_type == "bbox":  # loadRes would otherwise derive boxes from the masks
            res = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        metrics[iou_type] = coco_eval(coco_gt, res, iou_type, image_ids, verbose=verbose)
    return (metrics, results) if return_predictions else metrics


def format_metrics(metrics: dict, title: Optional[str] = None) -> str:
    """A fixed-width table of ``{"bbox": {...}, "segm": {...}}`` (NaN shown as '-')."""
    head = f"{'':6s}" + "".join(f"{k:>8s}" for k in METRIC_NAMES)
    lines = [title] if title else []
    lines.append(head)
    for iou_type, vals in metrics.items():
        cells = "".join(
            f"{'-':>8s}" if (v is None or (isinstance(v, float) and math.isnan(v))) else f"{v:8.2f}"
            for v in (vals.get(k) for k in METRIC_NAMES)
        )
        lines.append(f"{iou_type:6s}{cells}")
    return "\n".join(lines)
