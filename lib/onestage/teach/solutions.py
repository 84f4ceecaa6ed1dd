"""Reference solutions of the notebook exercises, written as a student would: plain torch, one small function each.

The exercise cells of notebooks 01–05 fall back to these until the student writes their own body; each is checked
against the library's implementation by the matching ``onestage.teach.check_<name>``. Read them after trying.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# --- notebook 01: FCOS (arXiv 1904.01355) -----------------------------------------------------------------------

def locations(height, width, stride):
    """§3.1: the image point ``(⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s)`` of every cell, row-major, x first."""
    xs = torch.arange(width, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(height, dtype=torch.float32) * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1)


def ltrb_targets(locations, boxes):
    """§3.1 eq. 1: ``l, t, r, b = x − x0, y − y0, x1 − x, y1 − y`` for every (location, box) pair."""
    x = locations[:, 0, None]
    y = locations[:, 1, None]
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)


def fpn_levels(max_reg, sizes_of_interest=(64, 128, 256, 512)):
    """§3.2: level i accepts ``m_{i−1} ≤ max_reg ≤ m_i``, ``m = (0, *sizes_of_interest, ∞)``."""
    bounds = [0.0, *[float(s) for s in sizes_of_interest], math.inf]
    lo = torch.tensor(bounds[:-1])
    hi = torch.tensor(bounds[1:])
    return (max_reg[:, None] >= lo) & (max_reg[:, None] <= hi)


def center_sampling(locations, boxes, strides, radius=1.5):
    """Centre square ``c ± radius·stride`` clipped to the box; the location must be strictly inside it."""
    x = locations[:, 0, None]
    y = locations[:, 1, None]
    r = (strides * radius)[:, None]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    left = torch.maximum(cx - r, boxes[:, 0])
    top = torch.maximum(cy - r, boxes[:, 1])
    right = torch.minimum(cx + r, boxes[:, 2])
    bottom = torch.minimum(cy + r, boxes[:, 3])
    return (x > left) & (x < right) & (y > top) & (y < bottom)


# --- notebook 02: center-ness ----------------------------------------------------------------------------------

def centerness_target(ltrb):
    """§3.3 eq. 3."""
    l, t, r, b = ltrb.unbind(-1)
    return torch.sqrt((torch.minimum(l, r) / torch.maximum(l, r)) * (torch.minimum(t, b) / torch.maximum(t, b)))


def spearman(a, b):
    """Pearson correlation of the ranks; tied values get the average of their ranks."""
    def ranks(x):
        x = x.double()
        smaller = (x[None, :] < x[:, None]).sum(1)
        equal = (x[None, :] == x[:, None]).sum(1)
        return smaller + (equal + 1) / 2
    ra = ranks(a) - ranks(a).mean()
    rb = ranks(b) - ranks(b).mean()
    return float((ra * rb).sum() / torch.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def final_score(cls, ctr):
    """The detection score: the geometric mean of class score and center-ness."""
    return torch.sqrt(cls * ctr)


# --- notebook 03: BlendMask (arXiv 2001.00309) -----------------------------------------------------------------

def blend(bases_rois, attns):
    """§3.2 eqs. 2–4: interpolate the attention to R×R, softmax over the bases, weighted sum."""
    size = bases_rois.shape[-2:]
    a = F.interpolate(attns, size=size, mode="bilinear", align_corners=False)
    return (a.softmax(dim=1) * bases_rois).sum(dim=1)


def yolact_blend(bases_rois, coeffs):
    """§4.1: a 1×1 attention — one softmax weight per basis for the whole RoI."""
    w = coeffs.softmax(dim=1)
    return (w[:, :, None, None] * bases_rois).sum(dim=1)


def fcis_attention(grid):
    """§4.1: basis ``k = i·g + j`` owns tile (i, j)."""
    att = torch.zeros(grid * grid, grid, grid)
    for i in range(grid):
        for j in range(grid):
            att[i * grid + j, i, j] = 1.0
    return att


# --- notebook 04: CondInst (arXiv 2003.05664) ------------------------------------------------------------------

def num_dynamic_params(mask_channels=8, channels=8, num_layers=3, rel_coords=True):
    """Σ over layers of ``C_out·C_in + C_out``."""
    dims = [mask_channels + (2 if rel_coords else 0)] + [channels] * (num_layers - 1) + [1]
    return sum(c_out * c_in + c_out for c_in, c_out in zip(dims[:-1], dims[1:]))


def parse_dynamic_params(params, in_channels, channels, num_layers):
    """All weights first (layer by layer, ``C_out×C_in``), then all biases."""
    dims = [in_channels] + [channels] * (num_layers - 1) + [1]
    shapes = list(zip(dims[1:], dims[:-1]))
    n = params.shape[0]
    weights, biases, start = [], [], 0
    for c_out, c_in in shapes:
        weights.append(params[:, start:start + c_out * c_in].reshape(n, c_out, c_in))
        start += c_out * c_in
    for c_out, _ in shapes:
        biases.append(params[:, start:start + c_out])
        start += c_out
    return weights, biases


def relative_coordinates(location, size_of_interest, height, width, stride):
    """§2.2: ``(location − pixel) / size_of_interest`` at every mask-feature cell, x then y."""
    xs = torch.arange(width, dtype=torch.float32) * stride + stride // 2
    ys = torch.arange(height, dtype=torch.float32) * stride + stride // 2
    rel_x = (location[0] - xs)[None, :].expand(height, width)
    rel_y = (location[1] - ys)[:, None].expand(height, width)
    return torch.stack([rel_x, rel_y]) / size_of_interest


def dynamic_head(head_input, weights, biases):
    """1×1 convs as matrix products over the pixels, ReLU between the layers."""
    c, h, w = head_input.shape
    x = head_input.reshape(c, h * w)
    for layer, (wt, b) in enumerate(zip(weights, biases)):
        x = wt @ x + b[:, None]
        if layer < len(weights) - 1:
            x = torch.relu(x)
    return x.reshape(h, w)


# --- notebook 05: SOLO (arXiv 1912.04488) and SOLOv2 (arXiv 2003.10152) ----------------------------------------

def assign_levels(boxes, scale_ranges):
    """SOLO §3.2: level l takes the box when ``lo ≤ sqrt(w·h) ≤ hi``."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    lo = torch.tensor([float(r[0]) for r in scale_ranges])
    hi = torch.tensor([float(r[1]) for r in scale_ranges])
    return (scale[:, None] >= lo) & (scale[:, None] <= hi)


