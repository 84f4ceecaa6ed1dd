"""Inference speed of onestage FCOS against torchvision's ``fcos_resnet50_fpn`` on the same machine, same run.

Both models are R-50-FPN FCOS with random weights (nothing is downloaded), in eval mode under
``torch.inference_mode``, on one ``size×size`` image. torchvision's model is configured with
``min_size = max_size = size`` so its internal transform keeps the input size; that transform (resize + normalise +
batch) is part of its forward, just as normalise + pad is part of ours, so both timings are end to end from a 0..1
image to final detections. The transform's own cost is timed separately and printed for reference.

With random weights, many locations pass the 0.05 score threshold, so post-processing (top-k, NMS) runs at its
worst case in both models. Speed is reported as ratios, never asserted in tests.

Four variants are timed, alternating within one run (A B C D, D C B A, …, since this machine is shared and noisy):
our model on its inference fast path (the default: :mod:`onestage.modeling.fast_inference`) and with it off,
torchvision's model as it ships and with the same generic optimisations applied (BatchNorm folding, channels_last,
bf16 autocast where the CPU has native bf16) — the second ratio, the fair one.

``onnx=True`` adds a column: our model exported as one ONNX graph (:mod:`onestage.export`) and run by onnxruntime on
the CPU with as many threads as torch uses, on the same image (needs ``pip install -e '.[onnx]'``).
"""
from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch

__all__ = ["run_bench", "format_bench", "run_mask_bench", "format_mask_bench", "generic_fast_torchvision", "fast_path_ap",
           "format_fast_path_ap", "time_mask_heads",
           "format_mask_heads", "overlapping_masks", "time_nms", "format_nms"]


def _time(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _onnx_time(model, image: torch.Tensor, repeats: int, warmup: int, torchvision_s: float) -> dict:
    """Median seconds per image of ``model`` exported to ONNX and run by onnxruntime (CPU, torch's thread count),
    how many detections the graph returned, and the ratio to torchvision's ``torchvision_s``."""
    import tempfile
    from pathlib import Path

    from onestage import export

    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_onnx(model.cpu(), Path(tmp) / "model.onnx", tuple(image.shape[-2:]), check=False)
        session = export.onnx_session(path, threads=torch.get_num_threads())
        x = image.cpu()
        n = int(export.run_onnx(session, x)["boxes"].shape[0])
        t = _time(lambda: export.run_onnx(session, x), repeats, warmup, torch.device("cpu"))
    return {"onnxruntime_s": t, "instances_onnxruntime": n, "onnxruntime_ratio": t / torchvision_s}


def _alternating(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """Median wall seconds of each callable in ``fns`` (name → fn), timed in alternating order — A B C D, D C B A,
    A B C D, … — so that a noisy machine's slow spells fall on every variant alike (CUDA synchronised)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def generic_fast_torchvision(model, image: torch.Tensor, bf16: bool):
    """``(fn, folded)``: torchvision detector ``model`` with the generic optimisations of our fast path
    (:mod:`onestage.modeling.fast_inference`) applied to a copy — its backbone's FrozenBatchNorms folded into the
    convolutions, channels_last weights, and (``bf16``) its whole forward under CPU bf16 autocast — and the number
    of norms folded. ``fn()`` runs it on ``image``. For the *fair* ratio: what the same generic work buys them."""
    import contextlib
    import copy

    from onestage.modeling.fast_inference import fold_batchnorm

    fast = copy.deepcopy(model).eval()
    with torch.no_grad():
        batch = fast.transform([image])[0].tensors
        folded = fold_batchnorm(fast, lambda m: m.backbone(batch), check=True)
    if image.device.type == "cpu":
        fast = fast.to(memory_format=torch.channels_last)

    def fn():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            return fast([image])

    return fn, len(folded)


def _fast_variants(ours, theirs, image, repeats: int, warmup: int, device: torch.device) -> dict:
    """Times four variants alternating in one run: our model on its default inference fast path and with it off,
    torchvision's model as it ships and with the same generic optimisations (:func:`generic_fast_torchvision`)."""
    from onestage.modeling.fast_inference import FastInference, fast_inference_options, plain_inference

    opts = fast_inference_options(ours) or FastInference()
    applied = opts.applied(device)
    theirs_fast, folded = generic_fast_torchvision(theirs, image, applied["bf16"])

    def ours_plain():
        with plain_inference(ours):
            return ours([image])

    with torch.inference_mode():
        outputs = {"onestage": ours([image])[0], "onestage_plain": ours_plain()[0],
                   "torchvision": theirs([image])[0], "torchvision_fast": theirs_fast()[0]}
        t = _alternating({"onestage": lambda: ours([image]), "onestage_plain": ours_plain,
                          "torchvision": lambda: theirs([image]), "torchvision_fast": theirs_fast},
                         repeats, warmup, device)
    return {"onestage_s": t["onestage"], "onestage_plain_s": t["onestage_plain"], "torchvision_s": t["torchvision"],
            "torchvision_fast_s": t["torchvision_fast"], "ratio": t["onestage"] / t["torchvision"],
            "ratio_plain": t["onestage_plain"] / t["torchvision"],
            "ratio_fair": t["onestage"] / t["torchvision_fast"],
            "fast_path": applied, "torchvision_norms_folded": folded,
            "threads": torch.get_num_threads(), "outputs": outputs}


def run_bench(size: int = 512, repeats: int = 10, warmup: int = 3, device: Optional[str] = None,
              preset: str = "paper", num_classes: int = 80, seed: int = 0, onnx: bool = False) -> dict:
    """Median seconds per image for both models, each as shipped and on the inference fast path, alternating in one
    run (and torchvision's transform alone); see the module doc."""
    import torchvision
    from torchvision.models.detection import fcos_resnet50_fpn

    import onestage

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    ours = onestage.build_model("fcos", preset=preset, num_classes=num_classes).to(device).eval()
    theirs = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                               min_size=size, max_size=size).to(device).eval()
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)

    r = _fast_variants(ours, theirs, image, repeats, warmup, device)
    r.pop("outputs")
    with torch.inference_mode():
        t_transform = _time(lambda: theirs.transform([image]), repeats, warmup, device)
    extra = _onnx_time(ours, image, repeats, warmup, r["torchvision_s"]) if onnx else {}
    return {**extra, **r,
        "device": str(device),
        "size": size,
        "repeats": repeats,
        "preset": preset,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchvision_transform_s": t_transform,
    }


