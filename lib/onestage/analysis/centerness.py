"""Center-ness in numbers (FCOS §3.3, arXiv 1904.01355): candidates before NMS and how ``sqrt(cls · ctr)`` re-ranks
them, the within-object rank correlation, detections with and without the center-ness map, and what NMS keeps.

Nothing here re-implements FCOS: candidate boxes come from the model's own ``FCOSHead`` outputs decoded exactly as
``postprocess`` does (same threshold, same per-level top-k), detections from ``postprocess`` itself — run once with
the center-ness map and once with it removed (``ctrness=None``, which ranks by the class score alone). The figures
of these numbers are :mod:`onestage.viz.centerness`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from onestage.modeling.fcos import (FCOSHeadOutputs, centerness_target, postprocess,
                                    postprocess_kwargs)
from onestage.modeling.parts import model_device

__all__ = ["RerankTable", "spearman", "head_outputs", "rerank_candidates", "rerank_table", "rerank_tables",
           "find_demo", "rerank_summary", "match_detections", "detect", "nms_effect"]


@dataclass
class RerankTable:
    """Candidate boxes of one image *before NMS* (the (location, class) pairs ``postprocess`` would feed to NMS).

    ``cls``: the class probability; ``ctr``: the predicted center-ness (sigmoid); ``score = sqrt(cls·ctr)``;
    ``gt_index``: the ground-truth box of the same class with the highest IoU (−1: none overlaps); ``iou``: that IoU;
    ``center_dist``: distance (px) from the candidate's *location* to that box's centre; ``ctr_target``: eq. 3 of the
    location for that box (0 outside it). ``demo_gt`` is the ground truth where re-ranking changes the top box most
    (see :func:`rerank_candidates`), ``demo`` a summary of it.
    """

    boxes: Tensor
    labels: Tensor
    cls: Tensor
    ctr: Tensor
    score: Tensor
    level: Tensor
    stride: Tensor
    locations: Tensor
    gt_index: Tensor
    iou: Tensor
    center_dist: Tensor
    ctr_target: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    demo_gt: int = -1
    demo: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def spearman(self) -> dict:
        """Rank correlation with the IoU of the class score alone and of ``sqrt(cls·ctr)``, over all candidates."""
        return {"cls": spearman(self.cls, self.iou), "score": spearman(self.score, self.iou)}

    def of_gt(self, g: int) -> Tensor:
        """Indices of the candidates matched to ground truth ``g``."""
        return torch.nonzero(self.gt_index == g).flatten()

    def top(self, g: int, by: str = "score", k: int = 1) -> Tensor:
        """Indices of the ``k`` best candidates of ground truth ``g`` ranked ``by`` ``"cls"`` or ``"score"``."""
        idx = self.of_gt(g)
        key = getattr(self, by)[idx]
        return idx[torch.argsort(key, descending=True, stable=True)[:k]]

    def markdown(self, g: Optional[int] = None, k: int = 5, class_names: Optional[Sequence[str]] = None) -> str:
        """The ``k`` best candidates of ground truth ``g`` (default ``demo_gt``) by class score, with their rank by
        ``sqrt(cls·ctr)`` among the same candidates."""
        g = self.demo_gt if g is None else g
        idx = self.of_gt(g)
        if g < 0 or len(idx) == 0:
            return "(no candidate overlaps a ground-truth box)"
        by_score = idx[torch.argsort(self.score[idx], descending=True, stable=True)].tolist()
        lines = ["| rank by cls | rank by √(cls·ctr) | level | location → centre (px) | cls | ctr (pred) "
                 "| ctr* (eq. 3) | √(cls·ctr) | IoU |", "|---|---|---|---|---|---|---|---|---|"]
        for r, i in enumerate(self.top(g, "cls", k).tolist()):
            lines.append(f"| {r + 1} | {by_score.index(i) + 1} | P{int(round(math.log2(int(self.stride[i]))))} | "
                         f"{self.center_dist[i]:.0f} | {self.cls[i]:.2f} | {self.ctr[i]:.2f} | "
                         f"{self.ctr_target[i]:.2f} | {self.score[i]:.2f} | {self.iou[i]:.2f} |")
        return "\n".join(lines)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (Pearson correlation of their ranks, ties get the average
    rank), with torch only. NaN for fewer than 2 values or a constant input."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.numel() < 2:
        return float("nan")

    def ranks(x: Tensor) -> Tensor:
        # average rank: (number of smaller values) + (number of equal values + 1) / 2, O(n²) but n is small
        less = (x[None, :] < x[:, None]).sum(dim=1).double()
        equal = (x[None, :] == x[:, None]).sum(dim=1).double()
        return less + (equal + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


@torch.inference_mode()
def head_outputs(model, image: Tensor):
    """Run ``model``'s backbone and head on one ``3×H×W`` image (RGB 0..1), as ``FCOS.forward`` does.

    Returns ``(head_out, locations, (H, W))`` (batch of one, on the CPU)."""
    if getattr(model, "head", None) is None or not hasattr(model, "forward_parts"):
        raise TypeError(f"{type(model).__name__} is not an FCOS-style model (no .head / .forward_parts)")
    was_training = model.training
    model.eval()
    try:
        parts = model.forward_parts([image.to(model_device(model))])
    finally:
        model.train(was_training)
    cpu = lambda xs: None if xs is None else [x.float().cpu() for x in xs]  # noqa: E731
    out = parts.head
    out = FCOSHeadOutputs(cpu(out.logits), cpu(out.bbox_reg), cpu(out.ctrness), [])
    return out, [loc.cpu() for loc in parts.locations], tuple(int(v) for v in parts.image_sizes[0])


def rerank_candidates(head_out: FCOSHeadOutputs, locations: Sequence[Tensor], strides: Sequence[int],
                      gt_boxes: Tensor, gt_labels: Optional[Tensor] = None, score_thresh: float = 0.05,
                      pre_nms_topk: int = 1000, image_index: int = 0) -> RerankTable:
    """The candidates ``postprocess`` would send to NMS for image ``image_index`` of ``head_out`` — (location,
    class) pairs with class score > ``score_thresh``, the ``pre_nms_topk`` best by cls·ctr per level, boxes decoded
    as ``x − l·s, y − t·s, x + r·s, y + b·s`` — each matched to the ground truth of its class it overlaps most.

    The demonstration ground truth is picked automatically: for every ground-truth box, compare its best candidate
    by class score with its best by ``sqrt(cls·ctr)``; ``demo_gt`` is the one where re-ranking raises the top box's
    IoU most (if re-ranking never changes a top box, the one with the most candidates).
    """
    if head_out.ctrness is None:
        raise ValueError("this model has no center-ness branch (centerness_on='none'): nothing to re-rank")
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    gt_labels = (torch.zeros(len(gt_boxes), dtype=torch.long) if gt_labels is None
                 else torch.as_tensor(gt_labels, dtype=torch.long).reshape(-1))
    cols = {k: [] for k in ("boxes", "labels", "cls", "ctr", "level", "stride", "locations")}
    for lvl, (locs, s) in enumerate(zip(locations, strides)):
        logit = head_out.logits[lvl][image_index]
        c = logit.shape[0]
        cls = logit.permute(1, 2, 0).reshape(-1, c).float().sigmoid()
        reg = head_out.bbox_reg[lvl][image_index].permute(1, 2, 0).reshape(-1, 4).float()
        ctr = head_out.ctrness[lvl][image_index].permute(1, 2, 0).reshape(-1).float().sigmoid()
        loc_idx, labels = (cls > score_thresh).nonzero(as_tuple=True)
        if loc_idx.numel() > pre_nms_topk:  # as postprocess: keep the best by cls·ctr
            top = (cls[loc_idx, labels] * ctr[loc_idx]).topk(pre_nms_topk).indices
            loc_idx, labels = loc_idx[top], labels[top]
        d = reg[loc_idx] * s
        p = locs[loc_idx].float()
        cols["boxes"].append(torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2],
                                          p[:, 1] + d[:, 3]], dim=1))
        cols["labels"].append(labels)
        cols["cls"].append(cls[loc_idx, labels])
        cols["ctr"].append(ctr[loc_idx])
        cols["level"].append(torch.full_like(labels, lvl))
        cols["stride"].append(torch.full_like(labels, int(s)))
        cols["locations"].append(p)
    t = {k: torch.cat(v) if v else torch.zeros(0) for k, v in cols.items()}
    n = len(t["labels"])
    boxes, labels = t["boxes"].reshape(-1, 4), t["labels"].long()
    score = torch.sqrt(t["cls"] * t["ctr"])
    if len(gt_boxes) and n:
        ious = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :])
        iou, gt_index = ious.max(dim=1)
        gt_index = torch.where(iou > 0, gt_index, torch.full_like(gt_index, -1))
    else:
        iou, gt_index = torch.zeros(n), torch.full((n,), -1, dtype=torch.long)
    g = gt_boxes[gt_index.clamp(min=0)] if len(gt_boxes) else torch.zeros(n, 4)
    loc = t["locations"].reshape(-1, 2)
    centre = (g[:, :2] + g[:, 2:]) / 2
    center_dist = torch.where(gt_index >= 0, (loc - centre).norm(dim=1), torch.full((n,), float("nan")))
    ltrb = torch.stack([loc[:, 0] - g[:, 0], loc[:, 1] - g[:, 1], g[:, 2] - loc[:, 0], g[:, 3] - loc[:, 1]], dim=1)
    inside = (ltrb.min(dim=1).values > 0) & (gt_index >= 0)
    ctr_target = torch.where(inside, centerness_target(ltrb.clamp(min=0)), torch.zeros(n))
    table = RerankTable(boxes, labels, t["cls"], t["ctr"], score, t["level"].long(), t["stride"].long(), loc,
                        gt_index, iou, center_dist, ctr_target, gt_boxes, gt_labels)
    _pick_demo(table)
    return table


def _pick_demo(t: RerankTable) -> None:
    best, best_key = -1, None
    for g in range(len(t.gt_boxes)):
        idx = t.of_gt(g)
        if len(idx) == 0:
            continue
        by_cls, by_score = int(t.top(g, "cls")[0]), int(t.top(g, "score")[0])
        gain = float(t.iou[by_score] - t.iou[by_cls])
        key = (gain, float(t.cls[by_cls] - t.cls[by_score]), len(idx))
        if best_key is None or key > best_key:
            best, best_key = g, key
    t.demo_gt = best
    if best >= 0:
        by_cls, by_score = int(t.top(best, "cls")[0]), int(t.top(best, "score")[0])
        idx = t.of_gt(best).tolist()
        rank_of = lambda key, i: sorted(idx, key=lambda j: -float(getattr(t, key)[j])).index(i) + 1  # noqa: E731
        t.demo = {"gt": best, "candidates": len(idx), "changed": by_cls != by_score,
                  "top_by_cls": by_cls, "top_by_score": by_score,
                  "iou_top_by_cls": float(t.iou[by_cls]), "iou_top_by_score": float(t.iou[by_score]),
                  "cls_top_by_cls": float(t.cls[by_cls]), "ctr_top_by_cls": float(t.ctr[by_cls]),
                  "cls_top_by_score": float(t.cls[by_score]), "ctr_top_by_score": float(t.ctr[by_score]),
                  "dist_top_by_cls": float(t.center_dist[by_cls]), "dist_top_by_score": float(t.center_dist[by_score]),
                  "rank_by_score_of_top_by_cls": rank_of("score", by_cls)}


def rerank_table(model, image: Tensor, target: dict, score_thresh: Optional[float] = None) -> RerankTable:
    """:func:`rerank_candidates` on ``model``'s head outputs for one image; ``target`` holds the ground truth
    (``boxes`` in the image's pixels, ``labels``). ``score_thresh`` defaults to the model's (0.05)."""
    head_out, locations, _ = head_outputs(model, image)
    cfg = getattr(model, "cfg", None)
    thresh = getattr(cfg, "score_thresh", 0.05) if score_thresh is None else score_thresh
    return rerank_candidates(head_out, locations, model.strides, target["boxes"], target.get("labels"),
                             thresh, getattr(cfg, "pre_nms_topk", 1000))


def rerank_tables(model, dataset, indices: Sequence[int]) -> list:
    """:func:`rerank_table` for ``dataset[i]`` for every ``i`` in ``indices``."""
    out = []
    for i in indices:
        image, target = dataset[i]
        out.append(rerank_table(model, image, target))
    return out


def _gain(t: RerankTable) -> float:
    if t.demo_gt < 0:
        return float("-inf")
    return t.demo["iou_top_by_score"] - t.demo["iou_top_by_cls"]


def find_demo(tables: Sequence[RerankTable]) -> int:
    """Position in ``tables`` of the image whose demonstration object gains most IoU from re-ranking (the first on
    ties) — chosen by a rule, not by hand."""
    gains = [_gain(t) for t in tables]
    return int(max(range(len(gains)), key=lambda k: (gains[k], -k))) if gains else -1


def rerank_summary(tables: Sequence[RerankTable], min_candidates: int = 3) -> dict:
    """Per object (ground truth with ≥ ``min_candidates`` candidates) over all ``tables``: does ranking by
    ``sqrt(cls·ctr)`` instead of cls pick a better box? Returns the number of objects, how often the top box
    changes and whether its IoU then rises or falls, the mean IoU of the top box either way, and the mean
    within-object Spearman ρ(score, IoU) either way (how well each score orders one object's boxes — what NMS
    relies on: it keeps the top one and suppresses the rest)."""
    objects = changed = better = worse = 0
    iou_cls, iou_score, rho_cls, rho_score = [], [], [], []
    for t in tables:
        for g in range(len(t.gt_boxes)):
            idx = t.of_gt(g)
            if len(idx) < min_candidates:
                continue
            objects += 1
            a, b = int(t.top(g, "cls")[0]), int(t.top(g, "score")[0])
            iou_cls.append(float(t.iou[a]))
            iou_score.append(float(t.iou[b]))
            if a != b:
                changed += 1
                better += int(t.iou[b] > t.iou[a])
                worse += int(t.iou[b] < t.iou[a])
            for key, acc in (("cls", rho_cls), ("score", rho_score)):
                r = spearman(getattr(t, key)[idx], t.iou[idx])
                if not math.isnan(r):
                    acc.append(r)
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    return {"images": len(tables), "objects": objects, "changed": changed, "better": better, "worse": worse,
            "top_iou_cls": mean(iou_cls), "top_iou_score": mean(iou_score),
            "rho_cls": mean(rho_cls), "rho_score": mean(rho_score)}


def match_detections(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     iou_thresh: float = 0.5) -> list:
    """Label each detection, in order of decreasing score, as ``"tp"`` (matches a not yet matched ground truth of
    its class at IoU ≥ ``iou_thresh``), ``"dup"`` (its best such ground truth was already taken by a higher-scored
    detection: a duplicate NMS let through) or ``"fp"`` (no ground truth of its class at that IoU) — the greedy
    matching of COCO / PASCAL evaluation. Returned in the input order."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    out = ["fp"] * n
    if n == 0 or len(gt_boxes) == 0:
        return out
    ious = box_iou(boxes, gt_boxes) * (torch.as_tensor(labels)[:, None] == torch.as_tensor(gt_labels)[None, :])
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    for i in torch.argsort(torch.as_tensor(scores), descending=True, stable=True).tolist():
        ok = ious[i] >= iou_thresh
        if not ok.any():
            continue
        free = ok & ~taken
        if free.any():
            j = int(torch.where(free, ious[i], torch.full_like(ious[i], -1)).argmax())
            taken[j] = True
            out[i] = "tp"
        else:
            out[i] = "dup"
    return out


def detect(model, image: Tensor, use_centerness: bool = True, cache: Optional[dict] = None, key=None) -> dict:
    """The model's detections for one image through ``postprocess`` itself, with the model's settings. With
    ``use_centerness=False`` the center-ness map is removed from the head outputs, so ``postprocess`` thresholds,
    pre-selects, NMS-es and scores by the class score alone — the same trained weights, only inference changes.
    ``cache`` (a dict) keeps head outputs under ``key`` for repeated calls."""
    if cache is not None and key in cache:
        head_out, locations, size = cache[key]
    else:
        head_out, locations, size = head_outputs(model, image)
        if cache is not None:
            cache[key] = (head_out, locations, size)
    if not use_centerness:
        head_out = head_out._replace(ctrness=None)
    kwargs = postprocess_kwargs(model.cfg) if use_centerness else postprocess_kwargs(model.cfg, ctr_from_reg=False)
    return postprocess(head_out, locations, model.strides, [size], **kwargs)[0]


def nms_effect(model, dataset, num_images: int = 50, count_thresh: Optional[float] = None,
               iou_thresh: float = 0.5, progress: bool = False) -> dict:
    """Detections after NMS on the first ``num_images`` of ``dataset``, scored with and without center-ness (the
    same trained weights; see :func:`detect`).

    Returns ``{"with": {...}, "without": {...}, "num_images", "num_gt", "count_thresh", "iou_thresh"}``. Each side
    holds COCO box AP (``coco_eval`` on ``dataset.coco`` when the dataset has one — threshold-free, the honest
    comparison) and counts from :func:`match_detections`: ``tp`` / ``dup`` / ``fp`` among the detections kept and
    ``missed`` ground truths. Kept are, by default (``count_thresh=None``), each image's *k best detections, k = its
    number of objects* — the same budget for both scores, which live on different scales (``sqrt(cls·ctr)`` lifts
    a weak class score, so one fixed threshold would keep many more boxes on that side) — or those scoring ≥
    ``count_thresh``.
    """
    from onestage.engine.evaluate import _label_to_cat, coco_eval, predictions_to_coco

    n = min(int(num_images), len(dataset))
    sides = {s: {"tp": 0, "dup": 0, "fp": 0, "missed": 0, "results": []} for s in ("with", "without")}
    image_ids, num_gt = [], 0
    to_cat = _label_to_cat(dataset)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="images", unit="img")
    for i in it:
        image, target = dataset[i]
        cache: dict = {}
        m = len(target["boxes"])
        num_gt += m
        if "image_id" in target:
            image_ids.append(int(target["image_id"]))
        for side, use in (("with", True), ("without", False)):
            det = detect(model, image, use, cache, i)
            s = sides[side]
            if count_thresh is None:
                keep = torch.arange(len(det["scores"])) < m  # postprocess returns them sorted by score
            else:
                keep = det["scores"] >= count_thresh
            outcome = match_detections(det["boxes"][keep], det["scores"][keep], det["labels"][keep],
                                       target["boxes"], target["labels"], iou_thresh)
            for o in ("tp", "dup", "fp"):
                s[o] += outcome.count(o)
            s["missed"] += m - outcome.count("tp")
            if "image_id" in target and "orig_size" in target:
                s["results"].extend(predictions_to_coco(det, target, to_cat, with_masks=False))
    coco = getattr(dataset, "coco", None)
    out = {"num_images": n, "num_gt": num_gt, "count_thresh": count_thresh, "iou_thresh": iou_thresh}
    for side, s in sides.items():
        results = s.pop("results")
        if coco is not None and image_ids:
            s.update(coco_eval(coco, results, "bbox", image_ids))
        out[side] = s
    return out
