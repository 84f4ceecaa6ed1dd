"""CondInst's dynamic mask head: per-instance 1×1 conv stacks applied to a shared mask feature map.

Every instance ``n`` owns a flat parameter vector ``params[n]`` produced by the controller. It is read as
``num_layers`` 1×1 conv layers of ``channels`` channels, ending in one output channel (CondInst §3.2, Fig. 3; the
layout is AdelaiDet's ``parse_dynamic_params``: **all weights first, then all biases** —
``[W0, W1, …, W_{L-1}, b0, b1, …, b_{L-1}]``, each ``W_l`` row-major ``(C_out, C_in)``).

The input of instance ``n`` is its image's mask features (``Cmask`` channels at stride ``mask_feat_stride``) with two
coordinate channels in front (x then y). With ``coords="rel"`` (the paper's default) they are
``(instance location − pixel location) / size_of_interest`` of the instance's FPN level, pixel locations at the
``k·s + s//2`` convention. FLOPs per instance and pixel: ``2·Σ_l C_in,l·C_out,l`` (≈ 300 at the defaults).

Cost of the reference: it runs every layer for every instance at once as one grouped convolution (no Python loop over
instances) and writes each layer's ``N×channels×H×W`` activation to memory; a fused GPU kernel avoids that.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

COORD_MODES = ("rel", "abs", "none", "coords_only")


def mask_head_input_channels(mask_channels: int, coords: str = "rel") -> int:
    """Input channels of the first dynamic layer for CondInst Table 3's four settings."""
    if coords not in COORD_MODES:
        raise ValueError(f"coords must be one of {COORD_MODES}, got {coords!r}")
    if coords == "none":
        return mask_channels
    if coords == "coords_only":
        return 2
    return mask_channels + 2


def _layer_shapes(in_channels: int, channels: int, num_layers: int) -> List[Tuple[int, int]]:
    if num_layers < 1:
        raise ValueError("the dynamic mask head needs at least one layer")
    dims = [in_channels] + [channels] * (num_layers - 1) + [1]
    return list(zip(dims[1:], dims[:-1]))  # (C_out, C_in) per layer


def num_dynamic_params(mask_channels: int = 8, channels: int = 8, num_layers: int = 3, coords: str = "rel") -> int:
    """Length of the controller's output: Σ_l C_out·C_in + C_out. 169 at the defaults (8, 8, 3, rel), 153 without
    coordinates (CondInst §3.2)."""
    shapes = _layer_shapes(mask_head_input_channels(mask_channels, coords), channels, num_layers)
    return sum(o * i + o for o, i in shapes)


def parse_dynamic_params(params: Tensor, in_channels: int, channels: int, num_layers: int):
    """Split ``N×P`` parameters into per-layer weights ``N×C_out×C_in`` and biases ``N×C_out`` (weights first)."""
    shapes = _layer_shapes(in_channels, channels, num_layers)
    n = params.shape[0]
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]
    if params.shape[1] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} dynamic parameters per instance, got {params.shape[1]}")
    chunks = torch.split(params, sizes, dim=1)
    weights = [w.reshape(n, o, i) for w, (o, i) in zip(chunks[:num_layers], shapes)]
    biases = list(chunks[num_layers:])
    return weights, biases


def coordinate_maps(locations: Tensor, sizes_of_interest: Tensor, height: int, width: int, stride: int,
                    coords: str = "rel") -> Tensor:
    """``N×2×H×W`` coordinate channels (x, y) for each instance; see the module docstring."""
    device, dtype = locations.device, locations.dtype
    ys = torch.arange(height, device=device, dtype=dtype) * stride + stride // 2
    xs = torch.arange(width, device=device, dtype=dtype) * stride + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    pixels = torch.stack([grid_x, grid_y])  # 2×H×W
    if coords == "abs":
        # Absolute position of the pixel in the (padded) image, in [0, 1]: the same for every instance (Table 3).
        scale = torch.tensor([width * stride, height * stride], device=device, dtype=dtype).view(2, 1, 1)
        return (pixels / scale).expand(locations.shape[0], 2, height, width)
    rel = locations[:, :, None, None] - pixels[None]
    return rel / sizes_of_interest.to(dtype)[:, None, None, None]


def dynamic_mask_head_reference(mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor,
                                sizes_of_interest: Tensor, mask_feat_stride: int = 8, channels: int = 8,
                                num_layers: int = 3, coords: str = "rel") -> Tensor:
    """Mask logits ``N×H×W`` at the mask-feature resolution.

    ``mask_feats`` ``B×Cmask×H×W``; ``params`` ``N×P``; ``im_inds`` ``N`` (image of each instance); ``locations``
    ``N×2`` (x, y) in input pixels; ``sizes_of_interest`` ``N`` (of each instance's FPN level).
    """
    _, cmask, height, width = mask_feats.shape
    n = params.shape[0]
    in_channels = mask_head_input_channels(cmask, coords)
    weights, biases = parse_dynamic_params(params, in_channels, channels, num_layers)
    if n == 0:
        return mask_feats.new_zeros(0, height, width) + params.sum() * 0
    parts = []
    if coords != "none":
        parts.append(coordinate_maps(locations, sizes_of_interest, height, width, mask_feat_stride, coords)
                     .to(mask_feats.dtype))
    if coords != "coords_only":
        parts.append(mask_feats[im_inds])
    x = torch.cat(parts, dim=1).reshape(1, n * in_channels, height, width)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        out_c, in_c = w.shape[1:]
        x = F.conv2d(x, w.reshape(n * out_c, in_c, 1, 1), b.reshape(-1), groups=n)
        if layer < num_layers - 1:
            x = F.relu(x)
    return x.reshape(n, height, width)


def dynamic_mask_head(mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor,
                      sizes_of_interest: Tensor, mask_feat_stride: int = 8, channels: int = 8, num_layers: int = 3,
                      coords: str = "rel") -> Tensor:
    """The dynamic mask head, dispatching to the fastest implementation for the tensors' device."""
    return dynamic_mask_head_reference(mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride,
                                       channels, num_layers, coords)