def _variant_lines(r: dict, ours: str, theirs: str, counts: Optional[dict] = None) -> list:
    counts = counts or {}
    fp = r["fast_path"]
    what = ", ".join(k for k in ("fold_bn", "channels_last", "bf16") if fp.get(k)) or "nothing"

    def n(key):
        return f"  ({counts[key]} instances)" if key in counts else ""

    return [
        f"  {ours + ' (fast path: ' + what + ')':<52}: {r['onestage_s'] * 1000:9.1f} ms/img{n('onestage')}",
        f"  {ours + ' (fast path off)':<52}: {r['onestage_plain_s'] * 1000:9.1f} ms/img{n('onestage_plain')}",
        f"  {theirs:<52}: {r['torchvision_s'] * 1000:9.1f} ms/img{n('torchvision')}",
        f"  {theirs + ' + the same generic optimisations':<52}: {r['torchvision_fast_s'] * 1000:9.1f} ms/img"
        f"{n('torchvision_fast')}",
        f"  {'ratio onestage / torchvision':<52}: {r['ratio']:9.2f}x  (fast path off: {r['ratio_plain']:.2f}x)",
        f"  {'fair ratio (both with the generic optimisations)':<52}: {r['ratio_fair']:9.2f}x",
    ]


def format_bench(r: dict) -> str:
    """Human-readable table of :func:`run_bench`'s result."""
    return "\n".join([
        f"FCOS inference, {r['size']}x{r['size']}, batch 1, {r['device']} ({r['threads']} threads), median of "
        f"{r['repeats']}, the four alternating (torch {r['torch']}, torchvision {r['torchvision']})",
        *_variant_lines(r, f"onestage FCOS ({r['preset']} preset)", "torchvision fcos_resnet50_fpn"),
        f"  (torchvision's transform alone: {r['torchvision_transform_s'] * 1000:.1f} ms)",
    ] + ([f"  onestage FCOS in onnxruntime        : {r['onnxruntime_s'] * 1000:9.1f} ms/img  "
          f"({r['onnxruntime_ratio']:.2f}x torchvision)"] if "onnxruntime_s" in r else []))


