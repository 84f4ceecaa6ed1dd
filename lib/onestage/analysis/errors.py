"""Where a detector loses its AP: TIDE error types, precision-recall curves, a confusion matrix, sizes.

Everything here reads COCO-format ground truth (a pycocotools ``COCO``, or the path of its JSON) and a COCO results
list (or the path of a results JSON), so it works on any model's results, other toolboxes' included. pycocotools'
COCOeval AP stays the headline number (:func:`onestage.engine.evaluate.coco_eval`); this module explains it.

**Error types** (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020,
arXiv:2008.08115, Sec. 2.2). Each detection is a true positive, or — with ``t_f`` = 0.5 the foreground and ``t_b`` =
0.1 the background IoU threshold, IoU taken against the ground truth of the image — one error, tested in this order:

==========  =======================================================================================================
``loc``     localisation: IoU with a ground truth of its own class in [t_b, t_f]
``cls``     classification: IoU ≥ t_f with a ground truth of another class
``dupe``    duplicate: IoU ≥ t_f with a ground truth of its class that a higher-scoring detection already matched
``bkg``     background: IoU ≤ t_b with every ground truth
``both``    classification and localisation: what remains (IoU in [t_b, t_f] with another class's object)
``miss``    a ground truth no detection matched and no ``loc`` / ``cls`` error points at
==========  =======================================================================================================

The ΔAP of a type is the AP@t_f gained when only the errors of that type are fixed by an oracle (Sec. 2.3): a
``loc`` or ``cls`` error becomes the true positive of its object (its box or class corrected; if several point at the
same free object only the highest-scoring one is fixed, the others removed), ``dupe``, ``bkg`` and ``both`` are
removed, a ``miss`` is removed from the ground truth. ``FP`` / ``FN`` are the two summary fixes of Sec. 2.4: every
false positive scored below every true positive, and every missed object removed. AP here is TIDE's: the 101-point
COCO interpolation at t_f, averaged over the classes that have ground truth or detections. Matching follows the
paper's reference implementation (``tidecv``; ``tests/test_analysis_errors.py`` compares with it): per image, at most
``max_dets`` detections, highest score first, each matched to the free same-class object of highest IoU; a detection
covering a crowd region of its class by more than t_f is ignored for AP.

**PR curves** are COCOeval's own precision arrays (per IoU threshold averaged over classes, per class at IoU 0.5).
**The confusion matrix** counts, at one IoU threshold and score threshold, the class-agnostic COCOeval matches
(true class × predicted class), with a background row (detections matched to nothing) and column (missed objects).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

__all__ = [
    "ERROR_TYPES",
    "ERROR_NAMES",
    "SIZES",
    "ErrorBreakdown",
    "load_gt",
    "load_results",
    "subset_gt",
    "error_breakdown",
    "pr_curves",
    "confusion_matrix",
    "worst_images",
    "image_error_types",
    "IouTypeAnalysis",
    "analyze_types",
    "analyze",
]

#: The six error types of TIDE (arXiv:2008.08115, Sec. 2.2), in the paper's order.
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "class + location", "dupe": "duplicate",
               "bkg": "background", "miss": "missed"}
#: COCO's object sizes by area (pixels²): small < 32², medium < 96², large.
SIZES = ("small", "medium", "large")

GtLike = Union[COCO, str, Path]
ResultsLike = Union[Sequence[dict], str, Path]


def load_gt(gt: GtLike) -> COCO:
    """A pycocotools ``COCO`` from itself or from the path of an annotation JSON (quietly)."""
    if isinstance(gt, COCO):
        return gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt))


def subset_gt(gt: GtLike, image_ids) -> COCO:
    """The ground truth of ``image_ids`` only (e.g. the images an evaluation with ``max_images`` saw: the others'
    objects would otherwise count as missed)."""
    coco = load_gt(gt)
    keep = {int(i) for i in image_ids}
    data = copy.deepcopy(coco.dataset)
    data["images"] = [im for im in data["images"] if int(im["id"]) in keep]
    data["annotations"] = [a for a in data.get("annotations", []) if int(a["image_id"]) in keep]
    sub = COCO()
    sub.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


def load_results(results: ResultsLike) -> list[dict]:
    """A COCO results list from itself or from the path of a results JSON (a list of detections)."""
    if isinstance(results, (str, Path)):
        with open(results) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{results}: a COCO results file is a JSON list of detections")
        return data
    return list(results)


def _size(area: float) -> str:
    return "small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large"


def _region(ann: dict, coco: COCO, iou_type: str):
    if iou_type == "bbox":
        return list(map(float, ann["bbox"]))
    seg = ann["segmentation"]
    if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
        return seg
    return coco.annToRLE(ann)


def _det_region(det: dict, iou_type: str):
    if iou_type == "bbox":
        return list(map(float, det["bbox"]))
    if "segmentation" not in det:
        raise ValueError("segm analysis needs results with a 'segmentation' (RLE) per detection")
    return det["segmentation"]


def _det_area(det: dict, iou_type: str) -> float:
    if iou_type == "bbox":
        return float(det["bbox"][2]) * float(det["bbox"][3])
    return float(mask_utils.area(det["segmentation"]))


def _ap101(points: list, num_gt: int) -> float:
    """AP in percent of (score, is_tp) points against ``num_gt`` objects: the precision envelope sampled at the 101
    recall points of COCOeval (0 when there is no object)."""
    if num_gt <= 0:
        return 0.0
    order = sorted(points, key=lambda p: -p[0])
    tp = np.cumsum([1.0 if p[1] else 0.0 for p in order])
    fp = np.cumsum([0.0 if p[1] else 1.0 for p in order])
    if len(order) == 0:
        return 0.0
    precision = tp / np.maximum(tp + fp, 1e-12)
    recall = tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    # the recall points as TIDE writes them (k / 100; COCOeval's np.linspace differs in the last bit at some k, which
    # moves a sample across a recall step that lands exactly on it, e.g. 7 of 10 objects)
    idx = np.searchsorted(recall, np.arange(101) / 100, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean() * 100)


@dataclass
class ErrorBreakdown:
    """The TIDE decomposition of one results set (see the module docstring). AP and ΔAP in percent.

    ``detections``: one entry per evaluated detection, ``{"index", "image_id", "category_id", "score", "type"
    ("tp" or an error type), "gt_id" (the object it matched or was blamed on, else None), "size", "ignored"}``,
    where ``index`` is its position in the results list; ``missed``: ``{"gt_id", "image_id", "category_id",
    "size"}`` per ``miss`` error. ``false_negatives``: every unmatched object (a ``miss`` or an object some ``loc`` /
    ``cls`` error points at)."""

    iou_type: str
    pos_thresh: float
    bg_thresh: float
    ap: float
    delta_ap: dict
    fp_delta_ap: float
    fn_delta_ap: float
    counts: dict
    counts_by_size: dict
    num_gt: int
    num_detections: int
    false_negatives: int
    detections: list = field(repr=False, default_factory=list)
    missed: list = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        """JSON-able numbers (no per-detection lists): what records and ``summary.json`` store."""
        return {"iou_type": self.iou_type, "pos_thresh": self.pos_thresh, "bg_thresh": self.bg_thresh,
                "ap": round(self.ap, 4), "delta_ap": {k: round(v, 4) for k, v in self.delta_ap.items()},
                "fp_delta_ap": round(self.fp_delta_ap, 4), "fn_delta_ap": round(self.fn_delta_ap, 4),
                "counts": dict(self.counts), "counts_by_size": {k: dict(v) for k, v in self.counts_by_size.items()},
                "num_gt": self.num_gt, "num_detections": self.num_detections,
                "false_positives": sum(self.counts[t] for t in ERROR_TYPES if t != "miss"),
                "false_negatives": self.false_negatives}

    def per_image(self) -> dict:
        """image id → ``{"fp": false positives, "miss": missed objects, error type: count}``."""
        out: dict = defaultdict(lambda: defaultdict(int))
        for d in self.detections:
            if d["type"] != "tp" and not d["ignored"]:
                out[d["image_id"]]["fp"] += 1
                out[d["image_id"]][d["type"]] += 1
        for m in self.missed:
            out[m["image_id"]]["miss"] += 1
        return {k: dict(v) for k, v in out.items()}


def error_breakdown(gt: GtLike, results: ResultsLike, iou_type: str = "bbox", pos_thresh: float = 0.5,
                    bg_thresh: float = 0.1, max_dets: int = 100) -> ErrorBreakdown:
    """The TIDE error decomposition of ``results`` against ``gt`` (module docstring; arXiv:2008.08115 Sec. 2)."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', not {iou_type!r}")
    coco = load_gt(gt)
    dets = load_results(results)
    by_image: dict = defaultdict(list)
    for i, d in enumerate(dets):
        by_image[int(d["image_id"])].append(i)

    gt_count: dict = defaultdict(int)       # class → number of (non-crowd) objects
    points: dict = defaultdict(dict)        # class → {det index: (score, is_tp)} of the non-ignored detections
    classes_seen: set = set()
    records: list = []                      # per evaluated detection
    errors: list = []                       # (kind, det index or gt id, details)
    gt_best: dict = {}                      # gt id → (best score, det index) among the loc/cls errors that could fix it
    gt_usable: set = set()
    missed: list = []
    fn_per_class: dict = defaultdict(int)

    for img_id in sorted(coco.getImgIds()):
        anns = coco.imgToAnns.get(img_id, [])
        objs = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        for a in objs:
            gt_count[int(a["category_id"])] += 1
            classes_seen.add(int(a["category_id"]))
        idx = sorted(by_image.get(img_id, []), key=lambda i: -float(dets[i]["score"]))[:max_dets]
        gt_used = np.zeros(len(objs), dtype=bool)
        if not idx:
            for a in objs:
                missed.append({"gt_id": int(a["id"]), "image_id": img_id, "category_id": int(a["category_id"]),
                               "size": _size(float(a.get("area", 0.0)))})
                fn_per_class[int(a["category_id"])] += 1
            continue
        pred_cls = np.array([int(dets[i]["category_id"]) for i in idx])
        regions = [_det_region(dets[i], iou_type) for i in idx]
        if objs:
            iou = np.asarray(mask_utils.iou(regions, [_region(a, coco, iou_type) for a in objs], [0] * len(objs)),
                             dtype=np.float64).reshape(len(idx), len(objs))
            same = pred_cls[:, None] == np.array([int(a["category_id"]) for a in objs])[None, :]
        else:
            iou = np.zeros((len(idx), 0))
            same = np.zeros((len(idx), 0), dtype=bool)
        cls_iou = iou * same
        buffer = cls_iou.copy()
        used: list = [False] * len(idx)
        matched = [None] * len(idx)
        for k in range(len(idx)):
            if objs:
                j = int(np.argmax(buffer[k]))
                if buffer[k, j] >= pos_thresh:
                    used[k], matched[k] = True, j
                    gt_used[j] = True
                    buffer[:, j] = 0
        if crowd:
            for c in crowd:
                c_iou = np.asarray(mask_utils.iou(regions, [_region(c, coco, iou_type)], [1]),
                                   dtype=np.float64).reshape(-1)
                for k in range(len(idx)):
                    if used[k] is False and c_iou[k] > pos_thresh and pred_cls[k] == int(c["category_id"]):
                        used[k] = None  # ignored: inside a crowd region of its class
        used_cls = iou * same * gt_used[None, :]
        other = iou * ~same
        for k, i in enumerate(idx):
            d = dets[i]
            cls = int(d["category_id"])
            classes_seen.add(cls)
            rec = {"index": i, "image_id": img_id, "category_id": cls, "score": float(d["score"]), "type": "tp",
                   "gt_id": None, "size": _size(_det_area(d, iou_type)), "ignored": used[k] is None}
            if used[k] is not None:
                points[cls][i] = (float(d["score"]), bool(used[k]))
            if used[k]:
                rec["gt_id"] = int(objs[matched[k]]["id"])
            else:
                kind, j = "bkg", None
                if objs:
                    jl = int(np.argmax(cls_iou[k]))
                    jc = int(np.argmax(other[k]))
                    jd = int(np.argmax(used_cls[k]))
                    if bg_thresh <= cls_iou[k, jl] <= pos_thresh:
                        kind, j = "loc", jl
                    elif other[k, jc] >= pos_thresh:
                        kind, j = "cls", jc
                    elif used_cls[k, jd] >= pos_thresh:
                        kind, j = "dupe", jd
                    elif iou[k].max() <= bg_thresh:
                        kind, j = "bkg", None
                    else:
                        kind, j = "both", None
                rec["type"] = kind
                if j is not None:
                    a = objs[j]
                    rec["gt_id"] = int(a["id"])
                    if kind in ("loc", "cls"):
                        rec["size"] = _size(float(a.get("area", 0.0)))
                        if not gt_used[j]:  # the oracle can turn it into this object's true positive
                            gid = int(a["id"])
                            gt_usable.add(gid)
                            if gid not in gt_best or gt_best[gid][0] < float(d["score"]):
                                gt_best[gid] = (float(d["score"]), i)
                    elif kind == "dupe":
                        rec["size"] = _size(float(a.get("area", 0.0)))
                errors.append((kind, i, rec, None if j is None else int(objs[j]["category_id"])))
            records.append(rec)
        for j, a in enumerate(objs):
            if not gt_used[j]:
                fn_per_class[int(a["category_id"])] += 1
                if int(a["id"]) not in gt_usable:
                    m = {"gt_id": int(a["id"]), "image_id": img_id, "category_id": int(a["category_id"]),
                         "size": _size(float(a.get("area", 0.0)))}
                    missed.append(m)

    classes = sorted(classes_seen)

    def m_ap(pts: dict, counts: dict) -> float:
        aps = [_ap101(list(pts.get(c, {}).values()), counts.get(c, 0)) for c in classes
               if pts.get(c) or counts.get(c, 0) > 0]
        return float(np.mean(aps)) if aps else 0.0

    base = m_ap(points, gt_count)

    def fixed(kind: str) -> float:
        pts = {c: {i: p for i, p in v.items() if p[1]} for c, v in points.items()}  # keep every true positive
        counts = dict(gt_count)
        for ekind, i, rec, gt_cls in errors:
            if ekind == kind:
                if kind in ("loc", "cls") and rec["gt_id"] in gt_best and gt_best[rec["gt_id"]][1] == i:
                    target = gt_cls if kind == "cls" else rec["category_id"]
                    pts.setdefault(target, {})[i] = (rec["score"], True)
                continue  # fixed by removal (dupe, bkg, both; loc/cls that are not the object's best)
            if not rec["ignored"]:
                pts.setdefault(rec["category_id"], {})[i] = (rec["score"], False)
        if kind == "miss":
            for m in missed:
                counts[m["category_id"]] -= 1
        return m_ap(pts, counts)

    delta = {k: max(fixed(k) - base, 0.0) for k in ERROR_TYPES}
    fp_fixed = {c: {i: (1.0 if p[1] else 0.0, p[1]) for i, p in v.items()} for c, v in points.items()}
    fp_delta = m_ap(fp_fixed, gt_count) - base
    fn_delta = m_ap(points, {c: n - fn_per_class.get(c, 0) for c, n in gt_count.items()}) - base

    counts = {k: 0 for k in ERROR_TYPES}
    by_size = {s: {k: 0 for k in ERROR_TYPES} for s in SIZES}
    for ekind, _, rec, _ in errors:
        counts[ekind] += 1
        by_size[rec["size"]][ekind] += 1
    counts["miss"] = len(missed)
    for m in missed:
        by_size[m["size"]]["miss"] += 1
    return ErrorBreakdown(iou_type=iou_type, pos_thresh=pos_thresh, bg_thresh=bg_thresh, ap=base, delta_ap=delta,
                          fp_delta_ap=fp_delta, fn_delta_ap=fn_delta, counts=counts, counts_by_size=by_size,
                          num_gt=int(sum(gt_count.values())), num_detections=len(records),
                          false_negatives=int(sum(fn_per_class.values())), detections=records, missed=missed)


