"""CondInst's dynamic mask head: per-instance 1×1 conv stacks applied to a shared mask feature map.

Every instance ``n`` owns a flat parameter vector ``params[n]`` produced by the controller. It is read as
``num_layers`` 1×1 conv layers of ``channels`` channels, ending in one output channel (CondInst §3.2, Fig. 3; the
layout is ``parse_dynamic_params`` of AdelaiDet ``adet/modeling/condinst/dynamic_mask_head.py``: **all weights
first, then all biases** — ``[W0, W1, …, W_{L-1}, b0, b1, …, b_{L-1}]``, each ``W_l`` row-major ``(C_out, C_in)``).

The input of instance ``n`` is its image's mask features (``Cmask`` channels at stride ``mask_feat_stride``) with two
coordinate channels in front (x then y). With ``coords="rel"`` (the paper's default) they are
``(instance location − pixel location) / size_of_interest`` of the instance's FPN level, pixel locations at the
``k·s + s//2`` convention. FLOPs per instance and pixel: ``2·Σ_l C_in,l·C_out,l`` (≈ 300 at the defaults).

Two implementations with the same semantics:

* :func:`dynamic_mask_head_reference` (plain PyTorch; the CPU path and the test oracle) runs every layer for every
  instance at once as one grouped convolution (no Python loop over instances), but materialises the ``N×(Cmask+2)×H×W``
  input (coordinate maps + gathered features) and each layer's ``N×channels×H×W`` activation (conv output and ReLU
  output): at the defaults and COCO scale (100 instances, 100×167 mask map at stride 8 of an 800×1333 image, fp32)
  that is ≈ 67 MB for the input and ≈ 53 MB per intermediate tensor, each written once and read once (~0.45 GB of
  traffic in the forward), plus as much again for autograd's saved activations.
* Triton kernels (GPU; CPU through ``TRITON_INTERPRET=1`` in the tests). Forward: one program per (block of
  ``BLOCK`` pixels, instance) loads that instance's parameters, computes the relative coordinates in registers,
  gathers its image's feature vectors and runs **all** layers in registers; only the ``N×H×W`` logits are written.
  Bytes: ``N·H·W·e`` written + ``B·Cmask·H·W·e`` features (read from DRAM once, then L2 hits for the other
  instances of the image) + ``N·P·e`` parameters ≈ 7.3 MB at the COCO-scale example above. FLOPs are those of the
  math (``2·Σ C_in·C_out`` per instance-pixel, ≈ 0.5 GFLOP there) with channels padded to powers of two.
  Backward: one program per (pixel block, image) walks the instances of that image (sorted by image on the host),
  recomputes their activations in registers, accumulates the feature gradient of its pixels in registers (written
  once: deterministic, no atomics) and writes the parameter gradient of each instance as one fp32 partial per pixel
  block, reduced by ``torch.sum``. Bytes: features + gradient in, ``B·Cmask·H·W`` feature gradient out,
  ``⌈HW/BLOCK⌉·N·P·4`` partials (≈ 8.9 MB at the example; 3× the forward FLOPs).

Dispatch: :func:`dynamic_mask_head` (the entry point models call, whatever the device) uses the custom op
``torch.ops.onestage.dynamic_mask_head`` (autograd via ``torch.library.register_autograd``; opaque to
``torch.compile``) for CUDA tensors when the shape is supported — 1 to 4 layers, ``channels`` ≤ 16, ``Cmask`` ≤ 16,
every ``coords`` mode — and the reference otherwise, or always with ``force_reference=True`` or the environment
variable ``ONESTAGE_FORCE_REFERENCE=1``. The kernel computes in fp32 whatever the input dtypes, returns the promoted
dtype of ``mask_feats`` and ``params``, and gives gradients to ``mask_feats`` and ``params`` only (``locations`` and
``sizes_of_interest`` are constants of the FCOS assignment). ``im_inds`` must lie in ``0..B-1`` (not checked on the
device, which would cost a host sync; the reference raises an ``IndexError``).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.ops._triton import (HAS_TRITON, TRITON_INTERPRET, force_reference_from_env, tl, triton,
                                   triton_supported)

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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

MAX_KERNEL_LAYERS = 4
MAX_KERNEL_CHANNELS = 16
MAX_KERNEL_MASK_CHANNELS = 16
FWD_BLOCK = 128
BWD_BLOCK = 128
# ptxas (sm_90, compiled offline with Triton 3.8): forward 32 registers at 4 warps; backward at the defaults 255 at
# 4 warps but 128 at 8 warps (width 16 × 4 layers: 255 and an 8-byte stack at 8 warps, 1.3 kB of spills at 4).
FWD_NUM_WARPS = 4
BWD_NUM_WARPS = 8
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (instances in the forward)


def kernel_supports(mask_channels: int, channels: int, num_layers: int, coords: str) -> bool:
    """Whether the fused kernel handles this head shape (otherwise the reference runs)."""
    return (coords in COORD_MODES and 1 <= num_layers <= MAX_KERNEL_LAYERS and 1 <= channels <= MAX_KERNEL_CHANNELS
            and 1 <= mask_channels <= MAX_KERNEL_MASK_CHANNELS)


if HAS_TRITON:
    @triton.jit
    def _coordinates(loc_ptr, soi_ptr, n, hh, ww, H, W, stride, ABS_COORDS: tl.constexpr):
        # pixel centres at k·s + s//2, as coordinate_maps
        px = (ww * stride + stride // 2).to(tl.float32)
        py = (hh * stride + stride // 2).to(tl.float32)
        if ABS_COORDS:
            cx = px / (W * stride + 0.0)  # "+ 0.0": W, stride may be specialised to Python ints
            cy = py / (H * stride + 0.0)
        else:
            lx = tl.load(loc_ptr + 2 * n).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * n + 1).to(tl.float32)
            soi = tl.load(soi_ptr + n).to(tl.float32)
            cx = (lx - px) / soi
            cy = (ly - py) / soi
        return cx, cy

    @triton.jit
    def _first_layer(feat, cx, cy, prow, W_OFF: tl.constexpr, B_OFF: tl.constexpr, CO: tl.constexpr,
                     CO_P: tl.constexpr, NC: tl.constexpr, CM: tl.constexpr, CM_P: tl.constexpr,
                     HAS_FEATS: tl.constexpr):
        # z[o, p] = b[o] + Σ_i W0[o, i]·input[i, p], input = [x, y (NC = 2 coordinate rows), features (CM rows)]
        CIN: tl.constexpr = NC + CM
        o = tl.arange(0, CO_P)
        o_ok = o < CO
        bias = tl.load(prow + B_OFF + o, mask=o_ok, other=0.0).to(tl.float32)
        z = bias[:, None] + 0.0 * cx[None, :]
        if NC > 0:
            wx = tl.load(prow + W_OFF + o * CIN, mask=o_ok, other=0.0).to(tl.float32)
            wy = tl.load(prow + W_OFF + o * CIN + 1, mask=o_ok, other=0.0).to(tl.float32)
            z += wx[:, None] * cx[None, :] + wy[:, None] * cy[None, :]
        if HAS_FEATS:
            c = tl.arange(0, CM_P)
            wf = tl.load(prow + W_OFF + o[:, None] * CIN + NC + c[None, :], mask=o_ok[:, None] & (c < CM)[None, :],
                         other=0.0).to(tl.float32)
            z += tl.sum(wf[:, :, None] * feat[None, :, :], axis=1)
        return z

    @triton.jit
    def _dense(a, prow, W_OFF: tl.constexpr, B_OFF: tl.constexpr, CO: tl.constexpr, CO_P: tl.constexpr,
               CI: tl.constexpr, CI_P: tl.constexpr):
        # z[o, p] = b[o] + Σ_i W[o, i]·a[i, p]; padded rows/columns of W are zero
        o = tl.arange(0, CO_P)
        i = tl.arange(0, CI_P)
        w = tl.load(prow + W_OFF + o[:, None] * CI + i[None, :], mask=(o < CO)[:, None] & (i < CI)[None, :],
                    other=0.0).to(tl.float32)
        bias = tl.load(prow + B_OFF + o, mask=o < CO, other=0.0).to(tl.float32)
        return tl.sum(w[:, :, None] * a[None, :, :], axis=1) + bias[:, None]

    @triton.jit
    def _dense_backward(gz, a, prow, part, W_OFF: tl.constexpr, B_OFF: tl.constexpr, CO: tl.constexpr,
                        CO_P: tl.constexpr, CI: tl.constexpr, CI_P: tl.constexpr):
        # parameter gradients of this pixel block into `part`; returns dL/dz of the layer below (through its ReLU)
        o = tl.arange(0, CO_P)
        i = tl.arange(0, CI_P)
        w_mask = (o < CO)[:, None] & (i < CI)[None, :]
        w = tl.load(prow + W_OFF + o[:, None] * CI + i[None, :], mask=w_mask, other=0.0).to(tl.float32)
        grad_w = tl.sum(gz[:, None, :] * a[None, :, :], axis=2)
        tl.store(part + W_OFF + o[:, None] * CI + i[None, :], grad_w, mask=w_mask)
        tl.store(part + B_OFF + o, tl.sum(gz, axis=1), mask=o < CO)
        grad_a = tl.sum(w[:, :, None] * gz[:, None, :], axis=0)
        return tl.where(a > 0.0, grad_a, 0.0)

    @triton.jit
    def _first_layer_backward(gz, feat, cx, cy, prow, part, W_OFF: tl.constexpr, B_OFF: tl.constexpr,
                              CO: tl.constexpr, CO_P: tl.constexpr, NC: tl.constexpr, CM: tl.constexpr,
                              CM_P: tl.constexpr, HAS_FEATS: tl.constexpr):
        # parameter gradients of layer 0 into `part`; returns the gradient of the feature rows of its input
        CIN: tl.constexpr = NC + CM
        o = tl.arange(0, CO_P)
        o_ok = o < CO
        tl.store(part + B_OFF + o, tl.sum(gz, axis=1), mask=o_ok)
        if NC > 0:
            tl.store(part + W_OFF + o * CIN, tl.sum(gz * cx[None, :], axis=1), mask=o_ok)
            tl.store(part + W_OFF + o * CIN + 1, tl.sum(gz * cy[None, :], axis=1), mask=o_ok)
        c = tl.arange(0, CM_P)
        grad_feat = 0.0 * feat
        if HAS_FEATS:
            wf_ptrs = W_OFF + o[:, None] * CIN + NC + c[None, :]
            wf_mask = o_ok[:, None] & (c < CM)[None, :]
            wf = tl.load(prow + wf_ptrs, mask=wf_mask, other=0.0).to(tl.float32)
            tl.store(part + wf_ptrs, tl.sum(gz[:, None, :] * feat[None, :, :], axis=2), mask=wf_mask)
            grad_feat = tl.sum(wf[:, :, None] * gz[:, None, :], axis=0)
        return grad_feat

    @triton.jit
    def _load_features(feats_ptr, b, pix, pix_ok, HW, CM: tl.constexpr, CM_P: tl.constexpr):
        c = tl.arange(0, CM_P)
        offs = (b * CM + c[:, None]).to(tl.int64) * HW + pix[None, :]
        # CM = 0 without features (coords_only): everything masked
        return tl.load(feats_ptr + offs, mask=(c < CM)[:, None] & pix_ok[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _dmh_forward_kernel(feats_ptr, params_ptr, im_inds_ptr, loc_ptr, soi_ptr, out_ptr, first_instance,
                            H, W, stride, num_params,
                            NUM_LAYERS: tl.constexpr, NC: tl.constexpr, ABS_COORDS: tl.constexpr,
                            HAS_FEATS: tl.constexpr, CM: tl.constexpr, CM_P: tl.constexpr,
                            WIDTH: tl.constexpr, WIDTH_P: tl.constexpr,
                            W_OFF0: tl.constexpr, W_OFF1: tl.constexpr, W_OFF2: tl.constexpr, W_OFF3: tl.constexpr,
                            B_OFF0: tl.constexpr, B_OFF1: tl.constexpr, B_OFF2: tl.constexpr, B_OFF3: tl.constexpr,
                            CO0: tl.constexpr, CO0_P: tl.constexpr, CO1: tl.constexpr, CO1_P: tl.constexpr,
                            CO2: tl.constexpr, CO2_P: tl.constexpr, CO3: tl.constexpr, CO3_P: tl.constexpr,
                            BLOCK: tl.constexpr):
        HW = H * W
        pix = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        pix_ok = pix < HW
        hh = pix // W
        ww = pix % W
        n = (tl.program_id(1) + first_instance).to(tl.int64)
        b = tl.load(im_inds_ptr + n).to(tl.int64)
        prow = params_ptr + n * num_params
        feat = _load_features(feats_ptr, b, pix, pix_ok, HW, CM, CM_P)
        cx, cy = _coordinates(loc_ptr, soi_ptr, n, hh, ww, H, W, stride, ABS_COORDS)
        z = _first_layer(feat, cx, cy, prow, W_OFF0, B_OFF0, CO0, CO0_P, NC, CM, CM_P, HAS_FEATS)
        if NUM_LAYERS > 1:
            z = _dense(tl.maximum(z, 0.0), prow, W_OFF1, B_OFF1, CO1, CO1_P, WIDTH, WIDTH_P)
        if NUM_LAYERS > 2:
            z = _dense(tl.maximum(z, 0.0), prow, W_OFF2, B_OFF2, CO2, CO2_P, WIDTH, WIDTH_P)
        if NUM_LAYERS > 3:
            z = _dense(tl.maximum(z, 0.0), prow, W_OFF3, B_OFF3, CO3, CO3_P, WIDTH, WIDTH_P)
        logits = tl.sum(z, axis=0)  # the last layer has one real output row; its padding rows are exactly zero
        tl.store(out_ptr + n * HW + pix, logits.to(out_ptr.dtype.element_ty), mask=pix_ok)

    @triton.jit
    def _dmh_backward_kernel(feats_ptr, params_ptr, order_ptr, image_start_ptr, loc_ptr, soi_ptr, grad_out_ptr,
                             grad_feats_ptr, partial_ptr, num_instances, H, W, stride, num_params,
                             NUM_LAYERS: tl.constexpr, NC: tl.constexpr, ABS_COORDS: tl.constexpr,
                             HAS_FEATS: tl.constexpr, CM: tl.constexpr, CM_P: tl.constexpr,
                             WIDTH: tl.constexpr, WIDTH_P: tl.constexpr,
                             W_OFF0: tl.constexpr, W_OFF1: tl.constexpr, W_OFF2: tl.constexpr, W_OFF3: tl.constexpr,
                             B_OFF0: tl.constexpr, B_OFF1: tl.constexpr, B_OFF2: tl.constexpr, B_OFF3: tl.constexpr,
                             CO0: tl.constexpr, CO0_P: tl.constexpr, CO1: tl.constexpr, CO1_P: tl.constexpr,
                             CO2: tl.constexpr, CO2_P: tl.constexpr, CO3: tl.constexpr, CO3_P: tl.constexpr,
                             BLOCK: tl.constexpr):
        HW = H * W
        block = tl.program_id(0)
        pix = block * BLOCK + tl.arange(0, BLOCK)
        pix_ok = pix < HW
        hh = pix // W
        ww = pix % W
        b = tl.program_id(1).to(tl.int64)
        feat = _load_features(feats_ptr, b, pix, pix_ok, HW, CM, CM_P)
        grad_feat = 0.0 * feat
        start = tl.load(image_start_ptr + b)
        stop = tl.load(image_start_ptr + b + 1)
        for k in range(start, stop):  # the instances of image b (sorted by image on the host)
            n = tl.load(order_ptr + k).to(tl.int64)
            prow = params_ptr + n * num_params
            part = partial_ptr + (block * num_instances + n) * num_params
            cx, cy = _coordinates(loc_ptr, soi_ptr, n, hh, ww, H, W, stride, ABS_COORDS)
            # recompute the forward, keeping each layer's (post-ReLU) input in registers
            z = _first_layer(feat, cx, cy, prow, W_OFF0, B_OFF0, CO0, CO0_P, NC, CM, CM_P, HAS_FEATS)
            if NUM_LAYERS > 1:
                a1 = tl.maximum(z, 0.0)
                z = _dense(a1, prow, W_OFF1, B_OFF1, CO1, CO1_P, WIDTH, WIDTH_P)
            if NUM_LAYERS > 2:
                a2 = tl.maximum(z, 0.0)
                z = _dense(a2, prow, W_OFF2, B_OFF2, CO2, CO2_P, WIDTH, WIDTH_P)
            if NUM_LAYERS > 3:
                a3 = tl.maximum(z, 0.0)
                z = _dense(a3, prow, W_OFF3, B_OFF3, CO3, CO3_P, WIDTH, WIDTH_P)
            g = tl.load(grad_out_ptr + n * HW + pix, mask=pix_ok, other=0.0).to(tl.float32)
            # dL/dz of the last layer: the upstream gradient on its single real row (its tile has 2 rows, _pad(1))
            gz = tl.where(tl.arange(0, 2)[:, None] == 0, g[None, :], 0.0)
            if NUM_LAYERS > 3:
                gz = _dense_backward(gz, a3, prow, part, W_OFF3, B_OFF3, CO3, CO3_P, WIDTH, WIDTH_P)
            if NUM_LAYERS > 2:
                gz = _dense_backward(gz, a2, prow, part, W_OFF2, B_OFF2, CO2, CO2_P, WIDTH, WIDTH_P)
            if NUM_LAYERS > 1:
                gz = _dense_backward(gz, a1, prow, part, W_OFF1, B_OFF1, CO1, CO1_P, WIDTH, WIDTH_P)
            grad_feat += _first_layer_backward(gz, feat, cx, cy, prow, part, W_OFF0, B_OFF0, CO0, CO0_P, NC, CM,
                                               CM_P, HAS_FEATS)
        if HAS_FEATS:
            c = tl.arange(0, CM_P)
            offs = (b * CM + c[:, None]).to(tl.int64) * HW + pix[None, :]
            tl.store(grad_feats_ptr + offs, grad_feat.to(grad_feats_ptr.dtype.element_ty),
                     mask=(c < CM)[:, None] & pix_ok[None, :])


def _pad(c: int) -> int:
    """Register-tile size of a channel dimension: a power of two, at least 2."""
    return max(2, triton.next_power_of_2(c))


def _kernel_constants(mask_channels: int, channels: int, num_layers: int, coords: str) -> dict:
    """Compile-time constants of both kernels: coordinate mode, channel tiles, parameter offsets of every layer."""
    has_feats = coords != "coords_only"
    num_coords = 0 if coords == "none" else 2
    shapes = _layer_shapes(mask_head_input_channels(mask_channels, coords), channels, num_layers)
    weight_sizes = [o * i for o, i in shapes]
    w_offsets = [sum(weight_sizes[:l]) for l in range(num_layers)]
    b_offsets = [sum(weight_sizes) + sum(o for o, _ in shapes[:l]) for l in range(num_layers)]
    consts = dict(NUM_LAYERS=num_layers, NC=num_coords, ABS_COORDS=coords == "abs", HAS_FEATS=has_feats,
                  CM=mask_channels if has_feats else 0, CM_P=_pad(mask_channels if has_feats else 1),
                  WIDTH=channels, WIDTH_P=_pad(channels))
    for layer in range(MAX_KERNEL_LAYERS):  # unused layers get harmless placeholders
        out_c = shapes[layer][0] if layer < num_layers else 1
        consts[f"W_OFF{layer}"] = w_offsets[layer] if layer < num_layers else 0
        consts[f"B_OFF{layer}"] = b_offsets[layer] if layer < num_layers else 0
        consts[f"CO{layer}"] = out_c
        consts[f"CO{layer}_P"] = _pad(out_c)
    return consts


def _prepare(mask_feats, params, im_inds, locations, sizes_of_interest):
    return (mask_feats.contiguous(), params.contiguous(), im_inds.contiguous(), locations.contiguous(),
            sizes_of_interest.contiguous())


def _forward_triton(mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride, channels,
                    num_layers, coords) -> Tensor:
    mask_feats, params, im_inds, locations, sizes_of_interest = _prepare(mask_feats, params, im_inds, locations,
                                                                         sizes_of_interest)
    _, cmask, height, width = mask_feats.shape
    n = params.shape[0]
    out = torch.empty((n, height, width), device=mask_feats.device,
                      dtype=torch.promote_types(mask_feats.dtype, params.dtype))
    if n == 0 or height * width == 0:
        return out
    consts = _kernel_constants(cmask, channels, num_layers, coords)
    blocks = triton.cdiv(height * width, FWD_BLOCK)
    for first in range(0, n, _MAX_GRID_Y):
        count = min(_MAX_GRID_Y, n - first)
        _dmh_forward_kernel[(blocks, count)](mask_feats, params, im_inds, locations, sizes_of_interest, out, first,
                                             height, width, int(mask_feat_stride), params.shape[1],
                                             BLOCK=FWD_BLOCK, num_warps=FWD_NUM_WARPS, **consts)
    return out


def _backward_triton(grad_out, mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride,
                     channels, num_layers, coords) -> Tuple[Tensor, Tensor]:
    mask_feats, params, im_inds, locations, sizes_of_interest = _prepare(mask_feats, params, im_inds, locations,
                                                                         sizes_of_interest)
    grad_out = grad_out.contiguous()
    num_images, cmask, height, width = mask_feats.shape
    n, num_params = params.shape
    if n == 0 or height * width == 0 or num_images == 0:
        return torch.zeros_like(mask_feats), torch.zeros_like(params)
    consts = _kernel_constants(cmask, channels, num_layers, coords)
    # instances grouped by image: image b owns order[image_start[b]:image_start[b+1]]
    # (searchsorted, not bincount: no device-to-host sync, so the backward stays capturable in a CUDA graph)
    order = torch.argsort(im_inds, stable=True)
    image_start = torch.searchsorted(im_inds[order], torch.arange(num_images + 1, device=im_inds.device,
                                                                  dtype=im_inds.dtype))
    blocks = triton.cdiv(height * width, BWD_BLOCK)
    # fp32 whatever the inputs; every element is written by the kernel (coords_only has no feature gradient)
    grad_feats = (torch.empty if consts["HAS_FEATS"] else torch.zeros)(
        mask_feats.shape, device=mask_feats.device, dtype=torch.float32)
    partial = torch.empty((blocks, n, num_params), device=params.device, dtype=torch.float32)
    _dmh_backward_kernel[(blocks, num_images)](mask_feats, params, order, image_start, locations, sizes_of_interest,
                                               grad_out, grad_feats, partial, n, height, width,
                                               int(mask_feat_stride), num_params,
                                               BLOCK=BWD_BLOCK, num_warps=BWD_NUM_WARPS, **consts)
    return grad_feats.to(mask_feats.dtype), partial.sum(0).to(params.dtype)


def _backward_reference(grad_out, mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride,
                        channels, num_layers, coords) -> Tuple[Tensor, Tensor]:
    # torch.func.vjp, not torch.autograd.grad: inside a custom op's implementation the autograd keys are excluded
    def head(feats, weights):
        return dynamic_mask_head_reference(feats, weights, im_inds, locations, sizes_of_interest, mask_feat_stride,
                                           channels, num_layers, coords)

    out, vjp = torch.func.vjp(head, mask_feats.detach(), params.detach())
    grad_feats, grad_params = vjp(grad_out.to(out.dtype))
    return grad_feats, grad_params


def _use_kernel(mask_feats: Tensor, channels: int, num_layers: int, coords: str) -> bool:
    return triton_supported(mask_feats) and kernel_supports(mask_feats.shape[1], channels, num_layers, coords)


# --- the custom ops: Triton where it can run, the reference otherwise (so the ops are valid on any device) ---

@torch.library.custom_op("onestage::dynamic_mask_head", mutates_args=())
def _dynamic_mask_head_op(mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor,
                          sizes_of_interest: Tensor, mask_feat_stride: int, channels: int, num_layers: int,
                          coords: str) -> Tensor:
    if _use_kernel(mask_feats, channels, num_layers, coords):
        return _forward_triton(mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride, channels,
                               num_layers, coords)
    with torch.no_grad():
        return dynamic_mask_head_reference(mask_feats, params, im_inds, locations, sizes_of_interest,
                                           mask_feat_stride, channels, num_layers, coords).clone()


@_dynamic_mask_head_op.register_fake
def _(mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride, channels, num_layers, coords):
    return mask_feats.new_empty((params.shape[0],) + tuple(mask_feats.shape[2:]),
                                dtype=torch.promote_types(mask_feats.dtype, params.dtype))


@torch.library.custom_op("onestage::dynamic_mask_head_backward", mutates_args=())
def _dynamic_mask_head_backward_op(grad_out: Tensor, mask_feats: Tensor, params: Tensor, im_inds: Tensor,
                                   locations: Tensor, sizes_of_interest: Tensor, mask_feat_stride: int,
                                   channels: int, num_layers: int, coords: str) -> Tuple[Tensor, Tensor]:
    args = (grad_out, mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride, channels,
            num_layers, coords)
    if _use_kernel(mask_feats, channels, num_layers, coords):
        return _backward_triton(*args)
    return _backward_reference(*args)


@_dynamic_mask_head_backward_op.register_fake
def _(grad_out, mask_feats, params, im_inds, locations, sizes_of_interest, mask_feat_stride, channels, num_layers,
      coords):
    return (torch.empty_like(mask_feats, memory_format=torch.contiguous_format),
            torch.empty_like(params, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    mask_feats, params, im_inds, locations, sizes_of_interest, stride, channels, num_layers, coords = inputs
    ctx.save_for_backward(mask_feats, params, im_inds, locations, sizes_of_interest)
    ctx.head = (stride, channels, num_layers, coords)


def _backward(ctx, grad_out):
    mask_feats, params, im_inds, locations, sizes_of_interest = ctx.saved_tensors
    grad_feats = grad_params = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_feats, grad_params = _dynamic_mask_head_backward_op(grad_out, mask_feats, params, im_inds, locations,
                                                                 sizes_of_interest, *ctx.head)
    return grad_feats, grad_params, None, None, None, None, None, None, None


_dynamic_mask_head_op.register_autograd(_backward, setup_context=_setup_context)


def dynamic_mask_head(mask_feats: Tensor, params: Tensor, im_inds: Tensor, locations: Tensor,
                      sizes_of_interest: Tensor, mask_feat_stride: int = 8, channels: int = 8, num_layers: int = 3,
                      coords: str = "rel", force_reference: bool = False) -> Tensor:
    """Mask logits ``N×H×W``: the fused Triton kernel for CUDA tensors of a supported head shape, the reference
    otherwise (same arguments and semantics as :func:`dynamic_mask_head_reference`; see the module docstring).

    ``force_reference=True`` (or ``ONESTAGE_FORCE_REFERENCE=1``) always runs the reference, e.g. to compare.
    """
    if coords not in COORD_MODES:
        raise ValueError(f"coords must be one of {COORD_MODES}, got {coords!r}")
    expected = num_dynamic_params(mask_feats.shape[1], channels, num_layers, coords)
    if params.dim() != 2 or params.shape[1] != expected:
        raise ValueError(f"expected N×{expected} dynamic parameters, got {tuple(params.shape)}")
    if force_reference or force_reference_from_env() or not _use_kernel(mask_feats, channels, num_layers, coords):
        return dynamic_mask_head_reference(mask_feats, params, im_inds, locations, sizes_of_interest,
                                           mask_feat_stride, channels, num_layers, coords)
    return _dynamic_mask_head_op(mask_feats, params, im_inds, locations, sizes_of_interest, int(mask_feat_stride),
                                 int(channels), int(num_layers), coords)