# ---------------------------------------------------------------------------------------------------------------
# Mask models vs torchvision Mask R-CNN
# ---------------------------------------------------------------------------------------------------------------

#: Config fields that, set to zero, make a model keep every candidate so exactly ``detections_per_img`` come out.
_THRESHOLD_FIELDS = ("score_thresh", "update_thresh", "mask_score_thresh")


def _force_detections(name: str, preset: str, num: int) -> dict:
    import dataclasses

    from onestage.modeling import get_model_config

    fields = {f.name for f in dataclasses.fields(get_model_config(name, preset))}
    overrides = {f: 0.0 for f in _THRESHOLD_FIELDS if f in fields}
    overrides["detections_per_img"] = num
    return overrides


def run_mask_bench(name: str, size: int = 512, repeats: int = 10, warmup: int = 3, device: Optional[str] = None,
                   preset: str = "paper", num_classes: int = 80, detections: int = 100, seed: int = 0,
                   onnx: bool = False) -> dict:
    """Median seconds per image of onestage model ``name`` vs torchvision ``maskrcnn_resnet50_fpn``, both R-50-FPN
    with random weights, on one ``size×size`` image, each forced to output ``detections`` instances with masks
    (score thresholds 0, ``detections_per_img`` = ``box_detections_per_img`` = ``detections``), so the mask heads
    run on the same number of instances; each model as shipped and on the fast path, the four alternating. The
    numbers of instances actually returned are reported."""
    import torchvision
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    import onestage

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    ours = onestage.build_model(name, preset=preset, num_classes=num_classes,
                                **_force_detections(name, preset, detections)).to(device).eval()
    bbox_pred = getattr(getattr(ours, "head", None), "bbox_pred", None)
    if bbox_pred is not None:
        # Random FCOS-style box regressors give ReLU(≈0) distances → empty boxes that are dropped; a bias of 1
        # (boxes of ±1 stride, as a trained model has) keeps every candidate alive so the mask head sees them all.
        torch.nn.init.constant_(bbox_pred.bias, 1.0)
    for preds in ("mask_preds", "mask_preds_x", "mask_preds_y"):
        # SOLO's mask channels start at the focal prior (σ ≈ 0.01 < the 0.5 mask threshold): every candidate mask
        # would be empty and dropped. A bias of 2 (σ ≈ 0.88) keeps them, as a trained model's positive cells do.
        for conv in getattr(getattr(ours, "head", None), preds, None) or ():
            torch.nn.init.constant_(conv.bias, 2.0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                   min_size=size, max_size=size, box_score_thresh=0.0,
                                   box_detections_per_img=detections).to(device).eval()
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    r = _fast_variants(ours, theirs, image, repeats, warmup, device)
    counts = {k: int(v["masks"].shape[0]) for k, v in r.pop("outputs").items()}
    extra = _onnx_time(ours, image, repeats, warmup, r["torchvision_s"]) if onnx else {}
    return {**extra, **r, "model": name, "device": str(device), "size": size, "repeats": repeats, "preset": preset,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "instances": counts, "instances_onestage": counts["onestage"],
            "instances_torchvision": counts["torchvision"]}


def format_mask_bench(r: dict) -> str:
    return "\n".join([
        f"{r['model']} vs Mask R-CNN inference, {r['size']}x{r['size']}, batch 1, {r['device']} ({r['threads']} "
        f"threads), median of {r['repeats']}, the four alternating (torch {r['torch']}, torchvision "
        f"{r['torchvision']})",
        *_variant_lines(r, f"onestage {r['model']} ({r['preset']} preset)", "torchvision maskrcnn_resnet50_fpn",
                        r.get("instances")),
    ] + ([f"  {'onestage in onnxruntime':<52}: {r['onnxruntime_s'] * 1000:9.1f} ms/img  "
          f"({r['instances_onnxruntime']} instances, {r['onnxruntime_ratio']:.2f}x torchvision)"]
         if "onnxruntime_s" in r else []))