def _cocoeval(coco: COCO, dets: list, iou_type: str):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(copy.deepcopy(dets)) if dets else COCO()
        ev = COCOeval(coco, dt, iou_type)
    return ev


def pr_curves(gt: GtLike, results: ResultsLike, iou_type: str = "bbox") -> dict:
    """COCOeval's precision at its 101 recall points (all areas, 100 detections per image): ``"by_iou"`` maps each
    IoU threshold (``"0.50"`` … ``"0.95"``) to the curve averaged over the classes with ground truth, ``"by_class"``
    each class name to its curve at IoU 0.5; ``"ap"`` holds the matching areas (percent), equal to COCOeval's AP,
    AP50 and per-class AP50."""
    coco = load_gt(gt)
    dets = load_results(results)
    recall = np.linspace(0, 1, 101)
    if not dets:
        return {"recall": recall.tolist(), "by_iou": {}, "by_class": {}, "ap": {}}
    ev = _cocoeval(coco, dets, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # T × R × K (all areas, maxDets 100)
    by_iou, ap_iou = {}, {}
    for t, thr in enumerate(ev.params.iouThrs):
        valid = [k for k in range(prec.shape[2]) if prec[t, 0, k] > -1]
        curve = prec[t][:, valid].mean(axis=1) if valid else np.zeros(len(recall))
        by_iou[f"{thr:.2f}"] = curve.tolist()
        ap_iou[f"{thr:.2f}"] = float(curve.mean() * 100) if valid else None
    by_class, ap_class = {}, {}
    for k, cat in enumerate(ev.params.catIds):
        if prec[0, 0, k] > -1:
            name = coco.cats[cat]["name"]
            by_class[name] = prec[0, :, k].tolist()
            ap_class[name] = float(prec[0, :, k].mean() * 100)
    valid_all = prec[prec > -1]
    return {"recall": recall.tolist(), "by_iou": by_iou, "by_class": by_class,
            "ap": {"AP": float(valid_all.mean() * 100) if valid_all.size else None, "by_iou": ap_iou,
                   "by_class_AP50": ap_class}}


def confusion_matrix(gt: GtLike, results: ResultsLike, iou_type: str = "bbox", iou_thresh: float = 0.5,
                     score_thresh: float = 0.3) -> tuple[np.ndarray, list]:
    """``(M, names)``: ``M[i, j]`` counts objects of class ``i`` matched to a detection of class ``j``, class-agnostic
    COCOeval matching at ``iou_thresh`` among the detections scored ≥ ``score_thresh`` (every one of them: no
    per-image cap). The last row (``"background"``) counts detections matched to no object, the last column the
    objects no detection matched. Crowd regions are COCOeval's: a detection on one is neither."""
    coco = load_gt(gt)
    dets = [d for d in load_results(results) if float(d["score"]) >= score_thresh]
    cats = sorted(coco.getCatIds())
    pos = {c: i for i, c in enumerate(cats)}
    names = [coco.cats[c]["name"] for c in cats] + ["background"]
    K = len(cats)
    M = np.zeros((K + 1, K + 1), dtype=np.int64)
    if not dets:
        for a in coco.dataset.get("annotations", []):
            if not a.get("iscrowd", 0):
                M[pos[int(a["category_id"])], K] += 1
        return M, names
    ev = _cocoeval(coco, dets, iou_type)
    ev.params.useCats = 0
    ev.params.iouThrs = np.array([iou_thresh])
    ev.params.areaRng = [[0, 1e10]]
    ev.params.areaRngLbl = ["all"]
    ev.params.maxDets = [max(len(dets), 1)]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
    dt_anns = ev.cocoDt.anns
    for e in ev.evalImgs:
        if e is None:
            continue
        for gid, m, ign in zip(e["gtIds"], e["gtMatches"][0], e["gtIgnore"]):
            if ign:
                continue
            true = pos[int(coco.anns[gid]["category_id"])]
            if m > 0:
                M[true, pos[int(dt_anns[int(m)]["category_id"])]] += 1
            else:
                M[true, K] += 1
        for did, m, ign in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0]):
            if m == 0 and not ign:
                M[K, pos[int(dt_anns[did]["category_id"])]] += 1
    return M, names