def center_region(mask, box, canvas_hw, num_grid, sigma=0.2):
    """SOLO §3.2: the cells touched by ``(c_x, c_y, σw, σh)``, clamped to the centre cell ± 1."""
    h, w = canvas_hw
    ys, xs = mask.nonzero(as_tuple=True)
    cy, cx = float(ys.double().mean()), float(xs.double().mean())
    half_w = 0.5 * (box[2] - box[0]) * sigma
    half_h = 0.5 * (box[3] - box[1]) * sigma
    cell = 1.0 / num_grid

    def row(y):
        return int((y / h) // cell)

    def col(x):
        return int((x / w) // cell)

    ci, cj = row(cy), col(cx)
    top = max(0, row(cy - half_h), ci - 1)
    bottom = min(num_grid - 1, row(cy + half_h), ci + 1)
    left = max(0, col(cx - half_w), cj - 1)
    right = min(num_grid - 1, col(cx + half_w), cj + 1)
    return top, bottom, left, right


def matrix_nms_decay(masks, labels, sigma=2.0):
    """SOLOv2 §3.3: ``decay_j = min_{i<j} f(IoU_ij) / f(comp_i)``, ``f(x) = exp(−σx²)``, same class only."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    upper = torch.ones(n, n).triu(diagonal=1).bool() & (labels[:, None] == labels[None, :])
    iou = torch.where(upper, iou, torch.zeros_like(iou))
    comp = iou.max(dim=0).values                 # comp_i: the largest IoU of mask i with a higher-scored mask
    decay = torch.exp(-sigma * iou ** 2) / torch.exp(-sigma * comp[:, None] ** 2)
    return decay.min(dim=0).values
