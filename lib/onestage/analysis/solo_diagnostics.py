"""Which branch limits a trained SOLO / SOLOv2: the category branch or the mask branch?

COCO mask AP mixes three things: whether the right class scores high at an object's grid cells, whether the mask
those cells draw is right, and how the candidates are ranked and de-duplicated. Two measurements pull them apart:

* :func:`positive_cell_diagnostics` looks only at the *positive* (cell, object) pairs of the training assignment
  (:func:`onestage.modeling.solo.grid_targets` on the val images): the score of the object's class at its cells,
  whether that class is the cell's top class, and the IoU of the cell's mask with the object's mask — the category
  branch and the mask branch each judged where they are supposed to be right, with no NMS or threshold involved.
* :func:`class_agnostic_ap` re-scores the model's COCO results with every category merged into one: the gap to the
  per-class AP is what class confusion costs.
* :func:`mask_output_training_pairs` needs no weights: how many positive (cell, object) pairs of the training
  assignment reach each separately parameterised mask output — vanilla SOLO's S² channels per level (each its own
  1×1 filter), Decoupled SOLO's S + S, SOLOv2's one shared kernel head — i.e. how much training signal a schedule
  gives each of them.

Used for the SOLOv2 schedule record in ``data/results/solov2_schedule/`` (README "Measured").
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Optional, Sequence

import torch
from torch import Tensor

from onestage.modeling.solo import SOLO, downsample_masks
from onestage.modeling.solov2 import SOLOv2, dynamic_masks

__all__ = ["positive_cell_diagnostics", "class_agnostic_ap", "mask_output_training_pairs"]


def _cell_mask_probs(model, head_out, lvl: int, cells: Tensor) -> Tensor:
    """Mask probabilities of one image's cells ``k`` (batch of one) at the model's mask resolution for that level."""
    if isinstance(model, SOLOv2):
        return dynamic_masks(model.cell_kernels(head_out, lvl, cells), head_out.mask_features[0]).sigmoid()
    return model.positive_mask_probs(head_out, lvl, cells)


def _quantiles(values: Tensor) -> dict:
    if values.numel() == 0:
        return {"median": float("nan"), "mean": float("nan")}
    return {"median": float(values.median()), "mean": float(values.mean())}


def _fractions_above(values: Tensor, thresholds: Sequence[float]) -> dict:
    nan = float("nan")
    return {str(t): float((values > t).float().mean()) if values.numel() else nan for t in thresholds}


@torch.inference_mode()
def positive_cell_diagnostics(model, dataset, max_images: Optional[int] = 40, mask_thresh: float = 0.5) -> dict:
    """Category and mask quality of ``model`` at the positive cells of ``dataset``'s first ``max_images`` images.

    Returns ``num_pairs`` (positive (cell, object) pairs over all levels), ``gt_class_score`` (median / mean of the
    sigmoid score of the object's class at its cells) with ``frac_gt_score_above`` (0.1 = the inference score
    threshold, 0.3), ``class_accuracy`` (fraction of pairs whose top-scoring class is the object's), and
    ``mask_iou`` (median / mean IoU of the cell's mask, binarised at ``mask_thresh``, with the object's mask at the
    same resolution) with ``frac_mask_iou_above`` (0.5, 0.75). ``per_level`` repeats the pair count, median class
    score, class accuracy and median mask IoU for each FPN level, with its grid ``S`` and ``feature_hw``, the size of
    the level's feature map on the last image: where that map is coarser than the grid (a small input on P4–P6),
    neighbouring cells see interpolated copies of one feature pixel. The model's train/eval mode is restored.
    """
    if not isinstance(model, (SOLO, SOLOv2)):
        raise TypeError(f"positive_cell_diagnostics needs a SOLO or SOLOv2 model, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    gt_scores, correct, ious = [], [], []
    level_of, feature_hw = [], {}
    try:
        for i in range(n):
            image, target = dataset[i]
            parts = model.forward_parts([image.to(device)])
            canvas, head_out = parts.canvas_hw, parts.head
            feature_hw = {lvl: [-(-int(canvas[0]) // st), -(-int(canvas[1]) // st)]
                          for lvl, st in enumerate(model.strides)}  # the level's input to the grid resize
            assigned = model.assign([target], canvas)
            labels = target["labels"].to(device)
            for lvl, cells in enumerate(assigned.cells):
                if cells.numel() == 0:
                    continue
                cells, objects = cells.to(device), assigned.gt_inds[lvl].to(device)
                scores = head_out.cate_logits[lvl][0].flatten(1).sigmoid()[:, cells].T  # pairs × classes
                gt_scores.append(scores.gather(1, labels[objects, None])[:, 0])
                correct.append(scores.argmax(1) == labels[objects])
                probs = _cell_mask_probs(model, head_out, lvl, cells)
                gt = downsample_masks(target["masks"].to(device), canvas, probs.shape[-2:])[objects] > 0.5
                pred = probs > mask_thresh
                inter = (pred & gt).flatten(1).sum(1).float()
                union = (pred | gt).flatten(1).sum(1).float()
                ious.append(inter / union.clamp(min=1))
                level_of.append(torch.full((len(cells),), lvl))
    finally:
        model.train(was_training)
    s, c, iou = (torch.cat(parts).float().cpu() if parts else torch.zeros(0) for parts in (gt_scores, correct, ious))
    lv = torch.cat(level_of) if level_of else torch.zeros(0, dtype=torch.long)
    per_level = []
    for lvl, grid in enumerate(model.grid_numbers):
        sel = lv == lvl
        per_level.append({"level": lvl, "S": int(grid), "feature_hw": feature_hw.get(lvl),
                          "num_pairs": int(sel.sum()),
                          "gt_class_score_median": float(s[sel].median()) if sel.any() else float("nan"),
                          "class_accuracy": float(c[sel].mean()) if sel.any() else float("nan"),
                          "mask_iou_median": float(iou[sel].median()) if sel.any() else float("nan")})
    return {
        "images": n,
        "num_pairs": int(s.numel()),
        "gt_class_score": _quantiles(s),
        "frac_gt_score_above": _fractions_above(s, (0.1, 0.3)),
        "class_accuracy": float(c.mean()) if c.numel() else float("nan"),
        "mask_iou": _quantiles(iou),
        "frac_mask_iou_above": _fractions_above(iou, (0.5, 0.75)),
        "per_level": per_level,
    }


def class_agnostic_ap(coco_gt, results: Sequence[dict], image_ids: Sequence[int], iou_type: str = "segm") -> float:
    """COCO AP (percent) of ``results`` (COCO result dicts, e.g. from ``evaluate(..., return_predictions=True)``)
    with every ground-truth and detected category merged into one."""
    from pycocotools.coco import COCO

    from onestage.engine.evaluate import coco_eval

    data = copy.deepcopy(coco_gt.dataset)
    if not data.get("categories"):
        raise ValueError("the ground truth has no categories")
    merged = data["categories"][0]["id"]
    for ann in data["annotations"]:
        ann["category_id"] = merged
    data["categories"] = data["categories"][:1]
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        gt.createIndex()
    # fresh dicts with only what COCOeval reads: loadRes writes area/id (and a bbox for segm) into the dicts it gets
    field = "segmentation" if iou_type == "segm" else "bbox"
    merged_results = [{"image_id": r["image_id"], "score": r["score"], field: r[field], "category_id": merged}
                      for r in results]
    return coco_eval(gt, merged_results, iou_type, list(image_ids))["AP"]


def mask_output_training_pairs(model, dataset, max_images: Optional[int] = None) -> dict:
    """Training signal per mask output: the positive (cell, object) pairs of ``model``'s own assignment
    (``model.assign``, the targets its loss uses) over ``dataset``'s first ``max_images`` images, counted per
    separately parameterised mask output. Needs no trained weights (the assignment depends on the config only).

    * vanilla SOLO (paper §3): channel ``k = i·S + j`` of level ``l`` is its own 1×1 filter, trained only by the
      pairs at cell k — ``S²`` outputs per level;
    * Decoupled SOLO (§4): the mask of cell (i, j) is σ(y_i)·σ(x_j), so a pair trains x-map j and y-map i —
      ``2S`` outputs per level;
    * SOLOv2 (arXiv 2003.10152 §3.2): every cell's kernel comes from one shared kernel branch and every mask from one
      shared mask feature, for all levels — one output, trained by every pair.

    Returns ``images``, ``head``, ``num_pairs``, ``num_outputs``, ``pairs_per_output`` (mean, median, and the
    fraction of outputs no pair reached), and ``per_level`` (S, outputs, pairs, mean pairs per output, fraction
    untrained). Divide by ``images`` and multiply by the images a schedule shows (iterations × batch) for that
    schedule's figures."""
    if not isinstance(model, (SOLO, SOLOv2)):
        raise TypeError(f"mask_output_training_pairs needs a SOLO or SOLOv2 model, got {type(model).__name__}")
    head = "solov2" if isinstance(model, SOLOv2) else model.cfg.head
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    grids = list(model.grid_numbers)
    outputs_per_level = {"vanilla": lambda s: s * s, "decoupled": lambda s: 2 * s, "solov2": lambda s: 1}[head]
    counts = [torch.zeros(outputs_per_level(s), dtype=torch.long) for s in grids]  # per level: pairs per output
    pairs = [0] * len(grids)
    with torch.no_grad():
        for i in range(n):
            image, target = dataset[i]
            canvas = model.preprocess([image])[0].shape[-2:]
            for lvl, (s, cells) in enumerate(zip(grids, model.assign([target], canvas).cells)):
                k = cells.cpu() % (s * s)
                pairs[lvl] += len(k)
                if head == "vanilla":
                    counts[lvl] += torch.bincount(k, minlength=s * s)
                elif head == "decoupled":  # x-maps j first, then y-maps i
                    counts[lvl] += torch.bincount(torch.cat([k % s, s + k // s]), minlength=2 * s)
                else:
                    counts[lvl] += len(k)
    # SOLOv2's kernel branch and mask feature are shared by the levels too: one output for the whole model
    every = torch.tensor([float(sum(pairs))]) if head == "solov2" else torch.cat(counts).float()
    per_level = [{"level": lvl, "S": int(s), "outputs": int(c.numel()), "pairs": pairs[lvl],
                  "pairs_per_output_mean": float(c.float().mean()),
                  "frac_outputs_untrained": float((c == 0).float().mean())}
                 for lvl, (s, c) in enumerate(zip(grids, counts))]
    return {"images": n, "head": head, "num_pairs": sum(pairs), "num_outputs": int(every.numel()),
            "pairs_per_output": {"mean": float(every.mean()), "median": float(every.median()),
                                 "frac_untrained": float((every == 0).float().mean())},
            "per_level": per_level}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``python -m onestage.analysis.solo_diagnostics CHECKPOINT [--size 256] [--max-images 40]``: prints the
    diagnostics, the per-class and the class-agnostic COCO AP on the first images of the synthetic val split as JSON.
    ``--training-pairs solo,decoupled_solo,solov2 [--preset fast] [--max-images N]`` instead prints
    :func:`mask_output_training_pairs` for those models (no checkpoint: untrained models of the preset) on the
    training split as the preset's training run sees it (its size and flips)."""
    import argparse
    import json

    from onestage.data import dataset_for_config, get_dataset
    from onestage.engine.checkpoint import load_model
    from onestage.engine.evaluate import evaluate

    p = argparse.ArgumentParser(prog="python -m onestage.analysis.solo_diagnostics", description=main.__doc__)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--data", default="synthetic", help="dataset spec for get_dataset (default: synthetic)")
    p.add_argument("--size", type=int, default=320, help="test short side = max side (default: 320)")
    p.add_argument("--max-images", type=int, default=40)
    p.add_argument("--training-pairs", metavar="MODELS", help="comma-separated SOLO-family model names")
    p.add_argument("--preset", default="fast", help="with --training-pairs: model and training preset (default: fast)")
    p.add_argument("--json", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.training_pairs:
        from onestage.config import get_train_config
        from onestage.modeling import build_model

        train_cfg = get_train_config(args.preset)
        report = {"data": args.data, "preset": args.preset, "split": "train", "models": {}}
        for name in args.training_pairs.split(","):
            dataset = dataset_for_config(args.data, "train", train_cfg, model=name)
            model = build_model(name, args.preset, num_classes=len(dataset.coco.getCatIds()))
            report["models"][name] = mask_output_training_pairs(model, dataset, args.max_images)
    elif args.checkpoint:
        model = load_model(args.checkpoint).eval().float()
        dataset = get_dataset(args.data, split="val", train=False, min_size=(args.size,), max_size=args.size)
        report = {"checkpoint": str(args.checkpoint), "size": args.size,
                  "positive_cells": positive_cell_diagnostics(model, dataset, args.max_images)}
        metrics, results = evaluate(model, dataset, max_images=args.max_images, progress=False,
                                    return_predictions=True)
        ids = [int(i) for i in dataset.ids[: report["positive_cells"]["images"]]]  # no image is loaded again
        report["segm_AP"] = metrics["segm"]["AP"]
        report["segm_AP_class_agnostic"] = class_agnostic_ap(dataset.coco, results, ids, "segm")
    else:
        p.error("give a CHECKPOINT or --training-pairs MODELS")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        from onestage.experiments.records import write_text_atomic

        write_text_atomic(args.json, text + "\n")
    return report


if __name__ == "__main__":
    main()