def image_error_types(target: dict, detections: dict, iou_type: str = "bbox", pos_thresh: float = 0.5,
                      bg_thresh: float = 0.1) -> tuple[list, list]:
    """The TIDE outcome of each detection of one image, from tensors in one coordinate frame (what a model returns
    and a dataset's target holds: ``boxes`` xyxy, ``labels``, ``scores``, optional ``masks``): ``(types, missed)``
    — one of ``"tp"`` or :data:`ERROR_TYPES` per detection, in the detections' order, and the indices of the
    missed ground-truth objects. Runs :func:`error_breakdown` on a one-image COCO built from them."""
    import torch

    def xywh(b):
        b = [float(v) for v in b]
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m.detach().cpu().numpy().astype(np.uint8)))
        r["counts"] = r["counts"].decode()
        return r

    use_masks = iou_type == "segm"
    h, w = (int(v) for v in (target["masks"].shape[-2:] if use_masks else (1, 1)))
    labels = sorted({int(v) for v in torch.cat([target["labels"].flatten(), detections["labels"].flatten()])})
    anns = []
    for k in range(len(target["boxes"])):
        a = {"id": k + 1, "image_id": 1, "category_id": int(target["labels"][k]) + 1,
             "bbox": xywh(target["boxes"][k]), "iscrowd": 0}
        a["area"] = a["bbox"][2] * a["bbox"][3]
        if use_masks:
            a["segmentation"] = rle(target["masks"][k])
            a["area"] = float(mask_utils.area(a["segmentation"]))
        anns.append(a)
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": w, "height": h}], "annotations": anns,
                    "categories": [{"id": c + 1, "name": str(c)} for c in labels]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    results = []
    for k in range(len(detections["boxes"])):
        r = {"image_id": 1, "category_id": int(detections["labels"][k]) + 1, "bbox": xywh(detections["boxes"][k]),
             "score": float(detections["scores"][k])}
        if use_masks:
            m = detections["masks"][k]
            r["segmentation"] = rle((m[0] if m.dim() == 3 else m) > 0.5 if m.is_floating_point() else m.bool())
        results.append(r)
    br = error_breakdown(coco, results, iou_type, pos_thresh, bg_thresh, max_dets=max(len(results), 1))
    types = ["bkg"] * len(results)
    for d in br.detections:
        types[d["index"]] = d["type"]
    return types, sorted(m["gt_id"] - 1 for m in br.missed)