def time_mask_heads(num_instances: int = 100, image_size: tuple = (800, 1333), settings=((3, 8, 8),),
                    repeats: int = 10, warmup: int = 2, device: Optional[str] = None, seed: int = 0) -> dict:
    """Milliseconds for the mask heads of ``num_instances`` instances — CondInst Table 1's "time" column.

    * CondInst: the dynamic heads (``onestage.ops.dynamic_mask_head``, rel. coordinates built inside) on the stride-8
      mask features of one ``image_size`` image plus the ×4 aligned upsampling of their logits (Table 4's default),
      for each ``(depth, width, Cmask)`` in ``settings`` (``ms``; ``ms_with_upsample`` adds the upsampling); the controller's parameters are given (they come with the
      detector's head, like Mask R-CNN's RoI features).
    * Mask R-CNN: torchvision's ``MaskRCNNHeads`` (4 × 3×3 conv 256) + ``MaskRCNNPredictor`` (deconv ×2, 1×1 to 81
      classes) on ``num_instances`` 14×14×256 RoI features — 28×28 masks; the RoIAlign is not counted.
    Also returns the parameter counts (169 vs ~2.6M at the defaults).
    """
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    from onestage.modeling.condinst import aligned_bilinear
    from onestage.ops.dynamic_mask_head import dynamic_mask_head, num_dynamic_params

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(seed)
    h, w = (image_size[0] + 7) // 8, (image_size[1] + 7) // 8
    n = num_instances
    locations = (torch.rand(n, 2, generator=g) * torch.tensor([image_size[1], image_size[0]])).to(device)
    soi = torch.full((n,), 64.0).to(device)
    im_inds = torch.zeros(n, dtype=torch.long, device=device)
    rows = []
    with torch.inference_mode():
        for depth, width, cmask in settings:
            feats = torch.randn(1, cmask, h, w, generator=g).to(device)
            num_params = num_dynamic_params(cmask, width, depth)
            params = (torch.randn(n, num_params, generator=g) * 0.1).to(device)

            def head_only():
                return dynamic_mask_head(feats, params, im_inds, locations, soi, 8, width, depth, "rel")

            rows.append({"depth": depth, "width": width, "cmask": cmask, "params": num_params,
                         "ms": _time(head_only, repeats, warmup, device) * 1000,
                         "ms_with_upsample": _time(lambda: aligned_bilinear(head_only(), 4), repeats, warmup,
                                                   device) * 1000})
        heads = MaskRCNNHeads(256, [256, 256, 256, 256], 1).to(device).eval()
        predictor = MaskRCNNPredictor(256, 256, 81).to(device).eval()
        rois = torch.randn(n, 256, 14, 14, generator=g).to(device)
        maskrcnn_ms = _time(lambda: predictor(heads(rois)), repeats, warmup, device) * 1000
    maskrcnn_params = sum(p.numel() for p in heads.parameters()) + sum(p.numel() for p in predictor.parameters())
    return {"device": str(device), "num_instances": n, "image_size": list(image_size), "feature_size": [h, w],
            "condinst": rows, "maskrcnn_ms": maskrcnn_ms, "maskrcnn_params": maskrcnn_params,
            "torch": torch.__version__}


def format_mask_heads(r: dict) -> str:
    lines = [f"Mask heads for {r['num_instances']} instances, {r['image_size'][0]}x{r['image_size'][1]} image "
             f"(mask features {r['feature_size'][0]}x{r['feature_size'][1]} at stride 8), {r['device']}",
             f"  {'head':<48}{'params':>9}{'ms':>9}{'ratio':>7}{'+ x4 upsample ms':>18}{'ratio':>7}"]
    ref = r["maskrcnn_ms"]
    for row in r["condinst"]:
        name = f"CondInst dynamic (depth {row['depth']}, width {row['width']}, Cmask {row['cmask']})"
        lines.append(f"  {name:<48}{row['params']:>9}{row['ms']:>9.1f}{row['ms'] / ref:>6.2f}x"
                     f"{row['ms_with_upsample']:>18.1f}{row['ms_with_upsample'] / ref:>6.2f}x")
    lines.append(f"  {'Mask R-CNN MaskRCNNHeads + predictor (28x28)':<48}{r['maskrcnn_params']:>9}{ref:>9.1f}"
                 f"{1.0:>6.2f}x")
    return "\n".join(lines)


