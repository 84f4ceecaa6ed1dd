"""ONNX export: the whole model in one graph, from a 0..1 image to boxes, scores, labels (and masks).

``python -m onestage export CHECKPOINT --format onnx --out FILE [--size H W]`` → :func:`export_onnx`. The graph takes
``image`` (``1×3×H×W`` float RGB in 0..1, the size given at export: one graph per input size) and returns

* ``boxes`` ``N×4`` (xyxy, input pixels), ``scores`` ``N``, ``labels`` ``N`` (int64) — ``N`` varies per image, at most
  the model's ``detections_per_img``;
* ``masks`` ``N×H×W`` (bool) for the instance models.

What is in the graph: normalisation and the zero padding to the model's ``size_divisibility``, backbone + FPN, the
heads, the FCOS family's thresholding, per-level top-k, box decoding and class-aware NMS (ONNX
``NonMaxSuppression`` through torchvision's ``nms``), CondInst's per-instance dynamic heads on F_mask with their
relative coordinates and ``aligned_bilinear`` upsampling, BlendMask's RoIAlign of the bases, attention
interpolation, softmax blend and the paste into the image. For the SOLO family (SOLO, Decoupled SOLO, SOLOv2): the
category and mask branches, point NMS and the score threshold, each candidate cell's mask at stride 4 (vanilla SOLO
its channel, decoupled SOLO σ(y_i)·σ(x_j), SOLOv2 its dynamic kernel on F), the area filter and maskness, the
pre-NMS top-k, Matrix NMS, the final top-k, the bilinear upsampling to the image and the masks' tight boxes
(greedy mask NMS, ``nms="mask"``, is refused).

How: the model is traced (``torch.onnx.export(dynamo=False)``, opset 17) through :class:`OnnxDetector`, which calls the
model's own modules and functions (``backbone``, ``head``, ``compute_locations``, ``controller_params``,
``parse_dynamic_params`` / ``coordinate_maps``, ``pool_bases``, ``blend``, ``aligned_bilinear``, ``level_features``,
``cate_scores``, ``dynamic_masks``, ``matrix_nms``) and re-expresses
only what tracing cannot record as written in the PyTorch path — data-dependent branches and Python loops over
detections — as fixed-shape tensor code: masked top-k instead of "threshold, then top-k if more", the grouped
convolution of the dynamic heads as a batched matrix product, and the paste of BlendMask's masks as one
``grid_sample`` per detection over the whole image, cut to the box's integer rectangle as detectron2's paste does;
the SOLO family's masks as one boolean selection of the candidates per level (no "skip an empty level", no scatter
back), Matrix NMS's input with two blank rows appended so that ``matrix_nms`` stays on its general path whatever the
trace image detects (``onestage.structures.masks_to_boxes`` is written traceable itself).
``tests/test_export.py`` (FCOS family) and ``tests/test_export_solo.py`` (SOLO family) check every model's graph
against ``model(images)`` with onnxruntime.

Optional: needs the ``onnx`` package to check the graph and ``onnxruntime`` to run it (``pip install -e '.[onnx]'``).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.modeling.fast_inference import plain_inference
from onestage.structures import masks_to_boxes

__all__ = ["OnnxDetector", "export_onnx", "onnx_session", "run_onnx", "EXPORT_OPSET", "fcos_detections",
           "solo_detections", "compare_detections", "verify_onnx"]

#: ONNX opset of the exported graphs: 16 is the first with ``GridSample`` and ``RoiAlign``'s half-pixel mode.
EXPORT_OPSET = 17


# ----------------------------------------------------------------------------------------------------------------
# the FCOS family

def fcos_detections(model, head, locations: Sequence[Tensor], image_hw: Tuple[int, int],
                    score_thresh: Optional[float] = None, nms_thresh: Optional[float] = None,
                    max_dets: Optional[int] = None):
    """:func:`onestage.modeling.fcos.postprocess` for one image, in fixed-shape operations.

    Per level the (location, class) pairs are ranked by cls·ctr with every pair at or below ``score_thresh`` set to
    −1, and the best ``min(pre_nms_topk, L·C)`` kept — the same set as "threshold, then the ``pre_nms_topk`` best"
    whenever scores are not tied at the cut. Then class-aware NMS (boxes offset per class, one ``nms``), the pairs
    that were below the threshold dropped, at most ``max_dets`` kept, boxes clipped to the image, empty ones dropped.
    Returns ``boxes``, ``scores``, ``labels`` and ``location_inds`` (flattened over levels, ``flatten_levels`` order).
    """
    from torchvision.ops import nms

    from onestage.modeling.fcos import centerness_target

    c = model.cfg
    score_thresh = c.score_thresh if score_thresh is None else score_thresh
    nms_thresh = c.nms_thresh if nms_thresh is None else nms_thresh
    max_dets = c.detections_per_img if max_dets is None else max_dets
    ctr_from_reg = getattr(c, "centerness_on", None) == "computed"
    all_boxes, all_scores, all_labels, all_inds = [], [], [], []
    offset = 0
    for lvl, (locs, stride) in enumerate(zip(locations, model.strides)):
        logit = head.logits[lvl][0]
        num_classes = logit.shape[0]
        cls = logit.permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        reg = head.bbox_reg[lvl][0].permute(1, 2, 0).reshape(-1, 4)
        if head.ctrness is not None:
            ctr = head.ctrness[lvl][0].permute(1, 2, 0).reshape(-1).sigmoid()
        elif ctr_from_reg:
            ctr = centerness_target(reg.float())
        else:
            ctr = None
        if ctr is not None and c.thresh_with_ctr:
            cls = cls * ctr[:, None]
        candidate = cls > score_thresh
        rank = cls * ctr[:, None] if (ctr is not None and not c.thresh_with_ctr) else cls
        rank = torch.where(candidate, rank, torch.full_like(rank, -1.0)).reshape(-1)
        values, top = rank.topk(min(c.pre_nms_topk, rank.shape[0]))
        loc_idx = torch.div(top, num_classes, rounding_mode="floor")
        labels = top - loc_idx * num_classes
        d = reg[loc_idx] * stride
        p = locs[loc_idx]
        all_boxes.append(torch.stack([p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]], 1))
        valid = values > 0
        score = values.clamp(min=0).sqrt() if ctr is not None else values.clamp(min=0)
        all_scores.append(torch.where(valid, score, torch.full_like(score, -1.0)))
        all_labels.append(labels)
        all_inds.append(loc_idx + offset)
        offset += locs.shape[0]
    boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
    labels, inds = torch.cat(all_labels), torch.cat(all_inds)
    # class-aware NMS as torchvision's batched_nms does it: separate the classes by a coordinate offset. Pairs
    # below the threshold (score −1) rank last, so they never suppress a real one; they are dropped afterwards.
    shift = labels.to(boxes.dtype)[:, None] * (boxes.abs().max() * 2 + 1)
    keep = nms(boxes + shift, scores, nms_thresh)
    keep = keep[scores[keep] > 0][:max_dets]
    boxes, scores, labels, inds = boxes[keep], scores[keep], labels[keep], inds[keep]
    h, w = image_hw
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[nonempty], scores[nonempty], labels[nonempty], inds[nonempty]


def _condinst_masks(model, mask_feats: Tensor, params: Tensor, points: Tensor, levels: Tensor,
                    image_hw: Tuple[int, int]) -> Tensor:
    """CondInst's dynamic heads for one image's detections (``mask_logits`` + ``paste_masks``), with the grouped
    1×1 convolutions written as batched matrix products so that the number of detections stays a graph input."""
    from onestage.modeling.condinst import aligned_bilinear
    from onestage.ops.dynamic_mask_head import coordinate_maps, mask_head_input_channels, parse_dynamic_params

    c = model.cfg
    _, cmask, height, width = mask_feats.shape
    in_channels = mask_head_input_channels(cmask, c.rel_coords)
    weights, biases = parse_dynamic_params(params, in_channels, c.mask_head_width, c.mask_head_depth)
    inputs = []
    if c.rel_coords != "none":
        inputs.append(coordinate_maps(points, model.level_soi[levels], height, width, model.mask_branch.out_stride,
                                      c.rel_coords).to(mask_feats.dtype))
    if c.rel_coords != "coords_only":
        inputs.append(mask_feats.expand(points.shape[0], -1, -1, -1))
    x = torch.cat(inputs, dim=1)
    n = x.shape[0]  # traced as the graph's detection count; ONNX cannot infer a -1 next to a zero-size dimension
    x = x.reshape(n, in_channels, height * width)
    for layer, (wt, b) in enumerate(zip(weights, biases)):
        x = torch.bmm(wt, x) + b[:, :, None]
        if layer < c.mask_head_depth - 1:
            x = F.relu(x)
    logits = aligned_bilinear(x.reshape(n, 1, height, width), c.mask_upsample_factor)
    probs = logits.sigmoid()
    full = aligned_bilinear(probs, model.mask_out_stride)[:, 0, : image_hw[0], : image_hw[1]]
    return full > c.mask_threshold


def _paste_in_boxes(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """:func:`onestage.modeling.blendmask.paste_masks` without the loop: each ``R×R`` mask resampled over the whole
    image by one ``grid_sample`` (pixel centre → the box's [−1, 1] grid), kept inside the box's integer rectangle."""
    n = probs.shape[0]
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    xs = torch.arange(width, dtype=torch.float32, device=probs.device)[None] + 0.5
    ys = torch.arange(height, dtype=torch.float32, device=probs.device)[None] + 0.5
    gx = (xs - x0) / (x1 - x0) * 2 - 1  # N×W
    gy = (ys - y0) / (y1 - y0) * 2 - 1  # N×H
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=-1)
    pasted = F.grid_sample(probs[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0]
    cols = torch.arange(width, device=probs.device)[None]
    rows = torch.arange(height, device=probs.device)[None]
    # detectron2's rectangle: int() of the (non-negative, clipped) box corners, one past the far edge
    inside_x = (cols >= x0.floor()) & (cols < x1.floor() + 1)
    inside_y = (rows >= y0.floor()) & (rows < y1.floor() + 1)
    return (pasted >= threshold) & inside_y[:, :, None] & inside_x[:, None, :]


def _blendmask_masks(model, bases: Tensor, attns: Optional[Tensor], boxes: Tensor, inds: Tensor,
                     image_hw: Tuple[int, int]) -> Tensor:
    from onestage.modeling.blendmask import pool_bases

    c = model.cfg
    rois = pool_bases(bases, [boxes], c.bottom_resolution, c.basis_stride, c.bottom_pooler)
    flat = attns[0][inds] if attns is not None else None
    if flat is None:
        from onestage.ops.blender import fcis_attention

        attn_maps = fcis_attention(c.attn_size, 1, rois.device, rois.dtype).expand(rois.shape[0], -1, -1, -1)
    else:
        m = c.effective_attn_size
        attn_maps = flat.reshape(-1, c.num_bases, m, m)
    probs = model.blend(rois, attn_maps).sigmoid()
    return _paste_in_boxes(probs, boxes, image_hw[0], image_hw[1], c.mask_thresh)


# ----------------------------------------------------------------------------------------------------------------
# the SOLO family

SOLO_FAMILY = ("SOLO", "DecoupledSOLO", "SOLOv2")


def _with_blank_rows(x: Tensor, value) -> Tensor:
    """``x`` with two more rows (first dimension) filled with ``value``, so that a function of the model sees at
    least two rows whatever the trace image detects: with none it would take its ``if n == 0: return`` branch (and
    the graph would keep that), with one the exporter records an ``out[order] = values`` of one element as a scalar
    broadcast; and onnxruntime cannot ``reshape(0, -1)``."""
    # torch.full + cast: the tracer has no new_full with a bool fill value
    blank = torch.full((2,) + tuple(x.shape[1:]), float(value), device=x.device)
    return torch.cat([x, blank.to(x.dtype)])


def _resize_rows(x: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """``onestage.modeling.solo._resize`` (bilinear, ``align_corners=False``; nothing when the size is already
    right) with the rows as the batch instead of as channels of one image: the same numbers (every plane is
    resampled alone), and PyTorch accepts zero rows in the batch but not zero channels."""
    if tuple(x.shape[-2:]) == tuple(out_hw):
        return x
    return F.interpolate(x[:, None], size=tuple(out_hw), mode="bilinear", align_corners=False)[:, 0]


def solo_head_outputs(model, pyramid: dict):
    """The head outputs of ``forward_parts`` from the FPN levels ``pyramid`` (``backbone(batch)``): SOLO's level
    features (P2 halved, P6 resized to P5: the authors' ``split_feats``) through
    :class:`~onestage.modeling.solo.SOLOHead` with ``dense_masks=False`` as ``model(images)`` runs it; SOLOv2's
    instance branch on the same levels and the unified mask feature F from P2..P5 (SOLOv2 §3.2.2)."""
    from onestage.modeling.solo import level_features

    levels = list(pyramid.values())
    if type(model).__name__ == "SOLOv2":
        from onestage.modeling.solov2 import SOLOv2HeadOutputs

        cate, kernels = model.head(level_features(levels))
        return SOLOv2HeadOutputs(cate, kernels, model.mask_branch(levels[:4]))
    return model.head(level_features(levels, model.cfg.multi_level), dense_masks=False)


def solo_candidates(cate: Tensor, score_thresh: float, max_candidates: int):
    """:func:`onestage.modeling.solo.cell_candidates` (the (cell, class) pairs with score > ``score_thresh``, at most
    ``max_candidates``, the best) without the ``if there are more`` branch: the pairs are ranked with every pair at
    or below the threshold set to −1, the best ``min(max_candidates, K·C)`` taken, and those above the threshold
    kept in cell-major order. That is the model's set and order whenever at most ``max_candidates`` pass; with more
    (the model then keeps top-k's best-first order) the set is the same up to ties at the cut and only the order
    differs, which matters only where two final scores tie (they are sorted again before and after Matrix NMS).
    Returns ``cells`` (index over all levels' cells), ``labels``, ``scores``."""
    num_classes = cate.shape[1]
    flat = cate.reshape(-1)
    candidate = flat > score_thresh
    ranked = torch.where(candidate, flat, torch.full_like(flat, -1.0))
    _, top = ranked.topk(min(max_candidates, flat.shape[0]))
    chosen = torch.zeros_like(candidate)
    chosen[top] = candidate[top]
    pairs = chosen.nonzero()[:, 0]  # ascending: cell-major, as nonzero() in the model
    cells = torch.div(pairs, num_classes, rounding_mode="floor")
    return cells, pairs - cells * num_classes, flat[pairs]


def solo_mask_probs(model, head_out, cells: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """Mask probabilities ``N×h×w`` at stride 4 of the canvas for ``cells`` given in ascending order, as the model's
    ``mask_probs_fn`` computes them: SOLOv2, σ of the cell's kernel on F (``dynamic_masks``, the 1×1 convolution
    G ∗ F of SOLOv2 §3.2 as a matrix product); vanilla SOLO, σ of channel k = i·S + j — the rows k of the level's
    last 1×1 weight on the upsampled tower output (``SOLOHead.cell_mask_logits``) — resized to stride 4;
    decoupled SOLO (SOLO §4), σ(y_i) and σ(x_j) each resized to stride 4, then multiplied. Level by level on the
    cells of that level (a boolean selection, so the count stays dynamic); the cells being ascending and each
    level's cells contiguous, the concatenation is in the input order."""
    from onestage.modeling.solo import cell_levels, dynamic_masks

    if type(model).__name__ == "SOLOv2":
        return dynamic_masks(model.flat_kernels(head_out, 0)[cells], head_out.mask_features[0]).sigmoid()
    levels, within, _ = cell_levels(model.grid_numbers, cells.device)
    out = []
    for lvl, s in enumerate(model.grid_numbers):
        k = within[cells[levels[cells] == lvl]]
        if model.cfg.head == "vanilla":
            feat = head_out.mask_feats[lvl][0]
            conv = model.head.mask_preds[lvl]
            weight, bias = conv.weight.flatten(1).to(feat.dtype), conv.bias.to(feat.dtype)
            logits = dynamic_masks(weight[k], feat) + bias[k, None, None]
            out.append(_resize_rows(logits.sigmoid(), out_hw))
        else:
            i, j = torch.div(k, s, rounding_mode="floor"), k % s
            out.append(_resize_rows(head_out.mask_logits_y[lvl][0, i].sigmoid(), out_hw)
                       * _resize_rows(head_out.mask_logits_x[lvl][0, j].sigmoid(), out_hw))
    return torch.cat(out)


def solo_detections(model, head_out, image_hw: Tuple[int, int], canvas_hw: Tuple[int, int]):
    """:func:`onestage.modeling.solo.solo_inference` for one image (the ``get_seg_single`` of the authors' code),
    with the model's own functions and no branch on the number of detections:

    1. point NMS on the category maps (``cate_scores``), the pairs above ``score_thresh`` (:func:`solo_candidates`);
    2. their masks at stride 4 (:func:`solo_mask_probs`), binarised at ``mask_thresh``; masks with no more pixels
       than their level's stride dropped;
    3. maskness, the mean probability inside the binary mask, multiplied into the score (the authors'
       ``get_seg_single``, SOLO and SOLOv2 alike);
    4. the ``nms_pre`` best → the model's ``matrix_nms`` (SOLOv2 §3.3: each score decayed by
       ``min_i f(IoU_ij) / f(comp_i)``; gaussian or linear f) → scores ≥ ``update_thresh`` → the
       ``detections_per_img`` best;
    5. the probabilities upsampled to the canvas (bilinear), cut to the image, binarised at ``mask_thresh``; boxes
       are the masks' tight boxes (:func:`onestage.structures.masks_to_boxes`), as ``detect`` returns them.

    ``matrix_nms`` gets two blank rows appended (:func:`_with_blank_rows`) — empty masks of a class no detection has
    (−1), score −1 — and dropped again: they overlap nothing (IoU 0, also with each other), so they change no decay
    (their entries in the decay matrix are exactly 1, and every column already holds a value ≤ 1), and they keep
    the function on its general path whatever the trace image detects. Ties: the sorts of
    onnxruntime (``TopK``) put equal scores in index order; PyTorch's ``argsort`` is not guaranteed to, so two
    detections with exactly the same score may come out swapped (no other difference). Returns ``boxes``,
    ``scores``, ``labels``, ``masks`` (``N×H×W`` bool at the image size)."""
    from onestage.modeling.solo import cate_scores, cell_levels, matrix_nms

    c = model.cfg
    h, w = image_hw
    cells, labels, scores = solo_candidates(cate_scores(head_out.cate_logits, 0), c.score_thresh, c.max_candidates)
    probs = solo_mask_probs(model, head_out, cells, (canvas_hw[0] // 4, canvas_hw[1] // 4))
    binary = probs > c.mask_thresh
    areas = binary.flatten(1).sum(1).float()
    levels, _, _ = cell_levels(model.grid_numbers, probs.device)
    cell_strides = torch.tensor(model.strides, device=probs.device)[levels]
    keep = areas > cell_strides[cells].float()
    probs, binary, areas, scores, labels = probs[keep], binary[keep], areas[keep], scores[keep], labels[keep]
    maskness = (probs * binary).flatten(1).sum(1) / areas
    scores = scores * maskness
    order = scores.argsort(descending=True)[: c.nms_pre]
    probs, binary, areas, scores, labels = probs[order], binary[order], areas[order], scores[order], labels[order]
    scores = matrix_nms(_with_blank_rows(binary, False), _with_blank_rows(labels, -1), _with_blank_rows(scores, -1.0),
                        c.matrix_nms_kernel, c.matrix_nms_sigma, _with_blank_rows(areas, 0.0))[:-2]
    keep = scores >= c.update_thresh
    probs, scores, labels = probs[keep], scores[keep], labels[keep]
    order = scores.argsort(descending=True)[: c.detections_per_img]
    probs, scores, labels = probs[order], scores[order], labels[order]
    full = _resize_rows(probs, canvas_hw)
    masks = full[:, :h, :w] > c.mask_thresh
    return masks_to_boxes(masks), scores, labels, masks


# ----------------------------------------------------------------------------------------------------------------
# the wrapper that is traced

class OnnxDetector(nn.Module):
    """``model`` as one traceable function of a ``1×3×H×W`` 0..1 image: ``(boxes, scores, labels[, masks])``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.kind = type(model).__name__
        if self.kind not in ("FCOS", "CondInst", "BlendMask") + SOLO_FAMILY:
            raise NotImplementedError(f"ONNX export of {self.kind} is not written yet (FCOS, CondInst, BlendMask, "
                                      "SOLO, DecoupledSOLO, SOLOv2 are)")
        if self.kind == "CondInst" and model.cfg.mask_nms:
            raise NotImplementedError("ONNX export of CondInst with mask_nms=True (Table 5) is not written yet")
        if self.kind in SOLO_FAMILY and model.cfg.nms != "matrix":
            if model.cfg.nms != "mask":
                raise ValueError(f"nms must be 'matrix' or 'mask', got {model.cfg.nms!r}")
            raise NotImplementedError(
                f"ONNX export of {self.kind} with nms='mask' (greedy mask NMS, the baseline of SOLOv2's Matrix NMS "
                "ablation) is not written: its keep/drop sweep visits the masks one by one, a loop over detections "
                "whose result tracing cannot record; export with nms='matrix' (Matrix NMS, SOLOv2 §3.3)")

    @property
    def output_names(self) -> List[str]:
        return ["boxes", "scores", "labels"] + ([] if self.kind == "FCOS" else ["masks"])

    def forward(self, image: Tensor):
        from onestage.modeling.fcos import compute_locations

        m = self.model
        h, w = int(image.shape[-2]), int(image.shape[-1])
        x = (image - m.pixel_mean) / m.pixel_std
        d = m.cfg.size_divisibility
        x = F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))
        named = dict(m.backbone(x))
        if self.kind in SOLO_FAMILY:
            canvas_hw = (int(x.shape[-2]), int(x.shape[-1]))
            return solo_detections(m, solo_head_outputs(m, named), (h, w), canvas_hw)
        feats = list(named.values())
        head = m.head(feats)
        locations = compute_locations(feats, m.strides)
        boxes, scores, labels, inds = fcos_detections(m, head, locations, (h, w))
        if self.kind == "FCOS":
            return boxes, scores, labels
        if self.kind == "CondInst":
            mask_feats = m.mask_branch([feats[i] for i in m.mask_in_indices])
            params = m.controller_params(head)[0][inds]
            level_of = torch.cat([torch.full((loc.shape[0],), i, dtype=torch.int64)
                                  for i, loc in enumerate(locations)])
            masks = _condinst_masks(m, mask_feats, params, torch.cat(locations)[inds], level_of[inds], (h, w))
            return boxes, scores, labels, masks
        bases, _ = m.basis_module(named)
        masks = _blendmask_masks(m, bases, m.top_attentions(head.bbox_towers), boxes, inds, (h, w))
        return boxes, scores, labels, masks


def export_onnx(model: nn.Module, out: Path, size: Tuple[int, int] = (320, 320), check: bool = True) -> Path:
    """Trace ``model`` for ``size`` = (H, W) inputs and write the ONNX graph to ``out`` (atomically); with ``check``
    the ``onnx`` checker validates it when the package is installed."""
    import warnings

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = OnnxDetector(model.float()).eval()
    image = torch.rand(1, 3, int(size[0]), int(size[1]), generator=torch.Generator().manual_seed(0))
    tmp = out.with_name(out.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's "converting a tensor to a Python int" on shape arithmetic
        torch.onnx.export(wrapper, (image,), str(tmp), input_names=["image"], output_names=wrapper.output_names,
                          opset_version=EXPORT_OPSET, dynamo=False, do_constant_folding=True)
    if check:
        try:
            import onnx
        except ImportError:
            pass
        else:
            onnx.checker.check_model(str(tmp))
    tmp.replace(out)
    return out


def onnx_session(path: Path, threads: int = 1):
    """An onnxruntime CPU session for an exported graph (ImportError with the install hint without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running an exported graph needs onnxruntime: pip install -e '.[onnx]'") from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_onnx(session, image: Tensor) -> dict:
    """One ``3×H×W`` (or ``1×3×H×W``) 0..1 image through a session → the detections as ``model(images)[0]`` gives
    them (torch tensors)."""
    x = image[None] if image.dim() == 3 else image
    names = [o.name for o in session.get_outputs()]
    outs = session.run(None, {"image": x.float().numpy()})
    return {k: torch.from_numpy(v) for k, v in zip(names, outs)}


# ----------------------------------------------------------------------------------------------------------------
# parity with the PyTorch model

def compare_detections(ours: dict, reference: dict) -> dict:
    """How far one image's exported-graph detections are from ``model([image])[0]``: the detection counts, and for
    detections matched in order (both are sorted by score) the largest box corner difference (px), score
    difference, label mismatches and the smallest mask IoU. A mismatch in count leaves the rest ``None``."""
    n_ours, n_ref = int(ours["boxes"].shape[0]), int(reference["boxes"].shape[0])
    out = {"detections": n_ref, "detections_onnx": n_ours, "max_box_diff": None, "max_score_diff": None,
           "label_mismatches": None, "min_mask_iou": None}
    if n_ours != n_ref:
        return out
    if n_ref == 0:
        out.update(max_box_diff=0.0, max_score_diff=0.0, label_mismatches=0, min_mask_iou=1.0 if "masks" in ours
                   else None)
        return out
    out["max_box_diff"] = float((ours["boxes"].float() - reference["boxes"].float()).abs().max())
    out["max_score_diff"] = float((ours["scores"].float() - reference["scores"].float()).abs().max())
    out["label_mismatches"] = int((ours["labels"].long() != reference["labels"].long()).sum())
    if "masks" in ours and "masks" in reference:
        a, b = ours["masks"].bool().flatten(1), reference["masks"].bool().flatten(1)
        inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        out["min_mask_iou"] = float(iou.min())
    return out


def verify_onnx(model: nn.Module, path: Path, size: Tuple[int, int], images: Optional[Sequence[Tensor]] = None) -> str:
    """Run the graph at ``path`` and the model on ``images`` (default: one synthetic validation image resized to
    ``size`` when the set exists, else a seeded random image) and say how far apart they are."""
    session = onnx_session(path)
    if images is None:
        images = [_probe_image(size)]
    lines = []
    for k, image in enumerate(images):
        with torch.no_grad(), plain_inference(model):  # the graph holds the fp32 model, unfolded
            ref = model.eval()([image])[0]
        cmp = compare_detections(run_onnx(session, image), ref)
        if cmp["max_box_diff"] is None:
            lines.append(f"image {k}: {cmp['detections_onnx']} detections from the graph, {cmp['detections']} from "
                         "PyTorch — they differ")
        else:
            mask = f", min mask IoU {cmp['min_mask_iou']:.4f}" if cmp["min_mask_iou"] is not None else ""
            lines.append(f"image {k}: {cmp['detections']} detections in both; max box difference "
                         f"{cmp['max_box_diff']:.2g} px, max score difference {cmp['max_score_diff']:.2g}, "
                         f"{cmp['label_mismatches']} label mismatches{mask}")
    return "onnxruntime vs PyTorch: " + "; ".join(lines)


def _probe_image(size: Tuple[int, int]) -> Tensor:
    from onestage.data import get_dataset
    from onestage.data.synthetic import default_data_root

    if not (default_data_root() / "synthetic" / "manifest.json").is_file():  # not generated here: don't make it now
        return torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    try:
        image = get_dataset("synthetic", split="val", min_size=(min(size),), max_size=max(size),
                            with_masks=False)[0][0]
        return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    except (FileNotFoundError, ImportError, OSError):
        return torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
