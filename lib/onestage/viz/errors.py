"""Figures of :mod:`onestage.analysis.errors`: PR curves, the confusion matrix, error-type bars, and the images with
the most errors (each detection coloured by its error type, missed objects dashed). Numbers come from analysis/."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from onestage.analysis.errors import ERROR_NAMES, ERROR_TYPES

__all__ = ["ERROR_COLORS", "plot_pr_curves", "plot_confusion_matrix", "plot_error_bars", "plot_error_images",
           "write_analysis"]

#: One colour per outcome, the same in every figure and in the explorer.
ERROR_COLORS = {"tp": "#2ca02c", "cls": "#9467bd", "loc": "#ff7f0e", "both": "#8c564b", "dupe": "#17becf",
                "bkg": "#d62728", "miss": "#e377c2"}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def plot_pr_curves(curves: Mapping, title: str = "") -> Figure:
    """Two panels from :func:`onestage.analysis.errors.pr_curves`: the class-averaged curve per IoU threshold, and
    each class's curve at IoU 0.5, each labelled with its area (= COCOeval's AP at that threshold)."""
    fig = Figure(figsize=(10, 4))
    a1, a2 = fig.subplots(1, 2)
    r = np.asarray(curves["recall"])
    for thr, p in curves["by_iou"].items():
        strong = thr in ("0.50", "0.75", "0.95")
        a1.plot(r, p, lw=2 if strong else 0.7, alpha=1 if strong else 0.5,
                label=f"IoU {thr}: {_fmt(curves['ap']['by_iou'][thr])}" if strong else None)
    a1.set_title("all classes, per IoU threshold", fontsize=9)
    for name, p in curves["by_class"].items():
        a2.plot(r, p, lw=1.2, label=f"{name}: {curves['ap']['by_class_AP50'][name]:.1f}")
    a2.set_title("per class, IoU 0.5", fontsize=9)
    for ax in (a1, a2):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix, names: Sequence[str], normalize: bool = True, title: str = "") -> Figure:
    """Rows: true class (+ background: detections on nothing); columns: predicted class (+ background: missed).
    ``normalize``: each row divided by its total (the background row stays in counts' proportions too)."""
    M = np.asarray(matrix, dtype=float)
    shown = M / np.maximum(M.sum(axis=1, keepdims=True), 1) if normalize else M
    n = len(names)
    fig = Figure(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    for i in range(n):
        for j in range(n):
            if M[i, j]:
                ax.text(j, i, f"{shown[i, j]:.2f}" if normalize else f"{int(M[i, j])}", ha="center", va="center",
                        fontsize=7, color="white" if shown[i, j] > 0.6 * np.nanmax(shown) else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or ("confusion matrix (rows sum to 1)" if normalize else "confusion matrix"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_error_bars(summaries: Mapping[str, Mapping], title: str = "") -> Figure:
    """ΔAP per error type (and the FP / FN summary fixes) for one or several results sets side by side:
    ``summaries`` maps a label (a model, an ablation row) to :meth:`ErrorBreakdown.summary`."""
    labels = list(summaries)
    kinds = list(ERROR_TYPES) + ["FP", "FN"]
    fig = Figure(figsize=(8, 0.9 + 0.35 * len(kinds) * max(1, len(labels)) / 2))
    ax = fig.add_subplot(1, 1, 1)
    h = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        s = summaries[label]
        vals = [s["delta_ap"][t] for t in ERROR_TYPES] + [s["fp_delta_ap"], s["fn_delta_ap"]]
        y = np.arange(len(kinds)) + k * h
        ax.barh(y, vals, height=h, label=f"{label} (AP50 {s['ap']:.1f})",
                color=[ERROR_COLORS.get(t, "#7f7f7f") for t in kinds] if len(labels) == 1 else None)
        for yy, v in zip(y, vals):
            ax.text(v, yy, f" {v:.1f}", va="center", fontsize=7)
    names = {**ERROR_NAMES, "FP": "all FPs (precision)", "FN": "all FNs (recall)"}
    ax.set_yticks(np.arange(len(kinds)) + h * (len(labels) - 1) / 2, [names[t] for t in kinds], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ΔAP50 when fixed (TIDE, arXiv:2008.08115)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or "where the AP goes", fontsize=9)
    fig.tight_layout()
    return fig


def _box(ax, bbox, color, dashed=False, lw=1.5, label=None):
    x, y, w, h = bbox
    ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=color, lw=lw, ls="--" if dashed else "-"))
    if label:
        ax.text(x, y, label, color="white", fontsize=6, va="bottom",
                bbox=dict(facecolor=color, edgecolor="none", pad=0.5, alpha=0.85))


def plot_error_images(images: Sequence, breakdown, results: Sequence[dict], gt, score_thresh: float = 0.3,
                      kinds: Optional[Sequence[str]] = None, cols: int = 3, title: str = "") -> Figure:
    """``images``: ``[(image_id, HxWx3 array or 3xHxW tensor in 0..1)]``. Each panel draws the ground truth (thin
    white), the detections scored ≥ ``score_thresh`` coloured by outcome (:data:`ERROR_COLORS`; ``kinds`` limits
    which outcomes are drawn) and the missed objects dashed."""
    from onestage.analysis.errors import load_gt

    coco = load_gt(gt)
    by_image: dict = {}
    for d in breakdown.detections:
        by_image.setdefault(d["image_id"], []).append(d)
    missed: dict = {}
    for m in breakdown.missed:
        missed.setdefault(m["image_id"], []).append(m)
    n = max(len(images), 1)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * min(cols, n), 3.4 * rows + 0.4))
    axes = np.atleast_1d(fig.subplots(rows, min(cols, n))).ravel()
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for ax, (img_id, img) in zip(axes, images):
        arr = img.permute(1, 2, 0).cpu().numpy() if hasattr(img, "permute") else np.asarray(img)
        ax.imshow(arr)
        for a in coco.imgToAnns.get(img_id, []):
            _box(ax, a["bbox"], "white", lw=0.6)
        counts = {}
        for d in by_image.get(img_id, []):
            if d["score"] < score_thresh or d["ignored"] or (kinds and d["type"] not in kinds):
                continue
            counts[d["type"]] = counts.get(d["type"], 0) + 1
            r = results[d["index"]]
            _box(ax, r["bbox"], ERROR_COLORS[d["type"]],
                 label=f"{d['type']} {names.get(r['category_id'], r['category_id'])} {d['score']:.2f}")
        if not kinds or "miss" in kinds:
            for m in missed.get(img_id, []):
                counts["miss"] = counts.get("miss", 0) + 1
                _box(ax, coco.anns[m["gt_id"]]["bbox"], ERROR_COLORS["miss"], dashed=True, lw=2,
                     label=f"miss {names.get(m['category_id'])}")
        ax.set_title(f"image {img_id}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), fontsize=7)
        ax.set_axis_off()
    for ax in axes[len(images):]:
        ax.set_axis_off()
    fig.suptitle(title or f"detections (score ≥ {score_thresh:g}) coloured by outcome; dashed: missed", fontsize=9)
    fig.tight_layout()
    return fig


def write_analysis(out_dir, gt, results: Sequence[dict], dataset=None, iou_types: Optional[Sequence[str]] = None,
                   score_thresh: float = 0.3, worst: int = 6, extra: Optional[dict] = None) -> dict:
    """Write ``summary.json`` (:func:`onestage.analysis.errors.analyze`, plus ``extra``), ``pr_curves.png``,
    ``confusion_matrix.png``, ``errors.png`` and — when ``dataset`` (a :class:`onestage.data.CocoDataset` of the
    same images) is given — ``worst_images.png`` into ``out_dir``, all atomically; the figures are of the first
    IoU type (``segm`` for a mask model, the paper tables' metric). Returns ``{name: path}``."""
    from pathlib import Path

    from onestage.analysis.errors import analyze_types, load_gt, worst_images
    from onestage.experiments.records import write_json_atomic
    from onestage.viz.draw import save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    coco = load_gt(gt)
    analyses = analyze_types(coco, results, iou_types, score_thresh=score_thresh)  # each computed once
    summary = {t: a.summary() for t, a in analyses.items()}
    kinds = list(summary)
    main = "segm" if "segm" in kinds else kinds[0]
    paths = {"summary": out / "summary.json"}
    write_json_atomic(paths["summary"], {"main_iou_type": main, **(extra or {}), "analysis": summary})
    figs = {
        "pr_curves": plot_pr_curves(analyses[main].curves, title=f"{main} precision-recall"),
        "confusion_matrix": plot_confusion_matrix(summary[main]["confusion"]["matrix"],
                                                  summary[main]["confusion"]["names"],
                                                  title=f"{main}, IoU 0.5, score ≥ {score_thresh:g}"),
        "errors": plot_error_bars({k: summary[k]["errors"] for k in kinds}, title="TIDE error types"),
    }
    if dataset is not None and worst:
        br = analyses[main].breakdown
        ids = [i for i, _ in worst_images(br, worst)]
        index = {int(img_id): k for k, img_id in enumerate(getattr(dataset, "ids", []))}
        from onestage.data.coco import load_image

        pics = []
        for img_id in ids:
            if img_id in index:
                pics.append((img_id, load_image(dataset.image_path(index[img_id]))))
        figs["worst_images"] = plot_error_images(pics, br, results, coco, score_thresh=score_thresh,
                                                 title=f"the {len(pics)} images with the most false positives + "
                                                       f"misses ({main})")
    for name, fig in figs.items():
        paths[name] = save_figure(fig, out / f"{name}.png", dpi=110)
    return paths