def overlapping_masks(num_masks: int, mask_hw: tuple, num_clusters: int = 40, num_classes: int = 5,
                      seed: int = 0) -> tuple:
    """``(masks N×H×W bool, scores N, labels N)``: what a mask NMS sees — ``num_masks`` disks in ``num_clusters``
    groups of near-duplicates (each disk jitters its group's centre and radius by ~10 % of the radius), radii 5-35 %
    of ``min(H, W) / 2``, uniform scores, each group one of ``num_classes`` classes. Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    h, w = mask_hw
    centres = torch.rand(num_clusters, 2, generator=g) * torch.tensor([float(h), float(w)])
    radii = (0.05 + 0.30 * torch.rand(num_clusters, generator=g)) * min(h, w) / 2
    group = torch.randint(0, num_clusters, (num_masks,), generator=g)
    cy, cx = (centres[group] + 0.1 * radii[group, None] * torch.randn(num_masks, 2, generator=g)).unbind(1)
    r = radii[group] * (1 + 0.1 * torch.randn(num_masks, generator=g))
    ys = torch.arange(h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32)[None, None, :]
    masks = (ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2 < r[:, None, None] ** 2
    labels = torch.randint(0, num_classes, (num_clusters,), generator=g)[group]
    return masks, torch.rand(num_masks, generator=g), labels


def time_nms(num_masks: int = 500, mask_sizes=((64, 64), (200, 336)), repeats: int = 10, warmup: int = 2,
             device: Optional[str] = None, seed: int = 0) -> dict:
    """Milliseconds of the NMS step alone on the same ``num_masks`` candidates (SOLO's ``nms_pre`` = 500), for each
    mask size (stride 4 of a 256-px image — the ``cpu`` preset — and of the paper's 800×1344 test canvas):

    * ``matrix``: Matrix NMS (``onestage.modeling.solo.matrix_nms``, gaussian σ = 2) — one IoU matrix product, then
      element-wise decay and a column minimum;
    * ``greedy``: greedy class-aware mask NMS (``onestage.structures.mask_nms``, IoU 0.5) — the same IoU product, then a
      sequential keep/drop sweep over the sorted masks;
    * ``iou_only``: the shared ``N×N`` mask IoU product by itself (``onestage.structures.mask_iou``);
    * ``torchvision_box``: ``torchvision.ops.batched_nms`` on the masks' tight boxes (IoU 0.5) — the reference a box
      detector pays, for the ratio.

    Also the number of masks each keeps (Matrix NMS: decayed score ≥ 0.05, SOLO's ``update_thresh``). Inputs from
    :func:`overlapping_masks`. Whole-model timings (e.g. the ``solo_nms`` ablation's ``cost.inference_ms``) add
    everything after the NMS, which grows with the number of masks kept.
    """
    import torchvision

    from onestage.modeling.solo import matrix_nms
    from onestage.structures import mask_iou, mask_nms, masks_to_boxes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    with torch.inference_mode():
        for hw in mask_sizes:
            masks, scores, labels = (t.to(device) for t in overlapping_masks(num_masks, tuple(hw), seed=seed))
            boxes = masks_to_boxes(masks).float()
            fns = {
                "matrix": lambda: matrix_nms(masks, labels, scores, "gaussian", 2.0),
                "greedy": lambda: mask_nms(masks, scores, labels, 0.5),
                "iou_only": lambda: mask_iou(masks, masks),
                "torchvision_box": lambda: torchvision.ops.batched_nms(boxes, scores, labels, 0.5),
            }
            row = {"mask_hw": list(hw)}
            for name, fn in fns.items():
                row[f"{name}_ms"] = _time(fn, repeats, warmup, device) * 1000
            row["kept_matrix"] = int((fns["matrix"]() >= 0.05).sum())
            row["kept_greedy"] = int(fns["greedy"]().numel())
            row["kept_torchvision_box"] = int(fns["torchvision_box"]().numel())
            rows.append(row)
    return {"device": str(device), "num_masks": num_masks, "repeats": repeats, "rows": rows,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def format_nms(r: dict) -> str:
    lines = [f"NMS of {r['num_masks']} candidate masks, {r['device']} ({r['threads']} threads), median of "
             f"{r['repeats']} (torch {r['torch']}, torchvision {r['torchvision']})",
             f"  {'masks':<10}{'Matrix NMS':>12}{'greedy mask':>13}{'IoU only':>10}{'tv box NMS':>12}"
             f"{'matrix/greedy':>15}{'matrix/tv box':>15}{'kept m/g/box':>15}"]
    for row in r["rows"]:
        size = f"{row['mask_hw'][0]}x{row['mask_hw'][1]}"
        lines.append(f"  {size:<10}{row['matrix_ms']:>10.1f}ms{row['greedy_ms']:>11.1f}ms{row['iou_only_ms']:>8.1f}ms"
                     f"{row['torchvision_box_ms']:>10.2f}ms{row['matrix_ms'] / row['greedy_ms']:>14.2f}x"
                     f"{row['matrix_ms'] / row['torchvision_box_ms']:>14.1f}x"
                     f"{row['kept_matrix']:>7}/{row['kept_greedy']}/{row['kept_torchvision_box']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The fast path's accuracy on the shipped checkpoints
# ---------------------------------------------------------------------------------------------------------------

def fast_path_ap(names: Optional[Sequence[str]] = None, max_images: Optional[int] = None, batch_size: int = 2,
                 progress: bool = True, on_row=None, options=None) -> list:
    """COCO AP (pycocotools) of every shipped checkpoint (``data/checkpoints``, :data:`onestage.engine.shipped.SHIPPED`)
    on its val split, with the inference fast path off and on (``options``, a
    :class:`~onestage.modeling.fast_inference.FastInference`; default: its defaults): one row per checkpoint with both metric sets, the AP differences and each
    evaluation's wall seconds (model, post-processing and COCOeval; one after the other, not alternated). A missing
    checkpoint file is reported as ``missing`` rather than made. ``on_row(rows)`` is called after every checkpoint."""
    from onestage.config import TrainConfig
    from onestage.data import dataset_for_config
    from onestage.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from onestage.engine.evaluate import evaluate
    from onestage.engine.shipped import SHIPPED, shipped_checkpoint
    from onestage.modeling.fast_inference import FastInference

    rows = []
    for recipe in SHIPPED:
        if names and recipe.name not in names and recipe.model not in names:
            continue
        path = shipped_checkpoint(recipe.model, recipe.data)
        row = {"checkpoint": f"data/checkpoints/{path.name}", "model": recipe.model, "data": recipe.data}
        if not path.is_file():
            rows.append({**row, "missing": True})
            continue
        ckpt = load_checkpoint(path)
        model = model_from_checkpoint(ckpt, map_location="cpu").float().eval()
        tc = ckpt.get("train_cfg") or {}
        default = TrainConfig()
        cfg = TrainConfig(test_min_size=tc.get("test_min_size", default.test_min_size),
                          test_max_size=tc.get("test_max_size", default.test_max_size))
        dataset = dataset_for_config(recipe.data, "val", cfg, train=False, model=recipe.model)
        opts = options or FastInference()
        for variant, setting in (("plain", False), ("fast", opts)):
            model.fast_inference = setting
            t0 = time.perf_counter()
            row[variant] = evaluate(model, dataset, batch_size=batch_size, max_images=max_images, progress=progress)
            row[f"{variant}_eval_s"] = round(time.perf_counter() - t0, 2)
        row["fast_path"] = opts.applied(torch.device("cpu"))
        row["delta_AP"] = {kind: round(row["fast"][kind]["AP"] - row["plain"][kind]["AP"], 3) for kind in row["plain"]}
        row["images"] = min(len(dataset), max_images) if max_images else len(dataset)
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def format_fast_path_ap(rows: list) -> str:
    lines = ["COCO AP of the shipped checkpoints, inference fast path off → on (val split)",
             f"  {'checkpoint':<44}{'box AP':>16}{'mask AP':>16}{'Δ box':>8}{'Δ mask':>8}{'eval s':>14}"]
    for r in rows:
        if r.get("missing"):
            lines.append(f"  {r['checkpoint']:<44}  (missing)")
            continue

        def pair(kind):
            return f"{r['plain'][kind]['AP']:.2f} → {r['fast'][kind]['AP']:.2f}" if kind in r["plain"] else "-"

        d = r["delta_AP"]
        lines.append(f"  {r['checkpoint']:<44}{pair('bbox'):>16}{pair('segm'):>16}{d.get('bbox', 0):>+8.2f}"
                     + (f"{d['segm']:>+8.2f}" if "segm" in d else f"{'-':>8}")
                     + f"{r['plain_eval_s']:>7.0f} → {r['fast_eval_s']:.0f}")
    return "\n".join(lines)