def worst_images(breakdown: ErrorBreakdown, k: int = 6) -> list[tuple[int, dict]]:
    """The ``k`` images with the most false positives + missed objects, worst first: ``[(image id, counts)]``."""
    per = breakdown.per_image()
    ranked = sorted(per.items(), key=lambda kv: (-(kv[1].get("fp", 0) + kv[1].get("miss", 0)), kv[0]))
    return ranked[:k]


@dataclass
class IouTypeAnalysis:
    """Everything :func:`analyze` computes for one IoU type, as objects (:func:`analyze` keeps their JSON-able part)."""

    breakdown: ErrorBreakdown   # :func:`error_breakdown`
    curves: dict                # :func:`pr_curves`
    confusion: np.ndarray       # :func:`confusion_matrix`, (C+1)×(C+1)
    names: list                 # its row / column names
    score_thresh: float         # the confusion matrix's score threshold

    def summary(self) -> dict:
        return {"errors": self.breakdown.summary(), "pr_ap": self.curves["ap"],
                "confusion": {"names": self.names, "matrix": self.confusion.tolist(), "iou_thresh": 0.5,
                              "score_thresh": self.score_thresh}}


def analyze_types(gt: GtLike, results: ResultsLike, iou_types: Optional[Sequence[str]] = None,
                  score_thresh: float = 0.3) -> dict:
    """``{iou_type: IouTypeAnalysis}``: the error breakdown, PR curves and confusion matrix of each IoU type, each
    computed once. ``iou_types`` defaults to ``bbox`` plus ``segm`` when the results carry masks."""
    coco = load_gt(gt)
    dets = load_results(results)
    if iou_types is None:
        iou_types = ["bbox"] + (["segm"] if dets and all("segmentation" in d for d in dets) else [])
    out = {}
    for t in iou_types:
        M, names = confusion_matrix(coco, dets, t, score_thresh=score_thresh)
        out[t] = IouTypeAnalysis(error_breakdown(coco, dets, t), pr_curves(coco, dets, t), M, names, score_thresh)
    return out


def analyze(gt: GtLike, results: ResultsLike, iou_types: Optional[Sequence[str]] = None,
            score_thresh: float = 0.3) -> dict:
    """Everything above for each IoU type, JSON-able: ``{iou_type: {"errors": summary, "pr_ap": areas,
    "confusion": {"names", "matrix", "iou_thresh", "score_thresh"}}}`` (:meth:`IouTypeAnalysis.summary` of
    :func:`analyze_types`)."""
    return {t: a.summary() for t, a in analyze_types(gt, results, iou_types, score_thresh).items()}

